"""`vdm run`, the main job, end to end through kfp.local against the session's real
stack on the sample videos (tiny configs, few steps): every step runs, and what the
summary points at exists — the dataset card, the MLflow runs, the registered
version with its aliases and lineage."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import pytest
from mlflow import MlflowClient


@pytest.mark.timeout(1500)  # the suite's slowest test: eleven pipeline steps, four of them training
def test_vdm_run_end_to_end(stack, store, settings, tmp_path):
    summary_file = tmp_path / "summary.json"
    params = ["image_steps=3", "video_steps=3", "hq_steps=2", "i2v_steps=2", "eval_clips=2", "eval_steps=4"]
    result = subprocess.run(
        [sys.executable, "-m", "vdm.cli", "run", "--model-name", "vdm-e2e-test", "--summary-json",
         str(summary_file), *[arg for p in params for arg in ("--param", p)]],
        capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vdm run: done" in result.stdout
    steps = ("plan-curation", "annotate-input-shard", "finalize-curation", "train-stage-3", "finetune-model",
             "promote-candidate-2")  # fmt: skip
    for step in steps:
        assert step in result.stderr  # stage-by-stage progress
    summary = json.loads(summary_file.read_text())

    card = json.loads(store.get_bytes(summary["dataset_card_uri"].replace(".html", ".json")))
    assert card["clips_after_filter"] > 0 and card["rejected_files"] == 6  # the 5 bad samples and their truth file
    runs = summary["mlflow_run_ids"]
    assert set(runs) == {
        "curation",
        "train_stage1",
        "train_stage2",
        "train_stage3",
        "evaluate",
        "finetune_i2v",
        "evaluate_i2v",
    }
    assert all(mlflow.get_run(run_id).info.status == "FINISHED" for run_id in runs.values())
    filtered = (summary["dataset_shards"], card["digest"])
    hq = (summary["hq_shards"], card["subsets"]["hq"]["digest"])
    assert hq[1] != filtered[1]
    for name, shards in (
        ("train_stage1", filtered),
        ("train_stage2", filtered),
        ("train_stage3", hq),
        ("finetune_i2v", filtered),
    ):
        # Each training run links its data (Stage III the high-quality subset, as in SVD) and shows learning:
        # the validation loss (held-out clips, fixed noise, EMA weights) is lower at the end than at the
        # start, even after 2 or 3 steps.
        (data,) = [d.dataset for d in mlflow.get_run(runs[name]).inputs.dataset_inputs]
        assert (data.name, data.digest) == shards, name
        val_loss = [m.value for m in MlflowClient().get_metric_history(runs[name], "val_loss")]
        assert len(val_loss) == 2 and val_loss[-1] < val_loss[0], (name, val_loss)

    model = summary["registered_model"]
    assert model["name"] == "vdm-e2e-test" and model["version"] == "1"
    assert model["aliases"] == ["candidate", "champion"]  # the first version with figures passes the gate
    version = MlflowClient().get_model_version("vdm-e2e-test", "1")
    assert version.tags["vdm.data"] == summary["hq_shards"] and "vdm.git_commit" in version.tags
    assert float(version.tags["vdm.eval.motion_speed_error"]) >= 0

    image = summary["image_to_video_model"]  # finetuned from Stage III, evaluated and promoted the same way
    assert (image["name"], image["version"], image["aliases"]) == ("vdm-image-to-video", "1", ["candidate", "champion"])
    version = MlflowClient().get_model_version("vdm-image-to-video", "1")
    assert version.tags["vdm.data"] == summary["dataset_shards"] and "vdm.eval.motion_speed_error" in version.tags
    assert summary["serve_command"] == (
        "vdm serve --model models:/vdm-e2e-test@champion --model models:/vdm-image-to-video@champion"
    )
