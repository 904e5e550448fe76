"""A tiny StableVideoDiffusionPipeline folder with random weights, built from diffusers'
and transformers' own classes with SVD's scheduler settings: what a copy of the public
SVD weights looks like on disk, at CPU size."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from model.networks import CONFIGS, video_unet


def write_tiny_svd_folder(folder: Path) -> Path:
    torch.manual_seed(0)
    unet = video_unet(CONFIGS["tiny"], in_channels=8)
    with torch.no_grad():  # diffusers zero-initialises nothing that matters here, but make every path count
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=224,
        patch_size=32,
        projection_dim=64,
        hidden_act="gelu",
    )
    pipeline = StableVideoDiffusionPipeline(
        vae=AutoencoderKLTemporalDecoder(
            down_block_types=("DownEncoderBlock2D",) * 3,
            block_out_channels=(32, 32, 64),
            layers_per_block=2,
            latent_channels=4,
        ),
        image_encoder=CLIPVisionModelWithProjection(vision),
        unet=unet,
        scheduler=EulerDiscreteScheduler(  # the public SVD's scheduler_config.json
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            interpolation_type="linear",
            prediction_type="v_prediction",
            timestep_type="continuous",
            use_karras_sigmas=True,
            sigma_min=0.002,
            sigma_max=700.0,
            timestep_spacing="leading",
            steps_offset=1,
        ),
        feature_extractor=CLIPImageProcessor(),
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder
