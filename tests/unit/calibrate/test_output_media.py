"""Pipeline outputs to tensors (calibrate.output_media): images and video frames."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from accelkit.calibrate import output_media


def test_video_frames_keep_their_frame_axis():
    frames = torch.rand(1, 7, 3, 8, 8)
    assert torch.equal(output_media(SimpleNamespace(frames=frames)), frames)
    channels_last = frames.permute(0, 1, 3, 4, 2).numpy()
    assert torch.allclose(output_media(SimpleNamespace(frames=channels_last)), frames)


def test_images_are_batched_channels_first():
    images = np.random.default_rng(0).random((2, 8, 8, 3)).astype(np.float32)
    out = output_media(SimpleNamespace(images=images))
    assert out.shape == (2, 3, 8, 8)
