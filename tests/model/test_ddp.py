"""2-rank runs on gloo (torchrun, as TorchX launches it): DDP ranks stay in lockstep;
FSDP2 trains the same curve to the same weights as DDP and resumes from its
(unsharded) checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components.sample_data.shards import write_shapes_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    paths, _ = write_shapes_shards(tmp_path_factory.mktemp("shards"), shards=2, clips_per_shard=2)
    return ",".join(map(str, paths))


def torchrun(shards: str, workdir: Path, parallel: str, resume: Path | None = None) -> dict:
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2"]
    command += [str(Path(__file__).with_name("ddp_worker.py")), shards, str(workdir), parallel]
    command += [str(resume)] if resume else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-12000:]
    return json.loads((workdir / "ranks.json").read_text())


def unet(workdir: Path) -> dict[str, torch.Tensor]:
    return load_file(workdir / "final" / "unet" / "diffusion_pytorch_model.safetensors")


def test_two_gloo_ranks_train_to_identical_weights(shards, tmp_path):
    ranks = torchrun(shards, tmp_path, "ddp")
    assert ranks["world_size"] == 2 and ranks["steps"] == 3
    assert ranks["digests"][0] == ranks["digests"][1]  # gradients were averaged: same weights everywhere
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-00000002", "checkpoint-00000003"]


def test_fsdp2_matches_ddp_and_resumes_from_its_checkpoint(shards, tmp_path):
    ddp = torchrun(shards, tmp_path / "ddp", "ddp")
    fsdp = torchrun(shards, tmp_path / "fsdp", "fsdp")
    for fsdp_rank, ddp_rank in zip(fsdp["losses"], ddp["losses"], strict=True):  # per rank, per step
        assert fsdp_rank == pytest.approx(ddp_rank, rel=1e-4)
    for name, tensor in unet(tmp_path / "ddp").items():
        torch.testing.assert_close(unet(tmp_path / "fsdp")[name], tensor, rtol=1e-4, atol=1e-5)
    resumed = torchrun(shards, tmp_path / "fsdp", "fsdp", resume=tmp_path / "fsdp" / "checkpoint-00000002")
    assert resumed["steps"] == 3
    assert [r[0] for r in resumed["losses"]] == pytest.approx([r[2] for r in fsdp["losses"]], rel=1e-4)
