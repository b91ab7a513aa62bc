"""Tests of the distillation recovery of pruned plans (accelkit/calibrate/distill.py)."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from accelkit.calibrate.distill import (
    DistillConfig,
    distill,
    matched_points,
    normalized_feature_loss,
    trainable_copy,
)
from accelkit.capture.graph import capture
from accelkit.capture.streams import removal_candidates
from accelkit.errors import InputError
from accelkit.passes.base import Program, run_passes
from accelkit.passes.prune import PruneConfig, recovered_weight_key, replace_weights
from tests.fixtures.tiny_models import tiny_denoiser

REMOVED = ("single_transformer_blocks.1",)
BLOCK_GAIN = 30.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The models are tiny: on a CPU shared with other jobs, OpenMP threads spin-wait for 10x the work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _setup():
    """Tiny Flux denoiser, its capture, the pruned program and a few recorded-like calls."""
    model, kwargs = tiny_denoiser("flux")
    # Randomly initialized blocks barely change the streams; make the removed one matter, as trained ones do.
    with torch.no_grad():
        model.get_submodule(REMOVED[0]).proj_out.weight.mul_(BLOCK_GAIN)
    graph = capture(model, kwargs)
    base = Program.from_graph(graph, 4)
    pruned, _ = run_passes(base, [PruneConfig(removed_blocks=REMOVED)])
    generator = torch.Generator().manual_seed(0)
    calls = []
    for timestep in (0.9, 0.6, 0.3, 0.1):
        call = dict(kwargs)
        call["hidden_states"] = torch.randn(kwargs["hidden_states"].shape, generator=generator)
        call["timestep"] = torch.full_like(kwargs["timestep"], timestep)
        calls.append([t.clone() for t in graph.flat_inputs(call)])
    return model, graph, base, pruned, calls


def _outputs(module, calls, count):
    with torch.no_grad():
        return [list(module(*inputs))[:count] for inputs in calls]


def _output_mse(a, b):
    return float(sum(((x - y) ** 2).mean() for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True)))


# ---------------------------------------------------------------- config and loss


def test_config_json_round_trip_and_validation():
    config = DistillConfig(iterations=7, lr=3e-4, batch_size=3, feature_weight=0.5, seed=2)
    assert DistillConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad in ({"iterations": 0}, {"batch_size": -1}, {"lr": 0.0}, {"lr": float("nan")}, {"iterations": 1.5},
                {"feature_weight": -1.0}, {"output_weight": 0.0, "feature_weight": 0.0}):
        with pytest.raises(InputError):
            DistillConfig(**bad)
    with pytest.raises(InputError, match="unknown field"):
        DistillConfig.from_dict({"iterations": 3, "learning_rate": 1.0})


def test_normalized_feature_loss_divides_by_the_teacher_norm_per_sample():
    teacher = torch.tensor([[100.0, 0.0], [0.0, 0.01]])
    # 10% relative error on both samples: each contributes 0.01 although their norms differ 10^4-fold.
    student = teacher * 1.1
    assert normalized_feature_loss(student, teacher).item() == pytest.approx(0.01, rel=1e-5)
    assert normalized_feature_loss(teacher, teacher).item() == 0.0
    assert normalized_feature_loss(5 * student, 5 * teacher).item() == pytest.approx(0.01, rel=1e-5)


# ---------------------------------------------------------------- matched points


def test_matched_points_follow_the_removal_pairing():
    _, graph, _, pruned, _ = _setup()
    student = pruned.variants["full"].module
    points = matched_points(graph.module, student, REMOVED)
    pairing = {p.name: p for p in removal_candidates(graph.module)}[REMOVED[0]]
    # The block before the removed one stands where the removed block's outputs stood in the teacher.
    before = {p.student: p.teacher for p in points if p.block == "single_transformer_blocks.0"}
    assert before == {source: output for output, source in pairing.pairs}
    others = [p for p in points if p.block != "single_transformer_blocks.0"]
    assert others and all(p.student == p.teacher for p in others)
    assert {p.block for p in points} == {"transformer_blocks.0", "transformer_blocks.1",
                                         "single_transformer_blocks.0", "single_transformer_blocks.2"}


def test_matched_points_refuse_a_student_that_still_has_the_block():
    _, graph, _, _, _ = _setup()
    with pytest.raises(ValueError, match="still in the student"):
        matched_points(graph.module, graph.module, REMOVED)


# ---------------------------------------------------------------- training


@functools.cache
def _trained():
    model, graph, base, pruned, calls = _setup()
    config = DistillConfig(iterations=25, lr=5e-3, batch_size=2, seed=0)
    steps = []
    result = distill(graph.module, pruned.variants["full"].module, REMOVED, calls, graph.num_user_outputs,
                     config, progress=lambda step, total, losses: steps.append((step, total)))
    return result, steps


def test_distill_reduces_feature_and_output_losses():
    result, steps = _trained()
    assert steps[-1] == (25, 25) and len(steps) == 25
    assert result.losses_after["feature"] < 0.7 * result.losses_before["feature"]
    assert result.losses_after["output"] < 0.7 * result.losses_before["output"]
    assert len(result.history) == 25 and result.seconds > 0


def test_distill_mutates_neither_teacher_nor_pruned_program():
    model, graph, base, pruned, calls = _setup()
    teacher_before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned_before = _outputs(pruned.variants["full"].module, calls[:1], graph.num_user_outputs)
    distill(graph.module, pruned.variants["full"].module, REMOVED, calls, graph.num_user_outputs,
            DistillConfig(iterations=3, lr=1e-2, batch_size=1))
    assert all(torch.equal(teacher_before[k], v) for k, v in model.state_dict().items())
    assert _output_mse(pruned_before, _outputs(pruned.variants["full"].module, calls[:1],
                                               graph.num_user_outputs)) == 0.0


def test_prune_pass_replays_the_recovered_weights_exactly():
    _, graph, base, pruned, calls = _setup()
    result, _ = _trained()
    weights = {recovered_weight_key(t): w.detach() for t, w in result.weights.items()}
    replayed, results = run_passes(base.replace(new_weights=weights), [PruneConfig(removed_blocks=REMOVED)])
    assert results["prune"].stats["recovered_weights"] == len(weights)
    trained = replace_weights(pruned.variants["full"].module, {t: w.detach() for t, w in result.weights.items()})
    count = graph.num_user_outputs
    teacher = _outputs(graph.module, calls, count)
    got = _outputs(replayed.variants["full"].module, calls, count)
    assert _output_mse(got, _outputs(trained, calls, count)) == 0.0
    # And the replayed student is closer to the teacher than the unrecovered pruned model.
    assert _output_mse(got, teacher) < _output_mse(_outputs(pruned.variants["full"].module, calls, count), teacher)
    # Weights of the removed block are not part of the student.
    assert not any(t.startswith(REMOVED[0] + ".") for t in result.weights)


def test_replace_weights_refuses_foreign_or_misshapen_tensors():
    _, _, _, pruned, _ = _setup()
    module = pruned.variants["full"].module
    _, parameters = trainable_copy(module)
    name = next(iter(parameters))
    with pytest.raises(InputError, match="does not read"):
        replace_weights(module, {REMOVED[0] + ".attn.to_q.weight": torch.zeros(1)})
    with pytest.raises(InputError, match="rerun `accelkit distill`"):
        replace_weights(module, {name: torch.zeros(parameters[name].numel() + 1)})


def test_report_shows_a_recovery_line():
    from accelkit.report.render import _budget_html
    from accelkit.report.schema import BudgetReport, FidelityMetrics

    recovery = {"config": {"iterations": 200, "lr": 2e-5}, "seconds": 12.5, "device": "cpu", "eval_prompts": 4,
                "psnr_before": 18.25, "psnr_after": 21.5}
    budget = BudgetReport(budget="2x", target_speedup=2.0, met=True, speedup=2.0,
                          fidelity=FidelityMetrics(psnr=18.25, ssim=0.5), weights_bytes=1,
                          extra={"recovery": recovery})
    page = _budget_html(0, budget, [])
    assert "Recovery (distillation)" in page and "21.5 dB" in page and "18.25" in page
    assert budget.to_json()["recovery"] == recovery
    assert "Recovery" not in _budget_html(0, BudgetReport(budget="2x", target_speedup=2.0, met=True, speedup=2.0,
                                                          fidelity=FidelityMetrics(psnr=1.0, ssim=0.5),
                                                          weights_bytes=1), [])
