"""Run by torchrun from test_ddp.py: two gloo ranks train the tiny image stage together
(DDP or FSDP2, optionally resuming); rank 0 writes every rank's weight checksum, the
loss curve and the step count."""

import faulthandler
import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from model.stages import named_config
from model.train import leave_distributed, train
from model.training import full_tensor

faulthandler.enable()  # a rank that aborts (SIGABRT from gloo's C++) prints where every thread was
shards, workdir, parallel = sys.argv[1].split(","), Path(sys.argv[2]), sys.argv[3]
resume = Path(sys.argv[4]) if len(sys.argv) > 4 else None
config = replace(named_config("tiny", "image"), max_steps=3, batch_size=2, log_every=1, checkpoint_every=2)
result = train(replace(config, parallel=parallel), shards, workdir, resume=resume)
digest = hashlib.sha256()
for name, tensor in sorted(result.model.unet.state_dict().items()):  # every rank's whole weights
    digest.update(name.encode() + full_tensor(tensor).detach().numpy().tobytes())
digests = [None] * dist.get_world_size()
dist.all_gather_object(digests, digest.hexdigest())
losses = [None] * dist.get_world_size()
dist.all_gather_object(losses, result.losses)
if dist.get_rank() == 0:
    (workdir / "ranks.json").write_text(
        json.dumps({"world_size": dist.get_world_size(), "digests": digests, "steps": result.steps, "losses": losses})
    )
leave_distributed()
