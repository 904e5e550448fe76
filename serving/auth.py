"""API keys: every request but the probes, the metrics and the API docs carries
`Authorization: Bearer <key>`; a missing or unknown key is a 401 in the one error shape.

Keys come from files, one key per line (blank lines and `#` comments ignored):
`VDM_SERVE_API_KEYS_FILE` and `VDM_SERVE_ADMIN_KEYS_FILE`; an admin key is also an API
key. A file is read again when it changes (a rotated Kubernetes Secret reaches the pod
without a restart). `/reload` needs an admin key (403 with another), and `model_info`
shows lineage (training run, git commit, data URIs) to admin keys only. With neither
file set the service refuses to start unless `VDM_SERVE_ALLOW_ANONYMOUS=true`, which
lets every caller in as an admin (a network that authenticates callers itself)."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from components.common.settings import generate_secret_file
from serving.config import ServeSettings
from serving.errors import error_response

# Paths anyone may call: the probes, Prometheus, and the API docs page with its document.
OPEN_PATHS = frozenset({"/livez", "/readyz", "/metrics", "/", "/docs", "/docs.json"})
OPEN_PREFIXES = ("/docs/",)
ADMIN_PATHS = frozenset({"/reload"})
SCOPE_KEY = "vdm.access"  # the caller's Access, in the ASGI scope for the APIs to read
CHECK_EVERY_SECONDS = 1.0  # how often the key files' modification times are looked at


class Access(Enum):
    USER = "user"
    ADMIN = "admin"


class NoKeys(RuntimeError):
    """The service has no key to admit anyone with, and anonymous access is not allowed."""


def read_keys(path: Path) -> list[str]:
    """The keys of a key file: one a line, blank lines and `#` comments ignored."""
    keys = []
    for line in path.read_text().splitlines():
        key = line.split("#", 1)[0].strip()
        if key:
            keys.append(key)
    return keys


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class KeySet:
    """The digests of the accepted keys; None: anonymous access (everyone is an admin)."""

    users: frozenset[bytes] | None
    admins: frozenset[bytes] | None

    def access(self, key: str | None) -> Access | None:
        """The access `key` grants (None: none). Every stored key is compared, in constant
        time, so the answer's timing does not say how much of a key matched."""
        if self.users is None:
            return Access.ADMIN
        if key is None:
            return None
        digest = _digest(key)
        admin = any([hmac.compare_digest(digest, known) for known in self.admins or ()])
        user = any([hmac.compare_digest(digest, known) for known in self.users])
        return Access.ADMIN if admin else Access.USER if user else None


class ApiKeys:
    """The key files of `settings`, read again when one changes."""

    def __init__(self, settings: ServeSettings):
        self.files = [path for path in (settings.api_keys_file, settings.admin_keys_file) if path is not None]
        self.api_file, self.admin_file = settings.api_keys_file, settings.admin_keys_file
        if not self.files and not settings.allow_anonymous:
            raise NoKeys(
                "no API keys: set VDM_SERVE_API_KEYS_FILE and/or VDM_SERVE_ADMIN_KEYS_FILE (files of one key a line), "
                "or VDM_SERVE_ALLOW_ANONYMOUS=true to serve without authentication"
            )
        self._lock = threading.Lock()
        self._stamps: tuple | None = None
        self._checked = 0.0
        self.keys = self._read()

    def _modified(self) -> tuple:
        return tuple((path, path.stat().st_mtime_ns, path.stat().st_size) for path in self.files)

    def _read(self) -> KeySet:
        if not self.files:
            return KeySet(None, None)
        self._stamps = self._modified()
        admins = frozenset(map(_digest, read_keys(self.admin_file))) if self.admin_file else frozenset()
        users = frozenset(map(_digest, read_keys(self.api_file))) if self.api_file else frozenset()
        if not users | admins:
            raise NoKeys(f"no key in {', '.join(map(str, self.files))}: one key a line (`#` starts a comment)")
        return KeySet(users | admins, admins)

    def current(self, now: float) -> KeySet:
        """The keys now; a file that changed is read again (a broken one keeps the old keys)."""
        if self.files and now - self._checked >= CHECK_EVERY_SECONDS:
            with self._lock:
                self._checked = now
                try:
                    if self._modified() != self._stamps:
                        self.keys = self._read()
                except (OSError, NoKeys):
                    pass  # mid-rotation: the files are back in a moment; keep serving with the keys we had
        return self.keys


def bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The bearer token of an ASGI request's headers (None: none)."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() or None if scheme.lower() == "bearer" else None
    return None


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class RequireApiKey:
    """ASGI middleware: a request to anything but the open paths needs a known key (401),
    an admin path an admin key (403); the caller's `Access` goes into the scope."""

    def __init__(self, app: ASGIApp, keys: ApiKeys):
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        access = self.keys.current(time.monotonic()).access(bearer(scope["headers"]))
        if access is None:
            response = error_response(401, "a valid API key is required: send the header `Authorization: Bearer <key>`")
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        if scope["path"] in ADMIN_PATHS and access is not Access.ADMIN:
            await error_response(403, f"{scope['path']} needs an admin key")(scope, receive, send)
            return
        scope[SCOPE_KEY] = access
        await self.app(scope, receive, send)


def local_key_files(folder: Path) -> tuple[Path, Path]:
    """`folder/api-keys` and `folder/admin-keys`, each with one key made here unless it
    exists (then kept: a key stays valid across runs), readable by its owner only."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = (folder / "api-keys", folder / "admin-keys")
    for path in paths:
        generate_secret_file(path)
    return paths
