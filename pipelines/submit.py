"""Compile the pipelines to YAML and hand them to a Kubeflow Pipelines API server
through `kfp.Client`: upload (a new version when the pipeline exists), then a run or
a recurring run in an experiment."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from kfp import compiler

from pipelines.kubeflow import PIPELINES


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
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {pipeline!r}; one of {', '.join(PIPELINES)}")
    inputs = PIPELINES[pipeline].component_spec.inputs
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


def upload(client, name: str) -> tuple[str, str]:
    """(pipeline id, version id): a new pipeline, or a new version of the existing one."""
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; one of {', '.join(PIPELINES)}")
    with tempfile.TemporaryDirectory() as tmp:
        package = str(Path(tmp) / f"{name}.yaml")
        compiler.Compiler().compile(PIPELINES[name], package)
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
    return pipeline_id, version_id, client.create_experiment(experiment).experiment_id


def submit(client, name: str, experiment: str, params: dict) -> dict:
    pipeline_id, version_id, experiment_id = _prepare(client, name, experiment)
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
