"""The platform's Kubeflow pipelines (kfp v2), wired from the components' KFP steps.

Every pipeline input is a string or a number with a default, so each shows up usable
in the Kubeflow UI's run form. Cluster settings live here, not in the components:
credentials and endpoints from the Secret and ConfigMap that k8s/ creates, GPU
requests with the NVIDIA toleration and node selector plus a memory-backed /dev/shm
for training, caching on for curation (unchanged inputs skip) and off for training.
`kfp.local` ignores the Kubernetes settings, so the same pipelines run locally.
(No `from __future__ import annotations` here or in the component modules: kfp
reads the annotations of pipeline and component functions as types.)
"""

import inspect
from dataclasses import dataclass

from kfp import dsl, kubernetes

from components.curation.component import annotate_input_shard, finalize_curation, plan_curation
from components.evaluation.component import evaluate_model
from components.registry.component import promote_candidate
from components.training.component import finetune_model, train_stage
from model.tasks import FINETUNES

# Names shared with k8s/ (the operator creates these; see k8s/README.md).
S3_SECRET = "vdm-s3-credentials"
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
PLATFORM_CONFIG_MAP = "vdm-platform-config"
PLATFORM_CONFIG_KEYS = {
    k: k for k in ("VDM_S3_ENDPOINT", "MLFLOW_TRACKING_URI", "VDM_DATA_BUCKET", "VDM_MLFLOW_BUCKET", "VDM_IMAGE")
}


@dataclass(frozen=True)
class GPUStep:
    """Resources of a training step (one node's worth; more nodes go through TorchX)."""

    gpus: int = 8
    accelerator: str = "nvidia.com/gpu"
    cpu: str = "32"
    memory: str = "256G"
    shm: str = "64Gi"
    node_selector: tuple[str, str] = ("nvidia.com/gpu.present", "true")


GPU_STEP = GPUStep()
# Input shards annotated at once; a compile-time number (KFP cannot take it from a run parameter).
CURATION_PARALLELISM = 8


def platform_env(task: dsl.PipelineTask) -> dsl.PipelineTask:
    kubernetes.use_secret_as_env(task, S3_SECRET, S3_SECRET_KEYS)
    kubernetes.use_config_map_as_env(task, PLATFORM_CONFIG_MAP, PLATFORM_CONFIG_KEYS)
    return task


def cpu_step(task: dsl.PipelineTask, cpu: str = "2", memory: str = "8G", cache: bool = True) -> dsl.PipelineTask:
    platform_env(task)
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    task.set_caching_options(cache)
    return task


def gpu_step(task: dsl.PipelineTask, step: GPUStep = GPU_STEP) -> dsl.PipelineTask:
    platform_env(task)
    task.set_accelerator_type(step.accelerator).set_accelerator_limit(step.gpus)
    task.set_cpu_request(step.cpu).set_cpu_limit(step.cpu).set_memory_request(step.memory)
    task.set_memory_limit(step.memory)
    kubernetes.add_toleration(task, key=step.accelerator, operator="Exists", effect="NoSchedule")
    kubernetes.add_node_selector(task, *step.node_selector)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=step.shm)
    task.set_caching_options(False)  # training has side effects (checkpoints, registry)
    task.set_retry(2)  # retries resume from the last checkpoint
    return task


def _curate(input_uri: str, output_uri: str, config_yaml: str, videos_per_shard: int, random_weights: bool,
            workers: int):  # fmt: skip
    plan = cpu_step(plan_curation(input_uri=input_uri, videos_per_shard=videos_per_shard, config_yaml=config_yaml))
    plan.set_display_name("list and shard inputs")
    with dsl.ParallelFor(plan.output, parallelism=CURATION_PARALLELISM, name="input-shards") as shard:
        part = cpu_step(
            annotate_input_shard(
                shard=shard, output_uri=output_uri, config_yaml=config_yaml, random_weights=random_weights,
                workers=workers,
            ),
            cpu="4", memory="16G",
        )  # fmt: skip
        part.set_display_name("annotate shard")
    final = cpu_step(
        finalize_curation(parts=dsl.Collected(part.output), output_uri=output_uri, config_yaml=config_yaml)
    )
    final.set_display_name("filter, shards, dataset card")
    return final


@dsl.pipeline(name="curation", description="Raw videos to filtered WebDataset shards with a dataset card.")
def curation(
    input_uri: str = "s3://vdm/samples/seed-0",
    output_uri: str = "s3://vdm/curated/kfp",
    config_yaml: str = "",
    videos_per_shard: int = 4,
    random_weights: bool = False,
    workers: int = 2,
):
    _curate(input_uri, output_uri, config_yaml, videos_per_shard, random_weights, workers)


def _stage(stage: str, previous, **kwargs) -> dsl.PipelineTask:
    task = gpu_step(train_stage(stage=stage, init_from=previous.outputs["final"] if previous else "", **kwargs))
    return task.set_display_name(f"train {stage}")


def _pretrain(data_uri, output_uri, config, vae, steps: tuple, register_as, launch: dict, after=None):
    """Stage I -> II -> III; Stage I waits for `after` (the task that writes `data_uri`)."""
    common = {"config": config, "data_uri": data_uri, "vae": vae, **launch}
    image = _stage("image", None, output_uri=f"{output_uri}/stage1", max_steps=steps[0], register_as="", **common)
    if after is not None:
        image.after(after)
    video = _stage("video", image, output_uri=f"{output_uri}/stage2", max_steps=steps[1], register_as="", **common)
    return _stage("hq", video, output_uri=f"{output_uri}/stage3", max_steps=steps[2], register_as=register_as, **common)


@dsl.pipeline(name="pretraining", description="Stage I (image) -> Stage II (video) -> Stage III (high quality).")
def pretraining(
    data_uri: str = "s3://vdm/curated/kfp/shards/",
    output_uri: str = "s3://vdm/runs/pretraining",
    config: str = "tiny",
    vae: str = "",
    image_steps: int = 0,
    video_steps: int = 0,
    hq_steps: int = 0,
    register_as: str = "vdm-text-to-video",
    scheduler: str = "local_cwd",
    nodes: int = 1,
    procs_per_node: int = 1,
    gpus_per_node: int = 0,
):
    launch = {"scheduler": scheduler, "nodes": nodes, "procs_per_node": procs_per_node, "gpus_per_node": gpus_per_node}
    _pretrain(data_uri, output_uri, config, vae, (image_steps, video_steps, hq_steps), register_as, launch)


def _evaluate_and_promote(model_uri, data_uri, min_improvement, clips, steps, kind: str, reference_uri="",
                          metric="", direction=""):  # fmt: skip
    """The kind's evaluation of a registered version, then the promotion gate on the kind's
    metric (`metric`/`direction` empty: the kind's own)."""
    evaluation = cpu_step(
        evaluate_model(model_uri=model_uri, data_uri=data_uri, reference_uri=reference_uri, clips=clips, steps=steps),
        cache=False,
    )
    evaluation.set_display_name(f"evaluate {kind}")
    promotion = cpu_step(
        promote_candidate(model_uri=model_uri, metric=metric, direction=direction, min_improvement=min_improvement),
        cache=False,
    ).after(evaluation)
    return evaluation, promotion.set_display_name(f"promotion gate {kind}")


@dsl.pipeline(name="evaluate-and-promote", description="A version's evaluation (its kind's), then the promotion gate.")
def evaluate_and_promote(
    model_uri: str = "models:/vdm-text-to-video/1",
    data_uri: str = "s3://vdm/curated/kfp/shards/",
    reference_uri: str = "",
    metric: str = "",
    direction: str = "",
    min_improvement: float = 0.0,
    clips: int = 8,
    steps: int = 25,
):
    """Evaluate a registered version by its kind's evaluation and run the promotion gate.

    Args:
        model_uri: The version to evaluate and promote: models:/NAME/VERSION.
        data_uri: Held-out shards to evaluate on (s3:// prefix): clips, or orbits for multi-view models.
        reference_uri: A second data set the kind compares with (spatial-HQ: its image set); empty for the others.
        metric: The vdm.eval.* figure the gate compares; empty: the kind's own.
        direction: minimize or maximize; empty: the kind's metric's.
        min_improvement: How much the candidate must beat the champion by, in the metric's units.
        clips: Held-out clips (or orbits) the evaluation generates from.
        steps: Sampling steps per generated video.
    """
    _evaluate_and_promote(model_uri, data_uri, min_improvement, clips, steps, "model", reference_uri, metric,
                          direction)  # fmt: skip


def _finetune(kind: str, init_from, data_uri, output_uri, config, max_steps, register_as, launch: dict, **kind_inputs):
    """`kind_inputs`: run options of the kind (camera-lora: motion_class)."""
    task = gpu_step(
        finetune_model(kind=kind, config=config, data_uri=data_uri, output_uri=output_uri, init_from=init_from,
                       max_steps=max_steps, register_as=register_as, **launch, **kind_inputs)
    )  # fmt: skip
    return task.set_display_name(" ".join(["finetune", kind, *kind_inputs.values()]))


# The run form of a finetune pipeline: (name, type, default, description); the kind fills in the
# defaults that depend on it.
def _finetune_parameters(task) -> list[tuple[str, type, object, str]]:
    return [
        ("init_from", str, f"models:/{task.starts_from}@champion",
         "The trained model to finetune: models:/NAME@ALIAS, or an s3:// model folder."),
        ("data_uri", str, task.training_data, f"Training data (s3:// prefix of WebDataset shards). {task.title}."),
        ("eval_data_uri", str, task.evaluation_data, "Held-out shards the candidate is evaluated on."),
        ("output_uri", str, f"s3://vdm/runs/finetune-{task.name}", "s3:// prefix for checkpoints and the final model."),
        ("config", str, "tiny", "The model config: a shipped config name (tiny) or a YAML file in the image."),
        ("max_steps", int, 0, "Training steps; 0: the config's max_steps."),
        ("model_name", str, task.registered_name, "Registered model the result is added to (alias candidate)."),
        ("scheduler", str, "local_cwd", "TorchX scheduler: local_cwd (ranks in the step's pod) or kubernetes."),
        ("nodes", int, 1, "Nodes (kubernetes scheduler)."),
        ("procs_per_node", int, 1, "Ranks per node."),
        ("gpus_per_node", int, 0, "GPUs per node (kubernetes scheduler)."),
        ("min_improvement", float, 0.0,
         f"Promotion gate: how much the candidate's {task.metric.name} must beat the champion's by "
         f"({task.metric.direction}; {task.metric.description})."),
        ("eval_clips", int, 8, "Held-out clips (or orbits) the evaluation generates from."),
        ("eval_steps", int, 25, "Sampling steps per generated video in the evaluation."),
    ]  # fmt: skip


def _finetune_pipeline(task):
    """The `finetune-KIND` pipeline of a finetune kind (model/tasks): finetune (a run per value
    of the kind's run option, each added to the previous result; the last registers) ->
    the kind's evaluation -> the promotion gate on its metric. Its run form is an explicit
    signature with a description per parameter (the Kubeflow UI shows both)."""
    parameters = _finetune_parameters(task)
    signature = inspect.Signature(
        [
            inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d, annotation=t)
            for n, t, d, _ in parameters
        ]
    )

    def body(*args, **kwargs):
        p = signature.bind(*args, **kwargs).arguments
        launch = {k: p[k] for k in ("scheduler", "nodes", "procs_per_node", "gpus_per_node")}
        runs = [{}]
        if task.run_options:  # e.g. camera-lora: one adapter per motion class, chained
            (option,) = task.run_options
            runs = [{option: value} for value in task.option_choices(option)]
        base, step = p["init_from"], None
        for i, options in enumerate(runs):
            last = i == len(runs) - 1
            output = p["output_uri"] if len(runs) == 1 else f"{p['output_uri']}/{'-'.join(options.values())}"
            step = _finetune(task.name, base, p["data_uri"], output, p["config"], p["max_steps"],
                             p["model_name"] if last else "", launch, **options)  # fmt: skip
            base = step.outputs["final"]
        reference = p["data_uri"] if task.training_data_is_reference else ""
        _evaluate_and_promote(step.outputs["model_uri"], p["eval_data_uri"], p["min_improvement"], p["eval_clips"],
                              p["eval_steps"], task.name, reference)  # fmt: skip

    body.__name__ = f"finetune_{task.name.replace('-', '_')}"
    body.__signature__ = signature
    args = "\n".join(f"    {n}: {text}" for n, _, _, text in parameters)
    body.__doc__ = f"{task.description}\n\nArgs:\n{args}\n"
    description = f"{task.title} -> evaluation ({task.metric.name}) -> promotion gate."
    return dsl.pipeline(name=f"finetune-{task.name}", description=description)(body)


FINETUNE_PIPELINES = {f"finetune-{name}": _finetune_pipeline(task) for name, task in FINETUNES.items()}


@dsl.pipeline(
    name="end-to-end",
    description="Curation -> Stage I/II/III -> image-to-video finetune -> evaluation -> registration (candidate) "
    "-> promotion gate, for the text- and the image-to-video model.",
)
def end_to_end(
    input_uri: str = "s3://vdm/samples/seed-0",
    work_uri: str = "s3://vdm/runs/end-to-end",
    curation_config_yaml: str = "",
    random_weights: bool = False,
    videos_per_shard: int = 4,
    config: str = "tiny",
    vae: str = "",
    image_steps: int = 0,
    video_steps: int = 0,
    hq_steps: int = 0,
    model_name: str = "vdm-text-to-video",
    i2v_steps: int = 0,
    i2v_model_name: str = "vdm-image-to-video",
    scheduler: str = "local_cwd",
    nodes: int = 1,
    procs_per_node: int = 1,
    gpus_per_node: int = 0,
    min_improvement: float = 0.0,
    eval_clips: int = 8,
    eval_steps: int = 25,
):
    curated = _curate(input_uri, f"{work_uri}/curated", curation_config_yaml, videos_per_shard, random_weights, 2)
    shards = f"{work_uri}/curated/shards/"
    launch = {"scheduler": scheduler, "nodes": nodes, "procs_per_node": procs_per_node, "gpus_per_node": gpus_per_node}
    steps = (image_steps, video_steps, hq_steps)
    hq = _pretrain(shards, f"{work_uri}/train", config, vae, steps, model_name, launch, after=curated)
    gate = {"min_improvement": min_improvement, "clips": eval_clips, "steps": eval_steps}
    _evaluate_and_promote(hq.outputs["model_uri"], shards, kind="text-to-video", **gate)
    i2v = _finetune(
        "i2v", hq.outputs["final"], shards, f"{work_uri}/train/i2v", config, i2v_steps, i2v_model_name, launch
    )
    _evaluate_and_promote(i2v.outputs["model_uri"], shards, kind="i2v", **gate)


PIPELINES = {
    "curation": curation,
    "pretraining": pretraining,
    "evaluate-and-promote": evaluate_and_promote,
    **FINETUNE_PIPELINES,
    "end-to-end": end_to_end,
}
