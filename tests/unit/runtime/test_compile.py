"""Graph variants run through torch.compile with ``compile=True``."""

from __future__ import annotations

import pytest
import torch

from accelkit.capture import capture
from accelkit.passes.base import Program
from accelkit.runtime.executor import ProgramExecutor
from tests.fixtures.tiny_models import tiny_denoiser


@pytest.mark.slow
def test_compiled_variant_matches_eager():
    model, kwargs = tiny_denoiser("dit")
    graph = capture(model, kwargs)
    program = Program.from_graph(graph, 2)
    eager = ProgramExecutor(program).run(0, 0, kwargs, False)[0]
    compiled_executor = ProgramExecutor(program, compile=True)
    compiled = compiled_executor.run(0, 0, kwargs, False)[0]
    assert compiled_executor._compiled[program.variants["full"].module] is not program.variants["full"].module
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compile_once_per_variant_and_signature_without_graph_breaks():
    """compile=True: one graph per variant and shape signature, none per step, no graph break."""
    from torch._dynamo.utils import counters

    from accelkit.capture.graph import capture_cached
    from accelkit.passes.base import run_passes
    from accelkit.passes.cache import CacheConfig
    from accelkit.runtime.family import ProgramFamily, Recipe
    from tests.fixtures.tiny_models import tiny_denoiser_inputs

    model, kwargs = tiny_denoiser("flux", batch=1)
    config = CacheConfig(full_fraction=0.5, schedule="uniform", approximation="taylor")
    program, _ = run_passes(Program.from_graph(capture(model, kwargs), 6), [config], None)
    assert program.step_scalars  # the Taylor coefficient changes every step
    family = ProgramFamily(program, Recipe.of_program(program), lambda call: capture_cached(model, call))
    executor = ProgramExecutor(program, compile=True, family=family)
    bigger = tiny_denoiser_inputs("flux", batch=2, resolution=12)
    torch._dynamo.reset()
    counters.clear()

    def generation(call):
        executor.reset()
        return [executor.run(step, 0, call, False)[0] for step in range(program.num_steps)]

    first = generation(kwargs)
    graphs_one_signature = counters["stats"]["unique_graphs"]
    assert graphs_one_signature == len(set(program.schedule)) == 2
    again = generation(kwargs)
    assert counters["stats"]["unique_graphs"] == graphs_one_signature  # no recompilation per step or call
    generation(bigger)
    generation(bigger)
    assert counters["stats"]["unique_graphs"] == 2 * graphs_one_signature  # once per new signature
    assert not counters["graph_break"]
    eager = ProgramExecutor(program)
    for step, (a, b) in enumerate(zip(first, again, strict=True)):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, eager.run(step, 0, kwargs, False)[0], atol=1e-4, rtol=1e-4)
