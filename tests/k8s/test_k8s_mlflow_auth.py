"""The MLflow users of k8s/: the Job mlflow-users' script, fed the Secrets as the dev
overlay renders them (make-secrets.sh's files) and mounted as the kubelet mounts them,
run against a real `mlflow server --app-name basic-auth` on 127.0.0.1 configured as the
Deployment configures it (sqlite instead of the cluster's PostgreSQL)."""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import free_port
from k8s_checks import PLATFORM, generated_name, platform_container, rendered, secret_data


@pytest.fixture(scope="module")
def mlflow_auth_server(tmp_path_factory):
    """A real `mlflow server --app-name basic-auth` on 127.0.0.1 (sqlite instead of the
    cluster's PostgreSQL), configured as the Deployment configures it."""
    home = tmp_path_factory.mktemp("mlflow-auth")
    port = free_port()
    admin = ("admin", secrets.token_hex(20))
    config = home / "basic_auth.ini"
    config.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{home / 'auth.db'}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env |= {
        "HOME": str(home),
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_USERNAME": admin[0],
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(20),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    mlflow = Path(sys.executable).parent / "mlflow"
    command = [str(mlflow), "server", "--app-name=basic-auth", "--host=127.0.0.1", f"--port={port}", "--workers=1"]
    command += [f"--backend-store-uri=sqlite:///{home / 'mlflow.db'}", f"--artifacts-destination={home / 'artifacts'}"]
    log = (home / "server.log").open("w")
    process = subprocess.Popen(command, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (home / "server.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "MLflow did not start"
            time.sleep(0.5)
        yield url, admin
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def mount_secrets(objs: list[dict], template: dict, root: Path) -> None:
    """The template's Secret volumes written under `root` as the kubelet mounts them."""
    volumes = {v["name"]: v["secret"]["secretName"] for v in template["spec"]["volumes"] if "secret" in v}
    for mount in template["spec"]["containers"][0]["volumeMounts"]:
        if mount["name"] in volumes:
            folder = root / Path(mount["mountPath"]).relative_to("/var/run/secrets")
            folder.mkdir(parents=True, exist_ok=True)
            for key, value in secret_data(objs, PLATFORM, volumes[mount["name"]]).items():
                (folder / key).write_text(value)


def run_users_job(objs: list[dict], url: str, root: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The Job's script as its container runs it (in this process: importing MLflow anew
    would take seconds), with the Secrets mounted under `root`; what it printed."""
    _, job = platform_container(objs, "Job", "mlflow-users")
    assert job["command"][:2] == ["python", "-c"]
    script = job["command"][2].replace('"/var/run/secrets"', repr(str(root)))
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # the script sets them: restored after
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(script, "mlflow-users", "exec"), {"__name__": "__main__"})
    return out.getvalue()


def test_mlflow_users_job_makes_the_workloads_users(mlflow_auth_server, tmp_path, monkeypatch):
    url, admin = mlflow_auth_server
    objs = rendered("dev")
    mount_secrets(objs, platform_container(objs, "Job", "mlflow-users")[0], tmp_path)
    # The admin of the Secret is the server's (in the cluster the server bootstraps it from the same Secret).
    (tmp_path / "mlflow-admin" / "MLFLOW_AUTH_ADMIN_USERNAME").write_text(admin[0])
    (tmp_path / "mlflow-admin" / "MLFLOW_AUTH_ADMIN_PASSWORD").write_text(admin[1])
    done = run_users_job(objs, url, tmp_path, monkeypatch)
    assert "created MLflow user vdm-pipelines" in done and "created MLflow user vdm-serving" in done

    pipelines_folder = tmp_path / "vdm-mlflow-credentials"
    pipelines = tuple(
        (pipelines_folder / k).read_text() for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    )
    api = f"{url}/api/2.0/mlflow"
    created = requests.post(f"{api}/registered-models/create", json={"name": "m"}, auth=pipelines, timeout=10)
    assert created.status_code == 200, created.text

    # Serving, as its client reads ~/.mlflow/credentials from the mounted Secret: reads, cannot change.
    serving_home = tmp_path / "serving-home"
    credentials = secret_data(objs, PLATFORM, generated_name(objs, "vdm-mlflow-serving"))["credentials"]
    (serving_home / ".mlflow").mkdir(parents=True)
    (serving_home / ".mlflow" / "credentials").write_text(credentials)
    probe = (
        "import sys\nfrom mlflow import MlflowClient\nfrom mlflow.exceptions import MlflowException\n"
        "client = MlflowClient(sys.argv[1])\nprint(client.get_registered_model('m').name)\n"
        "try:\n    client.delete_registered_model('m')\nexcept MlflowException as e:\n    print(e.error_code)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env |= {"HOME": str(serving_home), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    out = subprocess.run([sys.executable, "-c", probe, url], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["m", "PERMISSION_DENIED"], out.stderr[-3000:]
    wrong = requests.get(f"{api}/registered-models/get", params={"name": "m"}, auth=("vdm-serving", "x"), timeout=10)
    assert wrong.status_code == 401

    # A rotated password takes effect on the next run; the old one stops working.
    (pipelines_folder / "MLFLOW_TRACKING_PASSWORD").write_text(secrets.token_hex(20))
    again = run_users_job(objs, url, tmp_path, monkeypatch)
    assert "MLflow user vdm-pipelines exists" in again
    rotated = (pipelines[0], (pipelines_folder / "MLFLOW_TRACKING_PASSWORD").read_text())
    assert (
        requests.get(f"{api}/registered-models/get", params={"name": "m"}, auth=pipelines, timeout=10).status_code
        == 401
    )
    assert requests.get(f"{api}/registered-models/get", params={"name": "m"}, auth=rotated, timeout=10).ok
