"""The procedural shapes data: deterministic, and images agree with their captions and labels."""

from __future__ import annotations

import torch

from accelkit.zoo.shapes.data import COLOUR_NAMES, COLOURS, POSITIONS, SHAPES, VOCABULARY, generate_batch


def _batch(seed: int, n: int = 128):
    return generate_batch(n, generator=torch.Generator().manual_seed(seed))


def test_same_seed_same_batch_other_seed_other_batch():
    a, b, c = _batch(0), _batch(0), _batch(1)
    assert torch.equal(a.images, b.images)
    assert a.captions == b.captions
    assert torch.equal(a.labels.colour, b.labels.colour)
    assert not torch.equal(a.images, c.images)


def test_images_shape_and_range():
    batch = _batch(0)
    assert batch.images.shape == (128, 3, 32, 32)
    assert batch.images.dtype == torch.float32
    assert batch.images.min() >= -1 and batch.images.max() <= 1


def test_captions_use_only_the_vocabulary_and_name_the_labelled_objects():
    batch = _batch(2, 256)
    vocab = set(VOCABULARY)
    labels = batch.labels
    for i, caption in enumerate(batch.captions):
        words = caption.split()
        assert set(words) <= vocab, caption
        n = int(labels.num_objects[i])
        colours = [w for w in words if w in COLOURS]
        shapes = [w for w in words if w in SHAPES]
        assert colours == [COLOUR_NAMES[int(c)] for c in labels.colour[i, :n]], caption
        assert shapes == [SHAPES[int(s)] for s in labels.shape[i, :n]], caption


def test_object_centres_have_the_labelled_colour():
    batch = _batch(3, 256)
    labels = batch.labels
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 127.5 - 1
    for i in range(256):
        for k in range(int(labels.num_objects[i])):
            x, y = int(labels.center_x[i, k]), int(labels.center_y[i, k])
            pixel = batch.images[i, :, y, x]
            expected = palette[labels.colour[i, k]]
            assert torch.allclose(pixel, expected, atol=0.02), (batch.captions[i], pixel, expected)


def test_positions_and_layouts_match_the_caption():
    batch = _batch(4, 512)
    labels = batch.labels
    for i, caption in enumerate(batch.captions):
        cx, cy = labels.center_x[i], labels.center_y[i]
        if int(labels.position[i]) >= 0:
            where = POSITIONS[int(labels.position[i])]
            assert where in caption
            x, y = float(cx[0]), float(cy[0])
            assert {
                "top": y <= 32 / 3,
                "bottom": y >= 64 / 3,
                "left": x <= 32 / 3,
                "right": x >= 64 / 3,
                "center": abs(x - 16) <= 3 and abs(y - 16) <= 3,
            }[where], (caption, x, y)
        if " left of " in caption or " , " in caption:
            n = int(labels.num_objects[i])
            assert (cx[1:n] > cx[: n - 1]).all(), caption
        if " above " in caption:
            assert cy[0] < cy[1], caption


def test_generates_on_the_generator_device():
    batch = generate_batch(4, generator=torch.Generator(device="cpu").manual_seed(0))
    assert batch.images.device.type == "cpu"
    assert len(batch.captions) == 4
