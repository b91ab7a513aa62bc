"""Tests of the ``sparse`` pass (accelkit/passes/sparse.py) and the ``accelkit::predict_block_mask`` op."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from accelkit.calibrate import Calibrator
from accelkit.capture.cost import graph_costs
from accelkit.capture.graph import capture
from accelkit.errors import InputError
from accelkit.kernels.block_sparse_attention import predict_block_mask
from accelkit.kernels.block_sparse_attention.mask_op import (
    predict_block_mask_op,
    predict_block_mask_with_dense_tokens,
)
from accelkit.loading import record_denoiser_calls
from accelkit.passes.base import Program, run_passes
from accelkit.passes.sparse import (
    KEPT_FRACTION_META,
    TAU_GRID,
    SparseConfig,
    attention_sites,
    choose_taus,
    profile_sites,
    sparse,
)
from accelkit.runtime.executor import ProgramExecutor
from accelkit.runtime.pipeline import AcceleratedPipeline
from tests.fixtures.tiny_models import pipeline_call_kwargs, tiny_denoiser, tiny_pipeline

FAMILIES = ("flux", "sd3", "dit")
SMALL = dict(block_q=16, block_k=16, min_tokens=0)


@functools.cache
def _captured(family: str):
    # resolution 16: 64 image tokens (+8 text tokens for flux/sd3), 4-5 blocks of 16.
    model, kwargs = tiny_denoiser(family, resolution=16)
    return model, kwargs, Program.from_graph(capture(model, kwargs), 4)


def _out(module, program: Program, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        return module(*program.graph.flat_inputs(kwargs))[0]


def _sparse_sites(program: Program, config: SparseConfig) -> list:
    from accelkit.passes.sparse import _text_tokens

    sites = attention_sites(program.variants["full"].module, config, _text_tokens(program))
    return [s for s in sites if s.dense_reason is None]


def _snapshot(program: Program):
    return (program.schedule, dict(program.variants), program.variants["full"].module.code,
            len(program.variants["full"].module.graph.nodes), program.applied, dict(program.stats))


def _op_count(module, name: str) -> int:
    return sum(1 for n in module.graph.nodes if getattr(getattr(n.target, "_schema", None), "name", "") == name)


# ---------------------------------------------------------------- config


def test_config_json_round_trip_and_validation():
    for config in (
        SparseConfig(),
        SparseConfig(l1_budget=0.06, block_q=64, block_k=128, dense_steps=2, similarity_threshold=0.3),
        SparseConfig(taus=(0.9, 1.0), kept_fractions=(0.5, 1.0), text_tokens_dense=False, min_tokens=0),
    ):
        again = SparseConfig.from_dict(json.loads(config.to_json()))
        assert again == config
    assert SparseConfig().is_noop() and not SparseConfig(l1_budget=0.05).is_noop()
    assert SparseConfig(taus=()).is_noop() and not SparseConfig(taus=(0.9,)).is_noop()
    assert set(SparseConfig.SEARCH_SPACE) == {"l1_budget", "block_q", "block_k", "dense_steps"}
    for bad in ({"l1_budget": -0.1}, {"block_q": 0}, {"dense_steps": -1}, {"taus": (1.5,)},
                {"kept_fractions": (0.5,)}):
        with pytest.raises(InputError):
            SparseConfig(**bad)
    with pytest.raises(InputError, match="mask_reuse"):
        SparseConfig(l1_budget=0.05, mask_reuse=2)


# ---------------------------------------------------------------- the op


def test_mask_op_matches_reference_and_keeps_text_dense():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 80, 16, generator=g), torch.randn(2, 2, 80, 16, generator=g)
    counts, indices = predict_block_mask_op(q, k, block_q=16, block_k=16, tau=0.5)
    ref_counts, ref_indices = predict_block_mask(q, k, block_q=16, block_k=16, tau=0.5)
    assert torch.equal(counts, ref_counts) and torch.equal(indices, ref_indices)
    from accelkit.kernels.block_sparse_attention import dense_mask_from_indices

    for prefix, suffix in ((8, 0), (0, 20)):
        counts, indices = predict_block_mask_op(q, k, block_q=16, block_k=16, tau=0.3,
                                                dense_prefix=prefix, dense_suffix=suffix)
        mask = dense_mask_from_indices(counts, indices, 5)
        text_blocks = [0] if prefix else [3, 4]
        assert mask[:, :, text_blocks, :].all() and mask[:, :, :, text_blocks].all()
        assert not mask.all()
        eager = predict_block_mask_with_dense_tokens(q, k, block_q=16, block_k=16, tau=0.3,
                                                     dense_prefix=prefix, dense_suffix=suffix)
        assert torch.equal(counts, eager[0]) and torch.equal(indices, eager[1])


# ---------------------------------------------------------------- the pass on tiny denoisers


def test_noop_returns_the_same_program():
    _, _, program = _captured("flux")
    result = sparse(program, SparseConfig(), None)
    assert result.program is program and not result.modified


@pytest.mark.parametrize("family", FAMILIES)
def test_tau_one_equals_dense_and_input_is_not_mutated(family):
    _, kwargs, program = _captured(family)
    before = _snapshot(program)
    count = len(_sparse_sites(program, SparseConfig(**SMALL)))
    assert count >= 2
    # Keeping at least every block makes the sparse path compute dense attention.
    result = sparse(program, SparseConfig(taus=(0.5,) * count, min_blocks=10_000, **SMALL), None)
    assert result.modified and _snapshot(program) == before
    module = result.program.variants["full"].module
    assert _op_count(module, "aten::scaled_dot_product_attention") == 0
    assert _op_count(module, "accelkit::block_sparse_attention") == count
    assert _op_count(module, "accelkit::predict_block_mask") == count
    torch.testing.assert_close(_out(module, program, kwargs), _out(program.graph.module, program, kwargs),
                               atol=1e-5, rtol=0)
    # A lower τ really drops blocks: the output moves, but stays finite.
    low = sparse(program, SparseConfig(taus=(0.3,) * count, **SMALL), None).program.variants["full"].module
    out = _out(low, program, kwargs)
    assert torch.isfinite(out).all() and not torch.allclose(out, _out(module, program, kwargs), atol=1e-5)
    # Block metadata survives the surgery, and the cost model sees the attention nodes.
    node = next(n for n in module.graph.nodes if n.target is torch.ops.accelkit.block_sparse_attention.default)
    assert node.meta.get("nn_module_stack") and isinstance(node.meta.get("val"), torch.Tensor)
    assert graph_costs(module)[node.name].kind == "attention"


def test_sites_calibrated_to_tau_one_keep_dense_attention():
    _, kwargs, program = _captured("flux")
    count = len(_sparse_sites(program, SparseConfig(**SMALL)))
    taus = (1.0,) + (0.5,) * (count - 1)
    result = sparse(program, SparseConfig(taus=taus, **SMALL), None)
    module = result.program.variants["full"].module
    assert _op_count(module, "aten::scaled_dot_product_attention") == 1
    assert _op_count(module, "accelkit::block_sparse_attention") == count - 1
    assert len(result.stats["sparse_sites"]) == count - 1
    assert sum("tau = 1" in reason for reason in result.stats["dense_sites"].values()) == 1
    # The resolved config still lists every eligible site, so the plan replays to the same graph.
    assert result.resolved_config.taus == taus
    replayed = sparse(program, result.resolved_config, None).program.variants["full"].module
    torch.testing.assert_close(_out(replayed, program, kwargs), _out(module, program, kwargs))
    everything_dense = sparse(program, SparseConfig(taus=(1.0,) * count, **SMALL), None)
    assert not everything_dense.modified and everything_dense.program is program


def test_text_tokens_are_found_on_the_right_side():
    config = SparseConfig(**SMALL)
    flux = _sparse_sites(_captured("flux")[2], config)
    sd3 = _sparse_sites(_captured("sd3")[2], config)
    dit = _sparse_sites(_captured("dit")[2], config)
    assert {(s.dense_prefix, s.dense_suffix) for s in flux} == {(8, 0)}  # Flux: text first
    assert {(s.dense_prefix, s.dense_suffix) for s in sd3} == {(0, 8)}  # SD3: text last
    assert {(s.dense_prefix, s.dense_suffix) for s in dit} == {(0, 0)}
    off = SparseConfig(text_tokens_dense=False, **SMALL)
    assert {(s.dense_prefix, s.dense_suffix) for s in _sparse_sites(_captured("flux")[2], off)} == {(0, 0)}


def test_masked_cross_attention_stays_dense():
    model, kwargs = tiny_denoiser("pixart", resolution=16)
    program = Program.from_graph(capture(model, kwargs), 2)
    result = sparse(program, SparseConfig(taus=(0.9, 0.9), **SMALL), None)
    assert sorted(result.stats["dense_sites"].values()) == ["has an attn_mask"] * 2
    assert len(result.stats["sparse_sites"]) == 2


def test_min_tokens_above_the_token_count_leaves_the_graph_unchanged():
    _, _, program = _captured("dit")
    result = sparse(program, SparseConfig(l1_budget=0.05, block_q=16, block_k=16, min_tokens=65), None)
    assert not result.modified and result.program is program
    assert all("min_tokens" in reason for reason in result.stats["dense_sites"].values())


def test_wrong_tau_count_and_missing_calibration_are_input_errors():
    _, _, program = _captured("dit")
    with pytest.raises(InputError, match="taus"):
        sparse(program, SparseConfig(taus=(0.9,), **SMALL), None)
    with pytest.raises(InputError, match="Calibrator"):
        sparse(program, SparseConfig(l1_budget=0.05, **SMALL), None)


def test_dense_steps_schedule_runs_in_the_executor():
    _, kwargs, program = _captured("dit")
    count = len(_sparse_sites(program, SparseConfig(**SMALL)))
    final, _ = run_passes(program, [SparseConfig(taus=(0.3,) * count, dense_steps=2, **SMALL)])
    assert final.schedule == ("full_dense", "full_dense", "full", "full")
    assert final.variants["full_dense"].module is program.variants["full"].module
    executor = ProgramExecutor(final)
    outputs = [executor.run(step, 0, kwargs, return_dict=False)[0] for step in range(4)]
    assert dict(executor.variant_calls) == {"full_dense": 2, "full": 2}
    dense = _out(program.graph.module, program, kwargs)
    torch.testing.assert_close(outputs[0], dense)
    assert not torch.allclose(outputs[3], dense, atol=1e-5)


def test_ops_capture_under_torch_export():
    _, kwargs, program = _captured("flux")
    count = len(_sparse_sites(program, SparseConfig(**SMALL)))
    module = sparse(program, SparseConfig(taus=(0.5,) * count, **SMALL), None).program.variants["full"].module
    args = tuple(program.graph.flat_inputs(kwargs))
    exported = torch.export.export(module, args, strict=False)
    targets = {n.target for n in exported.graph.nodes if n.op == "call_function"}
    assert torch.ops.accelkit.predict_block_mask.default in targets
    assert torch.ops.accelkit.block_sparse_attention.default in targets
    torch.testing.assert_close(exported.module()(*args)[0], _out(module, program, kwargs))


def test_profile_and_tau_choice_on_recorded_inputs():
    _, kwargs, program = _captured("sd3")
    config = SparseConfig(l1_budget=0.2, **SMALL)
    sites = _sparse_sites(program, config)
    calls = [program.graph.flat_inputs(kwargs)]
    profile = profile_sites(program.variants["full"].module, sites, calls, config)
    assert profile.shape == (len(sites), len(TAU_GRID), 2)
    assert np.allclose(profile[:, -1, 0], 0.0, atol=1e-5) and np.allclose(profile[:, -1, 1], 1.0)
    chosen = choose_taus(profile, 0.2)  # random weights: near-uniform attention
    assert all(profile[s, i:, 0].max() <= 0.2 for s, i in enumerate(chosen))
    assert any(profile[s, i, 1] < 1.0 for s, i in enumerate(chosen))


# ---------------------------------------------------------------- calibrated on a real pipeline


@pytest.fixture(scope="module")
def flux_calibrated():
    pipe = tiny_pipeline("flux")
    # 128x128 pixels: 64 image tokens + 16 text tokens, five blocks of 16.
    short = {"max_sequence_length": 16}
    call = dict(pipeline_call_kwargs("flux"), height=128, width=128)
    calls = record_denoiser_calls(pipe, **call, **short)
    program = Program.from_graph(capture(pipe.transformer, calls[0]), 4)
    return pipe, program, Calibrator(pipe, ["a red circle"], 128, 128, 3.5, extra_call_kwargs=short,
                                     run_program=AcceleratedPipeline)


def test_calibrated_budget_holds_and_resolved_config_replays(flux_calibrated):
    pipe, program, calib = flux_calibrated
    before = _snapshot(program)
    budget = 0.05
    # Three recorded calls (first, middle, last step) keep the test fast.
    final, results = run_passes(program, [SparseConfig(l1_budget=budget, calibration_calls=3, **SMALL)], calib)
    stats = results["sparse"].stats
    assert _snapshot(program) == before
    assert len(stats["sparse_sites"]) == 5
    assert {tuple(v) for v in stats["text_tokens"].values()} == {(16, 0)}  # 16 text tokens, first
    assert all(error <= budget for error in stats["l1_error"].values())
    assert min(stats["kept_fraction"].values()) < 1.0
    module = final.variants["full"].module
    kept = [n.meta[KEPT_FRACTION_META] for n in module.graph.nodes if KEPT_FRACTION_META in n.meta]
    assert kept == list(stats["kept_fraction"].values())
    # Independent check of the error at the chosen τ on freshly recorded calibration inputs.
    from accelkit.passes.sparse import TAU_GRID as grid

    config = SparseConfig(l1_budget=budget, calibration_calls=3, **SMALL)
    sites = _sparse_sites(program, config)
    calls = calib.denoiser_inputs(program, config.calibration_calls)
    profile = profile_sites(program.variants["full"].module, sites, calls, config,
                            grid=[stats["taus"][s.name] for s in sites])
    for index, site in enumerate(sites):
        assert profile[index, index, 0] <= budget + 1e-9
        assert profile[index, index, 0] == pytest.approx(stats["l1_error"][site.name], rel=1e-6)
    assert grid[-1] == 1.0
    # The resolved config replays without calibration to the same graph output.
    resolved = SparseConfig.from_dict(final.resolved["sparse"])
    again = sparse(program, resolved, None).program
    inputs = calls[len(calls) // 2]
    with torch.no_grad():
        torch.testing.assert_close(again.variants["full"].module(*inputs)[0], module(*inputs)[0], rtol=0, atol=0)
    assert [n.meta.get(KEPT_FRACTION_META) for n in again.variants["full"].module.graph.nodes
            if KEPT_FRACTION_META in n.meta] == kept
    # The sparse program drives the pipeline; the profile is cached (a second budget records nothing).
    images = calib.generate(final).images
    assert torch.isfinite(images).all() and images.shape == (1, 3, 128, 128)
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *a, **k: seen.append(1), with_kwargs=True)
    try:
        other = sparse(program, SparseConfig(l1_budget=0.1, calibration_calls=3, **SMALL), calib)
    finally:
        handle.remove()
    assert seen == [] and other.stats["mean_kept_fraction"] <= stats["mean_kept_fraction"]
