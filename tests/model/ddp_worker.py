"""Run by torchrun from test_ddp.py: two gloo ranks train the tiny image stage together;
rank 0 writes every rank's weight checksum and the shards each rank read."""

import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from model.stages import named_config
from model.train import train

shards, workdir = sys.argv[1].split(","), Path(sys.argv[2])
result = train(replace(named_config("tiny", "image"), max_steps=3, batch_size=2, log_every=1), shards, workdir)
digest = hashlib.sha256()
for name, tensor in sorted(result.model.unet.state_dict().items()):
    digest.update(name.encode() + tensor.detach().numpy().tobytes())
digests = [None] * dist.get_world_size()
dist.all_gather_object(digests, digest.hexdigest())
if dist.get_rank() == 0:
    (workdir / "ranks.json").write_text(
        json.dumps({"world_size": dist.get_world_size(), "digests": digests, "steps": result.steps})
    )
dist.destroy_process_group()
