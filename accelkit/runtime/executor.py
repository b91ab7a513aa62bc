"""Run a :class:`Program` step by step: pick the variant the schedule names, carry state between steps.

The schedule is static, so the only Python decisions are a table lookup per call; the graphs
themselves have no host sync and no data-dependent branch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from accelkit.capture.graph import shape_signature, split_call
from accelkit.errors import PlanMismatchError
from accelkit.passes.base import Program


def describe_signature_mismatch(program: Program, kwargs: Mapping[str, Any]) -> str:
    """One line naming which inputs differ from the ones the plan was made for."""
    differences = []
    tensors, _, nested = split_call(kwargs)  # nested tensors by path: added_cond_kwargs.text_embeds
    for name, spec in zip(program.graph.input_names, program.graph.input_specs, strict=True):
        value = tensors.get(name)
        if not isinstance(value, torch.Tensor):
            differences.append(f"{name} missing (expected shape {list(spec.shape)})")
        elif tuple(value.shape) != spec.shape or str(value.dtype) != spec.dtype:
            differences.append(
                f"{name} is {list(value.shape)} {value.dtype}, the plan expects {list(spec.shape)} {spec.dtype}"
            )
    for name, expected in program.graph.static_kwargs.items():
        if kwargs.get(name) != expected:
            differences.append(f"{name}={kwargs.get(name)!r}, the plan expects {expected!r}")
    extra = sorted(set(tensors) - set(program.graph.input_names))
    extra += sorted(set(kwargs) - set(tensors) - set(nested) - set(program.graph.static_kwargs))
    extra = [k for k in extra if kwargs[k] is not None]
    if extra:
        differences.append(f"unexpected argument(s) {extra}")
    detail = "; ".join(differences) or "argument structure differs"
    return (
        f"the plan was made for other denoiser inputs ({detail}); use the resolution, batch size and "
        "guidance setting the plan was made for, or optimize again for these"
    )


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


class ProgramExecutor:
    """Executes a program's variants with per-branch state.

    Args:
        program: the program to run.
        compile: wrap each variant in ``torch.compile`` on first use.
    """

    def __init__(self, program: Program, *, compile: bool = False) -> None:
        self.program = program
        self.compile = compile
        self._compiled: dict[str, Any] = {}
        self._signature = program.graph.signature()
        self._scalars: dict[tuple[str, int, torch.device], torch.Tensor] = {}
        self.states: dict[int, dict[str, list[torch.Tensor]]] = {}
        self.variant_calls: Counter[str] = Counter()
        # Calibration sets this to a list to receive (step, branch, {state name: tensor}) per call.
        self.state_log: list[tuple[int, int, dict[str, torch.Tensor]]] | None = None

    def reset(self) -> None:
        """Forget cached state (a new generation begins)."""
        self.states.clear()

    def _module(self, name: str):
        module = self._compiled.get(name)
        if module is None:
            module = self.program.variants[name].module
            if self.compile:
                module = torch.compile(module, fullgraph=True, dynamic=False)
            self._compiled[name] = module
        return module

    def _scalar(self, name: str, step: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (name, step, device)
        value = self._scalars.get(key)
        if value is None:
            value = torch.tensor(self.program.step_scalars[name][step], dtype=dtype, device=device)
            self._scalars[key] = value
        return value

    def check_inputs(self, kwargs: Mapping[str, Any]) -> None:
        if shape_signature(kwargs) != self._signature:
            raise PlanMismatchError(describe_signature_mismatch(self.program, kwargs))

    def run(self, step: int, branch: int, kwargs: Mapping[str, Any], return_dict: bool) -> Any:
        """Run step ``step`` of the schedule for CFG branch ``branch`` and return the denoiser output."""
        self.check_inputs(kwargs)
        name = self.program.schedule[step]
        variant = self.program.variants[name]
        state = self.states.setdefault(branch, {})
        flat = self.program.graph.flat_inputs(kwargs)
        reference = flat[0]
        for state_name in variant.state_inputs:
            flat.append(read_state(state, state_name, step, name))
        for scalar in variant.scalar_inputs:
            flat.append(self._scalar(scalar, step, reference.device, torch.float32))
        with torch.no_grad():
            outputs = self._module(name)(*flat)
        self.variant_calls[name] += 1
        num_user = self.program.graph.num_user_outputs
        written = dict(zip(variant.state_outputs, outputs[num_user:], strict=True))
        write_state(state, written)
        if self.state_log is not None:
            self.state_log.append((step, branch, written))
        return self.program.graph.rebuild_output(outputs, return_dict)
