"""`vdm data synth`: sample videos whose truth is known, plus the bad files curation must reject.

The manifest (`manifest.json`) records, for every file, what a correct curation
must find: cut frames, fades, camera motion and the per-frame content velocity it
causes, objects and their velocities, burned-in text and its area; for bad files,
the rejection reason. Same seed, same bytes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from components.common.media import write_video
from components.common.objectstore import ObjectStore, is_s3_uri, sha256_file
from components.sample_data.render import (
    moving_shapes,
    pan,
    texture,
    write_audio_only,
    zoom,
)
from model.records import PAN_LEFT, PAN_RIGHT, STATIC, TILT_DOWN, TILT_UP, ZOOM_IN, ZOOM_OUT, CameraMotion

MANIFEST_NAME = "manifest.json"
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class SynthConfig:
    seed: int = 0
    width: int = 320
    height: int = 180
    fps: int = 24
    seconds: float = 3.0  # length of the single-shot videos
    pan_speed: int = 3  # px per frame
    zoom_rate: float = 1.008  # scale factor per frame

    @property
    def frames(self) -> int:
        return int(round(self.seconds * self.fps))


# Rejection reasons; curation records the same words in rejected.jsonl.
REJECT_EMPTY = "empty_file"
REJECT_UNDECODABLE = "undecodable"
REJECT_NO_VIDEO = "no_video_stream"
REJECT_TRUNCATED = "truncated"

_TINTS = [(1.0, 0.55, 0.3), (0.3, 0.7, 1.0), (0.5, 1.0, 0.45), (1.0, 0.9, 0.5), (0.8, 0.45, 1.0)]


def _truth(**overrides) -> dict:
    """Truth of a single static shot with no objects; videos override what they show."""
    base = {
        "cuts": [],
        "fades": [],
        "camera_motion": STATIC,
        "content_velocity_px_per_frame": [0.0, 0.0],
        "zoom_rate_per_frame": 1.0,
        "objects": [],
        "has_text": False,
        "text_boxes": [],
        "text_area_ratio": 0.0,
    }
    base.update(overrides)
    return base


class _Catalogue:
    """Builds each sample video's frames and truth from one seeded generator."""

    def __init__(self, config: SynthConfig):
        self.c = config
        self.rng = np.random.default_rng(config.seed)

    def background(self, tint_index: int, extra_height: int = 0, extra_width: int = 0) -> np.ndarray:
        height, width = self.c.height + extra_height, self.c.width + extra_width
        return texture(self.rng, height, width, _TINTS[tint_index % len(_TINTS)])

    def shot_with_objects(self, num_frames: int, tint_index: int, num_objects: int) -> tuple[np.ndarray, list[dict]]:
        shapes = moving_shapes(
            num_frames,
            self.c.height,
            self.c.width,
            num_shapes=num_objects,
            max_speed=2.5,
            radius_range=(8, 14),
            background=self.background(tint_index),
            seed=int(self.rng.integers(1 << 31)),
        )
        objects = [
            {
                "start_xy": shapes.positions[0, i].round(4).tolist(),
                "velocity_px_per_frame": shapes.velocities[i].round(6).tolist(),
                "radius": round(float(shapes.radii[i]), 4),
                "color_rgb": shapes.colors[i].tolist(),
            }
            for i in range(num_objects)
        ]
        return shapes.frames, objects

    def cuts(self):
        lengths = [40, 56, 48]
        shots, objects = zip(*(self.shot_with_objects(n, i, 1) for i, n in enumerate(lengths)), strict=True)
        boundaries = np.cumsum(lengths)[:-1].tolist()
        truth = _truth(cuts=boundaries, shots=_spans(lengths), objects=[o for per in objects for o in per])
        return np.concatenate(shots), truth

    def fade(self):
        fps = self.c.fps
        fade_len, black_len = fps // 2, fps // 4
        a, _ = self.shot_with_objects(2 * fps, 0, 1)
        b, _ = self.shot_with_objects(2 * fps, 1, 1)
        ramp = np.linspace(1, 0, fade_len + 1, dtype=np.float32)[1:]  # last frame of the ramp is black
        a[-fade_len:] = (a[-fade_len:] * ramp[:, None, None, None]).astype(np.uint8)
        b[:fade_len] = (b[:fade_len] * ramp[::-1, None, None, None]).astype(np.uint8)
        black = np.zeros((black_len, *a.shape[1:]), np.uint8)
        out_start = len(a) - fade_len
        in_start = len(a) + black_len
        truth = _truth(
            fades=[
                {"kind": "out", "start_frame": out_start, "end_frame": len(a)},
                {"kind": "in", "start_frame": in_start, "end_frame": in_start + fade_len},
            ],
            black_frames=[len(a) - 1, in_start + 1],
            shots=[[0, len(a)], [in_start, in_start + len(b)]],
        )
        return np.concatenate([a, black, b]), truth

    def static(self):
        frame = self.background(2)
        return np.repeat(frame[None], self.c.frames, axis=0), _truth()

    def objects(self):
        frames, objects = self.shot_with_objects(self.c.frames, 3, 3)
        return frames, _truth(objects=objects)

    def camera_pan(self, label: CameraMotion, window_velocity: tuple[int, int]):
        travel = (self.c.frames - 1) * np.abs(window_velocity)
        world = self.background(4, extra_height=int(travel[1]), extra_width=int(travel[0]))
        frames = pan(world, self.c.height, self.c.width, self.c.frames, window_velocity)
        # The window moving right makes the content move left in the frame.
        content = [-float(window_velocity[0]), -float(window_velocity[1])]
        return frames, _truth(camera_motion=label, content_velocity_px_per_frame=content)

    def camera_zoom(self, label: CameraMotion, rate: float):
        world = self.background(1, extra_height=self.c.height, extra_width=self.c.width)
        frames = zoom(world, self.c.height, self.c.width, self.c.frames, rate)
        return frames, _truth(camera_motion=label, zoom_rate_per_frame=rate)

    def text(self):
        frames, objects = self.shot_with_objects(self.c.frames, 0, 1)
        caption, font, scale, thickness = "BREAKING NEWS 24/7", cv2.FONT_HERSHEY_DUPLEX, 0.7, 2
        (tw, th), baseline = cv2.getTextSize(caption, font, scale, thickness)
        x, y = (self.c.width - tw) // 2, self.c.height - 20
        box = [x, y - th - thickness, x + tw, y + baseline]
        for frame in frames:
            cv2.rectangle(frame, (box[0] - 4, box[1] - 4), (box[2] + 4, box[3] + 4), (0, 0, 0), -1)
            cv2.putText(frame, caption, (x, y), font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
        area = (box[2] - box[0]) * (box[3] - box[1]) / (self.c.width * self.c.height)
        truth = _truth(objects=objects, has_text=True, text=caption, text_boxes=[box], text_area_ratio=round(area, 5))
        return frames, truth

    def valid_videos(self) -> dict[str, Callable[[], tuple[np.ndarray, dict]]]:
        v, z = self.c.pan_speed, self.c.zoom_rate
        return {
            "cuts.mp4": self.cuts,
            "fade.mp4": self.fade,
            "static.mp4": self.static,
            "objects.mp4": self.objects,
            # A file per camera-motion label, named after it.
            f"{PAN_LEFT}.mp4": lambda: self.camera_pan(PAN_LEFT, (-v, 0)),
            f"{PAN_RIGHT}.mp4": lambda: self.camera_pan(PAN_RIGHT, (v, 0)),
            f"{TILT_UP}.mp4": lambda: self.camera_pan(TILT_UP, (0, -v)),
            f"{TILT_DOWN}.mp4": lambda: self.camera_pan(TILT_DOWN, (0, v)),
            f"{ZOOM_IN}.mp4": lambda: self.camera_zoom(ZOOM_IN, z),
            f"{ZOOM_OUT}.mp4": lambda: self.camera_zoom(ZOOM_OUT, 1 / z),
            "text.mp4": self.text,
        }


def _spans(lengths: list[int]) -> list[list[int]]:
    ends = np.cumsum(lengths).tolist()
    return [[e - n, e] for n, e in zip(lengths, ends, strict=True)]


def _write_bad_files(folder: Path, config: SynthConfig, rng: np.random.Generator) -> list[dict]:
    """Files curation must reject, each with the reason it must record."""
    frames, _ = _Catalogue(config).objects()
    entries = []

    def add(name: str, reason: str, detail: str) -> Path:
        entries.append({"file": name, "valid": False, "expected_rejection": reason, "detail": detail})
        return folder / name

    add("zero_byte.mp4", REJECT_EMPTY, "0 bytes").write_bytes(b"")
    add("random_bytes.mp4", REJECT_UNDECODABLE, "64 KiB of random bytes").write_bytes(rng.bytes(64 << 10))
    write_audio_only(add("audio_only.mp4", REJECT_NO_VIDEO, "one AAC stream, no video"))
    with tempfile.TemporaryDirectory() as tmp:
        # Index at the end (the muxer's default): cut in half, the file loses its index.
        whole = Path(tmp) / "whole.mp4"
        write_video(whole, frames, config.fps)
        data = whole.read_bytes()
        add("truncated_index_at_end.mp4", REJECT_UNDECODABLE, "index (moov) lost to truncation").write_bytes(
            data[: len(data) // 2]
        )
        # Faststart: the index is up front and still claims every frame, but half the
        # media data is gone; decoders stop early without an error.
        write_video(whole, frames, config.fps, faststart=True)
        data = whole.read_bytes()
        entry_path = add(
            "truncated_faststart.mp4", REJECT_TRUNCATED, f"header claims {len(frames)} frames; half the data is gone"
        )
        entry_path.write_bytes(data[: len(data) // 2])
        entries[-1]["header_frames"] = len(frames)
    return entries


def synthesize_local(folder: Path, config: SynthConfig, *, progress: bool = False) -> dict:
    """Write every sample video, the bad files and `manifest.json` into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    catalogue = _Catalogue(config)
    videos = []
    items = catalogue.valid_videos().items()
    for name, build in tqdm(items, desc="synthesise videos", unit="video", disable=not progress):
        frames, truth = build()
        write_video(folder / name, frames, config.fps)
        videos.append(
            {
                "file": name,
                "valid": True,
                "num_frames": len(frames),
                "fps": config.fps,
                "duration_s": round(len(frames) / config.fps, 6),
                "width": config.width,
                "height": config.height,
                "truth": truth,
            }
        )
    videos += _write_bad_files(folder, config, catalogue.rng)
    for entry in videos:
        entry["sha256"] = sha256_file(folder / entry["file"])
    manifest = {
        "generator": "vdm data synth",
        "version": GENERATOR_VERSION,
        "config": config.__dict__,
        "conventions": {
            "coordinates": "x right, y down, pixels; frame indices from 0",
            "cuts": "index of the first frame of each new shot",
            "spans": "shots, fades and black_frames are [start, end) frame ranges",
            "content_velocity_px_per_frame": "how image content moves; a camera panning right moves content left",
        },
        "videos": videos,
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return manifest


def synthesize(out: str, config: SynthConfig, *, store: ObjectStore | None = None, progress: bool = False) -> dict:
    """Synthesise into a local folder or an `s3://` prefix (published with its manifest last)."""
    if not is_s3_uri(out):
        return synthesize_local(Path(out), config, progress=progress)
    if store is None:
        raise ValueError("an ObjectStore is needed to write to s3://")
    tmp = Path(tempfile.mkdtemp(prefix="vdm-synth-"))
    try:
        manifest = synthesize_local(tmp, config, progress=progress)
        store.publish_folder(tmp, out, progress=progress)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
