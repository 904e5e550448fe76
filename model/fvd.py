"""Fréchet Video Distance (Unterthiner et al., 2018): the Fréchet distance between Gaussians
fitted to a video network's features of generated and of reference clips.

`fvd` uses the Kinetics-400 I3D's logits (model/i3d.py) on 16 frames at 224 px, as the
original and VideoGPT do. `fvd_content_debiased` is the same distance over a self-supervised
VideoMAE's features (Ge et al., "On the Content Bias in Fréchet Video Distance", 2024): a
network never trained to name actions weighs motion and artefacts more than what is shown.

Videos are (N, T, 3, H, W) float tensors in [-1, 1], the project's frame convention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.i3d import InceptionI3d

if TYPE_CHECKING:
    from transformers import VideoMAEConfig

FEATURE_FRAMES = 16
FEATURE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# A VideoMAE small enough for CPU tests; its features are what the full one's are, narrower.
TINY_VIDEOMAE_CONFIG: dict[str, Any] = {
    "image_size": 32,
    "patch_size": 16,
    "num_frames": 4,
    "tubelet_size": 2,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}

Videos = torch.Tensor | Sequence[torch.Tensor]  # (N, T, 3, H, W), or N videos (T, 3, H, W) of any sizes


# -- preprocessing ------------------------------------------------------------------------------


def frame_indices(frames: int, count: int = FEATURE_FRAMES) -> torch.Tensor:
    """`count` indices into `frames` frames, uniform in time: output frame i shows the input
    frame under the middle of the i-th of `count` equal intervals. With fewer frames each is
    repeated (8 -> 16: every frame twice); with more, frames are skipped (32 -> 16: every second)."""
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * frames / count).floor().long().clamp(max=frames - 1)


def _resize_and_crop(frames: torch.Tensor, size: int, *, antialias: bool) -> torch.Tensor:
    """(M, 3, H, W) -> (M, 3, size, size): the shorter side scaled to `size` (bilinear), then
    the centre cut out."""
    h, w = frames.shape[-2:]
    scale = size / min(h, w)
    target = (size, math.ceil(w * scale)) if h <= w else (math.ceil(h * scale), size)
    if target != (h, w):
        frames = F.interpolate(frames, size=target, mode="bilinear", align_corners=False, antialias=antialias)
    top, left = (target[0] - size) // 2, (target[1] - size) // 2
    return frames[..., top : top + size, left : left + size]


def i3d_input(videos: torch.Tensor) -> torch.Tensor:
    """(N, T, 3, H, W) in [-1, 1] -> (N, 3, 16, 224, 224) in [-1, 1], the I3D's input, as
    VideoGPT prepares it for FVD: 16 frames picked by `frame_indices` (T == 16 keeps them
    all), each frame's shorter side scaled to 224 (bilinear, no antialiasing), the centre
    224x224 cut out (a square frame is only resized). Values are not otherwise changed."""
    n, t = videos.shape[:2]
    frames = videos[:, frame_indices(t).to(videos.device)].flatten(0, 1).float()
    frames = _resize_and_crop(frames, FEATURE_SIZE, antialias=False)
    return frames.unflatten(0, (n, FEATURE_FRAMES)).permute(0, 2, 1, 3, 4)


def videomae_input(videos: torch.Tensor, frames: int = FEATURE_FRAMES, size: int = FEATURE_SIZE) -> torch.Tensor:
    """(N, T, 3, H, W) in [-1, 1] -> (N, frames, 3, size, size), VideoMAE's input as its
    image processor makes it: frames picked by `frame_indices`, shorter side scaled to `size`
    (bilinear, antialiased), centre crop, then normalised with ImageNet's mean and std."""
    n, t = videos.shape[:2]
    picked = videos[:, frame_indices(t, frames).to(videos.device)].flatten(0, 1).float()
    picked = _resize_and_crop(picked, size, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=picked.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=picked.device).view(1, 3, 1, 1)
    return ((picked + 1) / 2 - mean).div(std).unflatten(0, (n, frames))


# -- the content-debiased network ---------------------------------------------------------------


class VideoMAEFeatures(nn.Module):
    """A VideoMAE encoder (transformers' `VideoMAEModel`): its input from `videomae_input`,
    its feature the mean of the last hidden state over all tokens."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.frames: int = encoder.config.num_frames
        self.size: int = encoder.config.image_size

    @classmethod
    def from_config(cls, config: VideoMAEConfig | dict[str, Any]) -> VideoMAEFeatures:
        """A random-weight encoder of that configuration (tests: `TINY_VIDEOMAE_CONFIG`)."""
        from transformers import VideoMAEConfig, VideoMAEModel

        config = config if isinstance(config, VideoMAEConfig) else VideoMAEConfig(**config)
        return cls(VideoMAEModel(config))

    @classmethod
    def from_pretrained(cls, folder: str) -> VideoMAEFeatures:
        """The encoder of a transformers VideoMAE folder (a `VideoMAEModel` or the encoder of a
        `VideoMAEForPreTraining` / `VideoMAEForVideoClassification` checkpoint). The other
        parts' weights (a pretraining decoder, a classifier) are left out without a report;
        encoder weights missing from the folder are a ValueError."""
        from transformers import VideoMAEModel
        from transformers.utils import logging

        level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
        logging.set_verbosity_error()
        logging.disable_progress_bar()
        try:
            encoder, info = VideoMAEModel.from_pretrained(folder, use_safetensors=True, output_loading_info=True)
        finally:
            logging.set_verbosity(level)
            if bars:
                logging.enable_progress_bar()
        if missing := sorted(info["missing_keys"]):
            shown = ", ".join(missing[:5])
            raise ValueError(f"{folder} lacks {len(missing)} of the VideoMAE encoder's weights ({shown})")
        return cls(encoder)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixel_values=pixel_values).last_hidden_state.mean(dim=1)


FeatureNetwork = InceptionI3d | VideoMAEFeatures


def network_input(network: FeatureNetwork, videos: torch.Tensor) -> torch.Tensor:
    """What `network` takes for (N, T, 3, H, W) videos in [-1, 1]."""
    if isinstance(network, VideoMAEFeatures):
        return videomae_input(videos, network.frames, network.size)
    return i3d_input(videos)


# -- features -------------------------------------------------------------------------------------


def video_features(network: FeatureNetwork, videos: Videos, batch_size: int = 16) -> np.ndarray:
    """(N, D) float64 features of `videos`, `batch_size` videos per forward pass, on the
    network's device (in bf16 autocast on CUDA). A sequence's videos may differ in size."""
    device = next(network.parameters()).device
    network.eval()
    features = []
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        for start in range(0, len(videos), batch_size):
            chunk = videos[start : start + batch_size]
            if isinstance(chunk, torch.Tensor):
                batch = network_input(network, chunk.to(device))
            else:
                batch = torch.cat([network_input(network, video[None].to(device)) for video in chunk])
            features.append(network(batch).double().cpu())
    if not features:
        raise ValueError("no videos to compute features of")
    return torch.cat(features).numpy()


# -- the Fréchet distance -----------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureStats:
    """The Gaussian fitted to a set of features: mean (D,), unbiased covariance (D, D), both
    float64, and how many feature vectors it is over."""

    mean: np.ndarray
    covariance: np.ndarray
    count: int

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureStats:
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"feature statistics need at least 2 feature vectors (N, D); got shape {features.shape}")
        return cls(features.mean(axis=0), np.cov(features, rowvar=False), len(features))


def _psd_eigenvalues(values: np.ndarray) -> np.ndarray:
    """A symmetric PSD matrix's eigenvalues with rounding's share set to 0: below size x eps of
    the largest they are noise (and negative ones impossible), and a square root would turn a
    1e-16 into 1e-8."""
    floor = len(values) * np.finfo(np.float64).eps * float(np.abs(values).max(initial=0))
    return np.where(values > floor, values, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The square root of a symmetric positive semi-definite matrix."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(_psd_eigenvalues(values))) @ vectors.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """|μa - μb|² + tr(Σa + Σb - 2 (Σa Σb)^½), in float64. tr (Σa Σb)^½ is taken as the sum of
    the square roots of the eigenvalues of the symmetric PSD √Σa Σb √Σa (the same eigenvalues),
    so it holds for the rank-deficient covariances of fewer clips than features. >= 0."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"features of different widths: {a.mean.shape[0]} and {b.mean.shape[0]}")
    root = _psd_sqrt(a.covariance)
    product = root @ b.covariance @ root
    trace_root = np.sqrt(_psd_eigenvalues(np.linalg.eigvalsh((product + product.T) / 2))).sum()
    distance = np.sum((a.mean - b.mean) ** 2) + np.trace(a.covariance) + np.trace(b.covariance) - 2 * trace_root
    return max(float(distance), 0.0)


def fvd(network: FeatureNetwork, generated: Videos, reference: Videos | FeatureStats, batch_size: int = 16) -> float:
    """The Fréchet distance between `network`'s features of the generated and the reference
    videos (`reference` may be the statistics of features computed before)."""
    if not isinstance(reference, FeatureStats):
        reference = FeatureStats.of(video_features(network, reference, batch_size))
    return frechet_distance(FeatureStats.of(video_features(network, generated, batch_size)), reference)
