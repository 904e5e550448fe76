"""`vdm curate`: list inputs, split them into input shards, annotate each shard
(skipping shards already published), then finalize, all in one MLflow run. The KFP
curation pipeline runs the same three steps as components, fanning out over the shards."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from components.common.objectstore import ObjectStore, S3Uri, is_s3_uri
from components.common.settings import Settings
from components.curation.annotate import Annotators, annotate_shard
from components.curation.config import CurationConfig
from components.curation.finalize import finalize
from components.curation.tracking import curation_run, log_card

# Metadata next to videos (manifests, sidecars) is not input; anything else is,
# so a video with a wrong extension is rejected with a reason, not ignored.
_NOT_VIDEO = (".json", ".jsonl", ".txt", ".md", ".yaml", ".yml", ".csv")


def list_inputs(location: str, store: ObjectStore | None) -> list[tuple[str, int]]:
    """(path or URI, size) of every candidate video under a folder or s3:// prefix, sorted."""
    if is_s3_uri(location):
        found = [(str(o.uri), o.size) for o in store.list(location)]
    else:
        found = [(str(p), p.stat().st_size) for p in Path(location).rglob("*") if p.is_file()]
    return sorted(
        (name, size)
        for name, size in found
        if not os.path.basename(name).startswith(("_", ".")) and not name.lower().endswith(_NOT_VIDEO)
    )


def input_shards(inputs: list[tuple[str, int]], videos_per_shard: int) -> list[tuple[str, list[str]]]:
    """Fixed-size groups of inputs, each named by a hash of its members (name and size):
    unchanged inputs map to the same shard id, so a re-run finds its parts."""
    shards = []
    for start in range(0, len(inputs), videos_per_shard):
        group = inputs[start : start + videos_per_shard]
        digest = hashlib.sha256(json.dumps(group).encode()).hexdigest()[:16]
        shards.append((f"shard-{digest}", [name for name, _ in group]))
    return shards


@dataclass
class CurationResult:
    inputs: int  # candidate files found under the input location
    input_shards: int
    skipped_shards: int  # input shards already published by an earlier run
    card: dict  # the dataset card (dataset_card.json)
    parts: list[dict]  # each input shard's part info
    run_id: str  # the MLflow run that records this curation
    run_url: str


def curate(
    input_location: str,
    output: str,
    config: CurationConfig,
    store: ObjectStore,
    *,
    workers: int | None = None,
    progress: bool = False,
    settings: Settings | None = None,
) -> CurationResult:
    out = S3Uri.parse(output)
    workers = workers or os.cpu_count() or 1
    inputs = list_inputs(input_location, store)
    if not inputs:
        raise ValueError(f"no input files under {input_location}")
    shards = input_shards(inputs, config.output.videos_per_input_shard)
    with curation_run(input_location, out, config, settings=settings) as run:
        annotators = Annotators(config, store)
        parts, infos = [], []
        for shard_id, videos in tqdm(shards, desc="input shards", unit="shard", disable=not progress):
            part = out.join("parts", shard_id)
            infos.append(annotate_shard(videos, part, config, store, annotators, workers=workers, progress=progress))
            parts.append(part)
        card = finalize(parts, out, config, store, input_location=input_location)
        log_card(card, out, store)
    return CurationResult(
        inputs=len(inputs),
        input_shards=len(shards),
        skipped_shards=sum(i["skipped"] for i in infos),
        card=card,
        parts=infos,
        run_id=run.run_id,
        run_url=run.url,
    )
