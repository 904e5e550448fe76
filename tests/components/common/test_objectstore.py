"""The object store module against the real local S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time

import pytest
from minio import Minio

from components.common.objectstore import (
    MANIFEST_NAME,
    BucketNotFoundError,
    ChecksumMismatchError,
    CredentialsError,
    ObjectNotFoundError,
    ObjectStore,
    ObjectStoreUnavailableError,
    S3Uri,
    UnsafeManifestError,
)


def test_uri_parsing():
    uri = S3Uri.parse("s3://bucket/a/b.mp4")
    assert (uri.bucket, uri.key) == ("bucket", "a/b.mp4")
    assert str(uri.join("c", "/d/")) == "s3://bucket/a/b.mp4/c/d"
    assert str(S3Uri.parse("s3://bucket").join("x")) == "s3://bucket/x"
    for bad in ("http://bucket/key", "s3:///key", "bucket/key"):
        with pytest.raises(ValueError):
            S3Uri.parse(bad)


def test_file_round_trip_records_and_verifies_sha256(store, prefix, tmp_path):
    data = os.urandom(300_000)
    src = tmp_path / "clip.mp4"
    src.write_bytes(data)
    uri = store.upload_file(src, f"{prefix}/clip.mp4")
    assert store.recorded_sha256(uri) == hashlib.sha256(data).hexdigest()
    dest = store.download_file(uri, tmp_path / "out" / "clip.mp4")
    assert dest.read_bytes() == data
    assert [p.name for p in dest.parent.iterdir()] == ["clip.mp4"]  # no partial left behind
    assert store.get_bytes(uri) == data
    with store.open(uri) as reader:
        assert reader.read(10) == data[:10]


def test_multipart_upload_of_20_mb(store, prefix, tmp_path):
    data = os.urandom(20 * 1024 * 1024)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    uri = store.upload_file(src, f"{prefix}/big.bin")
    info = next(store.list(uri))
    assert info.size == len(data)
    assert "-" in info.etag  # S3 marks multipart objects' ETags with "-<parts>"
    assert store.download_file(uri, tmp_path / "back.bin").read_bytes() == data


def test_listing_by_prefix(store, prefix):
    for key in ("a/1.txt", "a/2.txt", "a/sub/3.txt", "b/4.txt"):
        store.put_bytes(f"{prefix}/{key}", key.encode())
    recursive = [str(o.uri) for o in store.list(f"{prefix}/a/")]
    assert recursive == [f"{prefix}/a/1.txt", f"{prefix}/a/2.txt", f"{prefix}/a/sub/3.txt"]
    shallow = [str(o.uri) for o in store.list(f"{prefix}/a/", recursive=False)]
    assert shallow == [f"{prefix}/a/1.txt", f"{prefix}/a/2.txt"]
    assert [o.size for o in store.list(f"{prefix}/b/")] == [len("b/4.txt")]
    assert list(store.list(f"{prefix}/nothing-here/")) == []


def test_folder_publish_writes_manifest_last_and_downloads_exactly(store, prefix, tmp_path):
    src = tmp_path / "shard"
    (src / "nested").mkdir(parents=True)
    files = {"x.tar": os.urandom(5000), "nested/y.json": b'{"k": 1}', "z.txt": b""}
    for rel, body in files.items():
        (src / rel).write_bytes(body)
    manifest_uri = store.publish_folder(src, prefix)
    assert str(manifest_uri) == f"{prefix}/{MANIFEST_NAME}"
    manifest = store.read_manifest(prefix)
    assert {e["path"]: e["sha256"] for e in manifest["files"]} == {
        rel: hashlib.sha256(body).hexdigest() for rel, body in files.items()
    }
    # The manifest is the newest object: readers that see it see every file.
    objects = list(store.list(prefix))
    newest = max(objects, key=lambda o: o.last_modified)
    assert newest.uri.key.endswith(MANIFEST_NAME)
    # A stray object not in the manifest is not downloaded.
    store.put_bytes(f"{prefix}/stray.bin", b"not published")
    paths = store.download_folder(prefix, tmp_path / "dest")
    assert sorted(p.relative_to(tmp_path / "dest").as_posix() for p in paths) == sorted(files)
    assert all((tmp_path / "dest" / rel).read_bytes() == body for rel, body in files.items())


def test_unpublished_folder_has_no_manifest(store, prefix):
    store.put_bytes(f"{prefix}/part-0.tar", b"half a dataset")
    with pytest.raises(ObjectNotFoundError):
        store.read_manifest(prefix)


def test_checksum_mismatch_is_detected_and_nothing_is_written(store, settings, prefix, tmp_path):
    uri = S3Uri.parse(f"{prefix}/corrupt.bin")
    raw = Minio(settings.s3_host, settings.access_key, settings.secret_key.get_secret_value(), secure=False)
    body = b"the bytes that are stored"
    wrong = hashlib.sha256(b"the bytes that were meant").hexdigest()
    raw.put_object(uri.bucket, uri.key, io.BytesIO(body), len(body), metadata={"sha256": wrong})
    with pytest.raises(ChecksumMismatchError, match="does not match"):
        store.download_file(uri, tmp_path / "corrupt.bin")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ChecksumMismatchError):
        store.get_bytes(uri)


class _FailingStream(io.RawIOBase):
    """Yields some bytes, then fails like a producer that crashed half-way."""

    def __init__(self, good: bytes):
        self._good = io.BytesIO(good)

    def readable(self):
        return True

    def readinto(self, buffer):
        n = self._good.readinto(buffer)
        if n == 0:
            raise OSError("producer crashed")
        return n


def test_failed_upload_publishes_nothing_and_keeps_the_previous_version(store, prefix):
    uri = f"{prefix}/shard-000.tar"
    with pytest.raises(OSError, match="producer crashed"):
        store.upload_stream(_FailingStream(os.urandom(3 << 20)), uri)
    assert not store.exists(uri)
    store.put_bytes(uri, b"version 1")
    with pytest.raises(OSError):
        store.upload_stream(_FailingStream(os.urandom(3 << 20)), uri)
    assert store.get_bytes(uri) == b"version 1"


def test_object_is_invisible_until_its_upload_completes(store, prefix):
    uri = f"{prefix}/streamed.tar"
    read_fd, write_fd = os.pipe()
    result: dict = {}

    def upload():
        with os.fdopen(read_fd, "rb") as reader:
            result["uri"] = store.upload_stream(reader, uri)

    uploader = threading.Thread(target=upload)
    uploader.start()
    with os.fdopen(write_fd, "wb") as writer:
        writer.write(os.urandom(6 << 20))
        writer.flush()
        time.sleep(0.3)
        assert not store.exists(uri)  # 6 MiB written, producer still going
        writer.write(b"tail")
    uploader.join(timeout=30)
    assert store.exists(uri)
    assert len(store.get_bytes(uri)) == (6 << 20) + 4


def test_missing_bucket_and_key_are_clear_errors(store, prefix, tmp_path):
    with pytest.raises(BucketNotFoundError, match="no-such-bucket"):
        store.put_bytes("s3://no-such-bucket/x", b"1")
    with pytest.raises(ObjectNotFoundError, match="missing.bin"):
        store.download_file(f"{prefix}/missing.bin", tmp_path / "m.bin")
    assert not (tmp_path / "m.bin").exists()


def test_wrong_credentials_are_a_clear_error(settings, prefix):
    bad = ObjectStore(settings.s3_endpoint, settings.access_key, "not-the-secret", retries=0)
    with pytest.raises(CredentialsError, match=settings.access_key):
        bad.put_bytes(f"{prefix}/x", b"1")
    unknown = ObjectStore(settings.s3_endpoint, "nobody", "nothing", retries=0)
    with pytest.raises(CredentialsError, match="AWS_ACCESS_KEY_ID"):
        list(unknown.list(prefix))


def test_unreachable_server_is_a_clear_error(settings):
    from conftest import free_port

    dead = ObjectStore(f"http://127.0.0.1:{free_port()}", "k", "s", retries=1)
    started = time.monotonic()
    with pytest.raises(ObjectStoreUnavailableError, match="cannot reach"):
        dead.get_bytes("s3://vdm/anything")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    "path", ["../outside.txt", "/tmp/outside.txt", "nested/../../outside.txt"], ids=["up", "absolute", "nested-up"]
)
def test_a_manifest_path_outside_the_folder_is_refused_before_any_download(store, prefix, tmp_path, path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.bin").write_bytes(b"weights")
    store.publish_folder(src, prefix)
    manifest = store.read_manifest(prefix)
    manifest["files"].append({"path": path, "size": 5, "sha256": hashlib.sha256(b"owned").hexdigest()})
    store.put_bytes(f"{prefix}/{MANIFEST_NAME}", json.dumps(manifest).encode())
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(UnsafeManifestError, match="not a path inside the folder"):
        store.download_folder(prefix, dest)
    assert not dest.exists() and not (tmp_path / "deep" / "outside.txt").exists()


def test_a_file_changed_after_publishing_fails_against_the_folder_manifest(store, prefix, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.bin").write_bytes(b"the published weights")
    (src / "config.json").write_bytes(b"{}")
    store.publish_folder(src, prefix)
    # Rewritten in place through the store: its own recorded sha256 matches its new bytes.
    store.put_bytes(f"{prefix}/model.bin", b"other weights")
    assert store.get_bytes(f"{prefix}/model.bin") == b"other weights"
    with pytest.raises(ChecksumMismatchError, match="folder manifest"):
        store.download_folder(prefix, tmp_path / "dest")
    assert not (tmp_path / "dest" / "model.bin").exists()
    assert not [p for p in (tmp_path / "dest").rglob("*.partial")]


def test_a_prefix_is_a_folder_not_a_string_prefix(store, prefix):
    for key in ("run1/a.txt", "run10/b.txt", "run1", "run1-old/c.txt"):
        store.put_bytes(f"{prefix}/{key}", key.encode())
    assert [o.uri.key.removeprefix(S3Uri.parse(prefix).key) for o in store.list(f"{prefix}/run1")] == [
        "/run1",
        "/run1/a.txt",
    ]
    assert [str(o.uri) for o in store.list(f"{prefix}/run1/")] == [f"{prefix}/run1/a.txt"]


def test_a_published_folder_is_not_published_over_unless_replaced(store, prefix, tmp_path):
    from components.common.objectstore import FolderAlreadyPublishedError

    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    (first / "model.bin").write_bytes(b"first weights")
    (first / "old-only.txt").write_bytes(b"gone after the replace")
    (second / "model.bin").write_bytes(b"second weights")
    store.publish_folder(first, prefix, run_id="run-a")
    with pytest.raises(FolderAlreadyPublishedError, match=rf"{prefix} already holds a published folder"):
        store.publish_folder(second, prefix)
    assert store.get_bytes(f"{prefix}/model.bin") == b"first weights"  # untouched
    assert store.read_manifest(prefix)["run_id"] == "run-a"

    store.publish_folder(second, prefix, replace=True, run_id="run-a")
    assert [e["path"] for e in store.read_manifest(prefix)["files"]] == ["model.bin"]
    assert store.get_bytes(f"{prefix}/model.bin") == b"second weights"
    assert not store.exists(f"{prefix}/old-only.txt")  # removed once the new manifest was live


def test_a_manifest_entry_without_sha256_is_refused_before_any_download(store, prefix, tmp_path):
    from components.common.objectstore import ChecksumMissingError

    src = tmp_path / "src"
    src.mkdir()
    (src / "model.bin").write_bytes(b"weights")
    (src / "config.json").write_bytes(b"{}")
    store.publish_folder(src, prefix)
    manifest = store.read_manifest(prefix)
    del manifest["files"][1]["sha256"]  # model.bin (sorted after config.json)
    store.put_bytes(f"{prefix}/{MANIFEST_NAME}", json.dumps(manifest).encode())
    with pytest.raises(ChecksumMissingError, match="'model.bin' without a sha256"):
        store.download_folder(prefix, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
