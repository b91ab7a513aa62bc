"""Video fidelity (report/metrics.py) and frame strips (report/render.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from accelkit.errors import InputError
from accelkit.report.metrics import PSNR_CAP_DB, fidelity, psnr, temporal_psnr, to_unit_video, video_fidelity
from accelkit.report.render import video_strips


def _videos(seed: int = 0, n: int = 2, f: int = 5, h: int = 12, w: int = 10) -> torch.Tensor:
    return torch.rand(n, f, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_video_fidelity_averages_every_frame():
    base = _videos(0)
    acc = (base + 0.05 * _videos(1)).clamp(0, 1)
    result = fidelity(acc, base)  # 5-D batches are routed to video_fidelity
    per_frame = psnr(acc.flatten(0, 1), base.flatten(0, 1)).reshape(2, 5)
    assert result["frames"] == 5
    assert result["per_image"]["psnr"] == pytest.approx(per_frame.mean(dim=1).tolist())
    assert result["psnr"] == pytest.approx(float(per_frame.mean()))
    assert 0 < result["ssim"] < 1 and len(result["per_image"]["ssim"]) == 2


def test_identical_videos_are_capped_and_json_safe():
    base = _videos(0)
    result = video_fidelity(base, base.clone())
    assert result["psnr"] == PSNR_CAP_DB and result["temporal_psnr"] == PSNR_CAP_DB and result["ssim"] == 1.0


def test_temporal_psnr_sees_flicker_that_frame_psnr_does_not():
    base = _videos(0).clamp(0.2, 0.8)
    steady = base + 0.05  # every frame off by the same amount: motion kept exactly
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0]).view(1, 5, 1, 1, 1)
    flicker = base + 0.05 * signs  # same per-frame error, alternating
    steady_metrics, flicker_metrics = video_fidelity(steady, base), video_fidelity(flicker, base)
    assert steady_metrics["psnr"] == pytest.approx(flicker_metrics["psnr"])
    assert temporal_psnr(steady, base).min() > 60
    # Frame differences are off by 0.1 everywhere: 10 * log10(1 / 0.01) = 20 dB.
    assert temporal_psnr(flicker, base).tolist() == pytest.approx([20.0, 20.0])
    assert math.isinf(float(temporal_psnr(base[:, :1], base[:, :1])[0]))


def test_channels_last_uint8_videos_are_made_float_first():
    base = _videos(0)
    as_uint8 = (base * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()  # (N, F, H, W, C)
    converted = to_unit_video(as_uint8)
    assert converted.shape == base.shape and converted.dtype == torch.float32
    assert (converted - base).abs().max() <= 0.5 / 255 + 1e-6
    with pytest.raises(InputError):
        video_fidelity(base, base[:, :4])
    with pytest.raises(InputError):
        to_unit_video(np.zeros((2, 3, 4)))


def test_frame_strips_show_at_most_eight_evenly_spaced_frames():
    videos = torch.zeros(2, 20, 3, 6, 4)
    for frame in range(20):
        videos[:, frame] = frame / 19
    strips = video_strips(videos)
    assert strips.shape == (2, 3, 6, 8 * 4 + 7 * 2)
    first, last = strips[0, 0, 0, 0], strips[0, 0, 0, -1]
    assert float(first) == 0.0 and float(last) == 1.0  # first and last frames included
    assert video_strips(videos[:, :3]).shape == (2, 3, 6, 3 * 4 + 2 * 2)
