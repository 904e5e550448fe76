"""Serving under load: `vdm serve` on 127.0.0.1 with `--max-concurrency N` and a short
request timeout, driven by locust (benchmarks/serve_locustfile.py) with 2N users for a
bounded time. While it runs, the service's `vdm_serving_generations_running` gauge is read
from /metrics; at the end its `vdm_serving_generations_peak`. Prints JSON: the requests,
the answers by status code, the peak of generations computing at once (never above N:
timed-out and abandoned generations hold their slot until they stop), the generations
cancelled by reason, and the peak RSS of the server's processes.

Needs a running stack (`vdm stack up`). Without `--model` an untrained tiny text-to-video
model is registered (load behaviour does not depend on its weights).

    python benchmarks/serve_load.py [--model models:/NAME@ALIAS] [--seconds 25] [--max-concurrency 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "benchmarks" / "serve_locustfile.py"
LOAD_MODEL = "vdm-bench-serving-load"
ANSWERED = {"200", "429", "504"}


@dataclass
class LoadReport:
    benchmark: str
    model: str
    users: int
    max_concurrency: int
    server_timeout_s: float
    seconds: float
    requests: int
    answers: dict[str, int]
    peak_concurrent_generations: int  # the most generations computing at once (the service's own count)
    sampled_max_running: int  # the most seen in /metrics while locust ran
    cancelled: dict[str, int]
    peak_rss_mib: dict[str, float]  # per server process (VmHWM), and their sum


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def untrained_model(scratch: Path) -> str:
    from components.common.tracking import tracked_run
    from components.registry.pipeline_model import register_pipeline
    from model.stages import VideoDiffusion, named_config

    folder = VideoDiffusion.create(named_config("tiny", "video")).save(scratch / "final")
    with tracked_run("vdm-bench-serving"):
        version = register_pipeline(folder, LOAD_MODEL, {})
    return f"models:/{LOAD_MODEL}/{version.version}"


def metric(text: str, name: str, labels: str = "") -> float:
    """The sum of a metric's samples in a Prometheus exposition, `labels` a substring of theirs."""
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.M)
    return sum(float(value) for found, value in pattern.findall(text) if labels in found)


def peak_rss_mib(root: int) -> dict[str, float]:
    """VmHWM (peak resident memory) of each process under `root`, by its role."""
    peaks: dict[str, float] = {}
    for process in psutil.Process(root).children(recursive=True):
        with contextlib.suppress(psutil.Error, OSError):
            status = Path(f"/proc/{process.pid}/status").read_text()
            (kib,) = re.findall(r"^VmHWM:\s+(\d+) kB", status, re.M)
            command = " ".join(process.cmdline())
            role = "worker" if "_bentoml_impl.worker" in command else "bentoml" if "bentoml" in command else "other"
            peaks[role] = round(peaks.get(role, 0.0) + int(kib) / 1024, 1)
    peaks["total"] = round(sum(peaks.values()), 1)
    return peaks


@contextlib.contextmanager
def serving(spec: str, max_concurrency: int, timeout_s: float, keys: Path, log: Path):
    """`vdm serve` of `spec` until ready: its URL and its process."""
    port = free_port()
    command = [sys.executable, "-m", "vdm.cli", "serve", "--model", spec, "--port", str(port)]
    options = ["--max-concurrency", str(max_concurrency), "--poll-seconds", "0"]
    env = os.environ | {"VDM_SERVE_TIMEOUT_SECONDS": str(timeout_s), "VDM_SERVE_API_KEYS_FILE": str(keys)}
    with open(log, "w") as out:
        server = subprocess.Popen(
            [*command, *options], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vdm serve did not get ready:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield url, server
    finally:
        server.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)


def run_load(
    model: str | None, seconds: float, max_concurrency: int, timeout_s: float, steps: tuple[int, int]
) -> LoadReport:
    from mlflow import MlflowClient

    from components.common.tracking import connect
    from components.registry.promotion import registered_version

    connect()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        name, version = registered_version(model or untrained_model(scratch))
        MlflowClient().set_registered_model_alias(name, "load", version)
        key = secrets.token_urlsafe(32)
        keys = scratch / "api-keys"
        keys.write_text(key + "\n")
        keys.chmod(0o600)
        users = 2 * max_concurrency
        with serving(f"models:/{name}@load", max_concurrency, timeout_s, keys, scratch / "serve.log") as (url, server):
            sampled = 0
            done = threading.Event()

            def sample() -> None:  # the running gauge, while locust runs
                nonlocal sampled
                while not done.is_set():
                    with contextlib.suppress(httpx.TransportError):
                        text = httpx.get(f"{url}/metrics", timeout=5).text
                        sampled = max(sampled, int(metric(text, "vdm_serving_generations_running")))
                    done.wait(0.2)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            report = scratch / "answers.json"
            locust = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url]
            # Users finish the request they are in (the server answers it within its timeout).
            timing = ["-u", str(users), "-r", str(users), "-t", f"{seconds:g}s", "--stop-timeout", f"{timeout_s + 5:g}"]
            env = os.environ | {
                "VDM_LOAD_KEY": key,
                "VDM_LOAD_REPORT": str(report),
                "VDM_LOAD_TIMEOUT": str(timeout_s + 10),
                "VDM_LOAD_STEPS": f"{steps[0]},{steps[1]}",
            }
            start = time.monotonic()
            run = subprocess.run(
                [*locust, *timing, "--only-summary", "--loglevel", "WARNING"],
                env=env,
                capture_output=True,
                text=True,
                timeout=seconds + timeout_s + 60,
            )
            wall = time.monotonic() - start
            done.set()
            sampler.join()
            if not report.exists():
                raise RuntimeError(f"locust wrote no report (exit {run.returncode}):\n{run.stderr[-3000:]}")
            answers = json.loads(report.read_text())
            text = httpx.get(f"{url}/metrics", timeout=5).text
            cancelled = {
                reason: int(metric(text, "vdm_serving_generations_cancelled_total", f'reason="{reason}"'))
                for reason in ("timeout", "disconnect")
            }
            return LoadReport(
                benchmark="serving-load",
                model=f"models:/{name}/{version}",
                users=users,
                max_concurrency=max_concurrency,
                server_timeout_s=timeout_s,
                seconds=round(wall, 1),
                requests=sum(answers.values()),
                answers=dict(sorted(answers.items())),
                peak_concurrent_generations=int(metric(text, "vdm_serving_generations_peak")),
                sampled_max_running=sampled,
                cancelled=cancelled,
                peak_rss_mib=peak_rss_mib(server.pid),
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    parser.add_argument("--seconds", type=float, default=25.0, help="how long locust sends requests (at most 40)")
    parser.add_argument("--max-concurrency", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=4.0, help="the server's request timeout in seconds")
    parser.add_argument("--steps", default="2,40", help="MIN,MAX sampler steps of a request (drawn per request)")
    args = parser.parse_args()
    if not 0 < args.seconds <= 40:
        parser.error("--seconds: between 0 and 40")
    low, high = (int(n) for n in args.steps.split(","))
    with contextlib.redirect_stdout(sys.stderr):  # MLflow prints its run links: stdout is the JSON alone
        report = run_load(args.model, args.seconds, args.max_concurrency, args.timeout, (low, high))
    print(json.dumps(asdict(report), indent=1))


if __name__ == "__main__":
    main()
