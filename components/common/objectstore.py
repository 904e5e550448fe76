"""The platform's only S3 client: `s3://bucket/key` URIs over the minio SDK.

Works against SeaweedFS locally and MinIO in the cluster. Every object we write
carries its sha256 in user metadata (`x-amz-meta-sha256`), and every download
checks it. Writers never expose partial data: content is hashed (and, for streams
of unknown length, spooled) before the single PUT or multipart upload that makes
it visible, and S3 shows neither until they complete; downloads land in a
temporary file that is renamed into place only after verification. A folder is
published by writing its `_MANIFEST.json` last, so a reader that finds the
manifest finds every file it names.
"""

from __future__ import annotations

import hashlib
import io
import json
import mimetypes
import os
import secrets
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import urllib3
from minio import Minio
from minio.error import S3Error
from tqdm import tqdm

from components.common.settings import Settings

SHA256_METADATA = "sha256"
MANIFEST_NAME = "_MANIFEST.json"
_CHUNK = 1 << 20
_SPOOL_IN_MEMORY = 64 << 20
_CREDENTIAL_ERRORS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"}


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

    def get_bytes(self, uri: str | S3Uri) -> bytes:
        with self.open(uri) as reader:
            return reader.read()

    def download_file(self, uri: str | S3Uri, path: str | Path, *, sha256: str | None = None) -> Path:
        """Download to `path` through a temporary file in the same folder; the file
        appears only once its sha256 matches the one recorded at upload and `sha256`
        (a folder manifest's, which the object's own metadata cannot overrule) if given."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as out, self._verified_reader(uri) as reader:
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
        """Objects under a prefix, in key order."""
        base = _uri(prefix)
        objects = self._client.list_objects(base.bucket, prefix=base.key or None, recursive=recursive)
        iterator = iter(objects)
        while True:
            obj = self._call(f"list {base}", next, iterator, None)
            if obj is None:
                return
            if obj.is_dir:
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
    ) -> S3Uri:
        """Upload every file under `folder` to `prefix`, then write `_MANIFEST.json`
        (relative path, size, sha256 of each file). Returns the manifest's URI. `uploaded`: entries
        of files put under `prefix` before (by `upload_entry`), which the manifest lists too."""
        folder, base = Path(folder), _uri(prefix)
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
        return self.put_bytes(base.join(MANIFEST_NAME), json.dumps(manifest, indent=1).encode(), "application/json")

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
        or through `..`) is refused before anything is written."""
        base, folder = _uri(prefix), Path(folder)
        entries = self.read_manifest(base)["files"]
        for entry in entries:
            _check_relative(base, entry["path"])

        def download(entry: dict) -> Path:
            return self.download_file(base.join(entry["path"]), folder / entry["path"], sha256=entry.get("sha256"))

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


def _check_relative(base: S3Uri, path: str) -> None:
    parts = PurePosixPath(path).parts
    if not parts or PurePosixPath(path).is_absolute() or ".." in parts:
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
