"""The shipped ``zoo:shapes`` model is visibly trained: samples show the captioned colour and shape.

Random weights of the same architecture must fail the same checks, so the test can fail: a model that
does not follow its captions would make every cached/pruned variant look faithful for free.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from accelkit.zoo import evaluation_prompts, load_zoo_pipeline
from accelkit.zoo.shapes import build_pipeline
from accelkit.zoo.shapes.data import COLOUR_NAMES, COLOURS, SHAPES

pytestmark = pytest.mark.slow

PALETTE = np.array(list(COLOURS.values()), dtype=np.float64) / 255
# One-object evaluation prompts (all 24 colour x shape pairs).
PROMPTS = [p for p in evaluation_prompts() if sum(w in COLOURS for w in p.split()) == 1]


def _read(image: np.ndarray) -> tuple[str | None, str | None]:
    """(colour, shape) seen in one (32, 32, 3) image in [0, 1]."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    background = np.median(border, axis=0)
    foreground = np.linalg.norm(image - background, axis=-1) > 0.25
    if foreground.sum() < 4:
        return None, None
    mean = image[foreground].mean(axis=0)
    colour = COLOUR_NAMES[int(np.argmin(((PALETTE - mean) ** 2).sum(axis=1)))]
    # Fill ratio of the bounding box: square ~1, circle ~pi/4, triangle ~1/2.
    ys, xs = np.nonzero(foreground)
    fill = foreground.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    shape = "square" if fill > 0.88 else "circle" if fill > 0.65 else "triangle"
    return colour, shape


@functools.cache
def _scores(trained: bool) -> tuple[float, float]:
    pipe = load_zoo_pipeline("shapes") if trained else build_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    images = pipe(PROMPTS, num_inference_steps=20, generator=generators, output_type="np").images
    colour_ok = shape_ok = 0
    for image, prompt in zip(images, PROMPTS, strict=True):
        words = prompt.split()
        colour, shape = _read(image)
        colour_ok += colour in words
        shape_ok += shape in words
    return colour_ok / len(PROMPTS), shape_ok / len(PROMPTS)


def test_prompts_cover_every_colour_and_shape():
    assert len(PROMPTS) == 24
    assert {w for p in PROMPTS for w in p.split()} >= set(COLOUR_NAMES) | set(SHAPES)


def test_trained_model_draws_the_captioned_colour_and_shape():
    colour, shape = _scores(trained=True)
    assert colour >= 0.8, f"colour match {colour:.0%}"
    assert shape >= 0.8, f"shape match {shape:.0%}"


def test_random_weights_fail_the_same_check():
    colour, shape = _scores(trained=False)
    assert colour < 0.8, f"colour match {colour:.0%}"
    assert shape < 0.8, f"shape match {shape:.0%}"
