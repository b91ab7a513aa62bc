"""``accelkit run``: load a plan onto its model (PyTorch, onnxruntime or TensorRT) and generate."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelkit.errors import InputError

BACKENDS = ("pytorch", "onnxruntime", "tensorrt")


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """The files written (in prompt order, then image order) and, with ``check``, the PSNR of the first
    prompt's images against the original pipeline."""

    written: tuple[Path, ...]
    check_psnr: float | None = None


def run_plan(out_dir: str | Path, budget: str | None = None, *, prompts: Sequence[str], output: str | Path,
             model: str | None = None, device: str = "cpu", backend: str = "pytorch", steps: int | None = None,
             strict_steps: bool = False, num_images: int = 1, num_frames: int | None = None, seed: int = 0,
             check: bool = False, call_args: Sequence[str] = ()) -> RunResult:
    """Generate ``num_images`` per prompt with the plan ``OUT/plans/<budget>`` and save them under ``output``.

    One output is written to ``output`` itself; several get ``-N`` suffixes. Videos: ``.png`` writes the
    frames side by side, ``.gif`` an animation. Prompt ``i`` generates with seed ``seed + i``.
    ``call_args`` are ``KEY=VALUE`` pipeline call arguments on top of the plan's.
    """
    if backend == "tensorrt":
        from accelkit.export.tensorrt import require_tensorrt

        require_tensorrt()
    from accelkit.pipeline_io import parse_call_arguments
    from accelkit.runtime.plan import read_plan

    arguments = parse_call_arguments(list(call_args))
    plan = read_plan(out_dir, budget)
    output = Path(output)
    video = "num_frames" in plan.data["generation"]
    if output.suffix.lower() not in ((".png", ".gif") if video else (".png",)):
        raise InputError(f"--output '{output}' must end in .png" + (" or .gif" if video else ""))
    loaded, accelerated, arguments = _load(out_dir, plan, model, device, backend, arguments)
    accelerated.strict_steps = strict_steps
    if num_images < 1 or (steps is not None and steps < 1):
        raise InputError("--num-images and --steps must be at least 1")
    if num_frames is not None:
        arguments["num_frames"] = num_frames
    from accelkit.pipeline_io import outputs_per_prompt

    call = {"num_inference_steps": steps, **outputs_per_prompt(loaded.pipe, num_images), **arguments}
    check_psnr = accelerated.check(prompts[0], seed=seed, **call) if check else None
    written = _generate(accelerated, prompts, output, num_images, seed, call)
    return RunResult(written=tuple(written), check_psnr=check_psnr)


def _load(out_dir: str | Path, plan: Any, model: str | None, device: str, backend: str,
          arguments: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """(the loaded pipeline, it with the plan applied on ``backend``, the call arguments checked against it)."""
    from accelkit.loading import load_pipeline
    from accelkit.pipeline_io import pipeline_call_arguments
    from accelkit.runtime.plan import load, load_onnx, load_tensorrt

    loaded = load_pipeline(model or plan.data["model"]["id"], device=device)
    arguments = pipeline_call_arguments(loaded.pipe, plan.data["generation"], arguments) if arguments else {}
    loader = {"onnxruntime": load_onnx, "tensorrt": load_tensorrt}.get(backend, load)
    return loaded, loader(out_dir, loaded.pipe, plan.budget), arguments


def _generate(accelerated: Any, prompts: Sequence[str], output: Path, num_images: int, seed: int,
              call: dict[str, Any]) -> list[Path]:
    import torch

    written = []
    count = len(prompts) * num_images
    for index, prompt in enumerate(prompts):
        result = accelerated(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed + index),
                             output_type="np", **call)
        for number, frames in enumerate(output_media(result)):
            position = index * num_images + number
            target = output if count == 1 else output.with_name(f"{output.stem}-{position}{output.suffix}")
            save_frames(frames, target)
            written.append(target)
    return written


def output_media(result: Any) -> list[list[Any]]:
    """Each output of a pipeline call as uint8 (H, W, C) frames: one frame per image, a video's frames."""
    import numpy as np

    batch = result.frames if hasattr(result, "frames") else result.images
    media = []
    for item in batch:
        array = np.asarray(item, dtype=np.float32)
        frames = list(array) if array.ndim == 4 else [array]
        media.append([(np.clip(f, 0, 1) * 255).round().astype(np.uint8) for f in frames])
    return media


def save_frames(frames: list[Any], target: Path) -> None:
    """Write frames atomically: ``.gif`` as an animation, ``.png`` side by side (one frame: the image)."""
    import numpy as np
    from PIL import Image

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    if target.suffix.lower() == ".gif":
        images = [Image.fromarray(f) for f in frames]
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=125, loop=0)
    else:
        Image.fromarray(np.concatenate(frames, axis=1)).save(tmp, format="PNG")
    tmp.replace(target)
