"""Runs do not share state: a checkpoint records the run that published it, `--resume`
continues only the same run's (a KFP retry), another run's is refused in one line unless
named (`resume_from`), and each attempt's result is written where that attempt reads it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from components.common.objectstore import ObjectStore
from components.sample_data.shards import write_shapes_shards
from components.training.entrypoint import run_request
from components.training.request import RunResult, TrainingRequest

STEP_2 = "checkpoints/step-00000002"


def _train(store: ObjectStore, settings, **fields) -> RunResult:
    return run_request(TrainingRequest(kind="image", **fields), store, settings, progress=False)


def test_a_run_resumes_its_own_checkpoints_and_another_only_when_named(stack, store, settings, prefix, tmp_path):
    write_shapes_shards(tmp_path / "shards", shards=2, clips_per_shard=2)
    data, out = f"{prefix}/data", f"{prefix}/out"
    store.publish_folder(tmp_path / "shards", data)
    first = _train(store, settings, data=data, output=out, overrides={"max_steps": 2}, run_id="run-a",
                   result_uri=f"{out}/attempts/1/result.json")  # fmt: skip
    assert first.steps == 2 and store.read_manifest(f"{out}/{STEP_2}")["run_id"] == "run-a"
    assert RunResult.from_json(store.get_bytes(f"{out}/attempts/1/result.json")).steps == 2
    assert not store.exists(f"{out}/result.json")  # the attempt's own path only

    # Another run (a CLI run has no id) is refused in one line, before any training.
    refused = subprocess.run(
        [sys.executable, "-m", "vdm.cli", "train", "--stage", "image", "--data", data, "--output", out,
         "--max-steps", "3", "--resume"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    (line,) = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert line == (
        f"error: {out}/{STEP_2} belongs to run 'run-a', not this one (a run without an id (the CLI's)): a run "
        f"resumes only its own checkpoints; to continue from it, name it: --resume-from {out}/{STEP_2}"
    )
    with pytest.raises(ValueError, match=rf"{out} already holds checkpoints of run 'run-a'"):
        _train(store, settings, data=data, output=out, run_id="run-b")  # no --resume: nothing overwritten

    # The same run's retry resumes, and publishes its final model again.
    retried = _train(store, settings, data=data, output=out, overrides={"max_steps": 3}, run_id="run-a", resume=True,
                     result_uri=f"{out}/attempts/2/result.json")  # fmt: skip
    assert (retried.steps, retried.resumed_from) == (3, f"{out}/{STEP_2}")
    assert RunResult.from_json(store.get_bytes(f"{out}/attempts/2/result.json")).steps == 3
    assert RunResult.from_json(store.get_bytes(f"{out}/attempts/1/result.json")).steps == 2  # untouched

    # Another run continues from it when it names it, into its own output.
    named = _train(store, settings, data=data, output=f"{prefix}/other", overrides={"max_steps": 3}, run_id="run-b",
                   resume_from=f"{out}/{STEP_2}")  # fmt: skip
    assert (named.steps, named.resumed_from) == (3, f"{out}/{STEP_2}")
    assert store.read_manifest(f"{prefix}/other/final")["run_id"] == "run-b"
    with pytest.raises(ValueError, match=rf"{out}/final is already published by run 'run-a'"):
        _train(store, settings, data=data, output=out, run_id="run-b", resume_from=f"{out}/{STEP_2}")
