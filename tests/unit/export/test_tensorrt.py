"""Tests of the TensorRT engine export (accelkit/export/tensorrt.py).

Everything before the builder call runs here on CPU against a real ONNX export of a tiny cache
plan; the builder itself is replaced by a fake toolchain whose "engine" is the ONNX file. The
``trt``-marked tests build real engines and skip where TensorRT is not installed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import types

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import accelkit.export.tensorrt as tensorrt_export
from accelkit.capture import capture
from accelkit.errors import InputError
from accelkit.export.onnx import export_program_onnx
from accelkit.export.tensorrt import (
    ENGINE_MANIFEST_NAME,
    INSTALL_HINT,
    EngineBuild,
    TensorRTBuildConfig,
    TensorRTExportError,
    TensorRTUnavailableError,
    build_engines,
    check_engine_compatible,
    check_precision,
    onnx_precision,
    optimization_profile,
    plan_precision,
    plan_weight_names,
    read_engine_manifest,
    refit_tensors,
    refit_weight_map,
    require_tensorrt,
    rewrite_plugin_calls,
    verify_engine_files,
)
from accelkit.kernels.block_sparse_attention.registration import PLUGIN_NAME as BLOCK_SPARSE_PLUGIN_NAME
from accelkit.kernels.block_sparse_attention.tensorrt_plugin import block_sparse_attention_output_shape
from accelkit.kernels.svdq_linear.registration import INT4_WEIGHT_FUNCTION
from accelkit.passes.base import Program, run_passes
from accelkit.passes.cache import CacheConfig
from tests.fixtures.tiny_models import tiny_denoiser

ENVIRONMENT = {"tensorrt": "10.13.0", "device": "Fake H100", "compute_capability": "9.0"}


class FakeToolchain:
    """Stands in for TensorRTToolchain: the "engine" is the ONNX file itself; records every build."""

    def __init__(self, environment=None):
        self.env = dict(environment or ENVIRONMENT)
        self.builds = []

    def environment(self):
        return dict(self.env)

    def build(self, onnx_path, profile, config, timing_cache, *, model=None):
        self.builds.append({"file": onnx_path.name, "profile": profile, "cache": timing_cache, "model": model})
        return EngineBuild(
            engine=onnx_path.read_bytes(), timing_cache=(timing_cache or b"") + f"{onnx_path.name};".encode()
        )


@functools.cache
def _dit_cache_program():
    model, kwargs = tiny_denoiser("dit")
    graph = capture(model, kwargs)
    config = CacheConfig(full_fraction=0.5, schedule="uniform", approximation="residual")
    program, _ = run_passes(Program.from_graph(graph, 4), [config])
    assert set(program.schedule) == {"full", "cached"}
    return model, kwargs, program


@pytest.fixture(scope="module")
def dit_export(tmp_path_factory):
    _, _, program = _dit_cache_program()
    directory = tmp_path_factory.mktemp("dit") / "onnx"
    manifest = export_program_onnx(program, directory, dynamic_batch=False, optimize=False)
    return program, directory, manifest


# ---------------------------------------------------------------- profiles


def test_profiles_from_a_real_manifest_fix_every_static_dim(dit_export):
    _, directory, manifest = dit_export
    config = TensorRTBuildConfig()
    for entry in manifest["models"]:
        profile = optimization_profile(entry, manifest["program"], config)
        assert list(profile) == [i["name"] for i in entry["inputs"]]
        for item in entry["inputs"]:
            shapes = profile[item["name"]]
            assert shapes["min"] == shapes["opt"] == shapes["max"] == item["shape"]
    cached = next(m for m in manifest["models"] if m["variant"] == "cached")
    assert "cache_r0" in optimization_profile(cached, manifest["program"], config)


def test_dynamic_batch_ranges_from_one_to_the_cfg_batch(dit_export):
    _, _, manifest = dit_export
    entry = json.loads(json.dumps(manifest["models"][0]))
    for item in entry["inputs"]:
        if item["shape"]:
            item["shape"][0] = "batch"
    captured = manifest["program"]["input_specs"][0]["shape"][0]
    assert captured == 2  # CFG doubles the batch
    profile = optimization_profile(entry, manifest["program"], TensorRTBuildConfig())
    first = profile[entry["inputs"][0]["name"]]
    rest = entry["inputs"][0]["shape"][1:]
    assert first == {"min": [1, *rest], "opt": [2, *rest], "max": [2, *rest]}
    wider = optimization_profile(entry, manifest["program"], TensorRTBuildConfig(min_batch=2, max_batch=8))
    assert wider[entry["inputs"][0]["name"]]["max"][0] == 8
    assert wider[entry["inputs"][0]["name"]]["min"][0] == 2
    with pytest.raises(InputError, match="min <= opt <= max"):
        optimization_profile(entry, manifest["program"], TensorRTBuildConfig(opt_batch=4, max_batch=3))
    entry["inputs"][0]["shape"][1] = "tokens"
    with pytest.raises(TensorRTExportError, match="symbolic dimension 'tokens'"):
        optimization_profile(entry, manifest["program"], TensorRTBuildConfig())


# ---------------------------------------------------------------- precision


def _tiny_model(input_type=TensorProto.FLOAT, fp8=False):
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    initializers = []
    if fp8:
        initializers = [
            helper.make_tensor("scale", TensorProto.FLOAT, [], [0.5]),
            helper.make_tensor("zero", TensorProto.FLOAT8E4M3FN, [], [0.0]),
        ]
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "scale"], ["y"]),
        ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", input_type, [2, 4])],
        [helper.make_tensor_value_info("y", input_type, [2, 4])],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_precision_follows_the_onnx_types(dit_export):
    _, directory, _ = dit_export
    real = onnx_precision(onnx.load(str(directory / "full.onnx")))
    assert real["label"] == "fp32" and real["fp8"] is False and real["weights"] == ["float32"]
    assert onnx_precision(_tiny_model(TensorProto.BFLOAT16))["label"] == "bf16"
    assert onnx_precision(_tiny_model(TensorProto.FLOAT16))["label"] == "fp16"
    fp8 = onnx_precision(_tiny_model(fp8=True))
    assert fp8["fp8"] is True and fp8["label"] == "fp32+fp8"
    # INT4 weights arrive packed in uint8 and unpacked by the lowering's local function.
    packed = _tiny_model()
    domain, name = INT4_WEIGHT_FUNCTION
    packed.graph.node.append(helper.make_node(name, ["x"], ["w", "s"], domain=domain))
    assert onnx_precision(packed)["int4_weights"] is True and onnx_precision(_tiny_model())["int4_weights"] is False


def block_sparse_function_id():
    """(domain, name) of the ONNX local function the block-sparse plugin replaces (from the op registry)."""
    return tensorrt_export.plugin_specs()["accelkit::block_sparse_attention"].onnx_function


def test_function_names_agree_with_the_lowerings():
    lowerings = pytest.importorskip("accelkit.kernels.block_sparse_attention.onnx_lowering")
    assert block_sparse_function_id() == tuple(lowerings.BLOCK_SPARSE_ATTENTION_FUNCTION)
    function = lowerings.BlockSparseAttention.to_function_proto()
    assert (function.domain, function.name) == block_sparse_function_id()
    assert tuple(function.attribute) == ("block_q", "block_k", "scale")


def test_plan_precision_and_its_checks():
    w4a8 = plan_precision({"passes": {"quant": {"act_mode": "w4a8"}}})
    assert w4a8["fp8"] is True and "w4a8" in w4a8["reason"]
    assert plan_precision({"passes": {"quant": {"act_mode": "w4a16"}}})["fp8"] is False
    assert plan_precision({"passes": {}}) == {"fp8": False, "int4_weights": False, "reason": None}
    with pytest.raises(TensorRTExportError, match="holds no FP8"):
        check_precision("full.onnx", {"fp8": False}, w4a8, "9.0")
    with pytest.raises(TensorRTExportError, match="compute capability >= 8.9"):
        check_precision("full.onnx", {"fp8": True}, w4a8, "8.0")
    check_precision("full.onnx", {"fp8": True}, w4a8, "9.0")
    check_precision("full.onnx", {"fp8": False}, plan_precision(None), "7.5")


# ---------------------------------------------------------------- refit weight map


def test_weight_map_covers_the_real_initializers(dit_export):
    program, directory, _ = dit_export
    names = plan_weight_names(program)
    for variant in ("full", "cached"):
        model = onnx.load(str(directory / f"{variant}.onnx"))
        mapping = refit_weight_map(model, names)
        initializers = [i.name for i in model.graph.initializer]
        assert initializers and sorted(mapping["weights"]) == sorted(initializers)
        assert mapping["derived"] == []
        module = program.variants[variant].module
        state = dict(module.state_dict())
        for initializer, plan_name in mapping["weights"].items():
            # The plan weight is the tensor the initializer was exported from.
            array = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == initializer))
            assert np.array_equal(array, state[plan_name].numpy())


def test_weight_map_names_pass_made_tensors_by_their_plan_key(dit_export):
    program, directory, _ = dit_export
    module = program.variants["full"].module
    name, parameter = next(iter(module.named_parameters()))
    # A pass that stores a tensor in new_weights: the map names it by that key.
    renamed = program.replace(new_weights={"quant.layer.qweight": parameter})
    names = plan_weight_names(renamed)
    assert names[name] == "quant.layer.qweight"
    model = onnx.load(str(directory / "full.onnx"))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(3, np.float32), "folded_constant"))
    mapping = refit_weight_map(model, names)
    assert mapping["weights"][name] == "quant.layer.qweight"
    assert mapping["derived"] == ["folded_constant"]


def test_refit_tensors_picks_the_plan_tensors():
    entry = {"file": "full.engine", "refit": {"mode": "refit", "weight_map": {"w_init": "blocks.0.weight"}}}
    weight = torch.ones(3)
    assert refit_tensors(entry, {"blocks.0.weight": weight})["w_init"] is weight
    with pytest.raises(TensorRTExportError, match="blocks.0.weight"):
        refit_tensors(entry, {})
    with pytest.raises(TensorRTExportError, match="without refit"):
        refit_tensors({"file": "full.engine", "refit": {"mode": "none"}}, {})


# ---------------------------------------------------------------- the block-sparse attention plugin


def test_plugin_shape_function():
    assert block_sparse_attention_output_shape((2, 4, 64, 32), (2, 4, 80, 16)) == (2, 4, 64, 16)
    # Only indexing is used, so TensorRT's symbolic shape expressions pass through the same code.
    assert block_sparse_attention_output_shape(("B", "H", "Lq", "D"), ("B", "H", "Lk", "Dv")) == (
        "B",
        "H",
        "Lq",
        "Dv",
    )
    with pytest.raises(ValueError, match="4-d"):
        block_sparse_attention_output_shape((2, 64, 32), (2, 80, 16))


class FakeDim:
    """Stand-in for tensorrt.plugin's ShapeExpr: a constant (``value``) or a named symbol, with the
    arithmetic the plugin code uses; ``text`` spells the expression so tests can compare formulas."""

    def __init__(self, value=None, text=None):
        self.value, self.text = value, text if text is not None else str(value)

    @property
    def is_constant(self):
        return self.value is not None

    def constant_value(self):
        assert self.value is not None, f"{self.text} is not a build-time constant"
        return self.value

    def __mul__(self, other):
        other = other if isinstance(other, FakeDim) else FakeDim(other)
        both = self.value is not None and other.value is not None
        return FakeDim(self.value * other.value if both else None, f"({self.text}*{other.text})")

    def __repr__(self):
        return self.text


def fake_tensorrt_plugin():
    """A stand-in ``tensorrt.plugin`` whose register / aot_impl make the checks TensorRT makes.

    Registered functions land in ``plugin.registered`` and ``plugin.aot_impls`` (by plugin id).
    """
    import inspect
    import typing

    plugin = types.ModuleType("tensorrt.plugin")
    plugin.registered, plugin.aot_impls = {}, {}

    class TensorDesc:
        def __init__(self, shape_expr=(), dtype=None):
            self.shape_expr, self.dtype = tuple(shape_expr), dtype

    class KernelLaunchParams:
        def __init__(self):
            self.grid_x = self.grid_y = self.grid_z = self.block_x = self.block_y = self.block_z = 1
            self.shared_mem = 0

    class SymInt32:
        def __init__(self, expr):
            self.expr = expr

    class SymExprs(list):
        pass

    class SymIntExprs(SymExprs):
        @classmethod
        def from_tuple(cls, exprs):
            return cls(exprs)

    def register(plugin_id):
        def decorator(fn):
            # What tensorrt.plugin.register checks: every annotation is a class, inputs are TensorDescs.
            signature = inspect.signature(fn)
            for parameter in signature.parameters.values():
                assert isinstance(parameter.annotation, type), (parameter.name, parameter.annotation)
            assert signature.return_annotation is TensorDesc
            plugin.registered[plugin_id] = fn
            return fn

        return decorator

    def aot_impl(plugin_id):
        def decorator(fn):
            # What tensorrt.plugin.aot_impl checks: registered first; parameters are the inputs, (a subset
            # of) the attributes in order, then outputs and tactic; a 4-tuple return annotation of classes.
            desc = plugin.registered[plugin_id]
            registered = list(inspect.signature(desc).parameters)
            names = list(inspect.signature(fn).parameters)
            assert names[-2:] == ["outputs", "tactic"], names
            assert names[:-2] == [n for n in registered if n in names[:-2]], (names, registered)
            ret = inspect.signature(fn).return_annotation
            assert typing.get_origin(ret) is tuple, ret
            args = typing.get_args(ret)
            assert len(args) == 4
            for text in args[:2]:
                assert set(typing.get_args(text) or (text,)) <= {str, bytes}, text
            assert issubclass(args[2], KernelLaunchParams) and issubclass(args[3], SymExprs), args
            plugin.aot_impls[plugin_id] = fn
            return fn

        return decorator

    def cdiv(first, second):
        text = f"cdiv({first.text},{second})"
        return FakeDim(-(-first.value // second) if first.is_constant else None, text)

    plugin.TensorDesc, plugin.KernelLaunchParams = TensorDesc, KernelLaunchParams
    plugin.SymInt32, plugin.SymExprs, plugin.SymIntExprs = SymInt32, SymExprs, SymIntExprs
    plugin.register, plugin.aot_impl, plugin.cdiv = register, aot_impl, cdiv
    plugin.from_shape_expr = lambda shape, dtype: TensorDesc(shape, dtype)
    return plugin


def test_plugin_descriptor_registers_with_class_annotations(monkeypatch):
    import inspect

    from accelkit.kernels._backend import triton_importable

    plugin = fake_tensorrt_plugin()
    TensorDesc = plugin.TensorDesc
    trt = types.ModuleType("tensorrt")
    trt.__version__, trt.plugin = "10.13.0", plugin
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", plugin)
    monkeypatch.setattr(tensorrt_export, "_PLUGINS_REGISTERED", False)
    tensorrt_export.register_tensorrt_plugins()
    tensorrt_export.register_tensorrt_plugins()  # once per process
    desc = plugin.registered.pop("accelkit::block_sparse_attention")
    assert plugin.registered == {}
    names = list(inspect.signature(desc).parameters)
    assert names == ["q", "k", "v", "kv_block_counts", "kv_block_indices", "block_q", "block_k", "scale"]
    q, v = TensorDesc(("B", "H", "Lq", "D"), "bf16"), TensorDesc(("B", "H", "Lk", "Dv"), "bf16")
    out = desc(q, TensorDesc(), v, TensorDesc(), TensorDesc(), 128, 64, 0.125)
    assert out.shape_expr == ("B", "H", "Lq", "Dv") and out.dtype == "bf16"
    # The ahead-of-time kernel is compiled from triton: registered exactly when triton imports.
    assert list(plugin.aot_impls) == (["accelkit::block_sparse_attention"] if triton_importable() else [])


def _sparse_model():
    domain, name = block_sparse_function_id()
    body = [helper.make_node("Identity", ["q"], ["out"])]
    function = helper.make_function(
        domain,
        name,
        ["q", "k", "v", "counts", "indices"],
        ["out"],
        body,
        [helper.make_opsetid("", 21)],
        attributes=["block_q", "block_k", "scale"],
    )
    call = helper.make_node(
        name, ["q", "k", "v", "counts", "indices"], ["y"], domain=domain, block_q=128, block_k=64, scale=0.125
    )
    floats = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 8, 4]) for n in ("q", "k", "v")]
    ints = [
        helper.make_tensor_value_info("counts", TensorProto.INT32, [1, 2, 1]),
        helper.make_tensor_value_info("indices", TensorProto.INT32, [1, 2, 1, 1]),
    ]
    graph = helper.make_graph(
        [call], "sparse", floats + ints, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 4])]
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(domain, 1)],
        functions=[function],
    )


def test_rewrite_turns_function_calls_into_plugin_nodes():
    model = _sparse_model()
    onnx.checker.check_model(model)
    rewritten, count = rewrite_plugin_calls(model)
    assert count == 1
    (node,) = rewritten.graph.node
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.op_type == BLOCK_SPARSE_PLUGIN_NAME
    assert attributes["plugin_namespace"] == b"accelkit" and attributes["plugin_version"] == b"1"
    assert attributes["block_q"] == 128 and attributes["block_k"] == 64
    assert len(rewritten.functions) == 0
    # The caller's model is untouched.
    assert model.graph.node[0].op_type == block_sparse_function_id()[1] and len(model.functions) == 1
    _, none = rewrite_plugin_calls(_tiny_model())
    assert none == 0


def _write_onnx_dir(directory, models: dict, program_meta: dict):
    """A minimal ONNX export folder (manifest with files and hashes) around hand-made models."""
    directory.mkdir(parents=True)
    entries, files = [], []
    for variant, model in models.items():
        path = directory / f"{variant}.onnx"
        onnx.save(model, str(path))
        entries.append(
            {
                "variant": variant,
                "file": path.name,
                "inputs": [
                    {"name": v.name, "role": "user", "shape": [d.dim_value for d in v.type.tensor_type.shape.dim],
                     "dtype": "float32"}
                    for v in model.graph.input
                ],
                "outputs": [{"name": v.name, "role": "user", "shape": [], "dtype": "float32"} for v in model.graph.output],
                "dynamic_batch": False,
            }
        )
        files.append({"path": path.name, "bytes": path.stat().st_size,
                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    manifest = {"format": "onnx", "program": program_meta, "models": entries, "files": files}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_builder_refuses_sparse_plans_without_triton_before_calling_tensorrt(tmp_path, monkeypatch):
    import accelkit.kernels._backend as backend

    monkeypatch.setattr(backend, "triton_importable", lambda: False)
    _write_onnx_dir(tmp_path / "onnx", {"full": _sparse_model()}, {"input_specs": [{"shape": [1, 2, 8, 4]}]})
    toolchain = FakeToolchain()
    with pytest.raises(TensorRTExportError) as info:
        build_engines(tmp_path / "onnx", tmp_path / "engines", toolchain=toolchain)
    assert str(info.value) == (
        "full.onnx: building engines for a sparse plan needs triton (pip install accelkit[gpu])"
    )
    assert toolchain.builds == [] and not (tmp_path / "engines").exists()


def test_builder_refuses_block_sizes_the_kernel_cannot_tile(tmp_path, monkeypatch):
    import accelkit.kernels._backend as backend

    monkeypatch.setattr(backend, "triton_importable", lambda: True)
    model = _sparse_model()
    for attribute in model.graph.node[0].attribute:
        if attribute.name == "block_k":
            attribute.i = 40
    _write_onnx_dir(tmp_path / "onnx", {"full": model}, {"input_specs": [{"shape": [1, 2, 8, 4]}]})
    toolchain = FakeToolchain()
    with pytest.raises(TensorRTExportError, match="block_k=40.*multiples of 16"):
        build_engines(tmp_path / "onnx", tmp_path / "engines", toolchain=toolchain)
    assert toolchain.builds == []


def test_builder_hands_sparse_models_to_tensorrt_as_plugin_nodes(tmp_path, monkeypatch):
    import accelkit.kernels._backend as backend

    monkeypatch.setattr(backend, "triton_importable", lambda: True)  # the build itself is faked
    _write_onnx_dir(
        tmp_path / "onnx",
        {"full": _sparse_model(), "cached": _tiny_model()},
        {"input_specs": [{"shape": [1, 2, 8, 4]}]},
    )
    toolchain = FakeToolchain()
    manifest = build_engines(tmp_path / "onnx", tmp_path / "engines", toolchain=toolchain)
    sparse, plain = toolchain.builds
    # The parser gets the rewritten copy (plugin node, no local function); other models parse as written.
    parsed = onnx.load_from_string(sparse["model"])
    assert [n.op_type for n in parsed.graph.node] == [BLOCK_SPARSE_PLUGIN_NAME] and len(parsed.functions) == 0
    assert plain["model"] is None
    plugins = {m["variant"]: m["plugins"] for m in manifest["models"]}
    assert plugins == {"full": {"accelkit::block_sparse_attention": 1}, "cached": {}}
    # The file on disk keeps the local function (onnxruntime runs it).
    on_disk = onnx.load(str(tmp_path / "onnx" / "full.onnx"))
    assert on_disk.graph.node[0].op_type == block_sparse_function_id()[1]


# ---------------------------------------------------------------- engine folder and manifest


def test_engine_manifest_write_read_verify(dit_export, tmp_path):
    _, onnx_dir, onnx_manifest = dit_export
    toolchain = FakeToolchain()
    engines = tmp_path / "engines"
    manifest = build_engines(onnx_dir, engines, toolchain=toolchain, plan_data={"passes": {}})
    assert read_engine_manifest(engines) == manifest
    assert manifest["tensorrt"] == "10.13.0" and manifest["compute_capability"] == "9.0"
    assert manifest["strongly_typed"] is True and manifest["program"] == onnx_manifest["program"]
    assert [m["variant"] for m in manifest["models"]] == [m["variant"] for m in onnx_manifest["models"]]
    listed = {f["path"]: f for f in manifest["files"]}
    on_disk = {p.name for p in engines.iterdir()} - {ENGINE_MANIFEST_NAME}
    assert set(listed) == on_disk == {"full.engine", "cached.engine"}
    for name, item in listed.items():
        data = (engines / name).read_bytes()
        assert item["sha256"] == hashlib.sha256(data).hexdigest() and item["bytes"] == len(data)
    for model in manifest["models"]:
        assert model["precision"]["label"] == "fp32"
        assert model["refit"]["mode"] == "refit" and model["refit"]["weight_map"]
        assert all({"min", "opt", "max"} <= set(i["profile"]) for i in model["inputs"])
    # The profiles the builder got are the ones the manifest records.
    assert [b["file"] for b in toolchain.builds] == ["full.onnx", "cached.onnx"]
    assert toolchain.builds[1]["profile"] == {i["name"]: i["profile"] for i in manifest["models"][1]["inputs"]}
    verify_engine_files(engines)

    (engines / "cached.engine").write_bytes(b"tampered")
    with pytest.raises(TensorRTExportError, match="does not match the sha256"):
        verify_engine_files(engines)
    (engines / "cached.engine").unlink()
    with pytest.raises(TensorRTExportError, match="missing"):
        verify_engine_files(engines)
    with pytest.raises(TensorRTExportError, match="--target tensorrt"):
        read_engine_manifest(tmp_path)


def test_timing_cache_is_loaded_and_saved_across_builds(dit_export, tmp_path):
    _, onnx_dir, _ = dit_export
    cache = tmp_path / "timing.cache"
    first = FakeToolchain()
    build_engines(onnx_dir, tmp_path / "a", toolchain=first, timing_cache=cache)
    assert first.builds[0]["cache"] is None
    assert first.builds[1]["cache"] == b"full.onnx;"
    assert cache.read_bytes() == b"full.onnx;cached.onnx;"
    second = FakeToolchain()
    build_engines(onnx_dir, tmp_path / "b", toolchain=second, timing_cache=cache, variants=("cached",))
    assert second.builds[0]["cache"] == b"full.onnx;cached.onnx;"
    assert cache.read_bytes() == b"full.onnx;cached.onnx;cached.onnx;"


def test_fp8_plan_without_fp8_onnx_is_refused_before_building(dit_export, tmp_path):
    _, onnx_dir, _ = dit_export
    toolchain = FakeToolchain()
    with pytest.raises(TensorRTExportError, match="holds no FP8"):
        build_engines(onnx_dir, tmp_path / "engines", toolchain=toolchain,
                      plan_data={"passes": {"quant": {"act_mode": "w4a8"}}})
    assert toolchain.builds == [] and not (tmp_path / "engines").exists()


def test_engines_from_another_setup_are_refused():
    manifest = {"tensorrt": "10.13.0", "compute_capability": "9.0"}
    check_engine_compatible(manifest, ENVIRONMENT)
    from accelkit.errors import PlanMismatchError

    with pytest.raises(PlanMismatchError, match="compute capability 9.0 vs 8.9"):
        check_engine_compatible(manifest, {**ENVIRONMENT, "compute_capability": "8.9"})
    with pytest.raises(PlanMismatchError, match="TensorRT 10.13.0 vs 10.14.1"):
        check_engine_compatible(manifest, {**ENVIRONMENT, "tensorrt": "10.14.1"})


# ---------------------------------------------------------------- config and missing TensorRT


def test_build_config_round_trips_and_validates():
    config = TensorRTBuildConfig(max_batch=4, refit="refit_identical", strip_weights=True)
    assert TensorRTBuildConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(InputError, match="refit must be one of"):
        TensorRTBuildConfig(refit="sometimes")
    with pytest.raises(InputError, match="strip_weights needs"):
        TensorRTBuildConfig(strip_weights=True)
    with pytest.raises(InputError, match="unknown field"):
        TensorRTBuildConfig.from_dict({"fp16": True})


def test_missing_tensorrt_is_one_line_with_the_fix(monkeypatch, dit_export, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(TensorRTUnavailableError) as info:
        require_tensorrt()
    assert str(info.value) == f"TensorRT is not installed: {INSTALL_HINT}"
    assert "accelkit[tensorrt]" in INSTALL_HINT and "NVIDIA GPU" in INSTALL_HINT
    _, onnx_dir, _ = dit_export
    with pytest.raises(TensorRTUnavailableError):
        build_engines(onnx_dir, tmp_path / "engines")
    assert not (tmp_path / "engines").exists()
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(TensorRTUnavailableError, match="8.6.1 is too old"):
        require_tensorrt()


# ---------------------------------------------------------------- real TensorRT


@pytest.mark.trt
def test_real_engines_build_and_match_onnxruntime(dit_export, tmp_path):
    from accelkit.runtime.executor import ProgramExecutor
    from accelkit.runtime.trt_runner import TrtProgramRunner

    program, onnx_dir, _ = dit_export
    cache = tmp_path / "timing.cache"
    manifest = build_engines(onnx_dir, tmp_path / "engines", weight_names=plan_weight_names(program),
                             timing_cache=cache)
    assert cache.is_file() and cache.stat().st_size > 0
    assert manifest["tensorrt"] and manifest["compute_capability"]
    _, kwargs, _ = _dit_cache_program()
    runner = TrtProgramRunner(tmp_path / "engines", program)
    executor = ProgramExecutor(program)
    for step in range(program.num_steps):
        expected = executor.run(step, 0, kwargs, False)
        actual = runner.run(step, 0, kwargs, False)
        for got, want in zip(actual, expected, strict=True):
            error = float((got.cpu() - want).norm() / want.norm())
            assert error < 1e-2, (step, error)
    assert runner.variant_calls == executor.variant_calls
