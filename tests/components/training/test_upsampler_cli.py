"""`vdm finetune upsampler` against the real local stack: a video model folder finetuned
into the x4 upsampler on clips read from S3 (the generic finetune path: nothing in the CLI
knows the kind), registered, and its registered pyfunc upsamples an mp4 to 4x its size."""

from __future__ import annotations

import io
import subprocess
import sys

import av
import mlflow
import numpy as np
import pandas as pd

from components.common.media import video_bytes
from components.sample_data.shards import write_shapes_shards
from model.stages import VideoDiffusion, named_config


def _vdm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdm.cli", *args], capture_output=True, text=True, timeout=600)


def test_finetune_upsampler_from_a_video_model_registers_an_x4_upsampler(stack, store, prefix, tmp_path, request):
    write_shapes_shards(tmp_path / "clips", shards=1, clips_per_shard=3, height=64, width=64)
    clips = f"{prefix}/clips"
    store.publish_folder(tmp_path / "clips", clips)
    video = VideoDiffusion.create(named_config("tiny", "video")).save(tmp_path / "video")
    name = f"vdm-test-{request.node.name[:40]}"
    out = f"{prefix}/upsampler"
    result = _vdm(
        "finetune", "upsampler", "--data", clips, "--output", out, "--init-from", str(video),
        "--max-steps", "2", "--register-as", name,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vdm finetune upsampler: done at step 2" in result.stdout
    assert f"registered  models:/{name}/1 (alias candidate)" in result.stdout

    store.download_folder(f"{out}/final", tmp_path / "final")
    model = VideoDiffusion.load(tmp_path / "final")
    assert model.config.stage == "upsampler" and model.unet.config.in_channels == 4 + 3

    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@candidate")
    small = video_bytes(np.full((2, 16, 24, 3), 120, dtype=np.uint8), 8.0)
    videos = pyfunc.predict(pd.DataFrame({"video": [small], "prompt": ["a disc"]}), params={"steps": 1})
    with av.open(io.BytesIO(videos["video_mp4"][0])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    assert len(frames) == 2 and frames[0].shape == (64, 96, 3)  # 4x the upload, frame for frame
