"""Pipeline I/O: find a pipeline's denoiser, record what the pipeline passes it, capture one call.

This sits right above ``capture`` (which it drives) and below everything that runs pipelines
(calibration, passes, runtime, search, CLI), so there is one copy of each: where the denoiser lives
and how its latent is passed come from the family traits (``accelkit.families``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from accelkit.errors import InputError
from accelkit.families import FamilyTraits, traits_for

_DENOISER_ATTRIBUTES = ("transformer", "unet")
# Pipeline arguments accelkit sets itself (or has an option for): a --call-arg naming one is refused.
RESERVED_CALL_ARGUMENTS = ("prompt", "num_inference_steps", "generator", "output_type", "sigmas", "timesteps",
                           "latents", "callback_on_step_end", "return_dict", "height", "width", "guidance_scale")


def find_denoiser(pipe: Any) -> tuple[str, torch.nn.Module]:
    """The attribute name and module of the pipeline's denoiser (the family's, else ``transformer``/``unet``)."""
    preferred = traits_for(pipe).denoiser_attribute
    for attribute in ((preferred,) if preferred else ()) + _DENOISER_ATTRIBUTES:
        module = getattr(pipe, attribute, None)
        if isinstance(module, torch.nn.Module):
            return attribute, module
    raise InputError(
        f"{type(pipe).__name__} has no 'transformer' or 'unet' component: accelkit optimizes the denoiser "
        "of a diffusers pipeline; pass a text-to-image pipeline folder"
    )


def family_of(pipe: Any) -> FamilyTraits:
    """The pipeline's family: by pipeline class, else by its denoiser's class."""
    traits = traits_for(pipe)
    if traits.name != "generic":
        return traits
    try:
        return traits_for(find_denoiser(pipe)[1])
    except InputError:
        return traits


def positional_parameter_names(module: torch.nn.Module) -> tuple[str, ...]:
    """Names of the parameters of ``type(module).forward`` that may be passed positionally, in order.

    Some pipelines pass the latent positionally (PixArt: ``transformer(latent_model_input, ...)``);
    accelkit works with keyword arguments, so positional values are bound to these names.
    """
    try:
        parameters = list(inspect.signature(type(module).forward).parameters.values())[1:]  # drop self
    except (TypeError, ValueError):
        return ()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in parameters if p.kind in kinds)


def bind_positional(names: tuple[str, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the positional ``args`` added under their parameter ``names``."""
    if len(args) > len(names):
        raise InputError(
            f"the denoiser was called with {len(args)} positional arguments but its forward names only "
            f"{len(names)}; accelkit needs keyword arguments"
        )
    bound = dict(zip(names, args, strict=False))
    clash = sorted(set(bound) & set(kwargs))
    if clash:
        raise InputError(f"denoiser argument(s) {clash} given both positionally and by keyword")
    return {**bound, **kwargs}


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {k: _detach(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_detach(v) for v in value)
    return value


class _EnoughCalls(Exception):
    """Raised by the recording hook once it has what was asked for; ends the pipeline call early."""


@contextlib.contextmanager
def observing_denoiser_calls(pipe: Any, on_call: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    """While inside, ``on_call(kwargs)`` runs before every call of the pipeline's denoiser.

    The one forward pre-hook accelkit installs: ``kwargs`` are the call's keyword arguments with
    positional ones bound to their parameter names (PixArt passes the latent positionally). The values
    are the pipeline's own tensors (copy what you keep); ``on_call`` may raise to end the generation.
    """
    _, denoiser = find_denoiser(pipe)
    positional = positional_parameter_names(denoiser)

    def hook(module: Any, args: Any, kwargs: Any) -> None:
        on_call(bind_positional(positional, args, dict(kwargs)))

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def record_denoiser_calls(pipe: Any, *, max_calls: int | None = None, **call_kwargs: Any) -> list[dict[str, Any]]:
    """Run the pipeline once and return the keyword arguments of every denoiser call, in order.

    Args:
        pipe: the pipeline.
        max_calls: stop the generation before the denoiser runs call ``max_calls + 1`` (None: run to the
            end). With 1 the denoiser never runs: a capture needs only the first call's arguments, and a
            video pipeline at its default size (HunyuanVideo: 129 frames at 720x1280) would otherwise
            spend minutes of CPU on steps whose results nobody reads.
        **call_kwargs: arguments of the pipeline call (prompt, num_inference_steps, ...).

    Raises:
        InputError: the pipeline rejects the arguments (its own ``ValueError``, in one line) or never
            calls its denoiser.
    """
    calls: list[dict[str, Any]] = []

    def record(kwargs: dict[str, Any]) -> None:
        calls.append(_detach(kwargs))
        if max_calls is not None and len(calls) >= max_calls:
            raise _EnoughCalls

    try:
        with observing_denoiser_calls(pipe, record), torch.no_grad():
            pipe(**call_kwargs)
    except _EnoughCalls:
        pass
    except (ValueError, TypeError) as error:
        # The pipeline's own argument checks ("Invalid sample size", "height must be divisible by 16").
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(
            f"{type(pipe).__name__} rejected the generation settings: {first}; change --height/--width or "
            "pass the pipeline argument it needs with --call-arg KEY=VALUE"
        ) from error
    if not calls:
        raise InputError(f"{type(pipe).__name__} never called its denoiser during a generation")
    return calls


def call_signature_defaults(pipe: Any) -> dict[str, Any]:
    """Default values of the pipeline's own ``__call__`` keyword parameters (those that have one)."""
    try:
        parameters = inspect.signature(type(pipe).__call__).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def scheduler_with(scheduler: Any, overrides: Mapping[str, Any]) -> Any:
    """A new scheduler of ``scheduler``'s class and config with ``overrides`` set; ``scheduler`` is unchanged.

    Raises:
        InputError: the scheduler's config has no such key (the plan was made for another scheduler).
    """
    config = dict(getattr(scheduler, "config", {}))
    missing = sorted(key for key in overrides if key not in config)
    if missing:
        raise InputError(
            f"{type(scheduler).__name__} has no {', '.join(missing)} setting, which the plan sets: use the "
            "scheduler the plan was made with, or optimize again"
        )
    # As keyword arguments: from_config drops config keys listed in ``_use_default_values``.
    return type(scheduler).from_config(config, **overrides)


def accepts_argument(pipe: Any, name: str, *, through_var_keyword: bool = False) -> bool:
    """Whether the pipeline's ``__call__`` names ``name`` (or, optionally, takes any keyword via ``**kwargs``)."""
    try:
        parameters = inspect.signature(type(pipe).__call__).parameters
    except (TypeError, ValueError):
        return False
    if name in parameters:
        return True
    return through_var_keyword and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def generation_defaults(pipe: Any) -> dict[str, Any]:
    """Resolution and guidance a pipeline generates with when the user gives none.

    The resolution is the denoiser's ``sample_size`` times the VAE scale factor (512 when unknown); the
    guidance scale is the family's, else the default of the pipeline's own ``__call__`` signature. Video
    pipelines (those taking ``num_frames``) add ``num_frames``; see :func:`video_generation_defaults`.
    """
    traits = family_of(pipe)
    try:
        config = getattr(find_denoiser(pipe)[1], "config", None)
    except InputError:
        config = None
    sample = getattr(config, "sample_size", None)
    if isinstance(sample, list | tuple) and sample:
        sample = sample[0]
    scale = getattr(pipe, "vae_scale_factor", 8)
    size = int(sample) * int(scale) if isinstance(sample, int) and isinstance(scale, int) else 512
    guidance = traits.default_guidance
    if guidance is None:
        signature_default = call_signature_defaults(pipe).get("guidance_scale")
        guidance = float(signature_default) if isinstance(signature_default, int | float) else None
    defaults = {"height": size, "width": size, "guidance_scale": guidance}
    if accepts_argument(pipe, "num_frames"):
        defaults.update(video_generation_defaults(pipe, config))
    return defaults


def video_generation_defaults(pipe: Any, config: Any) -> dict[str, Any]:
    """Frame count and resolution a video pipeline generates with by default.

    The pipeline's own ``__call__`` defaults (Wan: 81 frames at 480x832) where it names them; where it
    leaves them to the model (``None``: CogVideoX, Mochi), the pipeline's ``default_height``/
    ``default_width`` or the denoiser's ``sample_height``/``sample_width``/``sample_frames`` config.
    """
    signature = call_signature_defaults(pipe)
    spatial = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", 8)
    defaults: dict[str, Any] = {}
    for key in ("height", "width"):
        value = signature.get(key)
        if not isinstance(value, int):
            value = getattr(pipe, f"default_{key}", None)
        if not isinstance(value, int) and isinstance(getattr(config, f"sample_{key}", None), int):
            value = int(getattr(config, f"sample_{key}")) * int(spatial)
        if isinstance(value, int):
            defaults[key] = value
    frames = signature.get("num_frames")
    if not isinstance(frames, int):
        frames = getattr(config, "sample_frames", None)
    if isinstance(frames, int):
        defaults["num_frames"] = frames
    return defaults


def outputs_per_prompt(pipe: Any, count: int) -> dict[str, int]:
    """The call argument asking ``pipe`` for ``count`` outputs per prompt (``num_videos_per_prompt`` on video).

    Raises:
        InputError: ``count`` > 1 on a pipeline that takes neither argument.
    """
    for name in ("num_images_per_prompt", "num_videos_per_prompt"):
        if accepts_argument(pipe, name):
            return {name: count}
    if count != 1:
        raise InputError(f"{type(pipe).__name__} makes one output per prompt: use --num-images 1")
    return {}


def parse_call_arguments(pairs: list[str] | tuple[str, ...] | None) -> dict[str, Any]:
    """``KEY=VALUE`` strings to a dict: VALUE parsed as JSON, else kept as a string.

    Raises:
        InputError: an item has no ``=``, an empty key, or names an argument accelkit sets itself.
    """
    import json

    result: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, raw = str(pair).partition("=")
        key = key.strip()
        if not sep or not key or not key.isidentifier():
            raise InputError(f"--call-arg '{pair}' must read KEY=VALUE with a Python identifier as KEY, "
                             "e.g. --call-arg max_sequence_length=128")
        if key in RESERVED_CALL_ARGUMENTS:
            option = f" (use --{key.replace('_', '-')})" if key in ("height", "width", "guidance_scale") else ""
            raise InputError(f"--call-arg {key} is set by accelkit itself{option}; pass other pipeline arguments")
        try:
            result[key] = json.loads(raw)
        except json.JSONDecodeError:
            result[key] = raw
    return result


def pipeline_call_arguments(pipe: Any, generation: Mapping[str, Any], user: Mapping[str, Any] | None = None
                            ) -> dict[str, Any]:
    """The extra pipeline arguments of a generation: the family's needs, overridden by the user's.

    Raises:
        InputError: a user argument the pipeline's ``__call__`` does not take.
    """
    user = dict(user or {})
    unknown = sorted(k for k in user if not accepts_argument(pipe, k, through_var_keyword=True))
    if unknown:
        raise InputError(f"{type(pipe).__name__} takes no argument(s) {unknown}: check the --call-arg names "
                         "against the pipeline's __call__")
    needed = family_of(pipe).call_arguments(pipe, generation)
    return {**{k: v for k, v in needed.items() if accepts_argument(pipe, k)}, **user}


def with_call_arguments(pipe: Any, generation: Mapping[str, Any], user: Mapping[str, Any] | None = None
                        ) -> dict[str, Any]:
    """``generation`` plus ``call_arguments`` (family needs and the user's), the key left out when empty.

    The result is what a plan and a study store: everything a later process passes the pipeline.
    """
    result = {k: v for k, v in generation.items() if k != "call_arguments"}
    arguments = pipeline_call_arguments(pipe, result, {**generation.get("call_arguments", {}), **(user or {})})
    if arguments:
        result["call_arguments"] = arguments
    return result


def generation_call_kwargs(generation: Mapping[str, Any]) -> dict[str, Any]:
    """Pipeline keyword arguments of stored generation settings (None values left to the pipeline)."""
    kwargs = {k: v for k, v in generation.items() if k not in ("probe_prompt", "call_arguments") and v is not None}
    return {**kwargs, **generation.get("call_arguments", {})}


def probe_and_capture(pipe: Any, generation: Mapping[str, Any], *, prompt: str = "a photo"
                      ) -> tuple[list[dict[str, Any]], Any]:
    """Record the first denoiser call of a 2-step latent generation (the denoiser does not run) and capture it.

    Args:
        pipe: the pipeline.
        generation: ``height``, ``width``, ``guidance_scale`` (None: the pipeline's default), optionally
            ``num_frames`` for video pipelines and ``call_arguments`` (see :func:`with_call_arguments`;
            when absent, the family's needs are added).
        prompt: the probe prompt.

    Returns:
        ``(calls, graph)``: the recorded keyword arguments of the first denoiser call (a one-item list) and the
        :class:`~accelkit.capture.graph.DenoiserGraph` of the first call.
    """
    from accelkit.capture import capture

    if "call_arguments" not in generation:
        generation = with_call_arguments(pipe, generation)
    kwargs = generation_call_kwargs(generation)
    calls = record_denoiser_calls(pipe, max_calls=1, prompt=prompt, num_inference_steps=2,
                                  generator=torch.Generator("cpu").manual_seed(0), output_type="latent", **kwargs)
    return calls, capture(find_denoiser(pipe)[1], calls[0])
