"""The service's own bounds against a real `vdm serve` with a short request timeout: a
timed-out or abandoned generation stops at its next denoising step, the task queue
refuses submits only when full and never refuses a lookup, and `vdm serve` takes its
BentoML processes with it when it is stopped or killed (killed mid-generation, it leaves
nothing running and serves again when started on the same state folder)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest
from conftest import free_port
from mlflow import MlflowClient

from components.common.settings import load_settings
from components.common.tracking import tracked_run
from components.registry.pipeline_model import register_pipeline
from model.stages import VideoDiffusion, named_config
from serving.auth import read_keys

pytestmark = pytest.mark.slow
MAX_CONCURRENCY = 2
MAX_QUEUED = 2
TIMEOUT_S = 6.0
# Steps of well under a second each on a CPU, and many minutes of them (the server admits them).
MAX_STEPS = 10_000
LONG = {"prompt": "long", "num_frames": 4, "num_steps": MAX_STEPS, "height": 32, "width": 32}
STEP_S = 3.0  # what one step of LONG may take at most on a busy two-core machine
SHORT = {"prompt": "short", "num_frames": 2, "num_steps": 2}


@pytest.fixture(scope="module")
def model_name(settings, tmp_path_factory) -> str:
    """An untrained tiny text-to-video model, champion 1 (how long steps take is what counts)."""
    folder = VideoDiffusion.create(named_config("tiny", "video")).save(tmp_path_factory.mktemp("limits") / "final")
    name = f"vdm-limits-test-{time.strftime('%H%M%S')}"
    with tracked_run("vdm-test-serving", config={"stage": "limits"}, settings=settings):
        register_pipeline(folder, name, {})
    MlflowClient().set_registered_model_alias(name, "champion", "1")
    return name


@contextlib.contextmanager
def _vdm_serve(name: str, log_path, ready: str = "/readyz"):
    """`vdm serve` of `name` with the limits above, until `ready` answers 200; its URL and process."""
    port = free_port()
    command = [sys.executable, "-m", "vdm.cli", "serve", "--model", name, "--port", str(port), "--poll-seconds", "0"]
    env = os.environ | {
        "VDM_SERVE_TIMEOUT_SECONDS": str(TIMEOUT_S),
        "VDM_SERVE_MAX_QUEUED": str(MAX_QUEUED),
        "VDM_SERVE_MAX_CONCURRENCY": str(MAX_CONCURRENCY),
        "VDM_SERVE_MAX_STEPS": str(MAX_STEPS),
    }
    with open(log_path, "w") as log:
        # Its own session only so that teardown can clean up whatever a failed test leaves.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}{ready}", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        yield url, process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _api_key() -> str:
    (key,) = read_keys(load_settings().home / "serving" / "api-keys")
    return key


@pytest.fixture(scope="module")
def server(stack, model_name, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("limits") / "serve.log"
    with _vdm_serve(model_name, log_path) as (url, process):
        yield {
            "url": url,
            "process": process,
            "auth": {"Authorization": f"Bearer {_api_key()}"},
            "log": log_path,
            "name": model_name,
        }


def _metrics(server) -> dict[str, float]:
    """The service's generation gauges and counters, summed over their labels."""
    text = httpx.get(f"{server['url']}/metrics", timeout=5).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("vdm_serving_generations", "vdm_serving_tasks")):
            name, value = line.rsplit(" ", 1)
            values[name] = values.get(name, 0.0) + float(value)
    return values


def _until(condition, seconds: float, every: float = 0.1) -> None:
    """Wait until `condition()` holds; fails after `seconds`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < seconds, f"did not hold within {seconds} s"
        time.sleep(every)


def _running(server) -> float:
    return _metrics(server).get("vdm_serving_generations_running", 0.0)


def _post(server, payload: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{server['url']}/text_to_video", json=payload, headers=server["auth"], timeout=timeout)


def test_a_timed_out_generation_is_answered_504_and_stops_at_its_next_step(server):
    before = _metrics(server).get('vdm_serving_generations_cancelled_total{reason="timeout"}', 0.0)
    start = time.monotonic()
    response = _post(server, LONG)
    assert response.status_code == 504 and TIMEOUT_S <= time.monotonic() - start < TIMEOUT_S + 3
    _until(lambda: _running(server) == 0, seconds=STEP_S)
    after = _metrics(server)['vdm_serving_generations_cancelled_total{reason="timeout"}']
    assert after == before + 1
    assert f"the generation of {server['name']} v1 was stopped: timeout" in server["log"].read_text()
    assert _post(server, SHORT).status_code == 200


def test_a_generation_whose_client_went_away_stops(server):
    before = _metrics(server).get('vdm_serving_generations_cancelled_total{reason="disconnect"}', 0.0)
    with pytest.raises(httpx.ReadTimeout):
        _post(server, LONG, timeout=1.0)  # the client gives up and closes the connection
    _until(lambda: _running(server) == 0, seconds=STEP_S)  # stopped long before its timeout
    assert _metrics(server)['vdm_serving_generations_cancelled_total{reason="disconnect"}'] == before + 1


def test_tasks_queue_up_to_max_queued_and_lookups_are_never_refused(server):
    url, auth = server["url"], server["auth"]
    blocking: list[httpx.Response] = []
    holders = [threading.Thread(target=lambda: blocking.append(_post(server, LONG))) for _ in range(MAX_CONCURRENCY)]
    for holder in holders:
        holder.start()
    _until(lambda: _running(server) == MAX_CONCURRENCY, seconds=10)  # every slot taken

    def submit() -> httpx.Response:
        return httpx.post(f"{url}/text_to_video_task/submit", json=SHORT, headers=auth, timeout=10)

    queued = [submit() for _ in range(MAX_QUEUED)]
    assert [r.status_code for r in queued] == [200] * MAX_QUEUED  # accepted: they wait for a slot
    full = submit()
    assert full.status_code == 429 and full.json()["error"] == (
        f"the task queue is full ({MAX_QUEUED} tasks waiting or running); retry later"
    )
    assert _post(server, SHORT).status_code == 429  # a plain request finds no free slot
    ids = [r.json()["task_id"] for r in queued]
    for task_id in ids:  # the server is full, and still answers lookups
        status = httpx.get(f"{url}/text_to_video_task/status", params={"task_id": task_id}, headers=auth, timeout=5)
        assert status.status_code == 200 and status.json()["status"] == "in_progress"
    assert _metrics(server)["vdm_serving_tasks_queued"] == MAX_QUEUED
    for holder in holders:
        holder.join()
    assert [r.status_code for r in blocking] == [504] * MAX_CONCURRENCY

    def finished() -> bool:
        lookups = [
            httpx.get(f"{url}/text_to_video_task/status", params={"task_id": i}, headers=auth, timeout=5) for i in ids
        ]
        return all(r.json()["status"] == "completed" for r in lookups)

    _until(finished, seconds=30, every=0.3)  # the queued tasks got the freed slots
    result = httpx.get(f"{url}/text_to_video_task/get", params={"task_id": ids[0]}, headers=auth, timeout=5)
    assert result.status_code == 200 and result.headers["content-type"] == "video/mp4"
    assert _metrics(server)["vdm_serving_tasks_queued"] == 0
    assert submit().status_code == 200


def _bentoml_processes(root: int) -> list[psutil.Process]:
    return psutil.Process(root).children(recursive=True)


def _none_alive(processes: list[psutil.Process], seconds: float) -> None:
    gone, alive = psutil.wait_procs(processes, timeout=seconds)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]


def test_vdm_serve_stopped_with_sigterm_takes_its_bentoml_processes_with_it(server):
    processes = _bentoml_processes(server["process"].pid)
    commands = [" ".join(p.cmdline()) for p in processes]
    assert any("_bentoml_impl.worker" in c for c in commands) and any("bentoml serve" in c for c in commands)
    # BentoML's `bentoml serve` runs in `vdm serve`'s process group (a terminal's Ctrl-C reaches
    # it); its worker in a session of its own (circus, which BentoML runs it with, calls setsid).
    (arbiter,) = [p for p in processes if "bentoml serve" in " ".join(p.cmdline())]
    assert os.getpgid(arbiter.pid) == os.getpgid(server["process"].pid)
    # A generation in flight does not hold the shutdown up until its timeout: it stops at its next step.
    in_flight: list[BaseException | httpx.Response] = []

    def generate() -> None:
        try:
            in_flight.append(_post(server, LONG))
        except httpx.TransportError as error:  # kept, so that a failure says what the caller saw
            in_flight.append(error)

    request = threading.Thread(target=generate)
    request.start()
    _until(lambda: _running(server) == 1, seconds=10)
    server["process"].send_signal(signal.SIGTERM)
    request.join()
    (stopped,) = in_flight
    assert isinstance(stopped, httpx.Response), f"the caller got no answer: {stopped!r}"
    assert stopped.status_code == 504 and stopped.json()["error"].endswith("was stopped: shutdown"), stopped.text
    assert server["process"].wait(timeout=30) is not None
    _none_alive(processes, seconds=30)


def test_vdm_serve_killed_outright_during_a_generation_leaves_nothing_and_serves_again(stack, model_name, tmp_path):
    with _vdm_serve(model_name, tmp_path / "serve.log") as (url, process):
        server = {"url": url, "auth": {"Authorization": f"Bearer {_api_key()}"}}
        processes = _bentoml_processes(process.pid)
        assert any("_bentoml_impl.worker" in " ".join(p.cmdline()) for p in processes)
        in_flight: list[BaseException | httpx.Response] = []

        def generate() -> None:
            try:
                in_flight.append(_post(server, LONG))
            except httpx.TransportError as error:
                in_flight.append(error)

        request = threading.Thread(target=generate)
        request.start()
        _until(lambda: _running(server) == 1, seconds=10)
        process.kill()  # SIGKILL, mid-generation: no chance to pass anything on
        process.wait()
        _none_alive(processes, seconds=30)
        request.join(timeout=30)
        # The caller learns at once, no hang: BentoML, told by the kernel that `vdm serve` died, stops the
        # generation at its next step and answers (or, were it gone first, the connection drops).
        (answer,) = in_flight
        assert isinstance(answer, httpx.TransportError) or (
            answer.status_code == 504 and answer.json()["error"].endswith("was stopped: shutdown")
        ), answer
    # Started again on the same state folder (its model cache, its keys): it serves.
    with _vdm_serve(model_name, tmp_path / "again.log") as (url, _):
        again = {"url": url, "auth": {"Authorization": f"Bearer {_api_key()}"}}
        answer = _post(again, SHORT)
        assert answer.status_code == 200 and answer.headers["x-vdm-model"] == f"{model_name}/1"
