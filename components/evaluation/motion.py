"""`vdm eval motion`: the motion evidence of a video model (model/evaluation.py) run
against the platform: model from a folder, s3:// or the registry; figures and sample
mp4s to MLflow; for a registered model, the gate's metrics onto its version."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow

from components.common.media import write_video
from components.common.objectstore import ObjectStore
from components.common.settings import Settings
from components.common.tracking import connect, run_url, tracked_run
from components.registry.promotion import record_evaluation, registered_version
from components.training.run import local_folder, shard_urls
from model.evaluation import evaluate_motion
from model.pipeline import to_uint8
from model.stages import VideoDiffusion


def gate_metrics(report: dict) -> dict[str, float]:
    """What the promotion gate compares: how far the generated speed is from the data's
    (relative, 0 is right), how straight and how smooth the generated paths are."""
    data, generated = report["data"], report["generated"]
    return {
        "motion_speed_error": abs(generated["speed_px_per_frame"] / data["speed_px_per_frame"] - 1),
        "motion_straightness": generated["straightness"],
        "motion_jerk_px": generated["jerk_px"],
    }


def run_motion_evaluation(
    model_location: str, data: str, store: ObjectStore, settings: Settings, *, clips: int = 8, steps: int = 25
) -> dict:
    connect(settings)
    version = registered_version(model_location)  # resolved first: the alias may move while we run
    with tempfile.TemporaryDirectory() as tmp:
        model = VideoDiffusion.load(local_folder(model_location, store, Path(tmp) / "model"))
        report = evaluate_motion(model, shard_urls(data, store), clips=clips, steps=steps)
        metrics = gate_metrics(report)
        # image-to-video: how well generated frame 0 keeps the conditioning frame
        metrics |= {f"first_frame_{k}": v for k, v in report.get("first_frame", {}).items()}
        with tracked_run(
            "vdm-eval-motion", config={"clips": clips, "steps": steps}, inputs=[model_location, data], settings=settings
        ) as run:
            for side in ("data", "generated"):
                mlflow.log_metrics({f"{side}_{k}": v for k, v in report[side].items()})
            mlflow.log_metrics(metrics)
            for i, video in enumerate(report["samples"]):
                path = Path(tmp) / f"sample-{i:02d}.mp4"
                write_video(path, to_uint8(video).numpy(), model.config.clip.fps, deterministic=False)
                mlflow.log_artifact(str(path), "samples")
            if version:
                record_evaluation(*version, metrics, run_id=run.info.run_id)
                mlflow.set_tag("vdm.model_version", f"{version[0]}/{version[1]}")
    return {
        "data": report["data"],
        "generated": report["generated"],
        "first_frame": report.get("first_frame"),
        "gate_metrics": metrics,
        "model_version": f"{version[0]}/{version[1]}" if version else None,
        "mlflow_run": run_url(run, settings),
    }
