"""Every command on tiny random-weight video pipelines: Wan 2.1/2.2, LTX-Video, HunyuanVideo, CogVideoX, Mochi.

Each family is its real diffusers pipeline class, saved with ``save_pretrained`` and loaded by the CLI as a
user's folder would be. ``inspect`` runs here; every other command (optimize steps,cache / prune / cache, export, run onnxruntime)
runs in the slow tier of ``test_family_support.py``, one support matrix for image and video families.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from accelkit.cli.main import main
from tests.fixtures.video_families import (
    EXPECTED_VIDEO_BLOCKS,
    VIDEO_CALL,
    VIDEO_FAMILIES,
    saved_video_pipeline_folder,
)

_DENOISERS = {
    "wan": "WanTransformer3DModel",
    "wan22": "WanTransformer3DModel",
    "ltx": "LTXVideoTransformer3DModel",
    "hunyuan_video": "HunyuanVideoTransformer3DModel",
    "cogvideox": "CogVideoXTransformer3DModel",
    "mochi": "MochiTransformer3DModel",
    "allegro": "AllegroTransformer3DModel",
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("video-pipelines")
    cache: dict[str, Path] = {}

    def folder(family: str) -> Path:
        if family not in cache:
            cache[family] = saved_video_pipeline_folder(family, root)
        return cache[family]

    return folder


def _generation_args(family: str) -> list[str]:
    call = VIDEO_CALL[family]
    args = ["--height", str(call["height"]), "--width", str(call["width"]),
            "--num-frames", str(call["num_frames"])]
    for key, value in call["call_args"].items():
        args += ["--call-arg", f"{key}={json.dumps(value)}"]
    return args


def _search_args(family: str, out: Path, *, steps: int, trials: int) -> list[str]:
    return [*_generation_args(family), "--steps", str(steps), "--trials", str(trials), "--num-prompts", "1",
            "--num-eval-prompts", "1", "--quiet", "--out", str(out)]


def _json_out(capsys) -> dict:
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_inspect_finds_the_blocks_of_a_video_denoiser(family, folders, capsys):
    code = main(["inspect", str(folders(family)), "--json", *_generation_args(family)])
    assert code == 0, capsys.readouterr().err
    info = _json_out(capsys)
    assert info["family"] == _DENOISERS[family]
    assert len(info["blocks"]) == EXPECTED_VIDEO_BLOCKS[family]
    assert info["generation"]["num_frames"] == VIDEO_CALL[family]["num_frames"]
    assert info["attention_sites"] and info["flops_per_step"] > 0
    # The latent is 5-D (B, C, F, H, W) or (B, F, C, H, W), except LTX's, packed into tokens.
    latent = info["inputs"]["hidden_states"]["shape"]
    assert len(latent) == (3 if family == "ltx" else 5)


@pytest.mark.parametrize("family", ["hunyuan_video", "ltx"])
def test_inspect_at_the_pipeline_default_size_answers_quickly(family, folders, capsys):
    # The pipelines default to 129 frames at 720x1280 (HunyuanVideo) and 161 at 512x704 (LTX): inspect used to
    # run two full denoising steps there before capturing. The probe now stops before the denoiser runs.
    call = VIDEO_CALL[family]["call_args"]
    start = time.perf_counter()
    code = main(["inspect", str(folders(family)), "--json",
                 *[f"--call-arg={k}={json.dumps(v)}" for k, v in call.items()]])
    elapsed = time.perf_counter() - start
    assert code == 0, capsys.readouterr().err
    info = _json_out(capsys)
    assert info["generation"]["num_frames"] in (129, 161)
    assert elapsed < 60, f"inspect took {elapsed:.0f} s"
