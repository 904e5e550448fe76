"""KFP components of a training stage and a finetune: launches `vdm train` through TorchX
(`local_cwd` for local runs and one-node steps, `kubernetes` + Volcano on a cluster), one
rank per GPU, with `--resume`, so a retried step continues from its last checkpoint; reads
the run's `result.json` back from the object store; outputs the final folder's URI and the
registered model's URI, and the model as a KFP Model artifact. `finetune_model` does the
same for `vdm finetune KIND`.

The Model artifact stays where KFP puts it (under the pipeline root) and holds a pointer to
the model: a component that moves an output artifact's URI out of the pipeline root's
bucket and prefix fails on the KFP backend (its launcher uploads every output artifact
to the pipeline root and refuses a URI outside it). Its metadata says where the model is
(`uri`: the s3:// folder) and what it was registered as."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Model, Output

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
    gpus_per_node: str,
    cpu_per_node: str,
    memory_per_node: str,
    shm_per_node: str,
    model: Output[Model],
    run_id: str = "",
) -> NamedTuple("StageOutputs", [("final", str), ("model_uri", str), ("mlflow_run_id", str)]):
    """Outputs: `final` (s3:// folder: the next stage's --init-from), `model_uri`
    (models:/NAME/VERSION, the candidate; empty when not registered), `mlflow_run_id`.
    Run-form values "" and 0 mean "not set" (the Kubeflow UI has no null). One rank per GPU
    (`gpus_per_node` "0": one CPU rank) on each of `nodes`; the resources are Kubernetes
    quantities as strings, the form KFP also resolves into this step's pod: with
    `scheduler` "kubernetes" they size the Volcano job's pods (components/training/launch.py).
    `model`: the final model (describe_model). `run_id`: the pipeline run's id (KFP's placeholder),
    recorded in the checkpoints: a retry of this step resumes them, another run does not."""
    from collections import namedtuple

    from components.training.launch import launch_step
    from components.training.model_artifact import describe_model
    from components.training.request import TrainingRequest

    request = TrainingRequest(
        kind=stage,
        data=data_uri,
        output=output_uri,
        config=config,
        init_from=init_from or None,
        vae=vae or None,
        overrides={"max_steps": max_steps} if max_steps > 0 else {},
        register_as=register_as or None,
        run_id=run_id or None,
    )
    result = launch_step(request, scheduler, nodes, gpus_per_node, cpu_per_node, memory_per_node, shm_per_node)
    describe_model(model, result)
    outputs = namedtuple("StageOutputs", ["final", "model_uri", "mlflow_run_id"])
    return outputs(result.final, result.registered or "", result.mlflow_run_id)


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
    gpus_per_node: str,
    cpu_per_node: str,
    memory_per_node: str,
    shm_per_node: str,
    model: Output[Model],
    motion_class: str = "",
    run_id: str = "",
) -> NamedTuple("FinetuneOutputs", [("final", str), ("model_uri", str), ("mlflow_run_id", str)]):
    """A finetune of kind `kind` from `init_from` (s3:// folder or models:/ URI); outputs as
    `train_stage`'s. `motion_class`: the camera-motion LoRA's class (camera-lora only); `run_id`: as
    `train_stage`'s."""
    from collections import namedtuple

    from components.training.launch import launch_step
    from components.training.model_artifact import describe_model
    from components.training.request import TrainingRequest

    overrides = {"max_steps": max_steps} if max_steps > 0 else {}
    request = TrainingRequest(
        kind=kind,
        data=data_uri,
        output=output_uri,
        config=config,
        init_from=init_from,
        overrides=overrides | ({"motion_class": motion_class} if motion_class else {}),
        register_as=register_as or None,
        run_id=run_id or None,
    )
    result = launch_step(request, scheduler, nodes, gpus_per_node, cpu_per_node, memory_per_node, shm_per_node)
    describe_model(model, result)
    outputs = namedtuple("FinetuneOutputs", ["final", "model_uri", "mlflow_run_id"])
    return outputs(result.final, result.registered or "", result.mlflow_run_id)
