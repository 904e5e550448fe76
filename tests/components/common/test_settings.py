"""Settings: environment first, then the stack's files in the state folder."""

from __future__ import annotations

import pydantic
import pytest

from components.common.settings import Settings, load_settings

K8S_NAMES = {
    "VDM_HOME",
    "VDM_S3_ENDPOINT",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_TRACKING_URI",
    "VDM_DATA_BUCKET",
    "VDM_MLFLOW_BUCKET",
    "VDM_IMAGE",
}


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in list(__import__("os").environ):
        if name.startswith(("VDM_", "AWS_", "MLFLOW_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("VDM_HOME", str(tmp_path))
    return tmp_path


def test_defaults_without_any_configuration(clean_env):
    s = load_settings()
    assert s.home == clean_env
    assert s.s3_endpoint == "http://127.0.0.1:8333"
    assert s.mlflow_tracking_uri == "http://127.0.0.1:5000"
    assert (s.data_bucket, s.mlflow_bucket) == ("vdm", "mlflow")
    assert s.secret_key.get_secret_value() == ""


def test_state_folder_defaults_to_dot_vdm_in_the_working_directory(clean_env, monkeypatch, tmp_path):
    monkeypatch.delenv("VDM_HOME")
    monkeypatch.setenv("HOME", "/somewhere/else")
    monkeypatch.setenv("IMAGE", "not-ours")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".vdm").mkdir()
    (tmp_path / ".vdm" / "credentials.env").write_text("AWS_ACCESS_KEY_ID=k\nAWS_SECRET_ACCESS_KEY=s\n")
    s = load_settings()
    assert s.home == tmp_path / ".vdm"
    assert s.access_key == "k" and s.image != "not-ours"


def test_state_files_are_read_and_environment_wins(clean_env, monkeypatch):
    (clean_env / "stack.env").write_text(
        "VDM_S3_ENDPOINT=http://127.0.0.1:9100\nMLFLOW_TRACKING_URI=http://127.0.0.1:5100\n"
    )
    (clean_env / "credentials.env").write_text("AWS_ACCESS_KEY_ID=filekey\nAWS_SECRET_ACCESS_KEY=filesecret\n")
    s = load_settings()
    assert (s.s3_endpoint, s.s3_host, s.s3_secure) == ("http://127.0.0.1:9100", "127.0.0.1:9100", False)
    assert (s.access_key, s.secret_key.get_secret_value()) == ("filekey", "filesecret")
    monkeypatch.setenv("VDM_S3_ENDPOINT", "https://minio.vdm.svc:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-secret")
    s = load_settings()
    assert (s.s3_endpoint, s.s3_host, s.s3_secure) == ("https://minio.vdm.svc:9000", "minio.vdm.svc:9000", True)
    assert s.secret_key.get_secret_value() == "from-secret"
    assert s.mlflow_tracking_uri == "http://127.0.0.1:5100"


def test_secret_never_shows_in_repr(clean_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2-very-secret")
    s = load_settings()
    assert "hunter2" not in repr(s) and "hunter2" not in str(s) and "hunter2" not in s.model_dump_json()


def test_bad_values_are_rejected(clean_env, monkeypatch):
    monkeypatch.setenv("VDM_MLFLOW_PORT", "not-a-port")
    with pytest.raises(pydantic.ValidationError, match="VDM_MLFLOW_PORT"):
        load_settings()


def test_variable_names_are_the_ones_k8s_sets():
    aliases = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        aliases.update(getattr(alias, "choices", [alias]))
    assert aliases >= K8S_NAMES
