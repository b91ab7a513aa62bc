"""Report rendering: files, links, JSON contract, re-render, atomicity."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from accelkit.errors import InputError
from accelkit.report import render
from accelkit.report.metrics import fidelity
from accelkit.report.render import pareto_front, render_from_json, render_value, write_report
from accelkit.report.schema import (
    BaselineCost,
    BudgetReport,
    FidelityMetrics,
    ModelInfo,
    ReferencePoint,
    ReportData,
    Settings,
    TrialPoint,
)


def _images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _data(identical_first: bool = False) -> ReportData:
    prompts = ("a red <script>alert(1)</script> fox", 'a "quoted" & blue bird', "a cat")
    budgets = []
    for k, (name, target) in enumerate((("2x", 2.0), ("4x", 4.0))):
        base = _images(3, 10 + k)
        acc = (base + 0.05 * _images(3, 20 + k)).clamp(0, 1)
        if identical_first:
            acc[0] = base[0]
        fewer = (base + 0.2 * _images(3, 30 + k)).clamp(0, 1)
        budgets.append(
            BudgetReport(
                budget=name,
                target_speedup=target,
                met=k == 0,
                speedup=target * (1.02 if k == 0 else 0.9),
                fidelity=FidelityMetrics.from_metrics(fidelity(acc, base)),
                weights_bytes=123_456_789,
                passes={"cache": {"version": 1, "full_steps": 10, "reuse": "residual", "blocks": [1, 5]}},
                references={
                    "fewer_steps": ReferencePoint(
                        speedup=target,
                        psnr=18.0,
                        ssim=0.6,
                        description=f"{28 // int(target)} of 28 steps",
                        images=fewer,
                    ),
                    "uniform_cache": ReferencePoint(speedup=target, psnr=21.0, ssim=0.7),
                },
                ablations={
                    "cache": {
                        "approximation": [
                            {"method": "reuse", "psnr": 20.1, "ssim": 0.71},
                            {"method": "residual", "psnr": 24.3, "ssim": 0.8, "note": "<b>best</b>"},
                        ],
                        "per_block": {"block 1": {"loss": 0.01}, "block 2": {"loss": 0.02, "kept": True}},
                        "mask": [1, 0, 0, 1],
                        "nan_value": float("nan"),
                    }
                },
                plan_summary="compute 10 of 28 steps fully; reuse blocks 1-5 residual on the others",
                eval_prompts=prompts,
                baseline_images=base,
                accelerated_images=acc,
                latency_ms=12.5,
            )
        )
    trials = tuple(
        TrialPoint(
            trial=i,
            cost=100.0 / (1 + i * 0.3),
            speedup=1 + i * 0.3,
            psnr=40 - 3 * i + (i % 3),
            feasible=i % 4 != 3,
            passes={"cache": {"full_steps": 28 - i}},
        )
        for i in range(12)
    ) + (TrialPoint(trial=12, cost=100.0, speedup=1.0, psnr=float("inf"), feasible=True),)
    return ReportData(
        model=ModelInfo(id="tiny/<dit>", family="dit", params=1_234_567),
        settings=Settings(steps=28, num_prompts=3, seed=0, device="cpu", cost_kind="flops"),
        baseline=BaselineCost(cost=100.0, latency_ms=None, flops=1.5e12, weights_bytes=987_654_321),
        budgets=tuple(budgets),
        floor_met=True,
        trials=trials,
        notes=("cost model: FLOPs (no GPU to time on)", "min PSNR floor 20 dB"),
        cost_model="sum of per-node FLOPs of the scheduled variants",
        min_psnr=20.0,
    )


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.scripts += 1
        for key, value in attrs:
            if key in ("src", "href") and value:
                self.links.append(value)


def _check_links(report_dir: Path) -> list[str]:
    parser = _Links()
    parser.feed((report_dir / "index.html").read_text(encoding="utf-8"))
    assert parser.scripts == 0, "prompt text must be escaped, not executed"
    files = [link for link in parser.links if not link.startswith(("#", "http:", "https:", "data:"))]
    assert files, "the report should reference image files"
    for link in files:
        assert not Path(link).is_absolute()
        assert (report_dir / link).is_file(), link
    return files


def test_write_report_files_and_links(tmp_path: Path) -> None:
    index = write_report(tmp_path, _data())
    report_dir = tmp_path / "report"
    assert index == report_dir / "index.html"
    files = _check_links(report_dir)
    assert "images/speed_fidelity.png" in files
    # 3 images x (baseline, accelerated, fewer_steps, diff) x 2 budgets + plot.
    assert len([f for f in files if f.endswith(".png")]) == 3 * 4 * 2 + 1
    text = index.read_text(encoding="utf-8")
    assert "&lt;script&gt;" in text and "<b>best</b>" not in text
    assert "Beats fewer-steps" in text
    assert "reuse blocks 1-5 residual" in text
    # Small images are shown upscaled (nearest) to at least 128 px.
    from PIL import Image

    with Image.open(report_dir / [f for f in files if "view/baseline_0" in f][0]) as im:
        assert min(im.size) >= 128
    # No temp dirs left next to the report.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_report_json_contract(tmp_path: Path) -> None:
    write_report(tmp_path, _data(identical_first=True))
    text = (tmp_path / "report" / "report.json").read_text()
    obj = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert obj["schema"] == 1
    assert set(obj["model"]) >= {"id", "family", "params"} and isinstance(obj["model"]["params"], int)
    s = obj["settings"]
    assert isinstance(s["steps"], int) and isinstance(s["num_prompts"], int) and isinstance(s["seed"], int)
    assert isinstance(s["device"], str) and s["cost_kind"] in ("latency", "flops")
    b = obj["baseline"]
    assert isinstance(b["cost"], float) and b["latency_ms"] is None and isinstance(b["flops"], float)
    assert isinstance(b["weights_bytes"], int)
    assert isinstance(obj["floor_met"], bool)
    assert len(obj["budgets"]) == 2
    for budget in obj["budgets"]:
        assert isinstance(budget["budget"], str)
        assert isinstance(budget["target_speedup"], float) and isinstance(budget["speedup"], float)
        assert isinstance(budget["met"], bool) and isinstance(budget["weights_bytes"], int)
        fid = budget["fidelity"]
        assert isinstance(fid["psnr"], float) and isinstance(fid["ssim"], float)
        assert fid["lpips"] is None or isinstance(fid["lpips"], float)
        assert fid["per_image"]["psnr"][0] == 100.0  # identical image: +inf capped
        assert isinstance(budget["passes"], dict) and isinstance(budget["ablations"], dict)
        fs = budget["references"]["fewer_steps"]
        assert {type(fs[k]) for k in ("speedup", "psnr", "ssim")} == {float}
        assert isinstance(fs["beaten"], bool)
        assert isinstance(budget["plan_summary"], str) and len(budget["eval_prompts"]) == 3
        assert budget["ablations"]["cache"]["nan_value"] is None
    assert obj["budgets"][0]["references"]["fewer_steps"]["beaten"] is True
    # 4x is slower than its fewer-steps reference: cannot beat it whatever the PSNR.
    assert obj["budgets"][1]["references"]["fewer_steps"]["beaten"] is False
    trial = obj["trials"][0]
    assert set(trial) >= {"trial", "cost", "speedup", "psnr", "feasible", "passes"}
    assert obj["trials"][-1]["psnr"] == 100.0
    assert isinstance(obj["notes"], list) and isinstance(obj["cost_model"], str)


def test_json_round_trip(tmp_path: Path) -> None:
    data = _data()
    first = data.to_json()
    again = ReportData.from_json(json.loads(json.dumps(first))).to_json()
    assert json.dumps(again, sort_keys=True, default=str) == json.dumps(first, sort_keys=True, default=str)


def test_render_from_json_rerenders(tmp_path: Path) -> None:
    write_report(tmp_path, _data())
    report_dir = tmp_path / "report"
    before = json.loads((report_dir / "report.json").read_text())
    # A field another tool added must survive.
    before["ci_run"] = "abc"
    (report_dir / "report.json").write_text(json.dumps(before))
    (report_dir / "index.html").unlink()
    index = render_from_json(tmp_path)
    after = json.loads((report_dir / "report.json").read_text())
    assert after == before
    _check_links(report_dir)
    assert "reuse blocks 1-5 residual" in index.read_text()


def test_render_from_json_missing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="accelkit optimize"):
        render_from_json(tmp_path)
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        render_from_json(tmp_path)


def test_failure_mid_render_leaves_no_partial_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(render, "_scatter_plot", boom)
    with pytest.raises(RuntimeError, match="plot failed"):
        write_report(tmp_path, _data())
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_previous_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_report(tmp_path, _data())
    old = (tmp_path / "report" / "index.html").read_text()

    def boom(*args, **kwargs):
        raise RuntimeError("html failed")

    monkeypatch.setattr(render, "_html", boom)
    with pytest.raises(RuntimeError):
        write_report(tmp_path, _data(identical_first=True))
    assert (tmp_path / "report" / "index.html").read_text() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_report_without_images_or_trials(tmp_path: Path) -> None:
    data = _data()
    bare = ReportData(
        model=data.model,
        settings=data.settings,
        baseline=data.baseline,
        floor_met=False,
        budgets=(
            BudgetReport(
                budget="2x",
                target_speedup=2.0,
                met=False,
                speedup=1.5,
                fidelity=FidelityMetrics(psnr=30.0, ssim=0.9),
                weights_bytes=1,
            ),
        ),
    )
    write_report(tmp_path, bare)
    _check_links(tmp_path / "report")
    assert json.loads((tmp_path / "report" / "report.json").read_text())["budgets"][0]["references"] == {}


def test_mismatched_images_rejected(tmp_path: Path) -> None:
    b = _data().budgets[0]
    bad = BudgetReport(
        budget="2x",
        target_speedup=2.0,
        met=True,
        speedup=2.0,
        fidelity=b.fidelity,
        weights_bytes=1,
        baseline_images=_images(2, 0),
        accelerated_images=_images(3, 1),
    )
    data = _data()
    with pytest.raises(InputError, match="same prompts and seeds"):
        write_report(
            tmp_path,
            ReportData(
                model=data.model,
                settings=data.settings,
                baseline=data.baseline,
                budgets=(bad,),
                floor_met=True,
            ),
        )
    assert list(tmp_path.iterdir()) == []


def test_pareto_front() -> None:
    pts = [(1.0, 40.0), (2.0, 30.0), (2.0, 25.0), (3.0, 31.0), (4.0, 20.0), (1.5, 35.0)]
    assert pareto_front(pts) == [(1.0, 40.0), (1.5, 35.0), (3.0, 31.0), (4.0, 20.0)]


def test_render_value_generic() -> None:
    html_text = render_value({"a": {"x": 1, "y": 2.5}, "b": {"x": "<i>"}})
    assert html_text.count("<tr>") == 3 and "&lt;i&gt;" in html_text
    assert "<table>" in render_value([{"k": 1}, {"k": 2, "j": None}])
    assert render_value([1, 2.0, True]) == "1, 2, yes"
    assert render_value({}) == "<i>empty</i>"
