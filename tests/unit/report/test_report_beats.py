"""When a plan counts as beating the fewer-steps reference."""

from __future__ import annotations

import pytest

from accelkit.report.schema import BudgetReport, FidelityMetrics, ReferencePoint


def _budget(speedup: float, psnr: float, ref_speedup: float, ref_psnr: float, target: float = 3.0) -> BudgetReport:
    return BudgetReport(
        budget=f"{target:g}x", target_speedup=target, met=True, speedup=speedup,
        fidelity=FidelityMetrics(psnr=psnr, ssim=0.9), weights_bytes=1,
        references={"fewer_steps": ReferencePoint(speedup=ref_speedup, psnr=ref_psnr, ssim=0.9)},
    )


@pytest.mark.parametrize(
    ("speedup", "psnr", "ref_speedup", "ref_psnr", "expected"),
    [
        (2.97, 38.1, 3.11, 35.7, True),  # both meet 3x; the reference overshoots by the integer step count
        (2.80, 38.1, 3.11, 35.7, False),  # the plan misses the budget the reference meets
        (3.20, 35.0, 3.11, 35.7, False),  # faster but worse
        (3.20, 36.0, 3.11, 35.7, True),
    ],
)
def test_beats_compares_at_the_budget(speedup, psnr, ref_speedup, ref_psnr, expected):
    assert _budget(speedup, psnr, ref_speedup, ref_psnr).beats("fewer_steps") is expected
