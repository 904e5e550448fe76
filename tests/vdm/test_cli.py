"""The `vdm` command line: its version, one option name per idea, and expected failures as
one `error: ...` line (exit code 1, no traceback) against the real local stack or a closed port."""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import sys
import termios
from importlib.metadata import version

import mlflow
import pytest
from click.testing import CliRunner
from conftest import free_port
from mlflow import MlflowClient

from components.common.tracking import git_commit
from vdm.cli import main


def _vdm(*args: str, **env: str):
    return CliRunner().invoke(main, list(args), env=env or None)


def _assert_one_error_line(result, *expected: str) -> None:
    """Exit code 1 and stderr exactly one `error: ...` line containing every `expected` text."""
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an exception escaping
    assert result.exit_code == 1, (result.exit_code, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


def test_version_names_the_package_version_and_the_commit():
    result = _vdm("--version")
    assert result.exit_code == 0
    commit = git_commit()  # git's, or VDM_GIT_COMMIT in an image
    known = f" (commit {commit})" if commit != "unknown" else ""
    assert result.output == f"vdm {version('vdm-platform')}{known}\n"


@pytest.mark.parametrize(
    ("args", "old_name"),
    [
        (["data", "synth", "--out", "x"], "--out"),
        (["data", "orbits", "--out", "x"], "--out"),
        (["sample", "--model", "m", "--out", "x.mp4"], "--out"),
        (["sample", "--model", "m", "--output", "x.mp4", "--steps", "2"], "--steps"),
        (["eval", "--model", "m", "--data", "d", "--steps", "2"], "--steps"),
        (["train-vae", "--data", "d", "--output", "o", "--steps", "2"], "--steps"),
        (["run", "--work", "s3://vdm/x"], "--work"),
    ],
)
def test_old_option_names_are_refused(args, old_name):
    result = _vdm(*args)
    assert result.exit_code == 2
    assert f"No such option '{old_name}'" in result.stderr


def test_a_negative_motion_is_refused_naming_the_option():
    result = _vdm("sample", "--model", "m", "--output", "x.mp4", "--motion", "-1")
    assert result.exit_code == 2 and "--motion" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("data synth", {"--output"}),
        ("data orbits", {"--output"}),
        ("sample", {"--output", "--sample-steps"}),
        ("eval", {"--sample-steps"}),
        ("train-vae", {"--output", "--max-steps"}),
        ("run", {"--output"}),
    ],
)
def test_one_name_per_idea_in_the_help(command, options):
    result = _vdm(*command.split(), "--help")
    assert result.exit_code == 0
    assert all(f"{option} " in result.output for option in options), result.output


@pytest.fixture
def tracking_restored(settings):
    """Commands under test point MLflow at other servers: back to the stack's afterwards."""
    yield
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)


def test_unknown_model_alias_and_pipeline_are_one_line_errors(stack, tmp_path, request):
    out = str(tmp_path / "x.mp4")
    unknown = _vdm("sample", "--model", "models:/no-such-model@champion", "--prompt", "a", "--output", out)
    _assert_one_error_line(unknown, "no registered model named 'no-such-model'")

    name = f"vdm-test-{request.node.name[:40]}"
    MlflowClient().create_registered_model(name)
    wrong_alias = _vdm("sample", "--model", f"models:/{name}@no-such-alias", "--prompt", "a", "--output", out)
    _assert_one_error_line(wrong_alias, f"{name} has no alias 'no-such-alias'", f"vdm registry list {name}")

    listed = _vdm("registry", "list", "no-such-model")
    _assert_one_error_line(listed, "no registered model named 'no-such-model'", name)

    no_pipeline = _vdm("pipeline", "submit", "no-such-pipeline", "--host", f"http://127.0.0.1:{free_port()}")
    _assert_one_error_line(no_pipeline, "unknown pipeline 'no-such-pipeline'", "end-to-end")


def test_missing_bucket_object_and_bad_credentials_are_one_line_errors(stack, settings, tmp_path):
    out = str(tmp_path / "x.mp4")
    no_bucket = _vdm("sample", "--model", "s3://no-such-bucket/model/final", "--output", out)
    _assert_one_error_line(no_bucket, "bucket 'no-such-bucket' does not exist", "check the s3:// URI")

    no_object = _vdm("sample", "--model", f"s3://{settings.data_bucket}/no/such/model/final", "--output", out)
    _assert_one_error_line(no_object, "no such object", "check the s3:// URI")

    refused = _vdm("weights", "list", AWS_ACCESS_KEY_ID="wrong-key")
    _assert_one_error_line(refused, "rejected access key 'wrong-key'", "AWS_ACCESS_KEY_ID")


def test_unreachable_servers_are_one_line_errors(stack, tracking_restored):
    closed = f"http://127.0.0.1:{free_port()}"
    for args in (["registry", "list", "any-model"], ["sample", "--model", "models:/any@champion", "--output", "x"]):
        mlflow_down = _vdm(*args, MLFLOW_TRACKING_URI=closed, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
        _assert_one_error_line(mlflow_down, f"cannot reach MLflow at {closed}", "vdm stack up")

    kfp_down = _vdm("pipeline", "submit", "end-to-end", "--host", closed)
    _assert_one_error_line(kfp_down, f"cannot reach the Kubeflow Pipelines API at {closed}", "check --host")


def test_a_real_process_prints_the_error_line_without_a_traceback(stack):
    result = subprocess.run(
        [sys.executable, "-m", "vdm.cli", "registry", "list", "no-such-model"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        line for line in result.stderr.splitlines() if line.startswith("error: ")
    ]
    assert "no-such-model" in result.stderr


def test_errors_of_unreachable_servers_are_expected_failures_and_bugs_are_not(tracking_restored):
    """The messages of what the CLI's handler sees from the real clients when nothing listens."""
    from mlflow.exceptions import MlflowException

    from components.common.objectstore import ObjectStore, ObjectStoreUnavailableError
    from vdm.errors import failure_message

    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ObjectStoreUnavailableError) as s3_down:
        ObjectStore(closed, "key", "secret", retries=0).bucket_exists("vdm")
    assert failure_message(s3_down.value) == (
        f"{s3_down.value}; start the local stack (`vdm stack up`) or set VDM_S3_ENDPOINT to the S3 server"
    )
    assert str(s3_down.value).startswith(f"cannot reach the S3 server at {closed}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        mlflow.set_tracking_uri(closed)
        with pytest.raises(MlflowException) as mlflow_down:
            MlflowClient().get_experiment_by_name("any")
    assert failure_message(mlflow_down.value) == (
        f"cannot reach MLflow at {closed}: start the local stack (`vdm stack up`) or set MLFLOW_TRACKING_URI"
    )
    assert failure_message(MlflowException("bad input", error_code="INVALID_PARAMETER_VALUE")) is None
    assert failure_message(KeyError("a bug")) is None


def _terminal_output(master: int) -> str:
    chunks = []
    while select.select([master], [], [], 0)[0]:
        chunks.append(os.read(master, 65536))
    return b"".join(chunks).decode(errors="replace")


def test_sample_shows_its_progress_on_a_terminal_unless_quiet(tmp_path, monkeypatch):
    from model.stages import VideoDiffusion, named_config

    folder = VideoDiffusion.create(named_config("tiny", "video")).save(tmp_path / "final")
    master, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has a size
    terminal = os.fdopen(follower, "w")
    monkeypatch.setattr(sys, "stderr", terminal)  # what a user at a terminal has
    args = ["sample", "--model", str(folder), "--prompt", "a", "--frames", "2"]
    try:
        main.main([*args, "--sample-steps", "2", "--output", str(tmp_path / "a.mp4")], standalone_mode=False)
        terminal.flush()
        shown = _terminal_output(master)
        assert "sampling: 100%" in shown and "2/2" in shown, shown

        main.main([*args, "--sample-steps", "1", "--output", str(tmp_path / "b.mp4"), "--quiet"], standalone_mode=False)
        terminal.flush()
        assert "sampling" not in _terminal_output(master)
    finally:
        terminal.close()
        os.close(master)
    assert (tmp_path / "a.mp4").stat().st_size > 0 and (tmp_path / "b.mp4").stat().st_size > 0


def test_no_output_shows_a_presigned_urls_signature(store, prefix):
    """A bug's traceback and an expected failure's line both keep the URL, not its secrets."""
    import click

    from components.common.objectstore import ObjectNotFoundError
    from vdm.cli import VdmGroup

    url = store.presigned_get(f"{prefix}/shard-000000.tar")
    signature = url.split("X-Amz-Signature=")[1].split("&")[0]
    credential = url.split("X-Amz-Credential=")[1].split("&")[0]
    assert len(signature) == 64

    @click.group(cls=VdmGroup)
    def cli() -> None:
        pass

    @cli.command()
    def bug() -> None:
        raise OSError(f"(('pipe:curl -s -L {url}',), 'exit status 7')")  # as webdataset reports a read

    @cli.command()
    def missing() -> None:
        raise ObjectNotFoundError(f"no such object: {url}")

    crashed = CliRunner().invoke(cli, ["bug"])
    assert crashed.exit_code == 1 and "Traceback" in crashed.stderr and "exit status 7" in crashed.stderr
    refused = CliRunner().invoke(cli, ["missing"])
    _assert_one_error_line(refused, "no such object")
    for result in (crashed, refused):
        assert "X-Amz-Signature=REDACTED" in result.stderr and "X-Amz-Credential=REDACTED" in result.stderr
        assert signature not in result.stderr and credential not in result.stderr
