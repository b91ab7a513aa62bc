"""Tests of accelkit/loading.py: bad MODEL arguments, saved folders, hub offline, weights fingerprint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from accelkit.errors import InputError
from accelkit.loading import load_pipeline, record_denoiser_calls, weights_fingerprint
from tests.fixtures.tiny_models import (
    pipeline_call_kwargs,
    saved_pipeline_folder,
    tiny_denoiser,
    tiny_pipeline,
)

ROOT = Path(__file__).resolve().parents[2]


def _one_line_input_error(model: str) -> str:
    with pytest.raises(InputError) as info:
        load_pipeline(model)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_nonexistent_paths(tmp_path):
    assert "no such path" in _one_line_input_error(str(tmp_path / "missing"))
    assert "no such path" in _one_line_input_error("./definitely-not-here")
    assert "no such path" in _one_line_input_error("some/deep/missing/path")
    assert "no such path" in _one_line_input_error("plainword")


def test_empty_folder(tmp_path):
    message = _one_line_input_error(str(tmp_path))
    assert "model_index.json" in message


def test_file_instead_of_folder(tmp_path):
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"\0" * 16)
    assert "is a file" in _one_line_input_error(str(file))


def test_invalid_model_index_json(tmp_path):
    (tmp_path / "model_index.json").write_text("{ not json")
    assert "not valid JSON" in _one_line_input_error(str(tmp_path))


def test_model_index_not_an_object(tmp_path):
    (tmp_path / "model_index.json").write_text("[1, 2]")
    assert "model_index.json" in _one_line_input_error(str(tmp_path))


def test_model_index_unknown_class(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "NopePipeline"}))
    assert str(tmp_path) in _one_line_input_error(str(tmp_path))


def test_model_index_with_missing_components(tmp_path):
    index = {"_class_name": "PixArtSigmaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert "could not load" in _one_line_input_error(str(tmp_path))


def test_unknown_zoo_name():
    zoo = pytest.importorskip("accelkit.zoo")
    if not hasattr(zoo, "load_zoo_pipeline"):
        pytest.skip("accelkit.zoo has no load_zoo_pipeline yet")
    assert "nope" in _one_line_input_error("zoo:nope")


def test_saved_pipeline_folder_loads(tmp_path):
    folder = saved_pipeline_folder("pixart", tmp_path)
    loaded = load_pipeline(str(folder))
    assert loaded.source == "folder"
    assert loaded.model_id == str(folder)
    assert loaded.denoiser_name == "transformer"
    assert type(loaded.denoiser).__name__ == "PixArtTransformer2DModel"
    assert loaded.denoiser is loaded.pipe.transformer
    assert not loaded.denoiser.training
    assert weights_fingerprint(loaded.denoiser) == weights_fingerprint(tiny_pipeline("pixart").transformer)
    calls = record_denoiser_calls(loaded.pipe, **pipeline_call_kwargs("pixart"))
    assert len(calls) == pipeline_call_kwargs("pixart")["num_inference_steps"]


def test_hub_id_offline_is_input_error(tmp_path):
    code = (
        "from accelkit.loading import load_pipeline\n"
        "from accelkit.errors import InputError\n"
        "try:\n"
        "    load_pipeline('accelkit-test-org/no-such-model')\n"
        "except InputError as error:\n"
        "    print('INPUT_ERROR:' + str(error))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("INPUT_ERROR:")]
    assert len(lines) == 1, done.stdout[-2000:]
    message = lines[0].removeprefix("INPUT_ERROR:")
    assert "hub" in message and "accelkit-test-org/no-such-model" in message


def test_weights_fingerprint_changes_with_one_weight():
    model, _ = tiny_denoiser("dit")
    before = weights_fingerprint(model)
    assert before == weights_fingerprint(model)
    assert len(before) == 64
    parameter = next(model.parameters())
    with torch.no_grad():
        original = parameter.view(-1)[0].item()
        parameter.view(-1)[0] += 1e-3
        changed = weights_fingerprint(model)
        parameter.view(-1)[0] = original
    assert changed != before
    assert weights_fingerprint(model) == before


def test_weights_fingerprint_of_large_tensor():
    # Above 4 Mi elements only a strided sample and the sum are hashed: a change off the sample still shows.
    module = torch.nn.Linear(2048, 2049, bias=False)
    torch.nn.init.zeros_(module.weight)
    before = weights_fingerprint(module)
    with torch.no_grad():
        module.weight.view(-1)[12345] = 0.5
    assert weights_fingerprint(module) != before


def test_weights_fingerprint_sees_names_and_dtypes():
    a = torch.nn.Linear(4, 4)
    b = torch.nn.Linear(4, 4)
    b.load_state_dict(a.state_dict())
    assert weights_fingerprint(a) == weights_fingerprint(b)
    assert weights_fingerprint(a) != weights_fingerprint(a.to(torch.float64))
    wrapped = torch.nn.Sequential(b)
    assert weights_fingerprint(wrapped) != weights_fingerprint(a)
