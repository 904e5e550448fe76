"""Thin helpers over MLflow: runs that carry their lineage, links users can click.

Artifacts go through the tracking server (`--serve-artifacts`), which writes them
to the `mlflow` bucket of the object store: pods and laptops need only the
tracking URI, never direct bucket access, to log or fetch artifacts.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import mlflow
import requests
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource, S3ArtifactDatasetSource
from mlflow.exceptions import MlflowException

from components.common.objectstore import ObjectNotFoundError, ObjectStore, S3Uri, is_s3_uri
from components.common.settings import Settings, load_settings

TAG_GIT_COMMIT = "vdm.git_commit"
TAG_CONFIG_HASH = "vdm.config_hash"
TAG_INPUTS = "vdm.inputs"
# MLflow 3's UI opens an experiment without this tag on the GenAI overview; with this
# value it opens on the runs table.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# The dataset card of curated data: next to its `shards/`, with a `digest` of the shards and manifest.
DATASET_CARD = "dataset_card.json"

T = TypeVar("T")


def config_hash(config: Mapping) -> str:
    """A stable hash of a configuration: same values in any key order, same hash."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def git_commit() -> str:
    """The code's commit: `VDM_GIT_COMMIT` (set in the image), else git, else 'unknown'."""
    if commit := os.environ.get("VDM_GIT_COMMIT"):
        return commit
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def flatten(config: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested config to MLflow params: {'a': {'b': 1}} -> {'a.b': '1'}."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return flat


def connect(settings: Settings | None = None) -> None:
    """Point the MLflow client (tracking and registry) at the platform's server, with the
    login from the settings when the environment has none (MLflow reads it from there only)."""
    settings = settings or load_settings()
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    for name, value in settings.mlflow_login_env().items():
        os.environ.setdefault(name, value)


def across_broken_exchanges(call: Callable[[], T], attempts: int = 3) -> T:
    """`call()` (an MLflow client call), made again when its HTTP exchange broke: the server
    went away mid-answer or stayed away through the client's own retries (a restart). The
    client retries only a refused or unanswered request, not an answer cut off after its
    headers; a training run logs through this so that an MLflow restart costs no run. An
    answer from the server (an error it gives) is raised at once."""
    for attempt in range(attempts - 1):
        try:
            return call()
        except MlflowException as error:  # raised while handling the transport's error
            if not isinstance(error.__context__, requests.ConnectionError | requests.exceptions.ChunkedEncodingError):
                raise
        time.sleep(2**attempt)
    return call()


def use_experiment(name: str) -> mlflow.entities.Experiment:
    """Make `name` the active experiment (created when missing), with the kind tag that opens
    it on the runs table; a kind someone chose in the UI is kept."""
    experiment = mlflow.set_experiment(name)
    if TAG_EXPERIMENT_KIND not in experiment.tags:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
    return experiment


@contextmanager
def tracked_run(
    experiment: str,
    *,
    run_name: str | None = None,
    config: Mapping | None = None,
    inputs: Sequence[str] = (),
    tags: Mapping[str, str] | None = None,
    settings: Settings | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run tagged with its lineage: git commit, config hash and input URIs.

    The config is logged as params (flattened) and as `config.json`; the run ends
    FAILED if the body raises.
    """
    connect(settings)
    use_experiment(experiment)
    config = dict(config or {})
    lineage = {
        TAG_GIT_COMMIT: git_commit(),
        TAG_CONFIG_HASH: config_hash(config),
        TAG_INPUTS: json.dumps(list(inputs)),
        **(tags or {}),
    }
    with mlflow.start_run(run_name=run_name, tags=lineage) as run:
        if config:
            mlflow.log_params(flatten(config))
            mlflow.log_dict(config, "config.json")
        yield run


def run_url(run: mlflow.ActiveRun | mlflow.entities.Run, settings: Settings | None = None) -> str:
    """The run's page in the MLflow UI."""
    settings = settings or load_settings()
    info = run.info
    return f"{settings.mlflow_tracking_uri.rstrip('/')}/#/experiments/{info.experiment_id}/runs/{info.run_id}"


def artifact_object_uri(
    run: mlflow.ActiveRun | mlflow.entities.Run, path: str = "", settings: Settings | None = None
) -> str:
    """Where the tracking server stored a run's artifact in the object store.

    The server proxies `mlflow-artifacts:/<exp>/<run>/artifacts` into
    `s3://<mlflow bucket>/<exp>/<run>/artifacts`.
    """
    settings = settings or load_settings()
    root = run.info.artifact_uri
    scheme = "mlflow-artifacts:"
    if not root.startswith(scheme):
        return f"{root}/{path}".rstrip("/")
    relative = root[len(scheme) :].lstrip("/")
    # mlflow-artifacts URIs may carry the server's address: mlflow-artifacts://host:port/<exp>/...
    if root.startswith(scheme + "//"):
        relative = relative.split("/", 1)[1]
    return f"s3://{settings.mlflow_bucket}/{relative}/{path}".rstrip("/")


def curated_dataset(data_uri: str, digest: str | None) -> MetaDataset:
    """The MLflow dataset of training data: named by its URI (s3:// or a local folder),
    with the dataset card's digest (None: MLflow derives one from the name)."""
    if is_s3_uri(data_uri):
        source = S3ArtifactDatasetSource(data_uri)
    else:
        source = LocalArtifactDatasetSource(str(Path(data_uri).resolve()))
    return MetaDataset(source, name=data_uri, digest=digest)


def card_digest(data_uri: str, store: ObjectStore | None) -> str | None:
    """The `digest` in the dataset card of curated data, given as its `shards/` prefix or its
    output prefix; None when there is no card (data not made by `vdm curate`)."""
    if is_s3_uri(data_uri):
        head, _, last = data_uri.rstrip("/").rpartition("/")
        prefix = head if last == "shards" and head != "s3:/" else data_uri.rstrip("/")
        try:
            card = store.get_bytes(S3Uri.parse(prefix).join(DATASET_CARD))
        except ObjectNotFoundError:
            return None
    else:
        folder = Path(data_uri)
        path = (folder.parent if folder.name == "shards" else folder) / DATASET_CARD
        if not path.is_file():
            return None
        card = path.read_bytes()
    return json.loads(card).get("digest")


def log_curated_data(data_uri: str, store: ObjectStore | None, context: str = "training") -> MetaDataset:
    """Link the active run to its data (`mlflow.log_input`): the run page's Datasets then
    names the shards' URI and the card's digest. Returns the logged dataset."""
    dataset = curated_dataset(data_uri, card_digest(data_uri, store))
    mlflow.log_input(dataset, context=context)
    return dataset
