"""ShapesPipeline on a tiny random model: FluxPipeline-style calls, custom schedules, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accelkit.zoo.shapes import build_pipeline
from accelkit.zoo.shapes.pipeline import ShapesPipeline, pack, unpack

TINY_TRANSFORMER = {
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": (4, 6, 6),
}
TINY_TEXT = {"hidden_dim": 32, "num_layers": 1, "num_heads": 2, "joint_attention_dim": 32, "pooled_dim": 32}


@pytest.fixture
def pipe() -> ShapesPipeline:
    p = build_pipeline(TINY_TRANSFORMER, TINY_TEXT, seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def _record_calls(pipe: ShapesPipeline) -> list[dict]:
    calls: list[dict] = []

    def hook(module, args, kwargs):
        calls.append({**kwargs, "scheduler_timesteps": pipe.scheduler.timesteps.clone(), "args": args})

    pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def test_pack_unpack_round_trip():
    x = torch.randn(2, 3, 32, 32)
    tokens = pack(x)
    assert tokens.shape == (2, 256, 12)
    assert torch.equal(unpack(tokens, 32, 32), x)


def test_transformer_called_like_flux_with_batched_cfg(pipe):
    calls = _record_calls(pipe)
    pipe(["a red circle", "a blue square"], num_inference_steps=3, guidance_scale=3.0, output_type="pt")
    assert len(calls) == 3  # one call per step: uncond and cond share the batch
    for call in calls:
        assert call["args"] == ()
        assert set(call) - {"scheduler_timesteps", "args"} == {
            "hidden_states",
            "timestep",
            "encoder_hidden_states",
            "pooled_projections",
            "txt_ids",
            "img_ids",
            "return_dict",
        }
        assert call["hidden_states"].shape == (4, 256, 12)
        assert call["timestep"].shape == (4,)
        assert call["encoder_hidden_states"].shape[0] == 4
        assert call["img_ids"].shape == (256, 3)
        assert call["return_dict"] is False
    calls.clear()
    pipe(["a red circle", "a blue square"], num_inference_steps=2, guidance_scale=1.0, output_type="pt")
    assert [c["hidden_states"].shape[0] for c in calls] == [2, 2]


def test_custom_sigmas_and_timesteps_reach_the_scheduler(pipe):
    calls = _record_calls(pipe)
    sigmas = [1.0, 0.8, 0.5, 0.2]
    pipe("a red circle", sigmas=sigmas, output_type="pt")
    assert len(calls) == 4
    expected = torch.tensor(sigmas) * 1000
    for i, call in enumerate(calls):
        torch.testing.assert_close(call["scheduler_timesteps"], expected)
        torch.testing.assert_close(call["timestep"], torch.full((2,), sigmas[i]))
    calls.clear()
    timesteps = [1000.0, 600.0, 300.0]
    pipe("a red circle", timesteps=timesteps, output_type="pt")
    assert len(calls) == 3
    torch.testing.assert_close(calls[0]["scheduler_timesteps"], torch.tensor(timesteps))


def test_output_types(pipe):
    kwargs = {"num_inference_steps": 2, "generator": torch.Generator().manual_seed(0)}
    assert pipe("a red circle", output_type="pt", **kwargs).images.shape == (1, 3, 32, 32)
    kwargs["generator"] = torch.Generator().manual_seed(0)
    images = pipe(["a red circle"], num_images_per_prompt=2, output_type="np", **kwargs).images
    assert images.shape == (2, 32, 32, 3) and images.min() >= 0 and images.max() <= 1
    kwargs["generator"] = torch.Generator().manual_seed(0)
    assert pipe("a red circle", output_type="latent", **kwargs).images.shape == (1, 256, 12)
    kwargs["generator"] = torch.Generator().manual_seed(0)
    assert pipe("a red circle", **kwargs).images[0].size == (32, 32)


def test_save_load_round_trip_gives_identical_images(pipe, tmp_path):
    prompts = ["a red circle", "a small blue square on the left"]

    def sample(p):
        return p(prompts, num_inference_steps=3, generator=torch.Generator().manual_seed(7), output_type="np")

    before = sample(pipe).images
    pipe.save_pretrained(tmp_path)
    loaded = ShapesPipeline.from_pretrained(tmp_path, use_safetensors=True)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.transformer.dtype == torch.float32
    assert loaded.text_encoder.config.vocabulary == pipe.text_encoder.config.vocabulary
    np.testing.assert_array_equal(sample(loaded).images, before)


def test_tokenizer_unknown_words_and_unconditional_caption(pipe):
    encoder = pipe.text_encoder
    ids = encoder.tokenize(["a red circle", "a zebra circle", ""])
    assert ids.shape == (3, encoder.config.max_length)
    assert ids[1, 2] == 1  # UNK
    assert (ids[2, 1:] == 0).all()  # the empty caption is BOS + padding
    hidden, pooled = encoder(ids)
    assert hidden.shape == (3, encoder.config.max_length, 32)
    assert pooled.shape == (3, 32)


def test_callback_on_step_end_sees_and_replaces_tensors(pipe):
    seen = []

    def callback(pipeline, step, timestep, tensors):
        seen.append((step, float(timestep), sorted(tensors)))
        return {"latents": torch.zeros_like(tensors["latents"])} if step == 2 else {}

    kwargs = {"num_inference_steps": 3, "output_type": "latent"}
    latents = pipe("a red circle", callback_on_step_end=callback,
                   callback_on_step_end_tensor_inputs=["latents", "pooled_projections"], **kwargs).images
    assert [s[0] for s in seen] == [0, 1, 2]
    assert seen[0][2] == ["latents", "pooled_projections"]
    assert torch.equal(latents, torch.zeros_like(latents))  # the last step's returned latents are the output
    with pytest.raises(ValueError, match="not among"):
        pipe("a red circle", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise"], **kwargs)


def test_generator_lists_latents_and_return_dict(pipe):
    kwargs = {"num_inference_steps": 2, "output_type": "pt"}
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    pair = pipe(["a red circle", "a red circle"], generator=generators, **kwargs).images
    single = pipe("a red circle", generator=torch.Generator().manual_seed(2), **kwargs).images
    assert torch.equal(pair[1], single[0])  # each image follows its own generator
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    from_latents = pipe("a red circle", latents=noise, return_dict=False, **kwargs)
    assert isinstance(from_latents, tuple)
    seeded = pipe("a red circle", generator=torch.Generator().manual_seed(5), **kwargs).images
    assert torch.equal(from_latents[0], seeded)
