"""The platform's only S3 client: `s3://bucket/key` URIs over the minio SDK.

Works against SeaweedFS locally and MinIO in the cluster. Every object we write
carries its sha256 in user metadata (`x-amz-meta-sha256`), and every download
checks it. Writers never expose partial data: content is hashed (and, for streams
of unknown length, spooled) before the single PUT or multipart upload that makes
it visible, and S3 shows neither until they complete; downloads land in a
temporary file that is renamed into place only after verification. A folder is
published by writing its `_MANIFEST.json` last, so a reader that finds the
manifest finds every file it names; a published folder is not published over unless the
caller asks to replace it, and a manifest entry without a sha256 is refused on download.
Prefixes are folders: `s3://b/run1` lists `run1` and `run1/...`, never `run10/...`.

Streaming readers (`open_resumable`, and the `s3://` handler `register_shard_reader`
installs in webdataset) sign each request with the SDK, retry refused connections, broken
streams and 5xx answers with exponential backoff for `VDM_S3_RETRY_SECONDS` (default 120),
and continue a broken stream from the byte where it stopped (an HTTP Range request).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import mimetypes
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import urllib3
from minio import Minio
from minio.error import S3Error, ServerError
from tqdm import tqdm

from components.common.settings import Settings

SHA256_METADATA = "sha256"
MANIFEST_NAME = "_MANIFEST.json"
_CHUNK = 1 << 20
_SPOOL_IN_MEMORY = 64 << 20
_CREDENTIAL_ERRORS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"}
RETRY_SECONDS_ENV = "VDM_S3_RETRY_SECONDS"


class ObjectStoreError(RuntimeError):
    """Base class of every error this module raises."""


class BucketNotFoundError(ObjectStoreError):
    pass


class ObjectNotFoundError(ObjectStoreError):
    pass


class CredentialsError(ObjectStoreError):
    pass


class ChecksumMismatchError(ObjectStoreError):
    pass


class UnsafeManifestError(ObjectStoreError):
    """A folder manifest names a path that would land outside the folder it is downloaded to."""


class ObjectStoreUnavailableError(ObjectStoreError):
    pass


class ChecksumMissingError(ObjectStoreError):
    """An object or manifest entry that integrity depends on carries no sha256."""


class FolderAlreadyPublishedError(ObjectStoreError):
    """A folder published over one that is already published (its `_MANIFEST.json` exists)."""


class OutputNotWritableError(ObjectStoreError):
    """An output prefix that cannot be written (no bucket, or the credentials may not write);
    the message says how to fix it."""


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str = ""

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        if not uri.startswith("s3://"):
            raise ValueError(f"not an s3:// URI: {uri!r}")
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"s3:// URI without a bucket: {uri!r}")
        return cls(bucket, key)

    def join(self, *parts: str) -> S3Uri:
        key = "/".join(p.strip("/") for p in (self.key, *parts) if p.strip("/"))
        return S3Uri(self.bucket, key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def is_s3_uri(location: str) -> bool:
    return str(location).startswith("s3://")


@dataclass(frozen=True)
class ObjectInfo:
    uri: S3Uri
    size: int
    etag: str
    last_modified: datetime | None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class VerifiedReader(io.RawIOBase):
    """A readable stream of an object that checks its sha256 when the end is reached."""

    def __init__(self, response, uri: S3Uri, expected_sha256: str | None):
        self._response = response
        self._uri = uri
        self._expected = expected_sha256
        self._digest = hashlib.sha256()
        self._verified = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._response.readinto(buffer)
        if n:
            self._digest.update(memoryview(buffer)[:n])
        elif not self._verified:
            self._verified = True
            _check_digest(self._uri, self._expected, self._digest.hexdigest())
        return n

    @property
    def expected_sha256(self) -> str | None:
        """The sha256 recorded at upload (None: the object carries none)."""
        return self._expected

    @property
    def sha256(self) -> str:
        """The sha256 of what was read so far (all of it, once verified)."""
        return self._digest.hexdigest()

    def copy_to(self, out: BinaryIO) -> None:
        """Stream the rest of the object into `out`, then verify (the fast path for
        downloads: urllib3's own chunks, no intermediate buffer)."""
        for chunk in self._response.stream(_CHUNK):
            self._digest.update(chunk)
            out.write(chunk)
        self._verified = True
        _check_digest(self._uri, self._expected, self._digest.hexdigest())

    def close(self) -> None:
        if not self.closed:
            self._response.close()
            self._response.release_conn()
        super().close()


class ResumableReader(io.RawIOBase):
    """A readable stream of an object that survives short faults: a refused connection, a broken
    stream, a read timeout or a 5xx answer is retried with exponential backoff for up to
    `retry_seconds` from the fault, and the stream continues from the byte where it broke (an
    HTTP Range request), not from the start. Every request is signed by the SDK (no presigned
    URL). The sha256 recorded at upload (or `expected_sha256`) is checked at the end; an object
    without one is refused when `require_sha256`. `resumed_at`: the offsets it continued from."""

    def __init__(
        self,
        client: Minio,
        endpoint: str,
        uri: S3Uri,
        retry_seconds: float,
        translate: Callable[[S3Error, str], ObjectStoreError],
        *,
        expected_sha256: str | None = None,
        require_sha256: bool = True,
        backoff_max_s: float = 4.0,
    ):
        self._client, self._endpoint, self._uri, self._translate = client, endpoint, uri, translate
        self.retry_seconds, self._backoff_max_s = retry_seconds, backoff_max_s
        self.position = 0
        self.size: int | None = None
        self.resumed_at: list[int] = []
        self._digest = hashlib.sha256()
        self._done = False
        self._response = None
        self._response = self._retrying(self._get, None)
        length = self._response.headers.get("content-length")
        self.size = int(length) if length is not None else None
        recorded = _metadata_sha256(self._response.headers)
        if expected_sha256 and recorded and expected_sha256 != recorded:
            self._release()
            raise ChecksumMismatchError(
                f"{uri}: recorded sha256 {recorded} does not match the expected {expected_sha256}"
            )
        self._expected = expected_sha256 or recorded
        if require_sha256 and not self._expected:
            self._release()
            raise ChecksumMissingError(
                f"{uri} carries no sha256 (x-amz-meta-sha256): refused, its content cannot be checked"
            )

    def readable(self) -> bool:
        return True

    def _get(self):
        response = self._client.get_object(self._uri.bucket, self._uri.key, offset=self.position)
        if self.position and response.status != 206:  # the whole object again: appending it would corrupt
            response.close()
            response.release_conn()
            raise ObjectStoreError(f"{self._uri}: the S3 server ignored a Range request (HTTP {response.status})")
        return response

    def _retrying(self, call, fault: BaseException | None):
        """`call()`, retried on transient faults until `retry_seconds` after the first one."""
        started = time.monotonic()
        delay = 0.25
        if fault is not None:
            _log_fault(self._uri, self.position, fault, self.retry_seconds)
        while True:
            if fault is not None:
                left = started + self.retry_seconds - time.monotonic()
                if left <= 0:
                    raise ObjectStoreUnavailableError(
                        f"{self._uri}: the S3 server at {self._endpoint} did not serve it for {self.retry_seconds:g} s "
                        f"(at byte {self.position}; {_fault_name(fault)}); {RETRY_SECONDS_ENV} sets how long "
                        "reads retry"
                    ) from fault
                time.sleep(min(delay, left))
                delay = min(delay * 2, self._backoff_max_s)
            try:
                return call()
            except S3Error as e:
                if e.response is None or e.response.status < 500:
                    raise self._translate(e, f"read {self._uri}") from e
                fault = fault or e
            except (ServerError, urllib3.exceptions.HTTPError, OSError) as e:
                if fault is None:
                    _log_fault(self._uri, self.position, e, self.retry_seconds)
                fault = fault or e

    def readinto(self, buffer) -> int:
        if self._done:
            return 0
        while True:
            try:
                n = self._response.readinto(buffer)
            except (urllib3.exceptions.HTTPError, OSError) as e:
                self._resume(e)
                continue
            if n == 0 and self.size is not None and self.position < self.size:
                self._resume(ConnectionError("the stream ended early"))
                continue
            break
        if n:
            self._digest.update(memoryview(buffer)[:n])
            self.position += n
        else:
            self._done = True
            _check_digest(self._uri, self._expected, self._digest.hexdigest())
        return n

    def _resume(self, fault: BaseException) -> None:
        self._release()
        self.resumed_at.append(self.position)
        self._response = self._retrying(self._get, fault)

    def _release(self) -> None:
        if self._response is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close
                self._response.close()
                self._response.release_conn()
            self._response = None

    def close(self) -> None:
        if not self.closed:
            self._release()
        super().close()


def _fault_name(fault: BaseException) -> str:
    """What went wrong, without the request's URL (which could carry a signature)."""
    if isinstance(fault, urllib3.exceptions.MaxRetryError) and fault.reason is not None:
        fault = fault.reason
    if isinstance(fault, S3Error):
        return f"{fault.code} (HTTP {fault.response.status if fault.response else '?'})"
    if isinstance(fault, ServerError):
        return f"HTTP {fault.status_code}"
    return type(fault).__name__


def _log_fault(uri: S3Uri, position: int, fault: BaseException, retry_seconds: float) -> None:
    import logging

    logging.getLogger(__name__).warning(
        "%s: read interrupted at byte %d (%s); retrying for up to %g s",
        uri,
        position,
        _fault_name(fault),
        retry_seconds,
    )


def retry_seconds_from_env() -> float:
    """How long streaming reads retry a fault: `VDM_S3_RETRY_SECONDS` (Settings), default 120."""
    from components.common.settings import load_settings

    return load_settings().s3_retry_seconds


class ShardOpener:
    """webdataset's handler of `s3://` URLs (its `gopen_schemes`): each shard is a ResumableReader
    of its own per-process client (DataLoader workers fork; connections are not shared)."""

    def __init__(self, connection: dict, retry_seconds: float, expected_sha256: dict[str, str]):
        self._connection, self.retry_seconds = connection, retry_seconds
        self.expected_sha256 = expected_sha256  # URL -> the sha256 its dataset's manifest lists
        self._store: tuple[int, ObjectStore] | None = None

    def __call__(self, url: str, mode: str = "rb", bufsize: int = 8192, **kwargs) -> io.BufferedReader:
        if mode != "rb":
            raise ValueError(f"{url}: s3:// shards are read, not written ({mode!r})")
        if self._store is None or self._store[0] != os.getpid():
            c = self._connection
            store = ObjectStore(
                c["endpoint"],
                c["access_key"],
                c["secret_key"],
                region=c["region"],
                connect_timeout_s=c["connect_timeout_s"],
                read_timeout_s=c["read_timeout_s"],
            )
            self._store = (os.getpid(), store)
        reader = self._store[1].open_resumable(
            url, retry_seconds=self.retry_seconds, expected_sha256=self.expected_sha256.get(url)
        )
        return io.BufferedReader(reader, buffer_size=_CHUNK)

    def __getstate__(self) -> dict:
        return {
            "_connection": self._connection,
            "retry_seconds": self.retry_seconds,
            "expected_sha256": self.expected_sha256,
            "_store": None,
        }


def register_shard_reader(
    store: ObjectStore, retry_seconds: float | None = None, expected_sha256: dict[str, str] | None = None
) -> None:
    """Let webdataset (and so model/data.py's loaders) open `s3://bucket/key` shard URLs through
    `store`'s endpoint and credentials, with ResumableReader's retries; in this process and the
    DataLoader workers it forks. `expected_sha256`: URL -> the sha256 a shard must have (its
    dataset manifest's), added to those registered before."""
    import webdataset

    seconds = retry_seconds_from_env() if retry_seconds is None else retry_seconds
    current = webdataset.gopen_schemes.get("s3")
    known = dict(current.expected_sha256) if isinstance(current, ShardOpener) else {}
    webdataset.gopen_schemes["s3"] = ShardOpener(store._connection, seconds, known | (expected_sha256 or {}))


def _check_digest(uri: S3Uri, expected: str | None, actual: str) -> None:
    if expected and expected != actual:
        raise ChecksumMismatchError(f"{uri}: content sha256 {actual} does not match the recorded {expected}")


class ObjectStore:
    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        *,
        region: str = "us-east-1",
        retries: int = 6,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 120.0,
    ):
        self.endpoint = endpoint.rstrip("/")
        secure = self.endpoint.startswith("https://")
        http = urllib3.PoolManager(
            maxsize=16,
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            retries=urllib3.Retry(
                total=retries,
                backoff_factor=0.5,
                backoff_max=8,
                status_forcelist=(500, 502, 503, 504),
                allowed_methods=None,  # S3 calls are idempotent; minio re-sends bodies
            ),
        )
        self._client = Minio(
            self.endpoint.split("://", 1)[-1],
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=http,
        )
        self._access_key = access_key
        self._connection = {
            "endpoint": endpoint,
            "access_key": access_key,
            "secret_key": secret_key,
            "region": region,
            "connect_timeout_s": connect_timeout_s,
            "read_timeout_s": read_timeout_s,
        }
        self._reader_client: Minio | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs) -> ObjectStore:
        return cls(
            settings.s3_endpoint,
            settings.access_key,
            settings.secret_key.get_secret_value(),
            region=settings.s3_region,
            **kwargs,
        )

    # -- errors ---------------------------------------------------------------

    def _call(self, what: str, fn, *args, **kwargs):
        """Run one SDK call, turning its failures into this module's errors."""
        try:
            return fn(*args, **kwargs)
        except S3Error as e:
            raise self._translate(e, what) from e
        except urllib3.exceptions.MaxRetryError as e:
            raise ObjectStoreUnavailableError(
                f"cannot reach the S3 server at {self.endpoint} ({what}): {e.reason}"
            ) from e

    def _translate(self, e: S3Error, what: str) -> ObjectStoreError:
        if e.code == "NoSuchBucket":
            return BucketNotFoundError(f"bucket {e.bucket_name!r} does not exist at {self.endpoint} ({what})")
        if e.code in ("NoSuchKey", "NoSuchObject"):
            return ObjectNotFoundError(f"{what}: no such object")
        if e.code in _CREDENTIAL_ERRORS:
            return CredentialsError(
                f"the S3 server at {self.endpoint} rejected access key {self._access_key!r} "
                f"({e.code}, {what}); check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                '(locally: eval "$(vdm stack env)")'
            )
        return ObjectStoreError(f"{what}: {e.code}: {e.message}")

    # -- buckets --------------------------------------------------------------

    def ensure_bucket(self, bucket: str) -> None:
        if not self._call(f"check bucket {bucket}", self._client.bucket_exists, bucket):
            self._call(f"create bucket {bucket}", self._client.make_bucket, bucket)

    def bucket_exists(self, bucket: str) -> bool:
        return self._call(f"check bucket {bucket}", self._client.bucket_exists, bucket)

    def check_writable(self, prefix: str | S3Uri) -> None:
        """Fail at once unless `prefix`'s bucket exists and these credentials can write under it:
        a small probe object is put under the prefix and deleted again (a few requests, well under
        a second), so long jobs find out before their work, not at their first upload."""
        target = _uri(prefix)
        probe = target.join(f".vdm-write-check-{secrets.token_hex(6)}")
        try:
            if not self.bucket_exists(target.bucket):
                raise BucketNotFoundError(target.bucket)
            self._call(f"write {probe}", self._client.put_object, probe.bucket, probe.key, io.BytesIO(b""), 0)
            self.delete(probe)
        except BucketNotFoundError as e:
            raise OutputNotWritableError(
                f"bucket {target.bucket!r} does not exist at {self.endpoint}: create it with "
                f"`vdm store mb s3://{target.bucket}` (in the cluster: your MinIO operator's way, e.g. `mc mb`)"
            ) from e
        except CredentialsError as e:
            raise OutputNotWritableError(
                f"cannot write to {target}: the S3 server at {self.endpoint} denied access key "
                f"{self._access_key!r} ({e.__cause__.code if e.__cause__ else 'access denied'}); use credentials "
                "that may write to this bucket (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or another --output"
            ) from e

    def make_bucket(self, bucket: str) -> bool:
        """Create a bucket; False if it already exists."""
        if self.bucket_exists(bucket):
            return False
        self._call(f"create bucket {bucket}", self._client.make_bucket, bucket)
        return True

    # -- single objects ---------------------------------------------------------

    def upload_file(self, path: str | Path, uri: str | S3Uri, content_type: str | None = None) -> S3Uri:
        """Upload a local file; it appears under `uri` whole or not at all."""
        self._put_file(Path(path), _uri(uri), content_type)
        return _uri(uri)

    def _put_file(self, path: Path, target: S3Uri, content_type: str | None = None) -> str:
        digest = sha256_file(path)
        self._call(
            f"upload {path} to {target}",
            self._client.fput_object,
            target.bucket,
            target.key,
            str(path),
            content_type=content_type or _content_type(path.name),
            metadata={SHA256_METADATA: digest},
        )
        return digest

    def upload_stream(self, stream: BinaryIO, uri: str | S3Uri, content_type: str | None = None) -> S3Uri:
        """Upload everything a stream yields. The stream is hashed and spooled first
        (memory up to 64 MiB, then a temporary file), so a producer that fails
        half-way publishes nothing and leaves any previous object untouched."""
        target = _uri(uri)
        digest = hashlib.sha256()
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY) as spool:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
                spool.write(chunk)
            length = spool.tell()
            spool.seek(0)
            self._call(
                f"upload stream to {target}",
                self._client.put_object,
                target.bucket,
                target.key,
                spool,
                length,
                content_type=content_type or _content_type(target.key),
                metadata={SHA256_METADATA: digest.hexdigest()},
            )
        return target

    def put_bytes(self, uri: str | S3Uri, data: bytes, content_type: str | None = None) -> S3Uri:
        return self.upload_stream(io.BytesIO(data), uri, content_type)

    def recorded_sha256(self, uri: str | S3Uri) -> str | None:
        target = _uri(uri)
        stat = self._call(f"stat {target}", self._client.stat_object, target.bucket, target.key)
        return _metadata_sha256(stat.metadata)

    def open(self, uri: str | S3Uri) -> io.BufferedReader:
        """A streaming reader; reading to the end verifies the recorded sha256."""
        return io.BufferedReader(self._verified_reader(uri), buffer_size=_CHUNK)

    def _verified_reader(self, uri: str | S3Uri) -> VerifiedReader:
        target = _uri(uri)
        response = self._call(f"read {target}", self._client.get_object, target.bucket, target.key)
        return VerifiedReader(response, target, _metadata_sha256(response.headers))

    def open_resumable(
        self, uri: str | S3Uri, *, retry_seconds: float | None = None, expected_sha256: str | None = None
    ) -> ResumableReader:
        """A reader that retries short faults and resumes where a stream broke (ResumableReader);
        `retry_seconds`: default `VDM_S3_RETRY_SECONDS` (120). Refuses an object without a sha256."""
        if self._reader_client is None:
            # Its own client without urllib3's retries: the reader's loop decides how long to retry.
            c = self._connection
            http = urllib3.PoolManager(
                maxsize=4,
                timeout=urllib3.Timeout(connect=c["connect_timeout_s"], read=c["read_timeout_s"]),
                retries=False,
            )
            self._reader_client = Minio(
                self.endpoint.split("://", 1)[-1],
                access_key=c["access_key"],
                secret_key=c["secret_key"],
                secure=self.endpoint.startswith("https://"),
                region=c["region"],
                http_client=http,
            )
        seconds = retry_seconds_from_env() if retry_seconds is None else retry_seconds
        return ResumableReader(
            self._reader_client, self.endpoint, _uri(uri), seconds, self._translate, expected_sha256=expected_sha256
        )

    def get_bytes(self, uri: str | S3Uri) -> bytes:
        with self.open(uri) as reader:
            return reader.read()

    def download_file(
        self, uri: str | S3Uri, path: str | Path, *, sha256: str | None = None, require_sha256: bool = False
    ) -> Path:
        """Download to `path` through a temporary file in the same folder; the file
        appears only once its sha256 matches the one recorded at upload and `sha256`
        (a folder manifest's, which the object's own metadata cannot overrule) if given.
        `require_sha256`: an object with neither (nothing to check it against) is refused."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as out, self._verified_reader(uri) as reader:
                if require_sha256 and sha256 is None and not reader.expected_sha256:
                    raise ChecksumMissingError(
                        f"{_uri(uri)} carries no sha256 (x-amz-meta-sha256): refused, its content cannot be checked"
                    )
                reader.copy_to(out)
                if sha256 is not None and reader.sha256 != sha256:
                    raise ChecksumMismatchError(
                        f"{_uri(uri)}: content sha256 {reader.sha256} does not match its folder manifest's {sha256} "
                        "(changed after the folder was published)"
                    )
            os.replace(partial, path)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        return path

    def presigned_get(self, uri: str | S3Uri, expires_s: int = 7 * 24 * 3600) -> str:
        """An https(s) URL that reads the object without credentials until it expires;
        how streaming readers (webdataset's curl) get at shards."""
        from datetime import timedelta

        target = _uri(uri)
        return self._call(
            f"presign {target}",
            self._client.presigned_get_object,
            target.bucket,
            target.key,
            expires=timedelta(seconds=expires_s),
        )

    def exists(self, uri: str | S3Uri) -> bool:
        try:
            self.recorded_sha256(uri)
            return True
        except ObjectNotFoundError:
            return False

    def delete(self, uri: str | S3Uri) -> None:
        target = _uri(uri)
        self._call(f"delete {target}", self._client.remove_object, target.bucket, target.key)

    # -- prefixes and folders ---------------------------------------------------

    def list(self, prefix: str | S3Uri, recursive: bool = True) -> Iterator[ObjectInfo]:
        """Objects under a prefix, in key order. The prefix is a folder: `s3://b/run1` lists the
        object `run1` and those under `run1/`, never `run10/...`."""
        base = _uri(prefix)
        folder = base.key if not base.key or base.key.endswith("/") else base.key + "/"
        # The folder's objects; the prefix itself is listed too, as an object (`s3://b/x` is x, x/...).
        exact = [] if folder == base.key else [base.key]
        objects = self._client.list_objects(base.bucket, prefix=base.key or None, recursive=recursive)
        iterator = iter(objects)
        while True:
            obj = self._call(f"list {base}", next, iterator, None)
            if obj is None:
                return
            if obj.is_dir or not (obj.object_name.startswith(folder) or obj.object_name in exact):
                continue
            yield ObjectInfo(S3Uri(base.bucket, obj.object_name), obj.size, obj.etag, obj.last_modified)

    def publish_folder(
        self,
        folder: str | Path,
        prefix: str | S3Uri,
        *,
        progress: bool = False,
        workers: int = 8,
        uploaded: list[dict] | None = None,
        replace: bool = False,
        run_id: str | None = None,
    ) -> S3Uri:
        """Upload every file under `folder` to `prefix`, then write `_MANIFEST.json`
        (relative path, size, sha256 of each file; `run_id`: the run that published it). Returns
        the manifest's URI. `uploaded`: entries of files put under `prefix` before (by
        `upload_entry`), which the manifest lists too. A prefix that holds a published folder
        already is refused (FolderAlreadyPublishedError) unless `replace`: then its manifest
        is removed first (the old folder stops being published), and files the new manifest
        does not name are deleted once it is written."""
        folder, base = Path(folder), _uri(prefix)
        manifest_uri = base.join(MANIFEST_NAME)
        previous: dict | None = None
        if self.exists(manifest_uri):
            if not replace:
                raise FolderAlreadyPublishedError(
                    f"{base} already holds a published folder ({MANIFEST_NAME}); publish to a new URI "
                    "(or remove it first)"
                )
            previous = self.read_manifest(base)
            self.delete(manifest_uri)
        files = sorted(p for p in folder.rglob("*") if p.is_file())

        def upload(path: Path) -> dict:
            rel = path.relative_to(folder).as_posix()
            digest = self._put_file(path, base.join(rel))
            return {"path": rel, "size": path.stat().st_size, "sha256": digest}

        with ThreadPoolExecutor(max(1, workers)) as pool:
            entries = list(
                tqdm(
                    pool.map(upload, files), total=len(files), desc=f"upload {base}", unit="file", disable=not progress
                )
            )
        entries = sorted([*(uploaded or []), *entries], key=lambda e: e["path"])
        manifest = {"files": entries, "total_bytes": sum(e["size"] for e in entries)}
        if run_id is not None:
            manifest["run_id"] = run_id
        self.put_bytes(manifest_uri, json.dumps(manifest, indent=1).encode(), "application/json")
        current = {e["path"] for e in entries}
        for stale in (previous or {}).get("files", []):
            if stale["path"] not in current and _is_relative(stale["path"]):
                self.delete(base.join(stale["path"]))
        return manifest_uri

    def upload_entry(self, path: Path, prefix: str | S3Uri, rel: str) -> dict:
        """Upload one file of a folder being published to `prefix/rel`; its manifest entry."""
        digest = self._put_file(path, _uri(prefix).join(rel))
        return {"path": rel, "size": path.stat().st_size, "sha256": digest}

    def read_manifest(self, prefix: str | S3Uri) -> dict:
        """The manifest of a published folder; ObjectNotFoundError if it is not published."""
        return json.loads(self.get_bytes(_uri(prefix).join(MANIFEST_NAME)))

    def download_folder(
        self, prefix: str | S3Uri, folder: str | Path, *, progress: bool = False, workers: int = 8
    ) -> list[Path]:
        """Download a published folder: exactly the files its manifest names, each checked
        against the manifest's sha256. A manifest naming a path outside the folder (absolute,
        or through `..`), or a file without a sha256, is refused before anything is written."""
        base, folder = _uri(prefix), Path(folder)
        entries = self.read_manifest(base)["files"]
        for entry in entries:
            _check_relative(base, entry["path"])
            check_entry_sha256(base, entry)

        def download(entry: dict) -> Path:
            return self.download_file(base.join(entry["path"]), folder / entry["path"], sha256=entry["sha256"])

        with ThreadPoolExecutor(max(1, workers)) as pool:
            return list(
                tqdm(
                    pool.map(download, entries),
                    total=len(entries),
                    desc=f"download {base}",
                    unit="file",
                    disable=not progress,
                )
            )


def check_entry_sha256(base: S3Uri, entry: dict) -> None:
    """A ChecksumMissingError unless a manifest entry carries a sha256."""
    if not entry.get("sha256"):
        raise ChecksumMissingError(
            f"{base.join(MANIFEST_NAME)} lists {entry.get('path')!r} without a sha256: refused, its content "
            "cannot be checked (publish the folder again with this version)"
        )


def _is_relative(path: str) -> bool:
    parts = PurePosixPath(path).parts
    return bool(parts) and not PurePosixPath(path).is_absolute() and ".." not in parts


def _check_relative(base: S3Uri, path: str) -> None:
    if not _is_relative(path):
        raise UnsafeManifestError(f"{base.join(MANIFEST_NAME)} names {path!r}, which is not a path inside the folder")


def _uri(uri: str | S3Uri) -> S3Uri:
    return uri if isinstance(uri, S3Uri) else S3Uri.parse(uri)


def _metadata_sha256(headers) -> str | None:
    for name, value in headers.items():
        if name.lower() in (f"x-amz-meta-{SHA256_METADATA}", SHA256_METADATA):
            return value
    return None


def _content_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"
