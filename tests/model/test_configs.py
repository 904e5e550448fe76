"""The shipped configs (tiny, small, svd for every kind) and the rule that only the tiny
ones may use random weights."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from model.conditioning import ImageEncoder, vision_state
from model.networks import CONFIGS, video_unet
from model.openclip import IMAGE_MODELS, TEXT_MODELS, build, register_tiny_models
from model.stages import NAMED_CONFIGS, VideoDiffusion, config_names, named_config
from model.tasks import KINDS
from model.temporal_decoder import named_config as temporal_decoder_config

UNET_KINDS = [k for k, task in KINDS.items() if task.trains == "unet"]


def test_every_kind_ships_a_tiny_a_small_and_an_svd_config():
    assert config_names() == ["small", "svd", "tiny"]
    for size in config_names():
        for kind in UNET_KINDS:
            config = named_config(size, kind)
            assert config.stage == kind and config.allow_random_weights == (size == "tiny")
        assert temporal_decoder_config(size).clip.num_frames >= 8


@pytest.mark.parametrize("size", ["small", "svd"])
@pytest.mark.parametrize("kind", UNET_KINDS)
def test_a_real_size_config_names_every_weight_it_uses_and_the_settings_that_make_it_fit(size, kind):
    config = named_config(size, kind)
    own = config.image_weights if config.task.conditioning == "image" else config.text_weights
    assert own.startswith("weights:open-clip-vit-")
    # small names its VAE; svd takes the VAE of the folder it starts from (Stage I: weights:sd21's vae/).
    # The upsampler names the SD x4 upscaler's (it downsamples by 4: low-resolution frames on the latent grid).
    vae = "weights:sd-x4-upscaler" if kind == "upsampler" else ("weights:sd21" if size == "small" else None)
    assert config.vae == vae
    assert config.gradient_checkpointing and config.num_workers >= 4
    assert config.unet == {"small": "small", "svd": "base"}[size]
    tower = (IMAGE_MODELS if config.task.conditioning == "image" else TEXT_MODELS)[config.unet]
    # small: OpenAI's ViT-L-14 (QuickGELU) in open_clip's format; svd: OpenCLIP ViT-H-14 (SD 2.1's, SVD's).
    assert (tower, own) == {
        "small": ("ViT-L-14-quickgelu", "weights:open-clip-vit-l-14"),
        "svd": ("ViT-H-14", "weights:open-clip-vit-h-14"),
    }[size]


def test_svd_configs_are_svds_sizes():
    clips = {kind: named_config("svd", kind).clip for kind in UNET_KINDS}
    assert (clips["video"].num_frames, clips["video"].height, clips["video"].width) == (14, 320, 576)
    for kind in ("hq", "i2v", "spatial-hq"):
        assert (clips[kind].num_frames, clips[kind].height, clips[kind].width) == (14, 576, 1024)
    assert (clips["multiview"].num_frames, clips["multiview"].height) == (21, 576)  # SVD-MV
    assert named_config("svd", "video").parallel == "fsdp" and named_config("svd", "hq").batch_size == 2


def test_the_small_unet_is_a_few_hundred_million_parameters_and_svds_is_svds():
    with torch.device("meta"):
        small, base = video_unet(CONFIGS["small"]), video_unet(CONFIGS["base"], in_channels=8)
    assert 200e6 < sum(p.numel() for p in small.parameters()) < 400e6
    assert round(sum(p.numel() for p in base.parameters()) / 1e6) == 1525  # SVD img2vid's UNet


@pytest.mark.parametrize("size", ["small", "svd"])
def test_a_real_size_model_without_weights_is_refused_before_it_is_built(size):
    config = replace(named_config(size, "video"), text_weights=None, vae=None)
    with pytest.raises(ValueError) as error:
        VideoDiffusion.create(config)
    message = str(error.value)
    assert "no weights for the text, vae" in message and "vdm weights import NAME PATH" in message
    assert "weights:sd21" in message


def test_an_unresolved_weights_name_is_not_opened_as_a_path():
    config = replace(named_config("tiny", "video"), text_weights="weights:open-clip-vit-h-14")
    with pytest.raises(ValueError, match="text_weights weights:open-clip-vit-h-14 must be resolved"):
        VideoDiffusion.create(config)


def test_random_parts_are_recorded_in_the_folder_and_follow_the_model(tmp_path):
    model = VideoDiffusion.create(named_config("tiny", "video"))
    assert model.random_weights == ("text", "vae")
    folder = model.save(tmp_path / "model")
    assert json.loads((folder / "stage.json").read_text())["random_weights"] == ["text", "vae"]
    assert VideoDiffusion.load(folder).random_weights == ("text", "vae")
    # A finetune that takes the folder's VAE keeps the record; a config that refuses random
    # weights refuses the folder's random VAE even when it names its own text tower.
    text_weights = tmp_path / "text.pt"
    torch.save(build(TEXT_MODELS["tiny"], None).state_dict(), text_weights)
    strict = replace(named_config("tiny", "video"), allow_random_weights=False, text_weights=str(text_weights))
    with pytest.raises(ValueError, match="no weights for the vae"):
        VideoDiffusion.create(strict, init_from=folder)
    allowed = VideoDiffusion.create(replace(strict, allow_random_weights=True), init_from=folder)
    assert allowed.random_weights == ("vae",)


def test_a_vision_tower_loads_from_a_whole_open_clip_checkpoint_or_its_own_weights(tmp_path):
    register_tiny_models(".vdm/cache/models")
    name = IMAGE_MODELS["tiny"]
    clip = build(name, None)
    torch.nn.init.normal_(clip.visual.proj)  # differs from the seeded random tower
    torch.save({"state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}, tmp_path / "clip.pt")
    save_file({k: v.contiguous() for k, v in clip.visual.state_dict().items()}, tmp_path / "visual.safetensors")
    assert set(vision_state(tmp_path / "clip.pt")) == set(clip.visual.state_dict())
    images = torch.rand(2, 3, 40, 40) * 2 - 1
    whole, own = ImageEncoder(name, tmp_path / "clip.pt"), ImageEncoder(name, tmp_path / "visual.safetensors")
    assert torch.equal(whole(images), own(images))
    assert not torch.equal(whole(images), ImageEncoder(name, None)(images))


def test_config_files_are_all_named_size_dash_kind():
    kinds = set(KINDS)
    for path in NAMED_CONFIGS.glob("*.yaml"):
        size, kind = path.stem.split("-", 1)
        assert size in config_names() and kind in kinds, path.name
