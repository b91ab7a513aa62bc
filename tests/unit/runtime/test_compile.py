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
    assert compiled_executor._compiled["full"] is not program.variants["full"].module
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
