"""Fidelity metrics between accelerated and baseline outputs of the same prompts and seeds.

Everything is computed in floating point on images in ``[0, 1]``: a known peer computes PSNR on
``uint8`` arrays, where ``a - b`` wraps around modulo 256 and the result is garbage. Here every input
goes through :func:`to_unit_float` first, which converts integers to float *before* any subtraction.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accelkit.errors import InputError

#: PSNR of identical images is +inf; means (and JSON, which has no infinity) use this cap instead.
PSNR_CAP_DB = 100.0

# skimage ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.
SSIM_SIGMA = 1.5
SSIM_WIN = 11  # skimage: 2 * int(truncate * sigma + 0.5) + 1 with truncate = 3.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

# torchvision's AlexNet checkpoint, the LPIPS backbone; looked up in the torch hub cache only.
_LPIPS_BACKBONE_FILE = "alexnet-owt-7be5be79.pth"


def to_unit_float(images: Any) -> torch.Tensor:
    """Convert a batch of images to a float32 tensor ``(N, C, H, W)`` in ``[0, 1]``.

    Accepted inputs: a PIL image or a sequence of them; a numpy array ``(H, W, C)``/``(N, H, W, C)``
    (``uint8`` is divided by 255, floats are taken as already in ``[0, 1]``) or ``(H, W)`` grey;
    a torch tensor ``(C, H, W)``/``(N, C, H, W)`` (``uint8`` divided by 255). Integer inputs are
    converted to float before anything else so that no later subtraction can wrap around.

    Args:
        images: the images, in any of the forms above.

    Returns:
        A float32 CPU tensor ``(N, C, H, W)`` clamped to ``[0, 1]``.
    """
    if isinstance(images, torch.Tensor):
        t = images.detach().cpu()
        if t.dtype == torch.uint8:
            t = t.to(torch.float32) / 255.0
        elif not t.is_floating_point():
            raise InputError(f"image tensor has dtype {t.dtype}; expected uint8 or a float dtype")
        t = t.to(torch.float32)
        if t.ndim == 3:
            t = t.unsqueeze(0)
        if t.ndim != 4:
            raise InputError(f"image tensor must be (C, H, W) or (N, C, H, W), got shape {tuple(t.shape)}")
        return t.clamp(0.0, 1.0).contiguous()
    if isinstance(images, np.ndarray):
        arr = images
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        elif np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"integer image arrays must be uint8, got {arr.dtype}")
        else:
            arr = arr.astype(np.float32)
        if arr.ndim == 2:
            arr = arr[None, :, :, None]
        elif arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4:
            raise InputError(f"image array must be (H, W[, C]) or (N, H, W, C), got shape {arr.shape}")
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).clamp(0.0, 1.0).contiguous()
    pil_image = _pil_image_class()
    if pil_image is not None and isinstance(images, pil_image):
        return to_unit_float(_pil_to_array(images))
    if isinstance(images, Sequence) and not isinstance(images, str | bytes):
        if len(images) == 0:
            raise InputError("empty image batch")
        parts = [to_unit_float(im) for im in images]
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) != 1:
            raise InputError(f"images in one batch must share a shape, got {sorted(shapes)}")
        return torch.cat(parts, dim=0)
    raise InputError(f"cannot interpret {type(images).__name__} as images")


def _pil_image_class() -> type | None:
    try:
        from PIL import Image
    except ImportError:  # pillow is a dependency, but metrics on tensors must not need it
        return None
    return Image.Image


def _pil_to_array(image: Any) -> np.ndarray:
    # RGBA / palette / 16-bit modes are normalised to 8-bit RGB (or L for grey) so that / 255 is right.
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def _pair(a: Any, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x = to_unit_float(a).to(torch.float64)
    y = to_unit_float(b).to(torch.float64)
    if x.shape != y.shape:
        raise InputError(f"image batches differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x, y


def psnr(a: Any, b: Any, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB, computed in float64.

    ``10 * log10(data_range**2 / MSE)`` with the MSE over channels and pixels of each image.
    Identical images give ``+inf`` (no noise); :func:`fidelity` caps such values at
    :data:`PSNR_CAP_DB` when averaging.

    Args:
        a: first batch of images (anything :func:`to_unit_float` accepts; uint8 is made float first).
        b: second batch, same shape as ``a``.
        data_range: the peak value of the images after conversion (1.0 for ``[0, 1]``).

    Returns:
        A float64 tensor ``(N,)``.
    """
    x, y = _pair(a, b)
    mse = (x - y).pow(2).flatten(1).mean(dim=1)
    # mse == 0 gives log10(inf) = inf, which is the honest answer for identical images.
    return 10.0 * torch.log10(torch.as_tensor(data_range, dtype=torch.float64) ** 2 / mse)


def _gaussian_kernel(win: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(win, dtype=torch.float64) - (win - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return g / g.sum()


def ssim(a: Any, b: Any, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity per image (mean over channels), computed in float64.

    Matches ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1, channel_axis=...)``: an 11-tap Gaussian window
    (sigma 1.5, normalised), K1 = 0.01, K2 = 0.03, the SSIM map averaged over the *valid* region
    (skimage filters with reflect padding, then crops the 5-pixel border that padding touched,
    which is exactly a valid convolution), per channel, then averaged over channels.

    Images smaller than 11 pixels on a side (skimage refuses them) use the largest odd window that
    fits, with the same sigma, so that tiny test models still get a number.

    Args:
        a: first batch of images (anything :func:`to_unit_float` accepts).
        b: second batch, same shape as ``a``.
        data_range: the peak value of the images after conversion (1.0 for ``[0, 1]``).

    Returns:
        A float64 tensor ``(N,)``; ``ssim(x, x) == 1``.
    """
    x, y = _pair(a, b)
    n, c, h, w = x.shape
    win = min(SSIM_WIN, h if h % 2 else h - 1, w if w % 2 else w - 1)
    if win < 1:
        raise InputError(f"images of size {h}x{w} are too small for SSIM")
    g = _gaussian_kernel(win, SSIM_SIGMA)
    # Separable filter: depthwise conv along H then W, one group per channel.
    kh = g.view(1, 1, win, 1).expand(c, 1, win, 1)
    kw = g.view(1, 1, 1, win).expand(c, 1, 1, win)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(torch.nn.functional.conv2d(t, kh, groups=c), kw, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    # Population (not sample) covariance: use_sample_covariance=False.
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(2).mean(dim=2).mean(dim=1)


def latent_rel_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Relative L2 error ``||a - b|| / ||b||`` per sample, in float64.

    Args:
        a: accelerated latents ``(N, ...)``.
        b: baseline latents, same shape; the reference in the denominator.

    Returns:
        A float64 tensor ``(N,)``; ``inf`` where ``b`` is all zeros and ``a`` is not, ``0`` where both are.
    """
    if a.shape != b.shape:
        raise InputError(f"latent batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    x = a.detach().cpu().to(torch.float64).flatten(1)
    y = b.detach().cpu().to(torch.float64).flatten(1)
    num = (x - y).norm(dim=1)
    den = y.norm(dim=1)
    return torch.where(num == 0, torch.zeros_like(num), num / den)


def _lpips_backbone_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / _LPIPS_BACKBONE_FILE


def lpips_status() -> tuple[bool, str]:
    """Say whether LPIPS can run here without touching the network.

    Returns:
        ``(True, "")`` when the ``lpips`` package and ``torchvision`` import and the AlexNet backbone
        and LPIPS linear weights are on disk; otherwise ``(False, reason)``.
    """
    if importlib.util.find_spec("lpips") is None:
        return False, "lpips not installed"
    if importlib.util.find_spec("torchvision") is None:
        return False, "lpips needs torchvision, which is not installed"
    try:
        lpips_mod = importlib.import_module("lpips")
    except Exception as exc:  # a broken install (e.g. torchvision/torch mismatch) must not break a report
        return False, f"lpips failed to import: {type(exc).__name__}: {exc}"
    backbone = _lpips_backbone_path()
    if not backbone.is_file():
        return False, f"lpips backbone weights not found locally at {backbone} (never downloaded)"
    linear = Path(lpips_mod.__file__).parent / "weights" / "v0.1" / "alex.pth"
    if not linear.is_file():
        return False, f"lpips linear weights not found at {linear}"
    return True, ""


_LPIPS_MODEL: Any = None


def lpips(a: Any, b: Any) -> tuple[torch.Tensor | None, str]:
    """LPIPS (AlexNet) per image, if it can run offline; never downloads anything.

    Args:
        a: first batch of images (anything :func:`to_unit_float` accepts).
        b: second batch, same shape as ``a``.

    Returns:
        ``(values, "")`` with a float64 tensor ``(N,)``, or ``(None, reason)`` when the ``lpips``
        package, ``torchvision`` or the weights are not available locally.
    """
    global _LPIPS_MODEL
    ok, reason = lpips_status()
    if not ok:
        return None, reason
    x, y = _pair(a, b)
    try:
        if _LPIPS_MODEL is None:
            lpips_mod = importlib.import_module("lpips")
            # The backbone file is in the hub cache (checked above), so torchvision loads it from disk.
            _LPIPS_MODEL = lpips_mod.LPIPS(net="alex", verbose=False).eval()
        with torch.no_grad():
            # LPIPS expects [-1, 1]; it has 3 input channels, so grey images are repeated.
            if x.shape[1] == 1:
                x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
            out = _LPIPS_MODEL(x.float() * 2 - 1, y.float() * 2 - 1)
    except Exception as exc:  # keep the report going: LPIPS is optional
        return None, f"lpips failed: {type(exc).__name__}: {exc}"
    return out.flatten().to(torch.float64), ""


def cap_psnr(value: float) -> float:
    """Cap a PSNR value at :data:`PSNR_CAP_DB` (identical images give +inf).

    Args:
        value: a PSNR in dB, possibly ``inf``.
    """
    return min(float(value), PSNR_CAP_DB)


def fidelity(accelerated: Any, baseline: Any) -> dict[str, Any]:
    """PSNR, SSIM and (when available) LPIPS of accelerated outputs against the baseline.

    The mean PSNR caps each image's PSNR at :data:`PSNR_CAP_DB` (100 dB) first, because identical
    images give +inf and one of them would otherwise make the mean infinite. Per-image PSNR values
    are capped the same way so that the result is valid JSON. Videos (5-D batches) go to
    :func:`video_fidelity`.

    Args:
        accelerated: accelerated outputs (anything :func:`to_unit_float` accepts, or videos
            ``(N, F, C, H, W)``).
        baseline: baseline outputs of the same prompts and seeds, same shape.

    Returns:
        ``{"psnr": float, "ssim": float, "lpips": float | None, "lpips_reason": str,
        "per_image": {"psnr": [...], "ssim": [...], "lpips": [...] | None}}``.
    """
    if is_video_batch(accelerated) or is_video_batch(baseline):
        return video_fidelity(accelerated, baseline)
    p = [cap_psnr(v) for v in psnr(accelerated, baseline).tolist()]
    s = ssim(accelerated, baseline).tolist()
    lp, reason = lpips(accelerated, baseline)
    lp_list = None if lp is None else lp.tolist()
    return {
        "psnr": float(np.mean(p)),
        "ssim": float(np.mean(s)),
        "lpips": None if lp_list is None else float(np.mean(lp_list)),
        "lpips_reason": reason,
        "per_image": {"psnr": p, "ssim": s, "lpips": lp_list},
    }


def is_video_batch(value: Any) -> bool:
    """Whether ``value`` is a batch of videos: a 5-D tensor or array ``(N, F, ...)``."""
    return isinstance(value, torch.Tensor | np.ndarray) and value.ndim == 5


def to_unit_video(videos: Any) -> torch.Tensor:
    """Convert a batch of videos to float32 ``(N, F, C, H, W)`` in ``[0, 1]``.

    Accepted: a tensor ``(N, F, C, H, W)`` (diffusers' ``output_type="pt"``) or an array
    ``(N, F, H, W, C)`` (``output_type="np"``); ``uint8`` is divided by 255 before anything else.

    Args:
        videos: the videos.
    """
    if isinstance(videos, np.ndarray):
        if videos.ndim != 5:
            raise InputError(f"video array must be (N, F, H, W, C), got shape {videos.shape}")
        n, f = videos.shape[:2]
        frames = to_unit_float(videos.reshape(n * f, *videos.shape[2:]))
    elif isinstance(videos, torch.Tensor):
        if videos.ndim != 5:
            raise InputError(f"video tensor must be (N, F, C, H, W), got shape {tuple(videos.shape)}")
        n, f = videos.shape[:2]
        frames = to_unit_float(videos.reshape(n * f, *videos.shape[2:]))
    else:
        raise InputError(f"cannot interpret {type(videos).__name__} as videos")
    return frames.reshape(n, f, *frames.shape[1:])


def temporal_psnr(a: Any, b: Any) -> torch.Tensor:
    """PSNR of the frame differences per video, in dB (float64): how well motion is kept.

    ``x[:, 1:] - x[:, :-1]`` of both videos compared like images (peak 1.0): a cached or pruned model
    that gets every frame roughly right but flickers between them scores low here while the
    per-frame PSNR stays high. Single-frame videos have no motion and give ``+inf``.

    Args:
        a: first batch of videos (anything :func:`to_unit_video` accepts).
        b: second batch, same shape.

    Returns:
        A float64 tensor ``(N,)``.
    """
    x, y = to_unit_video(a).to(torch.float64), to_unit_video(b).to(torch.float64)
    if x.shape != y.shape:
        raise InputError(f"video batches differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.shape[1] < 2:
        return torch.full((x.shape[0],), math.inf, dtype=torch.float64)
    dx, dy = x[:, 1:] - x[:, :-1], y[:, 1:] - y[:, :-1]
    mse = (dx - dy).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse)


def video_fidelity(accelerated: Any, baseline: Any) -> dict[str, Any]:
    """:func:`fidelity` for videos ``(N, F, C, H, W)``: every frame counts.

    PSNR and SSIM (and LPIPS when available) are computed per frame, frame PSNRs capped at
    :data:`PSNR_CAP_DB`, and averaged per video; the headline numbers average the videos. The
    temporal-consistency figure :func:`temporal_psnr` (capped the same way) is added.

    Returns:
        :func:`fidelity`'s keys (``per_image`` holds one value per video) plus ``"temporal_psnr"``,
        ``"frames"`` and ``per_image["temporal_psnr"]``.
    """
    x, y = to_unit_video(accelerated), to_unit_video(baseline)
    if x.shape != y.shape:
        raise InputError(f"video batches differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    n, f = x.shape[:2]
    flat_x, flat_y = x.reshape(n * f, *x.shape[2:]), y.reshape(n * f, *y.shape[2:])
    frame_psnr = psnr(flat_x, flat_y).clamp(max=PSNR_CAP_DB).reshape(n, f)
    frame_ssim = ssim(flat_x, flat_y).reshape(n, f)
    lp, reason = lpips(flat_x, flat_y)
    lp_list = None if lp is None else lp.reshape(n, f).mean(dim=1).tolist()
    p = frame_psnr.mean(dim=1).tolist()
    s = frame_ssim.mean(dim=1).tolist()
    t = [cap_psnr(v) for v in temporal_psnr(x, y).tolist()]
    return {
        "psnr": float(np.mean(p)),
        "ssim": float(np.mean(s)),
        "lpips": None if lp_list is None else float(np.mean(lp_list)),
        "lpips_reason": reason,
        "temporal_psnr": float(np.mean(t)),
        "frames": int(f),
        "per_image": {"psnr": p, "ssim": s, "lpips": lp_list, "temporal_psnr": t},
    }
