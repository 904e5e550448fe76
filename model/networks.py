"""The denoising networks, on diffusers: a text-to-image UNet (Stage I, laid out as
SD 2.1) and the spatio-temporal UNet of Stages II/III (SVD's), built from it.

Inflation (Video LDM): every Stage I weight is copied into the video UNet by one
renaming (`...resnets.M.` -> `...resnets.M.spatial_res_block.`); the temporal
layers start as the identity — the last layer of every temporal branch and the
frame-position and micro-conditioning embeddings are zeroed — so the untrained
video model is the image model applied frame by frame, and every temporal layer
still receives gradients (the learned mixing factor is not saturated).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel, UNetSpatioTemporalConditionModel

# Parameters that exist only in the video UNet.
TEMPORAL_MARKERS = (
    "temporal_res_block",
    "time_mixer",
    "temporal_transformer_blocks",
    "time_pos_embed",
    "add_embedding",
)
_RESNET = re.compile(r"(resnets\.\d+\.)")


@dataclass(frozen=True)
class UNetConfig:
    block_out_channels: tuple[int, ...]
    attention_heads: tuple[int, ...]
    layers_per_block: int
    cross_attention_dim: int
    transformer_layers_per_block: int = 1
    latent_channels: int = 4
    # SVD's micro-conditioning: fps, motion bucket, conditioning-noise strength.
    added_time_ids: int = 3
    addition_time_embed_dim: int = 256


CONFIGS: dict[str, UNetConfig] = {
    # CPU tests: about 2 M parameters (video).
    "tiny": UNetConfig(block_out_channels=(32, 64), attention_heads=(2, 4), layers_per_block=1, cross_attention_dim=64),
    # One 24 GB GPU: about 264 M parameters (video), ViT-L-14's 768-wide tokens.
    "small": UNetConfig(
        block_out_channels=(192, 384, 768), attention_heads=(3, 6, 12), layers_per_block=2, cross_attention_dim=768
    ),
    # Stable Diffusion 2.1's UNet; SVD's video UNet has the same spatial layout.
    "base": UNetConfig(
        block_out_channels=(320, 640, 1280, 1280),
        attention_heads=(5, 10, 20, 20),
        layers_per_block=2,
        cross_attention_dim=1024,
    ),
}


def _block_types(levels: int, cross: str, plain: str) -> tuple[str, ...]:
    return (cross,) * (levels - 1) + (plain,)


def image_unet(config: UNetConfig) -> UNet2DConditionModel:
    """Stage I: text-conditioned UNet, SD 2.1's layout (linear projections in attention)."""
    levels = len(config.block_out_channels)
    return UNet2DConditionModel(
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        down_block_types=_block_types(levels, "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=tuple(reversed(_block_types(levels, "CrossAttnUpBlock2D", "UpBlock2D"))),
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        attention_head_dim=config.attention_heads,  # diffusers' legacy name: it is the number of heads
        cross_attention_dim=config.cross_attention_dim,
        transformer_layers_per_block=config.transformer_layers_per_block,
        use_linear_projection=True,
    )


def video_unet(config: UNetConfig, in_channels: int | None = None) -> UNetSpatioTemporalConditionModel:
    """Stages II/III: the same spatial layout with temporal layers (SVD's UNet).
    `in_channels` is larger for image-to-video (the conditioning latent is concatenated)."""
    levels = len(config.block_out_channels)
    return UNetSpatioTemporalConditionModel(
        in_channels=in_channels or config.latent_channels,
        out_channels=config.latent_channels,
        down_block_types=_block_types(levels, "CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=tuple(reversed(_block_types(levels, "CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"))),
        block_out_channels=config.block_out_channels,
        addition_time_embed_dim=config.addition_time_embed_dim,
        projection_class_embeddings_input_dim=config.addition_time_embed_dim * config.added_time_ids,
        layers_per_block=config.layers_per_block,
        cross_attention_dim=config.cross_attention_dim,
        transformer_layers_per_block=config.transformer_layers_per_block,
        num_attention_heads=config.attention_heads,
    )


def config_of(image: UNet2DConditionModel) -> UNetConfig:
    """The UNetConfig of an existing Stage I UNet (e.g. one loaded from an SD 2.1 folder)."""
    c = image.config
    heads = c.attention_head_dim
    levels = len(c.block_out_channels)
    layers = c.transformer_layers_per_block
    if not isinstance(layers, int):
        if len(set(layers)) != 1:
            raise ValueError(f"per-block transformer depths {layers} are not supported")
        layers = layers[0]
    if not c.use_linear_projection:
        raise ValueError("the Stage I UNet must use linear projections in attention (as SD 2.x) to inflate")
    only_cross = c.only_cross_attention
    if (
        c.num_class_embeds is not None
        or c.class_embed_type is not None
        or any(only_cross if isinstance(only_cross, list | tuple) else [only_cross])
    ):
        # SD's x4 upscaler: a noise-level class embedding and cross-attention-only blocks
        raise ValueError(
            "this UNet has a class embedding or cross-attention-only blocks (as SD's x4 upscaler): the "
            "spatio-temporal UNet has neither, so it does not inflate"
        )
    return UNetConfig(
        block_out_channels=tuple(c.block_out_channels),
        attention_heads=tuple(heads) if not isinstance(heads, int) else (heads,) * levels,
        layers_per_block=c.layers_per_block,
        cross_attention_dim=c.cross_attention_dim,
        transformer_layers_per_block=layers,
        latent_channels=c.in_channels,
    )


def video_key(image_key: str) -> str:
    """Where a Stage I weight goes in the video UNet."""
    return _RESNET.sub(r"\1spatial_res_block.", image_key, count=1)


def is_temporal(name: str) -> bool:
    return any(marker in name for marker in TEMPORAL_MARKERS)


def inflate(image: UNet2DConditionModel, in_channels: int | None = None) -> UNetSpatioTemporalConditionModel:
    """The Stage II UNet from a Stage I UNet: spatial weights copied, temporal layers
    initialised to the identity. Extra input channels (image-to-video) start at zero."""
    video = video_unet(config_of(image), in_channels)
    state = {video_key(k): v for k, v in image.state_dict().items()}
    if in_channels:
        state["conv_in.weight"] = _zero_padded_input(state["conv_in.weight"], in_channels)
    missing, unexpected = video.load_state_dict(state, strict=False)
    if unexpected or any(not is_temporal(k) for k in missing):
        raise ValueError(
            f"Stage I weights do not map onto the video UNet: unexpected {unexpected[:5]}, "
            f"missing non-temporal {[k for k in missing if not is_temporal(k)][:5]}"
        )
    _copy_norm_eps(image, video)
    _temporal_identity(video)
    return video


def _zero_padded_input(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """conv_in's weight taking `in_channels` inputs, the new ones at zero."""
    extra = weight.new_zeros(weight.shape[0], in_channels - weight.shape[1], *weight.shape[2:])
    return torch.cat([weight, extra], dim=1)


def widen_input(video: UNetSpatioTemporalConditionModel, in_channels: int) -> UNetSpatioTemporalConditionModel:
    """The same video UNet taking `in_channels` inputs (image-to-video concatenates the
    conditioning frame's latent): the new input channels start at zero, so it computes
    what it did until training uses them."""
    if video.config.in_channels == in_channels:
        return video
    wide = unet_from_config(UNetSpatioTemporalConditionModel, {**video.config, "in_channels": in_channels})
    state = video.state_dict()
    state["conv_in.weight"] = _zero_padded_input(state["conv_in.weight"], in_channels)
    wide.load_state_dict(state)
    return wide


def _copy_norm_eps(image: UNet2DConditionModel, video: UNetSpatioTemporalConditionModel) -> None:
    """diffusers' video blocks hard-code some GroupNorm epsilons (1e-6) where SD 2.1's
    UNet uses 1e-5: take the image model's, so its weights compute exactly what they did."""
    norms = [(name, module) for name, module in image.named_modules() if isinstance(module, NORMS)]
    set_norm_eps(video, {video_key(name + ".")[:-1]: module.eps for name, module in norms})


# -- norm epsilons the config does not give -------------------------------------------

NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm)
# A config key for the epsilons set after construction: diffusers passes no key starting
# with "_" to the constructor, yet keeps it in the config it saves and loads.
NORM_EPS_KEY = "_norm_eps"


def set_norm_eps(unet: torch.nn.Module, eps: dict[str, float]) -> None:
    """Set these norms' epsilons and record in the config every one that differs from what
    the class builds, so `unet_from_config` and `load_video_unet` build the same network."""
    _apply_norm_eps(unet, eps)
    with torch.device("meta"):
        built = dict(type(unet).from_config(unet.config).named_modules())
    record = {n: m.eps for n, m in unet.named_modules() if isinstance(m, NORMS) and m.eps != built[n].eps}
    unet.register_to_config(**{NORM_EPS_KEY: record})


def unet_from_config(cls: type[torch.nn.Module], config: dict) -> torch.nn.Module:
    """`cls.from_config(config)` with the norm epsilons the config records."""
    return restore_norm_eps(cls.from_config(config))


def load_video_unet(folder: str | Path) -> UNetSpatioTemporalConditionModel:
    """A saved video UNet as it was saved, the norm epsilons its config records included."""
    return restore_norm_eps(UNetSpatioTemporalConditionModel.from_pretrained(folder))


def restore_norm_eps(unet: torch.nn.Module) -> torch.nn.Module:
    """The UNet with the norm epsilons its config records (for one that diffusers loaded)."""
    _apply_norm_eps(unet, unet.config.get(NORM_EPS_KEY, {}))
    return unet


def _apply_norm_eps(unet: torch.nn.Module, eps: dict[str, float]) -> None:
    modules = dict(unet.named_modules())
    for name, value in eps.items():
        modules[name].eps = value


@torch.no_grad()
def _temporal_identity(video: UNetSpatioTemporalConditionModel) -> None:
    for name, module in video.named_modules():
        if name.endswith("temporal_res_block"):
            torch.nn.init.zeros_(module.conv2.weight)  # out = input + conv2(...) = input
            torch.nn.init.zeros_(module.conv2.bias)
        elif re.search(r"temporal_transformer_blocks\.\d+$", name):
            # Each sub-layer is residual: zero its last projection and it passes its input on.
            for last in (module.attn1.to_out[0], module.ff.net[-1], module.ff_in.net[-1]):
                torch.nn.init.zeros_(last.weight)
                torch.nn.init.zeros_(last.bias)
            if module.attn2 is not None:
                torch.nn.init.zeros_(module.attn2.to_out[0].weight)
                torch.nn.init.zeros_(module.attn2.to_out[0].bias)
        elif name.endswith("time_pos_embed") or name == "add_embedding":
            torch.nn.init.zeros_(module.linear_2.weight)  # no frame-position or micro-conditioning signal yet
            torch.nn.init.zeros_(module.linear_2.bias)


def load_image_unet(folder: str | Path) -> UNet2DConditionModel:
    """A Stage I UNet from a local diffusers folder: a pipeline folder (e.g. a copy of
    SD 2.1, with `unet/`) or a bare UNet folder."""
    folder = Path(folder)
    if (folder / "unet" / "config.json").exists():
        return UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    return UNet2DConditionModel.from_pretrained(folder)


# -- the network behind the denoiser: the UNet and the inputs a kind gives it -----------


class ImageNetwork(torch.nn.Module):
    """Stage I: a text-to-image UNet on frames as images."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.unet(x, c_noise, encoder_hidden_states=text).sample


class VideoNetwork(torch.nn.Module):
    """The spatio-temporal UNet on text tokens and SVD's micro-conditioning."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, text: torch.Tensor, added: torch.Tensor) -> torch.Tensor:
        return self.unet(x, c_noise, text, added_time_ids=added).sample


class ImageToVideoNetwork(torch.nn.Module):
    """SVD's UNet input: the noisy frames with the conditioning frame's latent
    concatenated channel-wise to every frame; the image embedding is the one token
    the UNet attends to."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        image: torch.Tensor,
        image_latent: torch.Tensor,
        added: torch.Tensor,
    ) -> torch.Tensor:
        every_frame = image_latent[:, None].expand(-1, x.shape[1], -1, -1, -1)
        return self.unet(torch.cat([x, every_frame], dim=2), c_noise, image, added_time_ids=added).sample


# -- gradient checkpointing ------------------------------------------------------------


def enable_checkpointing(unet: torch.nn.Module, checkpoint=None) -> None:
    """diffusers' gradient checkpointing (`checkpoint(function, *args)`: its function, default
    torch's non-reentrant one), widened for the spatio-temporal UNet. diffusers checkpoints
    the resnets and each transformer's spatial blocks, not its temporal blocks, whose
    activations dominate at high resolution (their cross-attention repeats the condition
    tokens for every latent pixel): SVD's UNet at 576x1024 held about 72 GiB of activations
    per clip that way. Here each whole spatio-temporal transformer is one checkpointed region
    instead (its blocks are not checkpointed again inside it): about 14 GiB."""
    from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel

    unet.enable_gradient_checkpointing(checkpoint)
    for module in unet.modules():
        if type(module) is TransformerSpatioTemporalModel:
            module.__class__ = _whole_transformer_class()  # same weights and names; copies stay independent
            module.gradient_checkpointing = False  # inside the region: no second checkpoint per block


def disable_checkpointing(unet: torch.nn.Module) -> None:
    from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel

    unet.disable_gradient_checkpointing()
    for module in unet.modules():
        if type(module) is _whole_transformer_class():
            module.__class__ = TransformerSpatioTemporalModel


@functools.cache
def _whole_transformer_class() -> type:
    from diffusers.models.transformers.transformer_temporal import (
        TransformerSpatioTemporalModel,
        TransformerTemporalModelOutput,
    )

    class WholeCheckpointedTransformer(TransformerSpatioTemporalModel):
        """A spatio-temporal transformer whose forward is one checkpointed region while gradients flow."""

        def forward(self, hidden_states, encoder_hidden_states=None, image_only_indicator=None, return_dict=True):
            inputs = (hidden_states, encoder_hidden_states, image_only_indicator)
            if torch.is_grad_enabled():
                out = self._gradient_checkpointing_func(self.plain_forward, *inputs)
            else:
                out = self.plain_forward(*inputs)
            return TransformerTemporalModelOutput(sample=out) if return_dict else (out,)

        def plain_forward(self, hidden_states, encoder_hidden_states, image_only_indicator):
            return super().forward(hidden_states, encoder_hidden_states, image_only_indicator, return_dict=False)[0]

    return WholeCheckpointedTransformer
