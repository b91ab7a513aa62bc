"""Output-directory ownership (accelkit/artifacts/outdir.py): marker, refusals, --overwrite, the lock."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from accelkit.artifacts.outdir import LOCK, MARKER, OutIdentity, claim_out_dir, release_out_dir
from accelkit.errors import InputError

ME = OutIdentity(model="zoo:shapes", weights_hash="ab" * 32, study="s1", budgets=("2x",))


def _files(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.fixture
def claim():
    claimed = []

    def do(out, identity=ME, **kwargs):
        lock = claim_out_dir(out, identity, **kwargs)
        claimed.append(out)
        return lock

    yield do
    for out in claimed:
        release_out_dir(out)


def test_new_directory_gets_marker_and_lock(tmp_path, claim):
    out = tmp_path / "a" / "out"
    claim(out)
    marker = json.loads((out / MARKER).read_text())
    assert marker == {"version": 1, "model": "zoo:shapes", "weights_hash": "ab" * 32, "study": "s1", "budgets": ["2x"]}
    assert (out / LOCK).is_file()


@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_directory_is_never_written_into(tmp_path, claim, overwrite):
    project = tmp_path / "project"
    (project / "report").mkdir(parents=True)
    (project / "report" / "thesis.tex").write_text("\\section{results}")
    (project / "notes.txt").write_text("mine")
    before = _files(project)
    with pytest.raises(InputError, match="already holds files accelkit did not write"):
        claim(project, overwrite=overwrite)
    assert _files(project) == before
    assert (project / "report" / "thesis.tex").read_text() == "\\section{results}"


def test_same_settings_resume_and_budgets_accumulate(tmp_path, claim):
    out = tmp_path / "out"
    claim(out)
    (out / "plans" / "2x").mkdir(parents=True)
    release_out_dir(out)
    claim(out, OutIdentity(model=ME.model, weights_hash=ME.weights_hash, study="s1", budgets=("2x", "50x")))
    assert json.loads((out / MARKER).read_text())["budgets"] == ["2x", "50x"]
    assert (out / "plans" / "2x").is_dir()


@pytest.mark.parametrize(("change", "words"), [
    ({"model": "./other"}, "model 'zoo:shapes'"),
    ({"weights_hash": "cd" * 32}, "weights_hash"),
    ({"study": "s2"}, "study 's1'"),
    ({"budgets": ("3x",)}, r"budgets \['2x'\] \(here \['3x'\]\)"),
])
def test_other_model_study_or_budgets_refused_then_overwritten(tmp_path, claim, change, words):
    out = tmp_path / "out"
    claim(out)
    for name in ("plans/2x/plan.json", "report/report.json", "study.db", "user-notes.txt"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    release_out_dir(out)
    other = OutIdentity(**{**ME.to_json(), "budgets": ME.budgets, **change})
    before = _files(out)
    with pytest.raises(InputError, match=f"--out '{out}' holds plans for other settings: {words}"):
        claim(out, other)
    assert _files(out) == before
    claim(out, other, overwrite=True)
    assert not (out / "plans").exists() and not (out / "report").exists()
    assert (out / "study.db").is_file()  # studies are kept apart by name
    assert (out / "user-notes.txt").read_text() == "x"  # never removed: accelkit did not write it
    assert not [p for p in out.iterdir() if ".stale-" in p.name]
    assert json.loads((out / MARKER).read_text())["budgets"] == list(other.budgets)


def test_out_from_before_the_marker_is_adopted(tmp_path, claim):
    out = tmp_path / "out"
    (out / "plans" / "2x").mkdir(parents=True)
    (out / "study.db").write_bytes(b"")
    claim(out)
    assert (out / MARKER).is_file() and (out / "plans" / "2x").is_dir()


def test_damaged_marker_refused(tmp_path, claim):
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text("[1, 2")
    with pytest.raises(InputError, match="damaged"):
        claim(out)


def test_second_process_refused_while_first_holds_the_lock(tmp_path, claim):
    out = tmp_path / "out"
    claim(out)
    release_out_dir(out)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(out / LOCK)!r}, os.O_RDWR)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.ftruncate(fd, 0); os.pwrite(fd, str(os.getpid()).encode(), 0)\n"
        "print('locked', flush=True); time.sleep(30)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match=rf"in use by another accelkit process \(pid {holder.pid}\)"):
            claim(out)
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    claim(out)  # the kernel released the dead holder's lock


def test_file_or_read_only_parent_refused(tmp_path, claim):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="lies under the file"):
        claim(tmp_path / "file" / "out")
    with pytest.raises(InputError, match="is a file"):
        claim(tmp_path / "file")


@pytest.mark.parametrize("overwrite", [False, True])
def test_user_file_inside_an_owned_report_folder_is_kept(tmp_path, claim, overwrite):
    out = tmp_path / "out"
    claim(out)
    (out / "report" / "images").mkdir(parents=True)
    (out / "report" / "index.html").write_text('<img src="images/plot.png">')
    (out / "report" / "report.json").write_text("{}")
    (out / "report" / "images" / "plot.png").write_bytes(b"png")
    (out / "report" / ".index.html.x.tmp").write_text("left by a kill -9")
    release_out_dir(out)
    claim(out)  # everything there is the report's own
    release_out_dir(out)
    (out / "report" / "thesis.tex").write_text("mine")
    with pytest.raises(InputError, match="report/thesis.tex was not written by accelkit"):
        claim(out, OutIdentity(**{**ME.to_json(), "budgets": ("3x",)}) if overwrite else ME, overwrite=overwrite)
    assert (out / "report" / "thesis.tex").read_text() == "mine"
