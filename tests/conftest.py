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

_taken: set[int] = set()
# Tests that start servers of their own (besides the session's stack).
OWN_SERVERS = {"own_stack"}


def pytest_collection_modifyitems(items):
    """Tests that need the local stack's servers are marked `stack`, so `pytest -m "not stack"`
    runs the rest alone (no SeaweedFS, MLflow or Prometheus started)."""
    for item in items:
        if "stack" in item.fixturenames or OWN_SERVERS & set(item.fixturenames):
            item.add_marker(pytest.mark.stack)


def free_port(with_grpc: bool = False) -> int:
    """A free 127.0.0.1 port (and, for SeaweedFS, its gRPC twin at +10000)."""
    for _ in range(500):
        # Below the kernel's ephemeral range (32768+), gRPC twins included.
        port = random.randint(20000, 22700)
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
