"""--call-arg: parsed by the CLI, refused in one line when wrong, stored with the generation settings."""

from __future__ import annotations

import pytest

from accelkit.cli.main import main
from accelkit.search.optimize import OptimizeSettings, _generation_defaults, study_settings


def _one_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(("argument", "message"), [
    ("novalue", "must read KEY=VALUE"),
    ("num_inference_steps=3", "set by accelkit itself"),
    ("guidance_scale=2", "use --guidance-scale"),
])
def test_malformed_call_arg_is_one_line_exit_2(capsys, argument, message):
    assert main(["inspect", "zoo:shapes", "--call-arg", argument]) == 2
    assert message in _one_line(capsys)


def test_call_arg_the_pipeline_does_not_take_is_refused(capsys):
    assert main(["inspect", "zoo:shapes", "--call-arg", "max_sequence_length=64"]) == 2
    assert "takes no argument(s) ['max_sequence_length']" in _one_line(capsys)


def test_call_args_join_the_generation_settings_and_the_study():
    from accelkit.loading import load_pipeline

    pipe = load_pipeline("zoo:shapes").pipe
    plain = _generation_defaults(pipe, OptimizeSettings(model="zoo:shapes"), "zoo")
    assert "call_arguments" not in plain  # nothing extra: plans and study names stay as before
    settings = OptimizeSettings(model="zoo:shapes", call_args={"num_images_per_prompt": 1})
    with_args = _generation_defaults(pipe, settings, "zoo")
    assert with_args["call_arguments"] == {"num_images_per_prompt": 1}
    stored = study_settings(settings, model_id="zoo:shapes", weights_hash="x", generation=with_args,
                            calibration_prompts=["a"], evaluation_prompts=["b"], cost_target="cpu", targets=[2.0])
    assert stored["generation"]["call_arguments"] == {"num_images_per_prompt": 1}


def test_outputs_per_prompt_uses_the_pipelines_own_argument():
    from accelkit.errors import InputError
    from accelkit.pipeline_io import outputs_per_prompt

    class ImagePipe:
        def __call__(self, prompt, num_images_per_prompt=1): ...

    class VideoPipe:  # Wan, LTX, HunyuanVideo, CogVideoX, Mochi
        def __call__(self, prompt, num_videos_per_prompt=1): ...

    class SinglePipe:
        def __call__(self, prompt): ...

    assert outputs_per_prompt(ImagePipe(), 2) == {"num_images_per_prompt": 2}
    assert outputs_per_prompt(VideoPipe(), 1) == {"num_videos_per_prompt": 1}
    assert outputs_per_prompt(SinglePipe(), 1) == {}
    with pytest.raises(InputError, match="one output per prompt"):
        outputs_per_prompt(SinglePipe(), 2)
