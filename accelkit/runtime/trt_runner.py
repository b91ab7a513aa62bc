"""Replay a program's schedule with the TensorRT engines :func:`accelkit.export.tensorrt.build_engines` wrote.

:class:`TrtProgramRunner` shares the schedule/state logic of the onnxruntime runner
(:class:`accelkit.runtime.ort_runner.ScheduleReplayRunner`): at each step it runs the engine of the
variant the schedule names, with the user inputs, the state it reads and the step's scalars. The
difference is where values live: everything stays a torch tensor on the engine's GPU. Inputs are
bound to the execution context by address, outputs are allocated by torch and bound the same way,
and the state tensors a variant writes are kept as they are (on the device) for the variants that
read them at later steps. Engines run on torch's current CUDA stream, so there is no host sync
between steps. :class:`AcceleratedPipeline` drives it unchanged (only the denoiser call differs).

What runs a variant is an *engine backend* (``device`` and ``execute(variant, input_names, feeds,
output_names)``): :class:`TensorRTEngines` for real engines; tests plug in a backend that runs the
ONNX models in onnxruntime, which exercises everything but TensorRT itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from accelkit.calibrate.source import StateObserver
from accelkit.errors import InputError
from accelkit.passes.base import Program
from accelkit.runtime.ort_runner import ProgramMeta, ScheduleReplayRunner, VariantMeta, apply_runner
from accelkit.runtime.pipeline import AcceleratedPipeline

__all__ = ["EngineBackend", "TensorRTEngines", "TrtProgramRunner", "apply_tensorrt"]

_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a manifest dtype name (``"bfloat16"`` -> ``torch.bfloat16``)."""
    dtype = _TORCH_DTYPES.get(name)
    if dtype is None:
        raise InputError(f"the engine manifest names dtype {name!r}, which the TensorRT runner cannot feed")
    return dtype


class EngineBackend(Protocol):
    """Runs one variant's engine.

    Args:
        device: where inputs are expected and outputs are returned.
    """

    device: torch.device

    def execute(
        self,
        variant: str,
        input_names: Sequence[str],
        feeds: Mapping[str, torch.Tensor],
        output_names: Sequence[str],
    ) -> list[torch.Tensor]:
        """Run ``variant`` on ``feeds`` (tensors on ``device``); return outputs in ``output_names`` order."""
        ...


class TensorRTEngines:
    """The real engine backend: deserialized engines and one execution context per variant.

    Args:
        directory: the engine folder.
        manifest: its parsed engine manifest.
        device: the CUDA device the engines run on (default: the current one).
    """

    def __init__(self, directory: str | Path, manifest: Mapping[str, Any], device: str | torch.device | None = None):
        from accelkit.export.tensorrt import TensorRTToolchain, check_engine_compatible, require_tensorrt

        self.trt = require_tensorrt()
        toolchain = TensorRTToolchain()
        check_engine_compatible(manifest, toolchain.environment())
        self.device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        self.directory = Path(directory)
        self.files = {m["variant"]: m["file"] for m in manifest["models"]}
        self.logger = toolchain.logger
        self.runtime = self.trt.Runtime(self.logger)
        self._engines: dict[str, Any] = {}
        self._contexts: dict[str, Any] = {}

    def engine(self, variant: str) -> Any:
        """The deserialized engine of ``variant`` (loaded on first use)."""
        engine = self._engines.get(variant)
        if engine is None:
            data = (self.directory / self.files[variant]).read_bytes()
            with torch.cuda.device(self.device):
                engine = self.runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise InputError(
                    f"TensorRT could not load {self.files[variant]}: build the engines again on this machine"
                )
            self._engines[variant] = engine
            self._contexts[variant] = engine.create_execution_context()
        return engine

    def _torch_dtype(self, trt_dtype: Any) -> torch.dtype:
        trt = self.trt
        table = {
            trt.DataType.FLOAT: torch.float32,
            trt.DataType.HALF: torch.float16,
            trt.DataType.BF16: torch.bfloat16,
            trt.DataType.INT32: torch.int32,
            trt.DataType.INT64: torch.int64,
            trt.DataType.INT8: torch.int8,
            trt.DataType.BOOL: torch.bool,
            trt.DataType.UINT8: torch.uint8,
        }
        return table[trt_dtype]

    def execute(
        self,
        variant: str,
        input_names: Sequence[str],
        feeds: Mapping[str, torch.Tensor],
        output_names: Sequence[str],
    ) -> list[torch.Tensor]:
        engine = self.engine(variant)
        context = self._contexts[variant]
        for name in input_names:
            tensor = feeds[name]
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = []
        for name in output_names:
            # Fresh tensors every call: earlier outputs may be held as cache state.
            shape = tuple(context.get_tensor_shape(name))
            tensor = torch.empty(shape, dtype=self._torch_dtype(engine.get_tensor_dtype(name)), device=self.device)
            context.set_tensor_address(name, tensor.data_ptr())
            outputs.append(tensor)
        stream = torch.cuda.current_stream(self.device)
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run the '{variant}' engine (see its log above)")
        return outputs


class TrtProgramRunner(ScheduleReplayRunner):
    """Runs a program's engines with per-branch state kept on the device.

    Args:
        directory: the engine folder :func:`accelkit.export.tensorrt.build_engines` wrote.
        program_meta: the :class:`Program` the engines were built from (checked against the
            manifest; rebuilds the denoiser's output structure), a :class:`ProgramMeta`, or None to
            run from the manifest alone (outputs are then returned as a tuple).
        backend: what runs an engine (default: :class:`TensorRTEngines` over ``directory``).
        check_files: verify every engine file's sha256 against the manifest first.
        observer: sees every step's written states (see :class:`ScheduleReplayRunner`).
    """

    def __init__(
        self,
        directory: str | Path,
        program_meta: Program | ProgramMeta | None = None,
        *,
        backend: EngineBackend | None = None,
        check_files: bool = True,
        observer: StateObserver | None = None,
    ) -> None:
        from accelkit.export.tensorrt import read_engine_manifest, verify_engine_files

        manifest = read_engine_manifest(directory)
        if check_files:
            verify_engine_files(directory, manifest)
        super().__init__(directory, manifest, program_meta, observer=observer)
        self.backend = backend if backend is not None else TensorRTEngines(directory, manifest)
        self.device = self.backend.device
        self._scalars: dict[tuple[str, int], torch.Tensor] = {}

    def _feed_user(self, value: torch.Tensor, dtype: str) -> torch.Tensor:
        return value.to(device=self.device, dtype=torch_dtype(dtype)).contiguous()

    def _feed_scalar(self, name: str, step: int, dtype: str) -> torch.Tensor:
        # Made once per (scalar, step) and kept on the device: no host-to-device copy per call.
        key = (name, step)
        value = self._scalars.get(key)
        if value is None:
            value = torch.tensor(self.meta.step_scalars[name][step], dtype=torch_dtype(dtype), device=self.device)
            self._scalars[key] = value
        return value

    def _execute(self, name: str, variant: VariantMeta, feeds: dict[str, Any]) -> Sequence[torch.Tensor]:
        return self.backend.execute(name, variant.input_names, feeds, variant.output_names)

    def _to_torch(self, value: Any, device: torch.device | None) -> torch.Tensor:
        return value if device is None else value.to(device=device)


def apply_tensorrt(
    pipe: Any,
    program: Program,
    directory: str | Path,
    *,
    backend: EngineBackend | None = None,
    call_defaults: dict[str, Any] | None = None,
) -> AcceleratedPipeline:
    """Accelerate ``pipe`` with the engines built from ``program`` in ``directory`` (steps run in TensorRT).

    Args:
        pipe: the diffusers pipeline.
        program: the program the engines were built from (checked against the manifest).
        directory: the folder :func:`accelkit.export.tensorrt.build_engines` wrote.
        backend: what runs an engine (default: TensorRT on the current CUDA device).
        call_defaults: pipeline arguments applied when the caller omits them.
    """
    return apply_runner(
        pipe, program, lambda p: TrtProgramRunner(directory, p, backend=backend),
        call_defaults=call_defaults, caller="apply_tensorrt",
    )  # fmt: skip
