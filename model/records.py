"""The clip record: curation's manifest row, the `<key>.json` beside each clip in the
training shards, and the training loaders' input, defined once.

Curation builds a `ClipRecord` per clip (components/curation/annotate.py), its
annotators set attributes on it, finalize sets `kept`, `drop_reasons` and `shard` and
writes `to_json()`; the synthetic data writers (components/sample_data) build the same
class; the loaders (model/data.py, model/multiview.py) read it back with `from_json`.
Orbit shards (multi-view) carry an `OrbitRecord`: a clip record with the camera's
`elevation` and per-frame `azimuths`.

On disk a record is a JSON object with one key per field that is set: a field that is
not set is None here and absent there (never "" or 0), so the JSON curation wrote
before this class existed loads and is written back with the same keys and values.

A clip's `split` says which part of the curated data it belongs to: `train` (the
training shards) or `heldout` (the held-out shards that only evaluation reads: the
training loaders refuse them). Not set: train (data written before the split existed,
synthetic data).

Also here: the camera-motion vocabulary, the labels curation's flow analysis assigns
(components/curation/motion.py) and the camera-motion LoRA's classes are made of
(model/camera_lora.py).

Standard library only: curation's workers and the CLI import this without torch.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self, get_args

CameraMotion = Literal["static", "pan_left", "pan_right", "tilt_up", "tilt_down", "zoom_in", "zoom_out"]
STATIC: CameraMotion = "static"
PAN_LEFT: CameraMotion = "pan_left"
PAN_RIGHT: CameraMotion = "pan_right"
TILT_UP: CameraMotion = "tilt_up"
TILT_DOWN: CameraMotion = "tilt_down"
ZOOM_IN: CameraMotion = "zoom_in"
ZOOM_OUT: CameraMotion = "zoom_out"
# Every label curation can give a clip, in this order.
CAMERA_MOTIONS: tuple[CameraMotion, ...] = get_args(CameraMotion)

# A clip's `motion` score is px per frame at 128 px; SVD's motion bucket, what the models are
# conditioned on, is the score times MOTION_BUCKET_SCALE, 0 to 255 (model/conditioning.py).
MOTION_BUCKET_SCALE = 64.0
MOTION_BUCKETS = 256
# The largest score with a bucket of its own: any higher is the last bucket too.
MAX_MOTION = (MOTION_BUCKETS - 1) / MOTION_BUCKET_SCALE

Split = Literal["train", "heldout"]
TRAIN: Split = "train"
HELDOUT: Split = "heldout"  # also the folder of the held-out shards under a curated output
SPLITS: tuple[Split, ...] = get_args(Split)

# The label of synthetic orbits (components/sample_data/orbits.py): a camera circling the
# object. Curation never assigns it; only an OrbitRecord may carry it.
Orbit = Literal["orbit"]
ORBIT: Orbit = "orbit"


def check_camera_motion(label: object, allowed: tuple[str, ...] = CAMERA_MOTIONS) -> str:
    """`label` if it is one of `allowed` (curation's labels); a ValueError naming them if not."""
    if label not in allowed:
        raise ValueError(f"unknown camera motion {label!r}; one of {list(allowed)}")
    return label  # type: ignore[return-value]


@dataclass
class Flow:
    """The clip's robust global optical flow: content translation (x right, y down) and
    radial expansion at the frame corner (> 0: zoom in), px per source frame."""

    translation: tuple[float, float]
    zoom: float

    def to_dict(self) -> dict[str, Any]:
        return {"translation": list(self.translation), "zoom": self.zoom}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        if not isinstance(data, dict) or set(data) != {"translation", "zoom"}:
            raise ValueError(f"flow must be {{'translation': [x, y], 'zoom': z}}, got {data!r}")
        x, y = data["translation"]
        return cls((x, y), data["zoom"])


# A clip's stored encodings. `small`: the training rendition (at most `output.clip_max_side`,
# `<key>.mp4` in `shards/` and `heldout/`); `hq`: the source resolution up to
# `output.hq_max_side` (`<key>.hq.mp4` in `shards-hq/` and `heldout-hq/`, for high-resolution stages).
RenditionName = Literal["small", "hq"]
SMALL: RenditionName = "small"
HQ: RenditionName = "hq"
RENDITIONS: tuple[RenditionName, ...] = get_args(RenditionName)
# The WebDataset extension of each rendition's mp4 (`<key>.<ext>`).
RENDITION_EXT: dict[str, str] = {SMALL: "mp4", HQ: "hq.mp4"}


# Curation's staged subsets (SVD): `lvd` every clip long enough to keep, before the quality
# filters; `lvd-f` the clips the filters keep (a curated output's `shards/`); `hq` the clips of
# `lvd-f` that pass the stricter `subsets.hq` thresholds. Each is in the next: hq < lvd-f < lvd.
SubsetName = Literal["lvd", "lvd-f", "hq"]
LVD: SubsetName = "lvd"
LVD_F: SubsetName = "lvd-f"
HQ_SUBSET: SubsetName = "hq"
SUBSETS: tuple[SubsetName, ...] = get_args(SubsetName)


def rendition_folder(split: Split, rendition: str) -> str:
    """The folder of a split's shards of one rendition under a curated output: `shards`,
    `heldout`, `shards-hq`, `heldout-hq`."""
    base = HELDOUT if split == HELDOUT else "shards"
    return base if rendition == SMALL else f"{base}-{rendition}"


@dataclass
class Rendition:
    """One stored encoding of a clip."""

    width: int
    height: int
    # Frames of the file before the clip's first frame: a clip copied from the source without
    # re-encoding (remuxed) starts at the key frame at or before its first frame, and may end with
    # the few frames its last frames reference (B-frames). Readers take [first_frame, first_frame + frames).
    first_frame: int = 0
    remuxed: bool = False
    shard: str | None = None  # set by finalize for kept clips

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        if not isinstance(data, dict):
            raise ValueError(f"a rendition is a JSON object, got {data!r}")
        return cls(**data)


@dataclass(kw_only=True)
class ClipRecord:
    """One clip of a source video, as curation describes it (fields in curation's order).

    Required: what every writer knows and the loaders need. Optional (None: not set,
    absent from the JSON): what only some writers know or what a later step adds."""

    key: str  # WebDataset key of the clip's samples (no dots)
    video: str  # the source file (path or URI); synthetic clips: the key
    start_frame: int  # [start_frame, end_frame) of the source, in frames
    end_frame: int
    start_s: float
    end_s: float
    fps: float  # the source's
    num_frames: int | None = None  # end_frame - start_frame
    source_size: tuple[int, int] | None = None  # (width, height) of the source
    codec: str | None = None
    # Curation's parts only: shorter than the minimum clip length (the manifest says it
    # with the drop reason `too_short` instead).
    too_short: bool | None = None
    camera_motion: CameraMotion
    flow: Flow | None = None
    # Score name -> value (components/curation/config.py SCORES: motion, text_ratio,
    # aesthetic, clip_sim); a score not measured is absent. The loaders need `motion`.
    scores: dict[str, float]
    caption: str | None = None  # the final caption (the summary if there is one)
    captions: dict[str, str] | None = None  # captioner name (image, video, summary) -> caption
    kept: bool | None = None  # set by the filters
    drop_reasons: list[str] | None = None  # set by the filters; [] for kept clips
    shard: str | None = None  # URI of the shard holding a kept clip
    split: Split | None = None  # set by finalize; None: train (written before the split existed)
    # Rendition name (SMALL, HQ) -> how it is stored; None: one `<key>.mp4`, first_frame 0.
    renditions: dict[str, Rendition] | None = None
    # 64-bit perceptual hashes (16 hex digits) of the first, middle and last frame.
    phash: tuple[str, ...] | None = None
    duplicate_of: str | None = None  # a dropped near-duplicate: the key of the clip kept instead
    # Set by finalize: the curated subsets (SUBSETS) holding the clip, and the `hq` thresholds it
    # fails ([] when it passes them; `drop_reasons` says why it is not in `lvd-f`).
    subsets: list[str] | None = None
    hq_drop_reasons: list[str] | None = None

    # The camera-motion labels this kind of record may carry.
    camera_motions: ClassVar[tuple[str, ...]] = CAMERA_MOTIONS

    def __post_init__(self) -> None:
        check_camera_motion(self.camera_motion, self.camera_motions)
        if self.split is not None and self.split not in SPLITS:
            raise ValueError(f"clip record {self.key!r}: unknown split {self.split!r}; one of {list(SPLITS)}")
        for name in self.subsets or ():
            if name not in SUBSETS:
                raise ValueError(f"clip record {self.key!r}: unknown subset {name!r}; one of {list(SUBSETS)}")
        if not isinstance(self.scores, dict):
            raise ValueError(f"clip record {self.key!r}: scores must map score names to values, got {self.scores!r}")
        if self.source_size is not None:
            self.source_size = tuple(self.source_size)  # type: ignore[assignment]
        if isinstance(self.flow, dict):
            self.flow = Flow.from_dict(self.flow)
        if self.phash is not None:
            self.phash = tuple(self.phash)  # type: ignore[assignment]
        if self.renditions is not None:
            for name in self.renditions:
                if name not in RENDITIONS:
                    raise ValueError(f"clip record {self.key!r}: unknown rendition {name!r}; one of {list(RENDITIONS)}")
            self.renditions = {
                name: r if isinstance(r, Rendition) else Rendition.from_dict(r) for name, r in self.renditions.items()
            }

    @property
    def heldout(self) -> bool:
        """Whether the clip is in the held-out split (evaluation's, never training's)."""
        return self.split == HELDOUT

    @property
    def frames(self) -> int:
        """The clip's length in source frames."""
        return self.end_frame - self.start_frame

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: every field that is set (not None), plain JSON types."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, Flow):
                value = value.to_dict()
            elif f.name == "renditions":
                value = {name: r.to_dict() for name, r in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict | list):
                value = copy.deepcopy(value)  # the caller's to change, not the record's
            out[f.name] = value
        return out

    def to_json(self) -> str:
        """One line of JSON, keys sorted (manifest rows and shard `<key>.json` alike)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, data: bytes | str | dict[str, Any]) -> Self:
        """A record from its JSON (a shard's `<key>.json` bytes, a manifest line, or the
        parsed object). `ClipRecord.from_json` of an orbit's JSON (it has `elevation`)
        gives an OrbitRecord. Missing required fields and unknown fields are a ValueError
        naming them; so is a camera-motion label outside the vocabulary."""
        if isinstance(data, bytes | bytearray):
            data = data.decode()
        if isinstance(data, str):
            data = json.loads(data)
        if not isinstance(data, dict):
            raise ValueError(f"a clip record is a JSON object, got {type(data).__name__}")
        target = cls
        if cls is ClipRecord and ("elevation" in data or "azimuths" in data):
            target = OrbitRecord
        fields = {f.name: f for f in dataclasses.fields(target)}
        key = data.get("key", "<no key>")
        missing = [
            name
            for name, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and name not in data
        ]
        if missing:
            raise ValueError(f"{target.__name__} {key!r} lacks required field(s): {', '.join(missing)}")
        unknown = sorted(set(data) - set(fields))
        if unknown:
            fields_list = ", ".join(unknown)
            raise ValueError(f"{target.__name__} {key!r} has unknown field(s): {fields_list} (see model/records.py)")
        values = dict(data)
        if values.get("flow") is not None:
            values["flow"] = Flow.from_dict(values["flow"])
        try:
            return target(**values)
        except ValueError as e:
            raise ValueError(f"{target.__name__} {key!r}: {e}") from None


@dataclass(kw_only=True)
class OrbitRecord(ClipRecord):
    """A clip of a camera orbiting an object (multi-view shards): each frame one view,
    taken at `elevation` degrees and the frame's azimuth (degrees)."""

    camera_motion: CameraMotion | Orbit
    elevation: float
    azimuths: list[float]

    camera_motions: ClassVar[tuple[str, ...]] = (*CAMERA_MOTIONS, ORBIT)
