"""Build TensorRT engines from a program's ONNX export: one strongly typed engine per graph variant.

The input is the folder :func:`accelkit.export.onnx.export_program_onnx` wrote (its ``manifest.json``
names every variant's inputs, outputs, roles and whether the batch is dynamic); the output is an
``engines/`` folder with ``<variant>.engine`` files and an engine ``manifest.json`` that lists every
file with its sha256, the variant it runs, its optimization profile, its precision, the TensorRT
version and the compute capability it was built for (engines run only there), plus the program
section the runner replays the schedule from.

Everything up to the builder call is plain Python over the ONNX files and is tested on CPU:
optimization profiles from the manifest shapes, precision read from the ONNX types, the refit
weight map (ONNX initializer -> plan weight name), the rewrite of the ONNX local functions that a
registered op's TensorRT plugin replaces (:class:`accelkit.kernels.registry.TensorRTPlugin`) into
plugin nodes, and the manifest. The code that touches ``tensorrt`` lives in
:class:`TensorRTToolchain` and a few small functions; tests substitute a fake toolchain.

Precision in strongly typed networks: TensorRT infers every tensor's type from the network's inputs
and its Cast / QuantizeLinear / DequantizeLinear nodes, and refuses the fp16/bf16/fp8 builder flags.
A bf16 or fp16 plan is therefore an ONNX export in that dtype, and FP8 means FP8 Q/DQ pairs in the
ONNX (what the quant pass's ``w4a8`` lowering emits); the builder only checks that the ONNX holds
what the plan promises and that the GPU has FP8 tensor cores (compute capability >= 8.9).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelkit._io import atomic_directory, atomic_write_bytes, atomic_write_json
from accelkit.errors import InputError, PlanMismatchError
from accelkit.kernels.registry import TensorRTPlugin, load_builtin_ops

ENGINE_MANIFEST_NAME = "manifest.json"
ENGINE_MANIFEST_SCHEMA = 1
ENGINE_SUFFIX = ".engine"
# Python plugins with ahead-of-time kernels (tensorrt.plugin.aot_impl) arrived in 10.9.
MIN_TENSORRT = (10, 9)
INSTALL_HINT = "install accelkit[tensorrt] on a machine with an NVIDIA GPU (TensorRT >= 10.9)"

# FP8 tensor cores: Ada (8.9) and Hopper (9.0) onwards.
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)

REFIT_MODES = ("none", "refit", "refit_identical")

logger = logging.getLogger(__name__)

__all__ = [
    "ENGINE_MANIFEST_NAME",
    "INSTALL_HINT",
    "TensorRTBuildConfig",
    "TensorRTExportError",
    "TensorRTToolchain",
    "TensorRTUnavailableError",
    "build_engines",
    "check_plugin_node",
    "plugin_specs",
    "optimization_profile",
    "onnx_precision",
    "plan_precision",
    "plan_weight_names",
    "read_engine_manifest",
    "refit_weight_map",
    "register_tensorrt_plugins",
    "require_tensorrt",
    "rewrite_plugin_calls",
    "verify_engine_files",
]


class TensorRTExportError(InputError):
    """Engines could not be built from the ONNX export, or an engine folder does not check out."""


class TensorRTUnavailableError(InputError):
    """TensorRT is not installed (or too old) where engines are to be built or run."""


def require_tensorrt() -> Any:
    """Import ``tensorrt`` or raise one line saying how to get it.

    Returns:
        The ``tensorrt`` module.

    Raises:
        TensorRTUnavailableError: not importable, or older than 10.9.
    """
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailableError(f"TensorRT is not installed: {INSTALL_HINT}") from None
    version = _version_tuple(getattr(trt, "__version__", "0"))
    if version < MIN_TENSORRT:
        raise TensorRTUnavailableError(f"TensorRT {trt.__version__} is too old: {INSTALL_HINT}")
    return trt


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in str(text).split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


# ---------------------------------------------------------------- build settings


@dataclass(frozen=True, kw_only=True)
class TensorRTBuildConfig:
    """How engines are built.

    Args:
        version: schema version of this config.
        min_batch: smallest batch a dynamic-batch engine accepts (1: a single CFG branch or no CFG).
        opt_batch: batch the kernels are tuned for; None takes the batch the plan was captured with
            (the CFG batch).
        max_batch: largest batch; None takes the captured batch.
        refit: ``"refit"`` (weights replaceable, BuilderFlag.REFIT), ``"refit_identical"`` (the
            engine may be stripped and refilled with the very same weights; optimizations stay on),
            or ``"none"``.
        strip_weights: with ``refit_identical``, write weight-stripped engines (BuilderFlag.STRIP_PLAN)
            that are refilled from the ONNX initializers after loading.
        workspace_bytes: the builder's workspace pool limit; None leaves TensorRT's default.
        optimization_level: the builder optimization level (0-5; 3 is TensorRT's default).
    """

    version: int = 1
    min_batch: int = 1
    opt_batch: int | None = None
    max_batch: int | None = None
    refit: str = "refit"
    strip_weights: bool = False
    workspace_bytes: int | None = None
    optimization_level: int = 3

    def __post_init__(self) -> None:
        if self.refit not in REFIT_MODES:
            raise InputError(f"TensorRTBuildConfig.refit must be one of {REFIT_MODES}, got {self.refit!r}")
        if self.strip_weights and self.refit != "refit_identical":
            raise InputError("TensorRTBuildConfig.strip_weights needs refit='refit_identical'")
        if self.min_batch < 1:
            raise InputError(f"TensorRTBuildConfig.min_batch must be at least 1, got {self.min_batch}")
        if not 0 <= self.optimization_level <= 5:
            raise InputError(
                f"TensorRTBuildConfig.optimization_level must lie in [0, 5], got {self.optimization_level}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorRTBuildConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"TensorRTBuildConfig: unknown field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**dict(data))


# ---------------------------------------------------------------- optimization profiles


def _captured_batch(program_meta: Mapping[str, Any]) -> int | None:
    specs = program_meta.get("input_specs") or []
    for spec in specs:
        shape = spec.get("shape") or []
        if shape:
            return int(shape[0])
    return None


def optimization_profile(
    entry: Mapping[str, Any], program_meta: Mapping[str, Any], config: TensorRTBuildConfig
) -> dict[str, dict[str, list[int]]]:
    """The optimization profile of one variant: per ONNX input, its min / opt / max shape.

    Dimensions the ONNX export left symbolic (``"batch"`` in the manifest) range over
    ``config.min_batch .. max_batch`` and are tuned for ``opt_batch``; the defaults take the batch the
    plan was captured with (the CFG batch) as opt and max. Every other dimension is fixed.

    Args:
        entry: the variant's entry in the ONNX manifest's ``models``.
        program_meta: the manifest's ``program`` section (its input specs give the captured batch).
        config: the build settings.

    Returns:
        ``{input name: {"min": [...], "opt": [...], "max": [...]}}`` in input order.
    """
    captured = _captured_batch(program_meta) or 1
    low = config.min_batch
    opt = config.opt_batch if config.opt_batch is not None else captured
    high = config.max_batch if config.max_batch is not None else max(captured, opt)
    if not low <= opt <= high:
        raise InputError(f"batch range must satisfy min <= opt <= max, got {low} / {opt} / {high}")
    profile: dict[str, dict[str, list[int]]] = {}
    for item in entry["inputs"]:
        shapes: dict[str, list[int]] = {"min": [], "opt": [], "max": []}
        for dim in item["shape"]:
            if isinstance(dim, int):
                for key in shapes:
                    shapes[key].append(dim)
            elif dim == "batch":
                shapes["min"].append(low)
                shapes["opt"].append(opt)
                shapes["max"].append(high)
            else:
                raise TensorRTExportError(
                    f"input {item['name']} of {entry['file']} has a symbolic dimension {dim!r} the manifest "
                    "does not describe: export the ONNX again with a static or batch-only dynamic shape"
                )
        profile[item["name"]] = shapes
    return profile


# ---------------------------------------------------------------- precision


_FLOAT_TYPES = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64"}
_FP8_TYPES = {17: "float8e4m3fn", 18: "float8e4m3fnuz", 19: "float8e5m2", 20: "float8e5m2fnuz"}
_INT4_TYPES = {21: "uint4", 22: "int4"}


def _all_nodes(model: Any) -> Iterable[Any]:
    yield from model.graph.node
    for function in model.functions:
        yield from function.node


def onnx_precision(model: Any) -> dict[str, Any]:
    """What a strongly typed engine of ``model`` will compute in, read from the ONNX types.

    Args:
        model: an ``onnx.ModelProto`` (external data need not be loaded: only types are read).

    Returns:
        ``{"inputs": float dtype of the float graph inputs, "weights": sorted float initializer dtypes,
        "fp8": True when FP8 Q/DQ (or FP8 casts) are present, "int4_weights": True when INT4
        initializers are dequantized, "label": a short summary such as "bf16+fp8"}``.
    """
    elem_names = {**_FLOAT_TYPES, **_FP8_TYPES, **_INT4_TYPES}
    input_types = sorted(
        {
            _FLOAT_TYPES[v.type.tensor_type.elem_type]
            for v in model.graph.input
            if v.type.tensor_type.elem_type in _FLOAT_TYPES
        }
    )
    initializer_types = {elem_names.get(t.data_type) for t in model.graph.initializer}
    fp8 = any(t in _FP8_TYPES.values() for t in initializer_types)
    int4 = any(t in _INT4_TYPES.values() for t in initializer_types)
    for node in _all_nodes(model):
        if node.op_type == "Cast":
            for attribute in node.attribute:
                if attribute.name == "to" and attribute.i in _FP8_TYPES:
                    fp8 = True
        if node.op_type == "QuantizeLinear":
            for attribute in node.attribute:
                if attribute.name == "output_dtype" and attribute.i in _FP8_TYPES:
                    fp8 = True
    # A lowering may mark INT4 weights with a node of its own (its op spec's precision facts).
    int4_nodes = {n for spec in load_builtin_ops().values() for n in spec.precision.int4_weight_nodes}
    int4 = int4 or any((n.domain, n.op_type) in int4_nodes for n in model.graph.node)
    weights = sorted(t for t in initializer_types if t in _FLOAT_TYPES.values())
    base = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
    compute = [base[t] for t in input_types if t in base] or [base[t] for t in weights if t in base]
    label = "+".join([*dict.fromkeys(compute or ["fp32"]), *(["fp8"] if fp8 else []), *(["int4w"] if int4 else [])])
    return {"inputs": input_types, "weights": weights, "fp8": fp8, "int4_weights": int4, "label": label}


def plan_precision(plan_data: Mapping[str, Any] | None) -> dict[str, Any]:
    """What the plan promises about precision: the claims of its passes' ``precision`` hooks.

    Args:
        plan_data: the parsed ``plan.json`` (None: nothing is promised).

    Returns:
        ``{"fp8": bool, "int4_weights": bool, "reason": str | None}``.
    """
    from accelkit.passes.base import registered_passes

    passes = registered_passes()
    claims = []
    for name, resolved in (((plan_data or {}).get("passes")) or {}).items():
        hook = passes[name].hooks.precision if name in passes else None
        claim = hook(resolved or {}) if hook is not None and resolved else None
        if claim is not None:
            claims.append(claim)
    reasons = [c.reason for c in claims if c.reason]
    return {
        "fp8": any(c.fp8 for c in claims),
        "int4_weights": any(c.int4_weights for c in claims),
        "reason": "; ".join(reasons) if reasons else None,
    }


def check_precision(
    file: str, found: Mapping[str, Any], promised: Mapping[str, Any], compute_capability: str | None
) -> None:
    """Refuse an ONNX model that lacks what the plan promised, or FP8 on a GPU without FP8 tensor cores."""
    if promised.get("fp8") and not found.get("fp8"):
        raise TensorRTExportError(
            f"the plan quantized activations to FP8 ({promised.get('reason')}) but {file} holds no FP8 "
            "QuantizeLinear/DequantizeLinear: export the ONNX again with this accelkit version's FP8 lowering"
        )
    if found.get("fp8") and compute_capability:
        major, minor = (_version_tuple(compute_capability) + (0, 0))[:2]
        if (major, minor) < FP8_MIN_COMPUTE_CAPABILITY:
            raise TensorRTExportError(
                f"{file} computes in FP8, which needs compute capability >= 8.9 (this GPU has "
                f"{compute_capability}): build on an Ada or Hopper GPU, or use a plan without FP8"
            )


# ---------------------------------------------------------------- refit weight map


def plan_weight_names(program: Any) -> dict[str, str]:
    """Graph attribute name -> plan weight name, over every variant of ``program``.

    A plain parameter or buffer keeps its name (the denoiser's ``state_dict`` key, which the ONNX
    exporter also gives the initializer); a tensor a pass made (quantized weights) is named by its
    key in ``program.new_weights`` (``quant.<layer>.<tensor>``, saved in ``weights.safetensors``).
    """
    by_storage: dict[tuple[int, tuple[int, ...]], str] = {}
    for key, tensor in program.new_weights.items():
        if tensor.numel():
            by_storage[(tensor.data_ptr(), tuple(tensor.shape))] = key
    names: dict[str, str] = {}
    for variant in program.variants.values():
        module = variant.module
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            key = (tensor.data_ptr(), tuple(tensor.shape)) if tensor.numel() else None
            names.setdefault(name, by_storage.get(key, name) if key else name)
    return names


def refit_weight_map(model: Any, weight_names: Mapping[str, str] | Iterable[str]) -> dict[str, Any]:
    """Map the ONNX initializers of ``model`` to plan weight names, for refitting the engine.

    TensorRT's ONNX parser names engine weights after the ONNX initializers, so a refit sets
    ``Refitter.set_named_weights(initializer, tensor of the plan weight)``.

    Args:
        model: an ``onnx.ModelProto``.
        weight_names: graph attribute name -> plan weight name (:func:`plan_weight_names`), or just
            the plan's weight names when they are the attribute names.

    Returns:
        ``{"weights": {initializer: plan weight name}, "derived": [initializers no plan weight names:
        constants the exporter folded or created, which a refit cannot reach by name]}``.
    """
    if not isinstance(weight_names, Mapping):
        weight_names = {name: name for name in weight_names}
    weights: dict[str, str] = {}
    derived: list[str] = []
    for initializer in model.graph.initializer:
        target = weight_names.get(initializer.name)
        if target is None:
            derived.append(initializer.name)
        else:
            weights[initializer.name] = target
    return {"weights": weights, "derived": derived}


# ---------------------------------------------------------------- plugins of registered ops


def plugin_specs() -> dict[str, TensorRTPlugin]:
    """The TensorRT plugins of the registered ops (every built-in op imported), by plugin id."""
    return {spec.tensorrt.plugin_id: spec.tensorrt for spec in load_builtin_ops().values() if spec.tensorrt}


def check_plugin_node(node: Any, plugin: TensorRTPlugin) -> None:
    """Refuse a plugin node whose attributes the plugin cannot build, before TensorRT is touched."""
    import onnx

    if plugin.check_attributes is None:
        return
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    reason = plugin.check_attributes(attributes)
    if reason:
        raise TensorRTExportError(f"{plugin.name} node '{node.name or node.output[0]}' {reason}")


def _rewrite_plugin_calls(model: Any) -> tuple[Any, dict[str, int]]:
    """:func:`rewrite_plugin_calls` with the count per plugin id (plugins with no call left out)."""
    import onnx

    plugins = {p.onnx_function: p for p in plugin_specs().values()}
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    counts: dict[str, int] = {}
    for node in rewritten.graph.node:
        plugin = plugins.get((node.domain, node.op_type))
        if plugin is None:
            continue
        node.op_type = plugin.name
        node.domain = ""
        kept = [a for a in node.attribute if a.name not in ("plugin_namespace", "plugin_version")]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.append(onnx.helper.make_attribute("plugin_namespace", plugin.namespace))
        node.attribute.append(onnx.helper.make_attribute("plugin_version", plugin.version))
        counts[plugin.plugin_id] = counts.get(plugin.plugin_id, 0) + 1
    if counts:
        replaced = {p.onnx_function for p in plugins.values() if p.plugin_id in counts}
        functions = [f for f in rewritten.functions if (f.domain, f.name) not in replaced]
        del rewritten.functions[:]
        rewritten.functions.extend(functions)
    return rewritten, counts


def rewrite_plugin_calls(model: Any) -> tuple[Any, int]:
    """A copy of ``model`` where calls of a registered op's ONNX local function are plugin nodes.

    TensorRT's ONNX parser may inline a local function instead of looking for a plugin; a node whose
    ``op_type`` is the plugin name with ``plugin_namespace`` / ``plugin_version`` attributes is
    unambiguous. The replaced functions are dropped (the copy is only for the parser).

    Returns:
        ``(model copy, number of rewritten nodes)``.
    """
    rewritten, counts = _rewrite_plugin_calls(model)
    return rewritten, sum(counts.values())


def _check_plugin_nodes(file: str, model: Any, counts: Mapping[str, int]) -> None:
    """Refuse plugins that cannot be built here (a missing compiler) or nodes they cannot build."""
    plugins = plugin_specs()
    by_name = {plugins[plugin_id].name: plugins[plugin_id] for plugin_id in counts}
    for plugin in by_name.values():
        reason = plugin.unavailable() if plugin.unavailable is not None else None
        if reason:
            raise TensorRTExportError(f"{file}: {reason}")
    for node in model.graph.node:
        if node.op_type in by_name and node.domain == "":
            check_plugin_node(node, by_name[node.op_type])


_PLUGINS_REGISTERED = False


def register_tensorrt_plugins() -> None:
    """Register the registered ops' TensorRT plugins with TensorRT (once per process).

    Each plugin's ``register`` function (named by its op spec) registers the descriptor and, where it
    can be built here, the implementation; :func:`build_engines` refuses models whose plugins cannot
    be built before any TensorRT work starts.
    """
    global _PLUGINS_REGISTERED
    if _PLUGINS_REGISTERED:
        return
    require_tensorrt()
    import tensorrt.plugin as trtp

    from accelkit.kernels.registry import load_object

    for plugin_id, plugin in plugin_specs().items():
        load_object(plugin.register)(trtp, plugin_id)
    _PLUGINS_REGISTERED = True


# ---------------------------------------------------------------- the TensorRT calls


@dataclass(frozen=True)
class EngineBuild:
    """What one builder call returns.

    Args:
        engine: the serialized engine.
        timing_cache: the timing cache after the build (None when the toolchain keeps none).
    """

    engine: bytes
    timing_cache: bytes | None


class TensorRTToolchain:
    """The thin layer that calls TensorRT (tests substitute a fake with the same two methods)."""

    def __init__(self) -> None:
        self.trt = require_tensorrt()
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)

    def environment(self) -> dict[str, Any]:
        """TensorRT version and the GPU engines are built for (engines run only on that kind)."""
        import torch

        if not torch.cuda.is_available():
            raise TensorRTUnavailableError(f"TensorRT needs a CUDA GPU and none is visible: {INSTALL_HINT}")
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return {
            "tensorrt": self.trt.__version__,
            "device": torch.cuda.get_device_name(index),
            "compute_capability": f"{major}.{minor}",
        }

    def build(
        self,
        onnx_path: Path,
        profile: Mapping[str, Mapping[str, Sequence[int]]],
        config: TensorRTBuildConfig,
        timing_cache: bytes | None,
        *,
        model: bytes | None = None,
    ) -> EngineBuild:
        """Parse ``onnx_path`` into a strongly typed network and build one engine with ``profile``.

        ``model``: the serialized ONNX to parse instead of the file's content (the copy whose
        registered ops' local functions are plugin nodes); external data still resolve next to ``onnx_path``.
        """
        trt = self.trt
        register_tensorrt_plugins()
        builder = trt.Builder(self.logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        # Both resolve external data next to onnx_path (weights beyond 2 GiB).
        if model is not None:
            parsed = parser.parse(model, str(onnx_path))
        else:
            parsed = parser.parse_from_file(str(onnx_path))
        if not parsed:
            errors = []
            for index in range(parser.num_errors):
                error = parser.get_error(index)
                errors.append(f"node {error.node()} ({error.node_name()}): {error.desc()}")
            raise TensorRTExportError(
                f"TensorRT's ONNX parser refused {onnx_path.name}: {'; '.join(errors) or 'no error reported'}"
            )
        builder_config = builder.create_builder_config()
        if config.workspace_bytes is not None:
            builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_bytes))
        builder_config.builder_optimization_level = int(config.optimization_level)
        if config.refit == "refit":
            builder_config.set_flag(trt.BuilderFlag.REFIT)
        elif config.refit == "refit_identical":
            builder_config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
            if config.strip_weights:
                builder_config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        optimization_profile_ = builder.create_optimization_profile()
        for name, shapes in profile.items():
            optimization_profile_.set_shape(
                name, tuple(shapes["min"]), tuple(shapes["opt"]), tuple(shapes["max"])
            )
        builder_config.add_optimization_profile(optimization_profile_)
        cache = builder_config.create_timing_cache(timing_cache or b"")
        # ignore_mismatch=False: a cache from another GPU or TensorRT version is not reused.
        builder_config.set_timing_cache(cache, False)
        serialized = builder.build_serialized_network(network, builder_config)
        if serialized is None:
            raise TensorRTExportError(
                f"TensorRT could not build an engine from {onnx_path.name}; run with --debug and TensorRT's "
                "verbose log (TRT_LOGGER) to see which layer failed"
            )
        updated = builder_config.get_timing_cache().serialize()
        return EngineBuild(engine=bytes(serialized), timing_cache=bytes(updated))


# ---------------------------------------------------------------- building an engine folder


def _sha256(path: Path) -> str:
    from accelkit.export.onnx import _sha256 as sha256

    return sha256(path)


def build_engines(
    onnx_dir: str | Path,
    engines_dir: str | Path,
    *,
    config: TensorRTBuildConfig | None = None,
    plan_data: Mapping[str, Any] | None = None,
    weight_names: Mapping[str, str] | Iterable[str] | None = None,
    timing_cache: str | Path | None = None,
    variants: Sequence[str] | None = None,
    toolchain: Any = None,
) -> dict[str, Any]:
    """Build one engine per variant of the ONNX export in ``onnx_dir`` into ``engines_dir``.

    Args:
        onnx_dir: the folder :func:`accelkit.export.onnx.export_program_onnx` wrote (its files are
            checked against their sha256 first).
        engines_dir: the output folder; written to a temporary sibling and renamed into place.
        config: build settings (default: :class:`TensorRTBuildConfig` defaults).
        plan_data: the plan's ``plan.json`` content, for the precision it promises (FP8).
        weight_names: graph attribute -> plan weight name (:func:`plan_weight_names`) for the refit
            weight map; None maps initializers to their own names.
        timing_cache: a timing cache file: loaded when present, rewritten after every build, so later
            builds (other variants, other plans, re-exports) skip the tactic timings already made.
        variants: the variants to build (default: all in the manifest).
        toolchain: what calls TensorRT (default: :class:`TensorRTToolchain`).

    Returns:
        The engine manifest (also written as ``engines_dir/manifest.json``).

    Raises:
        TensorRTUnavailableError: TensorRT is missing or too old.
        TensorRTExportError: a model calls a plugin that cannot be built here (block-sparse attention
            without triton: its kernel is compiled at build time) or with attributes it cannot build
            (block sizes that do not tile), a model lacks the FP8
            the plan promises, or the parser/builder refused it.
    """
    import onnx

    from accelkit.export.onnx import read_manifest, verify_files

    config = config or TensorRTBuildConfig()
    onnx_dir = Path(onnx_dir)
    engines_dir = Path(engines_dir)
    onnx_manifest = read_manifest(onnx_dir)
    verify_files(onnx_dir, onnx_manifest)
    entries = [m for m in onnx_manifest["models"] if variants is None or m["variant"] in variants]
    unknown = sorted(set(variants or ()) - {m["variant"] for m in onnx_manifest["models"]})
    if unknown:
        raise InputError(f"the ONNX export in '{onnx_dir}' has no variant(s) {unknown}")
    promised = plan_precision(plan_data)
    program_meta = onnx_manifest["program"]

    # Everything that can refuse the export runs before TensorRT is touched.
    prepared = []
    for entry in entries:
        path = onnx_dir / entry["file"]
        model = onnx.load(str(path), load_external_data=False)
        rewritten, plugin_calls = _rewrite_plugin_calls(model)
        parse_model = None
        if plugin_calls:
            _check_plugin_nodes(entry["file"], rewritten, plugin_calls)
            parse_model = rewritten.SerializeToString()
        precision = onnx_precision(model)
        names = weight_names if weight_names is not None else [i.name for i in model.graph.initializer]
        prepared.append((entry, path, precision, refit_weight_map(model, names), parse_model, plugin_calls))

    toolchain = toolchain if toolchain is not None else TensorRTToolchain()
    environment = toolchain.environment()
    for entry, _, precision, *_ in prepared:
        check_precision(entry["file"], precision, promised, environment.get("compute_capability"))

    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else None
    models = []
    with atomic_directory(engines_dir) as tmp:
        for entry, path, precision, weight_map, parse_model, plugin_calls in prepared:
            profile = optimization_profile(entry, program_meta, config)
            started = time.perf_counter()
            # Only models with plugin nodes pass a rewritten copy; the rest parse the file as written.
            extra = {"model": parse_model} if parse_model is not None else {}
            built = toolchain.build(path, profile, config, cache_bytes, **extra)
            seconds = time.perf_counter() - started
            if cache_path is not None and built.timing_cache:
                cache_bytes = built.timing_cache
                atomic_write_bytes(cache_path, cache_bytes)
            engine_file = f"{entry['variant']}{ENGINE_SUFFIX}"
            atomic_write_bytes(tmp / engine_file, built.engine)
            models.append(
                {
                    "variant": entry["variant"],
                    "file": engine_file,
                    "onnx_file": entry["file"],
                    "inputs": [{**item, "profile": profile[item["name"]]} for item in entry["inputs"]],
                    "outputs": list(entry["outputs"]),
                    "dynamic_batch": bool(entry.get("dynamic_batch")),
                    "precision": precision,
                    "plugins": plugin_calls,
                    "refit": {
                        "mode": config.refit,
                        "weights_stripped": config.strip_weights,
                        "weight_map": weight_map["weights"] if config.refit != "none" else {},
                        "derived": weight_map["derived"] if config.refit != "none" else [],
                    },
                    "build_seconds": round(seconds, 3),
                }
            )
            logger.info("built %s in %.1f s", engine_file, seconds)
        files = [
            {"path": p.name, "bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file()
        ]
        manifest = {
            "schema": ENGINE_MANIFEST_SCHEMA,
            "format": "tensorrt",
            "tensorrt": environment.get("tensorrt"),
            "device": environment.get("device"),
            "compute_capability": environment.get("compute_capability"),
            "strongly_typed": True,
            "build": config.to_dict(),
            "plan_precision": promised,
            "timing_cache": str(cache_path) if cache_path is not None else None,
            "source": {
                "onnx_directory": str(onnx_dir),
                "onnx_manifest_sha256": _sha256(onnx_dir / "manifest.json"),
            },
            "program": program_meta,
            "models": models,
            "files": files,
        }
        atomic_write_json(tmp / ENGINE_MANIFEST_NAME, manifest)
    return manifest


def read_engine_manifest(directory: str | Path) -> dict[str, Any]:
    """Parse ``directory/manifest.json`` of an engine folder."""
    import json

    path = Path(directory) / ENGINE_MANIFEST_NAME
    if not path.is_file():
        raise TensorRTExportError(
            f"'{directory}' holds no engine {ENGINE_MANIFEST_NAME}: run `accelkit export OUT --target tensorrt` first"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != "tensorrt":
        raise TensorRTExportError(f"'{path}' is not a TensorRT engine manifest (format {manifest.get('format')!r})")
    return manifest


def verify_engine_files(directory: str | Path, manifest: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Raise when an engine file listed in the manifest is missing or its sha256 differs (for CI).

    Returns:
        The manifest that was checked.
    """
    from accelkit.export.onnx import OnnxExportError, verify_files

    directory = Path(directory)
    manifest = dict(manifest) if manifest is not None else read_engine_manifest(directory)
    try:
        verify_files(directory, manifest)
    except OnnxExportError as error:
        raise TensorRTExportError(str(error).replace("export again", "build the engines again")) from None
    return manifest


def check_engine_compatible(manifest: Mapping[str, Any], environment: Mapping[str, Any]) -> None:
    """Refuse engines built with another TensorRT version or for another GPU generation."""
    problems = []
    if manifest.get("tensorrt") != environment.get("tensorrt"):
        problems.append(f"TensorRT {manifest.get('tensorrt')} vs {environment.get('tensorrt')} here")
    if manifest.get("compute_capability") != environment.get("compute_capability"):
        problems.append(
            f"compute capability {manifest.get('compute_capability')} vs "
            f"{environment.get('compute_capability')} here"
        )
    if problems:
        raise PlanMismatchError(
            f"the engines were built for another setup ({'; '.join(problems)}): "
            "run `accelkit export OUT --target tensorrt` on this machine"
        )


def refit_tensors(entry: Mapping[str, Any], plan_weights: Mapping[str, Any]) -> dict[str, Any]:
    """The tensors to hand ``Refitter.set_named_weights`` for one engine: initializer -> plan tensor.

    Args:
        entry: the engine's entry in the engine manifest.
        plan_weights: plan weight name -> tensor (the denoiser's state_dict plus ``weights.safetensors``).

    Raises:
        TensorRTExportError: the engine is not refittable, or a mapped plan weight is missing.
    """
    refit = entry.get("refit") or {}
    if refit.get("mode", "none") == "none":
        raise TensorRTExportError(f"{entry['file']} was built without refit: build it with refit='refit'")
    mapping = refit.get("weight_map") or {}
    missing = sorted({plan for plan in mapping.values() if plan not in plan_weights})
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise TensorRTExportError(f"refit of {entry['file']} needs plan weight(s) {shown} that were not given")
    return {initializer: plan_weights[plan] for initializer, plan in mapping.items()}


def refit_engine(engine: Any, tensors: Mapping[str, Any], *, trt_logger: Any = None) -> None:
    """Set ``tensors`` (initializer name -> torch tensor) in a deserialized refittable ``engine``.

    The tensors are handed over on the GPU in their own dtype: a strongly typed engine keeps the
    weight types of its ONNX model (bf16 has no numpy dtype, so host arrays are not an option).
    """
    import torch

    trt = require_tensorrt()
    refitter = trt.Refitter(engine, trt_logger or trt.Logger(trt.Logger.WARNING))
    dtypes = {
        torch.float32: trt.DataType.FLOAT,
        torch.float16: trt.DataType.HALF,
        torch.bfloat16: trt.DataType.BF16,
        torch.int8: trt.DataType.INT8,
        torch.int32: trt.DataType.INT32,
        torch.int64: trt.DataType.INT64,
    }
    keep_alive = []
    for name, tensor in tensors.items():
        value = tensor.detach().to("cuda").contiguous()
        if value.dtype not in dtypes:
            raise TensorRTExportError(f"cannot refit '{name}' from a {value.dtype} tensor")
        keep_alive.append(value)
        weights = trt.Weights(dtypes[value.dtype], value.data_ptr(), value.numel())
        if not refitter.set_named_weights(name, weights, trt.TensorLocation.DEVICE):
            raise TensorRTExportError(f"TensorRT refused new weights for '{name}' (name, count or dtype differ)")
    missing = refitter.get_missing_weights()
    if missing:
        raise TensorRTExportError(f"refit needs weights for {list(missing)[:5]} as well")
    if not refitter.refit_cuda_engine():
        raise TensorRTExportError("TensorRT could not refit the engine")
