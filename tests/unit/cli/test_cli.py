"""Tests of the ``accelkit`` command line (accelkit/cli/main.py): help, inspect, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from accelkit.cli.main import main
from accelkit.passes.base import PASS_ORDER, registered_passes
from tests.fixtures.tiny_models import saved_pipeline_folder


def _one_line_error(captured) -> str:
    err = captured.err.strip()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("accelkit: error:"), err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------ help


def test_top_level_help_mentions_examples(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert "accelkit optimize" in out and "exit codes" in out
    for command in ("inspect", "optimize", "report", "run"):
        assert command in out


def test_optimize_help_mentions_examples(capsys):
    with pytest.raises(SystemExit) as info:
        main(["optimize", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--budget" in out and "--min-psnr" in out


def test_console_script_help_exit_code():
    result = subprocess.run([sys.executable, "-m", "accelkit.cli.main", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    assert "examples:" in result.stdout


def test_console_script_bad_budget_exit_code(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(["accelkit", "optimize", "--budget", "fast", "--out", str(out)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("accelkit: error:"), result.stderr
    assert not out.exists()


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "examples:" in capsys.readouterr().out


# ------------------------------------------------------------------ inspect


def test_inspect_zoo_shapes_json(capsys):
    assert main(["inspect", "zoo:shapes", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)  # stdout holds only the JSON
    assert info["model"] == "zoo:shapes"
    assert info["family"] == "FluxTransformer2DModel"
    assert info["params"] > 0
    names = [b["name"] for b in info["blocks"]]
    assert len(names) == 6
    assert sum(n.startswith("transformer_blocks.") for n in names) == 2
    assert sum(n.startswith("single_transformer_blocks.") for n in names) == 4
    assert sum(b["flops_share"] for b in info["blocks"]) <= 1.0 + 1e-9
    assert all(b["weight_bytes"] > 0 for b in info["blocks"])
    assert info["attention_sites"] and all(v is None or v > 0 for v in info["attention_sites"].values())
    assert len(info["attention_sites"]) >= 6
    assert info["flops_per_step"] > 0
    assert info["generation"]["height"] == 32 and info["generation"]["width"] == 32


def test_inspect_pixart_folder(tmp_path, capsys):
    folder = saved_pipeline_folder("pixart", tmp_path)
    assert main(["inspect", str(folder), "--json", "--height", "64", "--width", "64"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == str(folder)
    assert info["family"] == "PixArtTransformer2DModel"
    assert [b["name"] for b in info["blocks"]] == ["transformer_blocks.0", "transformer_blocks.1"]
    assert info["params"] > 0 and info["attention_sites"]
    assert info["generation"]["height"] == 64
    # the table form works too
    assert main(["inspect", str(folder), "--height", "64", "--width", "64"]) == 0


# ------------------------------------------------------------------ bad input: exit 2, one line, nothing written


def _bad_optimize(tmp_path, capsys, *args: str) -> str:
    out = tmp_path / "out"
    rc = main(["optimize", *args, "--out", str(out), "--quiet"])
    assert rc == 2
    line = _one_line_error(capsys.readouterr())
    assert not out.exists(), f"bad input wrote {sorted(p.name for p in out.iterdir())}"
    return line


def test_optimize_nonexistent_path(tmp_path, capsys):
    line = _bad_optimize(tmp_path, capsys, str(tmp_path / "nope"))
    assert "no such path" in line


def test_optimize_folder_without_model_index(tmp_path, capsys):
    folder = tmp_path / "empty"
    folder.mkdir()
    line = _bad_optimize(tmp_path, capsys, str(folder))
    assert "model_index.json" in line


def test_inspect_nonexistent_path(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    _one_line_error(capsys.readouterr())


def test_inspect_folder_without_model_index(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "model_index.json" in _one_line_error(capsys.readouterr())


@pytest.mark.parametrize("budget", ["fast", "0.5x", "0x", "2xx"])
def test_optimize_invalid_budget(tmp_path, capsys, budget):
    line = _bad_optimize(tmp_path, capsys, "--budget", budget)
    assert "invalid budget" in line and budget in line


def test_optimize_invalid_second_budget(tmp_path, capsys):
    assert "invalid budget" in _bad_optimize(tmp_path, capsys, "--budget", "2x", "--budget", "fast")


def test_optimize_unknown_pass(tmp_path, capsys):
    assert "unknown pass" in _bad_optimize(tmp_path, capsys, "--passes", "foo")


def test_optimize_empty_passes(tmp_path, capsys):
    assert "empty" in _bad_optimize(tmp_path, capsys, "--passes", "")


def test_optimize_pass_not_available_yet(tmp_path, capsys):
    missing = [n for n in PASS_ORDER if n not in registered_passes()]
    if not missing:
        pytest.skip("every pass is registered")
    line = _bad_optimize(tmp_path, capsys, "--passes", f"steps,{missing[0]}")
    assert "not available" in line


@pytest.mark.parametrize(("args", "words"), [(("--trials", "0"), "--trials"), (("--trials", "-3"), "--trials"),
                                             (("--steps", "1"), "--steps")])
def test_optimize_bad_counts(tmp_path, capsys, args, words):
    assert words in _bad_optimize(tmp_path, capsys, *args)


def test_optimize_missing_prompts_file(tmp_path, capsys):
    line = _bad_optimize(tmp_path, capsys, "--prompts", str(tmp_path / "missing.txt"))
    assert "prompt file" in line


def test_optimize_empty_prompts_file(tmp_path, capsys):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    assert "no prompts" in _bad_optimize(tmp_path, capsys, "--prompts", str(empty))


def test_optimize_missing_eval_prompts_file(tmp_path, capsys):
    assert "prompt file" in _bad_optimize(tmp_path, capsys, "--eval-prompts", str(tmp_path / "missing.txt"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
def test_optimize_cuda_without_gpu(tmp_path, capsys):
    assert "cuda" in _bad_optimize(tmp_path, capsys, "--device", "cuda").lower()


def test_optimize_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["optimize", "--out", str(target), "--quiet"]) == 2
    assert "is a file" in _one_line_error(capsys.readouterr())
    assert target.read_text() == "x"


def test_argparse_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["optimize", "--trials", "many", "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    assert not (tmp_path / "out").exists()


class _LoadCalled(Exception):
    pass


@pytest.fixture
def no_model_load(monkeypatch):
    """Make loading a model fail loudly: settings errors must be caught before the (slow) load."""
    import accelkit.loading

    def refuse(*args, **kwargs):
        raise _LoadCalled("load_pipeline was reached")

    monkeypatch.setattr(accelkit.loading, "load_pipeline", refuse)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_optimize_bad_num_prompts(tmp_path, capsys, no_model_load, value):
    assert "--num-prompts" in _bad_optimize(tmp_path, capsys, "--num-prompts", value)


def test_optimize_bad_num_eval_prompts(tmp_path, capsys, no_model_load):
    assert "--num-eval-prompts" in _bad_optimize(tmp_path, capsys, "--num-eval-prompts", "0")


def test_optimize_odd_resolution_is_bad_input(tmp_path, capsys):
    _bad_optimize(tmp_path, capsys, "zoo:shapes", "--height", "7", "--width", "7")


# ------------------------------------------------------------------ run / report without an optimize run


def test_run_without_plans_exits_2(tmp_path, capsys):
    rc = main(["run", str(tmp_path), "--prompt", "a red circle", "--output", str(tmp_path / "x.png")])
    assert rc == 2
    assert "plans" in _one_line_error(capsys.readouterr())
    assert not (tmp_path / "x.png").exists()


def test_run_with_empty_plans_exits_2(tmp_path, capsys):
    (tmp_path / "plans" / "2x").mkdir(parents=True)
    rc = main(["run", str(tmp_path), "--prompt", "a red circle", "--output", str(tmp_path / "x.png")])
    assert rc == 2
    _one_line_error(capsys.readouterr())


def test_report_without_report_json_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "report.json" in _one_line_error(capsys.readouterr())


# ------------------------------------------------------------------ TensorRT without TensorRT


@pytest.fixture
def no_tensorrt(monkeypatch):
    """``import tensorrt`` fails, whether or not TensorRT is installed here."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def test_export_tensorrt_without_tensorrt_exits_2(tmp_path, capsys, no_tensorrt, no_model_load):
    # Checked before the plan is read or the model loaded: the message names the fix, not the plan.
    assert main(["export", str(tmp_path), "--target", "tensorrt"]) == 2
    line = _one_line_error(capsys.readouterr())
    assert "TensorRT is not installed" in line and "accelkit[tensorrt]" in line and "NVIDIA GPU" in line


def test_run_tensorrt_backend_without_tensorrt_exits_2(tmp_path, capsys, no_tensorrt, no_model_load):
    rc = main(["run", str(tmp_path), "--backend", "tensorrt", "--prompt", "a red circle",
               "--output", str(tmp_path / "x.png")])
    assert rc == 2
    assert "accelkit[tensorrt]" in _one_line_error(capsys.readouterr())
    assert not (tmp_path / "x.png").exists()


def test_optimize_export_tensorrt_without_tensorrt_exits_2_before_searching(tmp_path, capsys, no_tensorrt,
                                                                           no_model_load):
    assert main(["optimize", "--export", "tensorrt", "--out", str(tmp_path / "out")]) == 2
    assert "accelkit[tensorrt]" in _one_line_error(capsys.readouterr())
    assert not (tmp_path / "out").exists()


def test_export_help_mentions_the_tensorrt_target(capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--target tensorrt" in out and "timing cache" in out
