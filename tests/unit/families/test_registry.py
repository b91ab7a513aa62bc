"""The family-traits registry: discovery, lookup, a toy family registered from here, and the traits'
effect on pipeline I/O (denoiser, timestep maps, call arguments, defaults)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from accelkit import families
from accelkit.errors import InputError
from accelkit.families import GENERIC, FamilyTraits, register, traits_for, unregister
from accelkit.pipeline_io import (
    family_of,
    find_denoiser,
    generation_defaults,
    parse_call_arguments,
    pipeline_call_arguments,
)


class ToyDenoiser(torch.nn.Module):
    def forward(self, sample, timestep, encoder_hidden_states=None):
        return (sample * 2,)


class ToyPipeline:
    """Holds its denoiser in an attribute no generic lookup tries."""

    def __init__(self) -> None:
        self.denoiser_net = ToyDenoiser()
        self.scheduler = type("Scheduler", (), {"timesteps": torch.tensor([999.0, 500.0, 1.0])})()

    def __call__(self, prompt: str, guidance_scale: float = 6.5, strength: float = 1.0):
        return None


@pytest.fixture
def toy_family():
    traits = register(FamilyTraits(
        name="toy", pipeline_classes=("ToyPipeline",), denoiser_classes=("ToyDenoiser",),
        denoiser_attribute="denoiser_net", timestep_scale=-1e-3, timestep_offset=1.0,
        call_arguments=lambda pipe, generation: {"strength": 0.5},
    ))
    yield traits
    unregister("toy")


def test_every_family_module_is_discovered_with_unique_classes():
    names = {t.name for t in families.all_families()}
    assert {"flux", "flux2", "sd3", "unet", "pixart", "sana", "lumina2", "cogview4", "hunyuandit", "auraflow",
            "chroma", "hidream", "zimage", "qwenimage"} <= names
    owners: dict[str, str] = {}
    for traits in families.all_families():
        for class_name in traits.pipeline_classes + traits.denoiser_classes:
            assert owners.setdefault(class_name, traits.name) == traits.name, class_name


def test_lookup_by_name_class_instance_and_subclass():
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    assert traits_for("FluxTransformer2DModel").name == "flux"
    assert traits_for(UNet2DConditionModel).name == "unet"
    assert traits_for("AuraFlowPipeline").timestep_scale == 1e-3

    class MyFlux(FluxTransformer2DModel):
        pass

    assert traits_for(MyFlux).name == "flux"
    assert traits_for("NoSuchModel") is GENERIC
    assert traits_for(None) is GENERIC


def test_traits_are_frozen_and_validated():
    with pytest.raises(dataclasses.FrozenInstanceError):
        GENERIC.timestep_scale = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="output_type"):
        FamilyTraits(name="bad", output_type="no_colon")
    with pytest.raises(ValueError, match="timestep_scale"):
        FamilyTraits(name="bad", timestep_scale=0)
    assert GENERIC.timestep_maps == ((1.0, 0.0), (1e-3, 0.0))


def test_output_classes_import():
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    assert traits_for("UNet2DConditionModel").output_class() is UNet2DConditionOutput
    assert GENERIC.output_class() is Transformer2DModelOutput


def test_toy_family_drives_pipeline_io(toy_family):
    pipe = ToyPipeline()
    assert family_of(pipe) is toy_family
    name, module = find_denoiser(pipe)
    assert name == "denoiser_net" and isinstance(module, ToyDenoiser)
    assert pipeline_call_arguments(pipe, {}) == {"strength": 0.5}
    assert pipeline_call_arguments(pipe, {}, {"strength": 0.8}) == {"strength": 0.8}
    with pytest.raises(InputError, match="takes no argument"):
        pipeline_call_arguments(pipe, {}, {"max_sequence_length": 64})
    # guidance from the pipeline's own __call__ default; no sample_size -> 512
    assert generation_defaults(pipe) == {"height": 512, "width": 512, "guidance_scale": 6.5}


def test_toy_family_without_registration_has_no_denoiser():
    with pytest.raises(InputError, match="no 'transformer' or 'unet'"):
        find_denoiser(ToyPipeline())


def test_step_locator_uses_the_family_timestep_map(toy_family):
    from accelkit.runtime.pipeline import StepLocator

    locator = StepLocator(ToyPipeline())
    # passed = 1 - t/1000: step 0 passes 0.001, the last step 0.999
    assert locator.locate(torch.tensor([1 - 999 / 1000])) == 0
    assert locator.locate(torch.tensor([0.5])) == 1
    assert locator.locate(torch.tensor([1 - 1 / 1000])) == 2


def test_auraflow_scale_keeps_step_zero_at_zero():
    """AuraFlow passes t/1000 with a last timestep of 1.0: both scales fit t=1.0; the trait decides."""
    from accelkit.runtime.pipeline import StepLocator

    class AuraFlowPipeline:
        scheduler = type("S", (), {"timesteps": torch.tensor([1000.0, 750.0, 500.0, 250.0, 1.0])})()

    generic = StepLocator(type("Other", (), {"scheduler": AuraFlowPipeline.scheduler})())
    assert generic.locate(torch.tensor([1.0])) == 4  # the ambiguity the trait removes
    assert StepLocator(AuraFlowPipeline()).locate(torch.tensor([1.0])) == 0
    assert StepLocator(AuraFlowPipeline()).locate(torch.tensor([np.float32(0.001)])) == 4


def test_pixart_turns_binning_off_only_without_a_bin():
    pixart = traits_for("PixArtSigmaPipeline")
    for sample_size, expected in ((32, {}), (8, {"use_resolution_binning": False})):
        pipe = type("P", (), {"transformer": type("T", (), {"config": type("C", (), {"sample_size": sample_size})})})
        assert pixart.call_arguments(pipe, {}) == expected


@pytest.mark.parametrize(("pairs", "expected"), [
    (["max_sequence_length=128"], {"max_sequence_length": 128}),
    (["negative_prompt=blurry, dark"], {"negative_prompt": "blurry, dark"}),
    (["use_resolution_binning=false", "x={\"a\": [1]}"], {"use_resolution_binning": False, "x": {"a": [1]}}),
    (["empty="], {"empty": ""}),
])
def test_parse_call_arguments(pairs, expected):
    assert parse_call_arguments(pairs) == expected


@pytest.mark.parametrize("bad", ["novalue", "=3", "two words=1", "prompt=hi", "num_inference_steps=3", "height=64"])
def test_parse_call_arguments_refuses(bad):
    with pytest.raises(InputError, match="--call-arg"):
        parse_call_arguments([bad])


class DataDependent(torch.nn.Module):
    """Branches on a tensor value unless told to take the static path (what a capture strategy patches)."""

    static_path = False

    def forward(self, hidden_states, timestep):
        if self.static_path or bool(hidden_states.sum() > 0):
            return (hidden_states * timestep,)
        return (hidden_states,)


def test_capture_strategy_is_active_around_export():
    import contextlib

    from accelkit.capture import capture
    from accelkit.errors import CaptureError

    kwargs = {"hidden_states": torch.ones(1, 4), "timestep": torch.tensor([2.0])}
    with pytest.raises(CaptureError, match="could not capture DataDependent"):
        capture(DataDependent(), kwargs)
    entered = []

    @contextlib.contextmanager
    def static(denoiser, call):
        entered.append(sorted(call))
        denoiser.static_path = True
        try:
            yield
        finally:
            denoiser.static_path = False

    register(FamilyTraits(name="toy-strategy", denoiser_classes=("DataDependent",), capture_strategy=static))
    try:
        model = DataDependent()
        graph = capture(model, kwargs)
    finally:
        unregister("toy-strategy")
    assert entered == [["hidden_states", "timestep"]] and model.static_path is False
    assert torch.equal(graph.module(*graph.flat_inputs(kwargs))[0], torch.full((1, 4), 2.0))
