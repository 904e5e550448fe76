"""Curation on synthetic videos with known truth, against the real local S3 server."""

from __future__ import annotations

import base64
import hashlib
import html as html_lib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import av
import mlflow
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from components.common.media import write_video
from components.common.objectstore import S3Uri
from components.common.tracking import config_hash, connect
from components.curation.annotate import (
    SCRATCH_PREFIXES,
    WORKER_DIED,
    remove_stale_scratch,
    run_videos,
    worker_config,
)
from components.curation.config import CurationConfig, Decode, Filter, Limits
from components.curation.curate import iter_inputs
from components.curation.finalize import (
    EMPTY_HELDOUT,
    apply_filters,
    dataset_digest,
    finalize,
    heldout_split,
    thresholds,
)
from components.sample_data.synth import SynthConfig, synthesize_local
from model.records import ClipRecord


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raw")
    manifest = synthesize_local(folder, SynthConfig(seed=5))
    return folder, {v["file"]: v for v in manifest["videos"]}


@pytest.fixture(scope="module")
def processed(samples):
    """Every sample through decode, cuts and flow (no neural annotators)."""
    folder, videos = samples
    names = sorted(videos)
    results = run_videos([str(folder / n) for n in names], CurationConfig(), workers=2)
    return dict(zip(names, results, strict=True))


def test_pooled_workers_decode_on_one_thread_each_unless_told_otherwise():
    default = CurationConfig()
    assert worker_config(default, 1) is default  # one worker: its own decoding thread, FFmpeg's threads
    pooled = worker_config(default, 4)
    assert (pooled.decode.threads, pooled.decode.read_ahead) == (1, False)
    assert pooled.model_copy(update={"decode": default.decode}) == default  # nothing else
    chosen = worker_config(CurationConfig(decode=Decode(threads=3)), 4)
    assert (chosen.decode.threads, chosen.decode.read_ahead) == (3, False)


def _bounds(result) -> list[tuple[int, int]]:
    return [(c.start_frame, c.end_frame) for c in result.clips]


def test_hard_cuts_found_within_two_frames(processed, samples):
    _, videos = samples
    truth = videos["cuts.mp4"]["truth"]["cuts"]
    starts = [s for s, _ in _bounds(processed["cuts.mp4"])][1:]
    assert len(starts) == len(truth)
    assert all(abs(s - t) <= 2 for s, t in zip(starts, truth, strict=True)), (starts, truth)


def test_fade_splits_the_video_and_black_is_dropped(processed, samples):
    _, videos = samples
    truth = videos["fade.mp4"]["truth"]
    bounds = _bounds(processed["fade.mp4"])
    assert len(bounds) == 2
    black_start, black_end = truth["black_frames"]
    (a_start, a_end), (b_start, b_end) = bounds
    assert a_start == 0 and a_end <= black_start + 1
    assert b_start >= black_end - 1 and b_end == videos["fade.mp4"]["num_frames"]
    # The fade-out ramp stays in the first clip, down to the dark frames.
    assert a_end >= truth["fades"][0]["start_frame"] + 2


@pytest.mark.parametrize("name", ["objects.mp4", "static.mp4", "pan_left.mp4", "zoom_in.mp4", "text.mp4"])
def test_single_shot_videos_are_one_clip(processed, samples, name):
    _, videos = samples
    assert _bounds(processed[name]) == [(0, videos[name]["num_frames"])]


@pytest.mark.parametrize(
    "name",
    ["static.mp4", "pan_left.mp4", "pan_right.mp4", "tilt_up.mp4", "tilt_down.mp4", "zoom_in.mp4", "zoom_out.mp4"],
)
def test_camera_motion_labels(processed, samples, name):
    _, videos = samples
    (clip,) = processed[name].clips
    assert clip.camera_motion == videos[name]["truth"]["camera_motion"]


def test_motion_scores_order_static_objects_pans(processed, samples):
    _, videos = samples
    score = {n: processed[n].clips[0].scores["motion"] for n in ("static.mp4", "objects.mp4", "pan_left.mp4")}
    assert score["static.mp4"] < 0.01 < score["objects.mp4"] < score["pan_left.mp4"]
    # A pan of v px/frame at the decode height, seen at the flow height.
    expected = abs(videos["pan_left.mp4"]["truth"]["content_velocity_px_per_frame"][0]) * 128 / 180
    assert score["pan_left.mp4"] == pytest.approx(expected, rel=0.1)
    assert processed["objects.mp4"].clips[0].camera_motion == "static"  # objects move, the camera does not


def test_every_bad_file_is_rejected_with_its_reason(processed, samples):
    _, videos = samples
    for name, entry in videos.items():
        result = processed[name]
        if entry["valid"]:
            assert result.rejected is None and result.clips, name
        else:
            assert result.rejected["reason"] == entry["expected_rejection"], (name, result.rejected)
            assert result.rejected["detail"] and not result.clips


def test_configured_limits_reject_with_reasons(samples):
    folder, _ = samples
    path = str(folder / "static.mp4")
    cases = {
        "resolution_over_limit": Limits(max_width=100),
        "duration_over_limit": Limits(max_duration_s=1.0),
        "unsupported_codec": Limits(codecs=("vp9",)),
    }
    for reason, limits in cases.items():
        (result,) = run_videos([path], CurationConfig(limits=limits), workers=1)
        assert result.rejected["reason"] == reason


def _record(i: int, too_short: bool, motion: float, text_ratio: float) -> ClipRecord:
    return ClipRecord(
        key=f"clip-{i:04d}",
        video="v.mp4",
        start_frame=0,
        end_frame=48,
        start_s=0.0,
        end_s=2.0,
        fps=24.0,
        too_short=too_short,
        camera_motion="static",
        scores={"motion": motion, "text_ratio": text_ratio},
    )


def test_percentile_and_absolute_filters():
    clips = [_record(i, False, float(i), i / 100) for i in range(100)]
    clips.append(_record(100, True, 1000.0, 0.0))
    filters = (Filter(score="motion", drop_lowest_percent=25), Filter(score="text_ratio", max=0.9))
    bounds = thresholds(clips, filters)
    assert bounds["motion:drop_lowest_percent=25.0"]["min"] == pytest.approx(24.75)
    apply_filters(clips, bounds)
    assert sum(c.kept for c in clips) == 100 - 25 - 9
    assert clips[-1].drop_reasons == ["too_short"]
    assert clips[95].drop_reasons == ["text_ratio:max=0.9"]
    with pytest.raises(ValueError, match="exactly one"):
        Filter(score="motion", min=1, max=2)


def _vdm(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdm.cli", *args], capture_output=True, text=True, **kwargs)


def _manifest(store, prefix: str) -> list[dict]:
    rows = [json.loads(line) for line in store.get_bytes(f"{prefix}/manifest.jsonl").decode().splitlines()]
    for row in rows:  # shard URIs name the output prefix; compare the rest
        row["shard"] = row.get("shard", "").rsplit("/", 1)[-1]
        for rendition in (row.get("renditions") or {}).values():
            rendition["shard"] = rendition.get("shard", "").rsplit("/", 1)[-1]
    return rows


@pytest.fixture(scope="module")
def curated(stack, store, samples, tmp_path_factory):
    folder, videos = samples
    config = tmp_path_factory.mktemp("cfg") / "curation.yaml"
    # A tenth of the videos held out: cuts.mp4, fade.mp4 and pan_right.mp4 by their names' hashes.
    config.write_text("output:\n  videos_per_input_shard: 4\n  clips_per_shard: 4\n  heldout_fraction: 0.1\n")
    prefix = f"s3://{stack.settings.data_bucket}/curated-{os.getpid()}"
    result = _vdm(
        "curate",
        "--input",
        str(folder),
        "--output",
        f"{prefix}/a",
        "--config",
        str(config),
        "--allow-random-weights",
        "--workers",
        "2",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return prefix, config, result.stdout


def test_curate_publishes_the_documented_outputs(curated, store, samples):
    prefix, _, stdout = curated
    _, videos = samples
    out = f"{prefix}/a"
    assert "vdm curate: done (17 files, 5 input shards, 0 already done)" in stdout
    rows = _manifest(store, out)
    required = {
        "video",
        "start_frame",
        "end_frame",
        "start_s",
        "end_s",
        "fps",
        "kept",
        "drop_reasons",
        "scores",
        "camera_motion",
        "caption",
    }
    assert all(required <= row.keys() for row in rows)
    assert all({"motion", "text_ratio", "aesthetic", "clip_sim"} <= row["scores"].keys() for row in rows)
    # Every row is a clip record, written back byte for byte.
    for line in store.get_bytes(f"{out}/manifest.jsonl").decode().splitlines():
        assert ClipRecord.from_json(line).to_json() == line
    rejected = [json.loads(x) for x in store.get_bytes(f"{out}/rejected.jsonl").decode().splitlines()]
    # Every listed file is in the manifest or here, the samples' truth file (JSON) too.
    assert {Path(r["video"]).name: r["reason"] for r in rejected} == {
        n: v["expected_rejection"] for n, v in videos.items() if not v["valid"]
    } | {"manifest.json": "not_a_video"}
    card = json.loads(store.get_bytes(f"{out}/dataset_card.json"))
    assert card["random_weights"] is True
    # CoCa alone ran; the card counts the kept clips it captioned.
    assert list(card["captioners"]) == ["image"]
    captioned = sum(1 for r in rows if r["kept"] and (r.get("captions") or {}).get("image"))
    assert card["captioners"]["image"]["clips"] == captioned > 0
    assert card["clips_before_filter"] == sum(1 for r in rows if "too_short" not in r["drop_reasons"])
    assert card["clips_after_filter"] == sum(r["kept"] for r in rows)
    kept_hours = sum(r["end_s"] - r["start_s"] for r in rows if r["kept"]) / 3600
    assert card["hours_after_filter"] == pytest.approx(kept_hours, abs=1e-6)
    for key in ("hours_before_filter", "mean_clip_seconds", "mean_caption_words", "thresholds", "drops_per_filter"):
        assert key in card
    html = store.get_bytes(f"{out}/dataset_card.html").decode()
    # A histogram per score (kept and dropped), and one per subset score (the subsets side by side).
    assert "RANDOM WEIGHTS" in html and html.count("data:image/png;base64") == 4 + 4

    # The held-out split: whole source videos, chosen by their path under the input, never trained on.
    folder, _ = samples
    splits: dict[str, set[str]] = {}
    for row in rows:
        splits.setdefault(row["video"], set()).add(row["split"])
    assert all(len(s) == 1 for s in splits.values())  # a video's clips never straddle splits
    heldout_videos = {Path(v).name for v, s in splits.items() if s == {"heldout"}}
    assert heldout_videos == {"cuts.mp4", "fade.mp4", "pan_right.mp4"}
    assert all(heldout_split(v, str(folder), 0.1) == s.pop() for v, s in splits.items())
    kept_heldout = [r for r in rows if r["kept"] and r["split"] == "heldout"]
    assert kept_heldout and all(r["shard"].startswith("shard-") for r in kept_heldout)
    for split in ("train", "heldout"):
        kept = [r for r in rows if r["kept"] and r["split"] == split]
        figures = card["splits"][split]
        assert figures["clips"] == len(kept) and figures["videos"] == len({r["video"] for r in kept})
        assert figures["hours"] == pytest.approx(sum(r["end_s"] - r["start_s"] for r in kept) / 3600, abs=1e-6)
    assert card["warnings"] == []
    # The evaluation prompt set: exactly the held-out kept clips' captions, sorted by key.
    prompts = [json.loads(line) for line in store.get_bytes(f"{out}/heldout/prompts.jsonl").decode().splitlines()]
    expected = [{"prompt": r["caption"], "key": r["key"]} for r in kept_heldout if r.get("caption", "").strip()]
    assert prompts == sorted(expected, key=lambda p: p["key"]) and prompts
    assert card["heldout"] == {
        "fraction": 0.1,
        "shards": f"{out}/heldout/",
        "prompt_set": f"{out}/heldout/prompts.jsonl",
        "prompts": len(prompts),
        "prompt_set_digest": hashlib.sha256(store.get_bytes(f"{out}/heldout/prompts.jsonl")).hexdigest()[:16],
    }
    assert f"heldout_shards    {out}/heldout/" in stdout
    assert f"prompt_set        {out}/heldout/prompts.jsonl ({len(prompts)} prompts)" in stdout
    assert f"heldout {len(kept_heldout)} clips" in stdout and "warning:" not in stdout


def _cells(*values) -> str:
    return "".join(f"<td>{html_lib.escape(str(v))}</td>" for v in values)


def test_dataset_card_shows_provenance_filters_camera_motion_and_playing_clips(curated, store, samples):
    prefix, _, _ = curated
    folder, videos = samples
    out = f"{prefix}/a"
    rows = _manifest(store, out)
    card = json.loads(store.get_bytes(f"{out}/dataset_card.json"))
    page = store.get_bytes(f"{out}/dataset_card.html").decode()

    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    provenance = card["provenance"]
    assert provenance["input"] == str(folder) and provenance["output"] == out
    assert provenance["config_hash"] == config_hash(card["config"])
    assert provenance["code_version"] == (head or "unknown")
    created = datetime.fromisoformat(provenance["created_utc"])
    assert abs((datetime.now(UTC) - created).total_seconds()) < 3600
    assert card["input_files"] == len(videos) + 1  # and the truth file
    # The digest names the exact manifest, shards of both splits in both renditions and prompt set.
    listing = [("manifest.jsonl", store.get_bytes(f"{out}/manifest.jsonl"))] + [
        ("/".join(o.uri.key.rsplit("/", 2)[1:]), store.get_bytes(o.uri))
        for folder_name in ("shards", "heldout", "shards-hq", "heldout-hq")
        for o in store.list(f"{out}/{folder_name}/")
    ]
    assert {name for name, _ in listing} >= {
        "heldout/prompts.jsonl",
        "heldout/shard-000000.tar",
        "shards-hq/shard-000000.tar",
        "heldout-hq/shard-000000.tar",
    }
    expected = "".join(f"{name} {hashlib.sha256(data).hexdigest()}\n" for name, data in sorted(listing))
    assert card["digest"] == hashlib.sha256(expected.encode()).hexdigest()[:16]

    candidates = [r for r in rows if "too_short" not in r["drop_reasons"]]
    assert card["camera_motion_before_filter"] == dict(Counter(r["camera_motion"] for r in candidates))
    assert card["camera_motion_kept"] == dict(Counter(r["camera_motion"] for r in rows if r["kept"]))
    filters = [Filter(**f).name for f in card["config"]["filters"]]  # in the config's order, as the page shows them
    assert sorted(filters) == sorted(card["thresholds"])
    for i, a in enumerate(filters):
        for b in filters[i + 1 :]:
            both = sum(a in r["drop_reasons"] and b in r["drop_reasons"] for r in rows)
            assert card["drop_overlaps"][f"{a}&{b}"] == both
    assert sum(card["drop_overlaps"].values()) > 0  # the matrix below shows something

    # The page shows the same figures.
    assert _cells("input", folder) in page and _cells("code version (git commit)", head or "unknown") in page
    assert _cells("digest (manifest, shards of both splits and renditions, prompts)", card["digest"]) in page
    for split, figures in card["splits"].items():
        assert _cells(split, figures["videos"], figures["clips"], f"{figures['hours']:.4f}") in page
    assert _cells("held-out shards", card["heldout"]["shards"]) in page
    assert _cells("evaluation prompt set", card["heldout"]["prompt_set"]) in page
    assert _cells("prompts", card["heldout"]["prompts"]) in page and "class='warn'>evaluation" not in page
    for name, bound in card["thresholds"].items():
        side = "min" if "min" in bound else "max"
        assert _cells(name, bound["score"], side, f"{bound[side]:.4g}") in page
    for reason, count in card["drops_per_filter"].items():
        assert _cells(reason, count) in page
    for reason, count in card["rejected_per_reason"].items():
        assert _cells(reason, count) in page
    assert (
        sum(card["rejected_per_reason"].values())
        == card["rejected_files"]
        == len([v for v in videos.values() if not v["valid"]]) + 1  # and the samples' truth file
    )
    for motion, count in card["camera_motion_before_filter"].items():
        assert _cells(motion, count, card["camera_motion_kept"].get(motion, 0)) in page
    first, second = filters[0], filters[1]
    overlap_row = [card["drops_per_filter"][first], card["drop_overlaps"][f"{first}&{second}"]]
    assert _cells(first, *overlap_row) in page

    # Clips play: a looping animated WebP for every shown clip that has a video.
    kept_shown = min(8, sum(r["kept"] for r in rows))
    dropped_shown = min(8, sum(not r["kept"] and "too_short" not in r["drop_reasons"] for r in rows))
    previews = re.findall(r"data:image/webp;base64,([A-Za-z0-9+/=]+)", page)
    assert len(previews) == kept_shown + dropped_shown > 0
    with Image.open(io.BytesIO(base64.b64decode(previews[0]))) as preview:
        assert preview.is_animated and preview.n_frames > 4 and max(preview.size) <= 160
    assert len(page) < 3_000_000


def test_curation_is_an_mlflow_run_with_its_card(curated, store, settings):
    prefix, _, stdout = curated
    out = f"{prefix}/a"
    connect(settings)
    url = re.search(r"mlflow_run\s+(\S+)", stdout).group(1)
    run = mlflow.get_run(url.rsplit("/", 1)[1])
    card = json.loads(store.get_bytes(f"{out}/dataset_card.json"))
    client = mlflow.MlflowClient()
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "vdm-curation" and url.startswith(settings.mlflow_tracking_uri)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert params["output.videos_per_input_shard"] == "4" and params["output.clips_per_shard"] == "4"
    assert json.loads(params["filters"]) == card["config"]["filters"]
    for name, bound in card["thresholds"].items():
        value = bound.get("min", bound.get("max"))
        assert float(params["threshold." + name.replace("=", "_")]) == pytest.approx(value)
    assert params["random_weights"] == "True"

    metrics = run.data.metrics
    for key in ("input_files", "clips_before_filter", "clips_after_filter", "hours_after_filter", "rejected_files"):
        assert metrics[key] == pytest.approx(card[key])
    assert metrics["input_files"] == 17
    for reason, count in card["drops_per_filter"].items():
        assert metrics["dropped." + reason.replace("=", "_")] == count
    for reason, count in card["rejected_per_reason"].items():
        assert metrics[f"rejected.{reason}"] == count
    for motion, count in card["camera_motion_kept"].items():
        assert metrics[f"camera_motion_kept.{motion}"] == count
    for split in ("train", "heldout"):
        assert metrics[f"clips_{split}"] == card["splits"][split]["clips"] > 0
        assert metrics[f"hours_{split}"] == pytest.approx(card["splits"][split]["hours"])
    assert metrics["prompts"] == card["heldout"]["prompts"]

    tags = run.data.tags
    assert tags["vdm.manifest"] == f"{out}/manifest.jsonl" and tags["vdm.rejected"] == f"{out}/rejected.jsonl"
    assert tags["vdm.shards"] == f"{out}/shards/" and tags["vdm.dataset_card"] == f"{out}/dataset_card.html"
    assert tags["vdm.dataset_digest"] == card["digest"] and tags["vdm.output"] == out
    assert tags["vdm.heldout_shards"] == f"{out}/heldout/"
    assert tags["vdm.prompt_set"] == f"{out}/heldout/prompts.jsonl"
    assert json.loads(tags["vdm.inputs"]) == [card["provenance"]["input"]]

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"dataset_card.html", "dataset_card.json", "config.json"} <= artifacts
    logged = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/dataset_card.json"))
    assert logged == card
    assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/dataset_card.html") == (
        store.get_bytes(f"{out}/dataset_card.html").decode()
    )


def test_text_clip_gets_a_high_text_ratio_with_real_ocr(curated, store):
    prefix, _, _ = curated
    ratios = {Path(r["video"]).name: r["scores"]["text_ratio"] for r in _manifest(store, f"{prefix}/a")}
    assert ratios["text.mp4"] > 0.05
    assert max(v for k, v in ratios.items() if k != "text.mp4") < 0.005


@pytest.mark.parametrize(("split", "folder"), [("train", "shards"), ("heldout", "heldout")])
def test_shards_decode_to_the_clips_they_describe(curated, store, tmp_path, split, folder):
    prefix, _, _ = curated
    rows = {r["key"]: r for r in _manifest(store, f"{prefix}/a") if r["kept"] and r["split"] == split}
    shard_uris = [str(o.uri) for o in store.list(f"{prefix}/a/{folder}/") if o.uri.key.endswith(".tar")]
    assert len(shard_uris) == -(-len(rows) // 4) > 0
    seen = set()
    for uri in shard_uris:
        local = store.download_file(uri, tmp_path / S3Uri.parse(uri).key.rsplit("/", 1)[1])
        for sample in wds.WebDataset(str(local), shardshuffle=False):
            meta = json.loads(sample["json"])
            row = json.loads(sample["json"])  # as `_manifest` lists it: each rendition's shard by its name
            for rendition in (row.get("renditions") or {}).values():
                rendition["shard"] = rendition["shard"].rsplit("/", 1)[-1]
            assert row == rows[meta["key"]] | {"shard": meta["shard"]}  # the manifest row, as the loader reads it
            assert meta["shard"] == uri and meta["split"] == split
            record = ClipRecord.from_json(sample["json"])
            assert record.to_dict() == meta and record.too_short is None
            with av.open(io.BytesIO(sample["mp4"])) as container:
                frames = sum(1 for _ in container.decode(video=0))
            small = (record.renditions or {}).get("small")
            if small is not None and small.remuxed:
                # A copy starts at the key frame before the clip and may end with the few frames
                # its last frames reference (B-frames); the loader reads [first_frame, first_frame + frames).
                assert small.first_frame + record.frames <= frames <= small.first_frame + record.frames + 4
            else:
                assert frames == record.frames
            assert record.kept and sample["__key__"] == record.key
            seen.add(record.key)
    assert seen == set(rows)


def test_a_videos_split_survives_a_growing_corpus_and_no_heldout_fraction_warns(curated, store, samples):
    """Finalize again over the same annotated parts (no re-annotation): one input shard fewer, then
    the whole corpus with heldout_fraction 0."""
    prefix, config_path, _ = curated
    folder, _ = samples
    config = CurationConfig.load(config_path)
    parts = [S3Uri.parse(p) for p in json.loads(store.get_bytes(f"{prefix}/a/dataset_card.json"))["parts"]]
    finalize(parts[:-1], S3Uri.parse(f"{prefix}/smaller"), config, store, input_location=str(folder))
    split_of = {r["video"]: r["split"] for r in _manifest(store, f"{prefix}/a")}
    smaller = {r["video"]: r["split"] for r in _manifest(store, f"{prefix}/smaller")}
    assert len(smaller) < len(split_of) and "heldout" in smaller.values()
    assert smaller == {video: split_of[video] for video in smaller}

    config = config.model_copy(update={"output": config.output.model_copy(update={"heldout_fraction": 0.0})})
    card = finalize(parts, S3Uri.parse(f"{prefix}/none"), config, store, input_location=str(folder))
    assert card["splits"]["heldout"] == {"videos": 0, "clips": 0, "hours": 0.0} and card["heldout"]["prompts"] == 0
    assert card["splits"]["train"]["clips"] == card["clips_after_filter"]
    assert card["warnings"] == [EMPTY_HELDOUT] == ["evaluation has no held-out clips: raise heldout_fraction"]
    page = store.get_bytes(f"{prefix}/none/dataset_card.html").decode()
    assert f"<p class='warn'>{EMPTY_HELDOUT}</p>" in page
    assert store.get_bytes(f"{prefix}/none/heldout/prompts.jsonl") == b""
    assert not [o for o in store.list(f"{prefix}/none/heldout/") if o.uri.key.endswith(".tar")]
    assert all(r["split"] == "train" for r in _manifest(store, f"{prefix}/none"))


def test_the_digest_covers_the_heldout_shards_renditions_and_prompts(tmp_path):
    for name, content in [
        ("manifest.jsonl", "{}\n"),
        ("shards/shard-000000.tar", "train"),
        ("heldout/shard-000000.tar", "heldout"),
        ("heldout/prompts.jsonl", '{"key": "a", "prompt": "a dog"}\n'),
    ]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(content)
    digests = [dataset_digest(tmp_path)]
    (tmp_path / "heldout/shard-000000.tar").write_text("other held-out clips")
    digests.append(dataset_digest(tmp_path))
    (tmp_path / "heldout/prompts.jsonl").write_text('{"key": "a", "prompt": "a cat"}\n')
    digests.append(dataset_digest(tmp_path))
    (tmp_path / "heldout/shard-000001.tar").write_text("one more")
    digests.append(dataset_digest(tmp_path))
    (tmp_path / "shards-hq").mkdir()
    (tmp_path / "shards-hq/shard-000000.tar").write_text("the same clips at full resolution")
    digests.append(dataset_digest(tmp_path))
    assert len(set(digests)) == 5 and all(len(d) == 16 for d in digests)


def test_training_refuses_the_heldout_split_in_one_line(curated, store):
    from click.testing import CliRunner

    from vdm.cli import main

    prefix, _, _ = curated
    data = f"{prefix}/a/heldout/"
    result = CliRunner().invoke(main, ["train", "--stage", "video", "--data", data, "--output", f"{prefix}/trained"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.stderr.strip().splitlines() == [
        f"error: {data} is the held-out split of a curated output, which training never reads (evaluation compares "
        f"generated videos with it): train on {prefix}/a/shards/"
    ]
    assert not list(store.list(f"{prefix}/trained/"))


def test_second_run_is_a_no_op(curated, store):
    prefix, config, _ = curated
    before = store.get_bytes(f"{prefix}/a/manifest.jsonl")
    result = _vdm(
        "curate",
        "--input",
        "unused",
        "--output",
        f"{prefix}/a",
        "--config",
        str(config),
        "--allow-random-weights",
        timeout=600,
    )
    assert result.returncode != 0  # a wrong input is an error, not an empty dataset
    folder_result = _vdm(
        "curate",
        "--input",
        str(Path(json.loads(store.get_bytes(f"{prefix}/a/dataset_card.json"))["parts"][0]).parent),
        "--output",
        f"{prefix}/a",
        timeout=60,
    )
    assert folder_result.returncode != 0
    assert store.get_bytes(f"{prefix}/a/manifest.jsonl") == before


def test_rerun_skips_done_shards_and_a_killed_run_resumes_to_the_same_manifest(curated, store, samples):
    prefix, config, _ = curated
    folder, _ = samples
    args = ["curate", "--input", str(folder), "--config", str(config), "--allow-random-weights", "--workers", "2"]
    again = _vdm(*args, "--output", f"{prefix}/a", timeout=600)
    assert again.returncode == 0 and "5 already done" in again.stdout
    assert _manifest(store, f"{prefix}/a") == _manifest(store, f"{prefix}/a")

    out = f"{prefix}/b"
    process = subprocess.Popen(
        [sys.executable, "-m", "vdm.cli", *args, "--output", out],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def scratch() -> list[Path]:
        return [f for kind in SCRATCH_PREFIXES for f in Path(tempfile.gettempdir()).glob(f"{kind}{process.pid}-*")]

    # Killed once a part is published and the next shard's pool is at work.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (
        any(o.uri.key.endswith("_MANIFEST.json") for o in store.list(f"{out}/parts/"))
        and len(_children(process.pid)) >= 2
        and scratch()
    ):
        time.sleep(0.2)
    workers, folders = _children(process.pid), scratch()
    assert len(workers) >= 2 and folders  # the pool's workers; the shard's spools
    # The parent alone, as the kernel's OOM killer would: its workers notice and exit, its scratch
    # folders are removed by the next run.
    process.kill()
    process.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.2)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    assert not store.exists(f"{out}/manifest.jsonl") and not store.exists(f"{out}/_MANIFEST.json")
    resumed = _vdm(*args, "--output", out, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "already done" in resumed.stdout and "0 already done" not in resumed.stdout
    assert _manifest(store, out) == _manifest(store, f"{prefix}/a")
    assert not any(folder.exists() for folder in folders)


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def test_ablation_subsets_without_reannotation(curated, store, settings):
    prefix, _, _ = curated
    result = _vdm("curate-ablation", "--curated", f"{prefix}/a", "--grid", "motion=25,50", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    index = json.loads(store.get_bytes(f"{prefix}/a/ablation/index.json"))
    assert set(index) == {"motion-drop25", "motion-drop50"}
    rows = _manifest(store, f"{prefix}/a")
    candidates = [r for r in rows if "too_short" not in r["drop_reasons"]]
    for name, percent in (("motion-drop25", 25), ("motion-drop50", 50)):
        motions = np.array([r["scores"]["motion"] for r in candidates])
        assert index[name]["clips"] == int((motions >= np.percentile(motions, percent)).sum())
        # Each subset is a curation run of its own in MLflow, linked to the curation it was cut from.
        connect(settings)
        run = mlflow.get_run(index[name]["mlflow_run"].rsplit("/", 1)[1])
        assert run.data.tags["vdm.ablation_of"] == f"{prefix}/a"
        assert run.data.tags["vdm.dataset_digest"] == index[name]["digest"]
        assert run.data.metrics["clips_after_filter"] == index[name]["clips"]


def test_an_unexpected_failure_is_recorded_not_raised(tmp_path):
    (result,) = run_videos([str(tmp_path / "vanished.mp4")], CurationConfig(), workers=1)
    assert result.rejected["reason"] == "processing_error"
    assert "FileNotFoundError" in result.rejected["detail"]


def test_segments_trim_dark_ends_split_long_shots_and_mark_short_ones():
    from components.curation.config import Cuts
    from components.curation.segments import segments

    luma = np.full(400, 100.0)
    luma[:5] = luma[195:205] = 0.0  # a dark start and a black gap around the cut at 200
    config = Cuts(min_clip_s=1.0, max_clip_s=4.0, dark_luma=16)
    got = segments(400, 25.0, [200, 380], luma, config)
    assert [(s.start, s.end, s.too_short) for s in got] == [
        (5, 100, False),
        (100, 195, False),  # 190 frames over 4 s (100 frames): two equal halves
        (205, 292, False),
        (292, 380, False),
        (380, 400, True),  # 0.8 s
    ]


def test_weights_from_the_object_store(stack, store, prefix, tmp_path):
    """clip_weights / aesthetic_weights as s3:// URIs: fetched once (checksum verified), then loaded."""
    from dataclasses import replace

    from test_neural import saved_weights

    from components.curation.neural import ClipScorer, NeuralConfig

    base = NeuralConfig(allow_random_weights=True, tiny_models=True, device="cpu", cache_dir=str(tmp_path / "cache"))
    random_clip = ClipScorer(base)
    clip_path, head_path = saved_weights(random_clip, tmp_path)
    store.upload_file(clip_path, f"{prefix}/clip.pt")
    store.upload_file(head_path, f"{prefix}/aesthetic.safetensors")
    remote = replace(
        base,
        allow_random_weights=False,
        clip_weights=f"{prefix}/clip.pt",
        aesthetic_weights=f"{prefix}/aesthetic.safetensors",
    )
    local = replace(remote, clip_weights=clip_path, aesthetic_weights=head_path)
    frames = [np.full((64, 96, 3), v, np.uint8) for v in (30, 120, 220)]
    from_s3 = ClipScorer(remote, store)
    assert not from_s3.random_weights
    np.testing.assert_allclose(from_s3.embed_images(frames), ClipScorer(local).embed_images(frames), atol=1e-6)
    assert np.abs(from_s3.embed_images(frames) - random_clip.embed_images(frames)).max() > 1e-3


def test_an_object_store_failure_fails_the_shard_instead_of_rejecting_the_video(stack):
    from components.common.objectstore import BucketNotFoundError

    with pytest.raises(BucketNotFoundError):
        run_videos(["s3://no-such-bucket/raw/clip.mp4"], CurationConfig(), workers=1)


def test_the_split_is_a_function_of_the_path_under_the_input():
    names = [f"2024/video-{i:04d}.mp4" for i in range(2000)]
    local = [heldout_split(f"raw/{n}", "./raw/", 0.05) for n in names]
    assert local == [heldout_split(f"s3://vdm/raw/{n}", "s3://vdm/raw", 0.05) for n in names]
    assert 0.04 < local.count("heldout") / len(names) < 0.06
    wider = [heldout_split(f"raw/{n}", "raw", 0.2) for n in names]
    assert {w for s, w in zip(local, wider, strict=True) if s == "heldout"} == {"heldout"}  # only train -> heldout
    assert 0.18 < wider.count("heldout") / len(names) < 0.22
    assert {heldout_split(f"raw/{n}", "raw", 0.0) for n in names} == {"train"}


def test_only_the_scratch_of_processes_that_ended_is_removed(tmp_path):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(ended.stdout), os.getpid()
    folders = {(kind, pid): tmp_path / f"{kind}{pid}-x1y2" for kind in SCRATCH_PREFIXES for pid in (dead, alive)}
    for folder in folders.values():
        (folder / "clips-1.tar").parent.mkdir()
        (folder / "clips-1.tar").write_bytes(b"spool")
    (tmp_path / "vdm-spools-notapid").mkdir()
    removed = remove_stale_scratch(tmp_path)
    assert sorted(removed) == sorted(f for (_, pid), f in folders.items() if pid == dead)
    assert all(f.exists() == (pid == alive) for (_, pid), f in folders.items())
    assert (tmp_path / "vdm-spools-notapid").exists()


def test_a_worker_killed_outright_rejects_only_its_video_and_the_pool_goes_on(tmp_path):
    """The kernel's OOM killer ends a worker with SIGKILL: played here by a thread that kills any
    child process holding `poison.mp4` open, each time one does."""
    manifest = synthesize_local(tmp_path / "raw", SynthConfig(seed=9))
    videos = [str(tmp_path / "raw" / v["file"]) for v in manifest["videos"]]
    poison = tmp_path / "raw" / "poison.mp4"
    write_video(poison, np.random.default_rng(0).integers(0, 255, (240, 96, 160, 3), dtype=np.uint8), 24.0)
    videos.insert(3, str(poison))
    stop, killed = threading.Event(), []

    def oom_killer() -> None:
        while not stop.is_set():
            for pid in _children(os.getpid()):
                try:
                    opened = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
                except OSError:
                    continue  # ended meanwhile
                if str(poison) in opened:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.005)

    thread = threading.Thread(target=oom_killer, daemon=True)
    thread.start()
    try:
        results = run_videos(videos, CurationConfig(), workers=2)
    finally:
        stop.set()
        thread.join()
    by_video = dict(zip(videos, results, strict=True))
    assert by_video[str(poison)].rejected == {"video": str(poison), "reason": "processing_error", "detail": WORKER_DIED}
    assert len(set(killed)) >= 2  # in the pool, then again on its own
    for entry in manifest["videos"]:
        result = by_video[str(tmp_path / "raw" / entry["file"])]
        assert (
            (result.rejected is None and result.clips)
            if entry["valid"]
            else result.rejected["reason"] != "processing_error"
        )


def test_every_listed_file_is_curated_or_rejected_whatever_its_name(samples, tmp_path):
    folder, _ = samples
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in (".hidden.mp4", "_underscore.mp4", "a video.txt"):
        shutil.copy(folder / "objects.mp4", inputs / name)
    (inputs / "notes.json").write_text('{"camera": "handheld", "ünïcode": true}\n')
    (inputs / "playlist.m3u8").write_text("#EXTM3U\n#EXTINF:10,\nhttp://127.0.0.1:9/elsewhere.ts\n")
    (inputs / "_MANIFEST.json").write_text("{}")  # the object store's record of a published folder
    listed = sorted(Path(f.location).name for f in iter_inputs(str(inputs), None))
    assert listed == sorted([".hidden.mp4", "_underscore.mp4", "a video.txt", "notes.json", "playlist.m3u8"])
    results = run_videos([str(inputs / name) for name in listed], CurationConfig(), workers=1)
    by_name = dict(zip(listed, results, strict=True))
    for name in (".hidden.mp4", "_underscore.mp4", "a video.txt"):
        assert by_name[name].rejected is None and len(by_name[name].clips) == 1, name
    for name in ("notes.json", "playlist.m3u8"):  # text never reaches FFmpeg (a playlist would fetch)
        assert by_name[name].rejected["reason"] == "not_a_video" and not by_name[name].clips
