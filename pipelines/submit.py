"""Compile the pipelines to YAML and hand them to a Kubeflow Pipelines API server
through `kfp.Client`: upload (a new version when the pipeline exists), then a run or
a recurring run in an experiment. Also what each pipeline's run form shows, read from
its compiled spec. Expected failures (an unknown pipeline or parameter, a host that is not
a reachable KFP API, a refused request) are ValueErrors with a one-line message."""

from __future__ import annotations

import contextlib
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format
from kfp import compiler

from pipelines.kubeflow import PIPELINES


def _pipeline(name: str):
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; known: {', '.join(PIPELINES)}")
    return PIPELINES[name]


@dataclass(frozen=True)
class FormParameter:
    """A field of a pipeline's run form, as its compiled spec declares it."""

    name: str
    type: str  # the spec's parameterType: STRING, NUMBER_INTEGER, NUMBER_DOUBLE, BOOLEAN, LIST, STRUCT
    default: object | None  # None: the form has no default
    description: str


@dataclass(frozen=True)
class RunForm:
    """What the Kubeflow UI shows for a pipeline: its description and its parameters."""

    name: str
    description: str
    parameters: tuple[FormParameter, ...]


def run_form(name: str) -> RunForm:
    """The run form of pipeline `name` from its compiled spec (the document `compile_all`
    writes and the UI reads); parameters in the order the compiled YAML has them (by name)."""
    spec = json_format.MessageToDict(_pipeline(name).pipeline_spec)
    declared = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    parameters = []
    for key in sorted(declared):
        field = declared[key]
        default = field.get("defaultValue")
        if field["parameterType"] == "NUMBER_INTEGER" and default is not None:
            default = int(default)  # the spec stores every number as a double
        parameters.append(FormParameter(key, field["parameterType"], default, field.get("description", "")))
    info = spec["pipelineInfo"]
    return RunForm(info["name"], info.get("description", ""), tuple(parameters))


def compile_all(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, pipeline in PIPELINES.items():
        path = out / f"{name}.yaml"
        compiler.Compiler().compile(pipeline, str(path))
        written.append(path)
    return written


_TYPES = {"String": str, "Integer": int, "Float": float, "Double": float, "Boolean": lambda v: _boolean(v)}


def _boolean(value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise ValueError(f"not true or false: {value!r}")
    return value.lower() == "true"


def parse_params(items: tuple[str, ...] | list[str], pipeline: str) -> dict:
    """`k=v` pairs as the run form's types: each value converted to the type the pipeline
    declares for its parameter (`gpus_per_node=4` stays the string "4" that KFP resolves
    into a pod; `nodes=2` is an integer); an unknown name or a bad value is refused, named."""
    inputs = _pipeline(pipeline).component_spec.inputs
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--param wants KEY=VALUE, got {item!r}")
        if key not in inputs:
            raise ValueError(f"{pipeline} has no parameter {key!r}; its parameters: {', '.join(inputs)}")
        try:
            params[key] = _TYPES[inputs[key].type](value)
        except ValueError:
            raise ValueError(f"--param {key}: {value!r} is not a valid {inputs[key].type}") from None
    return params


def connect(host: str):
    """A kfp.Client of the KFP API at `host`; a host that cannot be reached, or answers as no
    KFP API does, is a ValueError saying so."""
    import kfp

    _check_health(host)
    with _api_errors(host), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # kfp's reminder that it needs a v2 API server
        return kfp.Client(host=host)


def _check_health(host: str) -> None:
    """One request to the API's health endpoint, as kfp.Client sends it for a bare host (no
    credentials): kfp.Client retries a refused one for 25 s, logging a traceback each time."""
    url = (host if "://" in host else f"http://{host}").rstrip("/") + "/apis/v2beta1/healthz"
    try:
        with urllib.request.urlopen(url, timeout=15):
            pass
    except urllib.error.HTTPError as e:
        answer = f"{e.code} {e.reason}"
        raise ValueError(f"the Kubeflow Pipelines API at {host} answered {answer}; {_hint(e.code)}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise ValueError(f"cannot reach the Kubeflow Pipelines API at {host} ({reason}); check --host") from None


def _hint(status: int) -> str:
    return "check your credentials" if status in (401, 403) else "is --host the Kubeflow Pipelines API?"


@contextlib.contextmanager
def _api_errors(host: str = "") -> Iterator[None]:
    """The KFP API's refusals (a wrong address, missing credentials) and a lost connection
    as one-line ValueErrors."""
    import urllib3
    from kfp_server_api.exceptions import ApiException

    where = f" at {host}" if host else ""
    try:
        yield
    except urllib3.exceptions.HTTPError as e:
        reason = getattr(e, "reason", None) or e
        raise ValueError(f"cannot reach the Kubeflow Pipelines API{where} ({reason}); check --host") from None
    except ApiException as e:
        answer = f"{e.status} {e.reason}"
        raise ValueError(f"the Kubeflow Pipelines API{where} answered {answer}; {_hint(e.status)}") from None


def upload(client, name: str) -> tuple[str, str]:
    """(pipeline id, version id): a new pipeline, or a new version of the existing one."""
    pipeline = _pipeline(name)
    with tempfile.TemporaryDirectory() as tmp, _api_errors():
        package = str(Path(tmp) / f"{name}.yaml")
        compiler.Compiler().compile(pipeline, package)
        pipeline_id = client.get_pipeline_id(name)
        version_name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if pipeline_id is None:
            pipeline = client.upload_pipeline(package, pipeline_name=name)
            pipeline_id = pipeline.pipeline_id
            version = client.list_pipeline_versions(pipeline_id).pipeline_versions[0]
        else:
            version = client.upload_pipeline_version(
                package, pipeline_version_name=version_name, pipeline_id=pipeline_id
            )
    return pipeline_id, version.pipeline_version_id


def _prepare(client, name: str, experiment: str) -> tuple[str, str, str]:
    """(pipeline id, version id, experiment id): uploaded, and the experiment found or created."""
    pipeline_id, version_id = upload(client, name)
    with _api_errors():
        return pipeline_id, version_id, client.create_experiment(experiment).experiment_id


def submit(client, name: str, experiment: str, params: dict) -> dict:
    pipeline_id, version_id, experiment_id = _prepare(client, name, experiment)
    with _api_errors():
        run = client.run_pipeline(
            experiment_id=experiment_id,
            job_name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
            params=params,
            pipeline_id=pipeline_id,
            version_id=version_id,
        )
    return {"pipeline_id": pipeline_id, "version_id": version_id, "experiment_id": experiment_id, "run_id": run.run_id}


def schedule(client, name: str, experiment: str, cron: str, params: dict, max_concurrency: int = 1) -> dict:
    pipeline_id, version_id, experiment_id = _prepare(client, name, experiment)
    with _api_errors():
        job = client.create_recurring_run(
            experiment_id=experiment_id,
            job_name=f"{name}-schedule",
            cron_expression=cron,
            max_concurrency=max_concurrency,
            params=params,
            pipeline_id=pipeline_id,
            version_id=version_id,
        )
    return {"pipeline_id": pipeline_id, "version_id": version_id, "recurring_run_id": job.recurring_run_id}
