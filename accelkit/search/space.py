"""Turn the passes' declared search spaces into Optuna suggestions (the only place that does), and
their seed hooks into the first trials."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from accelkit.passes.base import Choice, FloatRange, IntRange, PassConfig, SearchDomain, registered_passes
from accelkit.passes.hooks import BUDGET_TOLERANCE, SPLIT_PRIORITY, ProbeContext, SeedRequest

# BUDGET_TOLERANCE is re-exported: the search judges budgets with the tolerance the seeds are built for.
__all__ = ["BUDGET_TOLERANCE", "SPLIT_ABOVE", "clamp_to_spaces", "default_trials", "probe_facts",
           "search_space", "suggest_configs", "with_noop_defaults"]

Facts = Mapping[str, Mapping[str, Any]]


def search_space(name: str, facts: Facts | None = None) -> Mapping[str, SearchDomain]:
    """The searched fields of pass ``name`` on this model: its ``space`` hook given its probe's facts
    (a knob the model lacks is left out), else its config's ``SEARCH_SPACE``."""
    entry = registered_passes()[name]
    hook = entry.hooks.space
    return entry.config_type.SEARCH_SPACE if hook is None else hook((facts or {}).get(name, {}))


def suggest_configs(trial: Any, pass_names: Sequence[str], fixed: Mapping[str, Mapping[str, Any]] | None = None,
                    *, facts: Facts | None = None) -> list[PassConfig]:
    """Sample one config per pass from its :func:`search_space`; parameters are named ``<pass>.<field>``.

    Args:
        trial: an ``optuna.Trial``.
        pass_names: the passes to configure, in canonical order.
        fixed: per pass, field values that override the search (not sampled).
        facts: per pass, what its probe measured (:func:`probe_facts`); shapes the spaces.
    """
    passes = registered_passes()
    configs: list[PassConfig] = []
    for name in pass_names:
        config_type = passes[name].config_type
        values: dict[str, Any] = {}
        for field, domain in search_space(name, facts).items():
            key = f"{name}.{field}"
            if fixed and field in fixed.get(name, {}):
                values[field] = fixed[name][field]
            elif isinstance(domain, IntRange):
                values[field] = trial.suggest_int(key, domain.low, domain.high, step=domain.step, log=domain.log)
            elif isinstance(domain, FloatRange):
                values[field] = trial.suggest_float(key, domain.low, domain.high, log=domain.log)
            elif isinstance(domain, Choice):
                values[field] = trial.suggest_categorical(key, list(domain.options))
            else:
                raise TypeError(f"{name}.{field}: unsupported search domain {domain!r}")
        configs.append(config_type(**values))
    return configs


#: Budgets above this are also seeded with two passes sharing the speedup.
SPLIT_ABOVE = 1.5


def default_trials(pass_names: Sequence[str], targets: Sequence[float], *, num_steps: int | None = None,
                   facts: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Seed parameters from the passes' seed hooks, guaranteed candidates first.

    Per budget, each pass's ``seeds`` hook gives trials meeting it alone; above :data:`SPLIT_ABOVE`,
    a pass's ``shares`` hook and a later pass's ``complete`` hook split it (the first share the later
    pass can complete). All seeds are then ordered by priority (stable: budgets in order within one),
    so with fewer steps ``len(targets)`` trials meet every budget they can reach. Each seed names
    every searched field, the passes it leaves out at their no-op defaults.

    Args:
        pass_names: the passes searched, in canonical order.
        targets: the budgets.
        num_steps: the baseline step count (None: seeds are approximate).
        facts: per pass, what its probe measured (:func:`probe_facts`).
    """
    passes = registered_passes()
    chosen = [n for n in pass_names if n in passes]
    facts = facts or {}
    ranked: list[tuple[int, dict[str, Any]]] = []
    for target in targets:
        for name in chosen:
            hook = passes[name].hooks.seeds
            request = SeedRequest(target, num_steps, facts.get(name, {}))
            ranked.extend((seed.priority, _prefixed(name, seed.params)) for seed in (hook(request) if hook else ()))
        if target > SPLIT_ABOVE:
            ranked.extend((SPLIT_PRIORITY, split) for split in _splits(chosen, target, num_steps, facts))
    ranked.sort(key=lambda pair: pair[0])
    return [clamp_to_spaces(with_noop_defaults(seed, pass_names, facts), pass_names, facts) for _, seed in ranked]


def _splits(names: Sequence[str], target: float, num_steps: int | None,
            facts: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """For each leading pass with a ``shares`` hook and later pass with ``complete``: one split seed."""
    passes = registered_passes()
    splits = []
    for position, lead in enumerate(names):
        shares = passes[lead].hooks.shares
        if shares is None:
            continue
        for follower in names[position + 1 :]:
            complete = passes[follower].hooks.complete
            if complete is None:
                continue
            for share in shares(SeedRequest(target, num_steps, facts.get(lead, {}))):
                rest = complete(SeedRequest(target / share.speedup, share.num_steps, facts.get(follower, {})))
                if rest is not None:
                    splits.append({**_prefixed(lead, share.params), **_prefixed(follower, rest)})
                    break
    return splits


def _prefixed(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{name}.{field}": value for field, value in params.items()}


def probe_facts(pass_names: Sequence[str], context: ProbeContext) -> dict[str, dict[str, Any]]:
    """Per pass with a ``probe`` hook, what it measured on this model (for seeds and report notes)."""
    passes = registered_passes()
    return {name: dict(probe(context)) for name in pass_names
            if name in passes and (probe := passes[name].hooks.probe) is not None}


def with_noop_defaults(params: dict[str, Any], pass_names: Sequence[str], facts: Facts | None = None
                       ) -> dict[str, Any]:
    """``params`` completed with each pass's default value for every searched field it leaves out.

    Every pass's default config is its no-op, so a seed that names only some passes runs the other
    passes as no-ops instead of leaving their fields to the sampler: with all five passes, randomly
    sampled pruning and quantization had spoiled every seed (a 2x search chose an 18.8 dB plan where
    fewer steps gave 38.9 dB).
    """
    passes = registered_passes()
    completed = dict(params)
    for name in pass_names:
        if name not in passes:
            continue
        default = passes[name].config_type()
        for field in search_space(name, facts):
            completed.setdefault(f"{name}.{field}", getattr(default, field))
    return completed


def clamp_to_spaces(params: dict[str, Any], pass_names: Sequence[str], facts: Facts | None = None
                    ) -> dict[str, Any]:
    """Clamp seeded values into their passes' declared ranges (Optuna rejects values outside them)."""
    passes = registered_passes()
    clamped = dict(params)
    for key, value in params.items():
        name, _, field = key.partition(".")
        if name not in pass_names or name not in passes:
            clamped.pop(key)
            continue
        domain = search_space(name, facts).get(field)
        if isinstance(domain, IntRange | FloatRange):
            clamped[key] = type(value)(min(domain.high, max(domain.low, value)))
    return clamped
