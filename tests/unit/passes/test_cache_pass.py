"""Tests of the cache pass (accelkit/passes/cache.py) on the five tiny denoiser families."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from accelkit.calibrate import Calibrator
from accelkit.capture import capture
from accelkit.capture.cost import graph_costs
from accelkit.errors import InputError
from accelkit.loading import record_denoiser_calls
from accelkit.passes.base import Program, run_passes
from accelkit.passes.cache import CacheConfig, cache, locate_span, taylor_coefficients
from accelkit.runtime.executor import ProgramExecutor
from accelkit.runtime.pipeline import AcceleratedPipeline, find_denoiser
from tests.fixtures.tiny_models import FAMILIES, pipeline_call_kwargs, tiny_denoiser, tiny_pipeline

STEPS = 4


@pytest.fixture(scope="module")
def captured():
    result = {}
    for family in FAMILIES:
        model, kwargs = tiny_denoiser(family)
        with torch.no_grad():
            expected = model(**kwargs)[0]
        result[family] = (capture(model, kwargs), kwargs, expected)
    return result


def _span_settings(family: str) -> list[tuple[int, int]]:
    if family in ("flux", "unet"):  # 5 blocks: inner spans, and flux's span across both block kinds
        return [(1, 0), (1, 1), (2, 1)]
    return [(1, 0), (0, 1)]


CASES = [(family, f, b) for family in FAMILIES for f, b in _span_settings(family)]


def _user_output(program: Program, variant: str, flat: list[torch.Tensor]) -> torch.Tensor:
    outputs = program.variants[variant].module(*flat)
    return program.graph.rebuild_output(outputs, False)[0]


@pytest.mark.parametrize(("family", "first", "last"), CASES)
def test_full_exact_and_cached_reproduces_full(captured, family, first, last):
    graph, kwargs, expected = captured[family]
    program = Program.from_graph(graph, STEPS)
    config = CacheConfig(full_fraction=0.5, schedule="uniform", first_blocks=first, last_blocks=last)
    result = cache(program, config, None)
    assert result.modified is True
    new = result.program
    new.validate()
    assert new.schedule == ("full", "cached", "cached", "full")
    assert result.stats["span_blocks"] == [first, len(graph.blocks) - last]

    # full variant writes exactly the states the cached variant reads
    full, cached = new.variants["full"], new.variants["cached"]
    assert set(full.state_outputs) == {s.removesuffix("@prev") for s in cached.state_inputs}

    # full variant: user output exactly the original (the executor checks the extra state outputs'
    # count); cached variant fed the state of a full run on the same inputs reproduces it
    executor = ProgramExecutor(new)
    full_out = executor.run(0, 0, kwargs, False)[0]
    cached_out = executor.run(1, 0, kwargs, False)[0]
    assert (full_out - expected).abs().max().item() == 0.0
    torch.testing.assert_close(cached_out, expected, atol=1e-5, rtol=0)
    assert executor.variant_calls == {"full": 1, "cached": 1}

    # the cached graph skips the span: fewer FLOPs than the original
    cached_flops = sum(c.flops for c in graph_costs(new.variants["cached"].module).values())
    assert cached_flops < graph.total_flops()


@pytest.mark.parametrize("family", FAMILIES)
def test_default_span_is_residual_mode(captured, family):
    graph, _, _ = captured[family]
    result = cache(Program.from_graph(graph, STEPS), CacheConfig(full_fraction=0.5, schedule="uniform"), None)
    # UNet stages are not residual updates of their input (they down/upsample), so the span output is stored.
    assert result.stats["mode"] == ("output reuse" if family == "unet" else "residual")


def test_unet_modes(captured):
    """UNet spans store their outputs: no stage is a residual update of the stream entering it."""
    graph, _, _ = captured["unet"]
    modes = {}
    for first, last in ((1, 0), (0, 1), (1, 1), (2, 1)):
        config = CacheConfig(full_fraction=0.5, schedule="uniform", first_blocks=first, last_blocks=last)
        modes[(first, last)] = cache(Program.from_graph(graph, STEPS), config, None).stats["mode"]
    # Up blocks upsample and consume skips: inner spans change shape and fall back to output reuse.
    assert modes == {
        (1, 0): "output reuse",
        (0, 1): "output reuse",
        (1, 1): "output reuse",
        (2, 1): "output reuse",
    }


def test_flux_span_across_double_and_single_blocks_pairs_both_streams(captured):
    graph, _, _ = captured["flux"]
    groups = [b.group for b in graph.blocks]
    span = locate_span(graph.module, 1, 1)
    assert {groups[i] for i in range(span.start, span.stop)} == {
        "transformer_blocks",
        "single_transformer_blocks",
    }
    assert span.residual
    assert len(span.outputs) == 2 and len(set(span.inputs)) == 2
    nodes = {n.name: n for n in graph.module.graph.nodes}
    shapes = []
    for inp, out in zip(span.inputs, span.outputs, strict=True):
        assert nodes[inp].meta["val"].shape == nodes[out].meta["val"].shape
        shapes.append(tuple(nodes[out].meta["val"].shape))
    assert sorted(shapes) == [(2, 8, 32), (2, 16, 32)]  # text stream (8 tokens) and image stream (16)
    config = CacheConfig(full_fraction=0.5, schedule="uniform", first_blocks=1, last_blocks=1)
    result = cache(Program.from_graph(graph, STEPS), config, None)
    assert result.stats["mode"] == "residual"
    assert result.program.variants["cached"].state_inputs == ("cache.r0", "cache.r1")


def test_flux_stream_pairing_does_not_depend_on_text_length():
    pairings = {}
    for text_len in (8, 16):
        model, kwargs = tiny_denoiser("flux", text_len=text_len)
        span = locate_span(capture(model, kwargs).module, 1, 1)
        pairings[text_len] = dict(zip(span.outputs, span.inputs, strict=True))
    assert pairings[16] == pairings[8]


def test_dit_span_from_block_zero_is_residual(captured):
    # DiT's final layer reuses transformer_blocks.0.norm1.emb; its weights are not span outputs.
    graph, _, _ = captured["dit"]
    span = locate_span(graph.module, 0, 0)
    assert span.residual and len(span.outputs) == 1
    assert all(n.op != "get_attr" for n in graph.module.graph.nodes if n.name in span.outputs)


# ---------------------------------------------------------------- no-op, purity, config


@pytest.mark.parametrize(
    "config",
    [
        CacheConfig(),
        CacheConfig(full_fraction=1.0, schedule="uniform"),
        CacheConfig(full_fraction=0.9, schedule="uniform"),
    ],
)
def test_noop_config_returns_program_unchanged(captured, config):
    graph, _, _ = captured["pixart"]
    program = Program.from_graph(graph, STEPS)
    result = cache(program, config, None)
    assert result.modified is False
    assert result.program is program
    final, results = run_passes(program, [config])
    assert results["cache"].modified is False
    assert final.variants == program.variants and final.schedule == program.schedule


def test_input_program_not_mutated(captured):
    graph, kwargs, expected = captured["flux"]
    program = Program.from_graph(graph, STEPS)
    code = program.variants["full"].module.code
    nodes = len(program.variants["full"].module.graph.nodes)
    config = CacheConfig(full_fraction=0.5, schedule="uniform", approximation="taylor")
    final, _ = run_passes(program, [config])
    assert final is not program
    assert set(program.variants) == {"full"} and program.schedule == ("full",) * STEPS
    assert program.step_scalars == {} and program.applied == ()
    assert program.variants["full"].module.code == code
    assert len(program.variants["full"].module.graph.nodes) == nodes
    assert graph.module.code == code
    with torch.no_grad():
        again = graph.rebuild_output(graph.module(*graph.flat_inputs(kwargs)), False)[0]
    assert torch.equal(again, expected)


def test_config_json_round_trip():
    config = CacheConfig(
        full_fraction=0.4,
        first_blocks=2,
        last_blocks=1,
        approximation="taylor",
        schedule="uniform",
        prior="feature",
        weighting="linear",
        max_gap=3,
        warmup=1,
        full_step_mask=(0, 2, 5),
    )
    data = json.loads(config.to_json())
    assert data["full_step_mask"] == [0, 2, 5]
    assert CacheConfig.from_dict(data) == config
    assert CacheConfig.from_dict(json.loads(CacheConfig().to_json())) == CacheConfig()
    with pytest.raises(InputError, match="unknown field"):
        CacheConfig.from_dict({"full_fracton": 0.5})


@pytest.mark.parametrize(
    "bad",
    [
        dict(full_fraction=0.0),
        dict(full_fraction=1.5),
        dict(approximation="linear"),
        dict(schedule="random"),
        dict(prior="psnr"),
        dict(weighting="cubic"),
        dict(first_blocks=-1),
    ],
)
def test_invalid_config_is_input_error(bad):
    with pytest.raises(InputError):
        CacheConfig(**bad)


def test_span_leaving_no_block_is_input_error(captured):
    graph, _, _ = captured["pixart"]
    config = CacheConfig(full_fraction=0.5, schedule="uniform", first_blocks=1, last_blocks=1)
    with pytest.raises(InputError, match="leave no block"):
        cache(Program.from_graph(graph, STEPS), config, None)


# ---------------------------------------------------------------- schedules and Taylor


def test_taylor_coefficients_hand_example():
    mask = np.array([1, 0, 0, 1, 0, 1, 0], dtype=bool)
    # steps 1-2: only one full step so far -> 0; step 4: (4-3)/(3-0); step 6: (6-5)/(5-3)
    assert taylor_coefficients(mask) == pytest.approx((0.0, 0.0, 0.0, 0.0, 1 / 3, 0.0, 0.5))
    assert taylor_coefficients(np.array([1, 1, 0, 0], dtype=bool)) == pytest.approx((0.0, 0.0, 1.0, 2.0))


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_taylor_graph_runs_and_extrapolates(captured, family):
    graph, kwargs, expected = captured[family]
    steps = 6
    program = Program.from_graph(graph, steps)
    taylor = cache(program, CacheConfig(full_fraction=0.5, schedule="uniform", approximation="taylor"), None)
    residual = cache(program, CacheConfig(full_fraction=0.5, schedule="uniform"), None)
    p = taylor.program
    p.validate()
    mask = np.array([s == "full" for s in p.schedule])
    assert p.step_scalars["cache.taylor_coef"] == taylor_coefficients(mask)
    assert p.variants["cached"].scalar_inputs == ("cache.taylor_coef",)
    # whole schedule runs; with identical inputs every step reproduces the full output
    executor = ProgramExecutor(p)
    for step in range(steps):
        torch.testing.assert_close(executor.run(step, 0, kwargs, False)[0], expected, atol=1e-5, rtol=0)
    assert executor.variant_calls["cached"] == int((~mask).sum())
    # the Taylor term: cached_taylor(r, r_prev, c) == cached_residual(r + c (r - r_prev))
    flat = graph.flat_inputs(kwargs)
    count = len(residual.program.variants["cached"].state_inputs)
    gen = torch.Generator().manual_seed(0)
    states = [executor.states[0][f"cache.r{i}"][-1] for i in range(count)]
    previous = [s + 0.1 * torch.randn(s.shape, generator=gen) for s in states]
    coefficient = 0.75
    with torch.no_grad():
        got = _user_output(p, "cached", [*flat, *states, *previous, torch.tensor(coefficient)])
        extrapolated = [s + coefficient * (s - q) for s, q in zip(states, previous, strict=True)]
        want = _user_output(residual.program, "cached", [*flat, *extrapolated])
        plain = _user_output(residual.program, "cached", [*flat, *states])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-4)


def test_resolved_config_reproduces_schedule(captured):
    graph, _, _ = captured["sd3"]
    program = Program.from_graph(graph, 7)
    config = CacheConfig(full_fraction=0.45, schedule="uniform")
    result = cache(program, config, None)
    mask_indices = tuple(i for i, s in enumerate(result.program.schedule) if s == "full")
    assert result.resolved_config.full_step_mask == mask_indices
    assert mask_indices[0] == 0 and mask_indices[-1] == 6 and len(mask_indices) == round(0.45 * 7)
    again = cache(program, result.resolved_config, None)
    assert again.program.schedule == result.program.schedule
    final, _ = run_passes(program, [config])
    assert final.resolved["cache"]["full_step_mask"] == list(mask_indices)
    rebuilt = CacheConfig.from_dict(json.loads(json.dumps(final.resolved["cache"])))
    assert cache(program, rebuilt, None).program.schedule == result.program.schedule


def test_dp_without_calibration_or_bad_mask_is_input_error(captured):
    graph, _, _ = captured["sd3"]
    program = Program.from_graph(graph, STEPS)
    with pytest.raises(InputError, match="calibration"):
        cache(program, CacheConfig(full_fraction=0.5, schedule="dp"), None)
    with pytest.raises(InputError, match="full_step_mask"):
        cache(program, CacheConfig(full_fraction=0.5, full_step_mask=(1, 3)), None)
    with pytest.raises(InputError, match="full_step_mask"):
        cache(program, CacheConfig(full_fraction=0.5, full_step_mask=(0, 9)), None)


@pytest.mark.parametrize("kind", ["pixart", "flux"])
def test_dp_schedule_with_calibrator(kind):
    steps = 6
    pipe = tiny_pipeline(kind)
    call = pipeline_call_kwargs(kind)
    call["num_inference_steps"] = steps
    recorded = record_denoiser_calls(pipe, **call)
    graph = capture(find_denoiser(pipe)[1], recorded[0])
    extra = {
        k: v
        for k, v in call.items()
        if k
        not in (
            "prompt",
            "height",
            "width",
            "guidance_scale",
            "generator",
            "output_type",
            "num_inference_steps",
        )
    }
    calib = Calibrator(
        pipe, ["a red circle", "a blue square"], 64, 64, call["guidance_scale"], extra_call_kwargs=extra,
        run_program=AcceleratedPipeline,
    )
    program = Program.from_graph(graph, steps)
    config = CacheConfig(full_fraction=0.5, schedule="dp")
    result = cache(program, config, calib)
    stats = result.stats
    assert result.modified
    assert stats["full_steps"] == 3
    assert np.isfinite(stats["objective"]) and np.isfinite(stats["uniform_objective"])
    assert stats["objective"] <= stats["uniform_objective"] + 1e-12
    schedule = result.program.schedule
    assert schedule[0] == "full" and schedule[-1] == "full" and schedule.count("full") == 3
    # the prior is cached: a second run reuses it and the resolved mask needs no calibration
    assert len(calib._memory) == 1
    assert cache(program, config, calib).program.schedule == schedule
    assert len(calib._memory) == 1
    assert cache(program, result.resolved_config, None).program.schedule == schedule
    # the pipeline is left as it was
    assert "forward" not in find_denoiser(pipe)[1].__dict__


def test_infeasible_dp_schedule_is_bad_input(captured):
    """A sampled combination the DP cannot satisfy is an InputError (the search prunes it)."""
    import numpy as np

    from accelkit.errors import InputError

    graph, _, _ = captured["dit"]

    class FixedPrior:
        def cached(self, kind, program, compute, **parts):
            return np.ones((8, 8))

    config = CacheConfig(full_fraction=0.25, schedule="dp", warmup=2, max_gap=2)
    with pytest.raises(InputError, match="less warm-up"):
        cache(Program.from_graph(graph, 8), config, FixedPrior())


def _sparse_with_dense_steps(graph, steps: int, dense_steps: int) -> Program:
    from accelkit.passes.sparse import SparseConfig, _text_tokens, attention_sites

    program = Program.from_graph(graph, steps)
    settings = dict(block_q=16, block_k=16, min_tokens=0)
    count = sum(1 for s in attention_sites(program.variants["full"].module, SparseConfig(**settings),
                                           _text_tokens(program)) if s.dense_reason is None)
    sparse, _ = run_passes(program, [SparseConfig(taus=(0.3,) * count, dense_steps=dense_steps, **settings)])
    return sparse


def test_cache_after_sparse_dense_steps_keeps_them_full_and_writes_state_from_both(captured):
    graph, kwargs, _ = captured["dit"]
    sparse = _sparse_with_dense_steps(graph, 6, 2)
    assert sparse.schedule[:2] == ("full_dense", "full_dense")
    result = cache(sparse, CacheConfig(full_fraction=0.34, schedule="uniform", approximation="taylor"), None)
    schedule = result.program.schedule
    assert schedule[:2] == ("full_dense", "full_dense") and "cached" in schedule
    assert result.resolved_config.full_step_mask[:2] == (0, 1)
    # Both full-compute variants write the cache state (the dense one right after warm-up feeds Taylor).
    variants = result.program.variants
    assert variants["full_dense"].state_outputs == variants["full"].state_outputs != ()
    executor = ProgramExecutor(result.program)
    outputs = [executor.run(step, 0, kwargs, return_dict=False)[0] for step in range(6)]
    assert all(torch.isfinite(o).all() for o in outputs)
    assert executor.variant_calls["full_dense"] == 2 and executor.variant_calls["cached"] == schedule.count("cached")
    # A step right after the dense steps that is cached reuses the dense step's residual exactly.
    first_cached = schedule.index("cached")
    if schedule[first_cached - 1] == "full_dense":
        torch.testing.assert_close(outputs[first_cached], outputs[first_cached - 1])
    with pytest.raises(InputError, match="dense"):
        cache(sparse, CacheConfig(full_fraction=0.5, full_step_mask=(0, 2, 4, 5)), None)


def test_dp_schedule_after_sparse_dense_steps_with_calibrator():
    steps = 6
    pipe = tiny_pipeline("flux")
    call = pipeline_call_kwargs("flux")
    call["num_inference_steps"] = steps
    recorded = record_denoiser_calls(pipe, **call)
    graph = capture(find_denoiser(pipe)[1], recorded[0])
    calib = Calibrator(pipe, ["a red circle"], 64, 64, call["guidance_scale"],
                       run_program=AcceleratedPipeline)
    sparse = _sparse_with_dense_steps(graph, steps, 2)
    for prior in ("residual", "end_to_end"):
        result = cache(sparse, CacheConfig(full_fraction=0.5, schedule="dp", prior=prior, max_gap=4), calib)
        # Steps 0, 1 stay dense and full, the last step is full: the only 3-full-step schedule left.
        assert result.program.schedule == ("full_dense", "full_dense", "cached", "cached", "cached", "full"), prior
        assert np.isfinite(result.stats["objective"])


class _PriorCalib:
    """A calibrator stand-in: a fixed prior favouring long gaps, and a scheduler of the given order."""

    def __init__(self, order):
        import types

        self.scheduler = types.SimpleNamespace(config={"solver_order": order})

    def cached(self, kind, program, compute, **parts):
        prior = np.full((12, 11), 1e-3)
        prior[:, 1] = 1.0  # a one-step lag is costly, longer ones cheap: the free DP makes long gaps
        return prior


@pytest.mark.parametrize("order", [1, 2, 3])
def test_solver_gap_caps_gaps_at_the_multistep_order(captured, order):
    graph, _, _ = captured["dit"]
    program = Program.from_graph(graph, 12)
    # weighting "none": every gap holding cached steps costs about 1, so the free DP makes few, long gaps
    config = CacheConfig(full_fraction=7 / 12, schedule="dp", weighting="none")
    free = cache(program, config, _PriorCalib(order))
    aware = cache(program, CacheConfig(**{**config.to_dict(), "solver_gap": True}), _PriorCalib(order))
    gaps = np.diff([i for i, name in enumerate(aware.program.schedule) if name != "cached"])
    assert aware.stats["full_steps"] == 7
    if order == 1:  # a one-step sampler: no constraint
        assert aware.program.schedule == free.program.schedule and "solver_order_gap" not in aware.stats
    else:
        assert gaps.max() <= order and aware.stats["solver_order_gap"] == order
        free_gaps = np.diff([i for i, name in enumerate(free.program.schedule) if name != "cached"])
        assert free_gaps.max() > order  # the constraint changed the schedule
