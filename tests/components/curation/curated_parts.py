"""Annotated parts as curation's annotate step publishes them, for finalize tests: the
records, the rejected list, the part info and the clips' tar (a small rendition per clip,
an hq one where the record has it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import webdataset as wds

from components.common.media import video_bytes
from components.common.objectstore import S3Uri
from components.curation.annotate import CLIPS_FILE, CLIPS_TAR, PART_INFO, REJECTED_FILE
from model.records import HQ, ClipRecord


def mp4(width: int, height: int, frames: int = 6) -> bytes:
    rng = np.random.default_rng(width * height)
    return video_bytes(rng.integers(0, 255, (frames, height, width, 3), dtype=np.uint8), 24.0)


def publish_part(store, part: S3Uri, clips: list[ClipRecord], tmp: Path, small: bytes, hq: bytes) -> None:
    folder = tmp / part.key.replace("/", "_")
    folder.mkdir()
    (folder / CLIPS_FILE).write_text("".join(c.to_json() + "\n" for c in clips))
    (folder / REJECTED_FILE).write_text("")
    (folder / PART_INFO).write_text(json.dumps({"videos": sorted({c.video for c in clips}), "random_weights": False}))
    with wds.TarWriter(str(folder / CLIPS_TAR), mtime=0) as tar:
        for c in clips:
            if c.too_short:
                continue  # no video is stored for a clip too short to keep
            renditions = {"mp4": small, **({"hq.mp4": hq} if HQ in c.renditions else {})}
            tar.write({"__key__": c.key, "jpg": b"\xff\xd8", **renditions})
    store.publish_folder(folder, part)
