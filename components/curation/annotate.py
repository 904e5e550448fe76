"""One input shard: every video probed, decoded once, cut, annotated; the result
published as a part (`parts/<shard id>/`) that `finalize` merges.

Per-video work (decode, cuts, flow, clip encoding) runs in a process pool over
all cores; the neural annotators then run batched over every clip of the shard.
A part is published with its `_MANIFEST.json` last, so a part either exists
whole or is redone; a re-run skips parts that exist.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import re
import tempfile
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import webdataset as wds
from tqdm import tqdm

from components.common.media import write_video
from components.common.objectstore import MANIFEST_NAME, ObjectStore, ObjectStoreError, S3Uri, is_s3_uri
from components.common.settings import load_settings
from components.curation import motion
from components.curation.config import CurationConfig
from components.curation.cuts import CutDetector, segments
from components.curation.neural import (
    CaptionSummarizer,
    ClipScorer,
    CocaCaptioner,
    TextDetector,
    VideoCaptioner,
    load_plugin,
)
from components.curation.video import Rejected, decode, output_size
from model.records import ClipRecord, Flow

CLIPS_FILE = "clips.jsonl"
REJECTED_FILE = "rejected.jsonl"
CLIPS_TAR = "clips.tar"
PART_INFO = "part.json"
THUMB_HEIGHT = 48
# Anything unexpected while processing one file: recorded, and the shard goes on.
PROCESSING_ERROR = "processing_error"


@dataclass
class VideoResult:
    video: str
    rejected: dict | None = None
    clips: list[ClipRecord] = field(default_factory=list)
    keyframes: list[np.ndarray] = field(default_factory=list)  # per clip: (3, h, w, 3) first, middle, last
    clip_mp4: list[bytes | None] = field(default_factory=list)  # None for clips too short to keep
    thumbnails: list[bytes] = field(default_factory=list)  # JPEG strip of the key frames
    timings_s: dict[str, float] = field(default_factory=dict)
    decoded_frames: int = 0


def clip_key(video: str, index: int) -> str:
    """A WebDataset-safe key (no dots), stable for the same source and clip index."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(video).stem)[:40]
    return f"{stem}-{hashlib.sha1(video.encode()).hexdigest()[:10]}-{index:04d}"


def _encode_clip(frames: np.ndarray, fps: float, max_side: int, crf: int) -> bytes:
    h, w = frames.shape[1:3]
    size = output_size(w, h, max_side)
    if size != (w, h):
        frames = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])
    with tempfile.NamedTemporaryFile(suffix=".mp4") as tmp:
        write_video(Path(tmp.name), frames, fps, crf=crf, deterministic=False)
        return Path(tmp.name).read_bytes()


def _thumbnail_strip(keyframes: np.ndarray) -> bytes:
    h, w = keyframes.shape[1:3]
    size = (max(2, round(w * THUMB_HEIGHT / h)), THUMB_HEIGHT)
    strip = np.concatenate([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in keyframes], axis=1)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(strip, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    return jpeg.tobytes()


class Stopwatch:
    """Seconds per named stage, summed over repeated `with watch("stage"):` blocks."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def process_video(video: str, path: Path, config: CurationConfig) -> VideoResult:
    """Everything but the neural annotators, for one file. Never raises for bad input."""
    watch = Stopwatch()
    detector: list[CutDetector] = []

    def start_cut_detection(fps: float):
        detector.append(CutDetector(fps, config.cuts))

        def feed(index: int, rgb: np.ndarray) -> None:
            with watch("cuts"):
                detector[0].feed(index, rgb)

        return feed

    try:
        with watch("decode"):
            decoded = decode(path, config.limits, config.decode, start_cut_detection)
    except Rejected as e:
        return VideoResult(video, rejected={"video": video, "reason": e.reason, "detail": e.detail})
    watch.seconds["decode"] -= watch.seconds["cuts"]  # cut detection ran inside the decode loop

    with watch("cuts"):
        cuts = detector[0].finish()
        clips = segments(len(decoded.frames), decoded.fps, cuts, np.array(detector[0].luma), config.cuts)
    fps = decoded.fps
    result = VideoResult(video, timings_s=watch.seconds, decoded_frames=len(decoded.frames))
    step = max(1, int(round(fps / config.decode.sample_fps)))
    for index, seg in enumerate(clips):
        frames = decoded.frames[seg.start : seg.end]
        with watch("flow"):
            estimate = motion.estimate(frames, list(range(0, len(frames), step)), config.motion)
        keyframes = frames[[0, len(frames) // 2, len(frames) - 1]]
        tx, ty = (round(v, 4) for v in estimate.translation)
        result.clips.append(
            ClipRecord(
                key=clip_key(video, index),
                video=video,
                start_frame=seg.start,
                end_frame=seg.end,
                start_s=round(seg.start / fps, 6),
                end_s=round(seg.end / fps, 6),
                fps=fps,
                num_frames=seg.end - seg.start,
                source_size=(decoded.width, decoded.height),
                codec=decoded.codec,
                too_short=seg.too_short,
                camera_motion=estimate.camera_motion,
                flow=Flow((tx, ty), round(estimate.zoom, 4)),
                scores={"motion": round(estimate.score, 5)},
            )
        )
        result.keyframes.append(keyframes)
        with watch("encode"):
            result.thumbnails.append(_thumbnail_strip(keyframes))
            result.clip_mp4.append(
                None
                if seg.too_short
                else _encode_clip(frames, fps, config.output.clip_max_side, config.output.clip_crf)
            )
    return result


class Annotators:
    """The neural annotators, loaded once and run batched over many clips."""

    def __init__(self, config: CurationConfig, store: ObjectStore | None):
        self.text = TextDetector(config.neural, store)
        self.clip = ClipScorer(config.neural, store)
        self.coca = CocaCaptioner(config.neural, store) if config.neural.captions else None
        self.video_captioner: VideoCaptioner | None = load_plugin(config.video_captioner)
        self.summarizer: CaptionSummarizer | None = load_plugin(config.caption_summarizer)

    @property
    def random_weights(self) -> bool:
        return self.clip.random_weights or bool(self.coca and self.coca.random_weights)

    def annotate(self, clips: list[ClipRecord], keyframes: list[np.ndarray]) -> dict[str, float]:
        """Add text ratio, aesthetic, captions and CLIP similarity to each clip, in place;
        returns seconds per annotator."""
        if not clips:
            return {}
        watch = Stopwatch()
        flat = [frame for triple in keyframes for frame in triple]  # first, middle, last of each clip
        with watch("ocr"):
            text_ratios = np.asarray(self.text.text_ratios(flat)).reshape(len(clips), 3).max(axis=1)
        with watch("clip"):
            embeddings = self.clip.embed_images(flat).reshape(len(clips), 3, -1).mean(axis=1)
            embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
            aesthetic = self.clip.aesthetic(embeddings)
        with watch("captions"):
            final, captions = self._captions(keyframes)
        with watch("clip"):
            similarity = self.clip.text_similarity(embeddings, final) if any(final) else np.zeros(len(clips))
        for i, clip in enumerate(clips):
            clip.caption = final[i] or None  # no captioner gave one: not set
            clip.captions = {name: values[i] for name, values in captions.items() if values[i]} or None
            clip.scores.update(
                text_ratio=round(float(text_ratios[i]), 5),
                aesthetic=round(float(aesthetic[i]), 5),
                clip_sim=round(float(similarity[i]), 5),
            )
        return watch.seconds

    def _captions(self, keyframes: list[np.ndarray]) -> tuple[list[str], dict[str, list[str]]]:
        """SVD's captions: CoCa on the middle frame, optionally a video captioner, and an
        optional summary of both; the final caption is the summary if there is one."""
        middles = [triple[1] for triple in keyframes]
        captions = {"image": self.coca.caption(middles) if self.coca else [""] * len(keyframes)}
        if self.video_captioner:
            captions["video"] = self.video_captioner.caption_clips([list(k) for k in keyframes])
        if self.summarizer:
            captions["summary"] = self.summarizer.summarize([list(c) for c in zip(*captions.values(), strict=True)])
        return captions.get("summary", captions["image"]), captions


def _local_copy(video: str, scratch: Path) -> Path:
    if not is_s3_uri(video):
        return Path(video)
    store = ObjectStore.from_settings(load_settings())
    return store.download_file(video, scratch / S3Uri.parse(video).key.replace("/", "_"))


def _process(job: tuple[str, str, CurationConfig]) -> VideoResult:
    """Pool entry point: fetch if remote, process, drop the scratch copy."""
    video, scratch, config = job
    path = None
    try:
        path = _local_copy(video, Path(scratch))
        return process_video(video, path, config)
    except ObjectStoreError:
        raise  # the store, not the file: fail the shard so a retry redoes it
    except Exception as e:  # noqa: BLE001 - one bad file must never fail the shard
        detail = f"{type(e).__name__}: {e} | {traceback.format_exc(limit=3).splitlines()[-3:]}"
        return VideoResult(video, rejected={"video": video, "reason": PROCESSING_ERROR, "detail": detail})
    finally:
        if path is not None and path.parent == Path(scratch):
            path.unlink(missing_ok=True)


def run_videos(videos: list[str], config: CurationConfig, workers: int, progress: bool = False) -> list[VideoResult]:
    """`process_video` over many files on a process pool, results in input order."""
    with tempfile.TemporaryDirectory(prefix="vdm-curate-") as scratch, contextlib.ExitStack() as stack:
        jobs = [(video, scratch, config) for video in videos]
        mapped = map(_process, jobs)
        if workers > 1:
            # spawn: workers must not inherit a parent's torch/OpenMP state.
            context = multiprocessing.get_context("spawn")
            mapped = stack.enter_context(ProcessPoolExecutor(workers, mp_context=context)).map(_process, jobs)
        return list(tqdm(mapped, total=len(jobs), desc="decode, cut, flow", unit="video", disable=not progress))


def annotate_shard(
    videos: list[str],
    part: S3Uri,
    config: CurationConfig,
    store: ObjectStore,
    annotators: Annotators,
    *,
    workers: int = 1,
    progress: bool = False,
) -> dict:
    """Process one input shard into `part`, unless it is already published there."""
    if store.exists(part.join(MANIFEST_NAME)):
        return json.loads(store.get_bytes(part.join(PART_INFO))) | {"skipped": True}
    results = run_videos(videos, config, workers, progress)
    clips = [clip for r in results for clip in r.clips]
    keyframes = [k for r in results for k in r.keyframes]
    neural_s = annotators.annotate(clips, keyframes)

    with tempfile.TemporaryDirectory(prefix="vdm-part-") as tmp:
        folder = Path(tmp)
        _write_jsonl(folder / CLIPS_FILE, [clip.to_json() for clip in clips])
        _write_jsonl(folder / REJECTED_FILE, [json.dumps(r.rejected, sort_keys=True) for r in results if r.rejected])
        with wds.TarWriter(str(folder / CLIPS_TAR), mtime=0) as tar:
            for r in results:
                for clip, mp4, jpg in zip(r.clips, r.clip_mp4, r.thumbnails, strict=True):
                    sample = {"__key__": clip.key, "jpg": jpg}
                    if mp4 is not None:
                        sample["mp4"] = mp4
                    tar.write(sample)
        per_stage: dict[str, float] = {}
        for r in results:
            for stage, seconds in r.timings_s.items():
                per_stage[stage] = per_stage.get(stage, 0.0) + seconds
        info = {
            "videos": videos,
            "clips": len(clips),
            "rejected": sum(r.rejected is not None for r in results),
            "random_weights": annotators.random_weights,
            "clip_frames": sum(c.frames for c in clips),
            "seconds": {**per_stage, **neural_s},
        }
        (folder / PART_INFO).write_text(json.dumps(info, indent=1))
        store.publish_folder(folder, part)
    return info | {"skipped": False}


def _write_jsonl(path: Path, lines: list[str]) -> None:
    with open(path, "w") as f:
        f.writelines(line + "\n" for line in lines)


def read_jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in io.StringIO(data.decode()) if line.strip()]


def read_clips(data: bytes) -> list[ClipRecord]:
    """A part's `clips.jsonl`."""
    return [ClipRecord.from_json(line) for line in io.StringIO(data.decode()) if line.strip()]
