"""``accelkit distill``: recover a pruned plan's fidelity by distilling it from the original model.

The distillation itself (matched points, losses, the training loop) is :mod:`accelkit.calibrate.distill`;
this module runs it on a plan under ``OUT/plans/<budget>/``: it rebuilds the teacher (the passes before
prune) and the student (prune applied) from one capture, records the teacher's denoiser calls on the
training prompts, distills, checks that the plan replayed with the saved tensors computes what the
trained student computes, measures PSNR before/after on held-out prompts, and stores the student's
weights in the plan's ``weights.safetensors`` under ``prune.<weight>`` (the prune pass applies them when
the plan is replayed) and a ``recovery`` section in ``plan.json`` and the report.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx

from accelkit.calibrate.distill import DistillConfig, DistillResult, distill
from accelkit.errors import InputError

__all__ = ["DistillConfig", "RecoveryResult", "check_recoverable", "distill_plan", "recover_plan",
           "removable_blocks"]

# Evaluation prompts use seeds far from the training prompts' (as `accelkit optimize` does).
EVAL_SEED_OFFSET = 10_000

Progress = Callable[[int, int, dict[str, float]], None]


@dataclass
class RecoveryResult:
    """Outcome of :func:`recover_plan`.

    Args:
        plan_dir: the plan directory that was updated.
        recovery: the ``recovery`` section written to ``plan.json``.
        report_updated: whether ``OUT/report/`` was re-rendered with it.
    """

    plan_dir: Path
    recovery: dict[str, Any]
    report_updated: bool


def removable_blocks(plan: Any) -> list[str]:
    """The blocks ``plan`` removed; an InputError when it removed none or cannot be distilled."""
    passes = plan.passes
    removed = list((passes.get("prune") or {}).get("removed_blocks") or [])
    if not removed:
        raise InputError(f"plan {plan.budget} removed no blocks; distill recovers pruned plans: rerun "
                         "`accelkit optimize` with --passes that include prune (e.g. --passes prune,cache)")
    if "quant" in passes:
        raise InputError(f"plan {plan.budget} quantizes after pruning; its 4-bit tensors were made from the "
                         "undistilled weights: distill a plan optimized without quant")
    return removed


def check_recoverable(out_dir: str | Path, budget: str | None) -> list[str]:
    """The blocks the plan removed; an InputError for a plan that cannot be distilled (before any model loads)."""
    from accelkit.runtime.plan import read_plan

    return removable_blocks(read_plan(out_dir, budget))


def distill_plan(
    out_dir: str | Path,
    budget: str | None,
    config: DistillConfig,
    *,
    model: str | None = None,
    device: str = "cpu",
    prompts_file: str | None = None,
    eval_prompts_file: str | None = None,
    num_prompts: int = 8,
    num_eval_prompts: int = 8,
    progress: Progress | None = None,
    say: Callable[[str], None] | None = None,
) -> RecoveryResult:
    """:func:`recover_plan` with the prompts read from files (the first ``num_prompts`` / ``num_eval_prompts``)."""
    from accelkit._io import read_prompt_file

    prompts = read_prompt_file(prompts_file)[:num_prompts] if prompts_file else None
    eval_prompts = read_prompt_file(eval_prompts_file)[:num_eval_prompts] if eval_prompts_file else None
    return recover_plan(out_dir, budget, config, model=model, device=device, prompts=prompts,
                        eval_prompts=eval_prompts, num_prompts=num_prompts, num_eval_prompts=num_eval_prompts,
                        progress=progress, say=say)


def _report_entry(out_dir: Path, budget: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    path = out_dir / "report" / "report.json"
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, None
    entry = next((b for b in data.get("budgets", []) if isinstance(b, dict) and b.get("budget") == budget), None)
    return data, entry


@dataclass(frozen=True)
class _Prompts:
    """Training and held-out prompts, and the seed both generate with."""

    train: list[str]
    held_out: list[str]
    seed: int


def _choose_prompts(loaded: Any, prompts: Sequence[str] | None, eval_prompts: Sequence[str] | None,
                    num_prompts: int, num_eval_prompts: int, report: tuple[dict | None, dict | None]) -> _Prompts:
    from accelkit.search.settings import OptimizeSettings, _prompt_sets

    report_data, report_entry = report
    defaults = _prompt_sets(
        OptimizeSettings(model=loaded.model_id, num_prompts=num_prompts, num_eval_prompts=num_eval_prompts),
        loaded.source)
    train = list(prompts) if prompts else defaults.calibration
    if eval_prompts:
        return _Prompts(train, list(eval_prompts), 0)
    if report_entry is not None and report_entry.get("eval_prompts"):
        # The report's prompts and seeds: "before" then reproduces the report's PSNR for this plan.
        return _Prompts(train, [str(p) for p in report_entry["eval_prompts"]],
                        int((report_data or {}).get("settings", {}).get("seed", 0)))
    return _Prompts(train, defaults.evaluation, 0)


@dataclass
class _Stages:
    """The plan's program cut around prune, all from one capture.

    ``teacher``: the passes before prune; ``pruned``: prune applied to it; ``unrecovered``: the whole
    plan without recovered weights. ``kept_weights`` are the plan's weights minus any earlier recovery.
    """

    baseline: Any
    kept_weights: dict[str, torch.Tensor]
    earlier: list[Any]
    prune: Any
    later: list[Any]
    teacher: Any
    pruned: Any
    unrecovered: Any
    num_outputs: int

    def replay(self, weights: dict[str, torch.Tensor]) -> tuple[Any, Any]:
        """(prune applied with ``weights``, the whole plan with them)."""
        from accelkit.passes.base import run_passes

        teacher, _ = run_passes(self.baseline.replace(new_weights=weights), self.earlier)
        pruned, _ = run_passes(teacher, [self.prune])
        whole, _ = run_passes(pruned, self.later)
        return pruned, whole


def _stages(plan: Any, pipe: Any) -> _Stages:
    from accelkit.passes.base import PASS_ORDER, Program, config_from_dict, run_passes
    from accelkit.passes.prune import RECOVERED_WEIGHT_PREFIX
    from accelkit.runtime.plan import build_program

    current = build_program(plan, pipe)
    # Distillation starts again from the original weights, replacing any earlier recovery.
    kept_weights = {k: v for k, v in current.new_weights.items() if not k.startswith(RECOVERED_WEIGHT_PREFIX)}
    baseline = Program.from_graph(current.graph, int(plan.data["baseline_steps"]))
    configs = [config_from_dict(name, data) for name, data in plan.passes.items()]
    prune_position = PASS_ORDER.index("prune")
    earlier = [c for n, c in zip(plan.passes, configs, strict=True) if PASS_ORDER.index(n) < prune_position]
    later = [c for n, c in zip(plan.passes, configs, strict=True) if PASS_ORDER.index(n) > prune_position]
    prune_config = configs[list(plan.passes).index("prune")]
    teacher, _ = run_passes(baseline.replace(new_weights=kept_weights), earlier)
    pruned, _ = run_passes(teacher, [prune_config])
    unrecovered, _ = run_passes(pruned, later)
    return _Stages(baseline=baseline, kept_weights=kept_weights, earlier=earlier, prune=prune_config, later=later,
                   teacher=teacher, pruned=pruned, unrecovered=unrecovered,
                   num_outputs=current.graph.num_user_outputs)


def recover_plan(
    out_dir: str | Path,
    budget: str | None,
    config: DistillConfig,
    *,
    model: str | None = None,
    device: str = "cpu",
    prompts: Sequence[str] | None = None,
    eval_prompts: Sequence[str] | None = None,
    num_prompts: int = 8,
    num_eval_prompts: int = 8,
    progress: Progress | None = None,
    say: Callable[[str], None] | None = None,
) -> RecoveryResult:
    """Distill the pruned plan ``OUT/plans/<budget>`` from the original model and save the student.

    Args:
        out_dir: the directory ``accelkit optimize`` wrote.
        budget: which plan (None: the only one).
        config: training settings.
        model: model to load (default: the one the plan names; its weights must match).
        device: ``cpu`` or ``cuda``.
        prompts: training prompts (default: the model's calibration prompts, ``num_prompts`` of them).
        eval_prompts: held-out prompts for the before/after PSNR (default: the report's evaluation
            prompts for this budget, else the model's held-out prompts, ``num_eval_prompts`` of them).
        num_prompts: training prompts when ``prompts`` is None.
        num_eval_prompts: evaluation prompts when neither ``eval_prompts`` nor a report gives them.
        progress: per-step callback, see :func:`accelkit.calibrate.distill.distill`.
        say: receives one-line status messages.

    Raises:
        InputError: no such plan, a plan without pruning, or one that also quantizes.
    """
    from accelkit.calibrate import Calibrator
    from accelkit.loading import load_pipeline
    from accelkit.passes.prune import record_calibration_inputs, recovered_weight_key
    from accelkit.runtime.plan import read_plan

    say = say or (lambda _: None)
    out_dir = Path(out_dir)
    plan = read_plan(out_dir, budget)
    removed = removable_blocks(plan)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} but no CUDA device is visible: use --device cpu")
    loaded = load_pipeline(model or plan.data["model"]["id"], device=device)
    pipe = loaded.pipe
    report = _report_entry(out_dir, plan.budget)
    chosen = _choose_prompts(loaded, prompts, eval_prompts, num_prompts, num_eval_prompts, report)
    train_prompts, held_out, seed = chosen.train, chosen.held_out, chosen.seed
    stages = _stages(plan, pipe)

    generation = plan.data["generation"]
    calib = Calibrator(pipe, train_prompts, height=generation["height"], width=generation["width"],
                       guidance_scale=generation["guidance_scale"], seed=seed)
    say(f"recording teacher trajectories on {len(train_prompts)} training prompts ...")
    calls = record_calibration_inputs(stages.teacher, calib, max_calls=10**9)
    say(f"distilling {len(removed)} removed block(s) ({', '.join(removed)}) on {len(calls)} recorded calls")
    student = stages.pruned.variants["full"].module
    result = distill(stages.teacher.variants["full"].module, student, removed, calls, stages.num_outputs, config,
                     progress=progress)

    recovered = {recovered_weight_key(t): w.detach().cpu().contiguous() for t, w in result.weights.items()}
    new_weights = {**stages.kept_weights, **recovered}
    replayed, recovered_program = stages.replay(new_weights)
    _check_replay(replayed.variants["full"].module, result.weights, student, calls[0], stages.num_outputs)

    say(f"evaluating on {len(held_out)} held-out prompts ...")
    evaluator = Calibrator(pipe, held_out, height=generation["height"], width=generation["width"],
                           guidance_scale=generation["guidance_scale"], seed=seed)
    before, after = _fidelity_before_after(evaluator, stages.baseline, stages.unrecovered, recovered_program)
    recovery = _recovery_section(config, removed, result, chosen, calls, before, after, device)
    _save(out_dir, plan, new_weights, recovery, say)
    report_data, report_entry = report
    report_updated = False
    if report_data is not None and report_entry is not None:
        report_updated = _update_report(out_dir, report_data, plan.budget, recovery)
    return RecoveryResult(plan_dir=plan.path, recovery=recovery, report_updated=report_updated)


def _fidelity_before_after(evaluator: Any, baseline: Any, unrecovered: Any, recovered: Any) -> tuple[dict, dict]:
    from accelkit.report.metrics import fidelity

    reference = evaluator.generate(baseline, seed_offset=EVAL_SEED_OFFSET).images
    before = fidelity(evaluator.generate(unrecovered, seed_offset=EVAL_SEED_OFFSET).images, reference)
    after = fidelity(evaluator.generate(recovered, seed_offset=EVAL_SEED_OFFSET).images, reference)
    return before, after


def _recovery_section(config: DistillConfig, removed: Sequence[str], result: DistillResult, prompts: _Prompts,
                      calls: Sequence[Any], before: dict, after: dict, device: str) -> dict[str, Any]:
    return {
        "method": "normalized feature distillation (LAPTOP-Diff): output MSE + per-point ||Fs-Ft||^2/||Ft||^2",
        "config": config.to_dict(),
        "removed_blocks": list(removed),
        "matched_points": len(result.points),
        "trained_tensors": len(result.weights),
        "train_prompts": len(prompts.train),
        "train_calls": len(calls),
        "losses_before": result.losses_before,
        "losses_after": result.losses_after,
        "last_step_losses": result.last_step,
        "eval_prompts": len(prompts.held_out),
        "psnr_before": before["psnr"],
        "psnr_after": after["psnr"],
        "ssim_before": before["ssim"],
        "ssim_after": after["ssim"],
        "seconds": result.seconds,
        "device": device,
    }


def _save(out_dir: Path, plan: Any, new_weights: dict[str, torch.Tensor], recovery: dict[str, Any],
          say: Callable[[str], None]) -> None:
    """Weights first, then the plan that names them: an interruption in between leaves the old plan
    pointing at its old file name, or at the new tensors with the old metadata; never half a file."""
    from safetensors.torch import save

    from accelkit._io import atomic_write_bytes
    from accelkit.runtime.plan import write_plan_json

    weights_file = "weights.safetensors"
    atomic_write_bytes(plan.path / weights_file, save({k: v.detach().cpu().contiguous()
                                                       for k, v in new_weights.items()}))
    data = dict(plan.data)
    data["weights_file"] = weights_file
    data["recovery"] = recovery
    if data.pop("engines", None) is not None:
        say(f"the plan's exported engines hold the old weights and were unlisted: run `accelkit export {out_dir} "
            f"--budget {plan.budget}` again")
    write_plan_json(plan.path, data)  # re-hashes the new weights


def _check_replay(replayed: fx.GraphModule, weights: dict[str, torch.Tensor], student: fx.GraphModule,
                  inputs: Sequence[torch.Tensor], num_outputs: int) -> None:
    """The prune pass replayed with the saved tensors must compute what the trained student computes."""
    from accelkit.passes.prune import replace_weights

    trained = replace_weights(student, {t: w for t, w in weights.items()})
    with torch.no_grad():
        expected = list(trained(*inputs))[:num_outputs]
        actual = list(replayed(*inputs))[:num_outputs]
    for e, a in zip(expected, actual, strict=True):
        if not torch.equal(e, a):
            raise RuntimeError(f"the replayed plan differs from the trained student by "
                               f"{float((e - a).abs().max()):.3g}; the recovered weights were not applied")


def _update_report(out_dir: Path, report_data: dict[str, Any], budget: str, recovery: dict[str, Any]) -> bool:
    from accelkit.report.render import write_report
    from accelkit.report.schema import ReportData

    for entry in report_data.get("budgets", []):
        if isinstance(entry, dict) and entry.get("budget") == budget:
            entry["recovery"] = recovery
    data = ReportData.from_json(report_data, root=out_dir / "report")
    write_report(out_dir, data)
    return True
