"""`accelkit distill` end to end on a tiny Flux pipeline folder: plan, weights, report, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from accelkit.capture import capture
from accelkit.cli.main import main
from accelkit.loading import load_pipeline, record_denoiser_calls, weights_fingerprint
from accelkit.passes.base import Program, run_passes
from accelkit.passes.prune import PruneConfig, replace_weights
from accelkit.runtime.plan import load, write_plan
from tests.fixtures.tiny_models import PIPELINE_CALL_KWARGS, saved_pipeline_folder

REMOVED = ("single_transformer_blocks.1",)
GENERATION = {"height": PIPELINE_CALL_KWARGS["flux"]["height"], "width": PIPELINE_CALL_KWARGS["flux"]["width"],
              "guidance_scale": PIPELINE_CALL_KWARGS["flux"]["guidance_scale"]}
STEPS = 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models on a shared CPU: OpenMP threads would spin-wait for far longer than the work takes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _plan(out, folder, removed):
    loaded = load_pipeline(str(folder))
    calls = record_denoiser_calls(loaded.pipe, prompt="a photo", num_inference_steps=2, output_type="latent",
                                  generator=torch.Generator("cpu").manual_seed(0), **GENERATION)
    graph = capture(loaded.denoiser, calls[0])
    program, _ = run_passes(Program.from_graph(graph, STEPS), [PruneConfig(removed_blocks=removed)])
    write_plan(out / "plans" / "2x", budget="2x", program=program,
               model={"id": str(folder), "family": graph.family, "weights_hash": weights_fingerprint(loaded.denoiser)},
               pipe=loaded.pipe, generation={**GENERATION, "probe_prompt": "a photo"}, baseline_steps=STEPS,
               cost={}, fidelity={})
    return loaded, graph, calls[0]


def _report(out):
    from accelkit.report.render import write_report
    from accelkit.report.schema import (
        BaselineCost,
        BudgetReport,
        FidelityMetrics,
        ModelInfo,
        ReportData,
        Settings,
    )

    budget = BudgetReport(budget="2x", target_speedup=2.0, met=True, speedup=1.2,
                          fidelity=FidelityMetrics(psnr=20.0, ssim=0.5), weights_bytes=1, eval_prompts=("a cat",))
    write_report(out, ReportData(model=ModelInfo(id="tiny", family="flux", params=1),
                                 settings=Settings(steps=STEPS, num_prompts=1, seed=0, device="cpu", cost_kind="flops"),
                                 baseline=BaselineCost(cost=1.0, latency_ms=None, flops=1.0, weights_bytes=1),
                                 budgets=(budget,), floor_met=True))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return saved_pipeline_folder("flux", tmp_path_factory.mktemp("pipe"))


def test_distill_writes_weights_plan_and_report_that_reload(tmp_path, folder, capsys):
    out = tmp_path / "out"
    loaded, graph, call = _plan(out, folder, REMOVED)
    _report(out)
    capsys.readouterr()
    rc = main(["distill", str(out), "--iterations", "3", "--lr", "1e-3", "--batch-size", "1",
               "--num-prompts", "1", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    recovery = json.loads(captured.out)
    plan = json.loads((out / "plans" / "2x" / "plan.json").read_text())
    assert plan["recovery"] == recovery and plan["weights_file"] == "weights.safetensors"
    assert recovery["config"]["iterations"] == 3 and recovery["removed_blocks"] == list(REMOVED)
    assert recovery["eval_prompts"] == 1  # the report's prompts
    for key in ("psnr_before", "psnr_after", "losses_before", "losses_after", "seconds"):
        assert key in recovery
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["budgets"][0]["recovery"] == recovery
    assert "Recovery (distillation)" in (out / "report" / "index.html").read_text()

    saved = load_file(str(out / "plans" / "2x" / "weights.safetensors"))
    assert saved and all(k.startswith("prune.") for k in saved)
    assert not any(k.startswith("prune." + REMOVED[0] + ".") for k in saved)
    # The loaded plan computes with the student's weights, not the original ones.
    accelerated = load(out, loaded.pipe, "2x")
    inputs = graph.flat_inputs(call)
    pruned, _ = run_passes(Program.from_graph(graph, STEPS), [PruneConfig(removed_blocks=REMOVED)])
    student = replace_weights(pruned.variants["full"].module, {k.removeprefix("prune."): v for k, v in saved.items()})
    with torch.no_grad():
        got = accelerated.program.variants["full"].module(*inputs)[0]
        assert torch.equal(got, student(*inputs)[0])
        assert not torch.equal(got, pruned.variants["full"].module(*inputs)[0])
    accelerated.restore()


def test_distill_refuses_a_plan_that_removed_no_blocks(tmp_path, folder, capsys):
    out = tmp_path / "out"
    _plan(out, folder, ())
    capsys.readouterr()
    assert main(["distill", str(out), "--iterations", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "plan 2x removed no blocks" in err and "--passes" in err and "prune" in err
    assert not (out / "plans" / "2x" / "weights.safetensors").exists()


def test_distill_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["distill", str(tmp_path)]) == 2  # no plans/ folder
    assert "optimize" in capsys.readouterr().err
    assert main(["distill", str(tmp_path), "--iterations", "0"]) == 2
    assert "iterations" in capsys.readouterr().err


def test_distill_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "accelkit distill out/" in out and "exit codes" in out
