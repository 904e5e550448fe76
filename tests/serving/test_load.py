"""The bounded load test (benchmarks/serve_load.py) against the real local stack: locust
with twice max_concurrency users against `vdm serve` for 15 s. Every request is answered
200, 429 or 504, and no more than max_concurrency generations ever compute at once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "serve_load.py"
MAX_CONCURRENCY = 2

pytestmark = pytest.mark.slow


def test_under_twice_max_concurrency_users_every_answer_is_200_429_or_504_and_the_limit_holds(stack):
    options = ["--seconds", "15", "--max-concurrency", str(MAX_CONCURRENCY), "--timeout", "4", "--steps", "1,30"]
    start = time.monotonic()
    run = subprocess.run([sys.executable, str(SCRIPT), *options], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout)
    assert report["users"] == 2 * MAX_CONCURRENCY and report["seconds"] < 15 + 4 + 15
    answers = report["answers"]
    assert set(answers) <= {"200", "429", "504"}, answers
    assert answers.get("200", 0) > 0 and answers.get("429", 0) > 0, answers  # served, and refused some
    assert report["requests"] == sum(answers.values())
    # The load reached the limit, and never went past it.
    assert report["peak_concurrent_generations"] == MAX_CONCURRENCY, report
    assert report["sampled_max_running"] <= MAX_CONCURRENCY, report
    assert (
        report["peak_rss_mib"]["worker"] > 100 and report["peak_rss_mib"]["total"] >= report["peak_rss_mib"]["worker"]
    )
    assert time.monotonic() - start < 150
