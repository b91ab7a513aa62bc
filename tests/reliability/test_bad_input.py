"""Bad input across every command: exit 2, one line without a traceback, the directory unchanged.

The cases of issue #19's table. Most are refused before the model loads (``no_model_load`` makes
loading fail loudly); the few that need the model (a damaged pipeline folder) load zoo:shapes-sized
files only.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from accelkit.cli.main import main
from tests.reliability.helpers import TINY, cli, one_line_error, snapshot, tmpfs
from tests.unit.cli.test_cli import no_model_load  # noqa: F401 - a fixture: values are refused before loading


@pytest.fixture
def workdir(tmp_path):
    """Files the cases point at: a binary prompts file, a regular file, a plan folder."""
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "file").write_text("x")
    (tmp_path / "existing-dir.png").mkdir()
    return tmp_path


def _plan_out(root: Path, data) -> Path:
    out = root / "planned"
    (out / "plans" / "2x").mkdir(parents=True)
    text = data if isinstance(data, bytes) else json.dumps(data).encode()
    (out / "plans" / "2x" / "plan.json").write_bytes(text)
    return out


_PLAN_NO_GENERATION = {"schema": 2, "budget": "2x", "model": {"id": "zoo:shapes", "weights_hash": "ab"},
                       "scheduler": {"class": "X"}, "baseline_steps": 4, "num_steps": 2, "passes": {}, "files": {}}

# (case id, argv with {d} for the work dir, words the message must hold)
OPTIMIZE_CASES = [
    ("seed-negative", ["--seed", "-1"], "--seed"),
    ("seed-too-big", ["--seed", str(2**32)], "--seed"),
    ("device-gpu0", ["--device", "gpu0"], "--device 'gpu0' is not a device"),
    ("device-mps", ["--device", "mps"], "cpu or cuda"),
    ("height-huge", ["--height", "100000"], "--height 100000 exceeds"),
    ("height-7", ["--height", "7"], "multiple of 8"),
    ("width-12", ["--width", "12"], "--width 12"),
    ("steps-billion", ["--steps", "1000000000"], "--steps 1000000000 is out of range"),
    ("steps-1", ["--steps", "1"], "--steps"),
    ("guidance-nan", ["--guidance-scale", "nan"], "not a finite number"),
    ("guidance-inf", ["--guidance-scale", "inf"], "not a finite number"),
    ("guidance-negative", ["--guidance-scale", "-1"], "--guidance-scale"),
    ("min-psnr-nan", ["--min-psnr", "nan"], "--min-psnr"),
    ("prompts-binary", ["--prompts", "{d}/binary.txt"], "not UTF-8 text"),
    ("eval-prompts-binary", ["--eval-prompts", "{d}/binary.txt"], "not UTF-8 text"),
    ("out-under-file", ["--out", "{d}/file/out"], "lies under the file"),
    ("trials-zero", ["--trials", "0"], "--trials"),
]


@pytest.mark.parametrize(("case", "args", "words"), OPTIMIZE_CASES, ids=[c[0] for c in OPTIMIZE_CASES])
@pytest.mark.usefixtures("no_model_load")
def test_optimize_bad_values_refused_before_loading(workdir, capsys, case, args, words):
    args = [a.replace("{d}", str(workdir)) for a in args]
    out = ["--out", str(workdir / "out")] if "--out" not in args else []
    before = snapshot(workdir)
    assert main(["optimize", "zoo:shapes", *args, *out, "--quiet"]) == 2
    assert words in one_line_error(capsys.readouterr().err)
    assert snapshot(workdir) == before  # no OUT, no study.db


OTHER_CASES = [
    ("inspect-height-7", ["inspect", "zoo:shapes", "--height", "7"], "multiple of 8"),
    ("inspect-width-huge", ["inspect", "zoo:shapes", "--width", "100000"], "exceeds"),
    ("run-device-gpu0", ["run", "{d}", "--prompt", "a", "--device", "gpu0", "--output", "{d}/x.png"], "not a device"),
    ("run-seed-negative", ["run", "{d}", "--prompt", "a", "--seed", "-1", "--output", "{d}/x.png"], "--seed"),
    ("run-seed-overflow", ["run", "{d}", "--prompt", "a", "--prompt", "b", "--seed", str(2**32 - 1),
                           "--output", "{d}/x.png"], "--seed"),
    ("run-output-dir", ["run", "{d}", "--prompt", "a", "--output", "{d}/existing-dir.png"], "is not a file"),
    ("run-output-jpg", ["run", "{d}", "--prompt", "a", "--output", "{d}/x.jpg"], "must end in .png"),
    ("run-output-under-file", ["run", "{d}", "--prompt", "a", "--output", "{d}/file/x.png"], "is a file"),
    ("distill-prompts-binary", ["distill", "{d}", "--prompts", "{d}/binary.txt"], "not UTF-8 text"),
    ("distill-eval-binary", ["distill", "{d}", "--eval-prompts", "{d}/binary.txt"], "not UTF-8 text"),
    ("distill-seed", ["distill", "{d}", "--seed", "-1"], "--seed"),
    ("distill-lr-nan", ["distill", "{d}", "--lr", "nan"], "--lr"),
    ("distill-device", ["distill", "{d}", "--device", "gpu0"], "not a device"),
    ("search-seed", ["search", "--worker", "--storage", "sqlite:///{d}/s.db", "--trials", "1", "--seed", "-1"],
     "--seed"),
    ("report-device", ["report", "{d}", "--storage", "sqlite:///{d}/s.db", "--device", "gpu0"], "not a device"),
]


@pytest.mark.parametrize(("case", "args", "words"), OTHER_CASES, ids=[c[0] for c in OTHER_CASES])
@pytest.mark.usefixtures("no_model_load")
def test_other_commands_bad_values(workdir, capsys, case, args, words):
    args = [a.replace("{d}", str(workdir)) for a in args]
    before = snapshot(workdir)
    assert main(args) == 2
    assert words in one_line_error(capsys.readouterr().err)
    assert snapshot(workdir) == before


PLAN_CASES = [
    ("plan-is-a-list", [1, 2], "2x", "does not hold a JSON object"),
    ("plan-binary", b"\xff\xfe\x00garbage", "2x", "not UTF-8"),
    ("plan-without-generation", _PLAN_NO_GENERATION, "2x", "generation"),
    ("plan-budget-field-differs", {**_PLAN_NO_GENERATION, "budget": "3x"}, "2x", "budget 3x, not 2x"),
    ("plan-old-schema", {**_PLAN_NO_GENERATION, "schema": 1}, "2x", "plan schema 1"),
]


@pytest.mark.parametrize(("case", "data", "budget", "words"), PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
@pytest.mark.parametrize("command", ["run", "export", "distill"])
@pytest.mark.usefixtures("no_model_load")
def test_damaged_plan_json_refused(workdir, capsys, case, data, budget, words, command):
    out = _plan_out(workdir, data)
    before = snapshot(workdir)
    extra = ["--prompt", "a", "--output", str(workdir / "x.png")] if command == "run" else []
    assert main([command, str(out), "--budget", budget, *extra]) == 2
    assert words in one_line_error(capsys.readouterr().err)
    assert snapshot(workdir) == before


def test_pipeline_folder_without_class_name(workdir, capsys):
    folder = workdir / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_diffusers_version": "0.42.1"}))
    before = snapshot(workdir)
    assert main(["optimize", str(folder), "--out", str(workdir / "out"), "--quiet"]) == 2
    assert "_class_name" in one_line_error(capsys.readouterr().err)
    assert snapshot(workdir) == before


def test_unreachable_storage_creates_no_out(workdir, capsys):
    storage = f"sqlite:///{workdir}/missing-dir/deeper/study.db"
    before = snapshot(workdir)
    rc = main(["optimize", "zoo:shapes", "--storage", storage, "--trials", "1", *TINY, "--out",
               str(workdir / "out"), "--quiet"])
    assert rc == 2
    assert "cannot open the study storage" in one_line_error(capsys.readouterr().err)
    assert snapshot(workdir) == before


def test_internal_error_exits_1_with_please_report(monkeypatch, capsys, tmp_path):
    import accelkit.cli.main as cli_main

    def boom(args):
        raise ZeroDivisionError("an accelkit bug")

    monkeypatch.setitem(cli_main.COMMANDS, "inspect", boom)
    assert main(["inspect", "zoo:shapes"]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert "ZeroDivisionError: an accelkit bug" in line and "please report" in line and "--debug" in line
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "inspect", "zoo:shapes"])


def test_environment_oserror_is_one_line_exit_2(monkeypatch, capsys):
    import errno

    import accelkit.cli.main as cli_main

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/some/out/plans/2x/plan.json")

    monkeypatch.setitem(cli_main.COMMANDS, "inspect", full)
    assert main(["inspect", "zoo:shapes"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "plan.json" in line and "disk is full" in line


# ------------------------------------------------------------------ read-only folders (a tmpfs, as root)


@pytest.fixture
def read_only_dir(tmp_path):
    """A tmpfs holding a plan folder, remounted read-only."""
    with tmpfs(tmp_path / "ro", "1m") as mount:
        (mount / "plans" / "2x").mkdir(parents=True)
        (mount / "plans" / "2x" / "plan.json").write_text(json.dumps(_PLAN_NO_GENERATION))
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        yield mount


@pytest.mark.parametrize("command", ["optimize", "export", "distill"])
@pytest.mark.usefixtures("no_model_load")
def test_read_only_out_or_plan_folder(read_only_dir, capsys, command):
    before = snapshot(read_only_dir)
    argv = (["optimize", "zoo:shapes", "--out", str(read_only_dir / "out"), "--quiet"] if command == "optimize"
            else [command, str(read_only_dir)])
    assert main(argv) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "read-only" in line or "not writable" in line
    assert snapshot(read_only_dir) == before


def test_console_script_seed_out_of_range(tmp_path):
    result = cli("optimize", "--seed", "-1", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "--seed" in one_line_error(result.stderr)
    assert not (tmp_path / "out").exists()
