"""A 2-rank DDP run on gloo (torchrun, as TorchX launches it): ranks stay in lockstep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from components.sample_data.shards import write_shapes_shards


def test_two_gloo_ranks_train_to_identical_weights(tmp_path):
    paths, _ = write_shapes_shards(tmp_path / "shards", shards=2, clips_per_shard=2)
    torchrun = Path(sys.executable).parent / "torchrun"
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", str(worker), ",".join(map(str, paths)), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    assert ranks["world_size"] == 2 and ranks["steps"] == 3
    assert ranks["digests"][0] == ranks["digests"][1]  # gradients were averaged: same weights everywhere
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-00000003"]  # rank 0 only
