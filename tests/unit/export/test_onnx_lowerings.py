"""ONNX lowerings of accelkit's custom ops (accelkit/kernels/*/onnx_lowering.py) and the dynamic batch of the export."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

import accelkit.export.onnx as onnx_export
from accelkit.capture import capture
from accelkit.export.onnx import OnnxExportError, export_program_onnx
from accelkit.kernels.block_sparse_attention import block_sparse_attention
from accelkit.kernels.block_sparse_attention.mask_op import (
    predict_block_mask_op,
    predict_block_mask_with_dense_tokens,
)
from accelkit.kernels.block_sparse_attention.reference import (
    block_sparse_attention_reference,
    dense_mask_from_indices,
    num_blocks,
)
from accelkit.kernels.block_sparse_attention.registration import (
    BLOCK_SPARSE_ATTENTION_ATTRIBUTES,
    BLOCK_SPARSE_ATTENTION_FUNCTION,
    BLOCK_SPARSE_ATTENTION_INPUTS,
)
from accelkit.kernels.svdq_linear import svdq_linear
from accelkit.kernels.svdq_linear.reference import quantize_weight_int4, svdq_linear_reference
from accelkit.passes.base import Program, run_passes
from accelkit.passes.quant import QuantConfig
from accelkit.passes.sparse import SparseConfig
from tests.fixtures.tiny_models import tiny_denoiser

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _rel(actual, expected) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def _session(path):
    options = onnx_export.onnxruntime_session_options()
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _program(module: nn.Module, inputs: dict[str, torch.Tensor]) -> Program:
    return Program.from_graph(capture(module, inputs), 2)


# ---------------------------------------------------------------- svdq_linear


class _Svdq(nn.Module):
    """One SVDQuant linear with non-trivial smoothing, low-rank factors and bias (K=64, N=48, g=16)."""

    def __init__(self, act_mode: str, k: int = 64, n: int = 48, rank: int = 8, group_size: int = 16):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        packed, scales = quantize_weight_int4(torch.randn(n, k, generator=generator), group_size)
        smooth = torch.rand(k, generator=generator) + 0.5
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("lora_down", torch.randn(rank, k, generator=generator) / smooth / 8)
        self.register_buffer("lora_up", torch.randn(n, rank, generator=generator) / 8)
        self.register_buffer("smooth", smooth)
        self.register_buffer("bias", torch.randn(n, generator=generator))
        self.group_size, self.act_mode = group_size, act_mode

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.packed, self.scales, self.lora_down, self.lora_up, self.smooth, self.bias

    def forward(self, hidden_states):
        return (
            svdq_linear(hidden_states, *self.tensors(), group_size=self.group_size, act_mode=self.act_mode),
        )

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return svdq_linear_reference(x, *self.tensors(), group_size=self.group_size, act_mode=self.act_mode)


def _activations(batch: int, seed: int) -> torch.Tensor:
    x = torch.randn(batch, 24, 64, generator=torch.Generator().manual_seed(seed))
    x[..., 5] *= 30.0  # an outlier channel: per-token FP8 scales differ a lot between tokens
    return x


@pytest.mark.parametrize("act_mode", ["w4a16", "w4a8"])
def test_svdq_linear_lowers_to_int4_dequantize_and_matches_the_reference_kernel(act_mode, tmp_path):
    layer = _Svdq(act_mode)
    x = _activations(2, 1)
    manifest = export_program_onnx(_program(layer, {"hidden_states": x}), tmp_path / "onnx")
    (entry,) = manifest["models"]
    path = tmp_path / "onnx" / "full.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    assert entry["int4_weights"] == 1 and entry["dynamic_batch"] is True

    model = onnx.load(str(path))
    types = {i.name: i.data_type for i in model.graph.initializer}
    int4 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4]
    assert len(int4) == 1 and list(int4[0].dims) == [64, 48]  # (K, N): blocks run along K
    assert len(int4[0].raw_data) == 64 * 48 // 2  # really 4 bits per weight
    assert onnx.TensorProto.UINT8 not in types.values()  # the packed uint8 original is gone
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == int4[0].name]
    (weight_dq,) = dq
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in weight_dq.attribute}
    assert attrs["block_size"] == 16 and attrs["axis"] == 0 and len(weight_dq.input) == 2  # symmetric
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    if act_mode == "w4a8":
        (node,) = quantize
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["output_dtype"] == onnx.TensorProto.FLOAT8E4M3FN and attrs["saturate"] == 1
    else:
        assert not quantize

    # Against the reference kernel, at the export batch and at another one (dynamic batch).
    session = _session(path)
    for batch, seed in ((2, 1), (3, 7)):
        x = _activations(batch, seed)
        (actual,) = session.run(["out0"], {"hidden_states": x.numpy()})
        expected = layer.reference(x)
        assert actual.shape == tuple(expected.shape)
        assert _rel(actual, expected.numpy()) < 1e-6, (act_mode, batch)


def test_w4a4_is_refused_before_tracing_with_the_fix(tmp_path):
    layer = _Svdq("w4a4")
    program = _program(layer, {"hidden_states": _activations(2, 1)})
    with pytest.raises(OnnxExportError, match=r"act_mode='w4a4'.*quant\.act_mode='w4a16' or 'w4a8'") as info:
        export_program_onnx(program, tmp_path / "onnx")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "onnx").exists()


# ---------------------------------------------------------------- block-sparse attention and its mask


class _SparseAttention(nn.Module):
    """predict_block_mask + block_sparse_attention, as the sparse pass wires them."""

    def __init__(self, **mask):
        super().__init__()
        self.mask = mask

    def forward(self, q, k, v):
        counts, indices = predict_block_mask_op(q, k, **self.mask)
        out = block_sparse_attention(
            q, k, v, counts, indices, block_q=self.mask["block_q"], block_k=self.mask["block_k"]
        )
        return out, counts, indices


def _qkv(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """q/k whose blocks of 8 tokens alternate between near-constant (self-similar) and random."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, 2, length, 16)
    shared = torch.randn(batch, 2, num_blocks(length, 8), 16, generator=generator).repeat_interleave(8, dim=2)
    similar = (torch.arange(length) // 8 % 2 == 0).view(1, 1, -1, 1)

    def make():
        noise = torch.randn(shape, generator=generator)
        return torch.where(similar, shared[:, :, :length] + 0.1 * noise, 2.0 * noise)

    return {"q": make(), "k": make(), "v": torch.randn(shape, generator=generator)}


MASK_CASES = {
    # the reference's fast path: kept set = prefix of the probability order
    "top_p": dict(block_q=16, block_k=8, tau=0.5),
    # self-similarity rule, at least two blocks per query block, a partial last block (60 tokens)
    "similarity": dict(block_q=8, block_k=8, tau=0.3, min_blocks=2, similarity_threshold=0.5),
    # text tokens kept dense at both ends (joint attention)
    "dense_tokens": dict(block_q=8, block_k=16, tau=0.4, dense_prefix=8, dense_suffix=5),
}


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_block_sparse_attention_and_mask_lower_and_match_the_reference(case, tmp_path):
    mask = MASK_CASES[case]
    module = _SparseAttention(**mask)
    inputs = _qkv(2, 60, 0)
    manifest = export_program_onnx(_program(module, inputs), tmp_path / "onnx")
    (entry,) = manifest["models"]
    path = tmp_path / "onnx" / "full.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    assert entry["sparse_attention_calls"] == 1 and entry["dynamic_batch"] is True

    model = onnx.load(str(path))
    domain, name = BLOCK_SPARSE_ATTENTION_FUNCTION
    (function,) = [f for f in model.functions if (f.domain, f.name) == (domain, name)]
    assert tuple(function.input) == BLOCK_SPARSE_ATTENTION_INPUTS
    assert tuple(function.attribute) == BLOCK_SPARSE_ATTENTION_ATTRIBUTES
    (call,) = [n for n in model.graph.node if (n.domain, n.op_type) == (domain, name)]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in call.attribute}
    assert attrs["block_q"] == mask["block_q"] and attrs["block_k"] == mask["block_k"]
    assert attrs["scale"] == pytest.approx(0.25)
    assert {o.domain: o.version for o in model.opset_import}[domain] == 1

    session = _session(path)
    for batch, seed in ((2, 0), (3, 5)):
        inputs = _qkv(batch, 60, seed)
        out, counts, indices = session.run(
            ["out0", "out1", "out2"], {k: v.numpy() for k, v in inputs.items()}
        )
        ref_counts, ref_indices = predict_block_mask_with_dense_tokens(inputs["q"], inputs["k"], **mask)
        nk = num_blocks(60, mask["block_k"])
        assert np.array_equal(counts, ref_counts.numpy())
        kept = dense_mask_from_indices(torch.from_numpy(counts), torch.from_numpy(indices), nk)
        assert torch.equal(kept, dense_mask_from_indices(ref_counts, ref_indices, nk))
        # The mask really drops blocks, so the comparison is not dense attention against itself.
        assert 0.2 < kept.float().mean() < 0.95, kept.float().mean()
        expected = block_sparse_attention_reference(
            *inputs.values(), ref_counts, ref_indices, block_q=mask["block_q"], block_k=mask["block_k"]
        )
        assert _rel(out, expected.numpy()) < 1e-5
        dense = torch.nn.functional.scaled_dot_product_attention(*inputs.values())
        assert _rel(out, dense.numpy()) > 1e-2


def test_a_query_block_with_no_kept_key_gives_zeros_in_onnxruntime(tmp_path):
    class Attention(nn.Module):
        def forward(self, q, k, v, counts, indices):
            return (block_sparse_attention(q, k, v, counts, indices, block_q=8, block_k=8),)

    inputs = _qkv(1, 24, 3)
    inputs["counts"] = torch.tensor([[[0, 1, 3], [2, 0, 1]]], dtype=torch.int32)
    inputs["indices"] = torch.tensor(
        [[[[2, 0, 1], [1, 2, 0], [0, 1, 2]], [[2, 0, 1], [0, 1, 2], [1, 0, 2]]]]
    ).int()
    export_program_onnx(_program(Attention(), inputs), tmp_path / "onnx", dynamic_batch=False)
    (out,) = _session(tmp_path / "onnx" / "full.onnx").run(
        ["out0"], {k: v.numpy() for k, v in inputs.items()}
    )
    expected = block_sparse_attention_reference(*inputs.values(), block_q=8, block_k=8)
    assert np.abs(out[0, 0, :8]).max() == 0.0 and np.abs(out[0, 1, 8:16]).max() == 0.0
    assert _rel(out, expected.numpy()) < 1e-6


# ---------------------------------------------------------------- tiny models, end to end


@functools.cache
def _captured(family: str, resolution: int = 8):
    model, kwargs = tiny_denoiser(family, resolution=resolution)
    return model, kwargs, capture(model, kwargs)


def test_quantized_tiny_model_exports_int4_weights(tmp_path):
    _, kwargs, graph = _captured("dit")
    program = Program.from_graph(graph, 2)
    config = QuantConfig(bits=4, rank=8, group_size=16, alpha_grid=(0.0,))
    quantized, results = run_passes(program, [config])
    layers = results["quant"].stats["quantized"]
    manifest = export_program_onnx(quantized, tmp_path / "w4", dynamic_batch=False)
    (entry,) = manifest["models"]
    assert entry["int4_weights"] == len(layers) > 0
    assert entry["verification"]["max_relative_error"] < 1e-4  # against the reference kernel in PyTorch

    model = onnx.load(str(tmp_path / "w4" / "full.onnx"))
    int4 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4]
    svdq = [n for n in quantized.variants["full"].module.graph.nodes if "svdq_linear" in str(n.target)]
    stored = [quantized.variants["full"].module.get_buffer(n.args[1].target) for n in svdq]
    assert sorted(len(i.raw_data) for i in int4) == sorted(p.numel() for p in stored)  # K * N / 2 bytes each
    assert not [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.UINT8]

    # The same model unquantized, exported the same way, stores exactly the 4-bit savings more
    # weight bytes: per layer 4 N K (fp32) against N K / 2 (INT4) + fp32 scales, low-rank factors, smooth.
    export_program_onnx(program, tmp_path / "fp32", dynamic_batch=False, verify=False)
    saved = 0
    for node, packed in zip(svdq, stored, strict=True):
        n, k = packed.shape[0], 2 * packed.shape[1]
        rank = quantized.variants["full"].module.get_buffer(node.args[3].target).shape[0]
        saved += 4 * n * k - (n * k // 2 + 4 * n * k // 16 + 4 * rank * (n + k) + 4 * k)
    fp32_bytes, w4_bytes = (
        _weight_bytes(tmp_path / "fp32" / "full.onnx"),
        _weight_bytes(tmp_path / "w4" / "full.onnx"),
    )
    assert abs((fp32_bytes - w4_bytes) - saved) < 0.01 * fp32_bytes, (fp32_bytes, w4_bytes, saved)


def test_quantized_plan_runs_in_the_runner_as_exported(tmp_path):
    """The runner's default session options keep the 4-bit matmuls' activations in float (as verified)."""
    from accelkit.runtime.ort_runner import OrtProgramRunner

    _, kwargs, graph = _captured("dit")
    quantized, _ = run_passes(Program.from_graph(graph, 2),
                              [QuantConfig(bits=4, rank=8, group_size=16, alpha_grid=(0.0,))])
    export_program_onnx(quantized, tmp_path / "onnx")
    runner = OrtProgramRunner(tmp_path / "onnx", quantized)
    with torch.no_grad():
        expected = quantized.variants["full"].module(*quantized.graph.flat_inputs(kwargs))[0]
    (out,) = runner.run(0, 0, kwargs, return_dict=False)
    assert _rel(out.numpy(), expected.numpy()) < 1e-4


def _weight_bytes(path) -> int:
    return sum(len(i.raw_data) for i in onnx.load(str(path)).graph.initializer)


def test_sparse_tiny_model_exports_end_to_end(tmp_path):
    _, kwargs, graph = _captured("sd3")
    program = Program.from_graph(graph, 2)
    config = SparseConfig(block_q=8, block_k=8, min_tokens=0, taus=(0.3, 0.3))
    sparse_program, results = run_passes(program, [config])
    assert results["sparse"].modified and results["sparse"].stats["text_tokens"]  # text kept dense
    manifest = export_program_onnx(sparse_program, tmp_path / "onnx")
    (entry,) = manifest["models"]
    assert entry["sparse_attention_calls"] == 2 and entry["dynamic_batch"] is True
    assert entry["verification"]["max_relative_error"] < 1e-4
    # the sparse graph is not the dense one: the ONNX model's agreement is with the sparse computation
    inputs = program.graph.flat_inputs(kwargs)
    with torch.no_grad():
        dense = program.variants["full"].module(*inputs)[0]
    names = list(program.graph.input_names)
    feeds = {n: t.numpy() for n, t in zip(names, inputs, strict=True)}
    (actual,) = _session(tmp_path / "onnx" / "full.onnx").run(["out0"], feeds)
    assert _rel(actual, dense.numpy()) > 1e-3


# ---------------------------------------------------------------- dynamic batch fallbacks


class _RowMixing(nn.Module):
    """Rows depend on each other: an exported dynamic batch cannot reproduce the captured rows."""

    def forward(self, hidden_states):
        return (hidden_states - hidden_states.mean(dim=0, keepdim=True),)


class _Flatten(nn.Module):
    def forward(self, hidden_states):
        return (hidden_states.view(hidden_states.shape[0], -1) * 2.0,)


def test_rows_that_depend_on_the_batch_fall_back_to_a_static_batch(tmp_path):
    x = torch.randn(2, 3, 4)
    manifest = export_program_onnx(_program(_RowMixing(), {"hidden_states": x}), tmp_path / "onnx")
    (entry,) = manifest["models"]
    assert entry["dynamic_batch"] is False and manifest["dynamic_batch"] is False
    assert "at batch 1" in entry["dynamic_batch_note"] and "captured batch 2" in entry["dynamic_batch_note"]
    assert entry["inputs"][0]["shape"] == [2, 3, 4]
    model = onnx.load(str(tmp_path / "onnx" / "full.onnx"))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2


def test_literal_batch_sizes_are_rewritten_and_a_failed_rewrite_falls_back(tmp_path, monkeypatch):
    x = torch.randn(2, 3, 4)
    program = _program(_Flatten(), {"hidden_states": x})
    module = program.variants["full"].module
    rewritten, count = onnx_export._symbolic_batch(module, [True], 2)
    assert count == 1 and "sym_size" in rewritten.code and "sym_size" not in module.code
    manifest = export_program_onnx(program, tmp_path / "dynamic")
    assert manifest["models"][0]["dynamic_batch"] is True
    assert manifest["models"][0]["verification"]["checked_batches"] == [1, 2, 3]
    (out,) = _session(tmp_path / "dynamic" / "full.onnx").run(
        ["out0"], {"hidden_states": np.ones((5, 3, 4), np.float32)}
    )
    assert out.shape == (5, 12) and np.all(out == 2.0)

    # Without the rewrite torch.export pins the batch: the export stays static and says why.
    monkeypatch.setattr(onnx_export, "_symbolic_batch", lambda module, carries, batch: (module, 0))
    manifest = export_program_onnx(program, tmp_path / "static")
    (entry,) = manifest["models"]
    assert entry["dynamic_batch"] is False and "dynamic batch export failed" in entry["dynamic_batch_note"]
