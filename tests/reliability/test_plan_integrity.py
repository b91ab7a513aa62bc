"""Plans are verified like shipped artifacts: tampered, missing or foreign files are refused, naming the file.

One tiny optimize run (zoo:shapes, steps+cache) is shared; each test edits a copy. Its plan gets a
weights file (one extra tensor, sealed with the plan's own writer) so that weights checks have
something to check.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from accelkit.cli.main import main
from accelkit.errors import PlanMismatchError
from accelkit.runtime.plan import load, read_plan, verify_exports, write_plan_json
from tests.reliability.helpers import one_line_error, snapshot


def _plan_dir(out: Path) -> Path:
    return out / "plans" / "2x"


def _plan_json(out: Path) -> dict:
    return json.loads((_plan_dir(out) / "plan.json").read_text())


def _write_raw(out: Path, data: dict) -> None:
    (_plan_dir(out) / "plan.json").write_text(json.dumps(data))


@pytest.fixture
def weighted_out(out_copy):
    """The copy with a sealed weights.safetensors holding two tensors."""
    save_file({"extra.scale": torch.ones(4), "extra.bias": torch.zeros(2, 3)},
              str(_plan_dir(out_copy) / "weights.safetensors"))
    write_plan_json(_plan_dir(out_copy), {**_plan_json(out_copy), "weights_file": "weights.safetensors"})
    return out_copy


@pytest.fixture(scope="module")
def pipe():
    from accelkit.loading import load_pipeline

    return load_pipeline("zoo:shapes").pipe


def test_sealed_plan_records_every_file_and_loads(weighted_out, pipe):
    data = _plan_json(weighted_out)
    assert data["schema"] == 2
    assert set(data["files"]) == {"weights.safetensors"}
    assert data["files"]["weights.safetensors"]["bytes"] == (_plan_dir(weighted_out) / "weights.safetensors").stat().st_size
    assert data["weights"] == {"extra.bias": {"shape": [2, 3], "dtype": "F32"},
                               "extra.scale": {"shape": [4], "dtype": "F32"}}
    accelerated = load(weighted_out, pipe, "2x")
    assert set(accelerated.program.new_weights) >= {"extra.scale", "extra.bias"}


def _refused(out: Path, pipe, words: str) -> None:
    with pytest.raises(PlanMismatchError, match=words):
        load(out, pipe, "2x")


def test_changed_weight_values_refused(weighted_out, pipe):
    path = _plan_dir(weighted_out) / "weights.safetensors"
    tensors = load_file(str(path))
    tensors["extra.scale"] = tensors["extra.scale"] * 2  # same size, other bytes
    save_file(tensors, str(path))
    _refused(weighted_out, pipe, "weights.safetensors' does not match the sha256")


def test_removed_weight_key_refused(weighted_out, pipe):
    path = _plan_dir(weighted_out) / "weights.safetensors"
    tensors = load_file(str(path))
    del tensors["extra.bias"]
    save_file(tensors, str(path))
    _refused(weighted_out, pipe, "weights.safetensors")


def test_weights_with_other_keys_refused_even_with_a_matching_hash(weighted_out, pipe):
    # Someone re-hashed the file in plan.json but not its tensor record: the key check still holds.
    path = _plan_dir(weighted_out) / "weights.safetensors"
    save_file({"extra.scale": torch.ones(4)}, str(path))
    data = _plan_json(weighted_out)
    from accelkit.artifacts.files import FileRecord

    data["files"]["weights.safetensors"] = FileRecord.of(path).to_json()
    _write_raw(weighted_out, data)
    _refused(weighted_out, pipe, r"does not hold the tensors the plan needs \(missing \['extra.bias'\]")


def test_missing_weights_file_refused(weighted_out, pipe):
    (_plan_dir(weighted_out) / "weights.safetensors").unlink()
    _refused(weighted_out, pipe, "weights.safetensors' is missing")


def test_truncated_weights_file_refused(weighted_out, pipe):
    path = _plan_dir(weighted_out) / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:40])
    _refused(weighted_out, pipe, "truncated or replaced")


def test_plan_without_model_hash_refused(out_copy, pipe):
    data = _plan_json(out_copy)
    del data["model"]["weights_hash"]
    _write_raw(out_copy, data)
    _refused(out_copy, pipe, "records no model weights hash")


def test_plan_of_other_weights_refused(out_copy, pipe):
    data = _plan_json(out_copy)
    data["model"]["weights_hash"] = "0" * 64
    _write_raw(out_copy, data)
    _refused(out_copy, pipe, "made for other weights")


@pytest.mark.parametrize("name", ["../../x", "/etc/passwd", "../plan.json"])
def test_weights_file_outside_plan_folder_refused(weighted_out, pipe, name):
    data = _plan_json(weighted_out)
    data["weights_file"] = name
    _write_raw(weighted_out, data)
    _refused(weighted_out, pipe, "outside")


def test_weights_file_symlink_outside_refused(weighted_out, pipe, tmp_path):
    target = _plan_dir(weighted_out) / "weights.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    target.rename(outside)
    target.symlink_to(outside)
    _refused(weighted_out, pipe, "links outside")


def test_budget_field_differing_from_folder_refused(out_copy):
    data = _plan_json(out_copy)
    data["budget"] = "3x"
    _write_raw(out_copy, data)
    with pytest.raises(PlanMismatchError, match="budget 3x, not 2x"):
        read_plan(out_copy, "2x")


def _fake_export(out: Path, models: list[dict], files: list[dict]) -> None:
    onnx = _plan_dir(out) / "onnx"
    onnx.mkdir()
    manifest = {"models": models, "files": files}
    (onnx / "manifest.json").write_text(json.dumps(manifest))
    for item in files:
        (onnx / item["path"]).write_bytes(b"model bytes")
    data = {**_plan_json(out), "engines": {"target": "onnx", "directory": "onnx", "manifest": manifest}}
    write_plan_json(_plan_dir(out), data)


def test_export_manifest_files_are_hashed_in_plan(out_copy, pipe):
    from accelkit.artifacts.files import sha256_file

    _fake_export(out_copy, [{"variant": "full", "file": "full.onnx"}],
                 [{"path": "full.onnx", "sha256": sha256_file_bytes(b"model bytes")}])
    data = _plan_json(out_copy)
    assert set(data["files"]) == {"onnx/manifest.json", "onnx/full.onnx"}
    assert data["files"]["onnx/manifest.json"]["sha256"] == sha256_file(_plan_dir(out_copy) / "onnx" / "manifest.json")
    assert verify_exports(out_copy, "2x") == ["onnx/full.onnx"]
    (_plan_dir(out_copy) / "onnx" / "manifest.json").write_text("{}")
    _refused(out_copy, pipe, "manifest.json")


def sha256_file_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(("models", "files", "words"), [
    ([{"variant": "full", "file": "../../evil.onnx"}], [], "outside"),
    ([{"variant": "full", "file": "full.onnx"}], [{"path": "../full.onnx", "sha256": "x"}], "outside"),
    ([{"variant": "full", "file": "other.onnx"}], [{"path": "full.onnx", "sha256": "x"}],
     "not covered by the manifest's sha256 list"),
])
def test_export_manifest_pointing_outside_or_unhashed_refused(out_copy, models, files, words):
    onnx = _plan_dir(out_copy) / "onnx"
    onnx.mkdir()
    manifest = {"models": models, "files": files}
    (onnx / "manifest.json").write_text(json.dumps(manifest))
    data = {**_plan_json(out_copy), "engines": {"target": "onnx", "directory": "onnx", "manifest": manifest}}
    with pytest.raises(PlanMismatchError, match=words):
        write_plan_json(_plan_dir(out_copy), data)  # the writer refuses to seal it
    _write_raw(out_copy, data)
    with pytest.raises(PlanMismatchError, match=words):
        verify_exports(out_copy, "2x")
    with pytest.raises(PlanMismatchError, match=words):
        read_plan(out_copy, "2x")


def test_cli_run_refuses_tampered_plan_in_one_line(weighted_out, tmp_path, capsys):
    path = _plan_dir(weighted_out) / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"\x01")
    before = snapshot(tmp_path)
    rc = main(["run", str(weighted_out), "--budget", "2x", "--prompt", "a red circle",
               "--output", str(tmp_path / "img.png")])
    assert rc == 2
    assert "weights.safetensors' does not match the sha256" in one_line_error(capsys.readouterr().err)
    assert snapshot(tmp_path) == before
