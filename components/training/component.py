"""KFP component of a training stage: launches `vdm train` through TorchX (`local_cwd`
for local runs, `kubernetes` + Volcano on a cluster) with `--resume`, so a retried
step continues from its last checkpoint; reads the run's `result.json` back from the
object store; outputs the final folder's URI and the registered model's URI."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Output

from components.common.settings import load_settings

IMAGE = load_settings().image


@dsl.component(base_image=IMAGE)
def train_stage(
    stage: str,
    config: str,
    data_uri: str,
    output_uri: str,
    init_from: str,
    vae: str,
    max_steps: int,
    register_as: str,
    scheduler: str,
    nodes: int,
    procs_per_node: int,
    gpus_per_node: int,
    model: Output[Artifact],
) -> NamedTuple("StageOutputs", [("final", str), ("model_uri", str), ("mlflow_run_id", str)]):
    """Outputs: `final` (s3:// folder: the next stage's --init-from), `model_uri`
    (models:/NAME/VERSION, the candidate; empty when not registered), `mlflow_run_id`."""
    import json
    import os
    from collections import namedtuple

    from components.common.objectstore import ObjectStore, S3Uri
    from components.common.settings import load_settings
    from components.training.launch import FORWARDED_ENV, Launch, launch_training
    from components.training.run import RESULT

    settings = load_settings()
    args = ["--stage", stage, "--config", config, "--data", data_uri, "--output", output_uri, "--resume"]
    args += ["--init-from", init_from] if init_from else []
    args += ["--vae", vae] if vae else []
    args += ["--max-steps", str(max_steps)] if max_steps > 0 else []
    args += ["--register-as", register_as] if register_as else ["--no-register"]
    launch = Launch(
        scheduler=scheduler,
        nodes=nodes,
        procs_per_node=procs_per_node,
        gpus_per_node=gpus_per_node,
        image=settings.image,
        env={k: os.environ[k] for k in FORWARDED_ENV if k in os.environ},
    )
    launch_training(args, launch)
    result = json.loads(ObjectStore.from_settings(settings).get_bytes(S3Uri.parse(output_uri).join(RESULT)))
    model.metadata.update({k: v for k, v in result.items() if v is not None})
    outputs = namedtuple("StageOutputs", ["final", "model_uri", "mlflow_run_id"])
    return outputs(result["final"], result["registered"] or "", result["mlflow_run_id"])
