"""Capture denoisers that turn input values into Python numbers, specialized to the recorded call.

Some denoisers read an input's *values* into Python (Lumina2 counts each caption's valid tokens with
``encoder_attention_mask.sum(dim=1).tolist()`` and loops over the counts to build its joint sequence).
``torch.export`` turns such reads into unbacked symbols, which Python code then cannot hash, compare or
slice with ("unhashable type: non-nested SymInt"). A family naming those inputs (``value_inputs``) is
captured in two passes instead: the recorded call runs once eagerly while every ``Tensor.tolist`` /
``Tensor.item`` result is noted, and the export replays those numbers in the same order. The graph is then
exact for those input values only, so the values join the call signature
(:func:`accelkit.capture.graph.shape_signature`): other values are another capture.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from accelkit.errors import CaptureError

# The reads that leave the graph for Python: export decomposes ``tolist`` into one ``item`` per element,
# so numbers are kept as one flat stream and regrouped by the traced tensor's shape.
_PYTHON_READS = (torch.Tensor.tolist, torch.Tensor.item)


def _flatten(value: Any) -> list[Any]:
    return [leaf for item in value for leaf in _flatten(item)] if isinstance(value, list) else [value]


def _nest(numbers: list[Any], shape: tuple[int, ...]) -> Any:
    if not shape:
        if not numbers:
            raise CaptureError("the traced call reads more values into Python than the eager call did; "
                               "the denoiser's Python control flow differs between the two runs")
        return numbers.pop(0)
    return [_nest(numbers, shape[1:]) for _ in range(shape[0])]


class _NoteReads(TorchFunctionMode):
    """Notes every number an eager call reads out of a tensor, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers: list[Any] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func in _PYTHON_READS:
            self.numbers.extend(_flatten(result))
        return result


class _ReplayReads(TorchFunctionMode):
    """Answers each read of a (fake) tensor with the next numbers the eager call read."""

    def __init__(self, numbers: list[Any]) -> None:
        super().__init__()
        self.numbers = list(numbers)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.item:
            return _nest(self.numbers, ())
        if func is torch.Tensor.tolist:
            return _nest(self.numbers, tuple(int(s) for s in args[0].shape))
        return func(*args, **(kwargs or {}))


@contextmanager
def python_reads_from_eager_call(denoiser: torch.nn.Module, kwargs: Mapping[str, Any]) -> Iterator[None]:
    """While active, ``tolist``/``item`` return what an eager ``denoiser(**kwargs)`` read, in order.

    Raises:
        CaptureError: when the export reads a different number of values than the eager call did.
    """
    with torch.no_grad(), _NoteReads() as notes:
        denoiser(**kwargs)
    replay = _ReplayReads(notes.numbers)
    with replay:
        yield
    if replay.numbers:
        raise CaptureError(f"the traced call read {len(notes.numbers) - len(replay.numbers)} values into Python, "
                           f"the eager call {len(notes.numbers)}; the denoiser's control flow differs between them")


def input_values(kwargs: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, tuple]:
    """The values of the tensor inputs ``names`` the call has, as hashable nested tuples."""

    def as_tuple(value: Any) -> Any:
        return tuple(as_tuple(v) for v in value) if isinstance(value, list) else value

    return {name: as_tuple(kwargs[name].tolist()) for name in names
            if isinstance(kwargs.get(name), torch.Tensor)}
