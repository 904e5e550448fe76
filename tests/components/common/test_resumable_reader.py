"""Streaming reads that survive short S3 outages, against the stack's real SeaweedFS: the
server is stopped (SIGSTOP of its process group) in the middle of an object and continued
a few seconds later; a refused connection (nothing listening) is given up after the
configured time."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import socket
import threading
import time

import pytest
import webdataset as wds
from minio import Minio

from components.common.objectstore import (
    ChecksumMismatchError,
    ChecksumMissingError,
    ObjectStore,
    ObjectStoreUnavailableError,
    S3Uri,
    register_shard_reader,
    retry_seconds_from_env,
)


def _s3_pid(stack) -> int:
    (status,) = [s for s in stack.status() if s.name == "s3"]
    assert status.state == "running" and status.pid
    return status.pid


@pytest.fixture
def big_object(store, prefix):
    data = os.urandom(48 << 20)  # well beyond what socket buffers hold when the server stops
    uri = f"{prefix}/big.bin"
    store.put_bytes(uri, data)
    return uri, data


def test_a_read_survives_the_server_stopping_mid_object_and_resumes_by_range(stack, settings, big_object):
    uri, data = big_object
    # Short read timeout: a stopped server answers nothing, so a timeout is how a reader notices.
    reader_store = ObjectStore.from_settings(settings, read_timeout_s=1.0)
    reader = reader_store.open_resumable(uri, retry_seconds=30)
    head = reader.read(1 << 20)
    pid = _s3_pid(stack)
    os.killpg(pid, signal.SIGSTOP)
    resumed = threading.Timer(4.0, os.killpg, (pid, signal.SIGCONT))
    resumed.start()
    try:
        started = time.monotonic()
        rest = io.BufferedReader(reader, buffer_size=1 << 20).read()
        waited = time.monotonic() - started
    finally:
        resumed.join()
        os.killpg(pid, signal.SIGCONT)
    assert hashlib.sha256(head + rest).digest() == hashlib.sha256(data).digest()
    assert waited >= 3.0  # it did wait out the outage
    assert reader.resumed_at and all(0 < offset < len(data) for offset in reader.resumed_at)  # by range, not from 0
    assert reader.position == len(data)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_connections_are_retried_for_the_configured_time_then_given_up(settings):
    nobody = ObjectStore(f"http://127.0.0.1:{_closed_port()}", "key", "secret")
    started = time.monotonic()
    with pytest.raises(ObjectStoreUnavailableError, match=r"did not serve it for 2 s .*VDM_S3_RETRY_SECONDS") as e:
        nobody.open_resumable("s3://vdm/some/shard.tar", retry_seconds=2)
    assert 2.0 <= time.monotonic() - started < 8
    assert "X-Amz-Signature" not in str(e.value) and "?" not in str(e.value)


def test_retry_seconds_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("VDM_S3_RETRY_SECONDS", raising=False)
    assert retry_seconds_from_env() == 120
    monkeypatch.setenv("VDM_S3_RETRY_SECONDS", "7.5")
    assert retry_seconds_from_env() == 7.5
    monkeypatch.setenv("VDM_S3_RETRY_SECONDS", "soon")
    with pytest.raises(ValueError, match="VDM_S3_RETRY_SECONDS"):
        retry_seconds_from_env()


def test_an_object_without_a_recorded_sha256_is_refused(store, settings, prefix, tmp_path):
    uri = S3Uri.parse(f"{prefix}/unchecked.tar")
    raw = Minio(settings.s3_host, settings.access_key, settings.secret_key.get_secret_value(), secure=False)
    raw.put_object(uri.bucket, uri.key, io.BytesIO(b"no checksum"), len(b"no checksum"))
    with pytest.raises(ChecksumMissingError, match="carries no sha256"):
        store.open_resumable(uri, retry_seconds=1)
    with pytest.raises(ChecksumMissingError, match="carries no sha256"):
        store.download_file(uri, tmp_path / "unchecked.tar", require_sha256=True)  # a model's file, a checkpoint's
    assert list(tmp_path.iterdir()) == []


def test_webdataset_reads_s3_shards_through_the_registered_reader(store, prefix, tmp_path):
    with wds.TarWriter(str(tmp_path / "shard.tar")) as sink:
        for i in range(3):
            sink.write({"__key__": f"k{i}", "txt": f"sample {i}"})
    store.upload_file(tmp_path / "shard.tar", f"{prefix}/shard.tar")
    register_shard_reader(store, retry_seconds=5)
    samples = list(wds.WebDataset([f"{prefix}/shard.tar"], shardshuffle=False))
    assert [s["txt"] for s in samples] == [b"sample 0", b"sample 1", b"sample 2"]


def test_a_shard_whose_content_is_not_its_manifests_is_refused(store, prefix, tmp_path):
    """A shard replaced after its dataset was published, with its own (new) recorded sha256: the
    manifest's digest decides."""
    with wds.TarWriter(str(tmp_path / "shard.tar")) as sink:
        sink.write({"__key__": "k0", "txt": "published"})
    url = f"{prefix}/swapped.tar"
    store.upload_file(tmp_path / "shard.tar", url)
    published = hashlib.sha256((tmp_path / "shard.tar").read_bytes()).hexdigest()
    with wds.TarWriter(str(tmp_path / "other.tar")) as sink:
        sink.write({"__key__": "k0", "txt": "swapped in"})
    store.upload_file(tmp_path / "other.tar", url)  # records the new content's sha256
    register_shard_reader(store, retry_seconds=5, expected_sha256={url: published})
    with pytest.raises(ChecksumMismatchError, match="does not match the expected"):
        list(wds.WebDataset([url], shardshuffle=False))
