"""Pass infrastructure: configs, the program passes transform, the registry and the runner.

A pass is a frozen, versioned config dataclass plus one pure function
``(program, config, calib) -> PassResult`` registered by config type under one canonical name, with its hooks
(:mod:`accelkit.passes.hooks`) and its order constraints (``after`` / ``before`` other passes). The
application order (:func:`pass_order`, built in: ``steps -> prune -> quant -> sparse -> cache``) is the
topological order of the declared constraints; every module in ``accelkit/passes/`` is a built-in pass.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx

from accelkit.calibrate.source import CalibrationSource
from accelkit.capture.graph import DenoiserGraph
from accelkit.errors import InputError
from accelkit.passes.hooks import PassHooks


def __getattr__(name: str) -> Any:
    # ``PASS_ORDER`` is derived from the registered constraints, so it is computed on each access.
    if name == "PASS_ORDER":
        return pass_order()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# ---------------------------------------------------------------- search-space vocabulary


@dataclass(frozen=True)
class IntRange:
    """An integer knob in ``[low, high]``.

    Args:
        low: smallest value.
        high: largest value (inclusive).
        step: spacing between values.
        log: sample on a log scale.
    """

    low: int
    high: int
    step: int = 1
    log: bool = False


@dataclass(frozen=True)
class FloatRange:
    """A float knob in ``[low, high]``.

    Args:
        low: smallest value.
        high: largest value.
        log: sample on a log scale.
    """

    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class Choice:
    """A categorical knob.

    Args:
        options: the allowed values (JSON scalars).
    """

    options: tuple[Any, ...]


SearchDomain = IntRange | FloatRange | Choice

# ---------------------------------------------------------------- configs


def _to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    return value


def _coerce(annotation: Any, value: Any) -> Any:
    """Turn JSON lists back into the tuples the frozen configs declare."""
    if value is None:
        return None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value)
            except (TypeError, ValueError):
                continue
        return value
    if origin is tuple and isinstance(value, list | tuple):
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in value)
        return tuple(_coerce(a, v) for a, v in zip(args, value, strict=False))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


@dataclass(frozen=True, kw_only=True)
class PassConfig:
    """Base of every pass config: frozen, versioned, JSON round-trip.

    Subclasses declare ``SEARCH_SPACE`` (field name -> :class:`IntRange` / :class:`FloatRange` /
    :class:`Choice`) so that ``accelkit.search`` can tune them without the pass importing optuna.

    Args:
        version: schema version of the config; bumped when a field's meaning changes.
    """

    version: int = 1
    SEARCH_SPACE: ClassVar[Mapping[str, SearchDomain]] = {}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return {f.name: _to_jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PassConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming the valid ones."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise InputError(f"{cls.__name__}: unknown field(s) {unknown}; valid fields: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        kwargs = {key: _coerce(hints.get(key, Any), value) for key, value in data.items()}
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def is_noop(self) -> bool:
        """True when the config leaves the program unchanged (subclasses override)."""
        return False


# ---------------------------------------------------------------- program


@dataclass(frozen=True)
class GraphVariant:
    """One executable form of the denoiser.

    The module's calling convention is
    ``forward(*user_inputs, *state_inputs, *scalar_inputs) -> (*user_outputs, *state_outputs)``.
    State names ending in ``"@prev"`` read the value before the last one written under that name.

    Args:
        module: the graph module.
        state_inputs: names of state tensors read (written earlier by some variant).
        state_outputs: names of state tensors written.
        scalar_inputs: names of per-step scalars (``Program.step_scalars``) fed as 0-d tensors.
        roles: what the variant is, for passes that run later (:data:`accelkit.passes.hooks.DENSE`,
            :data:`accelkit.passes.hooks.WRITES_CACHE_STATE`), so no pass recognises another's
            variants by name.
    """

    module: fx.GraphModule
    state_inputs: tuple[str, ...] = ()
    state_outputs: tuple[str, ...] = ()
    scalar_inputs: tuple[str, ...] = ()
    roles: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Program:
    """The optimized denoiser that passes transform.

    Args:
        graph: the capture (input names, output spec, block index) the variants derive from.
        variants: named graph variants; ``"full"`` always exists.
        schedule: the variant run at each denoising step (its length is the step count).
        sigmas: the sampler's sigmas/timesteps set by the ``steps`` pass, or None for the default.
        timestep_kind: ``"sigmas"`` or ``"timesteps"``: which pipeline argument ``sigmas`` feeds.
        scheduler_overrides: scheduler config values the program runs with (set by the ``steps`` pass,
            e.g. the solver order); the runtime applies them to a copy of the pipeline's scheduler for
            each generation and leaves the pipeline's own scheduler unchanged.
        step_scalars: per-step scalar values by name (length = number of steps).
        new_weights: tensors a pass created (quantized weights ...), saved with the plan.
        applied: names of the passes applied so far, in order.
        resolved: per pass name, the config that reproduces this program without calibration.
        stats: per pass name, what the pass measured or decided.
    """

    graph: DenoiserGraph
    variants: Mapping[str, GraphVariant]
    schedule: tuple[str, ...]
    sigmas: tuple[float, ...] | None = None
    timestep_kind: str = "sigmas"
    scheduler_overrides: Mapping[str, Any] = field(default_factory=dict)
    step_scalars: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    new_weights: Mapping[str, torch.Tensor] = field(default_factory=dict)
    applied: tuple[str, ...] = ()
    resolved: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    stats: Mapping[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_graph(cls, graph: DenoiserGraph, num_steps: int) -> Program:
        """The identity program: the captured graph at every step."""
        if num_steps < 1:
            raise InputError(f"num_steps must be >= 1, got {num_steps}")
        return cls(graph=graph, variants={"full": GraphVariant(graph.module)}, schedule=("full",) * num_steps)

    @property
    def num_steps(self) -> int:
        return len(self.schedule)

    def replace(self, **changes: Any) -> Program:
        return dataclasses.replace(self, **changes)

    def sole_full_variant(self, pass_name: str) -> GraphVariant:
        """The ``full`` variant, for passes that must run before any pass adds variants or state.

        Raises:
            InputError: the program already has other variants, a mixed schedule or stateful graphs.
        """
        if set(self.variants) != {"full"} or any(name != "full" for name in self.schedule):
            raise InputError(
                f"{pass_name} must run before passes that add graph variants (order: "
                f"{' -> '.join(pass_order())}); this program has variants {sorted(self.variants)}"
            )
        full = self.variants["full"]
        if full.state_inputs or full.scalar_inputs:
            raise InputError(f"{pass_name} needs a stateless 'full' variant (it runs before cache)")
        return full

    def validate(self) -> None:
        """Check internal consistency; raises ``ValueError`` naming the problem."""
        if "full" not in self.variants:
            raise ValueError("program has no 'full' variant")
        unknown = sorted(set(self.schedule) - set(self.variants))
        if unknown:
            raise ValueError(f"schedule names unknown variant(s) {unknown}")
        for name, values in self.step_scalars.items():
            if len(values) != self.num_steps:
                raise ValueError(f"step scalar '{name}' has {len(values)} values for {self.num_steps} steps")
        if self.sigmas is not None and len(self.sigmas) != self.num_steps:
            raise ValueError(f"{len(self.sigmas)} sigmas for {self.num_steps} steps")
        written: set[str] = set()
        for step, name in enumerate(self.schedule):
            variant = self.variants[name]
            for state in variant.state_inputs:
                base = state.removesuffix("@prev")
                if base not in written:
                    raise ValueError(f"step {step} runs '{name}', which reads state '{base}' nobody wrote yet")
            for scalar in variant.scalar_inputs:
                if scalar not in self.step_scalars:
                    raise ValueError(f"variant '{name}' needs step scalar '{scalar}', which is missing")
            written.update(variant.state_outputs)
        for name, variant in self.variants.items():
            placeholders = [n for n in variant.module.graph.nodes if n.op == "placeholder"]
            expected = len(self.graph.input_names) + len(variant.state_inputs) + len(variant.scalar_inputs)
            if len(placeholders) != expected:
                raise ValueError(f"variant '{name}' has {len(placeholders)} inputs, expected {expected}")
            variant.module.graph.lint()


@dataclass(frozen=True)
class PassResult:
    """What a pass returns.

    Args:
        program: the transformed program (a new object; the input is never mutated).
        modified: True only when something changed.
        stats: what the pass measured or decided (JSON-ready), for the report.
        resolved_config: a config that reproduces ``program`` without calibration (e.g. with the
            chosen schedule spelled out); stored in plans. Defaults to the config given.
    """

    program: Program
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    resolved_config: PassConfig | None = None


PassFunction = Callable[[Program, Any, CalibrationSource | None], PassResult]


@dataclass(frozen=True)
class RegisteredPass:
    name: str
    config_type: type[PassConfig]
    function: PassFunction
    hooks: PassHooks = PassHooks()


_REGISTRY: dict[type, RegisteredPass] = {}
_BY_NAME: dict[str, RegisteredPass] = {}
#: Declared order constraints ``(earlier, later)``; they belong to the names, so a pass registered
#: again under a name (a test's stand-in) keeps its place.
_ORDER_EDGES: set[tuple[str, str]] = set()


def register_pass(
    config_type: type[PassConfig],
    *,
    name: str,
    after: Sequence[str] = (),
    before: Sequence[str] = (),
    hooks: PassHooks | None = None,
) -> Callable[[PassFunction], PassFunction]:
    """Register ``function`` as the pass for ``config_type`` under canonical ``name``.

    Args:
        config_type: the pass's config dataclass.
        name: the canonical name (CLI token, plan key).
        after: passes that must run before this one when both run (names not registered are ignored).
        before: passes that must run after this one when both run.
        hooks: what the pass tells the search, report and export (:class:`PassHooks`).

    Raises:
        ValueError: the name is not an identifier, or the constraints contradict the registered ones.
    """
    if not name.isidentifier():
        raise ValueError(f"pass name {name!r} must be an identifier")
    edges = {(earlier, name) for earlier in after} | {(name, later) for later in before}
    cycle = _cycle(_ORDER_EDGES | edges)
    if cycle:
        raise ValueError(f"pass '{name}': order constraints form a cycle {' -> '.join(cycle)}")

    def decorator(function: PassFunction) -> PassFunction:
        _ORDER_EDGES.update(edges)
        entry = RegisteredPass(name, config_type, function, hooks or PassHooks())
        _REGISTRY[config_type] = entry
        _BY_NAME[name] = entry
        return function

    return decorator


def _cycle(edges: set[tuple[str, str]]) -> list[str]:
    """A cycle among ``edges`` as ``[a, b, ..., a]``, or [] when there is none."""
    successors: dict[str, list[str]] = {}
    for earlier, later in sorted(edges):
        successors.setdefault(earlier, []).append(later)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in successors.get(node, []):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(successors):
        if node not in state and (found := visit(node)):
            return found
    return []


def _topological(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` ordered by the constraints among them (ties alphabetically, so the order is stable)."""
    members = set(names)
    edges = {(a, b) for a, b in _ORDER_EDGES if a in members and b in members}
    waiting = {n: {a for a, b in edges if b == n} for n in members}
    order: list[str] = []
    while waiting:
        ready = sorted(n for n, needs in waiting.items() if not needs)
        if not ready:  # unreachable: register_pass refuses cycles
            raise ValueError(f"pass order constraints form a cycle among {sorted(waiting)}")
        order.append(ready[0])
        del waiting[ready[0]]
        for needs in waiting.values():
            needs.discard(ready[0])
    return tuple(order)


_BUILTINS_LOADED = False


def _load_builtin_passes() -> None:
    """Import every module of ``accelkit/passes/`` (each registers its pass): no list to edit."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    import importlib
    import pkgutil

    import accelkit.passes as package

    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_") and module.name not in ("base", "hooks"):
            importlib.import_module(f"accelkit.passes.{module.name}")
    _BUILTINS_LOADED = True


def pass_order() -> tuple[str, ...]:
    """Names of the registered passes in application order (built-in passes are imported)."""
    _load_builtin_passes()
    return _topological(list(_BY_NAME))


def registered_passes() -> dict[str, RegisteredPass]:
    """Canonical name -> registered pass, in application order (built-in passes are imported)."""
    return {name: _BY_NAME[name] for name in pass_order()}


def pass_for_config(config: PassConfig) -> RegisteredPass:
    entry = _REGISTRY.get(type(config))
    if entry is None:
        _load_builtin_passes()
        entry = _REGISTRY.get(type(config))
    if entry is None:
        raise InputError(f"no pass is registered for {type(config).__name__}")
    return entry


def config_from_dict(name: str, data: Mapping[str, Any]) -> PassConfig:
    """Rebuild a pass config from its canonical name and JSON dict."""
    passes = registered_passes()
    if name not in passes:
        raise InputError(f"unknown pass '{name}': available passes are {', '.join(passes) or 'none'}")
    return passes[name].config_type.from_dict(data)


class PassFailedError(RuntimeError):
    """A pass raised; the message names the passes that had already run."""


def run_passes(
    program: Program,
    configs: Sequence[PassConfig],
    calib: CalibrationSource | None = None,
    *,
    on_pass: Callable[[str, PassResult], None] | None = None,
) -> tuple[Program, dict[str, PassResult]]:
    """Apply ``configs`` in canonical order after checking the order up front.

    Args:
        program: the input program (not mutated).
        configs: one config per pass, given in :func:`pass_order`.
        calib: the calibration source handed to every pass (None: passes that need one refuse to run).
        on_pass: called after each pass with its name and result.

    Returns:
        The final program and the result of each pass by name.

    Raises:
        InputError: configs out of order, repeated, or for unregistered passes.
        PassFailedError: a pass raised or produced an invalid program.
    """
    entries = [pass_for_config(c) for c in configs]
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise InputError(f"pass listed twice in {names}")
    order = pass_order()
    positions = [order.index(n) for n in names]
    if positions != sorted(positions):
        raise InputError(f"passes {names} are out of order; apply them in the order {' -> '.join(order)}")
    already = [n for n in program.applied if n in names]
    if already:
        raise InputError(f"pass(es) {already} were already applied to this program")
    later = [n for n in program.applied if n in order and order.index(n) > min(positions, default=len(order))]
    if later:
        raise InputError(f"cannot apply {names} after {later}: the order is {' -> '.join(order)}")
    results: dict[str, PassResult] = {}
    current = program
    for entry, config in zip(entries, configs, strict=True):
        done = list(current.applied)
        try:
            result = entry.function(current, config, calib)
            result.program.validate()
        except Exception as error:
            ran = ", ".join(done) if done else "none"
            raise PassFailedError(f"pass '{entry.name}' failed (passes already run: {ran}): {error}") from error
        resolved = result.resolved_config or config
        current = result.program.replace(
            applied=(*current.applied, entry.name),
            resolved={**current.resolved, entry.name: resolved.to_dict()},
            stats={**current.stats, entry.name: result.stats},
        )
        result = dataclasses.replace(result, program=current)
        results[entry.name] = result
        if on_pass is not None:
            on_pass(entry.name, result)
    return current, results
