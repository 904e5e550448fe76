"""One typed settings object for every part of the platform.

Variable names are the ones the k8s ConfigMaps and Secrets set (k8s/), so the same
code reads its configuration in a pod and on a laptop. Locally, `vdm stack up`
writes `$VDM_HOME/stack.env` (endpoints) and `$VDM_HOME/credentials.env`
(generated S3 keys and MLflow login, mode 0600); the environment wins over both files.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

STACK_ENV_FILE = "stack.env"
CREDENTIALS_FILE = "credentials.env"


def vdm_home() -> Path:
    """The state folder: `$VDM_HOME`, else `.vdm/` in the current directory."""
    return Path(os.environ.get("VDM_HOME") or ".vdm").resolve()


class Settings(BaseSettings):
    # No populate_by_name: with it, pydantic-settings also reads each field's own
    # name from the environment, and `home` would pick up $HOME.
    model_config = SettingsConfigDict(extra="ignore", env_file_encoding="utf-8", frozen=True)

    home: Path = Field(default_factory=vdm_home, validation_alias="VDM_HOME")

    # Object store (SeaweedFS locally, MinIO in the cluster; same S3 API).
    s3_endpoint: str = Field("http://127.0.0.1:8333", validation_alias="VDM_S3_ENDPOINT")
    s3_region: str = Field("us-east-1", validation_alias=AliasChoices("VDM_S3_REGION", "AWS_REGION"))
    access_key: str = Field("", validation_alias="AWS_ACCESS_KEY_ID")
    secret_key: SecretStr = Field(SecretStr(""), validation_alias="AWS_SECRET_ACCESS_KEY")
    data_bucket: str = Field("vdm", validation_alias="VDM_DATA_BUCKET")
    mlflow_bucket: str = Field("mlflow", validation_alias="VDM_MLFLOW_BUCKET")
    # How long streaming reads (training's shards) retry a refused connection, a broken stream or a 5xx.
    s3_retry_seconds: float = Field(120.0, ge=0, validation_alias="VDM_S3_RETRY_SECONDS")

    # Tracking and registry. The login is MLflow's own variables: its client reads them from the
    # environment only (`mlflow_login_env` hands them over when they come from a file).
    mlflow_tracking_uri: str = Field("http://127.0.0.1:5000", validation_alias="MLFLOW_TRACKING_URI")
    mlflow_username: str | None = Field(None, validation_alias="MLFLOW_TRACKING_USERNAME")
    mlflow_password: SecretStr | None = Field(None, validation_alias="MLFLOW_TRACKING_PASSWORD")

    # The project image every KFP component and the serving Deployment run.
    image: str = Field("vdm-platform:0.1.0", validation_alias="VDM_IMAGE")

    # Local stack ports (127.0.0.1 only). SeaweedFS needs its internal ports too.
    s3_port: int = Field(8333, validation_alias="VDM_S3_PORT")
    seaweed_master_port: int = Field(9333, validation_alias="VDM_SEAWEED_MASTER_PORT")
    seaweed_volume_port: int = Field(8080, validation_alias="VDM_SEAWEED_VOLUME_PORT")
    seaweed_filer_port: int = Field(8888, validation_alias="VDM_SEAWEED_FILER_PORT")
    mlflow_port: int = Field(5000, validation_alias="VDM_MLFLOW_PORT")
    prometheus_port: int = Field(9090, validation_alias="VDM_PROMETHEUS_PORT")

    def mlflow_login_env(self) -> dict[str, str]:
        """The MLflow login as the variables MLflow's client reads; empty when none is set."""
        if self.mlflow_username is None or self.mlflow_password is None:
            return {}
        return {
            "MLFLOW_TRACKING_USERNAME": self.mlflow_username,
            "MLFLOW_TRACKING_PASSWORD": self.mlflow_password.get_secret_value(),
        }

    @property
    def s3_secure(self) -> bool:
        return self.s3_endpoint.startswith("https://")

    @property
    def s3_host(self) -> str:
        """host:port of the S3 endpoint, as the minio SDK wants it."""
        return self.s3_endpoint.split("://", 1)[-1].rstrip("/")


def load_settings() -> Settings:
    """Settings from the environment, then the stack's files under the state folder."""
    files = tuple(str(vdm_home() / name) for name in (STACK_ENV_FILE, CREDENTIALS_FILE))
    return Settings(_env_file=files)


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, replacing it atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def generate_secret_file(path: Path) -> None:
    """A random secret in `path`, made once (an existing one is kept: what it protects was set up
    with it), readable by its owner only."""
    if not path.exists():
        write_private(path, secrets.token_urlsafe(32) + "\n")
    path.chmod(0o600)
