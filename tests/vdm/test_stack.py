"""Lifecycle of a real local stack in its own state folder (not the session's)."""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
from conftest import listening_addresses, occupy, stack_env

from components.common.objectstore import ObjectNotFoundError, ObjectStore
from components.common.settings import load_settings
from vdm.stack import SEAWEED_GRPC_OFFSET, Stack, StackError, port_is_free, process_start_time

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
    for secret_file in ("s3/security.toml", "s3/tls/tls.key", "mlflow/basic_auth.ini", "mlflow/flask_secret_key"):
        assert stat.S_IMODE(os.stat(home / secret_file).st_mode) == 0o600, secret_file
    assert stack.credentials()["MLFLOW_TRACKING_USERNAME"] == "vdm-admin"
    assert len(stack.credentials()["MLFLOW_TRACKING_PASSWORD"]) >= 30
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    secret = stack.credentials()["AWS_SECRET_ACCESS_KEY"]
    assert len(secret) >= 30
    mlflow_password = stack.credentials()["MLFLOW_TRACKING_PASSWORD"]

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

    # the secrets never reach a log file
    for log in (home / "logs").iterdir():
        assert secret not in log.read_text(errors="replace"), log
        assert mlflow_password not in log.read_text(errors="replace"), log


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
    script = (
        'eval "$(vdm stack env)" && echo "$VDM_S3_ENDPOINT $MLFLOW_TRACKING_URI ${#AWS_SECRET_ACCESS_KEY} '
        '$MLFLOW_TRACKING_USERNAME ${#MLFLOW_TRACKING_PASSWORD}"'
    )
    bin_dir = os.path.dirname(sys.executable)
    result = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )
    assert result.returncode == 0, result.stderr
    endpoint, tracking, secret_length, mlflow_user, mlflow_password_length = result.stdout.split()
    assert mlflow_user == "vdm-admin"
    assert int(mlflow_password_length) == len(stack.credentials()["MLFLOW_TRACKING_PASSWORD"])
    assert endpoint == stack.endpoints()["VDM_S3_ENDPOINT"]
    assert tracking == stack.endpoints()["MLFLOW_TRACKING_URI"]
    assert int(secret_length) == len(stack.credentials()["AWS_SECRET_ACCESS_KEY"])


def test_status_cli_reports_every_server(stack):
    result = subprocess.run([sys.executable, "-m", "vdm.cli", "stack", "status"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()}
    assert lines["s3"] == "running" and lines["mlflow"] == "running"
    assert lines["prometheus"] == ("running" if HAS_PROMETHEUS else "skipped")


def _http(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int | None, bytes]:
    """An unauthenticated HTTP request: (status, body), or (None, b"") when the port gives no HTTP
    answer (closed, reset, or a TLS-only gRPC server that drops plaintext)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None, b""
    finally:
        conn.close()


def _listening_ports(pids: list[int]) -> dict[int, str]:
    """Every TCP port these processes (and their children) listen on, with its server's name."""
    ports = {}
    for name, pid in pids:
        parent = psutil.Process(pid)
        for proc in [parent, *parent.children(recursive=True)]:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    ports[conn.laddr.port] = name
    return ports


def _grpc_settings_frame(port: int, ca: Path, client_cert: tuple[Path, Path] | None) -> bytes:
    """Open TLS with ALPN h2 (with or without the client certificate), send HTTP/2's preface
    and an empty SETTINGS frame, return the server's first bytes. A server that requires a
    client certificate aborts the handshake: ssl.SSLError."""
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    context.set_alpn_protocols(["h2"])
    if client_cert:
        context.load_cert_chain(*map(str, client_cert))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, context.wrap_socket(raw) as tls:
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        return tls.recv(9)


def test_every_port_of_the_stack_refuses_readers_and_writers_without_credentials(stack, store):
    """Each port any server of the stack listens on (found from its processes), asked to read or
    write without credentials: SeaweedFS's master, filer, volume and S3 ports answer 4xx or give
    no HTTP answer; its gRPC ports take only the stack's client certificate; MLflow and Prometheus
    answer 401."""
    secret = f"only-for-credentials-{random.getrandbits(32):08x}".encode()
    store.put_bytes("s3://vdm/audit/secret.txt", secret)
    mlflow_uri = stack.endpoints()["MLFLOW_TRACKING_URI"]
    servers = [(s.name, s.pid) for s in stack.status() if s.pid]
    ports = _listening_ports(servers)
    assert {name for name in ports.values()} == {name for name, _ in servers}
    s = stack.settings
    seaweed = {s.s3_port, s.seaweed_master_port, s.seaweed_volume_port, s.seaweed_filer_port}
    assert seaweed | {p + SEAWEED_GRPC_OFFSET for p in seaweed} | {s.mlflow_port} <= set(ports)
    planted = f"planted-{random.getrandbits(32):08x}.txt"
    reads = [
        ("GET", "/vdm/audit/secret.txt"),  # S3
        ("GET", "/buckets/vdm/audit/secret.txt"),  # filer
        ("GET", "/buckets/vdm/audit/"),
        ("GET", "/dir/lookup?volumeId=1"),  # master
        ("GET", "/dir/status"),
        ("GET", "/1,01637037d6"),  # volume
        ("GET", "/api/2.0/mlflow/experiments/search?max_results=10"),  # MLflow
        ("GET", "/api/2.0/mlflow-artifacts/artifacts/"),
        ("GET", "/ajax-api/2.0/mlflow/registered-models/search"),
    ]
    writes = [
        ("PUT", f"/vdm/{planted}"),
        ("PUT", f"/buckets/mlflow/{planted}"),
        ("POST", f"/buckets/vdm/{planted}"),
        ("POST", "/dir/assign"),
        ("POST", "/submit"),
        ("PUT", "/1,01637037d6"),
        ("POST", "/api/2.0/mlflow/experiments/create"),
        ("PUT", f"/api/2.0/mlflow-artifacts/artifacts/0/{planted}"),
        ("POST", "/api/v1/admin/tsdb/delete_series"),  # Prometheus
        ("POST", "/api/v1/write"),
        ("POST", "/-/quit"),
    ]
    answers: dict[int, list[int | None]] = {}
    for port, name in sorted(ports.items()):
        for method, path in reads + writes:
            status, body = _http(port, method, path, b"planted" if method != "GET" else None)
            answers.setdefault(port, []).append(status)
            assert secret not in body, (name, port, method, path)
            assert status is None or status in (400, 401, 403, 404, 405), (name, port, method, path, status, body[:200])
    assert set(answers[s.mlflow_port]) == {401}  # every MLflow route but /health asks for the login
    if HAS_PROMETHEUS:
        assert set(answers[s.prometheus_port]) == {401}  # every route, /-/healthy too
        assert _http(s.prometheus_port, "GET", "/-/healthy")[0] == 401
    assert set(answers[s.seaweed_volume_port]) <= {400, 401, 404}
    assert _http(s.mlflow_port, "GET", "/health")[0] == 200

    # The ports with no HTTP answer are gRPC over TLS: without the stack's client certificate
    # the handshake is refused; with it, the server speaks HTTP/2 (its SETTINGS frame).
    silent = sorted(port for port, statuses in answers.items() if set(statuses) == {None})
    assert {p + SEAWEED_GRPC_OFFSET for p in seaweed} <= set(silent)
    tls = stack.seaweed_tls_dir
    for port in silent:
        with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED|certificate required"):
            _grpc_settings_frame(port, tls / "ca.crt", None)
        frame = _grpc_settings_frame(port, tls / "ca.crt", (tls / "tls.crt", tls / "tls.key"))
        assert frame[3] == 0x04, (port, frame)  # a SETTINGS frame
    assert stat.S_IMODE(os.stat(tls / "tls.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(stack.home / "s3" / "security.toml").st_mode) == 0o600

    # Nothing planted reads back through S3; the credentials still read and write.
    for bucket in ("vdm", "mlflow"):
        with pytest.raises(ObjectNotFoundError):
            store.get_bytes(f"s3://{bucket}/{planted}")
    assert store.get_bytes("s3://vdm/audit/secret.txt") == secret
    login = (stack.credentials()["MLFLOW_TRACKING_USERNAME"], stack.credentials()["MLFLOW_TRACKING_PASSWORD"])
    search = requests.get(f"{mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1", auth=login, timeout=10)
    assert search.status_code == 200 and "experiments" in search.json()
    assert (
        requests.get(
            f"{mlflow_uri}/api/2.0/mlflow/experiments/search", auth=(login[0], "wrong"), timeout=10
        ).status_code
        == 401
    )


def test_mlflow_logs_and_serves_artifacts_only_with_the_login(stack, tmp_path, monkeypatch):
    """A client with the stack's login logs a run with an artifact through the proxy and reads
    it back; the same artifact asked for without the login, or with another password, is refused."""
    import mlflow

    mlflow.set_tracking_uri(stack.endpoints()["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("stack-auth")
    (tmp_path / "note.txt").write_text("through the proxy")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(tmp_path / "note.txt"))
    assert mlflow.get_run(run.info.run_id).info.user_id == stack.credentials()["MLFLOW_TRACKING_USERNAME"]
    fetched = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/note.txt", dst_path=str(tmp_path / "out"))
    assert Path(fetched).read_text() == "through the proxy"
    path = f"/api/2.0/mlflow-artifacts/artifacts/{run.info.experiment_id}/{run.info.run_id}/artifacts/note.txt"
    assert _http(stack.settings.mlflow_port, "GET", path)[0] == 401
    url = stack.endpoints()["MLFLOW_TRACKING_URI"] + path
    assert (
        requests.get(url, auth=(stack.credentials()["MLFLOW_TRACKING_USERNAME"], "wrong"), timeout=10).status_code
        == 401
    )
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    with pytest.raises(mlflow.exceptions.MlflowException, match="401|not authenticated"):
        mlflow.get_run(run.info.run_id)


@pytest.mark.slow
def test_down_and_up_stop_the_group_a_killed_leader_left(own_stack):
    """kill -9 of MLflow's recorded process leaves its uvicorn worker holding the port: `up`
    stops that group first and restarts MLflow; after another kill -9, `down` stops it too."""
    stack = own_stack
    stack.up()
    port = stack.settings.mlflow_port
    stopped: list[str] = []
    for restart in (stack.up, lambda: stopped.extend(stack.down())):
        leader = _pids(stack)["mlflow"]
        assert json.loads((stack.run_dir / "mlflow.json").read_text())["pgid"] == leader == os.getpgid(leader)
        workers = psutil.Process(leader).children(recursive=True)
        assert workers, "MLflow runs its server in a child process"
        os.kill(leader, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _states(stack)["mlflow"] != "dead" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _states(stack)["mlflow"] == "dead"
        assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
        assert not port_is_free(port)  # the orphaned worker still serves
        restart()
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
        assert any("stopped processes its dead leader left" in line for line in stack.lines)
        assert not [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == leader and p.status() != "zombie"]
        if not stopped:  # after `up`
            assert _states(stack)["mlflow"] == "running"
            assert _pids(stack)["mlflow"] != leader
    assert "mlflow" in stopped and port_is_free(port)
    assert set(_states(stack).values()) <= {"stopped", "skipped"}


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_commands_log_in_to_mlflow_from_the_state_folder_when_the_environment_has_no_login(stack):
    """Without `eval "$(vdm stack env)"` a command finds the login in the state folder's
    credentials.env; a login set in the environment wins, and a wrong one is refused in one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env["VDM_HOME"] = str(stack.home)  # what a user's shell has: the state folder, nothing exported
    args = [sys.executable, "-m", "vdm.cli", "registry", "list", "no-such-model"]
    found = subprocess.run(args, capture_output=True, text=True, env=env)
    assert found.returncode == 1 and "error: no registered model named 'no-such-model'" in found.stderr, found.stderr
    wrong = {**env, "MLFLOW_TRACKING_USERNAME": "vdm-admin", "MLFLOW_TRACKING_PASSWORD": "wrong"}
    refused = subprocess.run(args, capture_output=True, text=True, env=wrong)
    assert refused.returncode == 1 and refused.stderr.startswith(
        f"error: MLflow at {stack.endpoints()['MLFLOW_TRACKING_URI']} refused the request"
    ), refused.stderr
