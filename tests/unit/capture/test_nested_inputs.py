"""Tensors nested in dicts, tuples and lists of the denoiser call become graph inputs of their own."""

from __future__ import annotations

import pytest
import torch

from accelkit.capture import capture, shape_signature
from accelkit.capture.graph import TENSOR_SLOT, split_call
from accelkit.errors import PlanMismatchError
from accelkit.passes.base import Program
from accelkit.runtime.executor import ProgramExecutor


class NestedDenoiser(torch.nn.Module):
    """Takes what SDXL (added_cond_kwargs), HunyuanDiT (rotary tuple) and Z-Image (list of latents) pass."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x, timestep, added_cond_kwargs=None, image_rotary_emb=None, return_dict=True):
        cos, sin = image_rotary_emb
        out = [self.proj(latent) * cos + sin for latent in x]
        out = [o * added_cond_kwargs["scale"] + added_cond_kwargs["text_embeds"] + timestep for o in out]
        return (torch.stack(out),)


def _call(tokens: int = 3) -> dict:
    torch.manual_seed(0)
    return {
        "x": [torch.randn(tokens, 4), torch.randn(tokens, 4)],
        "timestep": torch.tensor([0.5]),
        "added_cond_kwargs": {"text_embeds": torch.randn(1, 4), "scale": 2.0, "time_ids": torch.randn(1, 6)},
        "image_rotary_emb": (torch.randn(tokens, 4), torch.randn(tokens, 4)),
        "return_dict": False,
    }


def test_split_call_names_nested_tensors_by_path():
    tensors, statics, nested = split_call(_call())
    assert list(tensors) == ["x.0", "x.1", "timestep", "added_cond_kwargs.text_embeds", "added_cond_kwargs.time_ids",
                             "image_rotary_emb.0", "image_rotary_emb.1"]
    assert statics == {"return_dict": False}
    assert nested["added_cond_kwargs"] == {"text_embeds": TENSOR_SLOT, "scale": 2.0, "time_ids": TENSOR_SLOT}
    assert nested["image_rotary_emb"] == (TENSOR_SLOT, TENSOR_SLOT)


def test_nested_capture_is_exact_and_runs_in_the_executor():
    model = NestedDenoiser().eval()
    kwargs = _call()
    graph = capture(model, kwargs)
    assert graph.input_names[0] == "x.0" and "added_cond_kwargs.text_embeds" in graph.input_names
    assert len(graph.input_names) == len(graph.input_specs) == len(list(graph.module.graph.find_nodes(op="placeholder")))
    assert graph.signature() == shape_signature(kwargs)
    with torch.no_grad():
        expected = model(**kwargs)[0]
        actual = graph.rebuild_output(graph.module(*graph.flat_inputs(kwargs)), False)[0]
    assert torch.equal(actual, expected)
    executor = ProgramExecutor(Program.from_graph(graph, 2))
    assert torch.equal(executor.run(0, 0, _call(), return_dict=False)[0], expected)


def test_nested_signature_tracks_shapes_and_constants():
    base = shape_signature(_call())
    assert shape_signature(_call(tokens=5)) != base
    other_scale = _call()
    other_scale["added_cond_kwargs"]["scale"] = 3.0
    assert shape_signature(other_scale) != base
    shorter = _call()
    shorter["x"] = shorter["x"][:1]
    assert shape_signature(shorter) != base


def test_mismatch_names_the_nested_input():
    graph = capture(NestedDenoiser().eval(), _call())
    executor = ProgramExecutor(Program.from_graph(graph, 2))
    with pytest.raises(PlanMismatchError, match=r"image_rotary_emb\.0 is \[5, 4\]"):
        executor.run(0, 0, _call(tokens=5), return_dict=False)


def test_int_list_argument_is_baked_into_the_signature():
    class UsesInt(torch.nn.Module):
        def forward(self, x, sizes):
            return (x.reshape(sizes[0], -1),)

    # ints in a list are specialized by export (not graph inputs): capture succeeds and bakes them in
    graph = capture(UsesInt(), {"x": torch.randn(2, 3), "sizes": [2]})
    assert graph.input_names == ("x",) and graph.static_kwargs == {"sizes": [2]}
    assert graph.signature() != shape_signature({"x": torch.randn(2, 3), "sizes": [3]})
