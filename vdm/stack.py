"""The local stack: real servers on 127.0.0.1 for development, tests and `make demo`.

- `s3`: SeaweedFS `weed mini` (the S3 API our code speaks to MinIO in the cluster). Only
  the S3 API serves data, to the generated keys: the master's and filer's HTTP APIs are
  off (`-disableHttp`), the volume server takes only JWTs signed by the master or the S3
  gateway, and every gRPC port takes only clients with the stack's own certificate (mTLS);
  all of it set in `s3/security.toml`, which `weed` reads from its working folder;
- `mlflow`: MLflow tracking server with its basic-auth app (the generated login in
  `credentials.env`), sqlite backend, artifacts proxied into the `mlflow` bucket;
- `prometheus`: Debian's Prometheus, when installed; it scrapes every target file
  that later parts drop into `$VDM_HOME/prometheus/targets/`. Its API and UI ask for the
  generated login (`VDM_PROMETHEUS_USERNAME`, `VDM_PROMETHEUS_PASSWORD`).

State lives in the state folder (`$VDM_HOME`, default `.vdm/`): data, logs, PID
records, generated credentials and server secrets (mode 0600). Each server runs in its
own process group; its PID record holds the kernel's start time of that process, so
`down` signals exactly the processes `up` started and never a recycled PID, and stops
the whole group even when its leader has died and left workers behind.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from components.common.objectstore import ObjectStore, ObjectStoreError
from components.common.settings import (
    CREDENTIALS_FILE,
    STACK_ENV_FILE,
    Settings,
    generate_secret_file,
    load_settings,
    write_private,
)

HOST = "127.0.0.1"
# SeaweedFS binds each gRPC port at its HTTP port + 10000.
SEAWEED_GRPC_OFFSET = 10000
# The MLflow account the stack creates (its admin) and hands to every client.
MLFLOW_USER = "vdm-admin"
PROMETHEUS_USER = "vdm-admin"
# SeaweedFS's gRPC services (`[grpc.<name>]` of security.toml), all given the stack's certificate.
SEAWEED_GRPC_SERVICES = ("master", "volume", "filer", "s3", "admin", "worker", "client")


class StackError(RuntimeError):
    pass


@dataclass(frozen=True)
class ServerSpec:
    name: str
    argv: list[str]
    ports: list[int]
    url: str
    healthy: Callable[[], bool]
    start_timeout_s: float
    # How long SIGTERM may take before SIGKILL. SeaweedFS's volume server sometimes
    # stalls for ~20 s in shutdown after its data is flushed; the data survives SIGKILL.
    stop_timeout_s: float = 20.0
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None  # None: the state folder
    before_start: Callable[[], None] | None = None
    after_start: Callable[[], None] | None = None


@dataclass(frozen=True)
class ServerStatus:
    name: str
    state: str  # running | starting | dead | stopped | skipped
    url: str = ""
    pid: int | None = None
    note: str = ""

    def line(self) -> str:
        pid = f"pid {self.pid}" if self.pid else ""
        return "  ".join(p for p in (f"{self.name:<11}", f"{self.state:<8}", self.url, pid, self.note) if p)


def generate_credentials(home: Path) -> None:
    """The clients' secrets in `credentials.env` (0600): S3 keys and the MLflow login. Those
    already there are kept (the servers' data and users were made with them); missing ones
    are generated."""
    path = home / CREDENTIALS_FILE
    current = read_env_file(path)
    fresh = {
        "AWS_ACCESS_KEY_ID": f"vdm{secrets.token_hex(8)}",
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
        "MLFLOW_TRACKING_USERNAME": MLFLOW_USER,
        "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(30),
        "VDM_PROMETHEUS_USERNAME": PROMETHEUS_USER,
        "VDM_PROMETHEUS_PASSWORD": secrets.token_urlsafe(30),
    }
    if fresh.keys() <= current.keys():
        return
    write_private(path, "".join(f"{k}={v}\n" for k, v in (fresh | current).items()))


def write_mtls_certificate(folder: Path) -> None:
    """`ca.crt`, `tls.crt` and `tls.key` (0600) in `folder` unless there: a certificate for
    127.0.0.1 that serves and authenticates as a client, from a CA whose key is thrown away,
    so no other certificate can ever pass. SeaweedFS's gRPC servers require it of clients."""
    if all((folder / name).exists() for name in ("ca.crt", "tls.crt", "tls.key")):
        return
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    valid = {
        "not_valid_before": now - datetime.timedelta(minutes=5),
        "not_valid_after": now + datetime.timedelta(days=3650),
    }
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vdm local stack CA")])
    ca = (
        x509.CertificateBuilder(issuer_name=ca_name, subject_name=ca_name, public_key=ca_key.public_key(),
                                serial_number=x509.random_serial_number(), **valid)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    leaf = (
        x509.CertificateBuilder(issuer_name=ca_name, public_key=key.public_key(),
                                subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "seaweedfs")]),
                                serial_number=x509.random_serial_number(), **valid)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_private(folder / "tls.key", key_pem.decode())
    (folder / "tls.crt").write_bytes(leaf.public_bytes(pem))
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))


def read_text_or_empty(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def read_env_file(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def _wait_ports_free(ports: list[int], timeout_s: float) -> list[int]:
    """Ports still taken after waiting: a server that just died may hold its
    sockets for a moment while its last threads exit."""
    deadline = time.monotonic() + timeout_s
    while busy := [p for p in ports if not port_is_free(p)]:
        if time.monotonic() > deadline:
            return busy
        time.sleep(0.2)
    return []


def basic_auth(username: str, password: str) -> dict[str, str]:
    """The Authorization header of an HTTP basic login."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def http_ok(url: str, timeout_s: float = 2.0, headers: dict[str, str] | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout_s) as response:
            return 200 <= response.status < 300
    except OSError:
        return False


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (state first); None for a process gone or a zombie
    (it has exited and only waits to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of a live process (field 22 of /proc/PID/stat); None if gone."""
    fields = _stat_fields(pid)
    return fields[19] if fields else None


def process_group_members(pgid: int, started_at: str) -> list[int]:
    """Live processes of process group `pgid` started no earlier than `started_at` (its
    leader's start time): what is left of a group, its leader dead or not. A group id reused
    by a later process would need that PID free first, that is, the leader gone and reaped,
    and its own session; the start time keeps out anything older."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields and int(fields[2]) == pgid and int(fields[19]) >= int(started_at):
            members.append(int(entry.name))
    return members


class Stack:
    def __init__(self, settings: Settings | None = None, *, log: Callable[[str], None] = print):
        self.settings = settings or load_settings()
        self.home = self.settings.home
        self.log = log

    # -- layout -----------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def prometheus_targets_dir(self) -> Path:
        """Drop a Prometheus file_sd JSON here to have it scraped (picked up within 5 s)."""
        return self.home / "prometheus" / "targets"

    def serving_dir(self, port: int) -> Path:
        """The state of the `vdm serve` on `port` (its BentoML home): each start of BentoML
        clears its home's task database and metrics folder, so two services never share one."""
        return self.home / "serving" / str(port)

    def credentials(self) -> dict[str, str]:
        return read_env_file(self.home / CREDENTIALS_FILE)

    def endpoints(self) -> dict[str, str]:
        s = self.settings
        return {
            "VDM_HOME": str(self.home),
            "VDM_S3_ENDPOINT": f"http://{HOST}:{s.s3_port}",
            "MLFLOW_TRACKING_URI": f"http://{HOST}:{s.mlflow_port}",
            "VDM_PROMETHEUS_URL": f"http://{HOST}:{s.prometheus_port}",
            "VDM_S3_PORT": str(s.s3_port),
            "VDM_SEAWEED_MASTER_PORT": str(s.seaweed_master_port),
            "VDM_SEAWEED_VOLUME_PORT": str(s.seaweed_volume_port),
            "VDM_SEAWEED_FILER_PORT": str(s.seaweed_filer_port),
            "VDM_MLFLOW_PORT": str(s.mlflow_port),
            "VDM_PROMETHEUS_PORT": str(s.prometheus_port),
        }

    def client_env(self) -> dict[str, str]:
        """What a client of the stack needs: endpoints and credentials."""
        endpoints = self.endpoints()
        return {**endpoints, **self.credentials(), "MLFLOW_S3_ENDPOINT_URL": endpoints["VDM_S3_ENDPOINT"]}

    def object_store(self) -> ObjectStore:
        creds = self.credentials()
        return ObjectStore(
            self.endpoints()["VDM_S3_ENDPOINT"],
            creds["AWS_ACCESS_KEY_ID"],
            creds["AWS_SECRET_ACCESS_KEY"],
            retries=1,
        )

    # -- servers ----------------------------------------------------------------

    def specs(self) -> list[ServerSpec]:
        specs = [self._s3_spec(), self._mlflow_spec()]
        prometheus = self._prometheus_spec()
        if prometheus:
            specs.append(prometheus)
        return specs

    def _s3_spec(self) -> ServerSpec:
        s = self.settings
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        if not weed:
            raise StackError("the SeaweedFS binary `weed` is missing: install the project (make install)")
        http_ports = [s.s3_port, s.seaweed_master_port, s.seaweed_volume_port, s.seaweed_filer_port]
        argv = [
            weed,
            "mini",
            f"-dir={self.home / 's3'}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-s3.config={self.home / 's3' / 's3.json'}",
            f"-s3.port={s.s3_port}",
            f"-s3.port.grpc={s.s3_port + SEAWEED_GRPC_OFFSET}",
            f"-master.port={s.seaweed_master_port}",
            f"-master.port.grpc={s.seaweed_master_port + SEAWEED_GRPC_OFFSET}",
            f"-volume.port={s.seaweed_volume_port}",
            f"-volume.port.grpc={s.seaweed_volume_port + SEAWEED_GRPC_OFFSET}",
            f"-filer.port={s.seaweed_filer_port}",
            f"-filer.port.grpc={s.seaweed_filer_port + SEAWEED_GRPC_OFFSET}",
            f"-filer.localSocket={self.home / 's3' / 'filer.sock'}",
            f"-s3.localSocket={self.home / 's3' / 's3.sock'}",
            # No HTTP API on the master (assign, lookup) and the filer (read, write, list): S3 and
            # the volume server need only their gRPC, which requires the stack's certificate.
            "-disableHttp",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            # A missing bucket must be an error, as on MinIO, not created on the fly.
            "-s3.autoCreateBucket=false",
            "-volume.preStopSeconds=0",
        ]

        def healthy() -> bool:
            try:
                self.object_store().bucket_exists(s.mlflow_bucket)
                return True
            except ObjectStoreError:
                return False

        def create_buckets() -> None:
            store = self.object_store()
            for bucket in (s.mlflow_bucket, s.data_bucket):
                store.ensure_bucket(bucket)

        return ServerSpec(
            name="s3",
            argv=argv,
            ports=http_ports + [p + SEAWEED_GRPC_OFFSET for p in http_ports],
            url=f"http://{HOST}:{s.s3_port}",
            healthy=healthy,
            start_timeout_s=60,
            stop_timeout_s=5,
            cwd=self.home / "s3",  # where `weed` reads security.toml
            before_start=self._write_seaweed_security,
            after_start=create_buckets,
        )

    @property
    def seaweed_tls_dir(self) -> Path:
        """The certificate SeaweedFS's gRPC servers ask of every client (`ca.crt`, `tls.crt`, `tls.key`)."""
        return self.home / "s3" / "tls"

    def _write_seaweed_security(self) -> None:
        """SeaweedFS's security.toml (0600), written before each start with fresh JWT signing keys:
        its tokens live 10 s and nothing stored depends on the keys. With them the volume server
        serves and stores a chunk only for a token the master or the S3 gateway signed; gRPC
        takes only the stack's certificate; the volume server's UI is off."""
        write_mtls_certificate(self.seaweed_tls_dir)
        tls = self.seaweed_tls_dir
        lines = []
        for section in ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read"):
            lines += [f"[{section}]", f'key = "{secrets.token_hex(32)}"', "expires_after_seconds = 10", ""]
        lines += ["[access]", "ui = false", "", "[filer.expose_directory_metadata]", "enabled = false", ""]
        lines += ["[grpc]", f'ca = "{tls / "ca.crt"}"', ""]
        for service in SEAWEED_GRPC_SERVICES:
            lines += [f"[grpc.{service}]", f'cert = "{tls / "tls.crt"}"', f'key = "{tls / "tls.key"}"', ""]
        write_private(self.home / "s3" / "security.toml", "\n".join(lines))

    def _mlflow_spec(self) -> ServerSpec:
        s = self.settings
        creds = self.credentials()
        url = f"http://{HOST}:{s.mlflow_port}"
        argv = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.home / 'mlflow' / 'mlflow.db'}",
            "--artifacts-destination",
            f"s3://{s.mlflow_bucket}/",
            "--serve-artifacts",
            "--host",
            HOST,
            "--port",
            str(s.mlflow_port),
            "--workers",
            "1",
            # Every request but /health needs the login (artifacts through the proxy included).
            "--app-name",
            "basic-auth",
        ]
        env = {
            "MLFLOW_AUTH_CONFIG_PATH": str(self.mlflow_auth_config),
            # Signs the login form's CSRF tokens; the same key across restarts.
            "MLFLOW_FLASK_SERVER_SECRET_KEY": read_text_or_empty(self.mlflow_flask_secret).strip(),
            "MLFLOW_S3_ENDPOINT_URL": f"http://{HOST}:{s.s3_port}",
            "AWS_ACCESS_KEY_ID": creds.get("AWS_ACCESS_KEY_ID", ""),
            "AWS_SECRET_ACCESS_KEY": creds.get("AWS_SECRET_ACCESS_KEY", ""),
            "AWS_DEFAULT_REGION": s.s3_region,
            # Otherwise the server spawns job consumers (about 1.8 GB) we never use.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        return ServerSpec(
            name="mlflow",
            argv=argv,
            ports=[s.mlflow_port],
            url=url,
            healthy=lambda: http_ok(f"{url}/health"),
            start_timeout_s=120,
            env=env,
        )

    def _prometheus_spec(self) -> ServerSpec | None:
        binary = shutil.which("prometheus")
        if not binary:
            return None
        s = self.settings
        url = f"http://{HOST}:{s.prometheus_port}"
        argv = [
            binary,
            f"--config.file={self.home / 'prometheus' / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.home / 'prometheus' / 'data'}",
            f"--web.listen-address={HOST}:{s.prometheus_port}",
            f"--web.config.file={self.home / 'prometheus' / 'web.yml'}",
        ]
        return ServerSpec(
            name="prometheus",
            argv=argv,
            ports=[s.prometheus_port],
            url=url,
            healthy=lambda: http_ok(f"{url}/-/ready", headers=self.prometheus_login()),
            start_timeout_s=30,
        )

    def prometheus_login(self) -> dict[str, str]:
        """The Authorization header Prometheus's API asks of every reader."""
        creds = self.credentials()
        return basic_auth(creds["VDM_PROMETHEUS_USERNAME"], creds["VDM_PROMETHEUS_PASSWORD"])

    @property
    def mlflow_auth_config(self) -> Path:
        return self.home / "mlflow" / "basic_auth.ini"

    @property
    def mlflow_flask_secret(self) -> Path:
        return self.home / "mlflow" / "flask_secret_key"

    def _write_configs(self) -> None:
        creds = self.credentials()
        generate_secret_file(self.mlflow_flask_secret)
        # MLflow's auth app makes this admin on its first start against an empty users database;
        # no one else has an account, and a new one gets no permission until granted.
        write_private(
            self.mlflow_auth_config,
            "[mlflow]\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = sqlite:///{self.home / 'mlflow' / 'basic_auth.db'}\n"
            f"admin_username = {creds['MLFLOW_TRACKING_USERNAME']}\n"
            f"admin_password = {creds['MLFLOW_TRACKING_PASSWORD']}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # Checking a password costs a PBKDF2 hash; one server process, so no stale cache elsewhere.
            "auth_cache_ttl_seconds = 600\n",
        )
        s3_config = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [
                        {"accessKey": creds["AWS_ACCESS_KEY_ID"], "secretKey": creds["AWS_SECRET_ACCESS_KEY"]}
                    ],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        write_private(self.home / "s3" / "s3.json", json.dumps(s3_config))
        self.prometheus_targets_dir.mkdir(parents=True, exist_ok=True)
        # Its API and UI ask for the login (bcrypt, as Prometheus's web config takes it); it scrapes
        # itself with the password from a 0600 file.
        prometheus = self.home / "prometheus"
        user, password = creds["VDM_PROMETHEUS_USERNAME"], creds["VDM_PROMETHEUS_PASSWORD"]
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=10)).decode()
        write_private(prometheus / "web.yml", f"basic_auth_users:\n  {user}: {hashed}\n")
        write_private(prometheus / "password", password)
        (prometheus / "prometheus.yml").write_text(
            "global:\n"
            "  scrape_interval: 5s\n"
            "  evaluation_interval: 5s\n"
            "scrape_configs:\n"
            "  - job_name: prometheus\n"
            f"    basic_auth: {{username: {user}, password_file: '{prometheus / 'password'}'}}\n"
            f"    static_configs: [{{targets: ['{HOST}:{self.settings.prometheus_port}']}}]\n"
            "  - job_name: vdm\n"
            "    file_sd_configs:\n"
            f"      - files: ['{self.prometheus_targets_dir}/*.json']\n"
            "        refresh_interval: 5s\n"
        )
        # Endpoints and ports, so later commands find this stack without flags.
        write_private(self.home / STACK_ENV_FILE, "".join(f"{k}={v}\n" for k, v in self.endpoints().items()))

    # -- PID records ----------------------------------------------------------------

    def _pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"

    def _record(self, name: str) -> dict | None:
        path = self._pid_file(name)
        return json.loads(path.read_text()) if path.exists() else None

    def _recorded_pid(self, name: str) -> int | None:
        """The PID recorded for a server if that very process is still alive."""
        record = self._record(name)
        if record is None or process_start_time(record["pid"]) != record["start_time"]:
            return None
        return record["pid"]

    def _leftovers(self, name: str) -> list[int]:
        """Live processes of the recorded server's process group (leader included if alive):
        a server's workers can outlive a leader killed with SIGKILL and keep its port."""
        record = self._record(name)
        if record is None or record.get("start_time") is None:
            return []
        # A record without `pgid`: the leader's own group (every server starts a new session).
        return process_group_members(record.get("pgid", record["pid"]), record["start_time"])

    def _stop_leftovers(self, spec: ServerSpec) -> list[int]:
        """Stop what is left of a server's process group after its leader died; returns their PIDs."""
        left = self._leftovers(spec.name)
        if left:
            record = self._record(spec.name)
            _stop_group_members(record.get("pgid", record["pid"]), record["start_time"], spec.stop_timeout_s)
            self.log(f"{spec.name:<11} stopped processes its dead leader left: pid {', '.join(map(str, left))}")
        return left

    def _status(self, spec: ServerSpec) -> ServerStatus:
        pid = self._recorded_pid(spec.name)
        if pid is None:
            state = "dead" if self._pid_file(spec.name).exists() else "stopped"
            note = f"exited; see {self.log_dir / (spec.name + '.log')}" if state == "dead" else ""
            return ServerStatus(spec.name, state, spec.url, note=note)
        if spec.healthy():
            return ServerStatus(spec.name, "running", spec.url, pid)
        return ServerStatus(spec.name, "starting", spec.url, pid, note="not answering its health check yet")

    # -- commands ---------------------------------------------------------------------

    def status(self) -> list[ServerStatus]:
        statuses = [self._status(spec) for spec in self.specs()]
        if not shutil.which("prometheus"):
            statuses.append(ServerStatus("prometheus", "skipped", note="not installed (apt-get install -y prometheus)"))
        return statuses

    def up(self) -> list[ServerStatus]:
        for folder in (self.home, self.run_dir, self.log_dir, self.home / "s3", self.home / "mlflow"):
            folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        generate_credentials(self.home)
        self._write_configs()
        for spec in self.specs():
            self._start(spec)
        return self.status()

    def _start(self, spec: ServerSpec) -> None:
        current = self._status(spec)
        if current.state in ("running", "starting"):
            self._wait_healthy(spec, current.pid)
            self.log(f"{spec.name:<11} already running  {spec.url}  pid {current.pid}")
            return
        if current.state == "dead":
            self.log(f"{spec.name:<11} had died; restarting it on its data")
            self._stop_leftovers(spec)
        # A server that just died or was just stopped may hold a port for a moment (seen once in CI:
        # SeaweedFS's, right after `down`); another program's stays taken and is reported.
        busy = _wait_ports_free(spec.ports, timeout_s=10 if current.state == "dead" else 3)
        if busy:
            raise StackError(
                f"{spec.name}: port(s) {busy} on {HOST} are in use by another process; "
                "stop it or choose other ports (VDM_*_PORT variables)"
            )
        started = time.monotonic()
        if spec.before_start:
            spec.before_start()
        log_path = self.log_dir / f"{spec.name}.log"
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                spec.argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=spec.cwd or self.home,
                env={**os.environ, **spec.env},
                start_new_session=True,  # its own process group: `down` stops it and its children
            )
        # A new session's group id is its leader's PID; recorded, so `down` finds the group after the leader died.
        record = {
            "pid": process.pid,
            "pgid": process.pid,
            "start_time": process_start_time(process.pid),
            "argv0": spec.argv[0],
        }
        self._pid_file(spec.name).write_text(json.dumps(record))
        self._wait_healthy(spec, process.pid, log_path)
        if spec.after_start:
            spec.after_start()
        self.log(f"{spec.name:<11} started in {time.monotonic() - started:4.1f} s  {spec.url}  pid {process.pid}")

    def _wait_healthy(self, spec: ServerSpec, pid: int, log_path: Path | None = None) -> None:
        deadline = time.monotonic() + spec.start_timeout_s
        while time.monotonic() < deadline:
            if spec.healthy():
                return
            if self._recorded_pid(spec.name) != pid:
                tail = log_path.read_text(errors="replace")[-2000:] if log_path else ""
                raise StackError(f"{spec.name} exited while starting; last log lines:\n{tail}")
            time.sleep(0.25)
        raise StackError(f"{spec.name} did not become healthy within {spec.start_timeout_s:.0f} s ({spec.url})")

    def down(self) -> list[str]:
        """Stop every server this stack started (by recorded PID), each with its whole process
        group, also what is left of one whose leader died; returns the names of those it stopped."""
        stopped = []
        for spec in reversed(self.specs()):
            pid = self._recorded_pid(spec.name)
            if pid is not None:
                started = time.monotonic()
                _stop_process_group(pid, spec.stop_timeout_s)
                stopped.append(spec.name)
                self.log(f"{spec.name:<11} stopped in {time.monotonic() - started:4.1f} s  pid {pid}")
            if self._stop_leftovers(spec) and spec.name not in stopped:
                stopped.append(spec.name)
            self._pid_file(spec.name).unlink(missing_ok=True)
        return stopped

    def env_exports(self) -> str:
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.client_env().items())


def _stop_process_group(pid: int, timeout_s: float) -> None:
    start_time = process_start_time(pid)
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process_start_time(pid) != start_time:
            break
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # whatever of the group is left


def _stop_group_members(pgid: int, started_at: str, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`, to a group whose leader is gone, until none of
    its members (`process_group_members`) is left."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        if not process_group_members(pgid, started_at):
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait_s
        while process_group_members(pgid, started_at) and time.monotonic() < deadline:
            time.sleep(0.1)
