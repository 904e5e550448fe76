"""The curation configuration: one YAML file, validated into typed objects."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from components.curation.duplicates import DEFAULT_MAX_DISTANCE
from components.curation.neural import NeuralConfig

SCORES = ("motion", "text_ratio", "aesthetic", "clip_sim")
# Not an annotator's score: the source's shorter side in px (a clip's `source_size`), for filters.
RESOLUTION = "resolution"
FILTER_SCORES = (*SCORES, RESOLUTION)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Strict):
    """Inputs outside these are rejected with a reason, never decoded in full."""

    max_width: int = 4096
    max_height: int = 4096
    max_duration_s: float = 3 * 3600.0
    codecs: tuple[str, ...] = ("h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mpeg2video", "prores", "mjpeg")
    # A file whose decoded frames fall short of its header by more than this is truncated.
    truncation_tolerance: float = 0.05


class Decode(_Strict):
    # Every frame is decoded once, at this size (longer side, I420), and shared by all steps.
    max_side: int = 320
    # Frames for flow, OCR and CLIP are sampled at this rate inside each clip.
    sample_fps: float = 2.0
    # PyAV decoder threads; 0: one for sources up to 640x480 (video.ONE_THREAD_MAX_PIXELS) and FFmpeg's
    # choice above with one worker, one thread per worker with several (annotate.worker_config).
    threads: int = 0
    # Decode on a thread of its own, ahead of the analysis, which then overlaps decoding: one worker
    # uses a second core so. Off for each of several workers (annotate.worker_config): with every
    # core busy with a worker, handing frames over between threads only costs.
    read_ahead: bool = True


CutKind = Literal["content", "adaptive", "fades", "dissolves"]


class Cuts(_Strict):
    """A cut is kept when any of `detectors` is sure of it; each runs at a threshold where it rarely fires falsely."""

    detectors: tuple[CutKind, ...] = ("content", "adaptive", "fades", "dissolves")
    # Content: the HSV difference to the previous frame (0-255) at least this (hard cuts, including out of
    # fast motion, where the adaptive ratio stays low) and `content_min_ratio` times its neighbours' mean
    # (steady fast motion above the threshold is no cut).
    content_threshold: float = 40.0
    content_min_ratio: float = 1.5
    # AdaptiveDetector: a frame's difference over its neighbours' mean (cuts between calm shots).
    adaptive_threshold: float = 3.0
    # Fades through black (ThresholdDetector): mean pixel value below this is black.
    fade_threshold: float = 12.0
    # Dissolves: the adaptive detector on one frame per each of these many seconds (SVD detects cuts at
    # three frame rates: the full one and these). A dissolve about as long as a step or shorter stands out
    # against the samples around it; frame to frame it changes too little to be seen.
    dissolve_steps_s: tuple[Annotated[float, Field(gt=0)], ...] = Field((1.0, 3.0), min_length=1)
    # The detectors see each frame halved (by area) as often as its height stays at least this.
    detection_height: int = 32
    min_clip_s: float = 1.0
    max_clip_s: float = 10.0
    # Frames darker than this (mean 0-255) are trimmed from clip ends (fades).
    dark_luma: float = 16.0

    @model_validator(mode="before")
    @classmethod
    def _single_detector(cls, data: object) -> object:
        # The single-detector form `detector: adaptive|content` keeps its meaning: that detector and fades.
        if isinstance(data, dict) and "detector" in data:
            if "detectors" in data:
                raise ValueError("cuts: give `detectors` (a list) or `detector` (one), not both")
            data = {**data, "detectors": (data["detector"], "fades")}
            del data["detector"]
        return data


class Motion(_Strict):
    flow_height: int = 128
    # Camera-motion labels: global flow below this (px per source frame at flow height) is static.
    static_px_per_frame: float = 0.05
    zoom_px_per_frame: float = 0.08  # radial expansion at the frame corner


class Filter(_Strict):
    """Drop clips on one score: the lowest/highest X percent, or below min / above max. Percentiles
    are taken over every clip long enough to keep (both splits)."""

    score: Literal["motion", "text_ratio", "aesthetic", "clip_sim", "resolution"]
    drop_lowest_percent: float | None = Field(None, ge=0, le=100)
    drop_highest_percent: float | None = Field(None, ge=0, le=100)
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _one_rule(self) -> Filter:
        rules = [self.drop_lowest_percent, self.drop_highest_percent, self.min, self.max]
        if sum(r is not None for r in rules) != 1:
            raise ValueError(
                f"filter on {self.score!r} needs exactly one of drop_lowest_percent, drop_highest_percent, min, max"
            )
        return self

    @property
    def name(self) -> str:
        for rule in ("drop_lowest_percent", "drop_highest_percent", "min", "max"):
            if getattr(self, rule) is not None:
                return f"{self.score}:{rule}={getattr(self, rule)}"
        raise AssertionError("validated above")


class Output(_Strict):
    clip_max_side: int = 320  # the small (training) rendition's longer side
    # The high-resolution rendition's longer side (sources larger are scaled down); None: none made.
    hq_max_side: int | None = 1920
    clip_crf: int = 23
    clips_per_shard: int = 256
    videos_per_input_shard: int = 16
    # An input shard also closes at this many bytes of source files (the proxy for its decode time:
    # a video's duration is unknown until it is opened); a larger file is a shard of its own.
    bytes_per_input_shard: int = 2 << 30
    # Share of source videos whose clips go to the held-out split (evaluation's reference clips and
    # prompts, never trained on), decided per video by a hash of its path under the input location.
    heldout_fraction: float = Field(0.05, ge=0, le=0.5)


class Dedup(_Strict):
    """Near-duplicate clips (perceptual hashes of first, middle, last key frame): all but the best of a group go."""

    enabled: bool = True
    # Bits of 64 each frame hash may differ by; larger also finds larger crops, at (max_distance + 1) ** 3 lookups.
    max_distance: int = Field(DEFAULT_MAX_DISTANCE, ge=0, le=31)


class Subsets(_Strict):
    """SVD's staged data: `lvd` every clip long enough to keep, `lvd-f` the clips `filters` (and
    near-duplicate removal) keep, `hq` the clips of `lvd-f` that also pass `hq`. Percentiles in
    `hq` are taken over the same clips as those in `filters`, so a higher percent than the
    filter's is a stricter bound on that score."""

    # Stricter than `filters` on every score, and the source's shorter side: the lowest quarter goes
    # (clips at the bound stay, so a corpus of one size keeps them all). These keep clips on the
    # sample data (random-weight aesthetic scores); components/curation/public-weights.yaml, the
    # pipelines' default, is stricter.
    hq: tuple[Filter, ...] = (
        Filter(score="aesthetic", drop_lowest_percent=30),
        Filter(score="motion", drop_lowest_percent=30),
        Filter(score="text_ratio", max=0.02),
        Filter(score="resolution", drop_lowest_percent=25),
    )


class CurationConfig(_Strict):
    limits: Limits = Limits()
    decode: Decode = Decode()
    cuts: Cuts = Cuts()
    motion: Motion = Motion()
    neural: NeuralConfig = NeuralConfig()
    # SVD-style defaults: static clips, text-heavy clips and the least aesthetic quarter go.
    filters: tuple[Filter, ...] = (
        Filter(score="motion", drop_lowest_percent=25),
        Filter(score="text_ratio", max=0.05),
        Filter(score="aesthetic", drop_lowest_percent=25),
    )
    subsets: Subsets = Subsets()
    output: Output = Output()
    dedup: Dedup = Dedup()
    # Plug-ins ("module:Class", built with no arguments) in place of the built-in video captioner and
    # summary (neural.video_captioner_weights, neural.summarizer_weights); off by default.
    video_captioner: str | None = None
    caption_summarizer: str | None = None

    @model_validator(mode="after")
    def _one_of_each_captioner(self) -> CurationConfig:
        for plugin, weights in (
            ("video_captioner", "video_captioner_weights"),
            ("caption_summarizer", "summarizer_weights"),
        ):
            if getattr(self, plugin) is not None and getattr(self.neural, weights) is not None:
                raise ValueError(f"{plugin} and neural.{weights} are both set: choose the plug-in or the model folder")
        return self

    def captioners(self) -> dict[str, str]:
        """Each caption a clip gets (image, video, summary) and what makes it."""
        neural = self.neural
        made = {
            "image": f"CoCa {neural.coca_model} ({neural.coca_weights or 'random weights'})"
            if neural.captions
            else None,
            "video": self.video_captioner or neural.video_captioner_weights,
            "summary": self.caption_summarizer or neural.summarizer_weights,
        }
        return {name: what for name, what in made.items() if what is not None}

    @classmethod
    def from_yaml(cls, text: str) -> CurationConfig:
        """A config from YAML text (a pipeline parameter); empty text: the defaults."""
        return cls.model_validate(yaml.safe_load(text) or {})

    @classmethod
    def load(cls, path: str | Path | None) -> CurationConfig:
        return cls() if path is None else cls.from_yaml(Path(path).read_text())


def with_random_weights(config: CurationConfig) -> CurationConfig:
    """The same config with random-initialised tiny models where no weights are set."""
    neural = dataclasses.replace(config.neural, allow_random_weights=True, tiny_models=True)
    return config.model_copy(update={"neural": neural})
