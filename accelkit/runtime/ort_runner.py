"""Replay a program's schedule with the ONNX models :func:`accelkit.export.onnx.export_program_onnx` wrote.

:class:`OrtProgramRunner` has the interface of :class:`accelkit.runtime.executor.ProgramExecutor`
(``run(step, branch, kwargs, return_dict)``, ``reset()``, ``program``, ``states``,
``variant_calls``, an ``observer`` of written states), so :class:`AcceleratedPipeline`'s step-aware
forward drives it unchanged: at each step it runs the variant the schedule names in onnxruntime,
feeds the user inputs, the state tensors (last value, or the one before for ``"@prev"`` names,
exactly as the PyTorch executor does) and the step's scalars, and keeps state per CFG branch.

That schedule/state logic lives in :class:`ScheduleReplayRunner`, which the TensorRT runner
(:mod:`accelkit.runtime.trt_runner`) shares; only feeding values and running a variant differ.

Inside an :class:`AcceleratedPipeline` the runner also serves other step counts (the exported graphs
do not depend on the schedule: the schedule and step scalars of the derived program are replayed over
them) and other batch sizes through the export's dynamic batch. The onnxruntime runner also serves
other resolutions: the program derived for the new denoiser inputs is exported once more, to a
temporary folder, the first time they occur.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accelkit.calibrate.source import StateObserver
from accelkit.capture.graph import split_call
from accelkit.errors import InputError, PlanMismatchError
from accelkit.passes.base import Program
from accelkit.runtime.executor import read_state, write_state
from accelkit.runtime.family import StepSelection
from accelkit.runtime.pipeline import AcceleratedPipeline

_NUMPY_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "float64": np.float64,
    "int64": np.int64,
    "int32": np.int32,
    "bool": np.bool_,
}


@dataclass(frozen=True)
class VariantMeta:
    """The calling convention of one exported variant.

    Args:
        name: the variant name (``"full"``, ``"cached"``).
        file: the ONNX file in the export directory.
        input_names: ONNX input names in order (user, state, scalar).
        output_names: ONNX output names in order (user, state).
        state_inputs: state names read, in the order of their ONNX inputs.
        state_outputs: state names written, in the order of their ONNX outputs.
        scalar_inputs: step scalar names, in the order of their ONNX inputs.
        input_shapes: per ONNX input, its shape (``"batch"`` where dynamic).
        input_dtypes: per ONNX input, its dtype name.
    """

    name: str
    file: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    state_inputs: tuple[str, ...]
    state_outputs: tuple[str, ...]
    scalar_inputs: tuple[str, ...]
    input_shapes: tuple[tuple[Any, ...], ...]
    input_dtypes: tuple[str, ...]

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any]) -> VariantMeta:
        inputs, outputs = entry["inputs"], entry["outputs"]
        return cls(
            name=entry["variant"],
            file=entry["file"],
            input_names=tuple(i["name"] for i in inputs),
            output_names=tuple(o["name"] for o in outputs),
            state_inputs=tuple(i["source"] for i in inputs if i["role"] == "state"),
            state_outputs=tuple(o["source"] for o in outputs if o["role"] == "state"),
            scalar_inputs=tuple(i["source"] for i in inputs if i["role"] == "scalar"),
            input_shapes=tuple(tuple(i["shape"]) for i in inputs),
            input_dtypes=tuple(i["dtype"] for i in inputs),
        )


@dataclass(frozen=True)
class ProgramMeta:
    """What the runner needs of a program, read from the export's manifest.

    Args:
        input_names: the denoiser's tensor keyword arguments, in graph order.
        num_user_outputs: how many leading outputs are the denoiser's.
        schedule: the variant run at each step.
        step_scalars: per-step scalar values by name.
        program: the PyTorch program when one was given (rebuilds the denoiser's output structure and
            checks the call signature); None when running from the manifest alone.
    """

    input_names: tuple[str, ...]
    num_user_outputs: int
    schedule: tuple[str, ...]
    step_scalars: Mapping[str, tuple[float, ...]]
    program: Program | None = None

    @property
    def num_steps(self) -> int:
        return len(self.schedule)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> ProgramMeta:
        meta = manifest["program"]
        return cls(
            input_names=tuple(meta["input_names"]),
            num_user_outputs=int(meta["num_user_outputs"]),
            schedule=tuple(meta["schedule"]),
            step_scalars={k: tuple(v) for k, v in meta["step_scalars"].items()},
        )

    @classmethod
    def from_program(cls, program: Program) -> ProgramMeta:
        return cls(
            input_names=tuple(program.graph.input_names),
            num_user_outputs=program.graph.num_user_outputs,
            schedule=tuple(program.schedule),
            step_scalars={k: tuple(v) for k, v in program.step_scalars.items()},
            program=program,
        )


def _check_matches(meta: ProgramMeta, manifest: Mapping[str, Any], directory: Path) -> None:
    """Refuse an export made for another program (schedule, inputs, state or scalars)."""
    recorded = manifest["program"]
    problems = []
    if tuple(recorded["input_names"]) != meta.input_names:
        problems.append(f"inputs {recorded['input_names']} vs {list(meta.input_names)}")
    if tuple(recorded["schedule"]) != meta.schedule:
        problems.append(f"schedule {recorded['schedule']} vs {list(meta.schedule)}")
    if int(recorded["num_user_outputs"]) != meta.num_user_outputs:
        problems.append("number of outputs")
    program = meta.program
    if program is not None:
        specs = [s.to_dict() for s in program.graph.input_specs]
        if recorded["input_specs"] != specs:
            problems.append("input shapes/dtypes")
        for name, variant in program.variants.items():
            other = recorded["variants"].get(name)
            ours = {
                "state_inputs": list(variant.state_inputs),
                "state_outputs": list(variant.state_outputs),
                "scalar_inputs": list(variant.scalar_inputs),
            }
            if other is not None and other != ours:
                problems.append(f"variant '{name}' state/scalars")
        for name, values in program.step_scalars.items():
            if name in recorded["step_scalars"] and not np.allclose(recorded["step_scalars"][name], values):
                problems.append(f"step scalar '{name}'")
    if problems:
        raise PlanMismatchError(
            f"the export in '{directory}' was made for another program ({'; '.join(problems)}): "
            "export this program again"
        )


def _resolve_meta(program_meta: Program | ProgramMeta | None, manifest: Mapping[str, Any]) -> ProgramMeta:
    if isinstance(program_meta, Program):
        return ProgramMeta.from_program(program_meta)
    if isinstance(program_meta, ProgramMeta):
        return program_meta
    if program_meta is None:
        return ProgramMeta.from_manifest(manifest)
    raise InputError(
        f"program_meta must be a Program, a ProgramMeta or None, not {type(program_meta).__name__}"
    )


class ScheduleReplayRunner(StepSelection):
    """Replays a program's schedule over exported variants with per-branch state.

    The schedule, state and scalar logic shared by the onnxruntime and TensorRT runners: at each
    step the variant the schedule names runs with the user inputs, the state it reads (the last
    value, or the one before for ``"@prev"`` names, exactly as the PyTorch executor does) and the
    step's scalars; the state it writes is kept per CFG branch. Subclasses say how values are fed
    and how one variant runs (:meth:`_feed_user`, :meth:`_feed_scalar`, :meth:`_execute`,
    :meth:`_to_torch`).

    Args:
        directory: the export folder.
        manifest: its parsed manifest (``program`` and ``models`` sections).
        program_meta: the :class:`Program` the export was made from, a :class:`ProgramMeta`, or None
            to run from the manifest alone (outputs are then returned as a tuple).
        observer: called after every call with ``(step, branch, {state name: tensor})`` (as the
            PyTorch executor's).
    """

    def __init__(
        self, directory: str | Path, manifest: Mapping[str, Any], program_meta: Program | ProgramMeta | None,
        *, observer: StateObserver | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        meta = _resolve_meta(program_meta, manifest)
        _check_matches(meta, manifest, self.directory)
        self.meta = meta
        # StepAwareForward and AcceleratedPipeline read ``executor.program.num_steps``.
        self.program: Any = meta.program if meta.program is not None else meta
        self.variants = {m["variant"]: VariantMeta.from_manifest(m) for m in manifest["models"]}
        missing = sorted(set(meta.schedule) - set(self.variants))
        if missing:
            raise InputError(f"the export in '{self.directory}' lacks variant(s) {missing} the schedule runs")
        self._signature = meta.program.graph.signature() if meta.program is not None else None
        self._plan_meta = meta
        self.states: dict[int, dict[str, list[Any]]] = {}
        self.variant_calls: Counter[str] = Counter()
        self._observer = observer

    def reset(self) -> None:
        """Forget cached state (a new generation begins)."""
        self.states.clear()

    # Backend hooks -------------------------------------------------------------------------

    def _feed_user(self, value: torch.Tensor, dtype: str) -> Any:
        """A user input as the backend takes it."""
        raise NotImplementedError

    def _feed_scalar(self, name: str, step: int, dtype: str) -> Any:
        """Step scalar ``name`` at ``step`` as the backend takes it."""
        raise NotImplementedError

    def _execute(self, name: str, variant: VariantMeta, feeds: dict[str, Any]) -> Sequence[Any]:
        """Run variant ``name``; return its outputs in ``variant.output_names`` order."""
        raise NotImplementedError

    def _to_torch(self, value: Any, device: torch.device | None) -> torch.Tensor:
        """A backend output as a torch tensor (on ``device`` when given)."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------

    def select_steps(self, num_steps: int) -> None:
        """Replay the schedule and step scalars derived for ``num_steps`` over the exported graphs."""
        if num_steps == self.num_steps:
            return
        super().select_steps(num_steps)
        program = self.family.for_steps(num_steps) if self.family is not None else None
        if program is None or num_steps == self._plan_meta.num_steps:
            self.meta = self._plan_meta
        else:
            missing = sorted(set(program.schedule) - set(self.variants))
            if missing:
                raise PlanMismatchError(
                    f"at {num_steps} steps the plan runs variant(s) {missing}, which the export in "
                    f"'{self.directory}' lacks: export the plan again or run {self._plan_meta.num_steps} steps"
                )
            self.meta = dataclasses.replace(
                self._plan_meta, schedule=tuple(program.schedule),
                step_scalars={k: tuple(v) for k, v in program.step_scalars.items()},
            )
        # Step scalars a backend keeps per (name, step) belong to the previous schedule.
        getattr(self, "_scalars", {}).clear()

    def input_problem(self, kwargs: Mapping[str, Any], variant: VariantMeta) -> str | None:
        """Why the call's inputs do not fit ``variant``'s exported inputs (None when they fit)."""
        tensors = split_call(kwargs)[0]
        for index, name in enumerate(self.meta.input_names):
            value = tensors.get(name)
            expected = variant.input_shapes[index]
            ok = (
                isinstance(value, torch.Tensor)
                and value.dim() == len(expected)
                and all(
                    not isinstance(e, int) or e == int(s) for e, s in zip(expected, value.shape, strict=True)
                )
                and str(value.dtype).removeprefix("torch.") == variant.input_dtypes[index]
            )
            if not ok:
                got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                return f"the export expects {name} of shape {list(expected)} {variant.input_dtypes[index]}, got {got}"
        return None

    def check_inputs(self, kwargs: Mapping[str, Any], variant: VariantMeta) -> None:
        """Refuse a call the exported models were not made for (shapes, dtypes, baked-in arguments)."""
        from accelkit.runtime.executor import describe_signature_mismatch

        program = self.meta.program
        static_batch = all(isinstance(d, int) for shape in variant.input_shapes for d in shape)
        if program is not None and static_batch and variant is self.variants.get(variant.name):
            # The same check as ProgramExecutor: one signature per plan.
            if program.graph.call_signature(kwargs) != self._signature:
                raise PlanMismatchError(describe_signature_mismatch(program, kwargs))
            return
        problem = self.input_problem(kwargs, variant)
        if problem is not None:
            if program is not None:
                raise PlanMismatchError(describe_signature_mismatch(program, kwargs))
            raise PlanMismatchError(problem)

    def variants_for(self, kwargs: Mapping[str, Any]) -> Mapping[str, VariantMeta]:
        """The exported variants that run this call (the export's own; a backend may add others)."""
        return self.variants

    def run(self, step: int, branch: int, kwargs: Mapping[str, Any], return_dict: bool) -> Any:
        """Run step ``step`` of the schedule for CFG branch ``branch`` and return the denoiser output."""
        name = self.meta.schedule[step]
        variant = self.variants_for(kwargs)[name]
        self.check_inputs(kwargs, variant)
        state = self.states.setdefault(branch, {})
        tensors = split_call(kwargs)[0]  # nested tensors by path, as the graph names its inputs
        reference = tensors[self.meta.input_names[0]]
        values: list[Any] = [
            self._feed_user(tensors[n], variant.input_dtypes[i]) for i, n in enumerate(self.meta.input_names)
        ]
        for state_name in variant.state_inputs:
            values.append(read_state(state, state_name, step, name))
        offset = len(values)
        for index, scalar in enumerate(variant.scalar_inputs):
            values.append(self._feed_scalar(scalar, step, variant.input_dtypes[offset + index]))
        feeds = dict(zip(variant.input_names, values, strict=True))
        outputs = self._execute(name, variant, feeds)
        self.variant_calls[name] += 1
        num_user = self.meta.num_user_outputs
        written = dict(zip(variant.state_outputs, outputs[num_user:], strict=True))
        write_state(state, written)
        if self._observer is not None:
            self._observer(step, branch, {k: self._to_torch(v, None) for k, v in written.items()})
        user = tuple(self._to_torch(o, reference.device) for o in outputs[:num_user])
        if self.meta.program is not None:
            return self.meta.program.graph.rebuild_output(user, return_dict)
        return user


class OrtProgramRunner(ScheduleReplayRunner):
    """Runs a program's exported variants in onnxruntime with per-branch state.

    Args:
        directory: the folder :func:`accelkit.export.onnx.export_program_onnx` wrote.
        program_meta: the :class:`Program` the export was made from (checked against the manifest;
            used to rebuild the denoiser's output structure), a :class:`ProgramMeta`, or None to run
            from the manifest alone (outputs are then returned as a tuple).
        providers: onnxruntime execution providers (default: CPU).
        session_options: an ``onnxruntime.SessionOptions``; by default
            :func:`accelkit.export.onnx.onnxruntime_session_options` (4-bit matmuls with float
            activations, as the export was verified).
        check_files: verify every file's sha256 against the manifest before the first session.
        observer: sees every step's written states (see :class:`ScheduleReplayRunner`).
    """

    def __init__(
        self,
        directory: str | Path,
        program_meta: Program | ProgramMeta | None = None,
        *,
        providers: Sequence[Any] | None = None,
        session_options: Any = None,
        check_files: bool = True,
        observer: StateObserver | None = None,
    ) -> None:
        from accelkit.export.onnx import onnxruntime_session_options, read_manifest, verify_files

        manifest = read_manifest(directory)
        if check_files:
            verify_files(directory, manifest)
        super().__init__(directory, manifest, program_meta, observer=observer)
        self.providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        self.session_options = session_options if session_options is not None else onnxruntime_session_options()
        self._sessions: dict[str, Any] = {}
        # Exports made at run time for other resolutions: (variants, folder) in the order made.
        self._extra_exports: list[Mapping[str, VariantMeta]] = []
        # The input values each export (the plan's first) was specialized to; {} for most families.
        self._export_values: list[dict[str, tuple]] = [
            self.meta.program.graph.input_values if self.meta.program is not None else {}]
        self._export_root: tempfile.TemporaryDirectory | None = None

    def session(self, name: str, variant: VariantMeta | None = None) -> Any:
        """The onnxruntime session of variant ``name`` (of the plan's export unless ``variant`` is given)."""
        path = str(self.directory / (variant or self.variants[name]).file)
        session = self._sessions.get(path)
        if session is None:
            import onnxruntime as ort

            session = ort.InferenceSession(path, sess_options=self.session_options, providers=self.providers)
            self._sessions[path] = session
        return session

    def variants_for(self, kwargs: Mapping[str, Any]) -> Mapping[str, VariantMeta]:
        """The plan's export when the call fits it (any batch where it is dynamic), else one made for it."""
        from accelkit.capture.specialize import input_values

        for variants, values in zip((self.variants, *self._extra_exports), self._export_values, strict=True):
            # An export specialized to input values (Lumina2's caption lengths) serves only those values.
            fits_values = input_values(kwargs, tuple(values)) == values
            if fits_values and self.input_problem(kwargs, next(iter(variants.values()))) is None:
                return variants
        if self.family is None or not self.family.derivable:
            return self.variants  # check_inputs names what does not fit
        return self._export_for(kwargs)

    def _export_for(self, kwargs: Mapping[str, Any]) -> Mapping[str, VariantMeta]:
        from accelkit.export.onnx import export_program_onnx

        program = self.family.for_call(kwargs, self.num_steps)
        if self._export_root is None:
            self._export_root = tempfile.TemporaryDirectory(prefix="accelkit-onnx-")
        folder = Path(self._export_root.name) / str(len(self._extra_exports))
        inputs = dict(zip(program.graph.input_names, program.graph.flat_inputs(kwargs), strict=True))
        manifest = export_program_onnx(program, folder, inputs=inputs)
        variants = {}
        for entry in manifest["models"]:
            meta = VariantMeta.from_manifest(entry)
            variants[meta.name] = dataclasses.replace(meta, file=str(folder / meta.file))
        self._extra_exports.append(variants)
        self._export_values.append(program.graph.input_values)
        return variants

    def _feed_user(self, value: torch.Tensor, dtype: str) -> np.ndarray:
        from accelkit.export.onnx import to_numpy

        return to_numpy(value)

    def _feed_scalar(self, name: str, step: int, dtype: str) -> np.ndarray:
        return np.asarray(self.meta.step_scalars[name][step], dtype=_NUMPY_DTYPES.get(dtype, np.float32))

    def _execute(self, name: str, variant: VariantMeta, feeds: dict[str, Any]) -> Sequence[Any]:
        return self.session(name, variant).run(list(variant.output_names), feeds)

    def _to_torch(self, value: Any, device: torch.device | None) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        return tensor if device is None else tensor.to(device=device)


def apply_runner(
    pipe: Any,
    program: Program,
    make_runner: Callable[[Program], ScheduleReplayRunner],
    *,
    call_defaults: dict[str, Any] | None = None,
    caller: str = "apply_runner",
) -> AcceleratedPipeline:
    """Accelerate ``pipe`` with a runner that replays ``program``'s schedule over exported variants.

    The onnxruntime and TensorRT entry points (:func:`apply_onnx`, ``apply_tensorrt``) are this with
    their runner.

    Args:
        pipe: the diffusers pipeline (modified in place until ``restore()``).
        program: the program the export was made from (checked against the export's manifest).
        make_runner: ``program -> runner`` (an :class:`OrtProgramRunner`, a ``TrtProgramRunner``).
        call_defaults: pipeline arguments applied when the caller omits them.
        caller: the public function's name, for the error message.
    """
    if not isinstance(program, Program):
        raise InputError(f"{caller}() needs a Program, got {type(program).__name__}")
    return AcceleratedPipeline(pipe, program, call_defaults=call_defaults, executor=make_runner(program))


def apply_onnx(
    pipe: Any,
    program: Program,
    directory: str | Path,
    *,
    providers: Sequence[Any] | None = None,
    call_defaults: dict[str, Any] | None = None,
) -> AcceleratedPipeline:
    """Accelerate ``pipe`` with the ONNX export of ``program`` in ``directory`` (steps run in onnxruntime).

    Args:
        pipe: the diffusers pipeline.
        program: the program the export was made from (checked against the manifest).
        directory: the folder :func:`accelkit.export.onnx.export_program_onnx` wrote.
        providers: onnxruntime execution providers (default: CPU).
        call_defaults: pipeline arguments applied when the caller omits them.
    """
    return apply_runner(
        pipe, program, lambda p: OrtProgramRunner(directory, p, providers=providers),
        call_defaults=call_defaults, caller="apply_onnx",
    )  # fmt: skip
