"""AuraFlow: the pipeline passes t/1000 and the last scheduler timestep is 1.0, so the scale is fixed
(the nearest of both scales would take the first call for the last step)."""

from accelkit.families.base import FamilyTraits

TRAITS = FamilyTraits(
    name="auraflow",
    pipeline_classes=("AuraFlowPipeline",),
    denoiser_classes=("AuraFlowTransformer2DModel",),
    timestep_scale=1e-3,
    keep_16bit=("time_step_proj", "time_step_embed", "register_tokens"),
)
