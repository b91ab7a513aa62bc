"""Ownership of an output directory: which model and study OUT belongs to, and one process at a time.

``OUT/accelkit-out.json`` records the model, its weights hash, the study and the budgets the plans and
report in OUT were made for. A run for another model, study or for budgets that drop one of the
recorded ones refuses (naming ``--out``) unless ``overwrite`` is set; then the stale ``plans/`` and
``report/`` are renamed away (atomic) and removed. A directory that holds files without this record
is never written into: accelkit removes only what it wrote. ``OUT/.accelkit.lock`` (an exclusive
``flock``, released by the kernel when the process dies, even by kill -9) keeps a second process out.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from accelkit._io import atomic_write_json
from accelkit.errors import InputError

MARKER = "accelkit-out.json"
LOCK = ".accelkit.lock"
OUT_FORMAT = 1
#: What accelkit writes into OUT; an OUT from before the marker holds only these (and a study.db).
WRITTEN = frozenset({"plans", "report", "study.db", "calibration", "tensorrt-timing.cache", MARKER, LOCK})
#: Replaced by ``overwrite``: the results of another model or study. The study database keeps its
#: studies apart by name and the calibration cache its entries by weights hash, so both stay.
STALE = ("plans", "report")


@dataclass(frozen=True, kw_only=True)
class OutIdentity:
    """What the plans and report in OUT were made for."""

    version: int = OUT_FORMAT
    model: str
    weights_hash: str
    study: str
    budgets: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "budgets": list(self.budgets)}


def check_writable_dir(path: str | os.PathLike, flag: str) -> None:
    """``path`` is, or can be created as, a directory this process may write into."""
    target = Path(path).absolute()
    existing = next((p for p in (target, *target.parents) if p.exists()), Path("/"))
    if not existing.is_dir():
        where = "is a file" if existing == target else f"lies under the file '{existing}'"
        raise InputError(f"{flag} '{path}' {where}: pass a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag} '{path}' is not writable ('{existing}' is read-only): pass a writable directory")


class OutLock:
    """An exclusive lock on OUT held by this process (see :func:`claim_out_dir`)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / LOCK
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            self._fd = None
            raise InputError(f"--out '{out}' is in use by another accelkit process (pid {holder}): wait for it to "
                             "finish or pass another --out") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
            _HELD.pop(self.out.resolve(), None)


#: Locks this process holds, by resolved OUT: a second run in the same process reuses its lock.
_HELD: dict[Path, OutLock] = {}


def release_out_dir(out: str | os.PathLike | None) -> None:
    if out is not None and (lock := _HELD.get(Path(out).resolve())) is not None:
        lock.release()


def _differences(recorded: dict[str, Any], identity: OutIdentity) -> list[str]:
    diffs = [f"{key} {recorded.get(key)!r} (here {getattr(identity, key)!r})"
             for key in ("model", "weights_hash", "study") if recorded.get(key) != getattr(identity, key)]
    dropped = sorted(set(recorded.get("budgets", [])) - set(identity.budgets))
    if dropped:
        diffs.append(f"budgets {sorted(recorded.get('budgets', []))} (here {list(identity.budgets)})")
    return diffs


def _remove_stale(out: Path) -> None:
    """Rename the stale results away first (one atomic step each), then delete them."""
    for name in STALE:
        path = out / name
        if path.exists():
            trash = out / f".{name}.stale-{os.getpid()}"
            os.replace(path, trash)
            shutil.rmtree(trash, ignore_errors=True)


def _read_marker(out: Path) -> dict[str, Any]:
    try:
        data = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or data.get("version") != OUT_FORMAT:
        raise InputError(f"--out '{out}': {MARKER} is damaged or from another accelkit version; pass another "
                         "--out (or delete the directory if it is yours to lose)")
    return data


def _foreign_report_files(out: Path) -> list[str]:
    """Files in OUT/report/ that the report does not mention: someone else put them there.

    The report folder is replaced as a whole when it is rewritten; a file its index.html and
    report.json do not name (and no temporary file of an atomic write) would be lost with it.
    """
    report = out / "report"
    if not report.is_dir():
        return []
    text = ""
    for name in ("index.html", "report.json"):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text += (report / name).read_text(encoding="utf-8")
    foreign = []
    for path in sorted(p for p in report.rglob("*") if p.is_file()):
        relative = path.relative_to(report).as_posix()
        ours = relative in ("index.html", "report.json") or relative in text or path.name.startswith(".")
        if not ours:
            foreign.append(f"report/{relative}")
    return foreign


def _adopt_or_refuse(out: Path, identity: OutIdentity, overwrite: bool) -> tuple[str, ...]:
    """The budgets OUT will record, after refusing or clearing a foreign or mismatched OUT."""
    entries = {p.name for p in out.iterdir()} - {LOCK}
    if not (out / MARKER).is_file():
        foreign = sorted(entries - WRITTEN)
        if foreign or (entries and "study.db" not in entries):
            shown = ", ".join(foreign or sorted(entries))[:120]
            raise InputError(f"--out '{out}' already holds files accelkit did not write ({shown}): pass an empty "
                             "or new directory as --out")
        recorded = None  # empty, or an OUT written before the marker existed
    else:
        recorded = _read_marker(out)
    foreign = _foreign_report_files(out)
    if foreign:
        raise InputError(f"--out '{out}': {', '.join(foreign[:3])} was not written by accelkit and would be lost "
                         "when the report is rewritten: move it out of --out")
    if recorded is None:
        return identity.budgets
    diffs = _differences(recorded, identity)
    if not diffs:
        return tuple(dict.fromkeys([*recorded.get("budgets", []), *identity.budgets]))
    if not overwrite:
        raise InputError(f"--out '{out}' holds plans for other settings: {'; '.join(diffs)}; pass another --out, or "
                         "--overwrite to replace its plans and report")
    _remove_stale(out)
    return identity.budgets


def claim_out_dir(out: str | os.PathLike, identity: OutIdentity, *, overwrite: bool = False) -> OutLock:
    """Lock OUT for this process and make sure its plans and report belong to ``identity``.

    Raises:
        InputError: OUT is a file or read-only, in use by another process, holds files accelkit did not
            write, or holds results for another model, study or budgets (without ``overwrite``).
    """
    out = Path(out)
    check_writable_dir(out, "--out")
    held = _HELD.get(out.resolve()) if out.exists() else None
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = held or OutLock(out)
    try:
        budgets = _adopt_or_refuse(out, identity, overwrite)
        atomic_write_json(out / MARKER, {**identity.to_json(), "budgets": list(budgets)})
    except BaseException:
        lock.release()
        with contextlib.suppress(OSError):
            if created:
                shutil.rmtree(out)
            elif not (out / MARKER).is_file():
                (out / LOCK).unlink()  # leave a foreign directory exactly as it was
        raise
    _HELD[out.resolve()] = lock
    return lock
