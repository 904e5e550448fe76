"""Shared fixtures: one real local stack (SeaweedFS, MLflow, Prometheus if installed)
on free ports in a temporary state folder, for the whole session."""

from __future__ import annotations

import os
import random
import socket
import sys

import pytest

from components.common.objectstore import ObjectStore
from components.common.settings import load_settings
from vdm.stack import SEAWEED_GRPC_OFFSET, Stack, port_is_free

# Fail fast instead of MLflow's default of minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
# Under pytest-xdist each worker (and the `vdm` subprocesses it starts) gets its share of the
# cores: torch's OpenMP threads otherwise outnumber the cores and spin against each other.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    cores = len(os.sched_getaffinity(0))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

_taken: set[int] = set()
# Tests that start servers of their own (besides the session's stack).
OWN_SERVERS = {"own_stack", "private_stack"}


# Files that take minutes, longest first. `make test` hands whole files to its workers in
# collection order: started last, one of these would leave the other worker idle at the end.
LONGEST_FILES = (
    "tests/pipelines/test_run.py",
    "tests/vdm/test_faults.py",
    "tests/serving/test_limits.py",
    "tests/serving/test_load.py",
)


def _longest_first(item) -> int:
    path = item.nodeid.split("::")[0]
    return LONGEST_FILES.index(path) if path in LONGEST_FILES else len(LONGEST_FILES)


def pytest_collection_modifyitems(items):
    """Tests that need the local stack's servers are marked `stack`, so `pytest -m "not stack"`
    runs the rest alone (no SeaweedFS, MLflow or Prometheus started)."""
    for item in items:
        if "stack" in item.fixturenames or OWN_SERVERS & set(item.fixturenames):
            item.add_marker(pytest.mark.stack)
    items.sort(key=_longest_first)  # stable: each file's tests stay together and in order


def _port_range() -> range:
    """Ports this process picks from: below the kernel's ephemeral range (32768+), gRPC twins
    included; each pytest-xdist worker has its own slice, so two workers never pick the same
    port between checking it and their server binding it."""
    ports = range(20000, 22700)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    size = len(ports) // workers
    return ports[worker * size : (worker + 1) * size]


def free_port(with_grpc: bool = False) -> int:
    """A free 127.0.0.1 port (and, for SeaweedFS, its gRPC twin at +10000)."""
    ports = _port_range()
    for _ in range(500):
        port = random.choice(ports)
        needed = [port, port + SEAWEED_GRPC_OFFSET] if with_grpc else [port]
        if not _taken.intersection(needed) and all(port_is_free(p) for p in needed):
            _taken.update(needed)
            return port
    raise RuntimeError("no free port found")


def stack_env(home) -> dict[str, str]:
    """Environment for a stack in `home` on fresh free ports."""
    return {
        "VDM_HOME": str(home),
        "VDM_S3_PORT": str(free_port(True)),
        "VDM_SEAWEED_MASTER_PORT": str(free_port(True)),
        "VDM_SEAWEED_VOLUME_PORT": str(free_port(True)),
        "VDM_SEAWEED_FILER_PORT": str(free_port(True)),
        "VDM_MLFLOW_PORT": str(free_port()),
        "VDM_PROMETHEUS_PORT": str(free_port()),
    }


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """The session's running stack; its client environment is exported to os.environ
    so code under test and `vdm` subprocesses find it as a user's shell would."""
    home = tmp_path_factory.mktemp("vdm-home")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in stack_env(home).items():
            mp.setenv(key, value)
        running = Stack(load_settings(), log=lambda line: print(line, file=sys.__stderr__))
        running.up()
        try:
            for key, value in running.client_env().items():
                mp.setenv(key, value)
            yield running
        finally:
            running.down()


@pytest.fixture(scope="session")
def settings(stack):
    return load_settings()


@pytest.fixture(scope="session")
def store(settings) -> ObjectStore:
    return ObjectStore.from_settings(settings, retries=2)


@pytest.fixture
def prefix(request, settings) -> str:
    """A fresh s3:// prefix in the data bucket for one test."""
    return f"s3://{settings.data_bucket}/tests/{request.node.name}-{random.getrandbits(32):08x}"


def listening_addresses(pids: list[int]) -> set[str]:
    """IP addresses that these processes (and their children) listen on."""
    import psutil

    addresses = set()
    for pid in pids:
        parent = psutil.Process(pid)
        for proc in [parent, *parent.children(recursive=True)]:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    addresses.add(conn.laddr.ip)
    return addresses


def occupy(port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock
