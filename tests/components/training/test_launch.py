"""TorchX `local_cwd` launches of `vdm train` on 2 gloo ranks against the real stack:
the trainer's lines stream into the caller's log, a failing rank fails the launch
with its error."""

from __future__ import annotations

import pytest

from components.sample_data.shards import write_shapes_shards
from components.training.launch import Launch, TrainingLaunchError, launch_training
from components.training.request import TrainingRequest

TWO_RANKS = Launch(procs_per_node=2, env={"OMP_NUM_THREADS": "1"})


def test_two_ranks_train_and_rank_zero_publishes(stack, store, prefix, tmp_path):
    write_shapes_shards(tmp_path / "shards", shards=2, clips_per_shard=2)
    store.publish_folder(tmp_path / "shards", f"{prefix}/data")
    lines: list[str] = []
    request = TrainingRequest("image", f"{prefix}/data", f"{prefix}/s1", overrides={"max_steps": 2})
    launch_training(request, TWO_RANKS, log=lines.append)
    assert any("vdm train image: done at step 2" in line for line in lines)
    assert store.exists(f"{prefix}/s1/final/unet/config.json")
    assert {o.uri.key.rsplit("/", 2)[-2] for o in store.list(f"{prefix}/s1/checkpoints/")} == {"step-00000002"}


def test_a_failing_rank_fails_the_launch_with_its_error(stack, store, prefix, tmp_path):
    write_shapes_shards(tmp_path / "shards", shards=1, clips_per_shard=2)  # one shard cannot feed two ranks
    store.publish_folder(tmp_path / "shards", f"{prefix}/data")
    request = TrainingRequest("image", f"{prefix}/data", f"{prefix}/s1", overrides={"max_steps": 2})
    with pytest.raises(TrainingLaunchError, match="1 shards cannot feed 2 ranks"):
        launch_training(request, TWO_RANKS, log=lambda line: None)
    assert not store.exists(f"{prefix}/s1/final/unet/config.json")


def test_a_request_travels_as_json_unchanged():
    request = TrainingRequest(
        "camera-lora", "s3://b/data", "s3://b/out", init_from="models:/m@champion",
        overrides={"motion_class": "pan", "max_steps": 3}, register_as="vdm-camera-lora", resume=True,
    )  # fmt: skip
    assert TrainingRequest.from_json(request.to_json()) == request
