"""Serving latency and throughput: `vdm serve` over HTTP at concurrency 1, 2 and 4,
against the same model version called in-process (generate + mp4 encode) in the same
run. `overhead` is the HTTP p50 at concurrency 1 over the in-process p50.

Needs a running stack (`vdm stack up`; `make bench` starts it). Without `--model`, a
tiny text-to-video model is trained for one step and registered (speed does not
depend on training). Prints JSON.

    python benchmarks/serve.py [--model models:/NAME@ALIAS] [--requests 8] [--steps 10]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import torch
from mlflow import MlflowClient

from components.common.media import video_bytes
from components.common.tracking import connect, tracked_run
from components.registry.pipeline_model import download_pipeline, register_pipeline
from components.registry.promotion import registered_version
from model.pipeline import GenerationConfig, generate, to_uint8
from model.stages import VideoDiffusion, named_config

CONCURRENCY = (1, 2, 4)
BENCH_MODEL = "vdm-bench-serving"


def percentiles(latencies: list[float]) -> dict[str, float]:
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"p50_s": round(q[49], 4), "p95_s": round(q[94], 4), "p99_s": round(q[98], 4)}


def tiny_model(scratch: Path) -> str:
    from components.sample_data.shards import write_shapes_shards
    from model.train import train

    paths, _ = write_shapes_shards(scratch / "shards", shards=1, clips_per_shard=2)
    final = train(replace(named_config("tiny", "video"), max_steps=1), [str(p) for p in paths], scratch / "train").final
    with tracked_run("vdm-bench-serving"):
        version = register_pipeline(final, BENCH_MODEL, {})
    return f"models:/{BENCH_MODEL}/{version.version}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_process(folder: Path, request: dict, repeats: int) -> list[float]:
    model = VideoDiffusion.load(folder)
    config = GenerationConfig(
        num_frames=request["num_frames"],
        height=model.config.clip.height,
        width=model.config.clip.width,
        fps=model.config.clip.fps,
        steps=request["num_steps"],
    )
    latencies = []
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        video_bytes(to_uint8(generate(model, request["prompt"], config)).numpy(), config.fps)
        latencies.append(time.perf_counter() - start)
    return latencies[1:]


def over_http(url: str, key: str, request: dict, concurrency: int, total: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    remaining = iter(range(total))
    lock = threading.Lock()

    def worker():
        with httpx.Client(timeout=600, headers={"Authorization": f"Bearer {key}"}) as client:
            while True:
                with lock:
                    if next(remaining, None) is None:
                        return
                start = time.perf_counter()
                response = client.post(f"{url}/text_to_video", json=request)
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    parser.add_argument("--requests", type=int, default=8, help="per concurrency level")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    connect()
    request = {"prompt": "a red disc moving right", "num_frames": args.frames, "num_steps": args.steps}

    with tempfile.TemporaryDirectory() as tmp:
        name, version = registered_version(args.model or tiny_model(Path(tmp)))
        MlflowClient().set_registered_model_alias(name, "bench", version)  # pin it while we measure
        baseline = in_process(download_pipeline(f"models:/{name}/{version}", Path(tmp) / "dl"), request, args.requests)

        key = secrets.token_urlsafe(32)
        keys = Path(tmp) / "api-keys"
        keys.write_text(key + "\n")
        keys.chmod(0o600)
        port = free_port()
        serve = [sys.executable, "-m", "vdm.cli", "serve", "--model", f"models:/{name}@bench"]
        options = ["--port", str(port), "--max-concurrency", str(max(CONCURRENCY)), "--poll-seconds", "0"]
        server = subprocess.Popen(
            [*serve, *options],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=os.environ | {"VDM_SERVE_API_KEYS_FILE": str(keys)},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            over_http(url, key, request, 1, 1)  # warm-up
            levels = {}
            for concurrency in CONCURRENCY:
                latencies, wall = over_http(url, key, request, concurrency, args.requests)
                levels[str(concurrency)] = percentiles(latencies) | {"throughput_rps": round(len(latencies) / wall, 3)}
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.pid, signal.SIGKILL)

    in_process_p50 = percentiles(baseline)["p50_s"]
    print(
        json.dumps(
            {
                "benchmark": "serving",
                "model": f"models:/{name}/{version}",
                "request": request,
                "device": "cuda" if torch.cuda.is_available() else "cpu",
                "in_process": percentiles(baseline) | {"throughput_rps": round(len(baseline) / sum(baseline), 3)},
                "http": levels,
                "overhead": round(levels["1"]["p50_s"] / in_process_p50, 3),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
