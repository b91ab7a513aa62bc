"""One capture per denoiser and shape signature."""

from __future__ import annotations

import torch

from accelkit.capture import capture_cached
from tests.fixtures.tiny_models import tiny_denoiser, tiny_denoiser_inputs


def test_each_signature_is_captured_once_and_reused():
    model, kwargs = tiny_denoiser("dit")
    first = capture_cached(model, kwargs)
    assert capture_cached(model, tiny_denoiser_inputs("dit", seed=1)) is first  # same shapes, new values
    larger = tiny_denoiser_inputs("dit", resolution=16)
    second = capture_cached(model, larger)
    assert second is not first and second.signature() != first.signature()
    single = tiny_denoiser_inputs("dit", batch=1)
    third = capture_cached(model, single)
    assert third.input_specs[0].shape[0] == 1
    with torch.no_grad():
        for graph, inputs in ((first, kwargs), (second, larger), (third, single)):
            expected = model(**inputs)[0]
            actual = graph.rebuild_output(graph.module(*graph.flat_inputs(inputs)), False)[0]
            assert torch.equal(actual, expected)
