"""The tiny fixtures themselves: eager == torch.export, deterministic pipelines, offline save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.fixtures.tiny_models import (
    EXPECTED_BLOCKS,
    FAMILIES,
    PIPELINE_KINDS,
    pipeline_call_kwargs,
    saved_pipeline_folder,
    tiny_denoiser,
    tiny_pipeline,
)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize("family", FAMILIES)
def test_denoiser_blocks_and_determinism(family):
    model, kwargs = tiny_denoiser(family)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert kwargs["return_dict"] is False
    for name, count in EXPECTED_BLOCKS[family].items():
        blocks = getattr(model, name)
        assert (len(blocks) if isinstance(blocks, torch.nn.ModuleList) else 1) == count
    model2, kwargs2 = tiny_denoiser(family)
    with torch.no_grad():
        a = _first(model(**kwargs))
        b = _first(model2(**kwargs2))
    assert torch.equal(a, b)
    assert a.std() > 0


@pytest.mark.parametrize("resolution", [8, 16])
@pytest.mark.parametrize("family", FAMILIES)
def test_denoiser_export_matches_eager(family, resolution):
    model, kwargs = tiny_denoiser(family, resolution=resolution)
    with torch.no_grad():
        eager = _first(model(**kwargs))
    ep = torch.export.export(model, (), kwargs, strict=False)
    with torch.no_grad():
        exported = _first(ep.module()(**kwargs))
    assert exported.shape == eager.shape
    assert (exported - eager).abs().max().item() == 0.0


def test_denoiser_two_sizes_differ():
    _, small = tiny_denoiser("flux", resolution=8)
    _, big = tiny_denoiser("flux", resolution=16)
    assert small["hidden_states"].shape[1] * 4 == big["hidden_states"].shape[1]


@pytest.mark.parametrize("kind", PIPELINE_KINDS)
def test_pipeline_deterministic(kind):
    pipe = tiny_pipeline(kind)
    a = pipe(**pipeline_call_kwargs(kind)).images
    b = pipe(**pipeline_call_kwargs(kind)).images
    c = tiny_pipeline(kind)(**pipeline_call_kwargs(kind)).images
    assert a.shape == (1, 64, 64, 3)
    assert np.isfinite(a).all() and a.std() > 0
    assert np.array_equal(a, b)
    assert np.array_equal(a, c)


def test_pixart_uses_batched_cfg(pixart_pipeline):
    batches = []
    handle = pixart_pipeline.transformer.register_forward_pre_hook(
        lambda mod, args, kw: batches.append((args[0] if args else kw["hidden_states"]).shape[0]),
        with_kwargs=True,
    )
    try:
        pixart_pipeline(**pipeline_call_kwargs("pixart"))
    finally:
        handle.remove()
    assert batches == [2] * 4


@pytest.mark.parametrize("kind", PIPELINE_KINDS)
def test_pipeline_save_load_roundtrip(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import DiffusionPipeline

    folder = saved_pipeline_folder(kind, tmp_path)
    assert list(folder.rglob("*.safetensors"))
    loaded = DiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == {"pixart": "PixArtSigmaPipeline", "flux": "FluxPipeline"}[kind]
    expected = tiny_pipeline(kind)(**pipeline_call_kwargs(kind)).images
    got = loaded(**pipeline_call_kwargs(kind)).images
    assert np.array_equal(expected, got)


@pytest.mark.gpu
def test_gpu_marker_runs_only_with_cuda_and_triton():
    import triton  # noqa: F401

    assert torch.cuda.is_available()


@pytest.mark.trt
def test_trt_marker_runs_only_with_tensorrt():
    import tensorrt  # noqa: F401
