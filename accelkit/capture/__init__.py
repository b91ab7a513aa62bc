"""Graph capture: ``torch.export`` (non-strict) of a pipeline's denoiser into a :class:`DenoiserGraph`."""

from accelkit.capture.blocks import Block, BlockIndex, SpanBoundary
from accelkit.capture.graph import (
    DenoiserGraph,
    TensorSpec,
    capture,
    capture_cached,
    clone_graph_module,
    shape_signature,
)

__all__ = [
    "Block",
    "BlockIndex",
    "DenoiserGraph",
    "SpanBoundary",
    "TensorSpec",
    "capture",
    "capture_cached",
    "clone_graph_module",
    "shape_signature",
]
