"""KFP components of a training stage and a finetune: launches `vdm train` through TorchX (`local_cwd`
for local runs, `kubernetes` + Volcano on a cluster) with `--resume`, so a retried
step continues from its last checkpoint; reads the run's `result.json` back from the
object store; outputs the final folder's URI and the registered model's URI.
`finetune_model` does the same for `vdm finetune KIND`."""

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
    from collections import namedtuple

    from components.training.launch import launch_step

    args = ["train", "--stage", stage, "--config", config, "--data", data_uri, "--output", output_uri]
    args += ["--init-from", init_from] if init_from else []
    args += ["--vae", vae] if vae else []
    args += ["--max-steps", str(max_steps)] if max_steps > 0 else []
    args += ["--register-as", register_as] if register_as else ["--no-register"]
    result = launch_step(args, output_uri, scheduler, nodes, procs_per_node, gpus_per_node)
    model.metadata.update({k: v for k, v in result.items() if v is not None})
    outputs = namedtuple("StageOutputs", ["final", "model_uri", "mlflow_run_id"])
    return outputs(result["final"], result["registered"] or "", result["mlflow_run_id"])


@dsl.component(base_image=IMAGE)
def finetune_model(
    kind: str,
    config: str,
    data_uri: str,
    output_uri: str,
    init_from: str,
    max_steps: int,
    register_as: str,
    scheduler: str,
    nodes: int,
    procs_per_node: int,
    gpus_per_node: int,
    model: Output[Artifact],
    motion_class: str = "",
) -> NamedTuple("FinetuneOutputs", [("final", str), ("model_uri", str), ("mlflow_run_id", str)]):
    """`vdm finetune KIND` from `init_from` (s3:// folder or models:/ URI); outputs as `train_stage`'s.
    `motion_class`: the camera-motion LoRA's class (camera-lora only)."""
    from collections import namedtuple

    from components.training.launch import launch_step

    args = ["finetune", kind, "--config", config, "--data", data_uri, "--output", output_uri]
    args += ["--init-from", init_from]
    args += ["--motion-class", motion_class] if motion_class else []
    args += ["--max-steps", str(max_steps)] if max_steps > 0 else []
    args += ["--register-as", register_as] if register_as else ["--no-register"]
    result = launch_step(args, output_uri, scheduler, nodes, procs_per_node, gpus_per_node)
    model.metadata.update({k: v for k, v in result.items() if v is not None})
    outputs = namedtuple("FinetuneOutputs", ["final", "model_uri", "mlflow_run_id"])
    return outputs(result["final"], result["registered"] or "", result["mlflow_run_id"])
