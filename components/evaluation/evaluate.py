"""`vdm eval`: a trained model measured by its kind's evaluation (model/tasks: motion for
text- and image-to-video, in-between positions for interpolation, velocity for
prediction, view retrieval for multi-view, class accuracy for camera-motion adapters,
the image-quality proxy with motion as a guard for spatial-HQ), run against the
platform: model from a folder, s3:// or the registry; figures (as metrics) and sample mp4s
to MLflow; for a registered model, the figures onto its version (tags the promotion gate
reads, metrics linked to its logged model) with a link to the evaluation run."""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import torch

from components.common.media import write_video
from components.common.objectstore import ObjectStore
from components.common.settings import Settings
from components.common.tracking import connect, run_url, tracked_run
from components.registry.promotion import record_evaluation, registered_version
from components.training.run import local_folder, shard_urls
from model.pipeline import to_uint8
from model.stages import VideoDiffusion


@dataclass(frozen=True)
class EvaluationReport:
    kind: str
    metric: str  # the kind's gate metric, one of `metrics`
    direction: str
    metrics: dict[str, float]
    details: dict = field(default_factory=dict)
    model_version: str | None = None  # NAME/VERSION when the model is a registered one
    mlflow_run: str | None = None


def _numbers(details: dict, prefix: str = "") -> dict[str, float]:
    """The numeric figures of a details tree as flat metric names (`data_straightness`)."""
    flat = {}
    for key, value in details.items():
        if isinstance(value, dict):
            flat |= _numbers(value, f"{prefix}{key}_")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def _logged_model_id(version: tuple[str, str] | None) -> str | None:
    """The MLflow logged model behind a registered version (None: not registered, or a version
    made from a bare artifact source)."""
    if version is None:
        return None
    registered = mlflow.MlflowClient().get_model_version(*version)
    # The REST API leaves `model_id` empty; the version's source names the logged model (models:/m-...).
    source = registered.source or ""
    return registered.model_id or (source.removeprefix("models:/") if source.startswith("models:/m-") else None)


def run_evaluation(
    model_location: str,
    data: str,
    store: ObjectStore,
    settings: Settings,
    *,
    clips: int = 8,
    steps: int = 25,
    reference: str | None = None,
) -> EvaluationReport:
    """Evaluate the model at `model_location` on held-out `data` (and `reference`, a second data
    set some kinds compare with: spatial-HQ's image set)."""
    connect(settings)
    version = registered_version(model_location)  # resolved first: the alias may move while we run
    with tempfile.TemporaryDirectory() as tmp:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = VideoDiffusion.load(local_folder(model_location, store, Path(tmp) / "model")).to(device).eval()
        task = model.task
        # On a GPU pod: bf16 autocast, as serving samples (the metrics read float32 frames back).
        with torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext():
            evaluation = task.evaluate(
                model,
                shard_urls(data, store),
                clips=clips,
                steps=steps,
                reference=shard_urls(reference, store) if reference else None,
            )
        inputs = [model_location, data, *([reference] if reference else [])]
        with tracked_run(
            f"vdm-eval-{task.name}",
            config={"clips": clips, "steps": steps, "kind": task.name, "gate_metric": task.metric.name},
            inputs=inputs,
            settings=settings,
        ) as run:
            details = json.loads(json.dumps(evaluation.details, default=float))  # numpy figures as plain JSON
            mlflow.log_metrics({k: v for k, v in _numbers(details).items() if k not in evaluation.metrics})
            # The gate's figures also on the version's logged model: the version page lists them.
            mlflow.log_metrics(evaluation.metrics, model_id=_logged_model_id(version))
            mlflow.log_dict(details, "details.json")
            for i, video in enumerate(evaluation.samples):
                path = Path(tmp) / f"sample-{i:02d}.mp4"
                write_video(path, to_uint8(video).numpy(), model.config.clip.fps, deterministic=False)
                mlflow.log_artifact(str(path), "samples")
            if version:
                mlflow.set_tag("vdm.model_version", f"{version[0]}/{version[1]}")
                record_evaluation(*version, evaluation.metrics, run_id=run.info.run_id, run_url=run_url(run, settings))
    return EvaluationReport(
        kind=task.name,
        metric=task.metric.name,
        direction=task.metric.direction,
        metrics=evaluation.metrics,
        details=details,
        model_version=f"{version[0]}/{version[1]}" if version else None,
        mlflow_run=run_url(run, settings),
    )
