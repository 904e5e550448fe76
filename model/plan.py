"""Know before you launch: the GPU memory one rank of a training run needs, from the config
alone, and which settings (DDP or FSDP2, gradient checkpointing, batch per GPU) fit a GPU.

Nothing is allocated and nothing is downloaded: the networks are built on the meta device
at full size (the UNet as the kind trains it, the frozen text or vision tower and the VAE),
and the forward passes that are measured run on fake CUDA tensors (meta tensors that say
`cuda`), so that bf16 autocast casts exactly what it casts on a GPU.

The rules (per GPU, in bytes; `N` the number of ranks):

- Training on a GPU runs the step in bf16 autocast with fp32 master weights
  (model/train.py): UNet weights 4 B/param, gradients 4 B/trainable param, AdamW two fp32
  moments 8 B/trainable param, EMA shadow 4 B/trainable param.
- What trains is the config's `strategy` (model/training.py `trainable`: full, partial =
  temporal layers, spatial = spatial layers, lora = the adapter's matrices).
- The frozen towers (open_clip text tower, or the vision tower for image kinds) and the
  VAE count as weights too: model/conditioning.py moves them to the GPU as they are, fp32
  (autocast computes in bf16 but stores nothing in it), 4 B/param, on every rank.
- `parallel: fsdp` with N > 1 ranks shards the UNet's weights, gradients, AdamW state and
  EMA by N (`fully_shard` per UNet block, then the root: model/train.py `shard`); in
  flight during forward and backward: the gathered fp32 weights of the largest block
  twice (the running block and the one prefetched in backward), that block's unsharded
  gradients before their reduce-scatter, and the root's own parameters (conv_in, the
  embeddings, conv_out) and their gradients, unsharded for the whole step.
- `parallel: ddp` with N > 1 ranks replicates everything and adds DDP's gradient buckets,
  a second fp32 copy of the gradients (4 B/trainable param; torch's default
  `gradient_as_bucket_view=False`). One rank: no wrapper, no buckets.
- Activations are counted, not guessed: the kind's training loss (EDM preconditioning +
  the UNet with the kind's inputs) runs forward at full size with the batch's real
  shapes (batch per GPU, frames, latents at clip size / the VAE's factor with the task's
  `input_channels`, text tokens as wide as the cross-attention, `added_time_ids`) under
  `torch.autograd.graph.saved_tensors_hooks`, summing the bytes of the distinct storages
  autograd saves for backward (parameters excluded: they are weights). Attention is
  counted as the fused kernels a GPU runs (flash / memory-efficient: q, k, v, output and
  an fp32 log-sum-exp saved, never the T x T matrix). The bf16 casts of trainable
  weights that autocast caches and autograd keeps (2 B/param, not sharded by FSDP2) are
  activations too. With gradient checkpointing: the tensors saved outside checkpointed
  regions, the inputs of checkpointed regions (kept for recomputation), and the largest
  region's own saved tensors (recomputed one region at a time in backward). Counted at
  batch 1 and 2, affine in the batch beyond (every tensor is either per sample or
  batch-independent, so this is exact).
- VAE encode (transient, before the UNet runs): the peak of live tensors while the
  frozen VAE encodes the batch's frames (batch x frames images at clip size, bf16
  autocast), counted on fake tensors the same way; 0 with `data: latents`.
- AdamW step (transient, after backward): torch's foreach AdamW allocates one fp32
  temporary per trainable parameter (the second moment's square root): 4 B/trainable
  param (sharded by FSDP2).
- A fixed allowance (`RESERVE`, 2 GiB) for the CUDA context, cuBLAS/NCCL workspaces,
  backward's transient gradient buffers and allocator fragmentation: an allowance, not a
  measurement.

total = weights + gradients + AdamW + EMA + DDP buckets
        + max(activations + FSDP2 in flight, VAE encode, AdamW step) + allowance.

(The gradients of the previous step are still allocated during the next forward: the
loop zeroes them, set to None, only just before backward.)

Pure model code: nothing here imports components/, kfp or mlflow.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from model.architectures import SD21_VAE, meta_model
from model.networks import disable_checkpointing, enable_checkpointing
from model.stages import StageConfig
from model.training import fsdp_units

GIB = 2**30
RESERVE = 2 * GIB
BATCHES = (1, 2, 4, 8)
# How the activation figures were obtained, printed with the plan.
COUNTED = (
    "counted: saved tensors of the loss's forward at full size on fake CUDA tensors, {precision}, "
    "at batch 1 and 2, affine in batch beyond"
)


class PlanDoesNotFit(ValueError):
    """A training run whose plan does not fit the GPU; the message is the plan and the table of settings."""


# -- the networks, on the meta device --------------------------------------------------------


@dataclass
class _Parts:
    """The networks of a config as a rank holds them, on fake CUDA tensors."""

    mode: object  # the FakeTensorMode the tensors belong to
    denoiser: torch.nn.Module  # EDM preconditioning around the kind's network around the UNet
    unet: torch.nn.Module
    vae: torch.nn.Module
    unet_params: int
    trainable_params: int
    frozen: tuple[tuple[str, int], ...]  # (what, params) of the frozen towers and the VAE
    largest_block: int  # params of the largest FSDP2 unit (a UNet block)
    largest_block_trainable: int
    root_params: int  # params outside the blocks (the root FSDP2 unit)
    root_trainable: int
    latent: tuple[int, int, int]  # latent channels, height, width
    context_length: int  # text tokens (text kinds)
    vae_note: str


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """open_clip logs a warning for every model built without weights: that is the point here."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _build_unet(config: StageConfig) -> torch.nn.Module:
    """The UNet the kind trains, on meta: Stage I's image UNet, or the video UNet (the
    layout Stage I inflates into), prepared by the kind (wider input, adapters), with the
    strategy's parameters trainable."""
    from model.networks import CONFIGS, image_unet, video_unet
    from model.training import apply_strategy

    task = config.task
    if config.unet not in CONFIGS:
        raise ValueError(f"unknown UNet size {config.unet!r}; one of {sorted(CONFIGS)}")
    with torch.device("meta"):
        unet = video_unet(CONFIGS[config.unet]) if config.video else image_unet(CONFIGS[config.unet])
        unet = task.prepare_unet(unet, config, None)
    unet = unet.to("meta")  # diffusers' AlphaBlender makes its mix factor on the CPU whatever the device
    apply_strategy(unet, config.strategy, task.adapter(config))
    return unet


def _with_run_options(config: StageConfig) -> StageConfig:
    """A config whose per-run options (camera-lora's motion class) are set: every choice
    builds the same network, the first stands in for an unset one."""
    task = config.task
    unset = {
        name: task.option_choices(name)[0]
        for name in task.run_options
        if getattr(config.options, name) is None and task.option_choices(name)
    }
    return config.with_fields(**unset) if unset else config


def _towers(config: StageConfig) -> tuple[list[tuple[str, int]], int]:
    """The frozen condition encoder as model/conditioning.py keeps it: (what, params) and the
    text context length."""
    import open_clip

    from model.openclip import IMAGE_MODELS, TEXT_MODELS, register_tiny_models

    image = config.task.conditioning == "image"
    chosen, default = (config.image_model, IMAGE_MODELS) if image else (config.text_model, TEXT_MODELS)
    name = chosen or default[config.unet]
    if name not in open_clip.list_models():
        register_tiny_models(config.cache_dir)
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r}")
    with _quiet(), torch.device("meta"):
        clip = open_clip.create_model(name, pretrained=None, device="meta")
    if image:  # ImageEncoder keeps the vision tower
        return [(f"vision tower {name}", sum(p.numel() for p in clip.visual.parameters()))], 1
    # TextEncoder keeps the token and position embeddings, every block but the last, the final norm.
    kept = [clip.token_embedding, clip.ln_final, *clip.transformer.resblocks[:-1]]
    params = sum(p.numel() for m in kept for p in m.parameters()) + clip.positional_embedding.numel()
    return [(f"text tower {name}", params)], clip.positional_embedding.shape[0]


def _build_vae(config: StageConfig) -> tuple[torch.nn.Module, str]:
    """The frozen VAE on meta and where its layout comes from: the config's folder, else the
    tiny VAE for `tiny`, else SD 2.1's."""
    import json

    from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder

    from model.conditioning import LatentCodec

    if config.vae and Path(config.vae).exists():
        folder = Path(config.vae)
        folder = folder / "vae" if (folder / "vae" / "config.json").exists() else folder
        raw = json.loads((folder / "config.json").read_text())
        temporal = raw["_class_name"] == AutoencoderKLTemporalDecoder.__name__
        cls = AutoencoderKLTemporalDecoder if temporal else AutoencoderKL
        return meta_model(cls, raw), f"the config's {config.vae}"
    if config.unet == "tiny":
        with torch.device("meta"):
            return LatentCodec.tiny().vae, "the tiny VAE (model/conditioning.py)"
    named = f"{config.vae!r} is not a folder here" if config.vae else "the config names no VAE folder"
    return meta_model(AutoencoderKL, SD21_VAE), f"SD 2.1's layout, assumed ({named})"


def _count(params) -> tuple[int, int]:
    params = list(params)
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _to_fake(module: torch.nn.Module, mode) -> None:
    """Every parameter and buffer of a meta module as a fake CUDA tensor, in place."""
    from torch._subclasses.fake_tensor import FakeTensor

    device = torch.device("cuda")
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                fake = FakeTensor(mode, param.data, device)
                sub._parameters[name] = torch.nn.Parameter(fake, requires_grad=param.requires_grad)
        for name, buffer in sub._buffers.items():
            if buffer is not None:
                sub._buffers[name] = FakeTensor(mode, buffer, device)


# The config fields that decide the networks and the batch's shapes; plans of configs that
# agree on them share one build and one count.
NETWORK_FIELDS = ("stage", "unet", "strategy", "clip", "data", "text_model", "image_model", "vae", "cache_dir")


def _structure(config: StageConfig) -> StageConfig:
    """The config reduced to what decides the networks and shapes (the rest at defaults)."""
    config = _with_run_options(config)
    return StageConfig(**{name: getattr(config, name) for name in NETWORK_FIELDS}, options=config.options)


@functools.lru_cache(maxsize=8)
def _parts(structure: StageConfig) -> _Parts:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from model.diffusion import Denoiser

    config = structure
    unet = _build_unet(config)
    towers, context_length = _towers(config)
    vae, vae_note = _build_vae(config)
    unet_params, trainable = _count(unet.parameters())
    blocks = [_count(block.parameters()) for block in fsdp_units(unet)]
    largest = max(blocks)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    height, width = config.task.network_frame_size(config)  # the clip's, or the patch a kind trains on
    latent = (vae.config.latent_channels, height // factor, width // factor)
    mode = FakeTensorMode()
    _to_fake(unet, mode)
    _to_fake(vae, mode)
    vae.requires_grad_(False)
    return _Parts(
        mode=mode,
        denoiser=Denoiser(config.task.network(unet)),
        unet=unet,
        vae=vae,
        unet_params=unet_params,
        trainable_params=trainable,
        frozen=(*towers, ("VAE", _count(vae.parameters())[0])),
        largest_block=largest[0],
        largest_block_trainable=largest[1],
        root_params=unet_params - sum(b[0] for b in blocks),
        root_trainable=trainable - sum(b[1] for b in blocks),
        latent=latent,
        context_length=context_length,
        vae_note=vae_note,
    )


@dataclass(frozen=True)
class Parameters:
    """What a config's rank holds, in parameters: the UNet (all and trainable) and the frozen parts."""

    unet: int
    trainable: int
    frozen: tuple[tuple[str, int], ...]  # (what, params): the text or vision tower, the VAE


def parameters(config: StageConfig) -> Parameters:
    """The parameter counts of a config's networks, built at full size on the meta device."""
    parts = _parts(_structure(config))
    return Parameters(parts.unet_params, parts.trainable_params, parts.frozen)


# -- counting ------------------------------------------------------------------------------


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class SavedTensors:
    """Distinct storages that autograd saves for backward, in bytes (a `saved_tensors_hooks`
    pair); storages in `exclude` (the parameters) are not counted. It keeps what it counts
    alive, so a freed storage's address is never counted twice."""

    def __init__(self, exclude: set[int] = frozenset()):
        self.exclude = set(exclude)
        self.sizes: dict[int, int] = {}
        self._kept: list[torch.Tensor] = []

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def add(self, t: torch.Tensor) -> None:
        key = _key(t)
        if key not in self.exclude and key not in self.sizes:
            self.sizes[key] = t.untyped_storage().nbytes()
            self._kept.append(t)

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values())

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Checkpointing:
    """diffusers' gradient checkpointing function, measuring: a checkpointed region keeps its
    inputs (counted outside) and recomputes its own saved tensors in backward, one region at
    a time (the largest counted)."""

    def __init__(self, outside: SavedTensors):
        self.outside = outside
        self.largest_region = 0

    def __call__(self, function, *args):
        inputs = [a for a in args if isinstance(a, torch.Tensor)]
        for t in inputs:
            self.outside.add(t)
        region = SavedTensors(self.outside.exclude | {_key(t) for t in inputs})
        with region.hooks():
            out = function(*args)
        self.largest_region = max(self.largest_region, region.bytes)
        return out


class _FusedAttention(torch.autograd.Function):
    """What flash / memory-efficient attention saves: q, k, v, the output, an fp32 log-sum-exp
    (and the mask, if any)."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32), mask)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - plans never run backward
        raise RuntimeError("a memory plan counts what the forward saves; it never runs backward")


class _AttentionAsOnGPU(torch.overrides.TorchFunctionMode):
    """`scaled_dot_product_attention` as a GPU's fused kernels run it (cast as autocast would)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = args[:3]
            if torch.is_autocast_enabled(q.device.type):
                dtype = torch.get_autocast_dtype(q.device.type)
                q, k, v = (t.to(dtype) if t.is_floating_point() else t for t in (q, k, v))
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            return _FusedAttention.apply(q, k, v, mask)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _gpu_autocast(dtype: torch.dtype | None) -> Iterator[None]:
    """`torch.autocast("cuda", dtype)` also where no CUDA is (torch.autocast refuses it there;
    fake CUDA tensors need only the dispatch state). None: no autocast (fp32, as on the CPU)."""
    if dtype is None:
        yield
        return
    enabled, previous = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", previous)


def _frames(config: StageConfig) -> int:
    """Frames per sample the UNet sees: an image set's samples are one-frame clips."""
    return 1 if config.data == "images" else config.clip.num_frames


def _network_inputs(config: StageConfig, parts: _Parts, batch: int) -> tuple[torch.Tensor, dict]:
    """Clean latents and the network's conditioning for a training batch, shaped as the kind's
    `training_inputs` gives them (fp32, as the loader and the frozen encoders give them)."""
    channels, height, width = parts.latent
    frames = _frames(config)
    device = torch.device("cuda")
    unet_config = parts.unet.config
    if config.video:
        latents = torch.randn(batch, frames, channels, height, width, device=device)
    else:  # Stage I trains frames as images
        latents = torch.randn(batch * frames, channels, height, width, device=device)
    n = latents.shape[0]
    attended = unet_config.cross_attention_dim
    shapes = {
        "text": (n, parts.context_length, attended),
        "image": (n, 1, attended),
        "image_latent": (n, channels, height, width),
        "added": (n, _added_time_ids(unet_config)) if config.video else None,
        "known": tuple(latents.shape),
        "mask": (*latents.shape[:2], 1, *latents.shape[3:]),
        "low_res": (*latents.shape[:-3], 3, height, width),  # the upsampler's low-resolution frames, latent grid
    }
    network = parts.denoiser.network
    names = [p for p in inspect.signature(network.forward).parameters if p not in ("x", "c_noise")]
    cond = {}
    for name in names:
        if shapes.get(name) is None:
            raise ValueError(f"a plan does not know the network input {name!r} of {type(network).__name__}")
        cond[name] = torch.randn(shapes[name], device=device)
    return latents, cond


def _added_time_ids(unet_config) -> int:
    """SVD's micro-conditioning values per sample (fps, motion bucket, noise strength)."""
    return unet_config.projection_class_embeddings_input_dim // unet_config.addition_time_embed_dim


@dataclass(frozen=True)
class Counted:
    """Counted bytes of one forward at one batch size."""

    activations: int  # saved for backward (with checkpointing: outside + region inputs + largest region)
    vae_encode: int  # peak of live tensors while the VAE encodes the batch's frames


def count_activations(
    config: StageConfig, batch_size: int, gradient_checkpointing: bool, precision: str = "bf16"
) -> Counted:
    """Count activations (and the VAE's encoding peak) of one training forward of `config` at
    `batch_size` per GPU, at full size, without allocating. `precision`: "bf16" (autocast, as
    on a GPU) or "fp32" (as on the CPU)."""
    from model.diffusion import denoising_loss
    from model.spatial import images_only

    parts = _parts(_structure(config))
    dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]
    saved = SavedTensors({_key(p) for p in parts.unet.parameters()})
    checkpointing = _Checkpointing(saved)
    if gradient_checkpointing:
        enable_checkpointing(parts.unet, checkpointing)
    try:
        with parts.mode, _AttentionAsOnGPU(), _gpu_autocast(dtype):
            latents, cond = _network_inputs(config, parts, batch_size)
            sigma = torch.rand(latents.shape[0], device=latents.device) + 0.1
            noise = torch.randn(latents.shape, device=latents.device)
            # A video model trained on images runs them with its temporal branches off (as VideoDiffusion.loss).
            images = config.video and config.data == "images"
            with saved.hooks(), images_only(parts.unet) if images else contextlib.nullcontext():
                loss = denoising_loss(parts.denoiser, latents, sigma, noise=noise, **cond).mean()
            del loss
            encode = 0 if config.data == "latents" else _vae_encode_peak(config, parts, batch_size)
    finally:
        disable_checkpointing(parts.unet)
    return Counted(saved.bytes + checkpointing.largest_region, encode)


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """The peak of bytes held by live tensors that ops make (and those `track`ed)."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, list[int]] = {}  # storage -> [bytes, live tensors]
        self.now = self.peak = 0
        self._ids: set[int] = set()

    def track(self, t: torch.Tensor) -> None:
        if id(t) in self._ids:
            return
        key = _key(t)
        entry = self.refs.setdefault(key, [t.untyped_storage().nbytes(), 0])
        if entry[1] == 0:
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        self._ids.add(id(t))
        weakref.finalize(t, self._release, id(t), key)

    def _release(self, ident: int, key: int) -> None:
        self._ids.discard(ident)
        entry = self.refs[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def _vae_encode_peak(config: StageConfig, parts: _Parts, batch: int) -> int:
    """Peak bytes while the frozen VAE encodes the batch's frames in one call (LatentCodec.encode)."""
    live = _LiveBytes()
    frames = batch * _frames(config)
    with torch.no_grad():
        video = torch.randn(frames, 3, config.clip.height, config.clip.width, device="cuda")
        with live:
            live.track(video)
            posterior = parts.vae.encode(video).latent_dist
            latents = posterior.mean + posterior.std * torch.randn_like(posterior.mean)
        del posterior, latents, video
    return live.peak


@dataclass(frozen=True)
class _Affine:
    """Counted bytes as fixed + per_sample x batch (counted at batch 1 and 2)."""

    fixed: int
    per_sample: int

    def at(self, batch: int) -> int:
        return self.fixed + self.per_sample * batch


@functools.lru_cache(maxsize=32)
def _counted(structure: StageConfig, gradient_checkpointing: bool, precision: str) -> tuple[_Affine, _Affine]:
    one, two = (count_activations(structure, b, gradient_checkpointing, precision) for b in (1, 2))
    return (
        _Affine(2 * one.activations - two.activations, two.activations - one.activations),
        _Affine(2 * one.vae_encode - two.vae_encode, two.vae_encode - one.vae_encode),
    )


# -- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    """The memory one rank of a training run needs, in bytes (see the module's rules)."""

    kind: str
    unet: str
    strategy: str
    parallel: str  # "single" (one rank), "ddp" or "fsdp"
    gpus: int
    batch_size: int  # per GPU
    frames: int
    height: int
    width: int
    latent: tuple[int, int, int]  # channels, height, width of the clean latents
    gradient_checkpointing: bool
    unet_params: int
    trainable_params: int
    frozen_params: tuple[tuple[str, int], ...]  # (what, params) of the frozen towers and the VAE
    weights: int
    gradients: int
    optimizer: int
    ema: int
    ddp_buckets: int
    fsdp_in_flight: int
    activations: int
    vae_encode: int
    optimizer_step: int
    reserve: int
    method: str  # how activations were obtained
    vae_note: str

    @property
    def total(self) -> int:
        static = self.weights + self.gradients + self.optimizer + self.ema + self.ddp_buckets
        return static + max(self.activations + self.fsdp_in_flight, self.vae_encode, self.optimizer_step) + self.reserve

    def fits(self, gpu_memory_bytes: int) -> bool:
        return self.total <= gpu_memory_bytes

    def lines(self) -> list[str]:
        """The breakdown, for printing."""
        shard = f" / {self.gpus}" if self.parallel == "fsdp" else ""
        frozen = ", ".join(f"{what} {_count_text(n)}" for what, n in self.frozen_params)
        rows = [
            ("weights", self.weights, f"UNet fp32{shard} + frozen towers and VAE fp32"),
            ("gradients", self.gradients, f"fp32, trainable{shard}"),
            ("optimizer", self.optimizer, f"AdamW: two fp32 moments, trainable{shard}"),
            ("EMA", self.ema, f"fp32 copy of the trainable weights{shard}"),
        ]
        if self.parallel == "ddp":
            rows.append(("DDP buckets", self.ddp_buckets, "fp32 copy of the gradients"))
        if self.parallel == "fsdp":
            rows.append(("FSDP2 in flight", self.fsdp_in_flight, "largest block gathered x2 + its grads + root"))
        checkpointing = "on" if self.gradient_checkpointing else "off"
        rows += [
            ("activations", self.activations, f"bf16 autocast, checkpointing {checkpointing}"),
            ("VAE encode", self.vae_encode, "transient, before the UNet (0 with cached latents)"),
            ("AdamW step", self.optimizer_step, "transient, after backward: fp32 sqrt of the 2nd moment"),
            ("allowance", self.reserve, "CUDA context, workspaces, fragmentation (not measured)"),
        ]
        parallel = {"single": "one GPU", "ddp": f"DDP on {self.gpus} GPUs", "fsdp": f"FSDP2 on {self.gpus} GPUs"}
        c, h, w = self.latent
        head = [
            f"{self.kind}: UNet {self.unet}, strategy {self.strategy}, {parallel[self.parallel]}, "
            f"batch {self.batch_size} per GPU, {self.frames} frames {self.height}x{self.width} "
            f"(latents {c}x{h}x{w}), gradient checkpointing {checkpointing}",
            f"parameters: UNet {_count_text(self.unet_params)} ({self.unet_params:,}), "
            f"trainable {_count_text(self.trainable_params)} ({self.trainable_params:,}); frozen: {frozen}",
            "per GPU:",
        ]
        body = [f"  {name:<16}{value / GIB:8.2f} GiB   {note}" for name, value, note in rows]
        return [
            *head,
            *body,
            f"  {'total':<16}{self.total / GIB:8.2f} GiB   = static + max(activations + in flight, VAE encode, "
            "AdamW step) + allowance",
            f"activations: {self.method}",
            f"VAE: {self.vae_note}",
        ]


def _count_text(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def plan(
    config: StageConfig,
    gpus: int,
    *,
    batch_size: int | None = None,
    gradient_checkpointing: bool | None = None,
    parallel: str | None = None,
) -> MemoryPlan:
    """The memory plan of one rank of `config` trained on `gpus` GPUs in all (ranks); the
    keywords override the config's settings. The temporal-decoder kind trains the VAE with
    its own loop and has no StageConfig: it is not planned here."""
    if gpus < 1:
        raise ValueError(f"a run needs at least one GPU, not {gpus}")
    config = config.with_fields(
        **{
            k: v
            for k, v in {
                "batch_size": batch_size,
                "gradient_checkpointing": gradient_checkpointing,
                "parallel": parallel,
            }.items()
            if v is not None
        }
    )
    structure = _structure(config)
    parts = _parts(structure)
    activations, encode = _counted(structure, config.gradient_checkpointing, "bf16")
    mode = "single" if gpus == 1 else config.parallel
    shards = gpus if mode == "fsdp" else 1
    frozen = sum(n for _, n in parts.frozen)
    trainable = parts.trainable_params
    in_flight = 0
    if mode == "fsdp":
        blocks = 2 * parts.largest_block + parts.largest_block_trainable
        in_flight = 4 * (blocks + parts.root_params + parts.root_trainable)
    return MemoryPlan(
        kind=config.stage,
        unet=config.unet,
        strategy=config.strategy,
        parallel=mode,
        gpus=gpus,
        batch_size=config.batch_size,
        frames=_frames(config),
        height=config.clip.height,
        width=config.clip.width,
        latent=parts.latent,
        gradient_checkpointing=config.gradient_checkpointing,
        unet_params=parts.unet_params,
        trainable_params=trainable,
        frozen_params=parts.frozen,
        weights=-(-4 * parts.unet_params // shards) + 4 * frozen,
        gradients=-(-4 * trainable // shards),
        optimizer=-(-8 * trainable // shards),
        ema=-(-4 * trainable // shards),
        ddp_buckets=4 * trainable if mode == "ddp" else 0,
        fsdp_in_flight=in_flight,
        activations=activations.at(config.batch_size),
        vae_encode=encode.at(config.batch_size),
        optimizer_step=-(-4 * trainable // shards),
        reserve=RESERVE,
        method=COUNTED.format(precision="bf16 autocast"),
        vae_note=parts.vae_note,
    )


@dataclass(frozen=True)
class Setting:
    """One row of the table: a way to run the config and whether it fits."""

    parallel: str
    gradient_checkpointing: bool
    batch_size: int
    activations: int
    total: int
    fits: bool
    configured: bool  # the config's own setting


def settings_that_fit(config: StageConfig, gpus: int, gpu_memory_bytes: int) -> list[Setting]:
    """Every candidate setting (DDP and FSDP2 with several GPUs, gradient checkpointing off and
    on, batch per GPU 1, 2, 4, 8 and the config's), each with its total and whether it fits."""
    modes = ("ddp", "fsdp") if gpus > 1 else (config.parallel,)
    rows = []
    for mode in modes:
        for checkpointing in (False, True):
            for batch in sorted({*BATCHES, config.batch_size}):
                p = plan(config, gpus, batch_size=batch, gradient_checkpointing=checkpointing, parallel=mode)
                configured = (mode, checkpointing, batch) == (
                    config.parallel if gpus > 1 else mode,
                    config.gradient_checkpointing,
                    config.batch_size,
                )
                rows.append(
                    Setting(
                        p.parallel,
                        checkpointing,
                        batch,
                        p.activations,
                        p.total,
                        p.fits(gpu_memory_bytes),
                        configured,
                    )
                )
    return rows


def table(rows: list[Setting], gpu_memory_bytes: int) -> list[str]:
    """The settings as a table (the config's own marked *)."""
    head = f"settings on a {gpu_memory_bytes / GIB:.0f} GiB GPU (* the config's):"
    lines = [head, f"  {'parallel':<9}{'checkpointing':<15}{'batch/GPU':>9}{'activations':>14}{'total':>11}  fits"]
    for r in rows:
        mark = "*" if r.configured else " "
        lines.append(
            f"{mark} {r.parallel:<9}{'on' if r.gradient_checkpointing else 'off':<15}{r.batch_size:>9}"
            f"{r.activations / GIB:>10.1f} GiB{r.total / GIB:>7.1f} GiB  {'yes' if r.fits else 'no'}"
        )
    return lines


def check_fits(config: StageConfig, world_size: int, gpu_memory_bytes: int) -> MemoryPlan:
    """The config's plan on `world_size` ranks, or `PlanDoesNotFit` (a ValueError) whose
    message is the plan and the table of settings, before anything is allocated."""
    p = plan(config, world_size)
    if not p.fits(gpu_memory_bytes):
        lines = [
            f"this training run needs {p.total / GIB:.1f} GiB per GPU, the GPU has {gpu_memory_bytes / GIB:.1f} GiB",
            *p.lines(),
            *table(settings_that_fit(config, world_size, gpu_memory_bytes), gpu_memory_bytes),
        ]
        raise PlanDoesNotFit("\n".join(lines))
    return p
