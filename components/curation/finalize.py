"""Merge published parts: apply the filters over all clips, write the WebDataset
shards of kept clips, `manifest.jsonl`, `rejected.jsonl` and the dataset card.

Output contract (under the output prefix; `_MANIFEST.json` is written last):
- `shards/shard-NNNNNN.tar`: WebDataset samples `<key>.mp4` (the clip) and
  `<key>.json` (its manifest row), kept clips of the train split only, sorted by key;
- `heldout/shard-NNNNNN.tar`: the same for the kept clips of the held-out split (the
  source videos `heldout_split` picks), which training never reads and evaluation
  compares with; `heldout/prompts.jsonl`: the evaluation prompt set, one
  `{"prompt": caption, "key": clip key}` per held-out kept clip with a caption, sorted by key;
- `manifest.jsonl`: one row per clip, kept and dropped, each a `ClipRecord`
  (model/records.py) without `too_short`: `key`, `video`, `start_frame`,
  `end_frame`, `start_s`, `end_s`, `fps`, `kept`, `drop_reasons`, `scores`
  (`motion`, `text_ratio`, `aesthetic`, `clip_sim`), `camera_motion`, `caption`
  (when a captioner gave one), ..., `split` (`train` or `heldout`) and `shard` for kept clips;
- `rejected.jsonl`: `video`, `reason`, `detail` per rejected file;
- `dataset_card.json` / `dataset_card.html`: the figures (per split too), thresholds and
  provenance; the JSON's `digest` (sha256 of `manifest.jsonl`, every shard and the prompt
  set, 16 hex digits) names this exact data, e.g. as the MLflow dataset digest of training runs.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import io
import json
import os
import tarfile
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import av
import numpy as np
import webdataset as wds
from PIL import Image

from components.common.media import animated_webp_bytes
from components.common.objectstore import ObjectStore, S3Uri, is_s3_uri, sha256_file
from components.common.tracking import config_hash, git_commit
from components.curation.annotate import CLIPS_FILE, CLIPS_TAR, PART_INFO, REJECTED_FILE, read_clips, read_jsonl
from components.curation.config import SCORES, CurationConfig, Filter
from model.records import HELDOUT, TRAIN, ClipRecord, Split

TOO_SHORT = "too_short"
SHARDS = "shards"
PROMPTS_FILE = "prompts.jsonl"  # under heldout/
EMPTY_HELDOUT = "evaluation has no held-out clips: raise heldout_fraction"
# Changing the salt would move videos between splits: held-out clips would become training data.
_SPLIT_SALT = "vdm-heldout-v1"


def heldout_split(video: str, input_location: str, fraction: float) -> Split:
    """The split of a source video's clips: `heldout` for about `fraction` of videos, chosen by a
    salted hash of the video's path under `input_location` (so a video keeps its split when the
    corpus grows, is re-curated, or moves between a folder and an s3:// prefix; raising the
    fraction only moves videos from train to heldout)."""
    base = input_location.rstrip("/")
    if not is_s3_uri(base):  # `./raw` and `raw` name the same folder
        base, video = os.path.normpath(base), os.path.normpath(video)
    relative = video[len(base) + 1 :] if video.startswith(base + "/") else video.rsplit("/", 1)[-1]
    draw = int.from_bytes(hashlib.sha256(f"{_SPLIT_SALT}:{relative}".encode()).digest()[:8], "big") / 2**64
    return HELDOUT if draw < fraction else TRAIN


def thresholds(clips: list[ClipRecord], filters: tuple[Filter, ...]) -> dict[str, dict]:
    """Each filter's absolute bound, percentiles taken over the clips long enough to keep."""
    out = {}
    candidates = [c for c in clips if not c.too_short]
    for f in filters:
        values = np.array([c.scores[f.score] for c in candidates], dtype=np.float64)
        if f.drop_lowest_percent is not None:
            bound = {"min": float(np.percentile(values, f.drop_lowest_percent)) if len(values) else None}
        elif f.drop_highest_percent is not None:
            bound = {"max": float(np.percentile(values, 100 - f.drop_highest_percent)) if len(values) else None}
        else:
            bound = {"min": f.min} if f.min is not None else {"max": f.max}
        out[f.name] = {"score": f.score, **bound}
    return out


def apply_filters(clips: list[ClipRecord], bounds: dict[str, dict]) -> None:
    """Set `kept` and `drop_reasons` on every clip, in place."""
    for clip in clips:
        reasons = [TOO_SHORT] if clip.too_short else []
        for name, bound in bounds.items():
            value = clip.scores[bound["score"]]
            low, high = bound.get("min"), bound.get("max")
            if (low is not None and value < low) or (high is not None and value > high):
                reasons.append(name)
        clip.drop_reasons = reasons
        clip.kept = not reasons


def split_summary(kept: list[ClipRecord]) -> dict:
    """Source videos, clips and hours of one split's kept clips."""
    return {
        "videos": len({c.video for c in kept}),
        "clips": len(kept),
        "hours": round(sum(c.end_s - c.start_s for c in kept) / 3600, 6),
    }


def summary(clips: list[ClipRecord]) -> dict:
    """SVD Table 1 figures for a set of clips."""
    seconds = [c.end_s - c.start_s for c in clips]
    words = [len((c.caption or "").split()) for c in clips]
    return {
        "clips": len(clips),
        "hours": round(sum(seconds) / 3600, 6),
        "mean_clip_seconds": round(float(np.mean(seconds)), 4) if clips else 0.0,
        "mean_caption_words": round(float(np.mean(words)), 3) if clips else 0.0,
    }


# Axis labels of the score histograms.
_SCORE_AXIS = {
    "motion": "motion score (optical flow, px per frame)",
    "text_ratio": "text ratio (text area / frame area)",
    "aesthetic": "aesthetic score",
    "clip_sim": "CLIP similarity (caption vs. frames)",
}


def _histogram_png(kept: list[float], dropped: list[float], score: str, bound: tuple[str, float] | None) -> str:
    """A stacked histogram of one score over the clips long enough to keep, the filter's bound dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.6, 2.4), dpi=100)
    ax.hist([kept, dropped], bins=30, stacked=True, color=["#4477aa", "#bbbbbb"], label=["kept", "dropped"])
    if bound is not None:
        side, value = bound
        ax.axvline(value, color="#cc3311", linestyle="--", label=f"threshold: {side} {value:.3g}")
    ax.set_title(score, fontsize=9)
    ax.set_xlabel(_SCORE_AXIS.get(score, score), fontsize=7)
    ax.set_ylabel("clips", fontsize=7)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _preview_webp(mp4: bytes, max_side: int = 160, fps: float = 8.0, max_frames: int = 16) -> bytes | None:
    """A short looping animated WebP of a clip: its first seconds at `fps`, `max_side` px
    (None for a clip without frames)."""
    frames: list[Image.Image] = []
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        source_fps = float(stream.average_rate or fps)
        step = max(1, round(source_fps / fps))
        for i, frame in enumerate(container.decode(stream)):
            if i % step:
                continue
            image = frame.to_image()
            image.thumbnail((max_side, max_side))
            frames.append(image)
            if len(frames) == max_frames:
                break
    if not frames:
        return None
    return animated_webp_bytes(frames, round(1000 * step / source_fps), quality=50)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def card_html(
    card: dict, clips: list[ClipRecord], thumbnails: dict[str, bytes], previews: dict[str, bytes | None] | None = None
) -> str:
    """The card as one self-contained page (images inline as data: URIs)."""
    previews = previews or {}
    provenance = card["provenance"]
    provenance_rows = [
        ["input", provenance["input"] or "not recorded"],
        ["output", provenance["output"]],
        ["created (UTC)", provenance["created_utc"]],
        ["config hash", provenance["config_hash"]],
        ["code version (git commit)", provenance["code_version"]],
        ["digest (manifest, shards, held-out shards and prompts)", card["digest"]],
    ]
    warn = (
        "<p class='warn'>RANDOM WEIGHTS: neural scores and captions come from random-initialised models "
        "(--allow-random-weights). Do not train on this dataset.</p>"
        if card["random_weights"]
        else ""
    )
    warn += "".join(f"<p class='warn'>{html.escape(w)}</p>" for w in card["warnings"])
    heldout = card["heldout"]
    split_rows = [[name, f["videos"], f["clips"], f"{f['hours']:.4f}"] for name, f in card["splits"].items()]
    heldout_rows = [
        ["held-out fraction (of source videos)", heldout["fraction"]],
        ["held-out shards", heldout["shards"]],
        ["evaluation prompt set", heldout["prompt_set"]],
        ["prompts", heldout["prompts"]],
        ["prompt set digest", heldout["prompt_set_digest"]],
    ]
    before_after = [[k, card["before"][k], card["after"][k]] for k in card["before"]]
    filters = list(card["thresholds"])
    threshold_rows = [
        [name, b["score"], "min" if "min" in b else "max", _number(b.get("min", b.get("max")))]
        for name, b in card["thresholds"].items()
    ]
    drops = [[name, count] for name, count in card["drops_per_filter"].items()]
    overlaps = [
        [a, *(card["drops_per_filter"][a] if a == b else _overlap(card["drop_overlaps"], a, b) for b in filters)]
        for a in filters
    ]
    rejected = [[reason, count] for reason, count in card["rejected_per_reason"].items()]
    motions = sorted(card["camera_motion_before_filter"])
    camera = [[m, card["camera_motion_before_filter"][m], card["camera_motion_kept"].get(m, 0)] for m in motions]
    candidates = [c for c in clips if not c.too_short]
    plots = "".join(
        f"<img alt='{s} histogram' src='data:image/png;base64,"
        + _histogram_png(
            [c.scores[s] for c in candidates if c.kept],
            [c.scores[s] for c in candidates if not c.kept],
            s,
            _bound_of(card["thresholds"], s),
        )
        + "'>"
        for s in SCORES
    )

    def figures(selection: list[ClipRecord]) -> str:
        out = []
        for c in selection:
            if preview := previews.get(c.key):
                media = f"<img class='clip' src='data:image/webp;base64,{base64.b64encode(preview).decode()}'>"
            elif c.key in thumbnails:
                media = f"<img src='data:image/jpeg;base64,{base64.b64encode(thumbnails[c.key]).decode()}'>"
            else:
                continue
            reasons = ", ".join(c.drop_reasons or []) or "kept"
            out.append(
                f"<figure>{media}<figcaption>{html.escape(c.key)}<br>{html.escape(c.camera_motion)} · "
                f"{html.escape(reasons)}<br>{html.escape(c.caption or '')}</figcaption></figure>"
            )
        return "".join(out)

    showcase = _showcase(clips)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Dataset card</title><style>
body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;margin-bottom:1em}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}
figure{{display:inline-block;margin:4px;width:300px;font-size:11px;vertical-align:top}}
img.clip{{max-width:300px;image-rendering:auto}}
.warn{{background:#fdd;padding:8px;font-weight:bold}}
</style></head><body><h1>Dataset card</h1>{warn}
<h2 id="provenance">Provenance</h2>{_table(["", ""], provenance_rows)}
<h2 id="summary">Before and after filtering</h2>{_table(["", "before", "after"], before_after)}
<h2 id="splits">Splits</h2><p>Kept clips per split. Training reads shards/ only; the held-out split is
evaluation's reference clips and prompts, decided per source video.</p>
{_table(["split", "source videos", "clips", "hours"], split_rows)}{_table(["", ""], heldout_rows)}
<h2 id="thresholds">Thresholds</h2>{_table(["filter", "score", "bound", "value"], threshold_rows)}
<h2 id="drops">Clips dropped per reason</h2>{_table(["reason", "clips"], drops)}
<h2 id="overlaps">Filter overlaps</h2><p>Clips that both filters dropped (diagonal: all drops of the filter).</p>
{_table(["", *filters], overlaps)}
<h2 id="rejected">Rejected files per reason</h2><p>Rejected files: {card["rejected_files"]}</p>
{_table(["reason", "files"], rejected)}
<h2 id="camera-motion">Camera motion</h2>{_table(["camera motion", "clips before filtering", "kept"], camera)}
<h2 id="histograms">Score histograms</h2>{plots}
<h2 id="kept">Kept clips</h2>{figures([c for c in showcase if c.kept])}
<h2 id="dropped">Dropped clips</h2>{figures([c for c in showcase if not c.kept])}</body></html>"""


def _number(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"


def _overlap(overlaps: dict[str, int], a: str, b: str) -> int:
    return overlaps.get(f"{a}&{b}", overlaps.get(f"{b}&{a}", 0))


def _bound_of(bounds: dict[str, dict], score: str) -> tuple[str, float] | None:
    for b in bounds.values():
        if b["score"] == score:
            side = "min" if "min" in b else "max"
            return None if b[side] is None else (side, b[side])
    return None


def _common_folder(locations: list[str]) -> str | None:
    """The deepest folder (or s3:// prefix) holding every location."""
    if not locations:
        return None
    return os.path.commonprefix(locations).rsplit("/", 1)[0]


def dataset_digest(folder: Path) -> str:
    """sha256 over `manifest.jsonl`, every shard of both splits and the prompt set (name and
    content, in name order), 16 hex digits."""
    files = [folder / "manifest.jsonl", *(folder / SHARDS).glob("*.tar"), *(folder / HELDOUT).glob("*.tar")]
    files += [prompts] if (prompts := folder / HELDOUT / PROMPTS_FILE).is_file() else []
    names = sorted((f.relative_to(folder).as_posix(), f) for f in files)
    listing = "".join(f"{name} {sha256_file(f)}\n" for name, f in names)
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def finalize(
    parts: list[S3Uri],
    output: S3Uri,
    config: CurationConfig,
    store: ObjectStore,
    *,
    input_location: str | None = None,
) -> dict:
    """Merge parts into the output prefix; returns the dataset card. `input_location`: the
    folder or prefix that was curated, for the card's provenance (None: the deepest folder
    holding every input the parts name)."""
    clips: list[ClipRecord] = []
    rejected, random_weights, videos = [], False, []
    for part in parts:
        clips += read_clips(store.get_bytes(part.join(CLIPS_FILE)))
        rejected += read_jsonl(store.get_bytes(part.join(REJECTED_FILE)))
        info = json.loads(store.get_bytes(part.join(PART_INFO)))
        random_weights |= info["random_weights"]
        videos += info.get("videos", [])
    clips.sort(key=lambda c: c.key)
    location = input_location or _common_folder(sorted(videos))
    for clip in clips:
        clip.split = heldout_split(clip.video, location or "", config.output.heldout_fraction)
    # One set of thresholds over both splits: held-out clips pass the same filters as training's.
    bounds = thresholds(clips, config.filters)
    apply_filters(clips, bounds)
    candidates = [c for c in clips if not c.too_short]
    kept = [c for c in clips if c.kept]
    prompts = [{"prompt": c.caption, "key": c.key} for c in kept if c.heldout and (c.caption or "").strip()]
    drops = {name: sum(name in c.drop_reasons for c in clips) for name in [TOO_SHORT, *bounds]}
    overlaps = {
        f"{a}&{b}": sum(a in c.drop_reasons and b in c.drop_reasons for c in clips)
        for i, a in enumerate(bounds)
        for b in list(bounds)[i + 1 :]
    }
    before, after = summary(candidates), summary(kept)
    config_json = config.model_dump(mode="json")
    card = {
        "clips_before_filter": before["clips"],
        "clips_after_filter": after["clips"],
        "hours_before_filter": before["hours"],
        "hours_after_filter": after["hours"],
        "mean_clip_seconds": after["mean_clip_seconds"],
        "mean_caption_words": after["mean_caption_words"],
        "before": before,
        "after": after,
        "thresholds": bounds,
        "drops_per_filter": drops,
        "drop_overlaps": overlaps,
        "input_files": len(videos),
        "rejected_files": len(rejected),
        "rejected_per_reason": {
            r: sum(x["reason"] == r for x in rejected) for r in sorted({x["reason"] for x in rejected})
        },
        "camera_motion_before_filter": {
            m: sum(c.camera_motion == m for c in candidates) for m in sorted({c.camera_motion for c in candidates})
        },
        "camera_motion_kept": {
            m: sum(c.camera_motion == m for c in kept) for m in sorted({c.camera_motion for c in kept})
        },
        "splits": {split: split_summary([c for c in kept if (c.split == split)]) for split in (TRAIN, HELDOUT)},
        "heldout": {
            "fraction": config.output.heldout_fraction,
            "shards": str(output.join(HELDOUT)) + "/",
            "prompt_set": str(output.join(HELDOUT, PROMPTS_FILE)),
            "prompts": len(prompts),
        },
        "warnings": [] if any(c.heldout for c in kept) else [EMPTY_HELDOUT],
        "random_weights": random_weights,
        "provenance": {
            "input": location,
            "output": str(output),
            "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "config_hash": config_hash(config_json),
            "code_version": git_commit(),
        },
        "config": config_json,
        "parts": [str(p) for p in parts],
    }

    with tempfile.TemporaryDirectory(prefix="vdm-final-") as tmp:
        folder = Path(tmp)
        showcase = _showcase(clips)
        thumbnails, previews = _write_shards(parts, {c.key: c for c in kept}, showcase, output, folder, config, store)
        with open(folder / "manifest.jsonl", "w") as f:
            f.writelines(_row(c) + "\n" for c in clips)
        with open(folder / "rejected.jsonl", "w") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in sorted(rejected, key=lambda r: r["video"]))
        with open(folder / HELDOUT / PROMPTS_FILE, "w") as f:
            f.writelines(json.dumps(p, sort_keys=True) + "\n" for p in prompts)
        card["heldout"]["prompt_set_digest"] = sha256_file(folder / HELDOUT / PROMPTS_FILE)[:16]
        card["digest"] = dataset_digest(folder)
        (folder / "dataset_card.json").write_text(json.dumps(card, indent=1, sort_keys=True))
        (folder / "dataset_card.html").write_text(card_html(card, clips, thumbnails, previews))
        store.publish_folder(folder, output)
    return card


def _row(clip: ClipRecord) -> str:
    """A clip's manifest row and shard JSON: its record, `too_short` said by `drop_reasons`."""
    return dataclasses.replace(clip, too_short=None).to_json()


def _showcase(clips: list[ClipRecord], count: int = 8) -> list[ClipRecord]:
    """The clips the HTML card shows: the first kept and the first dropped ones, clips that a
    filter dropped before those too short to keep (which have no video to play)."""
    dropped = sorted((c for c in clips if not c.kept), key=lambda c: bool(c.too_short))
    return [c for c in clips if c.kept][:count] + dropped[:count]


def _write_shards(
    parts: list[S3Uri],
    kept: dict[str, ClipRecord],
    showcase: list[ClipRecord],
    output: S3Uri,
    folder: Path,
    config: CurationConfig,
    store: ObjectStore,
) -> tuple[dict[str, bytes], dict[str, bytes | None]]:
    """Stream each part's clips once, in part order, into `shards/` and `heldout/` by split
    (kept clips only), setting each kept clip's `shard`; memory holds one clip at a time.
    Returns the thumbnails and the looping previews of the showcase clips."""
    folders = {TRAIN: SHARDS, HELDOUT: HELDOUT}
    for name in folders.values():
        (folder / name).mkdir()
    showcase_keys = {c.key for c in showcase}
    thumbnails: dict[str, bytes] = {}
    previews: dict[str, bytes | None] = {}
    writers: dict[str, wds.TarWriter] = {}
    names: dict[str, str] = {}  # each split's shard being written
    written = dict.fromkeys(folders, 0)
    for part in parts:
        with store.open(part.join(CLIPS_TAR)) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext == "jpg" and key in showcase_keys:
                    thumbnails[key] = tar.extractfile(member).read()
                elif ext == "mp4" and key not in kept and key in showcase_keys:
                    previews[key] = _preview_webp(tar.extractfile(member).read())
                elif ext == "mp4" and key in kept:
                    mp4 = tar.extractfile(member).read()
                    if key in showcase_keys:
                        previews[key] = _preview_webp(mp4)
                    split = kept[key].split or TRAIN
                    count = written[split]
                    if count % config.output.clips_per_shard == 0:
                        if split in writers:
                            writers[split].close()
                        names[split] = f"{folders[split]}/shard-{count // config.output.clips_per_shard:06d}.tar"
                        writers[split] = wds.TarWriter(str(folder / names[split]), mtime=0)
                    kept[key].shard = str(output.join(names[split]))
                    writers[split].write({"__key__": key, "mp4": mp4, "json": _row(kept[key])})
                    written[split] += 1
            stream.read()  # to the end: tarfile stops at its end marker, the checksum is verified at EOF
    for writer in writers.values():
        writer.close()
    return thumbnails, previews
