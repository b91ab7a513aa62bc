"""HiDream generates at its transformer's max_resolution area, not at the pipeline's hard-coded 1024 x 1024."""

from __future__ import annotations

from types import SimpleNamespace

from accelkit.families import traits_for
from accelkit.families.hidream import generate_at_the_transformers_resolution


def _pipe(max_resolution):
    return SimpleNamespace(default_sample_size=128,
                           transformer=SimpleNamespace(config=SimpleNamespace(max_resolution=max_resolution)))


def test_released_model_keeps_its_area_and_a_smaller_model_gets_its_own():
    released, small, wide = _pipe((128, 128)), _pipe((8, 8)), _pipe((4, 16))
    for pipe in (released, small, wide):
        generate_at_the_transformers_resolution(pipe)
    assert (released.default_sample_size, small.default_sample_size, wide.default_sample_size) == (128, 8, 8)


def test_the_tiny_pipeline_generates_the_requested_size_after_prepare():
    from tests.fixtures.families import build_family_pipeline

    pipe = build_family_pipeline("hidream")
    generate = {"prompt": "a cat", "height": 64, "width": 64, "num_inference_steps": 1, "max_sequence_length": 16,
                "output_type": "pt"}
    assert pipe(**generate).images.shape[-2:] == (1024, 1024)  # the pipeline's own rescaling
    traits_for(pipe).prepare(pipe)
    assert pipe(**generate).images.shape[-2:] == (64, 64)
