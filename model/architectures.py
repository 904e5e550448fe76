"""The full-size architectures of the public weights we start from, as configs, so their
exact layout can be built without downloading anything: on the meta device (shapes, no
memory) to check that a checkpoint fits, or that our own networks (model/networks.py)
are the same layout key for key.

The configs are the `config.json` of the public diffusers folders (SD 2.1's `unet/`,
`vae/`; SVD img2vid's `unet/`, `vae/`, `image_encoder/`). They are written out here,
not derived from our networks, because they are what our networks are checked against
(tests/model/test_full_size.py).
"""

from __future__ import annotations

from typing import Any

import torch

# stabilityai/stable-diffusion-2-1 unet/config.json. Our Stage I UNet at size `base`
# (model.networks.image_unet(CONFIGS["base"])) has exactly its keys and shapes.
SD21_UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],  # diffusers' legacy name: heads per level
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": True,
    "use_linear_projection": True,
}

# stabilityai/stable-diffusion-2-1 vae/config.json (scaling_factor is diffusers' default
# there, written out here).
SD21_VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}

# stabilityai/stable-video-diffusion-img2vid unet/config.json: diffusers'
# `UNetSpatioTemporalConditionModel()` defaults but for num_frames (img2vid-xt: 25, the
# default). in_channels 8: the noisy latent and the conditioning frame's latent.
SVD_UNET: dict[str, Any] = {
    "_class_name": "UNetSpatioTemporalConditionModel",
    "addition_time_embed_dim": 256,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 1024,
    "down_block_types": [
        "CrossAttnDownBlockSpatioTemporal",
        "CrossAttnDownBlockSpatioTemporal",
        "CrossAttnDownBlockSpatioTemporal",
        "DownBlockSpatioTemporal",
    ],
    "up_block_types": [
        "UpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
    ],
    "in_channels": 8,
    "out_channels": 4,
    "layers_per_block": 2,
    "num_attention_heads": [5, 10, 20, 20],
    "num_frames": 14,
    "projection_class_embeddings_input_dim": 768,  # 3 micro-conditioning values x 256
    "sample_size": 96,
    "transformer_layers_per_block": 1,
}

# SVD's vae/config.json: SD 2.1's encoder, a decoder with temporal layers. Not
# `AutoencoderKLTemporalDecoder()`'s defaults (diffusers 0.42: one level of 64 channels).
SVD_VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKLTemporalDecoder",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "force_upcast": True,
}

# SVD's image_encoder/config.json: transformers' CLIPVisionModelWithProjection holding
# OpenCLIP ViT-H-14's vision tower (model/svd.py converts it to and from open_clip's).
SVD_IMAGE_ENCODER: dict[str, Any] = {
    "architectures": ["CLIPVisionModelWithProjection"],
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 1024,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-05,
    "num_channels": 3,
}


def meta_model(cls: type[torch.nn.Module], config: dict[str, Any]) -> torch.nn.Module:
    """`cls` built from `config` on the meta device: every parameter's shape, no memory,
    no initialisation cost (SVD's UNet builds in well under a second). `cls` is a diffusers
    model (built with `from_config`) or a transformers one (built from its config class)."""
    from transformers import PreTrainedModel

    with torch.device("meta"):
        if issubclass(cls, PreTrainedModel):
            fields = {k: v for k, v in config.items() if k != "architectures"}
            return cls(cls.config_class(**fields))
        return cls.from_config(config)


def meta_open_clip(architecture: str) -> torch.nn.Module:
    """The open_clip model `architecture` (e.g. `ViT-H-14`, `coca_ViT-L-14`) on the meta
    device. open_clip moves a new model to its `device` argument, which must be meta too
    (a meta tensor cannot be copied to the CPU)."""
    import logging

    import open_clip

    # open_clip warns on the root logger that the model is randomly initialised: meant for
    # models that will be used, not for a layout that is only compared.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with torch.device("meta"):
            return open_clip.create_model(architecture, pretrained=None, device="meta")
    finally:
        logging.disable(previous)


def state_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a model's state dict (what a checkpoint must hold to load strictly)."""
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}
