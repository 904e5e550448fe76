"""Lifecycle of a real local stack in its own state folder (not the session's)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
from conftest import listening_addresses, occupy, stack_env

from components.common.objectstore import ObjectStore
from components.common.settings import load_settings
from vdm.stack import Stack, StackError, port_is_free, process_start_time

HAS_PROMETHEUS = shutil.which("prometheus") is not None


@pytest.fixture
def own_stack(tmp_path, monkeypatch):
    for key, value in stack_env(tmp_path / "state").items():
        monkeypatch.setenv(key, value)
    lines: list[str] = []
    stack = Stack(load_settings(), log=lines.append)
    stack.lines = lines
    yield stack
    stack.down()


def _pids(stack: Stack) -> dict[str, int]:
    return {s.name: s.pid for s in stack.status() if s.pid}


def _states(stack: Stack) -> dict[str, str]:
    return {s.name: s.state for s in stack.status()}


def _store(stack: Stack, retries: int = 1) -> ObjectStore:
    creds = stack.credentials()
    return ObjectStore(
        stack.endpoints()["VDM_S3_ENDPOINT"],
        creds["AWS_ACCESS_KEY_ID"],
        creds["AWS_SECRET_ACCESS_KEY"],
        retries=retries,
    )


@pytest.mark.slow
def test_lifecycle_kill_recover_and_restart_twice_keeps_data(own_stack):
    stack = own_stack
    expected = {"s3", "mlflow"} | ({"prometheus"} if HAS_PROMETHEUS else set())

    # up from nothing: every server healthy, on loopback only, secrets private
    stack.up()
    assert {n for n, s in _states(stack).items() if s == "running"} == expected
    first_pids = _pids(stack)
    assert listening_addresses(list(first_pids.values())) == {"127.0.0.1"}
    home = stack.home
    assert stat.S_IMODE(os.stat(home / "credentials.env").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(home / "s3" / "s3.json").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    secret = stack.credentials()["AWS_SECRET_ACCESS_KEY"]
    assert len(secret) >= 30

    # up again is a no-op: same processes
    stack.up()
    assert _pids(stack) == first_pids
    assert any("already running" in line for line in stack.lines)

    _store(stack).put_bytes("s3://vdm/keep/me.txt", b"survives kill -9")

    # kill -9 the S3 server: status says so; a client with retries rides out the restart
    os.kill(first_pids["s3"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _states(stack)["s3"] != "dead" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _states(stack)["s3"] == "dead"
    assert _states(stack)["mlflow"] == "running"
    result = subprocess.run([sys.executable, "-m", "vdm.cli", "stack", "status"], capture_output=True, text=True)
    assert result.returncode == 1 and "dead" in result.stdout

    write_error: list[BaseException] = []

    def write_while_down():
        try:
            _store(stack, retries=6).put_bytes("s3://vdm/keep/written-during-restart.txt", b"retried")
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            write_error.append(e)

    writer = threading.Thread(target=write_while_down)
    writer.start()
    time.sleep(0.3)  # the writer's first attempts hit a closed port
    stack.up()
    writer.join(timeout=60)
    assert not write_error, write_error
    assert any("had died; restarting" in line for line in stack.lines)
    pids = _pids(stack)
    assert pids["s3"] != first_pids["s3"] and pids["mlflow"] == first_pids["mlflow"]
    assert _store(stack).get_bytes("s3://vdm/keep/me.txt") == b"survives kill -9"
    assert _store(stack).get_bytes("s3://vdm/keep/written-during-restart.txt") == b"retried"

    # down stops exactly what up started, and nothing else
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        assert set(stack.down()) == expected
        assert all(process_start_time(pid) is None for pid in pids.values())
        assert bystander.poll() is None
        assert set(_states(stack).values()) <= {"stopped", "skipped"}
        s = stack.settings
        assert all(port_is_free(p) for p in (s.s3_port, s.mlflow_port, s.seaweed_filer_port))

        # up/down twice more: data kept across runs
        for _ in range(2):
            stack.up()
            assert _store(stack).get_bytes("s3://vdm/keep/me.txt") == b"survives kill -9"
            stack.down()
        assert bystander.poll() is None
    finally:
        bystander.kill()

    # the secret never reaches a log file
    for log in (home / "logs").iterdir():
        assert secret not in log.read_text(errors="replace"), log


def test_down_ignores_a_recycled_pid(tmp_path, monkeypatch):
    """A PID record whose process is gone and whose PID now belongs to someone else."""
    for key, value in stack_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    stack = Stack(load_settings(), log=lambda line: None)
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        stack.run_dir.mkdir(parents=True)
        record = {"pid": stranger.pid, "start_time": "1", "argv0": "weed"}
        (stack.run_dir / "s3.json").write_text(json.dumps(record))
        assert _states(stack)["s3"] == "dead"
        assert stack.down() == []
        assert stranger.poll() is None
    finally:
        stranger.kill()


def test_busy_port_is_a_clear_error(tmp_path, monkeypatch):
    env = stack_env(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    stack = Stack(load_settings(), log=lambda line: None)
    busy = rf"port\(s\) \[{env['VDM_S3_PORT']}\].*in use"
    with occupy(int(env["VDM_S3_PORT"])), pytest.raises(StackError, match=busy):
        stack.up()
    assert not (stack.run_dir / "s3.json").exists()


def test_env_exports_evaluate_in_a_shell(stack):
    script = 'eval "$(vdm stack env)" && echo "$VDM_S3_ENDPOINT $MLFLOW_TRACKING_URI ${#AWS_SECRET_ACCESS_KEY}"'
    bin_dir = os.path.dirname(sys.executable)
    result = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )
    assert result.returncode == 0, result.stderr
    endpoint, tracking, secret_length = result.stdout.split()
    assert endpoint == stack.endpoints()["VDM_S3_ENDPOINT"]
    assert tracking == stack.endpoints()["MLFLOW_TRACKING_URI"]
    assert int(secret_length) == len(stack.credentials()["AWS_SECRET_ACCESS_KEY"])


def test_status_cli_reports_every_server(stack):
    result = subprocess.run([sys.executable, "-m", "vdm.cli", "stack", "status"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()}
    assert lines["s3"] == "running" and lines["mlflow"] == "running"
    assert lines["prometheus"] == ("running" if HAS_PROMETHEUS else "skipped")
