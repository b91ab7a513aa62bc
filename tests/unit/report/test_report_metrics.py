"""Fidelity metrics: known answers, the uint8 trap, SSIM against a numpy port of skimage."""

from __future__ import annotations

import importlib.util
import math
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from accelkit.errors import InputError
from accelkit.report import metrics
from accelkit.report.metrics import (
    PSNR_CAP_DB,
    fidelity,
    latent_rel_l2,
    lpips,
    psnr,
    ssim,
    to_unit_float,
)


def _rand(n: int = 2, c: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g)


# --- PSNR -------------------------------------------------------------------------------------


@pytest.mark.parametrize("c", [0.5, 0.1, 0.01, 1 / 255])
def test_psnr_constant_offset(c: float) -> None:
    a = torch.full((2, 3, 16, 16), 0.25, dtype=torch.float64)
    b = a + c
    expected = 10 * math.log10(1 / c**2)
    assert torch.allclose(psnr(a, b), torch.full((2,), expected, dtype=torch.float64), atol=1e-6)


def test_psnr_known_noise_variance() -> None:
    # +-sigma noise of exactly known MSE sigma^2.
    sigma = 0.05
    a = torch.full((1, 3, 20, 20), 0.5)
    signs = torch.ones_like(a)
    signs[..., ::2, :] = -1
    b = a + sigma * signs
    assert psnr(a, b).item() == pytest.approx(10 * math.log10(1 / sigma**2), abs=1e-4)


def test_psnr_uint8_does_not_overflow() -> None:
    zeros = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    full = np.full((2, 8, 8, 3), 255, dtype=np.uint8)
    assert torch.allclose(psnr(zeros, full), torch.zeros(2, dtype=torch.float64))
    # 10 - 20 wraps to 246 in uint8; in float it is -10/255.
    a = np.full((1, 4, 4, 3), 10, dtype=np.uint8)
    b = np.full((1, 4, 4, 3), 20, dtype=np.uint8)
    assert psnr(a, b).item() == pytest.approx(20 * math.log10(255 / 10), abs=1e-4)
    ta = torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()
    tb = torch.from_numpy(b).permute(0, 3, 1, 2).contiguous()
    assert psnr(ta, tb).item() == pytest.approx(20 * math.log10(255 / 10), abs=1e-4)


def test_psnr_identical_is_inf_and_fidelity_caps() -> None:
    x = _rand()
    assert torch.isinf(psnr(x, x)).all()
    result = fidelity(x, x)
    assert result["psnr"] == PSNR_CAP_DB
    assert result["per_image"]["psnr"] == [PSNR_CAP_DB, PSNR_CAP_DB]
    assert result["ssim"] == pytest.approx(1.0)


def test_psnr_shape_mismatch() -> None:
    with pytest.raises(InputError):
        psnr(_rand(h=16), _rand(h=32))


# --- to_unit_float ----------------------------------------------------------------------------


def test_to_unit_float_forms() -> None:
    arr = np.random.default_rng(0).integers(0, 256, size=(2, 5, 6, 3), dtype=np.uint8)
    t = to_unit_float(arr)
    assert t.shape == (2, 3, 5, 6) and t.dtype == torch.float32
    assert torch.allclose(t, torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255)
    pils = [Image.fromarray(a) for a in arr]
    assert torch.equal(to_unit_float(pils), t)
    assert torch.equal(to_unit_float(pils[0]), t[:1])
    assert torch.equal(to_unit_float(arr.astype(np.float32) / 255), t)
    assert torch.equal(to_unit_float(t[0]), t[:1])
    grey = to_unit_float(Image.fromarray(arr[0, :, :, 0]))
    assert grey.shape == (1, 1, 5, 6)
    with pytest.raises(InputError):
        to_unit_float("not an image")
    with pytest.raises(InputError):
        to_unit_float([])


# --- SSIM -------------------------------------------------------------------------------------


def _np_gaussian_filter_reflect(img: np.ndarray, sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
    """scipy.ndimage.gaussian_filter(mode='reflect') ported to numpy (scipy is not installed here)."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * x**2 / sigma**2)
    k /= k.sum()
    out = img.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        # scipy 'reflect' == numpy 'symmetric' (edge sample repeated).
        padded = np.pad(out, pad, mode="symmetric")
        out = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), axis, padded)
    return out


def _np_ssim_skimage(a: np.ndarray, b: np.ndarray) -> float:
    """skimage structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1) on one (H, W) channel: filter full image with reflect padding, crop 5 px, mean."""
    f = _np_gaussian_filter_reflect
    ux, uy = f(a), f(b)
    vx = f(a * a) - ux * ux
    vy = f(b * b) - uy * uy
    vxy = f(a * b) - ux * uy
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = 5
    return float(s[pad:-pad, pad:-pad].mean())


def test_ssim_identity_and_symmetry() -> None:
    x, y = _rand(seed=1), _rand(seed=2)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(ssim(x, y), ssim(y, x))
    assert (ssim(x, y) < 0.2).all()


def test_ssim_constant_images_by_hand() -> None:
    # Constant images: variances and covariance vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 0.2, 0.6
    x = torch.full((1, 3, 16, 16), a)
    y = torch.full((1, 3, 16, 16), b)
    c1 = 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert ssim(x, y).item() == pytest.approx(expected, rel=1e-5)


def test_ssim_matches_numpy_port_of_skimage() -> None:
    x = _rand(n=1, c=3, h=24, w=30, seed=3)
    y = (x + 0.1 * _rand(n=1, c=3, h=24, w=30, seed=4)).clamp(0, 1)
    expected = np.mean([_np_ssim_skimage(x[0, c].numpy(), y[0, c].numpy()) for c in range(3)])
    assert ssim(x, y).item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="scikit-image not installed")
def test_ssim_matches_skimage() -> None:
    from skimage.metrics import structural_similarity

    x = _rand(n=1, c=3, h=40, w=36, seed=5)
    y = (x * 0.8 + 0.2 * _rand(n=1, c=3, h=40, w=36, seed=6)).clamp(0, 1)
    ref = structural_similarity(
        x[0].permute(1, 2, 0).numpy().astype(np.float64),
        y[0].permute(1, 2, 0).numpy().astype(np.float64),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        channel_axis=2,
    )
    assert ssim(x, y).item() == pytest.approx(ref, abs=1e-5)


def test_ssim_tiny_images_still_work() -> None:
    x = _rand(n=1, h=8, w=8)
    assert ssim(x, x).item() == pytest.approx(1.0)


# --- latents, LPIPS ---------------------------------------------------------------------------


def test_latent_rel_l2() -> None:
    b = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    a = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    assert torch.allclose(latent_rel_l2(a, b), torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert latent_rel_l2(torch.zeros(1, 4), torch.zeros(1, 4)).item() == 0.0


def test_lpips_absent_gives_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "lpips" else real(n, *a))
    value, reason = lpips(_rand(), _rand())
    assert value is None and "not installed" in reason
    assert fidelity(_rand(), _rand(seed=1))["lpips"] is None


def test_lpips_without_local_weights_never_downloads(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    fake = types.ModuleType("lpips")
    fake.__file__ = str(tmp_path / "lpips" / "__init__.py")

    def boom(*args, **kwargs):  # constructing the model would download: must not be reached
        raise AssertionError("LPIPS model constructed without local weights")

    fake.LPIPS = boom
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n in ("lpips", "torchvision") else real(n, *a)
    )
    monkeypatch.setitem(sys.modules, "lpips", fake)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    value, reason = lpips(_rand(), _rand())
    assert value is None and "not found locally" in reason and "never downloaded" in reason
    assert metrics._LPIPS_MODEL is None
