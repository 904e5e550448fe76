"""Object store throughput: our module (sha256 recorded and verified, atomic
downloads) against the bare minio SDK, in the same run on the same server.

Needs a running stack (`vdm stack up`; `make bench` starts it). Prints JSON;
`ratio` < 1 means our module is slower than the bare SDK.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

from minio import Minio

from components.common.objectstore import ObjectStore
from components.common.settings import load_settings

BIG_MIB = 64
SMALL_COUNT = 200
SMALL_BYTES = 4096


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    settings = load_settings()
    store = ObjectStore.from_settings(settings)
    raw = Minio(
        settings.s3_host, settings.access_key, settings.secret_key.get_secret_value(), secure=settings.s3_secure
    )
    bucket, run = settings.data_bucket, f"bench/{uuid.uuid4().hex[:8]}"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.bin"
        big.write_bytes(os.urandom(BIG_MIB << 20))
        ours_up = best_of(3, lambda: store.upload_file(big, f"s3://{bucket}/{run}/ours.bin"))
        raw_up = best_of(3, lambda: raw.fput_object(bucket, f"{run}/raw.bin", str(big)))
        ours_down = best_of(3, lambda: store.download_file(f"s3://{bucket}/{run}/ours.bin", Path(tmp) / "o.bin"))
        raw_down = best_of(3, lambda: raw.fget_object(bucket, f"{run}/raw.bin", str(Path(tmp) / "r.bin")))
        mib = BIG_MIB
        results["upload_64MiB"] = {"ours_MiB_s": mib / ours_up, "sdk_MiB_s": mib / raw_up, "ratio": raw_up / ours_up}
        results["download_64MiB"] = {
            "ours_MiB_s": mib / ours_down,
            "sdk_MiB_s": mib / raw_down,
            "ratio": raw_down / ours_down,
        }

    payload = os.urandom(SMALL_BYTES)

    def ours_small():
        for i in range(SMALL_COUNT):
            store.put_bytes(f"s3://{bucket}/{run}/small/o{i}", payload)

    def raw_small():
        for i in range(SMALL_COUNT):
            raw.put_object(bucket, f"{run}/small/r{i}", io.BytesIO(payload), len(payload))

    ours_t, raw_t = best_of(2, ours_small), best_of(2, raw_small)
    results["put_4KiB_objects"] = {
        "ours_per_s": SMALL_COUNT / ours_t,
        "sdk_per_s": SMALL_COUNT / raw_t,
        "ratio": raw_t / ours_t,
    }

    for obj in raw.list_objects(bucket, prefix=f"{run}/", recursive=True):
        raw.remove_object(bucket, obj.object_name)
    rounded = {k: {m: round(v, 3) for m, v in d.items()} for k, d in results.items()}
    print(json.dumps({"benchmark": "objectstore", "endpoint": settings.s3_endpoint, "results": rounded}, indent=1))


if __name__ == "__main__":
    main()
