"""Captures specialized to input values a denoiser reads into Python (Lumina2's caption lengths)."""

from __future__ import annotations

import pytest
import torch

from accelkit.capture import capture, capture_cached
from accelkit.errors import CaptureError, PlanMismatchError
from accelkit.families import FamilyTraits, register, unregister
from accelkit.passes.base import Program
from accelkit.runtime.executor import ProgramExecutor


class CountsCaptionTokens(torch.nn.Module):
    """Like Lumina2: per sample, the valid caption tokens (a Python count) joined with the image tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, hidden_states, encoder_hidden_states, encoder_attention_mask, return_dict=True):
        lengths = encoder_attention_mask.sum(dim=1).tolist()
        joint = [torch.cat([encoder_hidden_states[i, :n], hidden_states[i]]) for i, n in enumerate(lengths)]
        longest = max(len(j) for j in joint)  # a Python int: hashable, comparable
        padded = torch.stack([torch.nn.functional.pad(j, (0, 0, 0, longest - len(j))) for j in joint])
        return (self.proj(padded)[:, -hidden_states.shape[1]:] * (1 + encoder_attention_mask[:, :1, None]),)


def _call(lengths: list[int]) -> dict:
    torch.manual_seed(0)
    mask = torch.zeros(len(lengths), 5, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return {"hidden_states": torch.randn(len(lengths), 3, 4), "encoder_hidden_states": torch.randn(len(lengths), 5, 4),
            "encoder_attention_mask": mask, "return_dict": False}


@pytest.fixture
def value_family():
    register(FamilyTraits(name="toy-counts", denoiser_classes=("CountsCaptionTokens",),
                          value_inputs=("encoder_attention_mask",)))
    yield
    unregister("toy-counts")


def test_without_the_trait_export_cannot_capture():
    with pytest.raises(CaptureError, match="could not capture CountsCaptionTokens"):
        capture(CountsCaptionTokens().eval(), _call([2, 4]))


def test_value_inputs_capture_exactly_for_their_values(value_family):
    model = CountsCaptionTokens().eval()
    for lengths in ([2, 4], [0, 5]):
        kwargs = _call(lengths)
        graph = capture(model, kwargs)
        assert graph.input_values == {"encoder_attention_mask": tuple(tuple(r) for r in kwargs["encoder_attention_mask"].tolist())}
        with torch.no_grad():
            expected = model(**kwargs)[0]
            actual = graph.module(*graph.flat_inputs(kwargs))[0]
        assert torch.equal(actual, expected)


def test_other_values_are_another_signature(value_family):
    model = CountsCaptionTokens().eval()
    first, second = _call([2, 4]), _call([1, 4])
    graph = capture_cached(model, first)
    assert graph.call_signature(first) == graph.signature() != graph.call_signature(second)
    assert capture_cached(model, second) is not graph
    assert capture_cached(model, _call([2, 4])) is graph
    executor = ProgramExecutor(Program.from_graph(graph, 2))  # no family: other values are refused
    with pytest.raises(PlanMismatchError, match="values of encoder_attention_mask differ"):
        executor.run(0, 0, second, return_dict=False)
