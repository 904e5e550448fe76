"""`vdm demo`, the main job, against the session's real stack."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import mlflow


def test_demo_publishes_samples_and_records_the_run(stack, store, settings):
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "demo", "--seed", "3"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = dict(
        line.strip().split(None, 1) for line in result.stdout.split("vdm demo: done", 1)[1].splitlines() if line.strip()
    )
    assert summary["raw_videos"] == f"s3://{settings.data_bucket}/samples/seed-3"
    assert (summary["videos"], summary["bad_files"]) == ("11", "5")

    # What the summary points at exists: the published samples and the MLflow run.
    manifest = json.loads(store.get_bytes(summary["manifest"]))
    assert manifest["config"]["seed"] == 3
    published = {o.uri.key.rsplit("/", 1)[1] for o in store.list(summary["raw_videos"])}
    assert published == {v["file"] for v in manifest["videos"]} | {"manifest.json", "_MANIFEST.json"}
    run_id = re.search(r"/runs/([0-9a-f]{32})", summary["mlflow_run"]).group(1)
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["sample_videos"] == 11
    assert json.loads(run.data.tags["vdm.outputs"]) == [summary["raw_videos"], summary["curated"]]
    # Curation ran on the published samples: every bad file rejected, clips kept.
    card = json.loads(store.get_bytes(summary["curated"] + "/dataset_card.json"))
    assert card["rejected_files"] == int(summary["rejected_files"]) == 5
    assert summary["clips_kept"] == f"{card['clips_after_filter']} of {card['clips_before_filter']}"
    assert card["clips_after_filter"] > 0 and card["random_weights"] is True
    assert run.data.metrics["clips_after_filter"] == card["clips_after_filter"]
    assert json.loads(store.get_bytes(summary["mlflow_artifacts"] + "/manifest.json")) == manifest
