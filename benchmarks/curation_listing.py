"""Listing and planning a corpus-sized input prefix: time and peak Python memory of streaming
100,000 placeholder objects (zero bytes each) into input shards, against holding the whole
sorted listing; then the same with half of the corpus already published as parts (a re-run over
a grown prefix), which reads every published part's video list first.

Needs a running stack (`vdm stack up`; `make bench` starts it). The placeholders are put once
(parallel puts) under `s3://<data bucket>/bench/curation-listing/<count>/` and reused by later
runs; `--clean` removes them. Prints JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

from minio import Minio
from minio.deleteobjects import DeleteObject

from components.common.objectstore import ObjectStore, S3Uri
from components.common.settings import load_settings
from components.curation.annotate import PART_INFO
from components.curation.config import CurationConfig
from components.curation.curate import plan_input_shards

VIDEOS_PER_SHARD = 16


def measure(fn) -> tuple[object, float, float]:
    """fn's result, its seconds (untraced) and its peak traced memory in MiB (a second run under
    tracemalloc, which slows Python's allocations several times)."""
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return result, seconds, peak


def put_placeholders(raw: Minio, bucket: str, keys: list[str], data: bytes = b"") -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda key: raw.put_object(bucket, key, io.BytesIO(data), len(data)), keys))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--clean", action="store_true", help="remove the placeholders afterwards")
    args = parser.parse_args()
    settings = load_settings()
    store = ObjectStore.from_settings(settings)
    raw = Minio(
        settings.s3_host, settings.access_key, settings.secret_key.get_secret_value(), secure=settings.s3_secure
    )
    bucket, base = settings.data_bucket, f"bench/curation-listing/{args.count}"
    raw_prefix, out = f"s3://{bucket}/{base}/raw/", S3Uri(bucket, f"{base}/out")
    keys = [f"{base}/raw/v{i:07d}.mp4" for i in range(args.count)]
    present = sum(1 for _ in raw.list_objects(bucket, prefix=f"{base}/raw/", recursive=True))
    put_s = put_placeholders(raw, bucket, keys) if present < args.count else None

    # Half the corpus published as parts of an earlier run (part.json with its videos, then _MANIFEST.json).
    half = keys[: args.count // 2]
    groups = [half[i : i + VIDEOS_PER_SHARD] for i in range(0, len(half), VIDEOS_PER_SHARD)]
    parts = [
        (f"{base}/out/parts/shard-{i:07d}", json.dumps({"videos": [f"s3://{bucket}/{k}" for k in g]}).encode())
        for i, g in enumerate(groups)
    ]
    present_parts = sum(1 for _ in raw.list_objects(bucket, prefix=f"{base}/out/parts/", recursive=True))
    if present_parts < 2 * len(parts):
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda p: raw.put_object(bucket, f"{p[0]}/{PART_INFO}", io.BytesIO(p[1]), len(p[1])), parts))
            list(pool.map(lambda p: raw.put_object(bucket, f"{p[0]}/_MANIFEST.json", io.BytesIO(b"{}"), 2), parts))

    config = CurationConfig()

    def whole_listing():
        return sorted((str(o.uri), o.size) for o in store.list(raw_prefix))

    def streamed(output):
        shards = files = 0
        for shard in plan_input_shards(raw_prefix, output, config, store):
            shards, files = shards + 1, files + shard.files
        return shards, files

    listing, whole_s, whole_mib = measure(whole_listing)
    (shards, files), plan_s, plan_mib = measure(lambda: streamed(None))
    (re_shards, re_files), replan_s, replan_mib = measure(lambda: streamed(out))
    assert len(listing) == files == re_files == args.count, (len(listing), files, re_files)
    results = {
        "objects": args.count,
        "put_seconds": None if put_s is None else round(put_s, 1),
        "whole_sorted_listing": {"seconds": round(whole_s, 2), "peak_MiB": round(whole_mib, 1)},
        "streamed_plan": {
            "seconds": round(plan_s, 2),
            "peak_MiB": round(plan_mib, 2),
            "input_shards": shards,
            "objects_per_s": round(args.count / plan_s),
        },
        "streamed_plan_half_published": {
            "published_parts": len(parts),
            "seconds": round(replan_s, 2),
            "peak_MiB": round(replan_mib, 2),
            "input_shards": re_shards,
        },
    }
    if args.clean:
        doomed = (DeleteObject(o.object_name) for o in raw.list_objects(bucket, prefix=f"{base}/", recursive=True))
        for error in raw.remove_objects(bucket, doomed):
            raise RuntimeError(f"could not remove {error.object_name}: {error.message}")
    print(json.dumps({"benchmark": "curation_listing", "endpoint": settings.s3_endpoint, "results": results}, indent=1))


if __name__ == "__main__":
    main()
