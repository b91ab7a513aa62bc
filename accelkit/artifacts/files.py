"""File records: relative paths kept inside their folder, sha256 and size, verified with the file named."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from accelkit.errors import PlanMismatchError

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def inside(root: Path, relative: Any, what: str) -> Path:
    """``root / relative`` when ``relative`` is a plain relative path that stays inside ``root``.

    Raises:
        PlanMismatchError: an absolute path, ``..``, or a symlink leading out of ``root``.
    """
    if not isinstance(relative, str) or not relative or "\\" in relative or "\x00" in relative:
        raise PlanMismatchError(f"{what} {relative!r} is not a relative file name: the file was edited; "
                                "re-run the command that wrote it")
    parts = PurePosixPath(relative).parts
    if PurePosixPath(relative).is_absolute() or ".." in parts:
        raise PlanMismatchError(f"{what} '{relative}' points outside '{root}': refusing to follow it; "
                                "re-run the command that wrote it")
    path = root.joinpath(*parts)
    if path.exists() and not path.resolve().is_relative_to(root.resolve()):
        raise PlanMismatchError(f"{what} '{relative}' links outside '{root}': refusing to follow it")
    return path


@dataclass(frozen=True, kw_only=True)
class FileRecord:
    """One referenced file: its sha256 and size in bytes."""

    sha256: str
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "bytes": self.bytes}

    @classmethod
    def of(cls, path: Path) -> FileRecord:
        return cls(sha256=sha256_file(path), bytes=path.stat().st_size)

    @classmethod
    def from_json(cls, data: Any, name: str, where: str) -> FileRecord:
        if (not isinstance(data, Mapping) or not isinstance(data.get("sha256"), str)
                or not isinstance(data.get("bytes"), int)):
            raise PlanMismatchError(f"{where}: the record of '{name}' is damaged (needs sha256 and bytes); "
                                    "re-run the command that wrote it")
        return cls(sha256=data["sha256"], bytes=data["bytes"])


def record_files(root: Path, names: Iterable[str], what: str) -> dict[str, FileRecord]:
    """Hash every file of ``names`` (relative to ``root``, kept inside it)."""
    records = {}
    for name in names:
        path = inside(root, name, what)
        if not path.is_file():
            raise PlanMismatchError(f"{what} '{name}' is missing from '{root}'")
        records[name] = FileRecord.of(path)
    return records


def verify_records(root: Path, records: Mapping[str, FileRecord], what: str) -> None:
    """Refuse a missing, truncated or changed file, naming it and the fix."""
    for name, record in records.items():
        path = inside(root, name, what)
        if not path.is_file():
            raise PlanMismatchError(f"'{path}' is missing but {what} lists it: restore it or re-run the command "
                                    "that wrote it")
        size = path.stat().st_size
        if size != record.bytes:
            raise PlanMismatchError(f"'{path}' has {size} bytes, {what} recorded {record.bytes}: the file is "
                                    "truncated or replaced; restore it or re-run the command that wrote it")
        if sha256_file(path) != record.sha256:
            raise PlanMismatchError(f"'{path}' does not match the sha256 {what} recorded: the file was changed; "
                                    "restore it or re-run the command that wrote it")
