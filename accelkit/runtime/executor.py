"""Run a :class:`Program` step by step: pick the variant the schedule names, carry state between steps.

The schedule is static, so the only Python decisions are a table lookup per call; the graphs
themselves have no host sync and no data-dependent branch. With a :class:`ProgramFamily` the executor
also serves calls with other denoiser inputs or step counts, each with the program derived for it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from accelkit.calibrate.source import StateObserver
from accelkit.errors import PlanMismatchError
from accelkit.passes.base import Program
from accelkit.runtime.family import ProgramFamily, StepSelection, describe_signature_mismatch


def read_state(state: Mapping[str, list[Any]], state_name: str, step: int, variant: str) -> Any:
    """The value a variant reads for ``state_name``: the last written, or the one before for ``@prev``.

    With only one value written so far, ``@prev`` falls back to it (a zero-order estimate).
    """
    base = state_name.removesuffix("@prev")
    history = state.get(base)
    if not history:
        raise RuntimeError(
            f"step {step} runs '{variant}', which needs state '{base}' that no earlier step wrote: "
            "the schedule must start with a full step"
        )
    return history[0] if state_name.endswith("@prev") and len(history) > 1 else history[-1]


def write_state(state: dict[str, list[Any]], written: Mapping[str, Any]) -> None:
    """Record the values a step wrote, keeping the last two of each (``@prev`` reads the older one)."""
    for state_name, value in written.items():
        history = state.setdefault(state_name, [])
        history.append(value)
        del history[:-2]


class ProgramExecutor(StepSelection):
    """Executes a program's variants with per-branch state.

    Args:
        program: the plan's program.
        compile: wrap each variant in ``torch.compile`` on first use (once per variant and signature).
        family: derives programs for other denoiser inputs and step counts; None: only ``program`` runs,
            and other inputs are refused.
        observer: called after every call with ``(step, branch, {state name: tensor})``, the states the
            variant wrote (calibration measures cache priors and step error densities from them).
    """

    def __init__(
        self, program: Program, *, compile: bool = False, family: ProgramFamily | None = None,
        observer: StateObserver | None = None,
    ) -> None:
        self.program = program
        self.compile = compile
        self.family = family
        self._compiled: dict[torch.nn.Module, Any] = {}
        self._signature = program.graph.signature()
        self._scalars: dict[tuple[int, str, int, torch.device], torch.Tensor] = {}
        self.states: dict[int, dict[str, list[torch.Tensor]]] = {}
        self.variant_calls: Counter[str] = Counter()
        self._observer = observer

    def reset(self) -> None:
        """Forget cached state (a new generation begins)."""
        self.states.clear()

    def _module(self, module: torch.nn.Module):
        compiled = self._compiled.get(module)
        if compiled is None:
            compiled = torch.compile(module, fullgraph=True, dynamic=False) if self.compile else module
            self._compiled[module] = compiled
        return compiled

    def _scalar(self, program: Program, name: str, step: int, device: torch.device) -> torch.Tensor:
        # Made once per program, step and device: no host-to-device copy per call.
        key = (id(program), name, step, device)
        value = self._scalars.get(key)
        if value is None:
            value = torch.tensor(program.step_scalars[name][step], dtype=torch.float32, device=device)
            self._scalars[key] = value
        return value

    def check_inputs(self, kwargs: Mapping[str, Any]) -> Program:
        """The program for this call; without a family, other inputs than the plan's are refused."""
        if self.family is None:
            if self.program.graph.call_signature(kwargs) != self._signature:
                raise PlanMismatchError(describe_signature_mismatch(self.program, kwargs))
            return self.program
        return self.current_program(kwargs)

    def run(self, step: int, branch: int, kwargs: Mapping[str, Any], return_dict: bool) -> Any:
        """Run step ``step`` of the schedule for CFG branch ``branch`` and return the denoiser output."""
        program = self.check_inputs(kwargs)
        name = program.schedule[step]
        variant = program.variants[name]
        state = self.states.setdefault(branch, {})
        flat = program.graph.flat_inputs(kwargs)
        reference = flat[0]
        for state_name in variant.state_inputs:
            value = read_state(state, state_name, step, name)
            if self.compile and any(value is other for other in flat):
                # ``@prev`` falling back to the last value passes one tensor twice; a compiled graph
                # guards on aliasing and would compile again for the later, distinct tensors.
                value = value.clone()
            flat.append(value)
        for scalar in variant.scalar_inputs:
            flat.append(self._scalar(program, scalar, step, reference.device))
        with torch.no_grad():
            outputs = self._module(variant.module)(*flat)
        self.variant_calls[name] += 1
        num_user = program.graph.num_user_outputs
        written = dict(zip(variant.state_outputs, outputs[num_user:], strict=True))
        write_state(state, written)
        if self._observer is not None:
            self._observer(step, branch, written)
        return program.graph.rebuild_output(outputs, return_dict)
