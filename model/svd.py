"""Stable Video Diffusion's diffusers format (`StableVideoDiffusionPipeline`) in and out:
an image-to-video model we train exports to a folder that pipeline loads and samples,
and an SVD-format folder (e.g. a copy of the public SVD weights) starts `vdm finetune i2v`
(`VideoDiffusion.create` reads it with `load_svd_parts`).

Three translations:

- Preconditioning (exact). SVD's denoiser is EDM with sigma_data = 1 and a
  v-parameterised output (c_out = -sigma / sqrt(sigma^2 + 1)); ours has sigma_data =
  0.5 and c_out > 0; both feed the UNet c_noise = 0.25 ln(sigma). They are the same
  model on data scaled by 2: SVD's latents and noise levels are twice ours (the
  exported VAE's `scaling_factor` is doubled), its UNet output is minus ours
  (`conv_out` negated), and its c_noise is ours + 0.25 ln 2 — a shift of the
  sinusoidal timestep features, which rotates each (cos, sin) pair: folded into the
  time embedding's first linear layer.
- Image encoder (exact). The open_clip vision tower's weights map one to one onto
  transformers' `CLIPVisionModelWithProjection` (fused qkv split, projection
  transposed); `CLIPImageProcessor` carries the tower's mean and std.
- VAE (as is, scaling_factor doubled). Import keeps SVD's AutoencoderKLTemporalDecoder:
  our codec decodes whole clips with it. Export keeps the model's VAE: an AutoencoderKL,
  which the pipeline decodes frame by frame (its forward takes no `num_frames`;
  diffusers checks the signature), or, after `vdm finetune temporal-decoder`, an
  AutoencoderKLTemporalDecoder, which it decodes whole clips with (its default
  `decode_chunk_size` is the clip). Converting an AutoencoderKL to a temporal decoder is
  not exact in general (model/temporal_decoder.py): no `post_quant_conv`, and with
  `layers_per_block=1` (our tiny VAE) a mid block of one resnet without attention where
  AutoencoderKL's is resnet-attention-resnet; the finetune trains the gap away.

The pipeline conditions on `fps - 1` (SVD's training quirk): call it with our fps + 1.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from diffusers import (
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from model.conditioning import LatentCodec
from model.networks import load_video_unet
from model.openclip import IMAGE_MODELS

PIPELINE_CLASS = StableVideoDiffusionPipeline.__name__
# SVD's noise levels and latents over ours (sigma_data 1 over 0.5).
DATA_SCALE = 2.0


def is_svd_folder(folder: Path) -> bool:
    index = folder / "model_index.json"
    return index.exists() and json.loads(index.read_text()).get("_class_name") == PIPELINE_CLASS


# -- UNet: the change of preconditioning -----------------------------------------------


@torch.no_grad()
def _shift_timestep(unet: UNetSpatioTemporalConditionModel, shift: float) -> UNetSpatioTemporalConditionModel:
    """A copy whose output at timestep t + `shift` is this UNet's at t (and minus it: the
    sign flip between the two parameterisations is its own inverse)."""
    unet = copy.deepcopy(unet)
    proj = unet.time_proj
    half = proj.num_channels // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float64) / (half - proj.downscale_freq_shift)
    angle = proj.scale * shift * exponent.exp()
    cos, sin = angle.cos(), angle.sin()
    # Features are [cos(wt), sin(wt)] (flip_sin_to_cos); f(t + shift) = R f(t), so the layer
    # reading f(t + shift) needs W R^-1, with R^-1 the rotation by -angle.
    inverse = torch.zeros(2 * half, 2 * half, dtype=torch.float64)
    idx = torch.arange(half)
    inverse[idx, idx], inverse[idx, idx + half] = cos, sin
    inverse[idx + half, idx], inverse[idx + half, idx + half] = -sin, cos
    if not proj.flip_sin_to_cos:
        raise ValueError("expected SVD's timestep features (cos first)")
    linear = unet.time_embedding.linear_1
    linear.weight.copy_((linear.weight.double() @ inverse).to(linear.weight.dtype))
    unet.conv_out.weight.neg_()
    unet.conv_out.bias.neg_()
    return unet


def svd_unet(unet: UNetSpatioTemporalConditionModel) -> UNetSpatioTemporalConditionModel:
    """Our image-to-video UNet as SVD's pipeline calls it (t = 0.25 ln(2 sigma), v-output)."""
    return _shift_timestep(unet, 0.25 * math.log(DATA_SCALE))


def our_unet(unet: UNetSpatioTemporalConditionModel) -> UNetSpatioTemporalConditionModel:
    """SVD's UNet under our preconditioning."""
    return _shift_timestep(unet, -0.25 * math.log(DATA_SCALE))


# -- image encoder: open_clip vision tower <-> CLIPVisionModelWithProjection --------------


def _vision_shape(visual: torch.nn.Module) -> dict:
    block = visual.transformer.resblocks[0]
    return {
        "hidden_size": visual.conv1.out_channels,
        "intermediate_size": block.mlp.c_fc.out_features,
        "num_hidden_layers": len(visual.transformer.resblocks),
        "num_attention_heads": block.attn.num_heads,
        "image_size": visual.image_size[0],
        "patch_size": visual.patch_size[0],
        "projection_dim": visual.output_dim,
    }


def _open_clip_shape(name: str) -> dict:
    import open_clip

    config = open_clip.get_model_config(name)
    vision = config["vision_cfg"]
    width = vision["width"]
    return {
        "hidden_size": width,
        "intermediate_size": int(width * vision.get("mlp_ratio", 4.0)),
        "num_hidden_layers": vision["layers"],
        "num_attention_heads": width // vision.get("head_width", 64),
        "image_size": vision["image_size"],
        "patch_size": vision["patch_size"],
        "projection_dim": config["embed_dim"],
    }


def _vision_keys(layers: int) -> list[tuple[str, str]]:
    """(open_clip key, transformers key) of every weight but the fused attention input."""
    pairs = [
        ("conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
        ("class_embedding", "vision_model.embeddings.class_embedding"),
        ("positional_embedding", "vision_model.embeddings.position_embedding.weight"),
        ("ln_pre.weight", "vision_model.pre_layrnorm.weight"),
        ("ln_pre.bias", "vision_model.pre_layrnorm.bias"),
        ("ln_post.weight", "vision_model.post_layernorm.weight"),
        ("ln_post.bias", "vision_model.post_layernorm.bias"),
    ]
    names = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "attn.out_proj": "self_attn.out_proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for i in range(layers):
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                pairs.append((f"transformer.resblocks.{i}.{ours}.{p}", f"vision_model.encoder.layers.{i}.{theirs}.{p}"))
    return pairs


def hf_vision_tower(visual: torch.nn.Module) -> CLIPVisionModelWithProjection:
    """The open_clip vision tower as transformers' CLIPVisionModelWithProjection."""
    shape = _vision_shape(visual)
    if getattr(visual, "pool_type", "tok") != "tok" or visual.attn_pool is not None:
        raise ValueError("only class-token pooling maps onto CLIPVisionModelWithProjection")
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**shape, hidden_act="gelu", layer_norm_eps=1e-5))
    ours = visual.state_dict()
    state = {theirs: ours[key] for key, theirs in _vision_keys(shape["num_hidden_layers"])}
    for i in range(shape["num_hidden_layers"]):
        prefix = f"vision_model.encoder.layers.{i}.self_attn"
        weights = ours[f"transformer.resblocks.{i}.attn.in_proj_weight"].chunk(3)
        biases = ours[f"transformer.resblocks.{i}.attn.in_proj_bias"].chunk(3)
        for proj, weight, bias in zip(("q_proj", "k_proj", "v_proj"), weights, biases, strict=True):
            state[f"{prefix}.{proj}.weight"], state[f"{prefix}.{proj}.bias"] = weight, bias
    state["visual_projection.weight"] = ours["proj"].t()
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)
    return model.eval()


def open_clip_vision_tower(model: CLIPVisionModelWithProjection) -> tuple[str, dict[str, torch.Tensor]]:
    """The open_clip architecture (one of IMAGE_MODELS) and vision-tower weights of a
    transformers CLIP image encoder."""
    c = model.config
    shape = {k: getattr(c, k) for k in _open_clip_shape(IMAGE_MODELS["tiny"])}
    matches = [name for name in dict.fromkeys(IMAGE_MODELS.values()) if _open_clip_shape(name) == shape]
    if not matches or c.hidden_act != "gelu":
        raise ValueError(f"no open_clip vision tower of {sorted(set(IMAGE_MODELS.values()))} matches {shape}")
    theirs = model.state_dict()
    state = {key: theirs[hf] for key, hf in _vision_keys(c.num_hidden_layers)}
    for i in range(c.num_hidden_layers):
        prefix = f"vision_model.encoder.layers.{i}.self_attn"
        state[f"transformer.resblocks.{i}.attn.in_proj_weight"] = torch.cat(
            [theirs[f"{prefix}.{p}_proj.weight"] for p in "qkv"]
        )
        state[f"transformer.resblocks.{i}.attn.in_proj_bias"] = torch.cat(
            [theirs[f"{prefix}.{p}_proj.bias"] for p in "qkv"]
        )
    state["proj"] = theirs["visual_projection.weight"].t().contiguous()
    return matches[0], state


# -- whole pipelines --------------------------------------------------------------------


def scheduler(sigma_min: float = 0.002, sigma_max: float = 80.0) -> EulerDiscreteScheduler:
    """SVD's scheduler (continuous-time v-prediction on Karras sigmas) on our default noise
    levels in SVD's units; `linspace` spacing makes its initial noise exactly sigma_max."""
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        prediction_type="v_prediction",
        timestep_type="continuous",
        use_karras_sigmas=True,
        sigma_min=sigma_min * DATA_SCALE,
        sigma_max=sigma_max * DATA_SCALE,
        timestep_spacing="linspace",
        steps_offset=1,
    )


def export_svd(model, folder: Path) -> Path:
    """An image-to-video model as a StableVideoDiffusionPipeline folder."""
    if model.image is None:
        raise ValueError("only image-to-video models export to StableVideoDiffusionPipeline")
    vae = copy.deepcopy(model.codec.vae)
    vae.register_to_config(scaling_factor=vae.config.scaling_factor * DATA_SCALE)
    unet = svd_unet(model.unet)
    spec = model.config.clip
    unet.register_to_config(num_frames=spec.num_frames, sample_size=spec.height // model.codec.downsampling)
    preprocess = model.image.visual.preprocess_cfg
    size = model.image.visual.image_size[0]
    pipeline = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=hf_vision_tower(model.image.visual),
        unet=unet,
        scheduler=scheduler(),
        feature_extractor=CLIPImageProcessor(
            image_mean=list(preprocess["mean"]),
            image_std=list(preprocess["std"]),
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
        ),
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def load_svd_parts(folder: Path) -> tuple[UNetSpatioTemporalConditionModel, LatentCodec, tuple[str, dict]]:
    """A StableVideoDiffusionPipeline folder's parts under our conventions: the UNet under
    our preconditioning, the VAE with latents rescaled to ours (SVD's
    AutoencoderKLTemporalDecoder, or an exported AutoencoderKL), and the image encoder as
    (open_clip architecture, vision-tower weights). The tiny towers must be registered
    with open_clip first (`register_tiny_models`)."""
    unet = our_unet(load_video_unet(folder / "unet"))
    codec = LatentCodec.from_folder(folder)
    codec.vae.register_to_config(scaling_factor=codec.vae.config.scaling_factor / DATA_SCALE)
    tower = open_clip_vision_tower(CLIPVisionModelWithProjection.from_pretrained(folder, subfolder="image_encoder"))
    return unet, codec, tower
