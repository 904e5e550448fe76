"""The registry of kinds (model/tasks): every kind is one module with its config, its
options, its metric and (where it is served) its endpoint; configs keep a kind's own
fields flat and typed; an unknown kind or field is a clear error."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from model.stages import NAMED_CONFIGS, StageConfig, named_config
from model.tasks import ENDPOINTS, FINETUNES, KINDS, STAGES, task_of
from model.tasks.camera_lora import CameraLoraOptions

TASKS_FOLDER = Path(__file__).resolve().parents[2] / "model" / "tasks"


def test_every_kind_is_found_once_with_its_config_and_metric():
    assert list(STAGES) == ["image", "video", "hq"]
    assert set(FINETUNES) == {
        "i2v", "camera-lora", "interpolation", "prediction", "multiview", "spatial-hq", "temporal-decoder",
        "upsampler",
    }  # fmt: skip
    for name, task in KINDS.items():
        assert (NAMED_CONFIGS / f"tiny-{name}.yaml").exists(), name
        assert task.metric.direction in ("minimize", "maximize") and task.metric.description
        assert dataclasses.is_dataclass(task.Options) and dataclasses.is_dataclass(task.Inputs)
        module = Path(sys.modules[type(task).__module__].__file__)
        assert module.parent == TASKS_FOLDER, name
    # Each endpoint is answered by the most general kind that serves it.
    assert {e: t.name for e, t in ENDPOINTS.items()} == {
        "text_to_video": "video", "image_to_video": "i2v", "interpolate": "interpolation", "extend": "prediction",
        "multiview": "multiview", "upscale": "upsampler",
    }  # fmt: skip
    assert {task_of(k).endpoint for k in ("hq", "camera-lora", "spatial-hq")} == {"text_to_video"}


@pytest.mark.parametrize("name", [k for k in KINDS if k != "temporal-decoder"])  # it has its own config type
def test_a_shipped_config_loads_as_its_kind_and_round_trips(name):
    config = named_config("tiny", name)
    assert config.task is task_of(name) and isinstance(config.options, task_of(name).Options)
    assert StageConfig.from_dict(config.to_dict()) == config


def test_a_kinds_own_fields_are_flat_in_yaml_and_typed_in_the_config():
    config = named_config("tiny", "camera-lora").with_fields(motion_class="zoom_in", max_steps=3)
    assert config.options == CameraLoraOptions(motion_class="zoom_in", lora_rank=4, lora_alpha=4.0, motion_jitter=0.5)
    assert config.max_steps == 3
    flat = config.to_dict()
    assert flat["motion_class"] == "zoom_in" and "options" not in flat
    with pytest.raises(ValueError, match=r"\['motion_class'\] are not config fields of a 'video' model"):
        named_config("tiny", "video").with_fields(motion_class="pan")
    with pytest.raises(ValueError, match=r"\['noise_aug_mean'\] are not config fields of a 'video' model"):
        StageConfig.from_dict({"stage": "video", "noise_aug_mean": -3.0})
    with pytest.raises(ValueError, match="unknown kind of model 'dance'; one of"):
        StageConfig.from_dict({"stage": "dance"})


def test_config_values_are_read_as_their_fields_types_or_refused_naming_the_field():
    # PyYAML reads `1e-4` (YAML 1.1, no dot) as a string: it must still reach the optimizer as a number.
    config = StageConfig.load_text(
        "stage: upsampler\nmax_steps: '12'\nclip: {fps: 8, height: 32}\noptim: {lr: 1e-4, betas: [0.8, 0.9]}\n"
        "noise_aug_max: 5e-2\nsample_prompts: [a, b]\n"
    )
    assert config.optim.lr == 1e-4 and isinstance(config.optim.lr, float) and config.optim.betas == (0.8, 0.9)
    assert config.max_steps == 12 and config.clip.fps == 8.0 and config.clip.height == 32
    assert config.options.noise_aug_max == 0.05 and config.sample_prompts == ("a", "b")
    refused = {
        "optim: {lr: fast}": r"config optim.lr: 'fast' is not valid \(Input should be a valid number",
        "max_steps: 1.5": r"config max_steps: 1.5 is not valid \(Input should be a valid integer",
        "strategy: most": r"config strategy: 'most' is not valid \(Input should be 'full', 'partial'",
        "clip: 3": r"config clip: a mapping of its fields, not 3",
        "noise_aug_max: high": r"config noise_aug_max: 'high' is not valid",
    }
    for line, message in refused.items():
        with pytest.raises(ValueError, match=message):
            StageConfig.load_text(f"stage: upsampler\n{line}\n")


def test_the_cli_offers_one_finetune_command_per_finetune_kind_with_its_own_options():
    run = [sys.executable, "-m", "vdm.cli", "finetune"]
    listed = subprocess.run([*run, "--help"], capture_output=True, text=True, check=True).stdout
    lines = listed.split("Commands:", 1)[1].splitlines()
    commands = {line.split()[0] for line in lines if line.startswith("  ") and not line.startswith("   ")}
    assert commands == set(FINETUNES)
    camera = subprocess.run([*run, "camera-lora", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--motion-class [pan|static|zoom_in|zoom_out]" in camera
