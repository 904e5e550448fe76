"""Training data: curated WebDataset shards -> fixed-size video clips (or images, for
Stage I and image-only finetunes).

Each sample of a shard is `<key>.mp4` + `<key>.json` (curation's contract: a
`ClipRecord`, model/records.py). The mp4 is the clip's rendition the stage reads
(`ClipSpec.rendition`: `small` from curation's `shards/`, `hq` from `shards-hq/`); a
rendition copied from the source starts `first_frame` frames before the clip, which are
skipped. A clip is decoded with PyAV, `num_frames` frames are taken at the requested fps (a
random window, seeded by sample, epoch and seed), resized and cropped to the
stage's resolution, and scaled to [-1, 1] as (T, C, H, W).

Frame rate and motion are SVD's micro-conditioning. With `ClipSpec.fps_choices` (several
rates) each clip is drawn at one of them, chosen at random per sample among the rates the
clip is long enough for, as an integer stride over its source frames; the item's `fps` is
the real rate of the frames drawn (source fps / stride) and its `motion` the curated score
(px per source frame) times the stride: the motion per drawn frame. With one rate (`fps`)
frames, `fps` and `motion` are as the config and curation give them.

Order is deterministic and resumable: shards are permuted per epoch by the seed,
dealt to (rank, worker) round robin, shuffled within a seeded buffer; the stream
never ends (epochs follow each other). `ClipDataset(..., start=n)` resumes after
the first `n` samples a rank consumed: each worker skips its share of raw samples
without decoding them (the DataLoader takes workers round robin).

Held-out clips (`split: "heldout"` in their JSON: curation's `heldout/` shards) are
evaluation's reference data: every loader here refuses them unless built with
`heldout=True` (then it reads both splits; with several rates, each clip at the one rate
`fps`, which evaluations generate at).

Shard URLs are anything webdataset opens (paths, http(s) URLs, `pipe:` commands, and
`s3://` URIs through the handler the caller registers in webdataset's `gopen_schemes`: the
platform's components register one that signs each request and resumes broken streams),
so this module never touches credentials.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace

import av
import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from model.records import CAMERA_MOTIONS, HELDOUT, RENDITIONS, SMALL, ClipRecord, RenditionName, check_camera_motion


@dataclass(frozen=True)
class ClipSpec:
    num_frames: int = 8
    fps: float = 8.0
    height: int = 64
    width: int = 64
    # The curated rendition the clips are read from (model/records.py RENDITIONS): `small` (curation's
    # `shards/`, at most `output.clip_max_side`) or `hq` (`shards-hq/`, high-resolution stages).
    rendition: RenditionName = SMALL
    # Training frame rates (fps micro-conditioning): each clip is drawn at one of them, at random;
    # `fps`, one of them, is the rate generation and evaluation default to. None: `fps` only.
    fps_choices: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.rendition not in RENDITIONS:
            raise ValueError(f"clip rendition {self.rendition!r}: one of {list(RENDITIONS)}")
        if self.fps_choices is not None:
            choices = tuple(float(rate) for rate in self.fps_choices)
            object.__setattr__(self, "fps_choices", choices)  # YAML gives a list
            if not choices or min(choices) <= 0:
                raise ValueError(f"clip.fps_choices {list(choices)}: one or more frame rates above 0")
            if float(self.fps) not in choices:
                raise ValueError(
                    f"clip.fps {self.fps:g} is not one of clip.fps_choices {list(choices)}: it is the rate "
                    "generation and evaluation default to, so it must be one the model trains on"
                )

    @property
    def rates(self) -> tuple[float, ...]:
        """The frame rates clips are drawn at (nominal: the real one is a whole stride of the source's)."""
        return self.fps_choices or (float(self.fps),)

    @property
    def several_rates(self) -> bool:
        return len(set(self.rates)) > 1

    def single_rate(self) -> ClipSpec:
        """This spec at its `fps` alone (evaluation compares data and generations at one rate)."""
        return replace(self, fps_choices=None)


def frame_indices(source_frames: int, source_fps: float, spec: ClipSpec, rng: random.Random) -> list[int] | None:
    """`spec.num_frames` indices spaced at `spec.fps` in a clip of `source_frames` at
    `source_fps`, from a random start; None if the clip is too short."""
    stride = source_fps / spec.fps
    span = (spec.num_frames - 1) * stride
    if span > source_frames - 1:
        return None
    start = rng.uniform(0, source_frames - 1 - span)
    return [int(round(start + i * stride)) for i in range(spec.num_frames)]


def rate_strides(source_fps: float, spec: ClipSpec) -> list[int]:
    """The whole strides over a `source_fps` clip nearest to `spec`'s rates (at least 1), ascending."""
    return sorted({max(1, round(source_fps / rate)) for rate in spec.rates})


def strided_indices(source_frames: int, source_fps: float, spec: ClipSpec, rng: random.Random) -> list[int] | None:
    """`spec.num_frames` indices at one whole stride, drawn from `rate_strides` among those the
    clip is long enough for, from a random start; None if it is too short for every one."""
    span = spec.num_frames - 1
    fitting = [stride for stride in rate_strides(source_fps, spec) if span * stride <= source_frames - 1]
    if not fitting:
        return None
    stride = rng.choice(fitting)
    start = rng.randint(0, source_frames - 1 - span * stride)
    return [start + i * stride for i in range(spec.num_frames)]


def drawn_stride(indices: list[int]) -> int:
    """Source frames between two frames of a clip drawn by `strided_indices` (1 for one frame)."""
    return indices[1] - indices[0] if len(indices) > 1 else 1


def decode_frames(mp4: bytes, indices: list[int]) -> np.ndarray:
    """The frames at `indices` (sorted) of an mp4, RGB (len, H, W, 3); one decode pass
    that stops after the last wanted frame."""
    wanted, frames = set(indices), {}
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                frames[i] = frame.to_ndarray(format="rgb24")
            if i >= indices[-1]:
                break
    return np.stack([frames[i] for i in indices])


def resize_crop(frames: np.ndarray, height: int, width: int, rng: random.Random | None) -> torch.Tensor:
    """Shorter side to fit, then a crop (random if `rng`, else centred); (T, C, H, W) in [-1, 1]."""
    return fit_frames(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1, height, width, rng)


def fit_frames(video: torch.Tensor, height: int, width: int, rng: random.Random | None = None) -> torch.Tensor:
    """(T, C, h, w) in [-1, 1] resized (shorter side to fit) and cropped to (T, C, height, width)."""
    h, w = video.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    video = F.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False)
    top = (size[0] - height) // 2 if rng is None else rng.randint(0, size[0] - height)
    left = (size[1] - width) // 2 if rng is None else rng.randint(0, size[1] - width)
    return video[:, :, top : top + height, left : left + width].clamp(-1, 1)


def refuse_heldout(raw: dict) -> None:
    """A ValueError naming the sample if its JSON puts it in the held-out split."""
    meta = json.loads(raw["json"]) if "json" in raw else None
    if isinstance(meta, dict) and meta.get("split") == HELDOUT:
        raise ValueError(
            f"clip {raw['__key__']!r} belongs to the held-out split, which training never reads (evaluation "
            f"compares generated videos with it): train on the curated output's shards/, not its {HELDOUT}/"
        )


class ClipDataset(IterableDataset):
    def __init__(
        self,
        shards: list[str],
        spec: ClipSpec,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 64,
        start: int = 0,
        random_crop: bool = True,
        epochs: int | None = None,
        camera_motion: tuple[str, ...] | None = None,
        heldout: bool = False,
    ):
        if len(shards) < world_size:
            raise ValueError(f"{len(shards)} shards cannot feed {world_size} ranks")
        self.shards, self.seed = list(shards), seed
        # Several rates: whole strides, each item told its real rate and its motion per drawn frame.
        # Held-out clips (evaluation) are drawn so at the one rate `fps` that generation asks for.
        self.strided = spec.several_rates
        self.spec = replace(spec, fps_choices=(spec.fps,)) if heldout and self.strided else spec
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.start, self.random_crop = shuffle_buffer, start, random_crop
        self.epochs = epochs  # None: the stream never ends
        for label in camera_motion or ():
            check_camera_motion(label, CAMERA_MOTIONS)
        self.camera_motion = camera_motion  # curation's labels of the clips to keep (None: all)
        self.heldout = heldout  # True: held-out clips are read too (evaluation); False: they are an error

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _raw(self, worker: int, workers: int) -> Iterator[tuple[int, dict]]:
        """(epoch, raw sample) forever, in this (rank, worker)'s deterministic order."""
        slot, slots = self.rank * workers + worker, self.world_size * workers
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            order = self.shards[:]
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
            mine = order[slot::slots] or [order[slot % len(order)]]  # more slots than shards: share
            buffer: list[dict] = []
            rng = random.Random(f"{self.seed}:{epoch}:{slot}")
            for sample in wds.WebDataset(mine, shardshuffle=False, nodesplitter=None, workersplitter=None):
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    yield epoch, buffer.pop(rng.randrange(len(buffer)))
            while buffer:
                yield epoch, buffer.pop(rng.randrange(len(buffer)))
            epoch += 1

    def __iter__(self) -> Iterator[dict]:
        worker, workers = self._worker()
        # The DataLoader takes workers round robin from worker 0, and sample `start` of the
        # uninterrupted run came from worker `start % workers`: rotate the roles so the
        # resumed stream continues exactly where it stopped.
        role = (worker + self.start) % workers
        skip = self.start // workers + (1 if role < self.start % workers else 0)
        usable, last_epoch = 0, 0
        for epoch, raw in self._raw(role, workers):
            if epoch != last_epoch:
                if usable == 0:
                    raise ValueError(self._nothing_usable())
                usable, last_epoch = 0, epoch
            if not self.heldout:
                refuse_heldout(raw)
            plan = self._plan(epoch, raw)
            if plan is None:
                continue  # too short for this stage (decided from metadata, so resume counts agree)
            usable += 1
            if skip:
                skip -= 1  # consumed before the resume: not decoded
                continue
            yield self._decode(raw, *plan)
        if usable == 0:  # a finite stream (epochs=n) with nothing usable
            raise ValueError(self._nothing_usable())

    def _nothing_usable(self) -> str:
        labelled = f" and labelled {'/'.join(self.camera_motion)}" if self.camera_motion is not None else ""
        return f"no clip in these shards is long enough for {self.spec}{labelled}"

    def _plan(self, epoch: int, raw: dict) -> tuple[ClipRecord, list[int], random.Random] | None:
        record = ClipRecord.from_json(raw["json"])
        if self.camera_motion is not None and record.camera_motion not in self.camera_motion:
            return None  # another camera motion's clip (decided from metadata, like length)
        rng = random.Random(f"{self.seed}:{epoch}:{raw['__key__']}")
        draw = strided_indices if self.strided else frame_indices
        indices = draw(record.frames, record.fps, self.spec, rng)
        return None if indices is None else (record, indices, rng)

    def _decode(self, raw: dict, record: ClipRecord, indices: list[int], rng: random.Random) -> dict:
        rendition = (record.renditions or {}).get(self.spec.rendition)
        if record.renditions is not None and rendition is None:
            raise ValueError(
                f"clip {record.key!r} has no {self.spec.rendition!r} rendition (it has {sorted(record.renditions)}): "
                f"curate with that rendition, or give the stage `clip: {{rendition: ...}}` of one it has"
            )
        first = rendition.first_frame if rendition else 0  # frames of the file before the clip
        frames = decode_frames(raw["mp4"], [first + i for i in indices])
        if rendition and frames.shape[1:3] != (rendition.height, rendition.width):
            folder = "shards-hq/" if self.spec.rendition != SMALL else "shards/"
            raise ValueError(
                f"clip {record.key!r}: its mp4 is {frames.shape[2]}x{frames.shape[1]}, not its "
                f"{self.spec.rendition!r} rendition's {rendition.width}x{rendition.height}: this stage reads "
                f"the {self.spec.rendition!r} rendition, in a curated output's {folder}"
            )
        if "motion" not in record.scores:
            raise ValueError(f"clip {record.key!r} has no motion score: the loader conditions on it")
        if self.strided:  # a whole stride: the real rate of the frames drawn
            stride = drawn_stride(indices)
            fps = record.fps / stride
        else:  # spaced at `fps`, each index rounded: on average this many source frames apart
            fps, stride = float(self.spec.fps), record.fps / self.spec.fps
        motion = float(record.scores["motion"]) * stride  # the score is per source frame; told per drawn frame
        return {
            "key": raw["__key__"],
            "video": resize_crop(frames, self.spec.height, self.spec.width, rng if self.random_crop else None),
            "fps": torch.tensor(fps),
            "motion": torch.tensor(motion),
            "caption": record.caption or "",
        }


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class ImageDataset(ClipDataset):
    """WebDataset of images for Stage I and image-only (spatial) finetunes: each sample
    `<key>.jpg|png|webp` with a caption in `<key>.json` (`caption`) or `<key>.txt`.
    Items look like one-frame clips (video (1, C, H, W)), so every stage's loss takes
    them; order, sharding and resume are the clip loader's."""

    def __init__(self, shards: list[str], height: int, width: int, **kwargs):
        super().__init__(shards, ClipSpec(num_frames=1, fps=1.0, height=height, width=width), **kwargs)

    def _nothing_usable(self) -> str:
        return f"no image ({', '.join(IMAGE_EXTENSIONS)}) in these shards: image data is a WebDataset of images"

    def _plan(self, epoch: int, raw: dict) -> tuple[dict, list[int], random.Random] | None:
        if not any(ext in raw for ext in IMAGE_EXTENSIONS):
            return None
        meta = json.loads(raw["json"]) if "json" in raw else {"caption": raw.get("txt", b"").decode()}
        return meta, [0], random.Random(f"{self.seed}:{epoch}:{raw['__key__']}")

    def _decode(self, raw: dict, meta: dict, indices: list[int], rng: random.Random) -> dict:
        from PIL import Image

        data = next(raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw)
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[None]
        return {
            "key": raw["__key__"],
            "video": resize_crop(image, self.spec.height, self.spec.width, rng if self.random_crop else None),
            "fps": torch.tensor(0.0),
            "motion": torch.tensor(0.0),
            "caption": meta.get("caption", ""),
        }
