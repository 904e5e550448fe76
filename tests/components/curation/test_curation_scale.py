"""Curation at corpus scale, against the real local S3 server: the output is checked before any
work, inputs are listed and planned as a stream, a grown input annotates only its new videos, and
finalize routes renditions and near-duplicates while streaming parts."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from curated_parts import mp4, publish_part

from components.common.media import video_bytes
from components.common.objectstore import OutputNotWritableError, S3Uri
from components.curation.annotate import PART_INFO
from components.curation.config import CurationConfig, Filter, with_random_weights
from components.curation.curate import curate, iter_inputs, plan_input_shards, shard_inputs
from components.curation.finalize import finalize
from model.records import HQ, SMALL, ClipRecord, Rendition


def _vdm(*args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "vdm.cli", *args], capture_output=True, text=True, timeout=120, env=env or None
    )
    return result, time.perf_counter() - start


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_a_missing_bucket_stops_curate_and_train_at_once_until_store_mb_makes_it(stack, store, tmp_path):
    bucket = f"newbucket-{random.getrandbits(32):08x}"
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.mp4").write_bytes(b"never decoded")
    curate_args = ["curate", "--input", str(tmp_path / "raw"), "--output", f"s3://{bucket}/x"]
    refused, seconds = _vdm(*curate_args)
    line = _one_error_line(refused)
    assert f"bucket '{bucket}' does not exist" in line and f"`vdm store mb s3://{bucket}`" in line, line
    assert seconds < 5, seconds  # the process's whole life; the check itself is a few requests
    print(f"vdm curate to a missing bucket: exit 1 after {seconds:.2f} s")

    train, seconds = _vdm("train", "--stage", "video", "--data", "s3://vdm/none", "--output", f"s3://{bucket}/run")
    assert f"`vdm store mb s3://{bucket}`" in _one_error_line(train) and seconds < 5, seconds
    print(f"vdm train to a missing bucket: exit 1 after {seconds:.2f} s")

    denied, _ = _vdm(*curate_args, **(os.environ | {"AWS_ACCESS_KEY_ID": "wrong-key"}))
    assert "denied access key 'wrong-key'" in _one_error_line(denied)

    made, _ = _vdm("store", "mb", f"s3://{bucket}")
    assert made.returncode == 0 and made.stdout.strip() == f"made bucket s3://{bucket}", made.stderr
    again, _ = _vdm("store", "mb", f"s3://{bucket}")
    assert again.returncode == 0 and again.stdout.strip() == f"bucket s3://{bucket} exists already"
    store.check_writable(f"s3://{bucket}/x")
    assert list(store.list(f"s3://{bucket}/")) == []  # the probe is gone
    with pytest.raises(OutputNotWritableError, match="vdm store mb s3://no-such-"):
        store.check_writable("s3://no-such-bucket-for-e3/x")


def _with_output(config: CurationConfig, **fields) -> CurationConfig:
    return config.model_copy(update={"output": config.output.model_copy(update=fields)})


def _put_many(store, uris_and_sizes: list[tuple[str, int]]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda item: store.put_bytes(item[0], b"\0" * item[1]), uris_and_sizes))


def test_listing_and_planning_stream_and_cover_every_object_once(stack, store, prefix):
    """2,000 objects (two listing pages), a few large ones; a published part holding some of them."""
    sizes = {f"{prefix}/raw/v{i:05d}.mp4": (600 if i % 500 in (7, 8) else 0) for i in range(2000)}
    _put_many(store, list(sizes.items()) + [(f"{prefix}/raw/manifest.json", 10)])
    pulled = 0

    def counted():
        nonlocal pulled
        for item in iter_inputs(f"{prefix}/raw/", store):
            pulled += 1
            yield item

    shards = shard_inputs(counted(), max_videos=64, max_bytes=1000)
    first = next(shards)
    # manifest.json (an input too: curation rejects it as not_a_video), v00000-v00007 (600 bytes);
    # v00008 would pass 1000 bytes: closed.
    assert first.files == 9 and pulled == 10
    plan = [first, *shards]
    listed = [v for s in plan for v in s.videos]
    expected = sorted([*sizes, f"{prefix}/raw/manifest.json"])
    assert listed == expected and len(set(listed)) == 2001  # every object once, in key order
    assert all(s.files <= 64 and (s.bytes <= 1000 or s.files == 1) for s in plan)
    assert sum(s.bytes for s in plan) == sum(sizes.values()) + 10

    # A part published by an earlier run: its videos are not planned again, the part is done;
    # a part whose video is gone from the input is replaced by a part of its remaining video.
    out = S3Uri.parse(f"{prefix}/out")
    done, gone = sorted(sizes)[100:110], [sorted(sizes)[500], f"{prefix}/raw/deleted.mp4"]
    for part_id, videos in (("shard-done", done), ("shard-gone", gone)):
        store.put_bytes(out.join("parts", part_id, PART_INFO), json.dumps({"videos": videos}).encode())
        store.put_bytes(out.join("parts", part_id, "_MANIFEST.json"), b"{}")
    config = _with_output(CurationConfig(), videos_per_input_shard=64)
    plan = list(plan_input_shards(f"{prefix}/raw/", out, config, store))
    published = [s for s in plan if s.published]
    assert [(s.id, s.files) for s in published] == [("shard-done", 10)]
    new = [v for s in plan for v in s.videos]
    assert sorted(new) == sorted({*sizes, f"{prefix}/raw/manifest.json"} - set(done)) and len(new) == 1991
    assert plan[-2].videos == (sorted(sizes)[500],)  # the remaining video of the broken part, planned anew


def _clip(key: str, video: str, aesthetic: float, phash: tuple[str, ...], source: tuple[int, int], hq: bool):
    renditions = {SMALL: Rendition(width=64, height=36)}
    if hq:
        renditions[HQ] = Rendition(width=source[0], height=source[1])
    return ClipRecord(
        key=key,
        video=video,
        start_frame=0,
        end_frame=6,
        start_s=0.0,
        end_s=0.25,
        fps=24.0,
        num_frames=6,
        source_size=source,
        camera_motion="static",
        scores={"motion": 1.0, "text_ratio": 0.0, "aesthetic": aesthetic, "clip_sim": 0.0},
        renditions=renditions,
        phash=phash,
    )


def _publish_part(store, part: S3Uri, clips: list[ClipRecord], tmp: Path) -> None:
    publish_part(store, part, clips, tmp, mp4(64, 36), mp4(96, 54))


def test_finalize_routes_renditions_drops_near_duplicates_and_counts_resolutions(stack, store, prefix, tmp_path):
    base = S3Uri.parse(prefix)
    ph = ("0f0f0f0f0f0f0f0f", "00ff00ff00ff00ff", "ffff0000ffff0000")
    other = ("123456789abcdef0", "0fedcba987654321", "aaaaaaaa55555555")
    # Two parts given in reverse order; part b's first clip is a copy of a clip in part a (lower quality).
    part_a = [
        _clip("a-0", "s3://raw/a.mp4", 5.0, ph, (1920, 1080), hq=True),
        _clip("a-1", "s3://raw/a.mp4", 4.0, other, (1920, 1080), hq=True),
    ]
    part_b = [
        _clip("b-0", "s3://raw/b.mp4", 3.0, ph, (640, 480), hq=True),
        _clip("b-1", "s3://raw/b.mp4", 6.0, None, (640, 480), hq=False),
        _clip("b-2", "s3://raw/b.mp4", 7.0, None, (3840, 2160), hq=True),
    ]
    _publish_part(store, base.join("parts", "a"), part_a, tmp_path)
    _publish_part(store, base.join("parts", "b"), part_b, tmp_path)
    config = CurationConfig(filters=(Filter(score="motion", min=0.5),))
    config = _with_output(config, clips_per_shard=2, heldout_fraction=0)
    out = base.join("out")
    card = finalize([base.join("parts", "b"), base.join("parts", "a")], out, config, store, input_location="s3://raw")

    rows = {r["key"]: r for r in map(json.loads, store.get_bytes(out.join("manifest.jsonl")).decode().splitlines())}
    assert list(rows) == sorted(rows)
    assert rows["b-0"]["drop_reasons"] == ["duplicate"] and rows["b-0"]["duplicate_of"] == "a-0"
    kept = [k for k, r in rows.items() if r["kept"]]
    assert kept == ["a-0", "a-1", "b-1", "b-2"] and card["drops_per_filter"]["duplicate"] == 1
    # Parts in the order of their videos: a's clips fill shard 0, b's shard 1, in both renditions.
    expected = {"a-0": 0, "a-1": 0, "b-1": 1, "b-2": 1}
    for key, shard in expected.items():
        assert rows[key]["shard"] == f"{out}/shards/shard-{shard:06d}.tar"
        if HQ in rows[key]["renditions"]:
            assert rows[key]["renditions"]["hq"]["shard"] == f"{out}/shards-hq/shard-{shard:06d}.tar"
    for folder, keys in (("shards", ["a-0", "a-1", "b-1", "b-2"]), ("shards-hq", ["a-0", "a-1", "b-2"])):
        found = {}
        for index in (0, 1):
            data = store.get_bytes(out.join(folder, f"shard-{index:06d}.tar"))
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    assert ext in ("mp4", "json")
                    if ext == "json":
                        assert json.loads(tar.extractfile(member).read()) == rows[key]
                    found[key] = index
        assert found == {k: expected[k] for k in keys}
    assert store.get_bytes(out.join("shards-hq", "shard-000000.tar"))  # an HQ sample is stored as <key>.mp4
    assert card["resolutions"] == {
        "source": {"480p": 1, "1080p": 2, ">1080p": 1},
        "renditions": {"hq": {"1080p": 2, ">1080p": 1}, "small": {"<=360p": 4}},
    }
    assert card["renditions"]["hq"]["train"] == f"{out}/shards-hq/"
    page = store.get_bytes(out.join("dataset_card.html")).decode()
    assert "<td>&gt;1080p</td><td>1</td><td>1</td><td>0</td>" in page and f"<td>{out}/shards-hq/</td>" in page
    manifest = store.read_manifest(out)
    assert {"shards/shard-000001.tar", "shards-hq/shard-000001.tar", "manifest.jsonl"} <= {
        e["path"] for e in manifest["files"]
    }


def _videos(folder: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        frames = np.full((36, 48, 64, 3), 40 + 20 * i, dtype=np.uint8)
        for t in range(len(frames)):
            frames[t, 10:30, t : t + 8] = 255  # a moving bar: one shot with motion
        (folder / name).write_bytes(video_bytes(frames, 24.0))


def test_a_grown_input_annotates_only_its_new_videos(stack, store, prefix, tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    _videos(folder, ["c1.mp4", "c3.mp4", "c7.mp4", "c9.mp4"])
    config = with_random_weights(CurationConfig(filters=()))
    config = _with_output(config, videos_per_input_shard=2).model_copy(
        update={"neural": dataclasses.replace(config.neural, captions=False)}
    )
    first = curate(str(folder), f"{prefix}/out", config, store, workers=1)
    assert (first.input_shards, first.skipped_shards, first.inputs) == (2, 0, 4)
    _videos(folder, ["a0.mp4", "c5.mp4"])  # before every name, and between two
    second = curate(str(folder), f"{prefix}/out", config, store, workers=1)
    assert (second.input_shards, second.skipped_shards, second.inputs) == (3, 2, 6)
    (annotated,) = second.parts
    info = json.loads(store.get_bytes(S3Uri.parse(annotated["part"]).join(PART_INFO)))
    assert [Path(v).name for v in info["videos"]] == ["a0.mp4", "c5.mp4"]
    rows = [json.loads(line) for line in store.get_bytes(f"{prefix}/out/manifest.jsonl").decode().splitlines()]
    assert sorted({Path(r["video"]).name for r in rows}) == ["a0.mp4", "c1.mp4", "c3.mp4", "c5.mp4", "c7.mp4", "c9.mp4"]
    assert second.card["input_files"] == 6 and len(second.card["parts"]) == 3
