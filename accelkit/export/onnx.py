"""Export a :class:`Program`'s graph variants to ONNX, checked against PyTorch with onnxruntime.

One model per graph variant (``full.onnx``, ``cached.onnx`` ...) through the dynamo-based
``torch.onnx.export`` (the TorchScript exporter fails on Flux's ``rms_norm``). Each model keeps the
variant's flat calling convention::

    inputs:  *user inputs (the denoiser's tensor kwargs), *state inputs, *scalar inputs
    outputs: out0 .. out{n-1} (the denoiser's flat outputs), *state outputs

State names are sanitized for ONNX (``"cache.r0@prev"`` -> ``"cache_r0_prev"``); ``manifest.json``
maps every ONNX name back to its state name and lists every file with its sha256, the opset, the
verification error and whether the batch dimension is dynamic. The directory is written to a
temporary sibling and renamed into place, so readers see the old export or the whole new one.

Custom ops (quantized matmuls, sparse attention ...) need an ONNX lowering: the one their op spec
declares (:mod:`accelkit.kernels.registry`) or one registered with :func:`register_onnx_lowering`
(:mod:`accelkit.export.lowerings` picks); a graph holding one without a lowering is refused before
anything is traced. Every built-in op package is imported when an export runs, so its spec exists.

Dynamic batch: a static capture writes the batch size into view/reshape/expand arguments, so the
variant is first rewritten to read it from a batch input (:func:`_symbolic_batch`), exported with a
dynamic ``batch`` dim, and checked in onnxruntime at batch 1 and batch + 1 against the matching rows of
the captured batch's PyTorch output. Where any of that fails the model is exported static and the
manifest records why (``dynamic_batch_note``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx

from accelkit._io import atomic_directory, atomic_write_json
from accelkit.capture.graph import clone_graph_module
from accelkit.export.complex_pairs import complex_as_real_pairs
from accelkit.export.lowerings import (
    LoweringError,
    OnnxExportError,
    finalize_model,
    onnx_lowerings,
    register_onnx_lowering,
    translation_table,
)
from accelkit.export.onnx_optimizer import optimize_model
from accelkit.export.operand_dtypes import cast_mixed_operands
from accelkit.kernels.registry import load_builtin_ops, op_call
from accelkit.passes.base import GraphVariant, Program

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = 1
DEFAULT_OPSET = 21
# ||ort - torch|| / ||torch|| allowed per output; low-precision outputs get the looser bound.
FP32_TOLERANCE = 1e-4
LOW_PRECISION_TOLERANCE = 1e-2
# Above this many bytes of weights a model is saved with external data (protobuf stops at 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30

logger = logging.getLogger(__name__)
aten = torch.ops.aten

__all__ = [
    "MANIFEST_NAME",
    "OnnxExportError",
    "export_program_onnx",
    "example_inputs",
    "onnx_lowerings",
    "onnxruntime_session_options",
    "read_manifest",
    "register_onnx_lowering",
    "sanitize_name",
    "to_numpy",
    "verify_files",
]


# ---------------------------------------------------------------- names and example inputs


def sanitize_name(name: str) -> str:
    """An ONNX-friendly value name: ``"cache.r0@prev"`` -> ``"cache_r0_prev"``."""
    cleaned = re.sub(r"[^0-9A-Za-z_]", "_", name)
    return cleaned if cleaned and not cleaned[0].isdigit() else f"_{cleaned}"


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise OnnxExportError(f"unknown dtype {name!r} in the graph's input specs")
    return value


def _embedding_bound(module: fx.GraphModule, placeholder: fx.Node, depth: int = 4) -> int | None:
    """Rows of the embedding table an integer input indexes (through a few ops), if any."""
    frontier, seen = [placeholder], set()
    for _ in range(depth):
        following = []
        for node in frontier:
            for user in node.users:
                if user in seen:
                    continue
                seen.add(user)
                if user.op == "call_function" and user.target is torch.ops.aten.embedding.default:
                    weight = user.args[0].meta.get("val") if isinstance(user.args[0], fx.Node) else None
                    if isinstance(weight, torch.Tensor):
                        return int(weight.shape[0])
                following.append(user)
        frontier = following
    return None


def example_inputs(program: Program, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random user inputs with the shapes/dtypes of ``program.graph.input_specs``.

    Integer inputs get values the model accepts: indices into an embedding table stay below its row
    count, masks are all ones, integer timesteps lie in ``[0, 1000)``, anything else is zero.
    """
    generator = torch.Generator().manual_seed(seed)
    module = program.graph.module
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    values: dict[str, torch.Tensor] = {}
    for index, (name, spec) in enumerate(
        zip(program.graph.input_names, program.graph.input_specs, strict=True)
    ):
        dtype = _dtype(spec.dtype)
        shape = tuple(spec.shape)
        if dtype.is_floating_point:
            value = torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)
        elif dtype == torch.bool:
            value = torch.ones(shape, dtype=torch.bool)
        else:
            lowered = name.lower()
            bound = _embedding_bound(module, placeholders[index]) if index < len(placeholders) else None
            if bound is not None:
                value = torch.randint(0, bound, shape, generator=generator)
            elif "mask" in lowered:
                value = torch.ones(shape, dtype=torch.int64)
            elif "timestep" in lowered:
                value = torch.randint(0, 1000, shape, generator=generator)
            else:
                value = torch.zeros(shape, dtype=torch.int64)
            value = value.to(dtype)
        values[name] = value
    return values


# ---------------------------------------------------------------- graph preparation


def _prepare_module(module: fx.GraphModule) -> fx.GraphModule:
    """A clone of ``module`` with ONNX-hostile no-ops removed (the caller's graph is untouched).

    ``aten.squeeze.dim`` on a dimension whose size is not 1 is a no-op in PyTorch, but onnxscript's
    lowering (0.7) emits an ONNX ``Squeeze`` that onnxruntime rejects at load time (PixArt's
    ``hidden_states.squeeze(1)`` after its caption projection). Mixed operand dtypes that PyTorch
    promotes but ONNX refuses get explicit casts (:mod:`accelkit.export.operand_dtypes`).
    """
    clone = clone_graph_module(module)
    graph = clone.graph
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (
            torch.ops.aten.squeeze.dim,
            torch.ops.aten.squeeze.dims,
        ):
            continue
        source = node.args[0]
        value = source.meta.get("val") if isinstance(source, fx.Node) else None
        if not isinstance(value, torch.Tensor):
            continue
        dims = node.args[1] if len(node.args) > 1 else ()
        dims = [dims] if isinstance(dims, int) else list(dims)
        rank = value.dim()
        keep = []
        for dim in dims:
            size = value.shape[dim % rank] if rank else 1
            if not isinstance(size, int) or size == 1:
                keep.append(dim)
        if len(keep) == len(dims):
            continue
        changed = True
        if not keep:
            node.replace_all_uses_with(source)
            graph.erase_node(node)
        else:
            node.target = torch.ops.aten.squeeze.dims
            node.args = (source, keep)
    changed = _bool_masked_fill_as_logic(graph) or changed
    changed = cast_mixed_operands(graph) or changed  # ONNX Einsum needs equal types: HiDream's rotary table
    if changed:
        graph.lint()
        clone.recompile()
    return clone


def _bool_masked_fill_as_logic(graph: fx.Graph) -> bool:
    """Rewrite ``masked_fill`` of a bool tensor with a constant as ``and``/``or``; True when any changed.

    It lowers to ONNX ``Where`` on bool operands, which onnxruntime's CPU provider does not implement
    (HunyuanVideo clears its text-padding mask with ``mask.masked_fill(pad, False)``).
    """
    aten = torch.ops.aten
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.masked_fill.Scalar:
            continue
        tensor, mask, fill = node.args[:3]
        value = tensor.meta.get("val") if isinstance(tensor, fx.Node) else None
        if not isinstance(value, torch.Tensor) or value.dtype != torch.bool or not isinstance(fill, bool | int):
            continue
        with graph.inserting_before(node):
            if fill:
                replacement = graph.call_function(aten.logical_or.default, (tensor, mask))
            else:
                keep = graph.call_function(aten.logical_not.default, (mask,))
                keep.meta = dict(mask.meta)
                replacement = graph.call_function(aten.logical_and.default, (tensor, keep))
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        changed = True
    return changed


# ---------------------------------------------------------------- export of one variant


def _carries_batch(args: tuple[torch.Tensor, ...], batch: int) -> list[bool]:
    """Which arguments carry the batch: dim 0 equal to the captured batch (0-d scalars never)."""
    return [value.dim() >= 1 and int(value.shape[0]) == batch for value in args]


def _batch_dynamic_shapes(carries: list[bool]) -> tuple[Any, ...]:
    """dim 0 marked dynamic for every argument that carries the batch."""
    dim = torch.export.Dim("batch", min=1, max=4096)
    return tuple({0: dim} if flag else None for flag in carries)


_BATCH_VIEW_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_BATCH_BROADCAST_OPS = (aten.expand.default,)


def _symbolic_batch(module: fx.GraphModule, carries: list[bool], batch: int) -> tuple[fx.GraphModule, int]:
    """A clone of ``module`` whose literal batch sizes read the batch input's size; returns (clone, count).

    A static capture writes ``x.shape[0]`` as the number it was (2 under CFG), so ``view(x, [2, ...])``
    pins a batch marked dynamic back to 2. The batch is dim 0 of the activations in every captured
    family, so the literal in position 0 of a view/reshape of a tensor computed from a batch input, or
    of an expand to the batch, becomes ``sym_size(batch input, 0)``; ``repeat_interleave`` loses its
    ``output_size`` hint (batch x repeats). A wrong guess does not go unnoticed:
    torch.export then specializes the batch (static fallback) or the cross-batch check disagrees.
    """
    clone = clone_graph_module(module)
    graph = clone.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    sources = [node for node, flag in zip(placeholders, carries, strict=False) if flag]
    if not sources:
        return clone, 0
    derived: set[fx.Node] = set(sources)
    size: fx.Node | None = None
    replaced = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if any(n in derived for n in node.all_input_nodes):
            derived.add(node)
            if node.target is aten.repeat_interleave.self_int and "output_size" in node.kwargs:
                # output_size (batch x repeats, as a literal) is only a hint; PixArt's mask sets it.
                node.kwargs = {k: v for k, v in node.kwargs.items() if k != "output_size"}
                replaced += 1
        if node.target not in _BATCH_VIEW_OPS + _BATCH_BROADCAST_OPS or len(node.args) < 2:
            continue
        source, shape = node.args[0], node.args[1]
        if not isinstance(shape, list | tuple) or not shape or type(shape[0]) is not int or shape[0] != batch:
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch:
            continue
        if node.target in _BATCH_VIEW_OPS and source not in derived:
            continue  # a weight reshaped to a size that happens to equal the batch
        if size is None:
            with graph.inserting_after(placeholders[-1]):
                size = graph.call_function(aten.sym_size.int, (sources[0], 0))
        node.args = (source, [size, *shape[1:]], *node.args[2:])
        replaced += 1
    if replaced:
        graph.lint()
        clone.recompile()
    return clone, replaced


class _DynamicBatchFailed(Exception):
    """The dynamic-batch attempt failed; the message says why (the static export follows)."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    head = lines[0] if lines else type(error).__name__
    # torch.export's constraint errors put the useful sentence on the second line.
    if len(lines) > 1 and "Constraints violated" in head:
        head = f"{head} {lines[1].lstrip('- ')}"
    # The ONNX exporter's conversion errors open with generic next steps; the op that failed follows
    # its "## Exception summary" heading ("<class ...DispatchError>: No ONNX function found for ...").
    if "## Exception summary" in lines[:-1]:
        summary = lines[lines.index("## Exception summary") + 1]
        head = f"{head.split('. ')[0]}: {summary.split('>: ', 1)[-1]}"
    return head[:400]


def _find_cause(
    error: BaseException, kind: type[BaseException] | tuple[type[BaseException], ...]
) -> BaseException | None:
    """The first ``kind`` in ``error``'s cause/context chain (the exporter wraps a lowering's own error)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _optimize(model: Any) -> None:
    """onnxscript's optimizer, keeping local functions and epsilons (accelkit/export/onnx_optimizer.py)."""
    optimize_model(model)


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress prints and routine warnings (errors still raise)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def _torch_export(
    module: fx.GraphModule, args: tuple[torch.Tensor, ...], dynamic_shapes: tuple[Any, ...] | None
) -> torch.export.ExportedProgram:
    """``torch.export`` the variant (a specialized dynamic dim raises here; torch.onnx.export would
    silently turn it into a constant)."""
    with _quiet(), torch.no_grad():
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)


# Compute dtypes whose rounding is a step function: the ONNX check uses the low-precision tolerance.
_EIGHT_BIT_COMPUTE = ("float8", "int8", "int4")


def _uses_eight_bit_compute(module: fx.GraphModule) -> bool:
    """Whether a custom op of ``module`` computes in 8 bits or fewer (its op spec's precision facts)."""
    for node in module.graph.nodes:
        registered = op_call(node)
        if registered is None or registered[0].precision.compute_dtype is None:
            continue
        spec, call = registered
        if spec.precision.compute_dtype(call) in _EIGHT_BIT_COMPUTE:
            return True
    return False


def _tolerance(expected: torch.Tensor, eight_bit: bool) -> float:
    if not expected.dtype.is_floating_point:
        return 0.0
    if eight_bit or expected.dtype not in (torch.float32, torch.float64):
        # FP8 rounding is a step function: float32 noise upstream (another summation order) moves a
        # few activations across a rounding boundary, one FP8 step each.
        return LOW_PRECISION_TOLERANCE
    return FP32_TOLERANCE


def _compare(
    path: Path,
    session: Any,
    input_names: list[str],
    output_names: list[str],
    args: tuple[torch.Tensor, ...],
    expected: tuple[torch.Tensor, ...],
    fp8_activations: bool,
    what: str,
) -> dict[str, float]:
    """Run ``session`` on ``args``; relative error per output, raise past the tolerance."""
    feeds = {n: to_numpy(a) for n, a in zip(input_names, args, strict=True)}
    outputs = session.run(output_names, feeds)
    errors: dict[str, float] = {}
    bad = {}
    for out_name, actual, want in zip(output_names, outputs, expected, strict=True):
        want_np = to_numpy(want)
        if tuple(actual.shape) != tuple(want_np.shape):
            raise OnnxExportError(
                f"{path.name}: output {out_name} has shape {list(actual.shape)} in onnxruntime, "
                f"{list(want_np.shape)} in PyTorch{what}"
            )
        errors[out_name] = _rel_error(actual, want_np)
        tolerance = _tolerance(want, fp8_activations)
        if not errors[out_name] <= tolerance:
            bad[out_name] = (errors[out_name], tolerance)
    if bad:
        detail = ", ".join(f"{k}: {v:.3g} > {t:g}" for k, (v, t) in bad.items())
        raise OnnxExportError(
            f"{path.name} disagrees with PyTorch in onnxruntime{what} (relative error {detail})"
        )
    return errors


def _rows(value: torch.Tensor, rows: list[int], batch: int) -> torch.Tensor:
    return value[rows] if value.dim() >= 1 and int(value.shape[0]) == batch else value


def _weights_bytes(module: torch.nn.Module) -> int:
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    return total + sum(b.numel() * b.element_size() for b in module.buffers())


def _rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    expected64 = expected.astype(np.float64)
    diff = float(np.linalg.norm(actual.astype(np.float64) - expected64))
    scale = float(np.linalg.norm(expected64))
    if scale == 0.0:
        return diff
    return diff / scale


def to_numpy(value: torch.Tensor) -> np.ndarray:
    """A numpy copy of ``value`` for onnxruntime (bfloat16 has no numpy dtype and is refused)."""
    if value.dtype == torch.bfloat16:
        raise OnnxExportError(
            "bfloat16 tensors cannot be fed to onnxruntime through numpy; use float16/float32"
        )
    return value.detach().cpu().contiguous().numpy()


def onnxruntime_session_options() -> Any:
    """``onnxruntime.SessionOptions`` that run an exported model as written.

    onnxruntime fuses an INT4 ``DequantizeLinear`` + ``MatMul`` into ``MatMulNBits``, which by default
    (accuracy level 4) quantizes the activations to int8 on the fly: about 1% relative error per
    W4A16 layer that the model does not contain. Level 1 keeps the fused matmul in float32.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return options


def _io_entry(name: str, role: str, value: torch.Tensor, dynamic: bool, source: str | None = None) -> dict:
    shape: list[Any] = [int(s) for s in value.shape]
    if dynamic and shape:
        shape[0] = "batch"
    entry = {"name": name, "role": role, "shape": shape, "dtype": str(value.dtype).removeprefix("torch.")}
    if source is not None:
        entry["source"] = source
    return entry


def _onnx_dim_is_symbolic(model_path: Path, input_name: str) -> bool:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    for value in model.graph.input:
        if value.name == input_name:
            dims = value.type.tensor_type.shape.dim
            return bool(dims) and dims[0].HasField("dim_param")
    return False


@dataclass(frozen=True, kw_only=True)
class _VariantCall:
    """One variant as the export sees it: example arguments, ONNX names, PyTorch reference outputs.

    Args:
        name: the variant name.
        module: the variant's graph, prepared for ONNX (:func:`_prepare_module`).
        args: example arguments in calling order (user, state, scalar inputs).
        sources: per argument, ``(role, state or scalar name or None)``.
        input_names: ONNX input names, one per argument.
        output_names: ONNX output names (user outputs, then state outputs).
        output_sources: per output, its state name (None for user outputs).
        reference: the PyTorch outputs on ``args``.
        batch: the captured batch (dim 0 of the first user input).
        eight_bit: a custom op computes in 8 bits or fewer (looser tolerance).
        external: the weights are saved as external data (past :data:`EXTERNAL_DATA_BYTES`).
    """

    name: str
    module: fx.GraphModule
    args: tuple[torch.Tensor, ...]
    sources: tuple[tuple[str, str | None], ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    output_sources: tuple[str | None, ...]
    reference: tuple[torch.Tensor, ...]
    batch: int
    eight_bit: bool
    external: bool

    @property
    def carries(self) -> list[bool]:
        return _carries_batch(self.args, self.batch)


def _onnx_names(graph: Any, variant: GraphVariant, name: str) -> tuple[list[str], list[str]]:
    """ONNX input and output names of a variant (state names sanitized, collisions refused/renamed)."""
    input_names = [
        *graph.input_names,
        *(sanitize_name(s) for s in variant.state_inputs),
        *(sanitize_name(s) for s in variant.scalar_inputs),
    ]
    if len(set(input_names)) != len(input_names):
        raise OnnxExportError(f"variant '{name}': input names collide after sanitizing: {input_names}")
    output_names = [f"out{i}" for i in range(graph.num_user_outputs)]
    for state in variant.state_outputs:
        candidate = sanitize_name(state)
        # A variant that reads and writes the same state needs two ONNX names for it.
        if candidate in input_names or candidate in output_names:
            candidate = f"{candidate}_out"
        output_names.append(candidate)
    return input_names, output_names


def _variant_call(
    name: str,
    variant: GraphVariant,
    program: Program,
    user_inputs: dict[str, torch.Tensor],
    states: dict[str, torch.Tensor],
    scalars: dict[str, torch.Tensor],
) -> _VariantCall:
    """Bind a variant's example arguments and run it once in PyTorch for the reference outputs."""
    graph = program.graph
    missing = [s for s in variant.state_inputs if s not in states]
    if missing:
        raise OnnxExportError(f"variant '{name}' reads state {missing} that no exported variant writes")
    args = tuple(
        [user_inputs[n] for n in graph.input_names]
        + [states[s] for s in variant.state_inputs]
        + [scalars[s] for s in variant.scalar_inputs]
    )
    sources = (
        [("user", None)] * len(graph.input_names)
        + [("state", s) for s in variant.state_inputs]
        + [("scalar", s) for s in variant.scalar_inputs]
    )
    with torch.no_grad():
        reference = tuple(variant.module(*args))
    num_user = graph.num_user_outputs
    if len(reference) != num_user + len(variant.state_outputs):
        raise OnnxExportError(
            f"variant '{name}' returns {len(reference)} outputs, expected {num_user} user + "
            f"{len(variant.state_outputs)} state outputs"
        )
    input_names, output_names = _onnx_names(graph, variant, name)
    first = args[0] if graph.input_names else None
    module = complex_as_real_pairs(_prepare_module(variant.module))
    return _VariantCall(
        name=name,
        module=module,
        args=args,
        sources=tuple(sources),
        input_names=tuple(input_names),
        output_names=tuple(output_names),
        output_sources=(None,) * num_user + tuple(variant.state_outputs),
        reference=reference,
        batch=int(first.shape[0]) if first is not None and first.dim() >= 1 else 1,
        eight_bit=_uses_eight_bit_compute(module),
        external=_weights_bytes(variant.module) > EXTERNAL_DATA_BYTES,
    )


@dataclass(frozen=True, kw_only=True)
class _OnnxWriter:
    """Converts a ``torch.export``-ed variant to ``path``: lowerings, finalizers, optimizer, save, checker.

    Args:
        call: the variant.
        path: the ``.onnx`` file to write.
        table: the custom-op lowerings (:func:`accelkit.export.lowerings.translation_table`).
        opset: the requested opset.
        optimize: run onnxscript's optimizer.
        external: save the weights as external data.
    """

    call: _VariantCall
    path: Path
    table: dict[Any, Any]
    opset: int
    optimize: bool
    external: bool

    def write(self, exported: torch.export.ExportedProgram) -> dict[str, Any]:
        """Write and check the model; returns the op finalizers' stats for the manifest."""
        import onnx

        try:
            with _quiet():
                onnx_program = torch.onnx.export(
                    exported,
                    self.call.args,
                    dynamo=True,
                    input_names=list(self.call.input_names),
                    output_names=list(self.call.output_names),
                    opset_version=self.opset,
                    custom_translation_table=self.table or None,
                    # Optimized below, after the lowerings' constants are in place and without
                    # inlining the accelkit local functions (a TensorRT build swaps them for plugins).
                    optimize=False,
                    verbose=False,
                )
        except Exception as error:  # noqa: BLE001
            cause = _find_cause(error, (OnnxExportError, LoweringError))
            if isinstance(cause, OnnxExportError):
                raise cause from error
            if cause is not None:
                raise OnnxExportError(str(cause)) from error
            raise OnnxExportError(
                f"ONNX conversion of variant '{self.call.name}' failed: {_first_line(error)}"
            ) from error
        stats = finalize_model(onnx_program.model)
        if self.optimize:
            _optimize(onnx_program.model)
        with _quiet():
            onnx_program.save(str(self.path), external_data=self.external)
        # The path form of the checker handles models with external data beyond 2 GiB.
        try:
            onnx.checker.check_model(str(self.path))
        except Exception as error:  # noqa: BLE001
            raise OnnxExportError(f"{self.path.name} fails the ONNX checker: {_first_line(error)}") from error
        return stats

    def session(self) -> Any:
        """An onnxruntime CPU session of the written model; a model it refuses to load is an export error."""
        import onnxruntime as ort

        try:
            return ort.InferenceSession(
                str(self.path), sess_options=onnxruntime_session_options(), providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own pybind Fail/InvalidGraph types
            reason = _first_line(error).replace(f"{self.path}", self.path.name)
            raise OnnxExportError(
                f"onnxruntime refuses the exported model of variant '{self.call.name}': {reason}"
            ) from error

    def compare(self, session: Any, rows: list[int] | None = None) -> dict[str, float]:
        """Relative error per output on the example arguments (only ``rows`` of the batch when given)."""
        call = self.call
        args, expected, what = call.args, call.reference, ""
        if rows is not None:
            args = tuple(_rows(a, rows, call.batch) for a in args)
            expected = tuple(_rows(r, rows, call.batch) for r in expected)
            what = f" at batch {len(rows)}"
        return _compare(
            self.path, session, list(call.input_names), list(call.output_names), args, expected,
            call.eight_bit, what,
        )  # fmt: skip


def _export_dynamic_batch(writer: _OnnxWriter, verify: bool) -> dict[str, Any]:
    """Export with a dynamic batch and check batch 1 and batch + 1; raises :class:`_DynamicBatchFailed`."""
    call = writer.call
    dynamic_module, _ = _symbolic_batch(call.module, call.carries, call.batch)
    try:
        exported = _torch_export(dynamic_module, call.args, _batch_dynamic_shapes(call.carries))
    except Exception as error:  # noqa: BLE001 - any failure means: fall back to a static batch
        raise _DynamicBatchFailed(f"dynamic batch export failed: {_first_line(error)}") from error
    stats = writer.write(exported)
    if call.input_names and not _onnx_dim_is_symbolic(writer.path, call.input_names[0]):
        raise _DynamicBatchFailed("the exporter kept the batch dimension static")
    if verify:
        # Denoiser rows are independent: batch 1 and batch + 1 (row 0 repeated) must give the
        # matching rows of the captured batch's output; a misplaced batch size would not.
        try:
            session = writer.session()
            for rows in ([0], [*range(call.batch), 0]):
                writer.compare(session, rows)
        except OnnxExportError as error:
            raise _DynamicBatchFailed(str(error)) from error
    return stats


def _export_static_batch(writer: _OnnxWriter) -> dict[str, Any]:
    call = writer.call
    try:
        exported = _torch_export(call.module, call.args, None)
    except Exception as error:  # noqa: BLE001
        raise OnnxExportError(f"torch.export of the graph variant failed: {_first_line(error)}") from error
    return writer.write(exported)


def _io_entries(call: _VariantCall, dynamic: bool) -> tuple[list[dict], list[dict]]:
    """Manifest ``inputs`` and ``outputs`` of a variant (``"batch"`` where dim 0 is dynamic)."""

    def batched(value: torch.Tensor) -> bool:
        return dynamic and value.dim() >= 1 and int(value.shape[0]) == call.batch

    inputs = [
        _io_entry(onnx_name, role, value, role != "scalar" and batched(value), source)
        for onnx_name, (role, source), value in zip(call.input_names, call.sources, call.args, strict=True)
    ]
    outputs = [
        _io_entry(onnx_name, "user" if source is None else "state", value, batched(value), source)
        for onnx_name, source, value in zip(call.output_names, call.output_sources, call.reference, strict=True)
    ]
    return inputs, outputs


def _export_variant(
    call: _VariantCall, directory: Path, *, opset: int, dynamic_batch: bool, verify: bool, optimize: bool
) -> dict[str, Any]:
    """Export, check and describe one variant; returns its manifest entry."""
    import onnx

    name = call.name
    writer = _OnnxWriter(
        call=call, path=directory / f"{name}.onnx", table=translation_table(call.module), opset=opset,
        optimize=optimize, external=call.external,
    )  # fmt: skip
    started = time.perf_counter()
    dynamic, fallback_reason, stats = False, None, {}
    if dynamic_batch and any(call.carries):
        try:
            stats, dynamic = _export_dynamic_batch(writer, verify), True
        except _DynamicBatchFailed as failure:
            fallback_reason = f"{failure}; exported with the captured batch {call.batch} instead"
            logger.warning("ONNX export of variant '%s': %s", name, fallback_reason)
    if not dynamic:
        stats = _export_static_batch(writer)
    export_seconds = time.perf_counter() - started
    model = onnx.load(str(writer.path), load_external_data=False)
    actual_opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    errors = writer.compare(writer.session()) if verify else {}
    inputs, outputs = _io_entries(call, dynamic)
    entry = {
        "variant": name,
        "file": writer.path.name,
        "opset": int(actual_opset),
        "inputs": inputs,
        "outputs": outputs,
        "dynamic_batch": bool(dynamic),
        "dynamic_batch_note": fallback_reason,
        "optimized": bool(optimize),
        **stats,
        "external_data": bool(call.external),
        "verification": _verification_entry(call, errors, dynamic) if verify else None,
        "export_seconds": round(export_seconds, 3),
    }
    return entry


def _verification_entry(call: _VariantCall, errors: dict[str, float], dynamic: bool) -> dict[str, Any]:
    """How onnxruntime's outputs compared with PyTorch's, for the manifest."""
    return {
        "provider": "CPUExecutionProvider",
        "relative_error": errors,
        "max_relative_error": max(errors.values(), default=0.0),
        "tolerance": max((_tolerance(r, call.eight_bit) for r in call.reference), default=0.0),
        "checked_batches": sorted({call.batch, 1, call.batch + 1}) if dynamic else [call.batch],
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _program_meta(program: Program) -> dict[str, Any]:
    """What a runner needs to replay the schedule without the PyTorch program."""
    graph = program.graph
    return {
        "family": graph.family,
        "input_names": list(graph.input_names),
        "input_specs": [s.to_dict() for s in graph.input_specs],
        "num_user_outputs": graph.num_user_outputs,
        "schedule": list(program.schedule),
        "step_scalars": {k: [float(v) for v in values] for k, values in program.step_scalars.items()},
        "variants": {
            name: {
                "state_inputs": list(v.state_inputs),
                "state_outputs": list(v.state_outputs),
                "scalar_inputs": list(v.scalar_inputs),
            }
            for name, v in program.variants.items()
        },
        "applied": list(program.applied),
    }


def _variant_order(program: Program) -> list[str]:
    """Variants in an order where every state read was written by an earlier one ("full" first)."""
    names = ["full", *sorted(n for n in program.variants if n != "full")]
    ordered: list[str] = []
    written: set[str] = set()
    pending = list(names)
    while pending:
        for name in pending:
            needs = {s.removesuffix("@prev") for s in program.variants[name].state_inputs}
            if needs <= written:
                ordered.append(name)
                written.update(program.variants[name].state_outputs)
                pending.remove(name)
                break
        else:
            raise OnnxExportError(f"variants {pending} read state that no variant writes")
    return ordered


def export_program_onnx(
    program: Program,
    directory: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    inputs: Mapping[str, torch.Tensor] | None = None,
    variants: tuple[str, ...] | None = None,
    verify: bool = True,
    optimize: bool = True,
) -> dict[str, Any]:
    """Export every graph variant of ``program`` to ``directory/<variant>.onnx`` and verify it.

    Args:
        program: the program to export (not mutated).
        directory: the output folder; replaced atomically (a failure leaves an old export intact).
        opset: the ONNX opset requested from the exporter.
        dynamic_batch: make dim 0 of batch-carrying inputs dynamic (checked at batch 1 and batch + 1
            when ``verify``); where that fails, the model is exported static and the manifest says
            so (``dynamic_batch: false`` with ``dynamic_batch_note``).
        inputs: example user inputs by name (default: random tensors from ``program.graph.input_specs``
            with valid integer values, see :func:`example_inputs`).
        variants: the variants to export (default: all).
        verify: run each model in onnxruntime (CPU) and compare with PyTorch; the relative error
            ``||ort - torch|| / ||torch||`` of every float32 output must stay below 1e-4 (1e-2 for
            16-bit outputs and for graphs with FP8 activation quantization).
        optimize: run onnxscript's graph optimizer (constant folding, fusions) on each model; about
            half the export time on small models.

    Returns:
        The manifest (also written as ``manifest.json``): the files with their sha256, and per
        variant its inputs/outputs with shapes and dtypes, opset, verification error and batch mode.

    Raises:
        OnnxExportError: a custom op has no lowering, export failed, the checker refused the model,
            or onnxruntime disagrees with PyTorch.
    """
    program.validate()
    directory = Path(directory)
    user_inputs, device = _inputs_on_device(program, inputs)
    order = _variant_order(program)
    selected = _selected_variants(program, order, variants)
    scalars = _verification_scalars(program, device)

    states: dict[str, torch.Tensor] = {}
    files: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    with atomic_directory(directory) as tmp:
        for name in order:
            variant = program.variants[name]
            if name not in selected:
                if variant.state_outputs and not set(variant.state_outputs) <= set(states):
                    _record_states(program, variant, user_inputs, states, scalars)
                continue
            call = _variant_call(name, variant, program, user_inputs, states, scalars)
            entry = _export_variant(
                call, tmp, opset=opset, dynamic_batch=dynamic_batch, verify=verify, optimize=optimize
            )
            num_user = program.graph.num_user_outputs
            for state, value in zip(variant.state_outputs, call.reference[num_user:], strict=True):
                _store_state(states, state, value)
            models.append(entry)
        for path in sorted(p for p in tmp.iterdir() if p.is_file()):
            files.append({"path": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path)})
        manifest = _manifest(program, models, files, opset=opset, dynamic_batch=dynamic_batch)
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
    return manifest


def _inputs_on_device(
    program: Program, inputs: Mapping[str, torch.Tensor] | None
) -> tuple[dict[str, torch.Tensor], torch.device]:
    """The example user inputs (given or random), on the device of the program's weights."""
    user_inputs = dict(inputs) if inputs is not None else example_inputs(program)
    # Example tensors go where the weights are (a program captured on GPU is exported from GPU).
    device = next(iter(program.graph.module.parameters()), torch.empty(0)).device
    user_inputs = {k: v.to(device) for k, v in user_inputs.items()}
    missing = [n for n in program.graph.input_names if n not in user_inputs]
    if missing:
        raise OnnxExportError(f"example inputs lack {missing}")
    return user_inputs, device


def _selected_variants(program: Program, order: list[str], variants: tuple[str, ...] | None) -> list[str]:
    """The variants to export, in ``order``; unknown names and custom ops without a lowering are refused."""
    selected = order if variants is None else [n for n in order if n in variants]
    unknown = sorted(set(variants or ()) - set(program.variants))
    if unknown:
        raise OnnxExportError(f"program has no variant(s) {unknown}; it has {sorted(program.variants)}")
    # Refuse unknown custom ops up front, before any (slow) tracing.
    load_builtin_ops()
    for name in selected:
        translation_table(program.variants[name].module)
    return selected


def _verification_scalars(program: Program, device: torch.device) -> dict[str, torch.Tensor]:
    """A value per scalar input of the variants: fed non-zero so the Taylor term is exercised by the verification."""
    scalars = {}
    for variant in program.variants.values():
        for scalar in variant.scalar_inputs:
            values = [abs(v) for v in program.step_scalars.get(scalar, ())]
            scalars[scalar] = torch.tensor(
                max(values, default=0.0) or 0.5, dtype=torch.float32, device=device
            )
    return scalars


def _manifest(
    program: Program, models: list[dict[str, Any]], files: list[dict[str, Any]], *, opset: int, dynamic_batch: bool
) -> dict[str, Any]:
    return {
        "schema": MANIFEST_SCHEMA,
        "format": "onnx",
        "exporter": "torch.onnx.export(dynamo=True)",
        "versions": _versions(),
        "opset": opset,
        "dynamic_batch_requested": dynamic_batch,
        "dynamic_batch": bool(models) and all(m["dynamic_batch"] for m in models),
        "program": _program_meta(program),
        "models": models,
        "files": files,
    }


def _store_state(states: dict[str, torch.Tensor], state: str, value: torch.Tensor) -> None:
    # '@prev' readers are fed a different tensor than the last value so the verification sees a
    # non-zero difference (with equal tensors a Taylor term would vanish).
    states[state] = value
    states[f"{state}@prev"] = value * 0.5


def _record_states(program, variant, user_inputs, states, scalars) -> None:
    args = [user_inputs[n] for n in program.graph.input_names]
    args += [states[s] for s in variant.state_inputs] + [scalars[s] for s in variant.scalar_inputs]
    with torch.no_grad():
        outputs = variant.module(*args)
    for state, value in zip(variant.state_outputs, outputs[program.graph.num_user_outputs :], strict=True):
        _store_state(states, state, value)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Parse ``directory/manifest.json``."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise OnnxExportError(f"'{directory}' holds no {MANIFEST_NAME}: run the ONNX export first")
    return json.loads(path.read_text())


def verify_files(directory: str | Path, manifest: Mapping[str, Any] | None = None) -> None:
    """Raise when a file listed in the manifest is missing or its sha256 differs."""
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    for item in manifest["files"]:
        path = directory / item["path"]
        if not path.is_file():
            raise OnnxExportError(f"{path} is listed in the manifest but missing")
        if _sha256(path) != item["sha256"]:
            raise OnnxExportError(f"{path} does not match the sha256 in the manifest: export again")
