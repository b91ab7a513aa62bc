"""SVDQuant pass: config, per-layer error, bytes at FLUX widths, tiny-model graphs, replay, cost."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from accelkit.capture.graph import capture
from accelkit.errors import InputError
from accelkit.passes.base import GraphVariant, Program, run_passes
from accelkit.passes.quant import (
    QuantConfig,
    RecordedInputs,
    find_quant_sites,
    quant,
    quantized_bytes,
    svdquant_weight,
)
from tests.fixtures.tiny_models import tiny_denoiser, tiny_denoiser_inputs

SMALL = dict(bits=4, rank=8, group_size=16)


@functools.cache
def _captured(family: str):
    model, kwargs = tiny_denoiser(family)
    graph = capture(model, kwargs)
    calls = [graph.flat_inputs(tiny_denoiser_inputs(family, seed=s)) for s in range(1, 3)]
    return kwargs, Program.from_graph(graph, 4), RecordedInputs(calls)


def _run(program: Program, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        return program.variants["full"].module(*program.graph.flat_inputs(kwargs))[0]


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _snapshot(program: Program):
    return (program.schedule, dict(program.variants), program.variants["full"].module.code,
            dict(program.new_weights), program.applied)  # fmt: skip


def test_config_json_round_trip_noop_and_search_space():
    for config in (QuantConfig(), QuantConfig(bits=4, act_mode="w4a8", alpha_grid=(0.5,), keep_16bit=2,
                                              alphas=(("a.b", 0.5), ("c", 0.0)), kept_16bit=("d",))):  # fmt: skip
        again = QuantConfig.from_dict(json.loads(config.to_json()))
        assert again == config
    assert QuantConfig().is_noop() and not QuantConfig(bits=4).is_noop()
    assert set(QuantConfig.SEARCH_SPACE) == {"bits", "rank", "group_size", "act_mode", "keep_16bit"}
    for bad in (dict(bits=8), dict(act_mode="w8a8"), dict(group_size=3), dict(alpha_grid=()), dict(rank=0)):
        with pytest.raises(InputError):
            QuantConfig(**bad)


def test_noop_returns_the_same_program():
    _, program, _ = _captured("pixart")
    result = quant(program, QuantConfig(), None)
    assert not result.modified and result.program is program


def _outlier_layer(seed=0, n=128, k=256):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) / k**0.5
    w[:, :4] *= 8  # weight outlier channels
    w[:3] += torch.randn(3, k, generator=gen)  # a few outlier rows: low-rank structure
    x = torch.randn(512, k, generator=gen)
    x[:, 10:14] *= 50  # activation outlier channels
    return w, x


@pytest.mark.parametrize("act_mode", ["w4a16", "w4a8", "w4a4"])
def test_svdquant_beats_plain_int4_on_outliers(act_mode):
    from accelkit.kernels.svdq_linear import svdq_linear_reference

    w, x = _outlier_layer()
    absmax = x.abs().amax(0)
    y = x @ w.t()

    def err(alpha, low_rank):
        q = svdquant_weight(w, absmax, alpha=alpha, rank=16, group_size=32, low_rank=low_rank)
        out = svdq_linear_reference(x, q.packed, q.scales, q.lora_down, q.lora_up, q.smooth, None,
                                    group_size=32, act_mode=act_mode)  # fmt: skip
        return _rel(out, y)

    plain = err(0.0, False)
    best_svdq = min(err(a, True) for a in (0.0, 0.5))
    assert best_svdq < 0.7 * plain, (best_svdq, plain)


def test_quantized_bytes_at_flux_widths():
    bf16 = {(3072, 3072): 3072 * 3072 * 2, (12288, 3072): 12288 * 3072 * 2, (3072, 12288): 3072 * 12288 * 2}
    ratios = {s: b / quantized_bytes(*s, rank=32, group_size=64) for s, b in bf16.items()}
    # A FLUX double block per stream: q, k, v, out (3072²), FF up (3072->12288) and down (12288->3072).
    layers = [(3072, 3072)] * 4 + [(12288, 3072), (3072, 12288)]
    total = sum(bf16[s] for s in layers) / sum(quantized_bytes(*s, rank=32, group_size=64) for s in layers)
    assert total >= 3.5 and min(ratios.values()) > 3.45, (total, ratios)
    # the real tensors have the sizes the formula counts (a small slice keeps the SVD cheap)
    q = svdquant_weight(torch.randn(256, 128).bfloat16(), None, alpha=0.0, rank=32, group_size=64,
                        refine_iterations=0)  # fmt: skip
    stored = sum(t.numel() * t.element_size() for t in q.tensors().values())
    assert stored == quantized_bytes(256, 128, rank=32, group_size=64)


@pytest.mark.parametrize("family,act_mode,bound", [
    ("flux", "w4a16", 0.1), ("pixart", "w4a16", 0.1), ("dit", "w4a16", 0.1), ("pixart", "w4a8", 0.1),
])  # fmt: skip
def test_tiny_models_quantized_graph_is_close(family, act_mode, bound):
    kwargs, program, calib = _captured(family)
    before = _snapshot(program)
    final, results = run_passes(program, [QuantConfig(**SMALL, act_mode=act_mode)], calib)
    assert _snapshot(program) == before  # input not mutated
    stats = results["quant"].stats
    assert stats["quantized"] and results["quant"].modified
    module = final.variants["full"].module
    ops = [n for n in module.graph.nodes if n.target == torch.ops.accelkit.svdq_linear.default]
    assert len(ops) >= len(stats["quantized"])
    assert all("nn_module_stack" in n.meta and "val" in n.meta for n in ops)
    assert len(final.graph.blocks) == len(program.graph.blocks)
    assert all(f"quant.{p}.packed" in final.new_weights for p in stats["quantized"])
    assert _rel(_run(final, kwargs), _run(program, kwargs)) < bound


def test_replay_from_resolved_config_without_calibration():
    kwargs, program, calib = _captured("pixart")
    final, _ = run_passes(program, [QuantConfig(**SMALL, keep_16bit=2)], calib)
    resolved = QuantConfig.from_dict(json.loads(json.dumps(final.resolved["quant"])))
    assert resolved.alphas is not None and len(resolved.kept_16bit) == 2
    # with the plan's tensors: no SVD, identical output
    again = quant(program.replace(new_weights=dict(final.new_weights)), resolved, None)
    assert again.stats["reused_tensors"] == len(resolved.alphas)
    assert torch.equal(_run(again.program, kwargs), _run(final, kwargs))
    # alpha = 0 everywhere needs no data at all: recomputed deterministically
    zero = QuantConfig.from_dict({**resolved.to_dict(), "alphas": [[p, 0.0] for p, _ in resolved.alphas]})
    a, b = quant(program, zero, None), quant(program, zero, None)
    assert torch.equal(_run(a.program, kwargs), _run(b.program, kwargs))
    with pytest.raises(InputError):
        quant(program, QuantConfig(**SMALL), None)


def test_plain_int4_ablation_and_skip_patterns():
    kwargs, program, calib = _captured("flux")
    sites = {s.path: s.reason for s in find_quant_sites(program.variants["full"].module, QuantConfig(**SMALL))}
    assert sites["x_embedder"] and sites["proj_out"] and sites["context_embedder"]
    assert sites["single_transformer_blocks.0.proj_out"] is None  # only the root proj_out is skipped
    plain = quant(program, QuantConfig(**SMALL, low_rank=False, alpha_grid=(0.0,)), None)
    assert all(t.shape[0] == 0 for k, t in plain.program.new_weights.items() if k.endswith("lora_down"))
    assert _rel(_run(plain.program, kwargs), _run(program, kwargs)) < 0.2


def test_cost_counts_four_bit_bytes():
    from accelkit.capture.cost import graph_costs
    from accelkit.search.cost import device_spec, module_cost

    _, program, calib = _captured("dit")
    final, _ = run_passes(program, [QuantConfig(**SMALL)], calib)
    before, after = program.variants["full"].module, final.variants["full"].module
    costs = graph_costs(after)
    node = next(n for n in after.graph.nodes if n.target == torch.ops.accelkit.svdq_linear.default)
    assert costs[node.name].kind == "matmul" and costs[node.name].flops > 0
    weight_bytes = lambda m: sum(  # noqa: E731
        c.bytes for n, c in graph_costs(m).items() if c.kind == "matmul")
    assert weight_bytes(after) < weight_bytes(before)
    assert module_cost(after, device_spec("h100")) > 0


def test_requires_a_single_full_variant():
    _, program, calib = _captured("pixart")
    full = program.variants["full"]
    two = program.replace(variants={"full": full, "cached": GraphVariant(full.module)},
                          schedule=("full", "cached", "full", "full"))  # fmt: skip
    with pytest.raises(InputError, match="before"):
        quant(two, QuantConfig(**SMALL), calib)
