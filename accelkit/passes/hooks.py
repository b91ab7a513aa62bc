"""What a registered pass tells the search, the report and the export about itself.

A pass registers, next to its config and function, a :class:`PassHooks` record: how to describe its
resolved config in words, which seed trials meet a speedup budget, which ablations show what it buys,
what it measures before the search (probes) and what it promises about precision. ``search/`` and
``export/`` iterate the registry and never read a pass's fields themselves
(tests/unit/test_architecture.py checks it).

Seed parameters are keyed by the pass's own field names; ``search/space.py`` prefixes them with the
pass name (``<pass>.<field>``) and fills every other pass with its no-op default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from accelkit.calibrate.source import CalibrationSource

#: Speedups within this share below a budget count as meeting it (as ``optimize`` judges plans).
BUDGET_TOLERANCE = 0.02

#: Variant roles (``GraphVariant.roles``). A variant computes the whole denoiser like ``"full"`` does
#: (another form of it, e.g. the dense graph kept for the first steps of block-sparse attention):
DENSE = "dense"
#: A variant that writes the cache state a cached step reads.
WRITES_CACHE_STATE = "writes cache state"


@dataclass(frozen=True)
class SeedRequest:
    """What a pass gets when asked for seed trials.

    Args:
        target: the speedup the pass must deliver (the budget, or what is left of it after a leading
            pass took its share).
        num_steps: the denoising steps the pass sees (None: unknown, seeds are approximate).
        facts: what the pass's probe measured on this model (empty without a probe).
    """

    target: float
    num_steps: int | None = None
    facts: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Seed:
    """One seed trial for one pass.

    Args:
        params: the pass's field values (its own field names; unnamed fields keep their defaults).
        priority: seeds are enqueued lowest priority first (stable, per budget within a priority);
            guaranteed candidates use 0 and 1, splits between two passes :data:`SPLIT_PRIORITY`.
    """

    params: Mapping[str, Any]
    priority: int = 0


#: Priority of the seeds where two passes share a budget (after the guaranteed single-pass seeds).
SPLIT_PRIORITY = 2


@dataclass(frozen=True)
class Share:
    """Part of a budget a leading pass takes, leaving the rest to a later pass.

    Args:
        params: the leading pass's field values.
        speedup: the speedup those values deliver.
        num_steps: the denoising steps left for the later pass (None: unknown).
    """

    params: Mapping[str, Any]
    speedup: float
    num_steps: int | None


@dataclass(frozen=True)
class Ablation:
    """The chosen plan with this pass's config replaced, to show what one of its choices buys.

    Args:
        config: the replacement resolved config of this pass (JSON dict).
        description: the reference in words for the report (``"same plan with ..."``).
        info: extra JSON facts stored with the ablation's result.
    """

    config: Mapping[str, Any]
    description: str
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PrecisionClaim:
    """What a pass's resolved config promises an exported engine computes in.

    Args:
        fp8: activations in FP8.
        int4_weights: weights stored as 4-bit integers.
        reason: the config choice in words, e.g. ``"quant.<field>=<value>"``.
    """

    fp8: bool = False
    int4_weights: bool = False
    reason: str | None = None


@dataclass(frozen=True)
class ProbeContext:
    """What a probe may use to measure facts for the seeds before the search starts.

    Args:
        base: the baseline program.
        calib: the calibration source (None: no calibration, e.g. a probe of stored facts).
        cost: seconds of a program under the search's cost model.
        num_steps: the baseline step count.
        targets: the budgets, ascending.
    """

    base: Any
    calib: CalibrationSource | None
    cost: Callable[[Any], float]
    num_steps: int
    targets: Sequence[float]


Describe = Callable[[Mapping[str, Any], Mapping[str, Any]], str | None]


@dataclass(frozen=True)
class PassHooks:
    """The optional hooks of a pass; a missing hook means "nothing to say".

    Args:
        describe: ``(resolved, stats) -> str | None``: what the pass did, in words, for the report.
        seeds: ``(request) -> seeds``: trials that meet ``request.target`` with this pass alone.
        shares: ``(request) -> shares``: ways to take part of ``request.target``, best first, leaving
            the rest to a later pass with a ``complete`` hook.
        complete: ``(request) -> params | None``: values meeting what a leading pass left, or None.
        probe: ``(context) -> facts``: measurements the seeds need (``facts["note"]``, when set, is one
            sentence for the report's notes).
        ablations: ``(resolved, stats) -> {key: Ablation}``: variants of the chosen plan worth measuring.
        precision: ``(resolved) -> PrecisionClaim | None``: what an exported engine must compute in.
        space: ``(facts) -> {field: domain}``: the pass's search space on this model, given what its
            probe measured (default: the config's ``SEARCH_SPACE``); a knob the model lacks is left out.
    """

    describe: Describe | None = None
    seeds: Callable[[SeedRequest], Sequence[Seed]] | None = None
    shares: Callable[[SeedRequest], Iterable[Share]] | None = None
    complete: Callable[[SeedRequest], Mapping[str, Any] | None] | None = None
    probe: Callable[[ProbeContext], Mapping[str, Any]] | None = None
    ablations: Callable[[Mapping[str, Any], Mapping[str, Any]], Mapping[str, Ablation]] | None = None
    precision: Callable[[Mapping[str, Any]], PrecisionClaim | None] | None = None
    space: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None
