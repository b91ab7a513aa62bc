"""SIGINT and SIGTERM: end a command the same way, or hold them off while artifacts are finished."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from accelkit.errors import Interrupted

#: The signal that ended or was deferred by the last command (None: none arrived).
_last: dict[str, int | None] = {"signum": None}


def last_signal() -> int | None:
    return _last["signum"]


def _install(signums: tuple[int, ...], handler: Any) -> dict[int, Any] | None:
    try:
        return {signum: signal.signal(signum, handler) for signum in signums}
    except ValueError:  # not the main thread: signals stay as they are
        return None


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`Interrupted` like Ctrl-C (trial marked, plans and report consistent)."""
    _last["signum"] = None

    def handler(signum: int, frame: Any) -> None:
        _last["signum"] = signum
        raise Interrupted(signum)

    previous = _install((signal.SIGTERM,), handler)
    try:
        yield
    finally:
        for signum, old in (previous or {}).items():
            signal.signal(signum, old)


@dataclass
class Deferred:
    """What :func:`deferred_interrupts` held off: the first signal's number, or None."""

    signum: int | None = None


@contextlib.contextmanager
def deferred_interrupts(message: str) -> Iterator[Deferred]:
    """Hold SIGINT/SIGTERM off until the block ends (a second one aborts at once).

    The finish phase writes plans and report from one study; cutting it short would leave neither.
    """
    state = Deferred()

    def handler(signum: int, frame: Any) -> None:
        if state.signum is not None:
            _last["signum"] = signum
            raise Interrupted(signum)
        state.signum = _last["signum"] = signum
        print(f"accelkit: {message}; send the signal again to abort now", file=sys.stderr)

    previous = _install((signal.SIGINT, signal.SIGTERM), handler)
    try:
        yield state
    finally:
        for signum, old in (previous or {}).items():
            signal.signal(signum, old)
