"""`vdm demo`: the main job, end to end on built-in sample data and the local stack.

Today: start the stack, synthesise the sample videos into the object store,
curate them into WebDataset shards (random-initialised tiny neural annotators:
no weights ship with the project), and record the run in MLflow. Each later step
of the platform (training, finetunes, registry, serving) joins this sequence as
it lands.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import mlflow

from components.common.objectstore import ObjectStore, S3Uri
from components.common.settings import load_settings
from components.common.tracking import artifact_object_uri, run_url, tracked_run
from components.curation.config import CurationConfig, with_random_weights
from components.curation.curate import curate
from components.sample_data.synth import MANIFEST_NAME, SynthConfig, synthesize
from pipelines.stack import Stack


def run_demo(seed: int = 0, log: Callable[[str], None] = print) -> dict:
    started = time.monotonic()
    stack = Stack(log=log)
    stack.up()
    settings = load_settings()  # now with the stack's endpoints and credentials
    store = ObjectStore.from_settings(settings)
    raw = S3Uri(settings.data_bucket, f"samples/seed-{seed}")
    config = SynthConfig(seed=seed)

    with tracked_run(
        "vdm-demo", run_name=f"demo-seed-{seed}", config={"synth": config.__dict__}, settings=settings
    ) as run:
        manifest = synthesize(str(raw), config, store=store, progress=True)
        valid = [v for v in manifest["videos"] if v["valid"]]
        mlflow.log_metrics(
            {
                "sample_videos": len(valid),
                "bad_files": len(manifest["videos"]) - len(valid),
                "sample_seconds": sum(v["duration_s"] for v in valid),
            }
        )
        mlflow.log_dict(manifest, MANIFEST_NAME)
        curated = S3Uri(settings.data_bucket, f"curated/seed-{seed}")
        curation = curate(str(raw), str(curated), with_random_weights(CurationConfig()), store, progress=True)
        card = curation["card"]
        mlflow.log_metrics(
            {
                "clips_before_filter": card["clips_before_filter"],
                "clips_after_filter": card["clips_after_filter"],
                "rejected_files": card["rejected_files"],
            }
        )
        mlflow.log_dict(card, "dataset_card.json")
        mlflow.set_tag("vdm.outputs", json.dumps([str(raw), str(curated)]))

    summary = {
        "raw_videos": str(raw),
        "videos": len(valid),
        "bad_files": len(manifest["videos"]) - len(valid),
        "seconds_of_video": round(sum(v["duration_s"] for v in valid), 2),
        "manifest": str(raw.join(MANIFEST_NAME)),
        "curated": str(curated),
        "clips_kept": f"{card['clips_after_filter']} of {card['clips_before_filter']}",
        "rejected_files": card["rejected_files"],
        "dataset_card": str(curated.join("dataset_card.html")),
        "mlflow_run": run_url(run, settings),
        "mlflow_artifacts": artifact_object_uri(run, "", settings),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    return summary
