"""`vdm train` against the real local stack: shards read from S3, checkpoints published
there, a resumed run picking up the newest complete checkpoint, MLflow tracking."""

from __future__ import annotations

import re
import subprocess
import sys

import mlflow

from components.sample_data.shards import write_shapes_shards


def _vdm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=600)


def test_train_from_s3_with_checkpoints_and_resume(stack, store, prefix, tmp_path):
    write_shapes_shards(tmp_path / "shards", shards=2, clips_per_shard=3)
    store.publish_folder(tmp_path / "shards", f"{prefix}/data/shards")
    out = f"{prefix}/stage1"
    first = _vdm("train", "--stage", "image", "--data", f"{prefix}/data", "--output", out, "--max-steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert store.exists(f"{out}/final/unet/config.json")
    published = {o.uri.key.split("/checkpoints/")[1].split("/")[0] for o in store.list(f"{out}/checkpoints/")}
    assert published == {"step-00000002"}

    resumed = _vdm(
        "train", "--stage", "image", "--data", f"{prefix}/data", "--output", out, "--max-steps", "4", "--resume"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out}/checkpoints/step-00000002" in resumed.stdout
    assert "done at step 4" in resumed.stdout

    video = _vdm(
        "train",
        "--stage",
        "video",
        "--data",
        f"{prefix}/data",
        "--output",
        f"{prefix}/stage2",
        "--init-from",
        f"{out}/final",
        "--max-steps",
        "2",
    )
    assert video.returncode == 0, video.stderr[-3000:]
    run_id = re.search(r"/runs/([0-9a-f]{32})", video.stdout).group(1)
    run = mlflow.get_run(run_id)
    assert run.data.params["stage"] == "video" and run.data.params["init_from"] == f"{out}/final"
    assert "loss" in run.data.metrics and run.data.tags["vdm.outputs"] == f"{prefix}/stage2/final"
