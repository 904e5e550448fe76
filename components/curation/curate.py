"""`vdm curate`: check the output can be written, list inputs into input shards as the
listing pages in (setting aside videos an earlier run already annotated), annotate each new
shard, then finalize, all in one MLflow run. The KFP curation pipeline runs the same three
steps as components, fanning out over the shards."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from components.common.objectstore import MANIFEST_NAME, ObjectStore, S3Uri, is_s3_uri
from components.common.settings import Settings
from components.curation.annotate import PART_INFO, Annotators, annotate_shard
from components.curation.config import CurationConfig
from components.curation.finalize import finalize
from components.curation.tracking import curation_run, log_card

PARTS = "parts"


@dataclass(frozen=True)
class InputFile:
    location: str  # a path or s3:// URI
    size: int  # bytes


@dataclass(frozen=True)
class InputShard:
    """A group of input videos annotated together into `<output>/parts/<id>/`."""

    id: str
    videos: tuple[str, ...]  # empty for a published part: its part.json lists them
    files: int  # videos listed in this shard
    bytes: int  # their total size
    published: bool = False  # an earlier run annotated it; nothing to do


def iter_inputs(location: str, store: ObjectStore | None) -> Iterator[InputFile]:
    """Every file under a folder or s3:// prefix, yielded as the listing pages in (s3://: key
    order; a folder: each directory's entries sorted). Whatever its name, a file is an input: a
    video is curated, anything else ends in rejected.jsonl with its reason (curation reads the
    content, not the name). Only the object store's own record of a published folder
    (`_MANIFEST.json`) and folder markers are not inputs."""
    remote = is_s3_uri(location)
    found = ((str(o.uri), o.size) for o in store.list(location)) if remote else _walk(Path(location))
    for name, size in found:
        if not name.endswith("/") and os.path.basename(name) != MANIFEST_NAME:
            yield InputFile(name, size)


def _walk(folder: Path) -> Iterator[tuple[str, int]]:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if path.is_file():
                yield str(path), path.stat().st_size


def shard_inputs(inputs: Iterable[InputFile], max_videos: int, max_bytes: int) -> Iterator[InputShard]:
    """Consecutive inputs grouped as they come: a shard closes at `max_videos` videos or before it
    would pass `max_bytes` (bytes stand in for decode time; a larger file is a shard of its own).
    Each is named by a hash of its members (name and size), so the same group keeps its id."""
    group: list[InputFile] = []
    size = 0
    for item in inputs:
        if group and (len(group) >= max_videos or size + item.size > max_bytes):
            yield _shard(group)
            group, size = [], 0
        group.append(item)
        size += item.size
    if group:
        yield _shard(group)


def _shard(group: list[InputFile]) -> InputShard:
    digest = hashlib.sha256(json.dumps([[f.location, f.size] for f in group]).encode()).hexdigest()[:16]
    return InputShard(f"shard-{digest}", tuple(f.location for f in group), len(group), sum(f.size for f in group))


def _name_hash(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


class PublishedParts:
    """The parts earlier runs published under an output prefix, and which videos they hold: each
    video as a 64-bit hash of its name in a sorted array (about 20 bytes a video with its part and
    listed size, not the names), so a re-run over a grown input sets aside what is done."""

    def __init__(self, ids: list[str], hashes: np.ndarray, part_of: np.ndarray, output: S3Uri | None = None):
        order = np.argsort(hashes, kind="stable")
        self.ids, self.output = ids, output
        self._hashes, self._part_of = hashes[order], part_of[order]
        self._listed_size = np.full(len(hashes), -1, dtype=np.int64)  # -1: not listed this time

    @classmethod
    def load(cls, output: S3Uri, store: ObjectStore, workers: int = 8) -> PublishedParts:
        """Read the video lists of every published part (`parts/<id>/` with its `_MANIFEST.json`)."""
        base = output.join(PARTS)
        ids = [
            o.uri.key[len(base.key) + 1 :].split("/")[0]
            for o in store.list(str(base) + "/")
            if o.uri.key.count("/") == base.key.count("/") + 2 and o.uri.key.endswith("/" + MANIFEST_NAME)
        ]

        def hashes_of(part_id: str) -> np.ndarray:
            info = json.loads(store.get_bytes(base.join(part_id, PART_INFO)))
            return np.array([_name_hash(v) for v in info["videos"]], dtype=np.uint64)

        with ThreadPoolExecutor(workers) as pool:
            per_part = list(pool.map(hashes_of, ids))
        hashes = np.concatenate([np.zeros(0, np.uint64), *per_part])
        part_of = np.repeat(np.arange(len(ids), dtype=np.int32), [len(h) for h in per_part])
        return cls(ids, hashes, part_of, output)

    @classmethod
    def none(cls) -> PublishedParts:
        return cls([], np.zeros(0, np.uint64), np.zeros(0, np.int32))

    def take(self, item: InputFile) -> bool:
        """True (and noted) if a published part holds this video."""
        if not len(self._hashes):
            return False
        h = np.uint64(_name_hash(item.location))
        i = int(np.searchsorted(self._hashes, h))
        if i < len(self._hashes) and self._hashes[i] == h:
            self._listed_size[i] = item.size
            return True
        return False

    def finish(self, store: ObjectStore) -> tuple[list[InputShard], list[InputFile]]:
        """After the listing: the parts whose every video was listed again (done), and the listed
        videos of parts that lost some (to annotate anew: their part would keep clips of videos gone)."""
        listed = self._listed_size >= 0
        total = np.bincount(self._part_of, minlength=len(self.ids))
        seen = np.bincount(self._part_of[listed], minlength=len(self.ids))
        size = np.bincount(self._part_of[listed], weights=self._listed_size[listed], minlength=len(self.ids))
        done = [
            InputShard(part_id, (), int(seen[i]), int(size[i]), published=True)
            for i, part_id in enumerate(self.ids)
            if seen[i] == total[i] and total[i]
        ]
        again = []
        for i in np.flatnonzero((seen > 0) & (seen < total)):
            info = json.loads(store.get_bytes(self.output.join(PARTS, self.ids[i], PART_INFO)))
            for video in info["videos"]:
                j = int(np.searchsorted(self._hashes, np.uint64(_name_hash(video))))
                if self._listed_size[j] >= 0:
                    again.append(InputFile(video, int(self._listed_size[j])))
        return done, sorted(again, key=lambda f: f.location)


def plan_input_shards(
    location: str, output: S3Uri | None, config: CurationConfig, store: ObjectStore | None
) -> Iterator[InputShard]:
    """The input shards of a curation, streamed: new videos grouped as the listing pages in, then
    the parts already published under `output` (None: none looked for). A published part stays
    as it is, so a grown input prefix annotates only its new videos; a part that lost a video
    is replaced by a part of its remaining ones."""
    published = PublishedParts.load(output, store) if output is not None else PublishedParts.none()
    size = config.output
    new = (f for f in iter_inputs(location, store) if not published.take(f))
    yield from shard_inputs(new, size.videos_per_input_shard, size.bytes_per_input_shard)
    done, again = published.finish(store)
    yield from shard_inputs(again, size.videos_per_input_shard, size.bytes_per_input_shard)
    yield from done


@dataclass
class CurationResult:
    inputs: int  # candidate files found under the input location
    input_shards: int
    skipped_shards: int  # input shards already published by an earlier run
    card: dict  # the dataset card (dataset_card.json)
    parts: list[dict]  # the part info of each input shard this run annotated (with its `part` URI)
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
    store.check_writable(out)  # before any listing or decoding: a missing bucket fails in a second
    workers = workers or os.cpu_count() or 1
    plan = plan_input_shards(input_location, out, config, store)
    first = next(plan, None)
    if first is None:
        raise ValueError(f"no input files under {input_location}")
    inputs = shards = skipped = 0
    parts, infos = [], []
    with curation_run(input_location, out, config, settings=settings) as run:
        annotators = None  # loaded at the first shard to annotate: a re-run with nothing new loads no model
        for shard in tqdm(itertools.chain([first], plan), desc="input shards", unit="shard", disable=not progress):
            part = out.join(PARTS, shard.id)
            inputs, shards = inputs + shard.files, shards + 1
            parts.append(part)
            if shard.published:
                skipped += 1
                continue
            if annotators is None:
                annotators = Annotators(config, store)
            info = annotate_shard(
                list(shard.videos), part, config, store, annotators, workers=workers, progress=progress
            )
            skipped += info["skipped"]  # published meanwhile by another run
            infos.append({k: v for k, v in info.items() if k != "videos"} | {"part": str(part)})
        card = finalize(parts, out, config, store, input_location=input_location)
        log_card(card, out, store)
    return CurationResult(
        inputs=inputs,
        input_shards=shards,
        skipped_shards=skipped,
        card=card,
        parts=infos,
        run_id=run.run_id,
        run_url=run.url,
    )
