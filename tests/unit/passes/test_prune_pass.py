"""Tests of the ``prune`` pass (accelkit/passes/prune.py) on tiny denoisers of every family."""

from __future__ import annotations

import functools
import itertools
import json
import time

import numpy as np
import pytest
import torch

from accelkit.calibrate import Calibrator
from accelkit.capture.blocks import find_blocks
from accelkit.capture.cost import graph_costs
from accelkit.capture.graph import capture
from accelkit.errors import InputError
from accelkit.loading import record_denoiser_calls
from accelkit.passes.base import GraphVariant, Program, run_passes
from accelkit.passes.prune import (
    PruneConfig,
    block_flops,
    measure_additivity,
    prune,
    removal_candidates,
    select_min_loss,
)
from accelkit.runtime.pipeline import AcceleratedPipeline
from tests.fixtures.tiny_models import EXPECTED_BLOCKS, pipeline_call_kwargs, tiny_denoiser, tiny_pipeline

TRANSFORMERS = ("flux", "sd3", "pixart", "dit")


@functools.cache
def _captured(family: str, text_len: int = 8):
    model, kwargs = tiny_denoiser(family, text_len=text_len)
    graph = capture(model, kwargs)
    return model, kwargs, Program.from_graph(graph, 4)


def _run(program: Program, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        return program.variants["full"].module(*program.graph.flat_inputs(kwargs))[0]


def _eager(model, kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs)[0]


def _names_in_stacks(module) -> set[str]:
    names = set()
    for node in module.graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            names.add(str(path))
    return names


def _snapshot(program: Program):
    return (program.schedule, dict(program.variants), program.variants["full"].module.code,
            len(program.variants["full"].module.graph.nodes), program.applied, dict(program.stats))


# ---------------------------------------------------------------- config


def test_config_json_round_trip():
    for config in (
        PruneConfig(),
        PruneConfig(fraction=0.3, score="random", random_seed=7, protect_first=2, protect_last=0),
        PruneConfig(removed_blocks=("transformer_blocks.1", "single_transformer_blocks.0")),
        PruneConfig(removed_blocks=()),
    ):
        again = PruneConfig.from_dict(json.loads(config.to_json()))
        assert again == config
        assert again.removed_blocks is None or isinstance(again.removed_blocks, tuple)


def test_noop_and_search_space():
    assert PruneConfig().is_noop()
    assert PruneConfig(removed_blocks=()).is_noop()
    assert not PruneConfig(fraction=0.1).is_noop()
    assert not PruneConfig(removed_blocks=("transformer_blocks.0",)).is_noop()
    assert set(PruneConfig.SEARCH_SPACE) == {"fraction", "score"}


@pytest.mark.parametrize(
    "fields",
    [{"fraction": -0.1}, {"fraction": 1.0}, {"fraction": True}, {"score": "l1"}, {"protect_first": -1},
     {"protect_last": 1.5}, {"removed_blocks": "transformer_blocks.0"},
     {"removed_blocks": ("transformer_blocks.0", "transformer_blocks.0")}],
)
def test_invalid_configs_raise_input_error(fields):
    with pytest.raises(InputError, match="prune."):
        PruneConfig(**fields)


# ---------------------------------------------------------------- selection


def _brute_force(scores, flops, target):
    best = None
    for size in range(len(scores) + 1):
        for subset in itertools.combinations(range(len(scores)), size):
            if sum(flops[i] for i in subset) >= target:
                value = sum(scores[i] for i in subset)
                if best is None or value < best:
                    best = value
    return best


def test_knapsack_equals_brute_force_on_random_instances():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 9))
        flops = [float(f) for f in rng.integers(1, 30, size=n)]
        scores = list(rng.random(n) * rng.choice([1.0, 1e-3]))
        target = float(rng.uniform(0, sum(flops)))
        chosen = select_min_loss(scores, flops, target)
        assert sum(flops[i] for i in chosen) >= target
        assert np.isclose(sum(scores[i] for i in chosen), _brute_force(scores, flops, target), rtol=1e-12, atol=0)


def test_knapsack_with_real_flops_meets_the_target():
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(2, 12))
        flops = list(rng.uniform(1e9, 5e9, size=n))
        scores = list(rng.random(n))
        target = 0.4 * sum(flops)
        chosen = select_min_loss(scores, flops, target)
        assert sum(flops[i] for i in chosen) >= target
        # Discretization may cost a little optimality, never feasibility; it is near the true optimum.
        assert sum(scores[i] for i in chosen) <= _brute_force(scores, flops, target) + max(scores) + 1e-12
    # Three of the zoo model's candidate blocks hold 0.5000009 of its block FLOPs: fraction 0.5 is three blocks.
    zoo = [602768640.0, 600603648.0, 600603648.0, 600603648.0]
    target = 0.5 * (sum(zoo) + 602768640.0 + 600597504.0)
    assert len(select_min_loss([0.1, 0.2, 0.3, 0.4], zoo, target)) == 3
    assert select_min_loss([1.0, 2.0], [1.0, 1.0], 0.0) == ()
    with pytest.raises(InputError, match="prune.fraction"):
        select_min_loss([1.0], [1.0], 2.0)


# ---------------------------------------------------------------- graph surgery


@pytest.mark.parametrize("family", TRANSFORMERS)
def test_zero_blocks_is_bit_identical_and_unmodified(family):
    model, kwargs, program = _captured(family)
    for config in (PruneConfig(), PruneConfig(removed_blocks=())):
        result = prune(program, config, None)
        assert not result.modified and result.program is program
        assert result.stats["removed_blocks"] == []
    torch.testing.assert_close(_run(result.program, kwargs), _eager(model, kwargs), rtol=0, atol=0)


@pytest.mark.parametrize("family", TRANSFORMERS)
def test_every_block_of_transformer_families_is_removable(family):
    _, kwargs, program = _captured(family)
    pairings = removal_candidates(program.variants["full"].module)
    assert [p.name for p in pairings] == [f"{g}.{i}" for g, c in EXPECTED_BLOCKS[family].items() for i in range(c)]
    assert all(p.removable for p in pairings), [p.reason for p in pairings]
    everything = prune(program, PruneConfig(removed_blocks=tuple(p.name for p in pairings)), None)
    assert everything.modified
    module = everything.program.variants["full"].module
    assert not any(name in _names_in_stacks(module) for name in everything.stats["removed_blocks"])
    assert torch.isfinite(_run(everything.program, kwargs)).all()


def _identity_forward(block):
    """An identity block with the block's own return convention (checked against its eager forward)."""
    kind = type(block).__name__
    if kind in ("FluxTransformerBlock", "FluxSingleTransformerBlock", "JointTransformerBlock"):
        # Both return (encoder_hidden_states, hidden_states); SD3's context_pre_only block returns None first.
        pre_only = getattr(block, "context_pre_only", False)
        return lambda hidden_states, encoder_hidden_states, **kw: (
            None if pre_only else encoder_hidden_states, hidden_states)
    return lambda hidden_states, *args, **kw: hidden_states


def _eager_without(model, kwargs, names):
    modules = dict(model.named_modules())
    try:
        for name in names:
            modules[name].forward = _identity_forward(modules[name])
        return _eager(model, kwargs)
    finally:
        for name in names:
            modules[name].__dict__.pop("forward", None)


@pytest.mark.parametrize(
    ("family", "text_len", "removed"),
    [
        ("flux", 8, ("transformer_blocks.1",)),
        ("flux", 8, ("single_transformer_blocks.1",)),
        ("flux", 8, ("transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0")),
        ("flux", 8, ("single_transformer_blocks.2",)),
        # 16 text tokens = 16 image tokens: both streams have one shape, pairing must follow the residuals.
        ("flux", 16, ("transformer_blocks.0",)),
        ("flux", 16, ("single_transformer_blocks.1",)),
        ("flux", 16, ("transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.2")),
        ("sd3", 8, ("transformer_blocks.0",)),
        ("sd3", 8, ("transformer_blocks.1",)),
        ("pixart", 8, ("transformer_blocks.1",)),
        ("dit", 8, ("transformer_blocks.0",)),
    ],
)
def test_pruned_graph_equals_model_with_identity_blocks(family, text_len, removed):
    model, kwargs, program = _captured(family, text_len)
    before = _snapshot(program)
    result = prune(program, PruneConfig(removed_blocks=removed), None)
    assert result.modified and result.stats["removed_blocks"] == list(removed)
    module = result.program.variants["full"].module
    assert not set(removed) & _names_in_stacks(module)
    assert not set(removed) & set(find_blocks(module).names())
    expected = _eager_without(model, kwargs, removed)
    full = _eager(model, kwargs)
    actual = _run(result.program, kwargs)
    assert not torch.allclose(expected, full)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # The caller's program is untouched and still computes the unpruned model.
    assert _snapshot(program) == before
    torch.testing.assert_close(_run(program, kwargs), full, rtol=0, atol=0)
    result.program.validate()


def test_removed_flops_fraction_is_exact():
    _, kwargs, program = _captured("flux")
    module = program.variants["full"].module
    flops = block_flops(module)
    total = sum(flops.values())
    removed = ("transformer_blocks.1", "single_transformer_blocks.1")
    result = prune(program, PruneConfig(removed_blocks=removed), None)
    after = sum(c.flops for c in graph_costs(result.program.variants["full"].module).values())
    before = sum(c.flops for c in graph_costs(module).values())
    assert result.stats["removed_flops_fraction"] == pytest.approx((before - after) / total, rel=1e-12)
    assert result.stats["removed_flops_fraction"] == pytest.approx(sum(flops[n] for n in removed) / total, rel=1e-3)
    assert result.stats["removed_graph_flops_fraction"] == pytest.approx((before - after) / before, rel=1e-12)


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5])
def test_last_criterion_removes_trailing_candidates_until_the_target(fraction):
    _, kwargs, program = _captured("flux")
    result = prune(program, PruneConfig(fraction=fraction, score="last"), None)
    names = [p.name for p in removal_candidates(program.variants["full"].module)]
    candidates = names[1:-1]  # protect_first = protect_last = 1
    assert result.stats["candidates"] == candidates and result.stats["protected"] == [names[0], names[-1]]
    removed = result.stats["removed_blocks"]
    assert removed == candidates[len(candidates) - len(removed):]
    assert result.stats["removed_flops_fraction"] >= fraction - 1e-3
    shares = block_flops(program.variants["full"].module)
    total = sum(shares.values())
    # Minimal: without the first (earliest) removed block the target would not be reached.
    assert sum(shares[n] for n in removed[1:]) < fraction * total
    assert result.resolved_config.removed_blocks == tuple(removed)


def test_random_criterion_is_seeded_and_too_large_fraction_is_refused():
    _, _, program = _captured("flux")
    a = prune(program, PruneConfig(fraction=0.3, score="random", random_seed=3), None)
    b = prune(program, PruneConfig(fraction=0.3, score="random", random_seed=3), None)
    assert a.stats["removed_blocks"] == b.stats["removed_blocks"]
    with pytest.raises(InputError, match="prune.fraction"):
        prune(program, PruneConfig(fraction=0.9, score="last"), None)
    with pytest.raises(InputError, match="Calibrator"):
        prune(program, PruneConfig(fraction=0.3), None)
    with pytest.raises(InputError, match="unknown block"):
        prune(program, PruneConfig(removed_blocks=("blocks.9",)), None)


def test_resolved_config_reproduces_the_graph_without_calibration():
    _, kwargs, program = _captured("sd3")
    result = prune(program, PruneConfig(fraction=0.3, score="last", protect_first=0), None)
    resolved = PruneConfig.from_dict(json.loads(result.resolved_config.to_json()))
    again = prune(program, resolved, None)
    assert again.program.variants["full"].module.code == result.program.variants["full"].module.code
    torch.testing.assert_close(_run(again.program, kwargs), _run(result.program, kwargs), rtol=0, atol=0)


def test_unet_reports_its_candidates():
    model, kwargs, program = _captured("unet")
    result = prune(program, PruneConfig(fraction=0.0), None)
    assert result.stats["candidates"] == ["mid_block"]
    assert set(result.stats["non_candidates"]) == {"down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1"}
    assert all("residual update" in reason for reason in result.stats["non_candidates"].values())
    with pytest.raises(InputError, match="cannot be removed"):
        prune(program, PruneConfig(removed_blocks=("up_blocks.0",)), None)
    pruned = prune(program, PruneConfig(removed_blocks=("mid_block",)), None)
    torch.testing.assert_close(_run(pruned.program, kwargs), _eager_without(model, kwargs, ["mid_block"]),
                               rtol=1e-5, atol=1e-5)


def test_requires_a_single_full_variant():
    _, _, program = _captured("pixart")
    cached = program.replace(variants={**program.variants, "cached": GraphVariant(program.graph.module)},
                             schedule=("full", "cached", "full", "full"))
    with pytest.raises(InputError, match="before passes that add graph variants"):
        prune(cached, PruneConfig(removed_blocks=("transformer_blocks.1",)), None)
    noop = prune(cached, PruneConfig(), None)
    assert noop.program is cached and not noop.modified


def test_pruned_graph_exports_to_onnx(tmp_path):
    """The pruned graph goes through the project's exporter (torch.onnx.export(dynamo=True) + onnxruntime check)."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from accelkit.export.onnx import export_program_onnx

    _, kwargs, program = _captured("pixart")
    pruned = prune(program, PruneConfig(removed_blocks=("transformer_blocks.1",)), None).program
    started = time.perf_counter()
    inputs = {name: kwargs[name] for name in program.graph.input_names}
    manifest = export_program_onnx(pruned, tmp_path / "onnx", inputs=inputs)
    assert time.perf_counter() - started < 60
    (model,) = manifest["models"]
    assert model["verification"]["max_relative_error"] <= 1e-4


# ---------------------------------------------------------------- calibrated scores on a real pipeline


@pytest.fixture(scope="module")
def flux_calibrated():
    pipe = tiny_pipeline("flux")
    # 16 text tokens instead of T5's 512 keep the denoiser calls cheap.
    short = {"max_sequence_length": 16}
    calls = record_denoiser_calls(pipe, **pipeline_call_kwargs("flux"), **short)
    program = Program.from_graph(capture(pipe.transformer, calls[0]), 4)
    return pipe, program, Calibrator(pipe, ["a red circle"], 64, 64, 3.5, extra_call_kwargs=short,
                                     run_program=AcceleratedPipeline)


def test_output_mse_scores_select_and_resolve(flux_calibrated):
    pipe, program, calib = flux_calibrated
    before = _snapshot(program)
    final, results = run_passes(program, [PruneConfig(fraction=0.15)], calib)
    result = results["prune"]
    stats = result.stats
    assert stats["candidates"] == ["transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]
    assert set(stats["scores"]) == set(stats["candidates"]) | set(stats["protected"])
    assert all(s > 0 for s in stats["scores"].values())
    # Every block holds about 20% of the block FLOPs: the candidate with the smallest loss goes.
    candidate_scores = {n: stats["scores"][n] for n in stats["candidates"]}
    assert stats["removed_blocks"] == [min(candidate_scores, key=candidate_scores.get)]
    assert stats["predicted_loss"] == pytest.approx(min(candidate_scores.values()))
    assert stats["removed_flops_fraction"] >= 0.15
    assert final.resolved["prune"]["removed_blocks"] == stats["removed_blocks"]
    assert _snapshot(program) == before
    # The pruned program drives the pipeline; the resolved config rebuilds it without calibration.
    images = calib.generate(final).images
    assert torch.isfinite(images).all() and images.shape == (1, 3, 64, 64)
    again = prune(program, PruneConfig.from_dict(final.resolved["prune"]), None)
    assert again.program.variants["full"].module.code == final.variants["full"].module.code
    # Scores are cached in the calibrator: a second selection records nothing.
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *a, **k: calls.append(1), with_kwargs=True)
    try:
        prune(program, PruneConfig(fraction=0.4), calib)
    finally:
        handle.remove()
    assert calls == []


def test_measure_additivity_single_blocks_match_their_scores(flux_calibrated):
    _, program, calib = flux_calibrated
    scores = prune(program, PruneConfig(fraction=0.15), calib).stats["scores"]
    sets = [["transformer_blocks.1"], ["single_transformer_blocks.0", "single_transformer_blocks.1"]]
    pairs = measure_additivity(program, calib, sets)
    assert len(pairs) == 2
    predicted, actual = pairs[0]
    assert predicted == pytest.approx(scores["transformer_blocks.1"]) and actual == pytest.approx(predicted)
    predicted, actual = pairs[1]
    assert predicted == pytest.approx(scores["single_transformer_blocks.0"] + scores["single_transformer_blocks.1"])
    assert actual > 0
