"""The plan in words and the plan's weight bytes, for every pass the report can show."""

from __future__ import annotations

import functools

from accelkit.capture.graph import capture
from accelkit.passes.base import Program, run_passes
from accelkit.passes.cache import CacheConfig
from accelkit.passes.prune import PruneConfig
from accelkit.passes.quant import QuantConfig
from accelkit.passes.sparse import SparseConfig, attention_sites
from accelkit.passes.steps import StepsConfig
from accelkit.search.optimize import describe_plan, program_weights_bytes
from tests.fixtures.tiny_models import tiny_denoiser


@functools.cache
def _base() -> Program:
    model, kwargs = tiny_denoiser("flux", resolution=16)
    return Program.from_graph(capture(model, kwargs), 6)


def test_baseline_weight_bytes_are_the_parameters_and_the_plan_says_no_change():
    base = _base()
    params = sum(p.numel() * p.element_size() for p in base.graph.module.parameters())
    assert params <= program_weights_bytes(base) <= params * 1.05  # plus a few constant buffers
    assert describe_plan(base) == "no change (the baseline)"


def test_every_pass_is_described_and_pruning_and_quantization_shrink_the_weights():
    base = _base()
    configs = [
        StepsConfig(num_steps=4),
        PruneConfig(fraction=0.3, score="last"),
        QuantConfig(bits=4, rank=4, group_size=16, alpha_grid=(0.0,)),
    ]
    program, _ = run_passes(base, configs, None)
    sparse_config = SparseConfig(block_q=16, block_k=16, min_tokens=0)
    sites = attention_sites(program.variants["full"].module, sparse_config, 8)
    count = sum(1 for s in sites if s.dense_reason is None)
    program, _ = run_passes(program, [SparseConfig(taus=(0.5,) * count, block_q=16, block_k=16, min_tokens=0),
                                      CacheConfig(full_fraction=0.5, schedule="uniform")], None)
    text = describe_plan(program)
    for phrase in ("run 4 of 6 sampler steps", "remove 2 block(s) (single_transformer_blocks.0, ", "linear layers to 4 bits (W4A16, group 16, "
                   "rank-4 16-bit branch", "block-sparse attention at", "compute 2 of 4 steps fully"):
        assert phrase in text, (phrase, text)
    pruned, _ = run_passes(base, configs[1:2], None)
    quantized, _ = run_passes(base, configs[2:3], None)
    assert program_weights_bytes(pruned) < program_weights_bytes(base)
    assert program_weights_bytes(quantized) < 0.6 * program_weights_bytes(base)
    # The cache variants share their weights: counted once.
    assert program_weights_bytes(program) <= program_weights_bytes(quantized)
