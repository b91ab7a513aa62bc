"""Up-front checks of command-line values: every bad value is refused before anything loads or is written.

Each check raises :class:`~accelkit.errors.InputError` with a one-line message that names the flag,
what was wrong and a value that works.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from accelkit.artifacts.outdir import check_writable_dir
from accelkit.errors import InputError

#: Sampler steps beyond this are a typo, not a schedule (diffusers' schedulers train on 1000 steps).
MAX_STEPS = 1000
#: Image sides beyond this allocate tens of GiB of latents and attention before failing.
MAX_SIDE = 8192
SIDE_MULTIPLE = 8
MAX_SEED = 2**32 - 1
MAX_GUIDANCE = 100.0


def check_steps(value: int | None, flag: str = "--steps") -> None:
    if value is not None and not 2 <= value <= MAX_STEPS:
        raise InputError(f"{flag} {value} is out of range: pass 2..{MAX_STEPS} sampler steps, e.g. {flag} 28")


def check_seed(value: int | None, flag: str = "--seed", *, span: int = 1) -> None:
    """``span`` seeds from ``value`` on are used (``run`` adds the prompt index)."""
    if value is not None and not 0 <= value <= MAX_SEED - (span - 1):
        raise InputError(f"{flag} {value} is out of range: pass an integer in 0..{MAX_SEED - (span - 1)}")


def check_side(value: int | None, flag: str) -> None:
    if value is None:
        return
    if value < SIDE_MULTIPLE or value % SIDE_MULTIPLE:
        nearest = max(SIDE_MULTIPLE, value // SIDE_MULTIPLE * SIDE_MULTIPLE)
        raise InputError(f"{flag} {value} is not a positive multiple of {SIDE_MULTIPLE}: pass e.g. {flag} {nearest}")
    if value > MAX_SIDE:
        raise InputError(f"{flag} {value} exceeds {MAX_SIDE} pixels: pass a smaller {flag}")


def check_finite(value: float | None, flag: str, *, low: float | None = None, high: float | None = None,
                 positive: bool = False) -> None:
    if value is None:
        return
    if not math.isfinite(value):
        raise InputError(f"{flag} {value} is not a finite number: pass a number such as {flag} 1")
    if positive and value <= 0:
        raise InputError(f"{flag} {value} must be greater than 0")
    if (low is not None and value < low) or (high is not None and value > high):
        raise InputError(f"{flag} {value} is out of range: pass {low:g}..{high:g}")


def check_at_least(value: int | None, flag: str, minimum: int) -> None:
    if value is not None and value < minimum:
        raise InputError(f"{flag} must be at least {minimum}, got {value}")


def check_device(text: str | None, flag: str = "--device") -> None:
    """A device torch understands, of a kind accelkit runs on, that exists on this machine."""
    if text is None:
        return
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise InputError(f"{flag} '{text}' is not a device: pass cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"{flag} '{text}': accelkit runs on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{flag} {text} was asked for but no CUDA GPU is visible; use {flag} cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InputError(f"{flag} {text}: this machine has {count} CUDA device(s), pass cuda:0..cuda:{count - 1}")


def check_text_file(path: str | None, flag: str) -> None:
    """A readable UTF-8 text file with at least one non-empty line."""
    if path is None:
        return
    from accelkit._io import read_prompt_file

    read_prompt_file(path, flag=flag)


def check_output_image(path: str, prompts: int) -> None:
    """``run --output``: a .png path whose targets are not directories and whose folder can be written."""
    output = Path(path)
    if output.suffix.lower() != ".png":
        raise InputError(f"--output '{output}' must end in .png")
    targets = [output] if prompts == 1 else [output.with_name(f"{output.stem}-{i}{output.suffix}")
                                             for i in range(prompts)]
    for target in targets:
        if target.exists() and not target.is_file():
            raise InputError(f"--output '{target}' exists and is not a file: pass another --output")
    check_writable_dir(output.parent if str(output.parent) else ".", "--output's folder")


def check_plan_dir_writable(out: str) -> None:
    """``export`` and ``distill`` write into the plan folder: refuse a read-only one before any work."""
    plans = Path(out) / "plans"
    if plans.is_dir() and not os.access(plans, os.W_OK | os.X_OK):
        raise InputError(f"'{plans}' is read-only: export and distill write into the plan folder; make it writable")
    for plan in plans.iterdir() if plans.is_dir() else ():
        if plan.is_dir() and not os.access(plan, os.W_OK | os.X_OK):
            raise InputError(f"'{plan}' is read-only: export and distill write into the plan folder; make it writable")


def _generation(args: argparse.Namespace) -> None:
    check_side(getattr(args, "height", None), "--height")
    check_side(getattr(args, "width", None), "--width")
    check_finite(getattr(args, "guidance_scale", None), "--guidance-scale", low=0.0, high=MAX_GUIDANCE)


def validate_args(args: argparse.Namespace) -> None:
    """Check every value of ``args`` that can be checked without loading a model."""
    command = args.command
    _generation(args)
    if command in ("optimize", "search"):
        check_steps(args.steps)
        check_seed(args.seed)
        check_device(args.device)
        check_at_least(args.num_prompts, "--num-prompts", 1)
        check_at_least(args.num_eval_prompts, "--num-eval-prompts", 1)
        check_at_least(args.num_val_prompts, "--num-val-prompts", 1)
        check_finite(args.min_psnr, "--min-psnr")
        check_text_file(args.prompts, "--prompts")
        check_text_file(args.eval_prompts, "--eval-prompts")
        if args.out is not None:
            check_writable_dir(args.out, "--out")
    elif command == "run":
        check_seed(args.seed, span=len(args.prompt))
        check_device(args.device)
        check_output_image(args.output, len(args.prompt))
    elif command == "report":
        check_device(args.device)
        check_finite(args.min_psnr, "--min-psnr")
        if args.storage is not None:
            check_writable_dir(args.out, "OUT")
    elif command == "export":
        check_plan_dir_writable(args.out)
    elif command == "distill":
        check_seed(args.seed)
        check_device(args.device)
        check_at_least(args.iterations, "--iterations", 1)
        check_at_least(args.batch_size, "--batch-size", 1)
        check_at_least(args.num_prompts, "--num-prompts", 1)
        check_at_least(args.num_eval_prompts, "--num-eval-prompts", 1)
        check_finite(args.lr, "--lr", positive=True)
        check_finite(args.feature_weight, "--feature-weight", low=0.0, high=math.inf)
        check_text_file(args.prompts, "--prompts")
        check_text_file(args.eval_prompts, "--eval-prompts")
        check_plan_dir_writable(args.out)
