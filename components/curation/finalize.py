"""Merge published parts: apply the filters over all clips, drop near-duplicates, sort the clips
into SVD's staged subsets (`lvd` every clip long enough to keep, `lvd-f` the kept ones, `hq` the
kept ones that pass `subsets.hq`), write the WebDataset shards of each subset, `manifest.jsonl`,
`rejected.jsonl` and the dataset card.

Output contract (under the output prefix; `_MANIFEST.json` is written last, and removed first
when an output is written again: the dataset is valid exactly while it exists):
- `shards/shard-NNNNNN.tar`: WebDataset samples `<key>.mp4` (the clip's small training
  rendition) and `<key>.json` (its manifest row), kept clips of the train split only, in the
  order of the parts (sorted by their first source video) and of each part's clips;
- `heldout/shard-NNNNNN.tar`: the same for the kept clips of the held-out split (the
  source videos `heldout_split` picks), which training never reads and evaluation
  compares with; `heldout/prompts.jsonl`: the evaluation prompt set, one
  `{"prompt": caption, "key": clip key}` per held-out kept clip with a caption, sorted by key;
- `shards-hq/`, `heldout-hq/`: the high-resolution rendition of the same clips, stored as
  `<key>.mp4` with the same `<key>.json`; shard N there holds the keys of shard N of
  `shards/` (`heldout/`) that have that rendition;
- `subsets/hq/shards/`, `subsets/hq/shards-hq/`: the hq subset's train-split clips, both
  renditions numbered alike; `subsets/lvd/shards/`: every train-split clip long enough to keep
  (small rendition only); each subset folder also has a `dataset_card.json` with its figures
  and digest (and the card's page, `dataset_card.html`), so a subset's folder reads as its
  `shards/` like the output's own. The same
  `<key>.json` (the manifest row) as in `shards/`; `shards/` and `heldout/` are `lvd-f`'s;
- `manifest.jsonl`: one row per clip, kept and dropped, sorted by key, each a `ClipRecord`
  (model/records.py) without `too_short`: `key`, `video`, `start_frame`,
  `end_frame`, `start_s`, `end_s`, `fps`, `kept`, `drop_reasons`, `scores`
  (`motion`, `text_ratio`, `aesthetic`, `clip_sim`), `camera_motion`, `caption`
  (when a captioner gave one), ..., `split` (`train` or `heldout`), `subsets` (those holding it)
  and `hq_drop_reasons` (the `subsets.hq` thresholds it fails), and for kept clips `shard`
  and each rendition's `shard`; a clip dropped as a near-duplicate names the kept copy in `duplicate_of`;
- `rejected.jsonl`: `video`, `reason`, `detail` per rejected file;
- `dataset_card.json` / `dataset_card.html`: the figures (per split and per subset too, with
  each subset's score distributions), thresholds, the resolution distribution and provenance;
  the JSON's `digest` (sha256 of `manifest.jsonl`, every shard of `lvd-f` and the prompt set,
  16 hex digits) names this exact data, e.g. as the MLflow dataset digest of training runs; each
  subset's `digest` (manifest and its own shards) names its data.

Memory does not grow with the clip count beyond a few numbers a clip: pass 1 streams every
part's `clips.jsonl` for the thresholds' score arrays and the counters; a second read of them
fills the near-duplicate index with the clips the filters keep; pass 2 streams every part again
(one part's rows at a time), writes its manifest rows to local files (merged in key order at the
end), and streams its `clips.tar` into the shards, each uploaded as it closes.
"""

from __future__ import annotations

import base64
import bisect
import dataclasses
import hashlib
import heapq
import html
import io
import json
import os
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import av
import numpy as np
import webdataset as wds
from PIL import Image

from components.common.media import animated_webp_bytes
from components.common.objectstore import MANIFEST_NAME, ObjectStore, S3Uri, is_s3_uri, sha256_file
from components.common.tracking import config_hash, git_commit
from components.curation.annotate import CLIPS_FILE, CLIPS_TAR, PART_INFO, REJECTED_FILE, read_clips, read_jsonl
from components.curation.config import FILTER_SCORES, RESOLUTION, SCORES, CurationConfig, Filter
from components.curation.duplicates import DuplicateIndex
from model.records import (
    HELDOUT,
    HQ_SUBSET,
    LVD,
    LVD_F,
    RENDITION_EXT,
    RENDITIONS,
    SMALL,
    SPLITS,
    SUBSETS,
    TRAIN,
    ClipRecord,
    Rendition,
    Split,
    rendition_folder,
)

TOO_SHORT = "too_short"
DUPLICATE = "duplicate"
SHARDS = "shards"
PROMPTS_FILE = "prompts.jsonl"  # under heldout/
EMPTY_HELDOUT = "evaluation has no held-out clips: raise heldout_fraction"
EMPTY_HQ = "the hq subset has no training clips: loosen subsets.hq"
# The folder of a subset under a curated output, `lvd-f` being the output itself (its `shards/`,
# `shards-hq/`); each holds `shards/` (and `shards-hq/`) of its training clips and a `dataset_card.json`.
# A subset's shards are copies of its clips, not references to lvd-f's: a loader reads every shard
# under a folder, and a stage on the hq rendition reads the sibling `shards-hq/` of the `shards/` it
# is given, so hq's shards nested in `shards/` would put high-resolution files among lvd-f's small
# ones, and lvd's folder cannot lie above `shards/` (the output's root also holds `heldout/`).
# The copies cost the hq subset's size (a small share by design) and lvd's at the small size only.
SUBSETS_FOLDER = "subsets"
# The renditions each subset stores: `lvd` (the whole corpus, for ablations at low resolution) the small one.
_SUBSET_RENDITIONS = {LVD: (SMALL,), LVD_F: RENDITIONS, HQ_SUBSET: RENDITIONS}
# The scores the card compares the subsets on.
SUBSET_SCORES = ("aesthetic", "motion", "text_ratio", RESOLUTION)
# Changing the salt would move videos between splits: held-out clips would become training data.
_SPLIT_SALT = "vdm-heldout-v1"
# The card's resolution buckets, by a frame's shorter side (its "p").
RESOLUTION_BUCKETS = ((360, "<=360p"), (480, "480p"), (720, "720p"), (1080, "1080p"))
_ABOVE = ">1080p"
_SHOWCASE = 8  # clips of each kind the HTML card shows
_MERGE_FAN_IN = 256  # sorted files merged at once (open files)
_EXT_RENDITION = {ext: name for name, ext in RENDITION_EXT.items()}


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


def subset_folder(subset: str) -> str:
    """A subset's folder relative to a curated output ("" for `lvd-f`, the output itself)."""
    return "" if subset == LVD_F else f"{SUBSETS_FOLDER}/{subset}"


def score_value(clip: ClipRecord, score: str) -> float:
    """A clip's value of a filter's score (NaN where it has none): `resolution` is the source's shorter side."""
    if score == RESOLUTION:
        return float(min(clip.source_size)) if clip.source_size else np.nan
    return float(clip.scores.get(score, np.nan))


def bounds_of(scores: dict[str, np.ndarray], filters: tuple[Filter, ...]) -> dict[str, dict]:
    """Each filter's absolute bound from the scores of the clips long enough to keep."""
    out = {}
    for f in filters:
        values = scores[f.score]
        if f.drop_lowest_percent is not None:
            bound = {"min": float(np.percentile(values, f.drop_lowest_percent)) if len(values) else None}
        elif f.drop_highest_percent is not None:
            bound = {"max": float(np.percentile(values, 100 - f.drop_highest_percent)) if len(values) else None}
        else:
            bound = {"min": f.min} if f.min is not None else {"max": f.max}
        out[f.name] = {"score": f.score, **bound}
    return out


def thresholds(clips: list[ClipRecord], filters: tuple[Filter, ...]) -> dict[str, dict]:
    """Each filter's absolute bound, percentiles taken over the clips long enough to keep."""
    candidates = [c for c in clips if not c.too_short]
    scores = {f.score: np.array([score_value(c, f.score) for c in candidates], dtype=np.float64) for f in filters}
    return bounds_of(scores, filters)


def apply_filters(clips: list[ClipRecord], bounds: dict[str, dict], duplicates: dict[str, str] | None = None) -> None:
    """Set `kept` and `drop_reasons` (and `duplicate_of`) on every clip, in place. `duplicates`:
    dropped key -> the key of the near-copy kept instead."""
    duplicates = duplicates or {}
    for clip in clips:
        reasons = [TOO_SHORT] if clip.too_short else []
        reasons += failed_bounds(clip, bounds)
        if not clip.too_short and clip.key in duplicates:
            reasons.append(DUPLICATE)
            clip.duplicate_of = duplicates[clip.key]
        clip.drop_reasons = reasons
        clip.kept = not reasons


def failed_bounds(clip: ClipRecord, bounds: dict[str, dict]) -> list[str]:
    """The names of the bounds a clip fails; a clip without the score fails its bound."""
    failed = []
    for name, bound in bounds.items():
        value = score_value(clip, bound["score"])
        low, high = bound.get("min"), bound.get("max")
        if np.isnan(value) or (low is not None and value < low) or (high is not None and value > high):
            failed.append(name)
    return failed


def apply_subsets(clips: list[ClipRecord], hq_bounds: dict[str, dict]) -> None:
    """Set `subsets` and `hq_drop_reasons` on every clip, in place, after `apply_filters`: `lvd`
    holds every clip long enough to keep, `lvd-f` the kept ones, `hq` the kept ones that pass `hq_bounds`."""
    for clip in clips:
        clip.hq_drop_reasons = [TOO_SHORT] if clip.too_short else failed_bounds(clip, hq_bounds)
        clip.subsets = [] if clip.too_short else [LVD]
        if clip.kept:
            clip.subsets.append(LVD_F)
            if not clip.hq_drop_reasons:
                clip.subsets.append(HQ_SUBSET)


def resolution_bucket(width: int, height: int) -> str:
    side = min(width, height)
    return next((label for limit, label in RESOLUTION_BUCKETS if side <= limit), _ABOVE)


@dataclass
class _Totals:
    """Clips, seconds and caption words of a set of clips, summed as they stream by."""

    clips: int = 0
    seconds: float = 0.0
    words: int = 0
    videos: int = 0
    captioned: Counter = field(default_factory=Counter)  # clips with a caption, per captioner

    def add(self, clip: ClipRecord) -> None:
        self.clips += 1
        self.seconds += clip.end_s - clip.start_s
        self.words += len((clip.caption or "").split())
        self.captioned.update(name for name, text in (clip.captions or {}).items() if text)

    def summary(self) -> dict:
        """SVD Table 1 figures."""
        return {
            "clips": self.clips,
            "hours": round(self.seconds / 3600, 6),
            "mean_clip_seconds": round(self.seconds / self.clips, 4) if self.clips else 0.0,
            "mean_caption_words": round(self.words / self.clips, 3) if self.clips else 0.0,
        }

    def split_summary(self) -> dict:
        """Source videos, clips and hours of one split's kept clips."""
        return {"videos": self.videos, "clips": self.clips, "hours": round(self.seconds / 3600, 6)}


# Axis labels of the score histograms.
_SCORE_AXIS = {
    "motion": "motion score (optical flow, px per frame)",
    "text_ratio": "text ratio (text area / frame area)",
    "aesthetic": "aesthetic score",
    "clip_sim": "CLIP similarity (caption vs. frames)",
    RESOLUTION: "resolution (source's shorter side, px)",
}
_SUBSET_COLOURS = {LVD: "#bbbbbb", LVD_F: "#4477aa", HQ_SUBSET: "#cc3311"}


def _subsets_png(values: dict[str, np.ndarray], score: str) -> str:
    """One score's histogram per subset, as outlines over the same bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.6, 2.4), dpi=100)
    every = np.concatenate([np.zeros(0), *values.values()])
    bins = np.histogram_bin_edges(every, bins=30) if len(every) else 30
    for name, v in values.items():
        ax.hist(
            v, bins=bins, histtype="step", linewidth=1.5, color=_SUBSET_COLOURS.get(name), label=f"{name} ({len(v)})"
        )
    return _histogram_figure(fig, ax, score)


def _histogram_figure(fig, ax, score: str) -> str:
    """A score's histogram figure, labelled, as base64 PNG (the figure closed)."""
    import matplotlib.pyplot as plt

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


def _histogram_png(kept: np.ndarray, dropped: np.ndarray, score: str, bound: tuple[str, float] | None) -> str:
    """A stacked histogram of one score over the clips long enough to keep, the filter's bound dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.6, 2.4), dpi=100)
    ax.hist([kept, dropped], bins=30, stacked=True, color=["#4477aa", "#bbbbbb"], label=["kept", "dropped"])
    if bound is not None:
        side, value = bound
        ax.axvline(value, color="#cc3311", linestyle="--", label=f"threshold: {side} {value:.3g}")
    return _histogram_figure(fig, ax, score)


def _preview_webp(
    mp4: bytes, max_side: int = 160, fps: float = 8.0, max_frames: int = 16, first_frame: int = 0
) -> bytes | None:
    """A short looping animated WebP of a clip: its first seconds at `fps`, `max_side` px
    (None for a clip without frames); `first_frame`: frames of the file before the clip's first."""
    frames: list[Image.Image] = []
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        source_fps = float(stream.average_rate or fps)
        step = max(1, round(source_fps / fps))
        for i, frame in enumerate(container.decode(stream)):
            i -= first_frame
            if i < 0 or i % step:
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


@dataclass
class CardMedia:
    """What the HTML card shows besides the card's figures: the showcase clips with their
    thumbnails and looping previews, and each score's values (kept, dropped) for the histograms."""

    showcase: list[ClipRecord] = field(default_factory=list)
    thumbnails: dict[str, bytes] = field(default_factory=dict)
    previews: dict[str, bytes | None] = field(default_factory=dict)
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    # Subset -> score -> its clips' values (SUBSET_SCORES), for the subsets' histograms.
    subset_scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def card_html(card: dict, media: CardMedia) -> str:
    """The card as one self-contained page (images inline as data: URIs)."""
    provenance = card["provenance"]
    provenance_rows = [
        ["input", provenance["input"] or "not recorded"],
        ["output", provenance["output"]],
        ["created (UTC)", provenance["created_utc"]],
        ["config hash", provenance["config_hash"]],
        ["code version (git commit)", provenance["code_version"]],
        ["digest (manifest, shards of both splits and renditions, prompts)", card["digest"]],
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
    resolutions = card["resolutions"]
    columns = ["source", *resolutions["renditions"]]
    resolution_rows = [
        [label, resolutions["source"].get(label, 0), *(r.get(label, 0) for r in resolutions["renditions"].values())]
        for label in _bucket_labels()
    ]
    rendition_rows = [
        [name, split, folder] for name, folders in card["renditions"].items() for split, folder in folders.items()
    ]
    subsets = card.get("subsets", {})
    names = list(subsets)
    subset_rows = [
        ["clips (both splits)", *(subsets[n]["clips"] for n in names)],
        ["hours (both splits)", *(f"{subsets[n]['hours']:.4f}" for n in names)],
        ["training clips (in its shards)", *(subsets[n]["train_clips"] for n in names)],
        ["training hours", *(f"{subsets[n]['train_hours']:.4f}" for n in names)],
        ["shards", *(subsets[n]["shards"] or "not written" for n in names)],
        ["high-resolution shards", *(subsets[n]["hq_shards"] or "none" for n in names)],
        ["digest", *(subsets[n]["digest"] or "none" for n in names)],
    ]
    score_rows = [
        [score, figure, *(_number(subsets[n]["scores"][score][figure]) for n in names)]
        for score in SUBSET_SCORES
        for figure in ("mean", "min", "p10", "median", "p90", "max")
        if all(score in subsets[n]["scores"] for n in names)
    ]
    subset_thresholds = [
        [n, name, b["score"], "min" if "min" in b else "max", _number(b.get("min", b.get("max")))]
        for n in names
        for name, b in subsets[n]["thresholds"].items()
    ]
    subset_plots = "".join(
        f"<img alt='{s} per subset' src='data:image/png;base64,"
        + _subsets_png({n: media.subset_scores.get(n, {}).get(s, np.zeros(0)) for n in names}, s)
        + "'>"
        for s in SUBSET_SCORES
        if names
    )
    plots = "".join(
        f"<img alt='{s} histogram' src='data:image/png;base64,"
        + _histogram_png(*media.scores.get(s, (np.zeros(0), np.zeros(0))), s, _bound_of(card["thresholds"], s))
        + "'>"
        for s in SCORES
    )

    def figures(selection: list[ClipRecord]) -> str:
        out = []
        for c in selection:
            if preview := media.previews.get(c.key):
                media_tag = f"<img class='clip' src='data:image/webp;base64,{base64.b64encode(preview).decode()}'>"
            elif c.key in media.thumbnails:
                media_tag = f"<img src='data:image/jpeg;base64,{base64.b64encode(media.thumbnails[c.key]).decode()}'>"
            else:
                continue
            reasons = ", ".join(c.drop_reasons or []) or "kept"
            out.append(
                f"<figure>{media_tag}<figcaption>{html.escape(c.key)}<br>{html.escape(c.camera_motion)} · "
                f"{html.escape(reasons)}<br>{html.escape(c.caption or '')}</figcaption></figure>"
            )
        return "".join(out)

    showcase = media.showcase
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Dataset card</title><style>
body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;margin-bottom:1em}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}
figure{{display:inline-block;margin:4px;width:300px;font-size:11px;vertical-align:top}}
img.clip{{max-width:300px;image-rendering:auto}}
.warn{{background:#fdd;padding:8px;font-weight:bold}}
</style></head><body><h1>Dataset card</h1>{warn}
<h2 id="provenance">Provenance</h2>{_table(["", ""], provenance_rows)}
<h2 id="summary">Before and after filtering</h2>{_table(["", "before", "after"], before_after)}
<h2 id="subsets">Subsets</h2><p>SVD's staged data: lvd every clip long enough to keep, lvd-f the clips the filters
keep, hq the clips of lvd-f that pass the stricter subsets.hq thresholds. Each subset's folder holds the training
split's clips; the held-out split is lvd-f's (heldout/).</p>
{_table(["", *names], subset_rows)}
<h3 id="subset-scores">Score distributions</h3>{_table(["score", "", *names], score_rows)}{subset_plots}
<h3 id="subset-thresholds">Thresholds per subset</h3><p>hq's clips also pass lvd-f's.</p>
{_table(["subset", "filter", "score", "bound", "value"], subset_thresholds)}
<h2 id="splits">Splits</h2><p>Kept clips per split. Training reads shards/ only; the held-out split is
evaluation's reference clips and prompts, decided per source video.</p>
{_table(["split", "source videos", "clips", "hours"], split_rows)}{_table(["", ""], heldout_rows)}
<h2 id="resolutions">Resolutions</h2><p>Kept clips per resolution (shorter side): the source and each stored
rendition.</p>{_table(["resolution", *columns], resolution_rows)}
<h2 id="renditions">Renditions</h2>{_table(["rendition", "split", "shards"], rendition_rows)}
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


def _digest(files: dict[str, str]) -> str:
    """sha256 over `name sha256` lines of the files, in name order, 16 hex digits."""
    listing = "".join(f"{name} {files[name]}\n" for name in sorted(files))
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def _digested(name: str) -> bool:
    """Whether a file of the output is covered by the digest."""
    folder = name.split("/", 1)[0]
    return (
        name == "manifest.jsonl"
        or name == f"{HELDOUT}/{PROMPTS_FILE}"
        or (folder in _SHARD_FOLDERS and name.endswith(".tar"))
    )


def dataset_digest(folder: Path) -> str:
    """sha256 over `manifest.jsonl`, every shard of both splits and every rendition, and the
    prompt set (name and content, in name order), 16 hex digits."""
    files = [folder / "manifest.jsonl", *(f for name in _SHARD_FOLDERS for f in (folder / name).glob("*.tar"))]
    files += [prompts] if (prompts := folder / HELDOUT / PROMPTS_FILE).is_file() else []
    return _digest({f.relative_to(folder).as_posix(): sha256_file(f) for f in files})


# Every folder of shards: each split in each rendition.
_SHARD_FOLDERS = tuple(rendition_folder(split, name) for split in SPLITS for name in RENDITIONS)


def _lines(store: ObjectStore, uri: S3Uri) -> Iterator[str]:
    """A part's JSON lines file, streamed (the checksum is verified at its end)."""
    with store.open(uri) as stream:
        for line in io.TextIOWrapper(stream, encoding="utf-8"):
            if line.strip():
                yield line


@dataclass
class _Part:
    uri: S3Uri
    videos: int
    first_video: str
    random_weights: bool


def _read_parts(parts: list[S3Uri], store: ObjectStore) -> tuple[list[_Part], str | None]:
    """Each part's info, the parts in the order of their first video (any caller's order gives the
    same output), and the deepest folder holding every video they name."""
    read, common = [], None
    for uri in parts:
        info = json.loads(store.get_bytes(uri.join(PART_INFO)))
        videos = sorted(info.get("videos", []))
        read.append(_Part(uri, len(videos), videos[0] if videos else "", bool(info["random_weights"])))
        if videos:
            ends = [videos[0], videos[-1]] + ([common] if common is not None else [])
            common = os.path.commonprefix(ends)
    read.sort(key=lambda p: (p.first_video, str(p.uri)))
    return read, (common.rsplit("/", 1)[0] if common is not None else None)


class _Showcase:
    """The clips the HTML card shows, kept bounded while clips stream by: the first kept and the
    first dropped ones by key, clips that a filter dropped before those too short to keep (which
    have no video to play), with their thumbnails and previews."""

    def __init__(self, count: int = _SHOWCASE):
        self.count = count
        self.kept: list[tuple[tuple, ClipRecord]] = []
        self.dropped: list[tuple[tuple, ClipRecord]] = []
        self.media = CardMedia()

    def offer(self, clip: ClipRecord) -> None:
        chosen = self.kept if clip.kept else self.dropped
        rank = (clip.key,) if clip.kept else (bool(clip.too_short), clip.key)
        if len(chosen) == self.count and rank >= chosen[-1][0]:
            return
        bisect.insort(chosen, (rank, clip), key=lambda item: item[0])
        if len(chosen) > self.count:
            _, evicted = chosen.pop()
            self.media.thumbnails.pop(evicted.key, None)
            self.media.previews.pop(evicted.key, None)

    def wants(self, key: str) -> bool:
        return any(c.key == key for _, c in self.kept + self.dropped)

    def first_frame(self, key: str) -> int:
        """Frames of a showcase clip's small rendition before its first frame."""
        clip = next(c for _, c in self.kept + self.dropped if c.key == key)
        return (clip.renditions or {}).get(SMALL, Rendition(0, 0)).first_frame

    def clips(self) -> list[ClipRecord]:
        return [c for _, c in self.kept] + [c for _, c in self.dropped]


class _ShardWriter:
    """One subset's clips into numbered shards per split, each rendition in its own folder with the
    same numbering (under the subset's folder); each shard is uploaded as soon as it is complete
    and its local file removed."""

    def __init__(self, folder: Path, output: S3Uri, per_shard: int, store: ObjectStore, subset: str = LVD_F):
        self.folder, self.output, self.per_shard, self.store = folder, output, per_shard, store
        self.base = subset_folder(subset)
        self.renditions = _SUBSET_RENDITIONS[subset]
        self.written = {TRAIN: 0, HELDOUT: 0}
        self.open: dict[tuple[str, int, str], wds.TarWriter] = {}  # (split, shard, rendition folder)
        self.uploaded: list[dict] = []
        self.placed: dict[str, dict[str, tuple[str, int]]] = {}  # key -> rendition -> (split, shard)

    def place(self, clip: ClipRecord) -> dict[str, str]:
        """Give a clip its shard in each rendition this subset stores, in the order clips are
        placed; returns rendition -> shard URI."""
        split = clip.split or TRAIN
        index = self.written[split] // self.per_shard
        self.written[split] += 1
        names = [n for n in self.renditions if n == SMALL or n in (clip.renditions or {})]
        self.placed[clip.key] = {n: (split, index) for n in names}
        return {n: str(self.output.join(self._name(split, index, n))) for n in names}

    def wants(self, key: str, rendition: str) -> bool:
        return rendition in self.placed.get(key, {})

    def write(self, key: str, rendition: str, mp4: bytes, row: str) -> None:
        split, index = self.placed[key][rendition]
        rel = self._name(split, index, rendition)
        shard = (split, index, rel.rsplit("/", 1)[0])
        if shard not in self.open:
            (self.folder / shard[2]).mkdir(parents=True, exist_ok=True)
            self.open[shard] = wds.TarWriter(str(self.folder / rel), mtime=0)
        self.open[shard].write({"__key__": key, "mp4": mp4, "json": row})

    def part_done(self) -> None:
        """Close and upload the shards no clip goes to any more; forget the part's placements."""
        self.placed.clear()
        for split in (TRAIN, HELDOUT):
            index = self.written[split] // self.per_shard
            for shard in sorted(k for k in self.open if k[0] == split and k[1] < index):
                self._close(shard)

    def close_all(self) -> None:
        for shard in sorted(self.open):
            self._close(shard)

    def _close(self, shard: tuple[str, int, str]) -> None:
        split, index, folder = shard
        self.open.pop(shard).close()
        rel = f"{folder}/shard-{index:06d}.tar"
        path = self.folder / rel
        self.uploaded.append(self.store.upload_entry(path, self.output, rel))
        path.unlink()

    def _name(self, split: str, index: int, rendition: str) -> str:
        folder = rendition_folder(split, rendition)
        return f"{self.base}/{folder}/shard-{index:06d}.tar" if self.base else f"{folder}/shard-{index:06d}.tar"


def _merge_sorted(files: list[Path], out: Path, key: Callable[[str], str], scratch: Path) -> None:
    """Merge files whose lines are each sorted by `key` into `out`, at most `_MERGE_FAN_IN` open at once."""
    level = 0
    while len(files) > _MERGE_FAN_IN:
        merged = []
        for i in range(0, len(files), _MERGE_FAN_IN):
            target = scratch / f"merge-{level}-{i}"
            _merge_into(files[i : i + _MERGE_FAN_IN], target, key)
            merged.append(target)
        files, level = merged, level + 1
    _merge_into(files, out, key)


def _merge_into(files: list[Path], out: Path, key: Callable[[str], str]) -> None:
    handles = [open(f) for f in files]  # noqa: SIM115 - closed below, all together
    try:
        with open(out, "w") as f:
            f.writelines(heapq.merge(*handles, key=key))
    finally:
        for handle in handles:
            handle.close()


def _after_tab(line: str) -> str:
    return line.split("\t", 1)[1]


def finalize(
    parts: list[S3Uri],
    output: S3Uri,
    config: CurationConfig,
    store: ObjectStore,
    *,
    input_location: str | None = None,
    write_subsets: bool = True,
) -> dict:
    """Merge parts into the output prefix; returns the dataset card. `input_location`: the
    folder or prefix that was curated, for the card's provenance (None: the deepest folder
    holding every input the parts name). `write_subsets`: also write the shards of the subsets
    `lvd` and `hq` (False: the card still counts them; threshold ablations need only `lvd-f`)."""
    part_infos, common = _read_parts(parts, store)
    location = input_location or common
    fraction = config.output.heldout_fraction

    values, before, motions_before = _scores(part_infos, store)
    present = {s: v[~np.isnan(v)] for s, v in values.items()}
    bounds = bounds_of(present, config.filters)
    hq_bounds = bounds_of(present, config.subsets.hq)
    duplicates = _near_duplicates(part_infos, bounds, config, store) if config.dedup.enabled else {}

    # Pass 2: filter each part's clips, write its manifest rows, stream its clips into the shards.
    after, splits = _Totals(), {TRAIN: _Totals(), HELDOUT: _Totals()}
    drops = Counter({name: 0 for name in [TOO_SHORT, *bounds, DUPLICATE]})
    overlaps = Counter({f"{a}&{b}": 0 for i, a in enumerate(bounds) for b in list(bounds)[i + 1 :]})
    motions_kept, rejected_per_reason = Counter(), Counter()
    source_sizes: Counter = Counter()
    rendition_sizes: dict[str, Counter] = {}
    kept_mask: list[np.ndarray] = []
    hq_mask: list[np.ndarray] = []
    # Each subset's clips (both splits) and the training clips in its shards.
    subset_totals = {name: _Totals() for name in SUBSETS}
    subset_train = {name: _Totals() for name in SUBSETS}
    rejected_files = prompts_count = 0
    random_weights = any(p.random_weights for p in part_infos)
    showcase = _Showcase()

    # Written to a fresh output: an earlier dataset there is invalid from here until the new manifest.
    if store.exists(output.join(MANIFEST_NAME)):
        store.delete(output.join(MANIFEST_NAME))
    with tempfile.TemporaryDirectory(prefix="vdm-final-") as tmp:
        folder, scratch = Path(tmp) / "out", Path(tmp) / "scratch"
        (folder / HELDOUT).mkdir(parents=True)
        scratch.mkdir()
        writer = _ShardWriter(folder, output, config.output.clips_per_shard, store)
        subset_writers = {
            name: _ShardWriter(folder, output, config.output.clips_per_shard, store, subset=name)
            for name in (HQ_SUBSET, LVD)
        }
        writers = [writer, *subset_writers.values()]
        sorted_files: dict[str, list[Path]] = {"manifest": [], "prompts": [], "rejected": []}
        for n, part in enumerate(part_infos):
            clips = read_clips(store.get_bytes(part.uri.join(CLIPS_FILE)))
            for clip in clips:
                clip.split = heldout_split(clip.video, location or "", fraction)
            apply_filters(clips, bounds, duplicates)
            apply_subsets(clips, hq_bounds)
            by_key = {}
            videos_kept = {TRAIN: set(), HELDOUT: set()}
            mask, mask_hq = [], []
            for clip in clips:
                for reason in clip.drop_reasons:
                    drops[reason] += 1
                for pair in overlaps:
                    a, b = pair.split("&", 1)
                    overlaps[pair] += a in clip.drop_reasons and b in clip.drop_reasons
                if not clip.too_short:
                    mask.append(bool(clip.kept))
                    mask_hq.append(HQ_SUBSET in clip.subsets)
                for name in clip.subsets:
                    subset_totals[name].add(clip)
                    if clip.split == TRAIN:
                        subset_train[name].add(clip)
                        if write_subsets and name in subset_writers:  # lvd-f's go to its writer below
                            subset_writers[name].place(clip)
                            by_key[clip.key] = clip
                if clip.kept:
                    shards = writer.place(clip)
                    clip.shard = shards[SMALL]
                    for name, rendition in (clip.renditions or {}).items():
                        rendition.shard = shards.get(name)
                    by_key[clip.key] = clip
                    after.add(clip)
                    splits[clip.split].add(clip)
                    videos_kept[clip.split].add(clip.video)
                    motions_kept[clip.camera_motion] += 1
                    if clip.source_size:
                        source_sizes[resolution_bucket(*clip.source_size)] += 1
                    for name, r in (clip.renditions or {}).items():
                        rendition_sizes.setdefault(name, Counter())[resolution_bucket(r.width, r.height)] += 1
                showcase.offer(clip)
            kept_mask.append(np.array(mask, dtype=bool))
            hq_mask.append(np.array(mask_hq, dtype=bool))
            for split, names in videos_kept.items():
                splits[split].videos += len(names)
            rows = sorted(f"{c.key}\t{_row(c)}\n" for c in clips)
            prompts = sorted(
                f"{c.key}\t{json.dumps({'prompt': c.caption, 'key': c.key}, sort_keys=True)}\n"
                for c in clips
                if c.kept and c.heldout and (c.caption or "").strip()
            )
            prompts_count += len(prompts)
            rejected = read_jsonl(store.get_bytes(part.uri.join(REJECTED_FILE)))
            rejected_files += len(rejected)
            rejected_per_reason.update(r["reason"] for r in rejected)
            rejected_lines = sorted(
                f"{json.dumps(r['video'], ensure_ascii=False)}\t{json.dumps(r, sort_keys=True)}\n" for r in rejected
            )
            for name, lines in (("manifest", rows), ("prompts", prompts), ("rejected", rejected_lines)):
                path = scratch / f"{name}-{n:06d}"
                path.write_text("".join(lines))
                sorted_files[name].append(path)
            _stream_part(part.uri, by_key, showcase, writers, store)
            for w in writers:
                w.part_done()
        for w in writers:
            w.close_all()
        _merge_sorted(sorted_files["manifest"], folder / "manifest.jsonl", _after_tab_key, scratch)
        _strip_keys(folder / "manifest.jsonl")
        _merge_sorted(sorted_files["prompts"], folder / HELDOUT / PROMPTS_FILE, _after_tab_key, scratch)
        _strip_keys(folder / HELDOUT / PROMPTS_FILE)
        _merge_sorted(sorted_files["rejected"], folder / "rejected.jsonl", _after_tab_key, scratch)
        _strip_keys(folder / "rejected.jsonl")

        candidates_kept = np.concatenate([np.zeros(0, dtype=bool), *kept_mask])
        candidates_hq = np.concatenate([np.zeros(0, dtype=bool), *hq_mask])
        showcase.media.scores = {
            s: (v[candidates_kept & ~np.isnan(v)], v[~candidates_kept & ~np.isnan(v)])
            for s, v in values.items()
            if s in SCORES
        }
        members = {LVD: np.ones(len(candidates_kept), dtype=bool), LVD_F: candidates_kept, HQ_SUBSET: candidates_hq}
        showcase.media.subset_scores = {
            name: {s: values[s][member & ~np.isnan(values[s])] for s in SUBSET_SCORES}
            for name, member in members.items()
        }
        showcase.media.showcase = showcase.clips()
        renditions = {SMALL: {TRAIN: str(output.join(SHARDS)) + "/", HELDOUT: str(output.join(HELDOUT)) + "/"}}
        for name in sorted(rendition_sizes):
            if name != SMALL:
                renditions[name] = {s: str(output.join(rendition_folder(s, name))) + "/" for s in (TRAIN, HELDOUT)}
        config_json = config.model_dump(mode="json")
        card = {
            "clips_before_filter": before.clips,
            "clips_after_filter": after.clips,
            "hours_before_filter": before.summary()["hours"],
            "hours_after_filter": after.summary()["hours"],
            "mean_clip_seconds": after.summary()["mean_clip_seconds"],
            "mean_caption_words": after.summary()["mean_caption_words"],
            "before": before.summary(),
            "after": after.summary(),
            "thresholds": bounds,
            "drops_per_filter": dict(drops),
            "drop_overlaps": dict(overlaps),
            "input_files": sum(p.videos for p in part_infos),
            "rejected_files": rejected_files,
            "rejected_per_reason": {r: rejected_per_reason[r] for r in sorted(rejected_per_reason)},
            "camera_motion_before_filter": {m: motions_before[m] for m in sorted(motions_before)},
            "camera_motion_kept": {m: motions_kept[m] for m in sorted(motions_kept)},
            "splits": {split: splits[split].split_summary() for split in (TRAIN, HELDOUT)},
            "heldout": {
                "fraction": fraction,
                "shards": str(output.join(HELDOUT)) + "/",
                "prompt_set": str(output.join(HELDOUT, PROMPTS_FILE)),
                "prompts": prompts_count,
                "prompt_set_digest": sha256_file(folder / HELDOUT / PROMPTS_FILE)[:16],
            },
            "resolutions": {
                "source": {label: source_sizes[label] for label in _bucket_labels() if source_sizes[label]},
                "renditions": {
                    name: {label: sizes[label] for label in _bucket_labels() if sizes[label]}
                    for name, sizes in sorted(rendition_sizes.items())
                },
            },
            "renditions": renditions,
            "warnings": ([] if splits[HELDOUT].clips else [EMPTY_HELDOUT])
            + ([] if subset_train[HQ_SUBSET].clips or not write_subsets else [EMPTY_HQ]),
            "random_weights": random_weights,
            # Which captioners ran, and how many of the kept clips each captioned.
            "captioners": {
                name: {"by": by, "clips": after.captioned[name]} for name, by in config.captioners().items()
            },
            "provenance": {
                "input": location,
                "output": str(output),
                "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
                "config_hash": config_hash(config_json),
                "code_version": git_commit(),
            },
            "config": config_json,
            "parts": [str(p.uri) for p in part_infos],
        }
        digested = {e["path"]: e["sha256"] for e in writer.uploaded if _digested(e["path"])}
        for name in ("manifest.jsonl", f"{HELDOUT}/{PROMPTS_FILE}"):
            digested[name] = sha256_file(folder / name)
        card["digest"] = _digest(digested)
        manifest_sha = digested["manifest.jsonl"]
        card["subsets"] = {}
        for name in SUBSETS:
            w = writer if name == LVD_F else subset_writers[name]
            shards = {e["path"]: e["sha256"] for e in w.uploaded}
            card["subsets"][name] = _subset_figures(
                name,
                output,
                subset_totals[name],
                subset_train[name],
                showcase.media.subset_scores[name],
                {LVD: {}, LVD_F: bounds, HQ_SUBSET: hq_bounds}[name],
                has_hq=any(path.split("/")[-2].endswith("-hq") for path in shards),
                digest=card["digest"] if name == LVD_F else _digest({"manifest.jsonl": manifest_sha, **shards}),
                written=write_subsets or name == LVD_F,
            )
        for name in (HQ_SUBSET, LVD) if write_subsets else ():
            subset_card = {**card["subsets"][name], "subset": name, "card": str(output.join("dataset_card.html"))}
            subset_card["provenance"] = card["provenance"]
            (folder / subset_folder(name)).mkdir(parents=True, exist_ok=True)
            (folder / subset_folder(name) / "dataset_card.json").write_text(
                json.dumps(subset_card, indent=1, sort_keys=True)
            )
        (folder / "dataset_card.json").write_text(json.dumps(card, indent=1, sort_keys=True))
        page = card_html(card, showcase.media)
        (folder / "dataset_card.html").write_text(page)
        for name in (HQ_SUBSET, LVD) if write_subsets else ():
            # The same page beside each subset's shards/, where a model's lineage links its data's card.
            (folder / subset_folder(name) / "dataset_card.html").write_text(page)
        store.publish_folder(folder, output, uploaded=[e for w in writers for e in w.uploaded])
    return card


def _distribution(values: np.ndarray) -> dict[str, float | int | None]:
    """A score's distribution over a subset: count, mean and quantiles (None for no values)."""
    if not len(values):
        return {"n": 0, "mean": None, "min": None, "p10": None, "median": None, "p90": None, "max": None}
    q = np.percentile(values, [0, 10, 50, 90, 100])
    figures = dict(zip(("min", "p10", "median", "p90", "max"), (round(float(x), 6) for x in q), strict=True))
    return {"n": len(values), "mean": round(float(values.mean()), 6), **figures}


def _subset_figures(
    name: str,
    output: S3Uri,
    totals: _Totals,
    train: _Totals,
    scores: dict[str, np.ndarray],
    thresholds: dict[str, dict],
    *,
    has_hq: bool,
    digest: str,
    written: bool,
) -> dict:
    """A subset's entry of the card: clips and hours (both splits, and the training clips its
    shards hold), its folders, the thresholds that define it, its score distributions, its
    digest; folders and digest None for a subset whose shards were not `written`."""
    base = output.join(subset_folder(name)) if subset_folder(name) else output
    return {
        "clips": totals.clips,
        "hours": totals.summary()["hours"],
        "train_clips": train.clips,
        "train_hours": train.summary()["hours"],
        "folder": str(base) + "/" if written else None,
        "shards": str(base.join(rendition_folder(TRAIN, SMALL))) + "/" if written else None,
        "hq_shards": str(base.join(rendition_folder(TRAIN, "hq"))) + "/" if written and has_hq else None,
        "thresholds": thresholds,
        "scores": {s: _distribution(v) for s, v in scores.items()},
        "digest": digest if written else None,
    }


def _scores(parts: list[_Part], store: ObjectStore) -> tuple[dict[str, np.ndarray], _Totals, Counter]:
    """Pass 1 over the clips long enough to keep, in part order: each filter score's values (NaN
    where a clip has none), their totals and their camera motions."""
    scores: dict[str, list[np.ndarray]] = {s: [] for s in FILTER_SCORES}
    totals, motions = _Totals(), Counter()
    for part in parts:
        chunk: dict[str, list[float]] = {s: [] for s in FILTER_SCORES}
        for line in _lines(store, part.uri.join(CLIPS_FILE)):
            clip = ClipRecord.from_json(line)
            if clip.too_short:
                continue
            totals.add(clip)
            motions[clip.camera_motion] += 1
            for s in FILTER_SCORES:
                chunk[s].append(score_value(clip, s))
        for s in FILTER_SCORES:
            scores[s].append(np.array(chunk[s], dtype=np.float64))
    # float64, not float32: the bounds equal those a reader computes from the manifest's values (ablations).
    return {s: np.concatenate([np.zeros(0), *arrays]) for s, arrays in scores.items()}, totals, motions


def _near_duplicates(
    parts: list[_Part], bounds: dict[str, dict], config: CurationConfig, store: ObjectStore
) -> dict[str, str]:
    """Dropped key -> kept key among the clips every other filter keeps (so the copy kept is really
    kept), the highest aesthetic score kept of each group; clips without perceptual hashes are left out."""
    index = DuplicateIndex(max_distance=config.dedup.max_distance)
    for part in parts:
        for line in _lines(store, part.uri.join(CLIPS_FILE)):
            clip = ClipRecord.from_json(line)
            if clip.phash and not clip.too_short:
                apply_filters([clip], bounds)
                if clip.kept:
                    index.add(clip.key, clip.phash, float(clip.scores.get("aesthetic", np.nan)))
    return index.duplicates()


def _bucket_labels() -> list[str]:
    return [label for _, label in RESOLUTION_BUCKETS] + [_ABOVE]


def _after_tab_key(line: str) -> str:
    return line.split("\t", 1)[0]


def _strip_keys(path: Path) -> None:
    """Drop the sort keys the merge went by (`key<TAB>line`), in place."""
    stripped = path.with_suffix(".stripped")
    with open(path) as source, open(stripped, "w") as out:
        out.writelines(_after_tab(line) for line in source)
    os.replace(stripped, path)


def _stream_part(
    part: S3Uri,
    placed: dict[str, ClipRecord],
    showcase: _Showcase,
    writers: list[_ShardWriter],
    store: ObjectStore,
) -> None:
    """Stream a part's clips.tar once: each placed clip's renditions into the shards of the subsets
    that hold it, the showcase clips' thumbnails and previews; memory holds one clip at a time."""
    with store.open(part.join(CLIPS_TAR)) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            rendition = _EXT_RENDITION.get(ext)
            if ext == "jpg" and showcase.wants(key):
                showcase.media.thumbnails[key] = tar.extractfile(member).read()
            elif rendition is not None:
                # A file its record does not list is in no writer's placements: no manifest row could name its shard.
                targets = [w for w in writers if w.wants(key, rendition)]
                preview = rendition == SMALL and showcase.wants(key)
                if not targets and not preview:
                    continue
                mp4 = tar.extractfile(member).read()
                if preview:
                    showcase.media.previews[key] = _preview_webp(mp4, first_frame=showcase.first_frame(key))
                if targets:
                    row = _row(placed[key])
                    for writer in targets:
                        writer.write(key, rendition, mp4, row)
        stream.read()  # to the end: tarfile stops at its end marker, the checksum is verified at EOF


def _row(clip: ClipRecord) -> str:
    """A clip's manifest row and shard JSON: its record, `too_short` said by `drop_reasons`."""
    return dataclasses.replace(clip, too_short=None).to_json()
