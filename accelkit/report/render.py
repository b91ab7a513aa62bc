"""Render the per-budget fidelity report: ``report/index.html``, ``report/report.json``, PNGs.

Layout of ``OUT_DIR/report/``::

    index.html                      self-contained page; every image is a relative link below
    report.json                     the CI contract (see :mod:`accelkit.report.schema`)
    images/speed_fidelity.png       every trial, the Pareto front, references, budget lines
    images/<k>_<budget>/baseline_<i>.png, accelerated_<i>.png, ref_<name>_<i>.png
                                    outputs at full resolution, lossless: re-rendering reloads them
    images/<k>_<budget>/view/...    nearest-neighbour upscales of small images, diff heat-maps

The whole directory is built in a temporary sibling and renamed into place, so a failure part way
leaves the previous report (or none) and never a half-written one.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accelkit._io import atomic_directory, atomic_write_text
from accelkit.errors import InputError
from accelkit.report.metrics import PSNR_CAP_DB, is_video_batch, to_unit_float, to_unit_video
from accelkit.report.schema import BudgetReport, ReportData

#: Small images are upscaled (nearest neighbour, integer factor) until their short side reaches this.
VIEW_MIN_PX = 128

_PLOT_FILE = "images/speed_fidelity.png"
_REF_MARKERS = ("^", "s", "D", "v", "P", "X", "h", "<", ">")


def write_report(out_dir: str | os.PathLike, data: ReportData) -> Path:
    """Write ``OUT_DIR/report/`` (HTML, JSON, images) atomically.

    Args:
        out_dir: the artifact directory of an ``accelkit optimize`` run.
        data: what to show.

    Returns:
        Path of ``OUT_DIR/report/index.html``.
    """
    report_dir = Path(out_dir) / "report"
    with atomic_directory(report_dir) as tmp:
        image_paths: list[dict[str, Any]] = []
        views: list[list[dict[str, Any]]] = []
        for k, budget in enumerate(data.budgets):
            paths, rows = _write_budget_images(tmp, k, budget)
            image_paths.append(paths)
            views.append(rows)
        _scatter_plot(data, tmp / _PLOT_FILE)
        obj = _jsonable(data.to_json(image_paths))
        # allow_nan=False: CI parses this with strict JSON readers.
        atomic_write_text(tmp / "report.json", json.dumps(obj, indent=2, allow_nan=False) + "\n")
        atomic_write_text(tmp / "index.html", _html(data, views))
    return report_dir / "index.html"


def render_from_json(out_dir: str | os.PathLike) -> Path:
    """Re-render ``OUT_DIR/report/`` from its ``report.json`` and the PNGs saved beside it.

    Args:
        out_dir: the artifact directory holding ``report/report.json``.

    Returns:
        Path of the new ``OUT_DIR/report/index.html``.
    """
    report_dir = Path(out_dir) / "report"
    json_path = report_dir / "report.json"
    if not json_path.is_file():
        raise InputError(f"{json_path} does not exist; run `accelkit optimize` to create a report first")
    try:
        obj = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{json_path} is not valid JSON: {exc}") from exc
    # Images are loaded into memory here, before write_report replaces the directory they live in.
    data = ReportData.from_json(obj, root=report_dir)
    return write_report(out_dir, data)


# ---------------------------------------------------------------------------------------------
# Images


def _slug(k: int, name: str) -> str:
    # The index keeps two budgets whose names sanitise alike ("2x", "2x?") apart.
    return f"{k}_{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[:40]}"


def _to_pil(image: torch.Tensor) -> Any:
    from PIL import Image

    arr = (image.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        return Image.fromarray(arr[:, :, 0], mode="L")
    if arr.shape[2] == 4:
        return Image.fromarray(arr, mode="RGBA")
    return Image.fromarray(np.ascontiguousarray(arr[:, :, :3]), mode="RGB")


def _upscale(pil: Any) -> Any:
    from PIL import Image

    short = min(pil.size)
    factor = max(1, math.ceil(VIEW_MIN_PX / max(short, 1)))
    if factor == 1:
        return pil
    return pil.resize((pil.size[0] * factor, pil.size[1] * factor), Image.NEAREST)


def _save(root: Path, rel: str, pil: Any) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path, format="PNG")
    return rel


def _save_with_view(root: Path, rel: str, pil: Any) -> tuple[str, str]:
    """Save the lossless original and, for small images, an upscaled copy; return both paths."""
    _save(root, rel, pil)
    view = _upscale(pil)
    if view is pil:
        return rel, rel
    head, name = rel.rsplit("/", 1)
    return rel, _save(root, f"{head}/view/{name}", view)


def _heatmaps(a: torch.Tensor, b: torch.Tensor) -> tuple[list[Any], float]:
    """Abs-difference heat-maps (mean over channels), on one colour scale shared by the batch."""
    import matplotlib
    from PIL import Image

    diff = (a.to(torch.float64) - b.to(torch.float64)).abs().mean(dim=1)  # (N, H, W)
    # One scale for the whole budget so that images compare; floor avoids 0/0 for identical outputs.
    scale = max(float(diff.max()), 1e-6)
    cmap = matplotlib.colormaps["inferno"]
    maps = []
    for d in diff:
        rgba = cmap((d / scale).clamp(0, 1).numpy())
        maps.append(Image.fromarray((rgba[:, :, :3] * 255).round().astype(np.uint8), mode="RGB"))
    return maps, scale


#: A video's frame strip in the report shows at most this many frames, evenly spaced, first and last included.
STRIP_MAX_FRAMES = 8
_STRIP_GAP_PX = 2


def video_strips(videos: Any, max_frames: int = STRIP_MAX_FRAMES) -> torch.Tensor:
    """One frame strip per video: ``(N, F, C, H, W)`` -> ``(N, C, H, k*W + gaps)`` images, k <= max_frames.

    Frames sit side by side in time order with a white 2-pixel gap; long videos show ``max_frames``
    evenly spaced frames (the fidelity numbers always cover every frame).

    Args:
        videos: a batch of videos (anything :func:`~accelkit.report.metrics.to_unit_video` accepts).
        max_frames: most frames per strip.
    """
    x = to_unit_video(videos)
    n, f, c, h, w = x.shape
    shown = max(1, min(f, max_frames))
    picked = sorted({round(i * (f - 1) / max(shown - 1, 1)) for i in range(shown)})
    gap = torch.ones(n, c, h, _STRIP_GAP_PX)
    parts: list[torch.Tensor] = []
    for index in picked:
        if parts:
            parts.append(gap)
        parts.append(x[:, index])
    return torch.cat(parts, dim=3)


def _report_images(images: Any) -> torch.Tensor:
    """Images as ``(N, C, H, W)``; videos become their frame strips so every grid cell is one prompt."""
    return video_strips(images) if is_video_batch(images) else to_unit_float(images)


def _write_budget_images(
    root: Path, k: int, budget: BudgetReport
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Write one budget's PNGs; return JSON paths and, per image, what the HTML grid shows."""
    if budget.baseline_images is None or budget.accelerated_images is None:
        return {}, []
    base = _report_images(budget.baseline_images)
    acc = _report_images(budget.accelerated_images)
    if base.shape != acc.shape:
        raise InputError(
            f"budget {budget.budget!r}: baseline images {tuple(base.shape)} and accelerated images "
            f"{tuple(acc.shape)} differ; they must be the same prompts and seeds"
        )
    slug = _slug(k, budget.budget)
    heat, scale = _heatmaps(acc, base)
    captions = budget.captions
    paths: dict[str, Any] = {"baseline": [], "accelerated": [], "references": {}}
    rows: list[dict[str, Any]] = []
    refs = {
        name: _report_images(ref.images) for name, ref in budget.references.items() if ref.images is not None
    }
    for i in range(base.shape[0]):
        b_rel, b_view = _save_with_view(root, f"images/{slug}/baseline_{i}.png", _to_pil(base[i]))
        a_rel, a_view = _save_with_view(root, f"images/{slug}/accelerated_{i}.png", _to_pil(acc[i]))
        paths["baseline"].append(b_rel)
        paths["accelerated"].append(a_rel)
        # The heat-map is derived, so only its display copy is kept.
        d_view = _save(root, f"images/{slug}/view/diff_{i}.png", _upscale(heat[i]))
        row: dict[str, Any] = {
            "caption": captions[i] if i < len(captions) else f"image {i}",
            "baseline": b_view,
            "accelerated": a_view,
            "diff": d_view,
            "diff_scale": scale,
            "references": {},
        }
        for r, (name, imgs) in enumerate(refs.items()):
            if i >= imgs.shape[0]:
                continue
            r_rel, r_view = _save_with_view(root, f"images/{slug}/ref{r}_{i}.png", _to_pil(imgs[i]))
            paths["references"].setdefault(name, []).append(r_rel)
            row["references"][name] = r_view
        rows.append(row)
    return paths, rows


# ---------------------------------------------------------------------------------------------
# Plot


def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated in (speedup, psnr), both maximised, sorted by speedup.

    Args:
        points: ``(speedup, psnr)`` pairs.
    """
    front: list[tuple[float, float]] = []
    best = -math.inf
    # Walk from the fastest down: a point is on the front if it has more PSNR than every faster one.
    for s, p in sorted(points, key=lambda sp: (-sp[0], -sp[1])):
        if p > best:
            front.append((s, p))
            best = p
    return front[::-1]


def _scatter_plot(data: ReportData, path: Path) -> None:
    """Speed–fidelity scatter: every trial, Pareto front, references, budget lines (PSNR capped at 100)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # An Agg canvas on a bare Figure, not pyplot: no global backend switch, no GUI, thread-safe.
    fig = Figure(figsize=(7.5, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    def cap(v: float) -> float:
        return min(v, PSNR_CAP_DB)

    feas = [(t.speedup, cap(t.psnr)) for t in data.trials if t.feasible]
    infeas = [(t.speedup, cap(t.psnr)) for t in data.trials if not t.feasible]
    if feas:
        ax.scatter(*zip(*feas, strict=True), s=14, c="#4c78a8", alpha=0.7, label="trial (feasible)")
    if infeas:
        ax.scatter(*zip(*infeas, strict=True), s=14, c="#bbbbbb", alpha=0.7, label="trial (infeasible)")
    # The front over feasible trials (all trials where none is feasible) is what the search could pick.
    front = pareto_front(feas or infeas)
    if front:
        ax.plot(*zip(*front, strict=True), "-o", c="#e45756", ms=5, lw=1.5, label="Pareto front")
    markers: dict[str, str] = {}
    for budget in data.budgets:
        for name, ref in budget.references.items():
            marker = markers.setdefault(name, _REF_MARKERS[len(markers) % len(_REF_MARKERS)])
            label = name if name not in {lbl for lbl in ax.get_legend_handles_labels()[1]} else None
            ax.scatter(
                [ref.speedup],
                [cap(ref.psnr)],
                marker=marker,
                s=60,
                c="#54a24b",
                edgecolors="black",
                linewidths=0.6,
                label=label,
                zorder=4,
            )
    for k, budget in enumerate(data.budgets):
        ax.axvline(budget.target_speedup, ls="--", lw=1, c="#888888")
        ax.annotate(
            budget.budget,
            (budget.target_speedup, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
            fontsize=8,
            color="#555555",
        )
        ax.scatter(
            [budget.speedup],
            [cap(budget.fidelity.psnr)],
            marker="*",
            s=160,
            c="#f58518",
            edgecolors="black",
            linewidths=0.6,
            zorder=5,
            label="chosen plan" if k == 0 else None,
        )
    if data.min_psnr is not None:
        ax.axhline(data.min_psnr, ls=":", lw=1, c="#b279a2", label=f"PSNR floor {data.min_psnr:g} dB")
    ax.set_xlabel(f"speedup over baseline ({data.settings.cost_kind})")
    ax.set_ylabel("PSNR vs baseline (dB)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top;font-size:14px}
th{background:#f3f3f3}
.met{color:#1a7f37;font-weight:bold}.notmet{color:#c62828;font-weight:bold}
.grid img{width:192px;image-rendering:pixelated;display:block}
.cap{max-width:220px;font-size:13px}
section{border-top:2px solid #ddd;margin-top:2em;padding-top:.5em}
code{background:#f5f5f5;padding:0 3px}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        return f"{value:.4g}"
    if isinstance(value, int):
        return str(value)
    return _e(value)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def render_value(value: Any) -> str:
    """HTML for a nested JSON value: dict of dicts and list of dicts become tables, scalars text.

    Used for pass configs and ablation tables, whose shape each pass chooses.

    Args:
        value: a JSON-like value (dict, list, tuple, scalar).
    """
    if _is_scalar(value):
        return _fmt(value)
    if isinstance(value, dict):
        if not value:
            return "<i>empty</i>"
        if all(isinstance(v, dict) for v in value.values()):
            return _table_rows(list(value.items()), row_header=True)
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{render_value(v)}</td></tr>" for k, v in value.items())
        return f"<table>{rows}</table>"
    if isinstance(value, list | tuple):
        if not value:
            return "<i>empty</i>"
        if all(isinstance(v, dict) for v in value):
            return _table_rows([(None, v) for v in value], row_header=False)
        if all(_is_scalar(v) for v in value):
            return ", ".join(_fmt(v) for v in value)
        return "<ul>" + "".join(f"<li>{render_value(v)}</li>" for v in value) + "</ul>"
    return _e(value)


def _table_rows(rows: list[tuple[Any, dict[str, Any]]], *, row_header: bool) -> str:
    columns: list[str] = []
    for _, row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    head = ("<th></th>" if row_header else "") + "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = []
    for name, row in rows:
        cells = "".join(f"<td>{render_value(row[c]) if c in row else ''}</td>" for c in columns)
        body.append(f"<tr>{f'<th>{_e(name)}</th>' if row_header else ''}{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _img(src: str, alt: str) -> str:
    return f'<img src="{_e(src)}" alt="{_e(alt)}" loading="lazy">'


def _recovery_html(recovery: dict[str, Any]) -> str:
    """One line for a plan `accelkit distill` recovered (the fidelity table shows the plan before it)."""
    config = recovery.get("config") or {}
    return (
        f"<p><b>Recovery (distillation):</b> {_fmt(config.get('iterations'))} steps at lr {_fmt(config.get('lr'))}, "
        f"{_fmt(recovery.get('seconds'))} s on {_e(recovery.get('device', '?'))}; PSNR against the baseline on "
        f"{_fmt(recovery.get('eval_prompts'))} held-out prompts {_fmt(recovery.get('psnr_before'))} → "
        f"<b>{_fmt(recovery.get('psnr_after'))} dB</b>. The fidelity and images below are from before recovery.</p>"
    )


def _video_fidelity_rows(fid: Any) -> list[str]:
    """Extra fidelity rows of a video budget: frames averaged and the temporal-consistency PSNR."""
    if getattr(fid, "temporal_psnr", None) is None:
        return []
    return [
        f"<tr><th>frames</th><td>{_fmt(fid.frames)} per video (PSNR/SSIM: mean over every frame; strips show "
        f"at most {STRIP_MAX_FRAMES})</td></tr>",
        f"<tr><th>temporal PSNR (dB)</th><td>{_fmt(min(fid.temporal_psnr, PSNR_CAP_DB))} "
        "(PSNR of frame differences: motion kept)</td></tr>",
    ]


def _budget_html(k: int, budget: BudgetReport, rows: list[dict[str, Any]]) -> str:
    out = [f'<section id="budget-{k}"><h2>Budget {_e(budget.budget)}</h2>']
    status = '<span class="met">met</span>' if budget.met else '<span class="notmet">not met</span>'
    out.append(
        f"<p>Target speedup <b>{_fmt(budget.target_speedup)}×</b>, achieved <b>{_fmt(budget.speedup)}×</b>: "
        f"{status}.</p>"
    )
    if budget.plan_summary:
        out.append(f"<p><b>Plan:</b> {_e(budget.plan_summary)}</p>")
    if budget.verdict:
        out.append(f"<p><b>Against fewer steps:</b> {_e(budget.verdict)}</p>")
    recovery = budget.extra.get("recovery")
    if isinstance(recovery, dict):
        out.append(_recovery_html(recovery))
    fid = budget.fidelity
    lp = _fmt(fid.lpips) if fid.lpips is not None else f"n/a ({_e(fid.lpips_reason or 'not computed')})"
    out.append("<h3>Fidelity vs baseline</h3><table>")
    out.append(f"<tr><th>PSNR (dB)</th><td>{_fmt(min(fid.psnr, PSNR_CAP_DB))}</td></tr>")
    out.append(f"<tr><th>SSIM</th><td>{_fmt(fid.ssim)}</td></tr>")
    out.extend(_video_fidelity_rows(fid))
    out.append(f"<tr><th>LPIPS</th><td>{lp}</td></tr>")
    out.append(f"<tr><th>weights</th><td>{_fmt(budget.weights_bytes / 2**20)} MiB</td></tr>")
    if budget.latency_ms is not None:
        out.append(f"<tr><th>latency</th><td>{_fmt(budget.latency_ms)} ms</td></tr>")
    out.append("</table>")

    if budget.references:
        out.append("<h3>Reference points</h3>")
        if "fewer_steps" in budget.references:
            verdict = "yes" if budget.beats("fewer_steps") else "no"
            cls = "met" if verdict == "yes" else "notmet"
            out.append(f'<p>Beats fewer-steps: <span class="{cls}">{verdict}</span></p>')
        out.append(
            "<table><tr><th>reference</th><th>what</th><th>speedup</th><th>PSNR</th><th>SSIM</th>"
            "<th>LPIPS</th><th>plan beats it</th></tr>"
        )
        out.append(
            f"<tr><th>this plan</th><td>{_e(budget.plan_summary)}</td><td>{_fmt(budget.speedup)}</td>"
            f"<td>{_fmt(min(fid.psnr, PSNR_CAP_DB))}</td><td>{_fmt(fid.ssim)}</td><td>{_fmt(fid.lpips)}</td>"
            "<td></td></tr>"
        )
        for name, ref in budget.references.items():
            out.append(
                f"<tr><th>{_e(name)}</th><td>{_e(ref.description)}</td><td>{_fmt(ref.speedup)}</td>"
                f"<td>{_fmt(min(ref.psnr, PSNR_CAP_DB))}</td><td>{_fmt(ref.ssim)}</td><td>{_fmt(ref.lpips)}</td>"
                f"<td>{'yes' if budget.beats(name) else 'no'}</td></tr>"
            )
        out.append("</table>")

    out.append(f"<h3>Passes</h3>{render_value(budget.passes)}")
    if budget.ablations:
        out.append("<h3>Ablations</h3>")
        for name, tables in budget.ablations.items():
            out.append(f"<h4>{_e(name)}</h4>{render_value(tables)}")

    if rows:
        ref_names = [n for n in budget.references if any(n in r["references"] for r in rows)]
        per = fid.per_image or {}
        out.append(
            f"<h3>Images (same prompts and seeds)</h3><p>Difference: |accelerated − baseline| averaged over "
            f"channels, colour scale 0 – {_fmt(rows[0]['diff_scale'])}.</p>"
        )
        head = "".join(f"<th>{_e(n)}</th>" for n in ref_names)
        out.append(
            f'<table class="grid"><tr><th>prompt</th><th>baseline</th><th>accelerated</th>{head}'
            "<th>difference</th></tr>"
        )
        for i, row in enumerate(rows):
            stats = []
            for key in ("psnr", "ssim", "lpips"):
                vals = per.get(key)
                if vals and i < len(vals):
                    stats.append(f"{key.upper()} {_fmt(vals[i])}")
            cap = _e(row["caption"]) + (f"<br><small>{_e(', '.join(stats))}</small>" if stats else "")
            refs = "".join(
                f"<td>{_img(row['references'][n], n) if n in row['references'] else ''}</td>"
                for n in ref_names
            )
            out.append(
                f'<tr><td class="cap">{cap}</td><td>{_img(row["baseline"], "baseline")}</td>'
                f"<td>{_img(row['accelerated'], 'accelerated')}</td>{refs}"
                f"<td>{_img(row['diff'], 'difference')}</td></tr>"
            )
        out.append("</table>")
    if budget.eval_prompts:
        out.append("<h3>Evaluation prompts</h3><ol>")
        out.extend(f"<li>{_e(p)}</li>" for p in budget.eval_prompts)
        out.append("</ol>")
    out.append("</section>")
    return "\n".join(out)


def _html(data: ReportData, views: list[list[dict[str, Any]]]) -> str:
    m, s, b = data.model, data.settings, data.baseline
    floor = '<span class="met">yes</span>' if data.floor_met else '<span class="notmet">no</span>'
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>accelkit report: {_e(m.id)}</title><style>{_CSS}</style></head><body>",
        f"<h1>accelkit fidelity report: {_e(m.id)}</h1>",
        "<table>",
        f"<tr><th>model</th><td>{_e(m.id)} ({_e(m.family)}, {m.params / 1e6:.1f}M parameters)</td></tr>",
        f"<tr><th>settings</th><td>{s.steps} steps, {s.num_prompts} prompts, seed {s.seed}, "
        f"device {_e(s.device)}, cost = {_e(s.cost_kind)}</td></tr>",
        f"<tr><th>baseline</th><td>cost {_fmt(b.cost)}, latency {_fmt(b.latency_ms)} ms, "
        f"{_fmt(b.flops)} FLOPs, weights {_fmt(b.weights_bytes / 2**20)} MiB</td></tr>",
        f"<tr><th>fidelity floor met</th><td>{floor}</td></tr>",
    ]
    if data.min_psnr is not None:
        parts.append(f"<tr><th>PSNR floor</th><td>{_fmt(data.min_psnr)} dB</td></tr>")
    if data.cost_model:
        parts.append(f"<tr><th>cost model</th><td>{_e(data.cost_model)}</td></tr>")
    parts.append("</table>")
    if data.notes:
        parts.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in data.notes) + "</ul>")

    parts.append(
        "<h2>Summary</h2><table><tr><th>budget</th><th>target</th><th>achieved</th><th>met</th>"
        "<th>PSNR</th><th>SSIM</th><th>LPIPS</th><th>beats fewer-steps</th></tr>"
    )
    for k, budget in enumerate(data.budgets):
        fid = budget.fidelity
        beats = _fmt(budget.beats("fewer_steps")) if "fewer_steps" in budget.references else "—"
        parts.append(
            f'<tr><td><a href="#budget-{k}">{_e(budget.budget)}</a></td><td>{_fmt(budget.target_speedup)}×</td>'
            f"<td>{_fmt(budget.speedup)}×</td><td>{_fmt(budget.met)}</td>"
            f"<td>{_fmt(min(fid.psnr, PSNR_CAP_DB))}</td><td>{_fmt(fid.ssim)}</td><td>{_fmt(fid.lpips)}</td>"
            f"<td>{beats}</td></tr>"
        )
    parts.append("</table>")
    parts.append(
        "<h2>Speed–fidelity</h2><p>Every evaluated configuration; PSNR capped at "
        f"{PSNR_CAP_DB:g} dB (identical images).</p>{_img(_PLOT_FILE, 'speed-fidelity plot')}"
    )
    for k, budget in enumerate(data.budgets):
        parts.append(_budget_html(k, budget, views[k]))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _jsonable(value: Any) -> Any:
    """Plain JSON types only: numpy/torch scalars to Python, tuples to lists, NaN/inf to None.

    Pass configs and ablation tables come from other modules and may hold such values; strict JSON
    has no NaN or Infinity (PSNR, the one metric that is legitimately +inf, is capped earlier).
    """
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, np.ndarray | np.generic):
        return _jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value
