"""Finishing a search generates each evaluation image once: the fewer-steps plan is not generated twice."""

from __future__ import annotations

import json

from accelkit.calibrate import Calibrator
from accelkit.search.optimize import OptimizeSettings, optimize


def test_a_fewer_steps_plan_reuses_its_reference_generation(tmp_path, monkeypatch):
    evaluation_runs: list[tuple[int, tuple]] = []
    generate = Calibrator.generate

    def counting(self, program, prompts=None, **kwargs):
        if kwargs.get("seed_offset") == 10_000:  # the evaluation seeds (_finish)
            evaluation_runs.append((program.num_steps, tuple(program.schedule)))
        return generate(self, program, prompts, **kwargs)

    monkeypatch.setattr(Calibrator, "generate", counting)
    # One validation prompt cannot show a gain over fewer steps: the plan is 2 of 4 steps.
    settings = OptimizeSettings(model="zoo:shapes", budgets=("2x",), passes=("steps",), trials=1, steps=4,
                                num_prompts=1, num_eval_prompts=1, num_val_prompts=1, height=8, width=8,
                                out=str(tmp_path / "out"))
    result = optimize(settings)
    assert result.exit_code == 0, result.outcomes[0].message
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    budget = report["budgets"][0]
    assert json.loads((tmp_path / "out" / "plans" / "2x" / "plan.json").read_text())["passes"]["steps"]["num_steps"] == 2
    # the baseline and the fewer-steps plan, once each
    assert sorted(steps for steps, _ in evaluation_runs) == [2, 4], evaluation_runs
    assert budget["fidelity"]["psnr"] == budget["references"]["fewer_steps"]["psnr"]
