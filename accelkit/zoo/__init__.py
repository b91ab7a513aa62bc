"""Model zoo: small, really-trained diffusion models shipped inside the package.

``zoo:shapes`` is the default model accelkit optimizes and the basis of its fidelity numbers: a
caption-to-image Flux transformer (pixel space, 32x32) trained on procedural coloured shapes with
``examples/train_zoo_shapes.py``. Its weights live in ``accelkit/zoo/shapes/weights/`` in the layout
``DiffusionPipeline.save_pretrained`` writes.

Prompt sets: :func:`default_prompts` returns 64 fixed captions, the first 32 for calibration
(:func:`calibration_prompts`) and the last 32 held out for evaluation (:func:`evaluation_prompts`).
The two halves are disjoint, so fidelity is never measured on the prompts a pass was calibrated on.
Each half has all 24 colour x shape pairs as one-object captions (a different modifier in each half)
plus 8 two- and three-object captions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from accelkit.errors import InputError

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

__all__ = [
    "ZOO_MODELS",
    "ZooModel",
    "calibration_prompts",
    "default_prompts",
    "evaluation_prompts",
    "list_zoo_models",
    "load_zoo_pipeline",
    "zoo_weights_path",
]

_ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True, kw_only=True)
class ZooModel:
    """What the zoo knows about one shipped model.

    Args:
        name: registry name (also accepted as ``"zoo:<name>"``).
        description: one line for listings.
        weights: folder holding ``model_index.json`` and the component subfolders.
        height: training resolution (pixels).
        width: training resolution (pixels).
        num_inference_steps: default sampler steps.
        guidance_scale: default classifier-free guidance weight.
        train_script: how to (re)create the weights.
    """

    name: str
    description: str
    weights: Path
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    train_script: str


ZOO_MODELS: dict[str, ZooModel] = {
    "shapes": ZooModel(
        name="shapes",
        description="32x32 coloured shapes from captions; pixel-space FluxTransformer2DModel (2+4 blocks, 5.4M)",
        weights=_ROOT / "shapes" / "weights",
        height=32,
        width=32,
        num_inference_steps=20,
        guidance_scale=3.0,
        train_script="examples/train_zoo_shapes.py",
    ),
}


def _model(name: str) -> ZooModel:
    key = name.removeprefix("zoo:")
    if key not in ZOO_MODELS:
        raise InputError(f"unknown zoo model {name!r}: available: {', '.join(ZOO_MODELS)}")
    return ZOO_MODELS[key]


def list_zoo_models() -> list[str]:
    """Names of the zoo's models."""
    return list(ZOO_MODELS)


def zoo_weights_path(name: str) -> Path:
    """Folder of a zoo model's weights (it may not exist yet in a fresh checkout without weights)."""
    return _model(name).weights


def load_zoo_pipeline(
    name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> DiffusionPipeline:
    """Load a shipped zoo model as a diffusers pipeline.

    Args:
        name: ``"shapes"`` or ``"zoo:shapes"``.
        device: where to put the pipeline.
        dtype: parameter dtype (default float32; weights are stored as float16).

    Raises:
        InputError: unknown name, or the weights folder is missing.
    """
    import torch

    model = _model(name)
    if not (model.weights / "model_index.json").is_file():
        raise InputError(
            f"zoo model {model.name!r} has no weights at {model.weights}: "
            f"train them with `python {model.train_script}`"
        )
    if model.name == "shapes":
        from accelkit.zoo.shapes.pipeline import ShapesPipeline

        pipe = ShapesPipeline.from_pretrained(
            model.weights, use_safetensors=True, torch_dtype=dtype or torch.float32
        )
    else:  # pragma: no cover - every registered model has a branch above
        raise InputError(f"zoo model {model.name!r} has no loader")
    return pipe.to(device)


def _shapes_prompts() -> list[str]:
    from accelkit.zoo.shapes.data import COLOUR_NAMES, SHAPES

    modifiers = [
        "",
        "small",
        "large",
        "at the top",
        "at the bottom",
        "on the left",
        "on the right",
        "in the center",
    ]

    def single(colour: str, shape: str, modifier: str) -> str:
        article = "an" if colour[0] in "aeiou" else "a"
        if modifier in ("small", "large"):
            return f"a {modifier} {colour} {shape}"
        return f"{article} {colour} {shape} {modifier}".strip()

    def noun(colour: str, shape: str) -> str:
        return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"

    pairs = [(c, s) for c in COLOUR_NAMES for s in SHAPES]
    # A different modifier per half keeps the halves disjoint while both cover every colour x shape.
    halves = [
        [single(c, s, modifiers[i % 8]) for i, (c, s) in enumerate(pairs)],
        [single(c, s, modifiers[(i + 3) % 8]) for i, (c, s) in enumerate(pairs)],
    ]
    rng = random.Random(0)  # fixed: the prompt sets are part of the model's contract
    multi: list[str] = []
    while len(multi) < 16:
        colours = rng.sample(COLOUR_NAMES, 3)
        shapes = [rng.choice(SHAPES) for _ in range(3)]
        nouns = [noun(c, s) for c, s in zip(colours, shapes, strict=True)]
        template = rng.randrange(3)
        if template == 0:
            caption = f"{nouns[0]} left of {nouns[1]}"
        elif template == 1:
            caption = f"{nouns[0]} above {nouns[1]}"
        else:
            caption = f"{nouns[0]} , {nouns[1]} and {nouns[2]}"
        if caption not in multi:
            multi.append(caption)
    prompts: list[str] = []
    for h, half in enumerate(halves):
        order = random.Random(h + 1).sample(half, len(half))
        extra = multi[8 * h : 8 * h + 8]
        # Every fourth prompt is a multi-object one, so any prefix of a half is a mix.
        for i in range(8):
            prompts += [*order[3 * i : 3 * i + 3], extra[i]]
    return prompts


def default_prompts(name: str = "shapes") -> list[str]:
    """The model's 64 fixed prompts: 32 calibration prompts, then 32 held-out evaluation prompts."""
    model = _model(name)
    if model.name == "shapes":
        return _shapes_prompts()
    raise InputError(f"zoo model {model.name!r} has no prompt set")  # pragma: no cover


def calibration_prompts(n: int | None = None, *, name: str = "shapes") -> list[str]:
    """The first ``n`` (default all 32) calibration prompts; disjoint from :func:`evaluation_prompts`."""
    prompts = default_prompts(name)[:32]
    return prompts if n is None else prompts[:n]


def evaluation_prompts(n: int | None = None, *, name: str = "shapes") -> list[str]:
    """The first ``n`` (default all 32) held-out evaluation prompts."""
    prompts = default_prompts(name)[32:]
    return prompts if n is None else prompts[:n]
