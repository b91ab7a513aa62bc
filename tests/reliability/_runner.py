"""``accelkit`` with test-only slow-downs, so a signal or kill -9 can land inside a trial or the finish.

AK_SLOW_TRIAL=S sleeps S seconds at the start of every trial's build (after printing TRIAL-RUNNING);
AK_SLOW_FINISH=S sleeps before the report is written (after printing FINISHING). Run as a script:
``python tests/reliability/_runner.py optimize ...``.
"""

from __future__ import annotations

import os
import sys
import time


def _slow(owner, name: str, seconds: float, word: str) -> None:
    original = getattr(owner, name)

    def slow(*args, **kwargs):
        print(word, file=sys.stderr, flush=True)
        time.sleep(seconds)
        return original(*args, **kwargs)

    setattr(owner, name, slow)


def main() -> int:
    if os.environ.get("AK_SLOW_TRIAL"):
        from accelkit.search.optimize import Evaluator

        _slow(Evaluator, "build", float(os.environ["AK_SLOW_TRIAL"]), "TRIAL-RUNNING")
    if os.environ.get("AK_SLOW_FINISH"):
        from accelkit.report import render

        _slow(render, "write_report", float(os.environ["AK_SLOW_FINISH"]), "FINISHING")
    from accelkit.cli.main import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
