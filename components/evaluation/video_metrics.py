"""The figures every video kind gets beside its own: FVD of generated against held-out
clips (I3D features; `fvd_content_debiased` with a self-supervised VideoMAE where one is
configured), CLIP text-video similarity (`clip_score`: each frame's image embedding against
its prompt's text embedding, CLIPSIM's convention) and the LAION aesthetic score of
generated frames (`aesthetic`, curation's head). Networks are loaded once, on first use."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from components.common.objectstore import ObjectStore
from components.evaluation.config import EvaluationNetworks

FVD, FVD_CONTENT_DEBIASED, CLIP_SCORE, AESTHETIC, CLIPS = (
    "fvd",
    "fvd_content_debiased",
    "clip_score",
    "aesthetic",
    "clips",
)
FRAMES_SCORED = 8  # frames per video CLIP and the aesthetic head look at, evenly spaced


@dataclass(frozen=True)
class VideoFigures:
    metrics: dict[str, float]
    random_networks: tuple[str, ...]  # networks these figures came from that had random weights


def uint8_frames(video: torch.Tensor, count: int = FRAMES_SCORED) -> list[np.ndarray]:
    """Up to `count` evenly spaced frames of a (T, 3, H, W) video in [-1, 1] as (H, W, 3) uint8."""
    indices = np.unique(np.linspace(0, len(video) - 1, min(count, len(video))).round().astype(int))
    frames = ((video[indices].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return list(frames.permute(0, 2, 3, 1).numpy())


class VideoScorer:
    """FVD, clip_score and aesthetic with the networks of `networks`."""

    def __init__(self, networks: EvaluationNetworks, store: ObjectStore | None, cache_dir: str | Path):
        self.networks, self.store, self.cache_dir = networks, store, Path(cache_dir)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.random: set[str] = set()

    @cached_property
    def _i3d(self):
        from components.evaluation.networks import load_i3d

        network, random = load_i3d(
            self.networks.i3d, self.store, self.cache_dir, allow_random=self.networks.allow_random_networks
        )
        if random:
            self.random.add("i3d")
        return network.to(self.device)

    @cached_property
    def _videomae(self):
        from components.evaluation.networks import load_videomae

        network, _ = load_videomae(self.networks.content_debiased, self.store, self.cache_dir, allow_random=False)
        return network.to(self.device)

    @cached_property
    def _clip(self):
        from components.curation.neural import ClipScorer, NeuralConfig

        config = NeuralConfig(
            clip_model=self.networks.clip_model,
            clip_weights=self.networks.clip,
            aesthetic_weights=self.networks.aesthetic,
            allow_random_weights=self.networks.allow_random_networks,
            tiny_models=self.networks.tiny,
            batch_size=32,
            cache_dir=str(self.cache_dir),
        )
        scorer = ClipScorer(config, self.store)
        self.random |= {name for name, ref in (("clip", config.clip_weights), ("aesthetic", config.aesthetic_weights))
                        if ref is None}  # fmt: skip
        return scorer

    def fvd(self, generated: list[torch.Tensor], reference: list[torch.Tensor]) -> dict[str, float]:
        """`fvd` (and `fvd_content_debiased` where configured) of two sets of (T, 3, H, W) videos."""
        from model.fvd import FeatureStats, frechet_distance, video_features

        batch = self.networks.batch_size

        def distance(network) -> float:
            ours = FeatureStats.of(video_features(network, generated, batch_size=batch))
            theirs = FeatureStats.of(video_features(network, reference, batch_size=batch))
            return frechet_distance(ours, theirs)

        figures = {FVD: distance(self._i3d)}
        if self.networks.content_debiased:
            figures[FVD_CONTENT_DEBIASED] = distance(self._videomae)
        return figures

    def frame_scores(self, videos: list[torch.Tensor], prompts: list[str]) -> dict[str, float]:
        """`aesthetic` over the videos' frames, `clip_score` over those with a non-empty prompt."""
        frames, owners = [], []
        for index, video in enumerate(videos):
            scored = uint8_frames(video)
            frames += scored
            owners += [index] * len(scored)
        embeddings = self._clip.embed_images(frames)
        figures = {AESTHETIC: float(np.mean(self._clip.aesthetic(embeddings)))}
        texts = [prompts[i] if i < len(prompts) else "" for i in owners]
        with_text = [k for k, text in enumerate(texts) if text.strip()]
        if with_text:
            similarity = self._clip.text_similarity(embeddings[with_text], [texts[k] for k in with_text])
            figures[CLIP_SCORE] = float(np.mean(similarity))
        return figures

    def measure(self, samples: list[torch.Tensor], references: list[torch.Tensor], prompts: list[str],
                *, video: bool) -> VideoFigures:  # fmt: skip
        """Every figure that applies: FVD for video kinds with held-out clips to compare with
        (two at least: a covariance needs them), frame scores for every kind."""
        metrics: dict[str, float] = {CLIPS: float(len(samples))}
        if not samples:
            return VideoFigures(metrics, ())
        if video and len(samples) >= 2 and len(references) >= 2:
            metrics |= self.fvd(samples, references)
        metrics |= self.frame_scores(samples, prompts)
        return VideoFigures(metrics, tuple(sorted(self.random)))
