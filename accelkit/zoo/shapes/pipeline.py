"""``ShapesPipeline``: text-to-image sampling of the ``zoo:shapes`` model, called the way FluxPipeline is.

The denoiser is a diffusers ``FluxTransformer2DModel`` working directly in pixel space: a 32x32x3
image is packed into 2x2 patches exactly like FluxPipeline packs VAE latents, giving 16x16 = 256
tokens of 12 channels, with ``img_ids`` = (0, row, col) and ``txt_ids`` = zeros. Keeping the call
signature identical to FluxPipeline's (keyword arguments, ``timestep / 1000``, ``return_dict=False``)
is the point: accelkit captures and replaces the denoiser, and what works here must work on Flux.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from accelkit.zoo.shapes.text_encoder import ShapesTextEncoder

__all__ = ["ShapesPipeline", "image_ids", "pack", "unpack"]

PATCH = 2


def pack(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): 2x2 patches as tokens, FluxPipeline's ``_pack_latents`` order."""
    b, c, h, w = images.shape
    x = images.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack`: (B, N, 4C) -> (B, C, H, W)."""
    b, _, d = tokens.shape
    c = d // (PATCH * PATCH)
    x = tokens.view(b, height // PATCH, width // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """(H/2 * W/2, 3) RoPE positions (0, row, col) of the packed tokens, as FluxPipeline makes them."""
    h, w = height // PATCH, width // PATCH
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


class ShapesPipeline(DiffusionPipeline):
    """Caption -> 32x32 RGB image with a pixel-space Flux transformer and rectified-flow Euler sampling.

    Args:
        transformer: the denoiser (``in_channels`` = 12, ``patch_size`` = 1, ``guidance_embeds`` = False).
        text_encoder: caption encoder producing ``encoder_hidden_states`` and ``pooled_projections``.
        scheduler: flow-matching Euler scheduler; custom ``sigmas``/``timesteps`` go through its
            ``set_timesteps`` so ``scheduler.timesteps`` holds them during a call.
    """

    model_cpu_offload_seq = "text_encoder->transformer"
    _callback_tensor_inputs = ["latents", "encoder_hidden_states", "pooled_projections"]

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        text_encoder: ShapesTextEncoder,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> ShapesPipeline:
        """``DiffusionPipeline.from_pretrained``, but float32 unless a dtype is asked for.

        The shipped weights are stored as float16 to stay small; without this, whether they load as
        float16 or float32 would depend on whether ``accelerate`` happens to be installed.
        """
        if kwargs.get("torch_dtype") is None and kwargs.get("dtype") is None:
            kwargs["torch_dtype"] = torch.float32
        with warnings.catch_warnings():
            # diffusers >= 0.36 renames torch_dtype to dtype; older releases only know torch_dtype.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @torch.no_grad()
    def encode_prompt(
        self, prompt: list[str], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode captions; returns ``(encoder_hidden_states, pooled_projections, txt_ids)``."""
        ids = self.text_encoder.tokenize(prompt).to(device)
        hidden, pooled = self.text_encoder(ids)
        dtype = self.transformer.dtype
        txt_ids = torch.zeros(ids.shape[1], 3, device=device, dtype=dtype)
        return hidden.to(dtype), pooled.to(dtype), txt_ids

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int = 32,
        width: int = 32,
        timesteps: list[float] | None = None,
        sigmas: list[float] | None = None,
        num_images_per_prompt: int = 1,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images.

        Args:
            prompt: caption or captions (vocabulary of :mod:`accelkit.zoo.shapes.data`).
            num_inference_steps: sampler steps; ignored when ``sigmas`` or ``timesteps`` are given.
            guidance_scale: classifier-free guidance weight; > 1 runs [uncond, cond] as one batch.
            generator: seeds the float32 starting noise (a CPU generator works on any device).
            height: image height in pixels (multiple of 2; the model was trained at 32).
            width: image width in pixels (multiple of 2; the model was trained at 32).
            timesteps: custom descending timesteps in [0, 1000].
            sigmas: custom descending sigmas in (0, 1].
            num_images_per_prompt: images per caption.
            latents: starting noise, packed (B, N, 12) or as images (B, 3, H, W).
            output_type: ``"pil"``, ``"np"`` (B, H, W, 3 in [0, 1]), ``"pt"`` (B, 3, H, W in [0, 1]) or
                ``"latent"`` (packed tokens, like FluxPipeline).
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
            callback_on_step_end: called after every step as ``callback(pipe, step, timestep,
                tensors)`` with ``tensors`` the variables named in ``callback_on_step_end_tensor_inputs``;
                the values in the dict it returns replace them (diffusers' convention).
            callback_on_step_end_tensor_inputs: names from :attr:`_callback_tensor_inputs`
                (default ``["latents"]``).
        """
        tensor_inputs = list(callback_on_step_end_tensor_inputs or ["latents"])
        unknown = sorted(set(tensor_inputs) - set(self._callback_tensor_inputs))
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not among {self._callback_tensor_inputs}"
            )
        if height % PATCH or width % PATCH:
            raise ValueError(f"height and width must be multiples of {PATCH}, got {height}x{width}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        batch = len(prompts)
        device = self._execution_device
        do_cfg = guidance_scale > 1.0

        hidden, pooled, txt_ids = self.encode_prompt(([""] * batch if do_cfg else []) + prompts, device)
        dtype = self.transformer.dtype
        img_ids = image_ids(height, width, device, dtype)

        channels = self.transformer.config.in_channels // (PATCH * PATCH)
        if latents is None:
            noise = randn_tensor(
                (batch, channels, height, width), generator=generator, device=device, dtype=torch.float32
            )
            latents = pack(noise)
        else:
            latents = latents.to(device=device, dtype=torch.float32)
            if latents.ndim == 4:
                latents = pack(latents)

        if timesteps is not None:
            self.scheduler.set_timesteps(device=device, timesteps=timesteps)
        elif sigmas is not None:
            self.scheduler.set_timesteps(device=device, sigmas=sigmas)
        elif type(self.scheduler).__name__.startswith("FlowMatch"):
            # FluxPipeline's default: sigmas linspace(1, 1/N), so the last step lands exactly on 0.
            default = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps).tolist()
            self.scheduler.set_timesteps(num_inference_steps, device=device, sigmas=default)
        else:  # another sampler swapped in (e.g. DPM-Solver++ with use_flow_sigmas): its own spacing
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        step_timesteps = self.scheduler.timesteps
        self._num_timesteps = len(step_timesteps)

        with self.progress_bar(total=len(step_timesteps)) as progress_bar:
            for index, t in enumerate(step_timesteps):
                model_input = torch.cat([latents, latents]) if do_cfg else latents
                timestep = t.expand(model_input.shape[0]).to(dtype)
                noise_pred = self.transformer(
                    hidden_states=model_input.to(dtype),
                    timestep=timestep / 1000,
                    encoder_hidden_states=hidden,
                    pooled_projections=pooled,
                    txt_ids=txt_ids,
                    img_ids=img_ids,
                    return_dict=False,
                )[0].float()
                if do_cfg:
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    values = {"latents": latents, "encoder_hidden_states": hidden, "pooled_projections": pooled}
                    changed = callback_on_step_end(self, index, t, {k: values[k] for k in tensor_inputs}) or {}
                    latents = changed.get("latents", latents)
                    hidden = changed.get("encoder_hidden_states", hidden)
                    pooled = changed.get("pooled_projections", pooled)
                progress_bar.update()

        self.maybe_free_model_hooks()
        if output_type == "latent":
            images = latents
        else:
            images = (unpack(latents, height, width) / 2 + 0.5).clamp(0, 1)
            if output_type in ("np", "pil"):
                images = images.permute(0, 2, 3, 1).cpu().float().numpy()
                if output_type == "pil":
                    images = [Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]
            elif output_type != "pt":
                raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
