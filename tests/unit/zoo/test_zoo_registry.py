"""Zoo registry: names, errors, shipped weights and the calibration/evaluation prompt split."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import accelkit.zoo as zoo
from accelkit.errors import InputError


def test_list_and_unknown_name():
    assert zoo.list_zoo_models() == ["shapes"]
    with pytest.raises(InputError, match="unknown zoo model 'x': available: shapes"):
        zoo.load_zoo_pipeline("x")
    with pytest.raises(InputError):
        zoo.zoo_weights_path("nope")


def test_missing_weights_say_how_to_train(monkeypatch, tmp_path):
    missing = dataclasses.replace(zoo.ZOO_MODELS["shapes"], weights=tmp_path / "none")
    monkeypatch.setitem(zoo.ZOO_MODELS, "shapes", missing)
    with pytest.raises(InputError, match="train_zoo_shapes.py"):
        zoo.load_zoo_pipeline("shapes")


def test_shipped_weights_load_small_and_float32():
    path = zoo.zoo_weights_path("zoo:shapes")
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 12 * 1024 * 1024
    pipe = zoo.load_zoo_pipeline("zoo:shapes")
    assert pipe.transformer.dtype == torch.float32
    n_params = sum(p.numel() for m in (pipe.transformer, pipe.text_encoder) for p in m.parameters())
    assert n_params <= 12_000_000


def test_prompt_sets_are_fixed_and_disjoint():
    prompts = zoo.default_prompts("shapes")
    assert len(prompts) == 64 and len(set(prompts)) == 64
    assert prompts == zoo.default_prompts("zoo:shapes")
    calib, evaluation = zoo.calibration_prompts(), zoo.evaluation_prompts()
    assert calib + evaluation == prompts
    assert not set(calib) & set(evaluation)
    assert zoo.calibration_prompts(5) == calib[:5]
    assert zoo.evaluation_prompts(5) == evaluation[:5]
