"""The workflows the CLI calls (accelkit/workflows/): typed results, plan checks before any model loads,
and the output writers of ``accelkit run``."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from accelkit.errors import InputError
from accelkit.workflows.inspect import BlockInfo, Inspection, inspect_model
from accelkit.workflows.recover import check_recoverable, removable_blocks
from accelkit.workflows.run import output_media, run_plan, save_frames


def test_inspect_returns_a_typed_result_whose_dict_is_json():
    found = inspect_model("zoo:shapes", call_args=())
    assert isinstance(found, Inspection) and all(isinstance(b, BlockInfo) for b in found.blocks)
    assert found.family == "FluxTransformer2DModel" and len(found.blocks) == 6
    assert 0.99 < sum(b.flops_share for b in found.blocks) <= 1.0 + 1e-9  # the blocks hold nearly all FLOPs
    data = json.loads(json.dumps(found.to_dict()))
    assert [b["name"] for b in data["blocks"]] == [b.name for b in found.blocks]
    assert data["linear_sites"] == found.linear_sites > 0


def _plan(passes: dict) -> SimpleNamespace:
    return SimpleNamespace(budget="2x", passes=passes)


def test_removable_blocks_names_the_fix():
    assert removable_blocks(_plan({"prune": {"removed_blocks": ["b.1", "b.2"]}, "cache": {}})) == ["b.1", "b.2"]
    with pytest.raises(InputError, match="removed no blocks.*--passes"):
        removable_blocks(_plan({"steps": {}}))
    with pytest.raises(InputError, match="quantizes after pruning"):
        removable_blocks(_plan({"prune": {"removed_blocks": ["b.1"]}, "quant": {}}))


def test_check_recoverable_refuses_a_missing_plan_before_loading(tmp_path):
    with pytest.raises(InputError, match="optimize"):
        check_recoverable(tmp_path, None)


@pytest.mark.parametrize(("generation", "output", "allowed"), [
    ({"height": 8, "width": 8}, "x.gif", ".png"),
    ({"height": 8, "width": 8, "num_frames": 3}, "x.jpg", ".png or .gif"),
])
def test_run_refuses_an_output_suffix_before_loading(tmp_path, monkeypatch, generation, output, allowed):
    import accelkit.loading
    import accelkit.runtime.plan

    monkeypatch.setattr(accelkit.runtime.plan, "read_plan",
                        lambda out, budget: SimpleNamespace(budget="2x", data={"generation": generation}))
    monkeypatch.setattr(accelkit.loading, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(InputError, match=f"must end in {allowed}"):
        run_plan(tmp_path, prompts=["p"], output=tmp_path / output)


def test_output_media_gives_uint8_frames_per_output():
    images = SimpleNamespace(images=np.full((2, 4, 5, 3), 0.5, dtype=np.float32))
    media = output_media(images)
    assert len(media) == 2 and all(len(frames) == 1 for frames in media)
    assert media[0][0].dtype == np.uint8 and media[0][0].shape == (4, 5, 3) and media[0][0][0, 0, 0] == 128
    video = SimpleNamespace(frames=np.zeros((1, 3, 4, 5, 3), dtype=np.float32) + 2.0)  # clipped to 1
    (frames,) = output_media(video)
    assert len(frames) == 3 and int(frames[0].max()) == 255


def test_save_frames_writes_png_side_by_side_and_gif_animations(tmp_path):
    frames = [np.full((4, 5, 3), value, dtype=np.uint8) for value in (0, 100, 200)]
    save_frames(frames, tmp_path / "sub" / "v.png")
    assert Image.open(tmp_path / "sub" / "v.png").size == (15, 4)
    save_frames(frames, tmp_path / "v.gif")
    gif = Image.open(tmp_path / "v.gif")
    assert gif.n_frames == 3
    assert not list(tmp_path.rglob(".*.tmp"))  # written atomically, no leftovers
