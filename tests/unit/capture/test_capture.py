"""Tests of graph capture (accelkit/capture): exactness, block index, sites, costs, signatures, errors."""

from __future__ import annotations

import pytest
import torch

from accelkit.capture import DenoiserGraph, capture, shape_signature
from accelkit.errors import CaptureError
from tests.fixtures.tiny_models import EXPECTED_BLOCKS, FAMILIES, tiny_denoiser, tiny_denoiser_inputs

TRANSFORMER_FAMILIES = ("flux", "sd3", "pixart", "dit")


def _replay(graph: DenoiserGraph, kwargs: dict) -> torch.Tensor:
    return graph.rebuild_output(graph.module(*graph.flat_inputs(kwargs)), False)[0]


@pytest.fixture(scope="module")
def captured() -> dict[str, tuple[torch.nn.Module, dict, DenoiserGraph]]:
    """One capture per family (batch 2 = batched CFG), shared by the read-only tests below."""
    result = {}
    for family in FAMILIES:
        model, kwargs = tiny_denoiser(family)
        result[family] = (model, kwargs, capture(model, kwargs))
    return result


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_reproduces_eager_exactly(captured, family):
    model, kwargs, graph = captured[family]
    with torch.no_grad():
        expected = model(**kwargs)[0]
    actual = _replay(graph, kwargs)
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_block_counts_match_the_model(captured, family):
    _, _, graph = captured[family]
    assert graph.blocks.counts() == EXPECTED_BLOCKS[family]
    assert len(graph.blocks) == sum(EXPECTED_BLOCKS[family].values())
    assert graph.family == type(captured[family][0]).__name__


@pytest.mark.parametrize("family", FAMILIES)
def test_block_boundaries_name_real_nodes_in_order(captured, family):
    _, _, graph = captured[family]
    order = {n.name: i for i, n in enumerate(graph.module.graph.nodes)}
    previous_last = -1
    for block in graph.blocks:
        assert block.outputs, f"{block.name} has no outputs"
        assert block.inputs, f"{block.name} has no inputs"
        for name in (*block.outputs, *block.inputs, *block.nodes):
            assert name in order, f"{block.name} names missing node {name}"
        assert set(block.outputs) <= set(block.nodes)
        assert not set(block.inputs) & set(block.nodes)
        # Blocks are listed in execution order: each block's outputs come after the previous block's.
        assert min(order[n] for n in block.outputs) > previous_last
        previous_last = max(order[n] for n in block.outputs)


@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_batch_two_is_captured(captured, family):
    _, kwargs, graph = captured[family]
    first = graph.input_names[0]
    assert graph.input_specs[0].shape[0] == 2
    assert tuple(kwargs[first].shape) == graph.input_specs[0].shape
    out = _replay(graph, kwargs)
    assert out.shape[0] == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_and_costs(captured, family):
    _, _, graph = captured[family]
    if family in TRANSFORMER_FAMILIES:
        assert len(graph.attention_sites) > 0
    nodes = {n.name for n in graph.module.graph.nodes}
    assert set(graph.attention_sites) <= nodes
    assert set(graph.linear_sites) <= nodes
    assert len(graph.linear_sites) > 0
    assert graph.total_flops() > 0
    for site in graph.linear_sites:
        cost = graph.costs[site]
        assert cost.kind == "matmul" and cost.flops > 0 and cost.bytes > 0
    for site in graph.attention_sites:
        assert graph.costs[site].kind == "attention" and graph.costs[site].flops > 0


def test_linear_flops_match_hand_count(captured):
    _, _, graph = captured["dit"]
    nodes = {n.name: n for n in graph.module.graph.nodes}
    site = graph.linear_sites[0]
    node = nodes[site]
    x = node.args[0].meta["val"]
    weight_shape = tuple(node.args[1].meta["val"].shape)
    expected = 2.0 * x.numel() / x.shape[-1] * weight_shape[0] * weight_shape[1]
    assert graph.costs[site].flops == expected


@pytest.mark.parametrize("family", ["flux", "pixart"])
def test_two_resolutions_two_signatures_both_exact(captured, family):
    _, kwargs_8, graph_8 = captured[family]  # resolution 8
    model, kwargs = tiny_denoiser(family, resolution=16)
    graph_16 = capture(model, kwargs)
    with torch.no_grad():
        expected = model(**kwargs)[0]
    assert (_replay(graph_16, kwargs) - expected).abs().max().item() == 0.0
    assert graph_8.signature() == shape_signature(kwargs_8)
    assert graph_16.signature() == shape_signature(kwargs)
    assert graph_8.signature() != graph_16.signature()
    assert graph_8.input_specs[0].shape != graph_16.input_specs[0].shape
    hash(graph_16.signature())


def test_signature_sees_static_kwargs():
    kwargs = tiny_denoiser_inputs("sd3")
    other = dict(kwargs, return_dict=True)
    assert shape_signature(kwargs) != shape_signature(other)


def test_graph_input_order_follows_the_call():
    model, kwargs = tiny_denoiser("sd3")
    graph = capture(model, kwargs)
    tensor_names = tuple(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    assert graph.input_names == tensor_names
    placeholders = [n.target for n in graph.module.graph.nodes if n.op == "placeholder"]
    assert tuple(placeholders) == tensor_names
    assert graph.static_kwargs == {"joint_attention_kwargs": None, "return_dict": False}


def test_capture_leaves_the_model_intact():
    model, kwargs = tiny_denoiser("dit")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(**kwargs)[0]
    capture(model, kwargs)
    with torch.no_grad():
        again = model(**kwargs)[0]
    assert torch.equal(expected, again)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class _DataDependent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, hidden_states, return_dict=False):
        # Python control flow on a tensor value: torch.export (strict or not) cannot trace it.
        if hidden_states.sum() > 0:
            return (self.proj(hidden_states),)
        return (hidden_states,)


def test_export_failure_is_a_one_line_capture_error():
    with pytest.raises(CaptureError) as info:
        capture(_DataDependent().eval(), {"hidden_states": torch.randn(2, 4), "return_dict": False})
    message = str(info.value)
    assert "\n" not in message
    assert "_DataDependent" in message
    assert "torch.export" in message
