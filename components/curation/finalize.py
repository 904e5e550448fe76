"""Merge published parts: apply the filters over all clips, write the WebDataset
shards of kept clips, `manifest.jsonl`, `rejected.jsonl` and the dataset card.

Output contract (under the output prefix; `_MANIFEST.json` is written last):
- `shards/shard-NNNNNN.tar`: WebDataset samples `<key>.mp4` (the clip) and
  `<key>.json` (its manifest row), kept clips only, sorted by key;
- `manifest.jsonl`: one row per clip, kept and dropped, each a `ClipRecord`
  (model/records.py) without `too_short`: `key`, `video`, `start_frame`,
  `end_frame`, `start_s`, `end_s`, `fps`, `kept`, `drop_reasons`, `scores`
  (`motion`, `text_ratio`, `aesthetic`, `clip_sim`), `camera_motion`, `caption`
  (when a captioner gave one), ..., and `shard` for kept clips;
- `rejected.jsonl`: `video`, `reason`, `detail` per rejected file;
- `dataset_card.json` / `dataset_card.html`.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import webdataset as wds

from components.common.objectstore import ObjectStore, S3Uri
from components.curation.annotate import CLIPS_FILE, CLIPS_TAR, PART_INFO, REJECTED_FILE, read_clips, read_jsonl
from components.curation.config import SCORES, CurationConfig, Filter
from model.records import ClipRecord

TOO_SHORT = "too_short"


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


def _histogram_png(values: list[float], title: str, bound: float | None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.2, 2.0), dpi=100)
    ax.hist(values, bins=30, color="#4477aa")
    if bound is not None:
        ax.axvline(bound, color="#cc3311", linestyle="--")
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def card_html(card: dict, clips: list[ClipRecord], thumbnails: dict[str, bytes]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{card['before'][k]}</td><td>{card['after'][k]}</td></tr>"
        for k in card["before"]
    )
    warn = (
        "<p class='warn'>RANDOM WEIGHTS: neural scores and captions come from random-initialised models "
        "(--allow-random-weights). Do not train on this dataset.</p>"
        if card["random_weights"]
        else ""
    )
    bounds = {b["score"]: b.get("min", b.get("max")) for b in card["thresholds"].values()}
    plots = "".join(
        f"<img alt='{s}' src='data:image/png;base64,"
        f"{_histogram_png([c.scores[s] for c in clips if not c.too_short], s, bounds.get(s))}'>"
        for s in SCORES
    )
    drops = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in card["drops_per_filter"].items())

    def strip(selection: list[ClipRecord]) -> str:
        return "".join(
            f"<figure><img src='data:image/jpeg;base64,{base64.b64encode(thumbnails[c.key]).decode()}'>"
            f"<figcaption>{html.escape(c.key)}<br>{html.escape(c.camera_motion)} · "
            f"{html.escape(', '.join(c.drop_reasons or []) or 'kept')}<br>{html.escape(c.caption or '')}"
            "</figcaption></figure>"
            for c in selection
            if c.key in thumbnails
        )

    kept = [c for c in _showcase(clips) if c.kept]
    dropped = [c for c in _showcase(clips) if not c.kept]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Dataset card</title><style>
body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td{{border:1px solid #ccc;padding:2px 8px}}
figure{{display:inline-block;margin:4px;width:300px;font-size:11px}}
.warn{{background:#fdd;padding:8px;font-weight:bold}}
</style></head><body><h1>Dataset card</h1>{warn}
<h2>Before and after filtering</h2><table><tr><td></td><td>before</td><td>after</td></tr>{rows}</table>
<h2>Drops per filter</h2><table>{drops}</table><p>Rejected files: {card["rejected_files"]}</p>
<h2>Score histograms</h2>{plots}
<h2>Kept clips</h2>{strip(kept)}<h2>Dropped clips</h2>{strip(dropped)}</body></html>"""


def finalize(parts: list[S3Uri], output: S3Uri, config: CurationConfig, store: ObjectStore) -> dict:
    """Merge parts into the output prefix; returns the dataset card."""
    clips: list[ClipRecord] = []
    rejected, random_weights = [], False
    for part in parts:
        clips += read_clips(store.get_bytes(part.join(CLIPS_FILE)))
        rejected += read_jsonl(store.get_bytes(part.join(REJECTED_FILE)))
        random_weights |= json.loads(store.get_bytes(part.join(PART_INFO)))["random_weights"]
    clips.sort(key=lambda c: c.key)
    bounds = thresholds(clips, config.filters)
    apply_filters(clips, bounds)
    kept = [c for c in clips if c.kept]
    drops = {name: sum(name in c.drop_reasons for c in clips) for name in [TOO_SHORT, *bounds]}
    overlaps = {
        f"{a}&{b}": sum(a in c.drop_reasons and b in c.drop_reasons for c in clips)
        for i, a in enumerate(bounds)
        for b in list(bounds)[i + 1 :]
    }
    before, after = summary([c for c in clips if not c.too_short]), summary(kept)
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
        "rejected_files": len(rejected),
        "rejected_per_reason": {
            r: sum(x["reason"] == r for x in rejected) for r in sorted({x["reason"] for x in rejected})
        },
        "camera_motion_kept": {
            m: sum(c.camera_motion == m for c in kept) for m in sorted({c.camera_motion for c in kept})
        },
        "random_weights": random_weights,
        "config": config.model_dump(mode="json"),
        "parts": [str(p) for p in parts],
    }

    with tempfile.TemporaryDirectory(prefix="vdm-final-") as tmp:
        folder = Path(tmp)
        thumbnails = _write_shards(parts, {c.key: c for c in kept}, _showcase(clips), output, folder, config, store)
        with open(folder / "manifest.jsonl", "w") as f:
            f.writelines(_row(c) + "\n" for c in clips)
        with open(folder / "rejected.jsonl", "w") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in sorted(rejected, key=lambda r: r["video"]))
        (folder / "dataset_card.json").write_text(json.dumps(card, indent=1, sort_keys=True))
        (folder / "dataset_card.html").write_text(card_html(card, clips, thumbnails))
        store.publish_folder(folder, output)
    return card


def _row(clip: ClipRecord) -> str:
    """A clip's manifest row and shard JSON: its record, `too_short` said by `drop_reasons`."""
    return dataclasses.replace(clip, too_short=None).to_json()


def _showcase(clips: list[ClipRecord], count: int = 12) -> list[ClipRecord]:
    """The clips the HTML card shows: the first kept and the first dropped ones."""
    return [c for c in clips if c.kept][:count] + [c for c in clips if not c.kept][:count]


def _write_shards(
    parts: list[S3Uri],
    kept: dict[str, ClipRecord],
    showcase: list[ClipRecord],
    output: S3Uri,
    folder: Path,
    config: CurationConfig,
    store: ObjectStore,
) -> dict[str, bytes]:
    """Stream each part's clips once, in part order, into `shards/` (kept clips only),
    setting each kept clip's `shard`; memory holds one clip at a time. Returns the
    thumbnails of the showcase clips."""
    (folder / "shards").mkdir()
    wanted_thumbnails = {c.key for c in showcase}
    thumbnails: dict[str, bytes] = {}
    writer, written = None, 0
    for part in parts:
        with store.open(part.join(CLIPS_TAR)) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext == "jpg" and key in wanted_thumbnails:
                    thumbnails[key] = tar.extractfile(member).read()
                elif ext == "mp4" and key in kept:
                    if written % config.output.clips_per_shard == 0:
                        if writer:
                            writer.close()
                        name = f"shards/shard-{written // config.output.clips_per_shard:06d}.tar"
                        writer = wds.TarWriter(str(folder / name), mtime=0)
                    kept[key].shard = str(output.join(name))
                    writer.write({"__key__": key, "mp4": tar.extractfile(member).read(), "json": _row(kept[key])})
                    written += 1
            stream.read()  # to the end: tarfile stops at its end marker, the checksum is verified at EOF
    if writer:
        writer.close()
    return thumbnails
