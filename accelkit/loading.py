"""Load a pipeline from MODEL (folder, hub id or zoo name) and record what it passes its denoiser.

Loading is safe by construction: safetensors only, never remote code.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from accelkit.errors import InputError
from accelkit.pipeline_io import (  # record_*: re-exported, moved
    family_of,
    find_denoiser,
    record_denoiser_calls,
)

__all__ = ["DEFAULT_MODEL", "LoadedModel", "load_pipeline", "record_denoiser_calls", "weights_fingerprint"]

DEFAULT_MODEL = "zoo:shapes"


@dataclass
class LoadedModel:
    """A loaded pipeline and where it came from.

    Args:
        pipe: the diffusers pipeline.
        model_id: what the user named (``zoo:shapes``, a folder path or a hub id).
        source: ``"zoo"``, ``"folder"`` or ``"hub"``.
        denoiser_name: ``"transformer"`` or ``"unet"``.
    """

    pipe: Any
    model_id: str
    source: str
    denoiser_name: str

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)


def _load_folder(path: Path, dtype: torch.dtype) -> Any:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise InputError(
            f"'{path}' is not a diffusers pipeline folder (no model_index.json): pass a folder written by "
            "pipe.save_pretrained(...), a hub id, or a zoo name such as zoo:shapes"
        )
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"'{index_file}' is not valid JSON ({error.msg}): the pipeline folder is damaged") from None
    if not isinstance(index, dict):
        raise InputError(f"'{index_file}' does not hold a JSON object: the pipeline folder is damaged")
    class_name = index.get("_class_name")
    if not isinstance(class_name, str) or not class_name:
        raise InputError(f"'{index_file}' names no pipeline class (no \"_class_name\"): the pipeline folder is "
                         "damaged; write it again with pipe.save_pretrained(...)")
    if class_name == "ShapesPipeline":
        from accelkit.zoo.shapes.pipeline import ShapesPipeline

        return ShapesPipeline.from_pretrained(str(path), torch_dtype=dtype, use_safetensors=True)
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, AttributeError) as error:
        # AttributeError: model_index.json names a class diffusers does not have.
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"could not load the pipeline in '{path}': {first}") from error


def _load_hub(model_id: str, dtype: torch.dtype) -> Any:
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(model_id, torch_dtype=dtype, use_safetensors=True)
    except Exception as error:  # noqa: BLE001 - network, auth and format failures all end here
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(
            f"could not load '{model_id}' from the Hugging Face hub ({first}); without network access, "
            "pass a local pipeline folder or a zoo name such as zoo:shapes"
        ) from error


def load_pipeline(model: str | None = None, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load MODEL: a local diffusers folder, a hub id, or ``zoo:<name>`` (default ``zoo:shapes``).

    Args:
        model: what to load; None loads the embedded default model.
        device: where to put the pipeline.
        dtype: weights dtype.

    Raises:
        InputError: the path does not exist, is not a pipeline folder, the hub cannot be reached, the
            zoo name is unknown, or the pipeline has no transformer/unet.
    """
    model_id = model or DEFAULT_MODEL
    _quiet_libraries()
    if model_id.startswith("zoo:"):
        from accelkit.zoo import load_zoo_pipeline

        pipe = load_zoo_pipeline(model_id.removeprefix("zoo:"), device="cpu", dtype=dtype)
        source = "zoo"
    else:
        path = Path(model_id).expanduser()
        looks_like_path = path.exists() or model_id.startswith((".", "/", "~")) or os.sep in model_id.strip("/")
        if path.exists():
            if not path.is_dir():
                raise InputError(f"'{model_id}' is a file, not a pipeline folder: pass the folder that holds model_index.json")
            pipe = _load_folder(path, dtype)
            source = "folder"
        elif looks_like_path and model_id.count("/") != 1:
            raise InputError(f"no such path '{model_id}': pass an existing pipeline folder, a hub id or zoo:shapes")
        elif model_id.count("/") == 1 and not model_id.startswith(("/", ".")):
            pipe = _load_hub(model_id, dtype)
            source = "hub"
        else:
            raise InputError(f"no such path '{model_id}': pass an existing pipeline folder, a hub id or zoo:shapes")
    denoiser_name, _ = find_denoiser(pipe)
    family_of(pipe).prepare(pipe)
    pipe = pipe.to(device)
    getattr(pipe, denoiser_name).eval()
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe=pipe, model_id=model_id, source=source, denoiser_name=denoiser_name)


def _quiet_libraries() -> None:
    """Silence diffusers' and transformers' loading chatter (progress bars, the 'install accelerate' hint).

    transformers 5 draws a "Loading weights" bar on stderr for every text encoder, which would sit in front
    of accelkit's one-line error messages.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 fingerprint of a module's weights: names, shapes, dtypes and the tensor bytes.

    Tensors above 4 Mi elements contribute a strided sample plus their sum, so fingerprinting a
    12B-parameter model stays fast while any retraining or quantization still changes the hash.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1).cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        if flat.numel() > (1 << 22):
            stride = flat.numel() // (1 << 20)
            sample = flat[::stride].contiguous()
            digest.update(sample.view(torch.uint8).numpy().tobytes())
            digest.update(repr(float(flat.double().sum())).encode())
        else:
            digest.update(flat.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
