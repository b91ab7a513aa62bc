"""Tests of the pass infrastructure (accelkit/passes/base.py): configs, Program, registry, run_passes."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError, dataclass

import pytest
import torch

from accelkit.capture import capture, clone_graph_module
from accelkit.errors import InputError
from accelkit.passes import base
from accelkit.passes.base import (
    GraphVariant,
    PassConfig,
    PassFailedError,
    PassResult,
    Program,
    config_from_dict,
    pass_for_config,
    register_pass,
    registered_passes,
    run_passes,
)
from tests.fixtures.tiny_models import tiny_denoiser

aten = torch.ops.aten


@dataclass(frozen=True, kw_only=True)
class ScaleConfig(PassConfig):
    """Test pass: multiply the denoiser output by ``factor``.

    Args:
        factor: the multiplier (1.0 = no-op).
        tags: arbitrary integers (exercise tuple round-trip).
        limit: optional integer (exercise ``X | None`` round-trip).
    """

    factor: float = 1.0
    tags: tuple[int, ...] = ()
    limit: int | None = None

    def is_noop(self) -> bool:
        return self.factor == 1.0


@dataclass(frozen=True, kw_only=True)
class FailConfig(PassConfig):
    """Test pass that raises."""

    message: str = "boom"


@dataclass(frozen=True, kw_only=True)
class BreakConfig(PassConfig):
    """Test pass that returns an invalid program (schedule names a missing variant)."""


def scale_pass(program: Program, config: ScaleConfig, calib) -> PassResult:
    if config.is_noop():
        return PassResult(program, modified=False)
    module = clone_graph_module(program.variants["full"].module)
    graph = module.graph
    output = next(n for n in graph.nodes if n.op == "output")
    first, *rest = output.args[0]
    with graph.inserting_before(output):
        scaled = graph.call_function(aten.mul.Tensor, (first, config.factor))
    output.args = ((scaled, *rest),)
    module.recompile()
    variants = {**program.variants, "full": GraphVariant(module)}
    return PassResult(program.replace(variants=variants), modified=True, stats={"factor": config.factor})


def fail_pass(program: Program, config: FailConfig, calib) -> PassResult:
    raise RuntimeError(config.message)


def break_pass(program: Program, config: BreakConfig, calib) -> PassResult:
    return PassResult(program.replace(schedule=("missing",) * program.num_steps), modified=True)


@pytest.fixture
def test_passes():
    """Register the test passes as 'prune', 'quant' and 'sparse'; restore the global registry after."""
    registered_passes()  # import the built-in passes first so the snapshot holds them
    saved_registry, saved_by_name = dict(base._REGISTRY), dict(base._BY_NAME)
    register_pass(ScaleConfig, name="prune")(scale_pass)
    register_pass(FailConfig, name="quant")(fail_pass)
    register_pass(BreakConfig, name="sparse")(break_pass)
    try:
        yield
    finally:
        base._REGISTRY.clear()
        base._REGISTRY.update(saved_registry)
        base._BY_NAME.clear()
        base._BY_NAME.update(saved_by_name)


@pytest.fixture(scope="module")
def dit():
    model, kwargs = tiny_denoiser("dit")
    graph = capture(model, kwargs)
    with torch.no_grad():
        expected = model(**kwargs)[0]
    return graph, kwargs, expected


def _run_full(program: Program, kwargs: dict) -> torch.Tensor:
    outputs = program.variants["full"].module(*program.graph.flat_inputs(kwargs))
    return program.graph.rebuild_output(outputs, False)[0]


# ---------------------------------------------------------------- configs


def test_config_json_round_trip():
    config = ScaleConfig(factor=2.5, tags=(1, 2, 3), limit=7)
    data = json.loads(json.dumps(config.to_dict()))
    assert data == {"version": 1, "factor": 2.5, "tags": [1, 2, 3], "limit": 7}
    again = ScaleConfig.from_dict(data)
    assert again == config
    assert isinstance(again.tags, tuple)
    assert ScaleConfig.from_dict(json.loads(config.to_json())) == config


def test_config_round_trip_of_defaults_and_int_for_float():
    assert ScaleConfig.from_dict(json.loads(ScaleConfig().to_json())) == ScaleConfig()
    config = ScaleConfig.from_dict({"factor": 3})
    assert config.factor == 3.0 and isinstance(config.factor, float)
    assert config.limit is None


def test_config_unknown_field_is_input_error():
    with pytest.raises(InputError) as info:
        ScaleConfig.from_dict({"factor": 2.0, "fator": 3.0})
    message = str(info.value)
    assert "fator" in message and "factor" in message and "\n" not in message


def test_config_is_frozen():
    config = ScaleConfig(factor=2.0)
    with pytest.raises(FrozenInstanceError):
        config.factor = 3.0  # type: ignore[misc]


def test_register_pass_rejects_a_contradicting_order_and_a_bad_name():
    # A new name is fine (the order comes from constraints), but not one that contradicts the built-ins'.
    registered_passes()
    saved = set(base._ORDER_EDGES)
    with pytest.raises(ValueError, match="cycle"):
        register_pass(ScaleConfig, name="shrink", after=("cache",), before=("steps",))
    with pytest.raises(ValueError, match="identifier"):
        register_pass(ScaleConfig, name="not a name")
    assert base._ORDER_EDGES == saved and "shrink" not in registered_passes()


def test_config_from_dict_by_name(test_passes):
    assert config_from_dict("prune", {"factor": 2.0}) == ScaleConfig(factor=2.0)
    with pytest.raises(InputError, match="unknown pass"):
        config_from_dict("nope", {})


def test_registry_is_restored_after_test_passes():
    # Runs after test_config_from_dict_by_name: the test passes must be gone again.
    passes = registered_passes()
    assert all(entry.config_type not in (ScaleConfig, FailConfig, BreakConfig) for entry in passes.values())
    assert ScaleConfig not in base._REGISTRY


def test_unregistered_config_is_input_error(dit):
    graph, _, _ = dit
    with pytest.raises(InputError, match="no pass is registered"):
        pass_for_config(ScaleConfig(factor=2.0))
    with pytest.raises(InputError):
        run_passes(Program.from_graph(graph, 3), [ScaleConfig(factor=2.0)])


# ---------------------------------------------------------------- program


def test_identity_program(dit):
    graph, kwargs, expected = dit
    program = Program.from_graph(graph, 4)
    assert program.num_steps == 4 and program.schedule == ("full",) * 4
    program.validate()
    assert torch.equal(_run_full(program, kwargs), expected)
    with pytest.raises(InputError):
        Program.from_graph(graph, 0)


def test_validate_catches_unknown_variant(dit):
    graph, _, _ = dit
    program = Program.from_graph(graph, 3)
    bad = program.replace(schedule=("full", "cached", "full"))
    with pytest.raises(ValueError, match="cached"):
        bad.validate()


def test_validate_catches_missing_full_scalars_state_and_sigmas(dit):
    graph, _, _ = dit
    program = Program.from_graph(graph, 3)
    with pytest.raises(ValueError, match="full"):
        program.replace(variants={"other": program.variants["full"]}, schedule=("other",) * 3).validate()
    with pytest.raises(ValueError, match="step scalar"):
        program.replace(step_scalars={"c": (1.0, 2.0)}).validate()
    with pytest.raises(ValueError, match="sigmas"):
        program.replace(sigmas=(1.0, 0.5)).validate()
    reader = GraphVariant(program.variants["full"].module, state_inputs=("s",))
    with pytest.raises(ValueError, match="nobody wrote"):
        program.replace(
            variants={"full": program.variants["full"], "r": reader}, schedule=("r",) * 3
        ).validate()


def test_validate_catches_placeholder_count(dit):
    graph, _, _ = dit
    program = Program.from_graph(graph, 2)
    writer = GraphVariant(program.variants["full"].module, state_outputs=("s",))
    reader = GraphVariant(program.variants["full"].module, state_inputs=("s",))  # module lacks the input
    bad = program.replace(variants={"full": writer, "r": reader}, schedule=("full", "r"))
    with pytest.raises(ValueError, match="inputs, expected"):
        bad.validate()


# ---------------------------------------------------------------- passes and run_passes


def test_pass_edits_graph_and_reports_modified(test_passes, dit):
    graph, kwargs, expected = dit
    program = Program.from_graph(graph, 3)
    code_before = program.variants["full"].module.code
    result = scale_pass(program, ScaleConfig(factor=2.0), None)
    assert result.modified is True
    assert result.program is not program
    assert torch.allclose(_run_full(result.program, kwargs), 2.0 * expected)
    # the input program is not mutated
    assert program.variants["full"].module.code == code_before
    assert torch.equal(_run_full(program, kwargs), expected)

    noop = scale_pass(program, ScaleConfig(factor=1.0), None)
    assert noop.modified is False
    assert noop.program is program


def test_run_passes_applies_and_records(test_passes, dit):
    graph, kwargs, expected = dit
    program = Program.from_graph(graph, 3)
    code_before = program.variants["full"].module.code
    seen = []
    config = ScaleConfig(factor=-1.5, tags=(4,))
    final, results = run_passes(program, [config], on_pass=lambda name, result: seen.append(name))
    assert seen == ["prune"]
    assert final.applied == ("prune",)
    assert final.resolved == {"prune": config.to_dict()}
    assert final.stats == {"prune": {"factor": -1.5}}
    assert results["prune"].modified is True
    assert results["prune"].program is final
    assert torch.allclose(_run_full(final, kwargs), -1.5 * expected)
    # input not mutated
    assert program.applied == () and program.resolved == {} and program.stats == {}
    assert program.variants["full"].module.code == code_before
    assert torch.equal(_run_full(program, kwargs), expected)


def test_run_passes_rejects_out_of_order(test_passes, dit):
    graph, _, _ = dit
    program = Program.from_graph(graph, 3)
    with pytest.raises(InputError, match="out of order"):
        run_passes(program, [FailConfig(), ScaleConfig(factor=2.0)])  # quant before prune


def test_run_passes_rejects_duplicates(test_passes, dit):
    graph, _, _ = dit
    program = Program.from_graph(graph, 3)
    with pytest.raises(InputError, match="twice"):
        run_passes(program, [ScaleConfig(factor=2.0), ScaleConfig(factor=3.0)])


def test_run_passes_rejects_reapplying_and_earlier_passes(test_passes, dit):
    graph, _, _ = dit
    program = Program.from_graph(graph, 3)
    once, _ = run_passes(program, [ScaleConfig(factor=2.0)])
    with pytest.raises(InputError, match="already applied"):
        run_passes(once, [ScaleConfig(factor=2.0)])
    after_quant = program.replace(applied=("quant",))
    with pytest.raises(InputError, match="cannot apply"):
        run_passes(after_quant, [ScaleConfig(factor=2.0)])


def test_raising_pass_names_passes_already_run(test_passes, dit):
    graph, _, _ = dit
    program = Program.from_graph(graph, 3)
    with pytest.raises(PassFailedError) as info:
        run_passes(program, [ScaleConfig(factor=2.0), FailConfig(message="kaboom")])
    message = str(info.value)
    assert "'quant'" in message
    assert "already run: prune" in message
    assert "kaboom" in message
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(PassFailedError, match="already run: none"):
        run_passes(program, [FailConfig()])


def test_invalid_output_program_is_pass_failure(test_passes, dit):
    graph, _, _ = dit
    program = Program.from_graph(graph, 3)
    with pytest.raises(PassFailedError, match="missing"):
        run_passes(program, [BreakConfig()])
