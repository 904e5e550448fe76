"""Locust users for benchmarks/serve_load.py: each posts text-to-video requests of a random
length to the service as fast as it is answered, and every answer's status is counted.

Configured by the environment (serve_load.py sets it): VDM_LOAD_KEY (the API key),
VDM_LOAD_REPORT (where the counts go, as JSON, when locust quits), VDM_LOAD_TIMEOUT (the
client's timeout in seconds: longer than the server's, so the server answers 504 first),
VDM_LOAD_STEPS (`MIN,MAX` sampler steps)."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

from locust import HttpUser, between, events, task

ANSWERS: Counter[str] = Counter()
STEPS = tuple(int(n) for n in os.environ.get("VDM_LOAD_STEPS", "2,40").split(","))


@events.request.add_listener
def _count(response=None, exception=None, **_) -> None:
    status = getattr(response, "status_code", 0) or 0
    ANSWERS[str(status) if status else f"error: {type(exception).__name__}"] += 1


@events.quitting.add_listener
def _report(**_) -> None:
    Path(os.environ["VDM_LOAD_REPORT"]).write_text(json.dumps(dict(ANSWERS)))


class VideoClient(HttpUser):
    wait_time = between(0.1, 0.3)

    @task
    def text_to_video(self) -> None:
        request = {"prompt": "a red disc moving right", "num_frames": 8, "num_steps": random.randint(*STEPS)}
        headers = {"Authorization": f"Bearer {os.environ['VDM_LOAD_KEY']}"}
        timeout = float(os.environ["VDM_LOAD_TIMEOUT"])
        with self.client.post(
            "/text_to_video", json=request, headers=headers, timeout=timeout, catch_response=True
        ) as response:
            if response.status_code in (200, 429, 504):  # the answers a loaded server may give
                response.success()
