"""Our networks at full size, key by key, against the public architectures we start from
(model/architectures.py), all on the meta device: nothing is downloaded or allocated.

- SD 2.1's UNet is our Stage I UNet at size `base`, so an SD 2.1 folder's `unet/` loads
  into Stage I with no missing or unexpected key, and inflating it gives SVD's layout.
- SVD's UNet is our video UNet at size `base` with 8 input channels.
- SVD's image encoder (transformers CLIP, ViT-H-14 shape) converts to our open_clip
  ViT-H-14 vision tower (model/svd.py) and back, every key and shape.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLTemporalDecoder,
    UNet2DConditionModel,
    UNetSpatioTemporalConditionModel,
)
from transformers import CLIPVisionModelWithProjection

from model.architectures import (
    SD21_UNET,
    SD21_VAE,
    SVD_IMAGE_ENCODER,
    SVD_UNET,
    SVD_VAE,
    meta_model,
    meta_open_clip,
    state_shapes,
)
from model.networks import CONFIGS, image_unet, inflate, is_temporal, video_key, video_unet
from model.openclip import register_tiny_models
from model.svd import hf_vision_tower, open_clip_vision_tower


@pytest.fixture(scope="module")
def sd21_unet() -> UNet2DConditionModel:
    return meta_model(UNet2DConditionModel, SD21_UNET)


def _public_config(model) -> dict:
    """The config as its config.json reads (lists, not tuples), private fields left out."""
    return json.loads(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}))


def test_sd21_unet_is_our_stage_one_unet(sd21_unet):
    with torch.device("meta"):
        ours = image_unet(CONFIGS["base"])
    assert state_shapes(ours) == state_shapes(sd21_unet)
    assert sum(p.numel() for p in sd21_unet.parameters()) == 865_910_724  # SD 2.1's UNet: 866 M


def test_inflating_sd21_adds_exactly_the_temporal_keys_and_gives_svds_layout(sd21_unet):
    # inflate() builds the video UNet and copies into it; under the meta device both are shapes only.
    with torch.device("meta"):
        video = inflate(sd21_unet)
        image_to_video = inflate(sd21_unet, in_channels=8)
    image, inflated = state_shapes(sd21_unet), state_shapes(video)
    mapped = {video_key(k): shape for k, shape in image.items()}
    assert {k: inflated[k] for k in mapped} == mapped  # every SD 2.1 weight lands, same shape
    missing = inflated.keys() - mapped.keys()
    assert missing == {k for k in inflated if is_temporal(k)} and len(missing) > 0
    assert state_shapes(image_to_video) == state_shapes(meta_model(UNetSpatioTemporalConditionModel, SVD_UNET))


def test_svd_unet_is_our_video_unet_with_eight_input_channels():
    svd = meta_model(UNetSpatioTemporalConditionModel, SVD_UNET)
    with torch.device("meta"):
        ours = video_unet(CONFIGS["base"], in_channels=8)
        defaults = UNetSpatioTemporalConditionModel()
    assert state_shapes(ours) == state_shapes(svd)
    assert sum(p.numel() for p in svd.parameters()) == pytest.approx(1.52e9, rel=0.01)
    # diffusers' defaults are SVD's but for the frames (25: img2vid-xt's) and the sample size (unset).
    assert _public_config(svd) == _public_config(defaults) | {"num_frames": 14, "sample_size": 96}


def test_svd_vae_has_sd21s_encoder():
    # Not diffusers' defaults: `AutoencoderKLTemporalDecoder()` is a one-level toy (64 channels).
    svd, sd21 = meta_model(AutoencoderKLTemporalDecoder, SVD_VAE), meta_model(AutoencoderKL, SD21_VAE)
    encoder = {k: v for k, v in state_shapes(sd21).items() if k.startswith(("encoder.", "quant_conv."))}
    assert {k: state_shapes(svd)[k] for k in encoder} == encoder
    assert sd21.config.scaling_factor == svd.config.scaling_factor == 0.18215


def test_svd_image_encoder_is_open_clip_vit_h_14s_vision_tower(tmp_path):
    register_tiny_models(tmp_path)  # open_clip_vision_tower picks among IMAGE_MODELS, the tiny one included
    encoder = meta_model(CLIPVisionModelWithProjection, SVD_IMAGE_ENCODER)
    visual = meta_open_clip("ViT-H-14").visual
    with torch.device("meta"):  # the conversion's cat/chunk/transpose run on shapes alone
        name, state = open_clip_vision_tower(encoder)
        back = hf_vision_tower(visual)
    assert name == "ViT-H-14"
    assert {k: tuple(v.shape) for k, v in state.items()} == state_shapes(visual)
    assert state_shapes(back) == state_shapes(encoder)
    assert sum(p.numel() for p in visual.parameters()) == pytest.approx(632e6, rel=0.01)
