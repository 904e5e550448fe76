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

from dataclasses import dataclass

from kfp import dsl, kubernetes

from components.curation.component import annotate_input_shard, finalize_curation, plan_curation
from components.evaluation.component import evaluate_motion
from components.registry.component import promote_candidate
from components.training.component import finetune_model, train_stage
from model.camera_lora import MOTION_CLASSES

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


def _evaluate_and_promote(model_uri, data_uri, metric, direction, min_improvement, clips, steps):
    evaluation = cpu_step(
        evaluate_motion(model_uri=model_uri, data_uri=data_uri, clips=clips, steps=steps), cache=False
    )
    evaluation.set_display_name("evaluate motion")
    promotion = cpu_step(
        promote_candidate(model_uri=model_uri, metric=metric, direction=direction, min_improvement=min_improvement),
        cache=False,
    ).after(evaluation)
    return evaluation, promotion.set_display_name("promotion gate")


@dsl.pipeline(name="evaluate-and-promote", description="Motion evaluation of a version, then the promotion gate.")
def evaluate_and_promote(
    model_uri: str = "models:/vdm-text-to-video/1",
    data_uri: str = "s3://vdm/curated/kfp/shards/",
    metric: str = "motion_speed_error",
    direction: str = "minimize",
    min_improvement: float = 0.0,
    clips: int = 8,
    steps: int = 25,
):
    _evaluate_and_promote(model_uri, data_uri, metric, direction, min_improvement, clips, steps)


def _finetune(kind: str, init_from, data_uri, output_uri, config, max_steps, register_as, launch: dict, **kind_inputs):
    """`kind_inputs`: the inputs of `finetune_model` only some kinds take (camera-lora: motion_class)."""
    task = gpu_step(
        finetune_model(kind=kind, config=config, data_uri=data_uri, output_uri=output_uri, init_from=init_from,
                       max_steps=max_steps, register_as=register_as, **launch, **kind_inputs)
    )  # fmt: skip
    name = f"finetune {kind} {kind_inputs['motion_class']}" if "motion_class" in kind_inputs else f"finetune {kind}"
    return task.set_display_name(name)


@dsl.pipeline(
    name="finetune-i2v",
    description="Image-to-video finetune (SVD) of a trained video model -> evaluation -> promotion gate.",
)
def finetune_i2v(
    init_from: str = "models:/vdm-text-to-video@champion",
    data_uri: str = "s3://vdm/curated/kfp/shards/",
    output_uri: str = "s3://vdm/runs/finetune-i2v",
    config: str = "tiny",
    max_steps: int = 0,
    model_name: str = "vdm-image-to-video",
    scheduler: str = "local_cwd",
    nodes: int = 1,
    procs_per_node: int = 1,
    gpus_per_node: int = 0,
    metric: str = "motion_speed_error",
    direction: str = "minimize",
    min_improvement: float = 0.0,
    eval_clips: int = 8,
    eval_steps: int = 25,
):
    launch = {"scheduler": scheduler, "nodes": nodes, "procs_per_node": procs_per_node, "gpus_per_node": gpus_per_node}
    i2v = _finetune("i2v", init_from, data_uri, output_uri, config, max_steps, model_name, launch)
    _evaluate_and_promote(
        i2v.outputs["model_uri"], data_uri, metric, direction, min_improvement, eval_clips, eval_steps
    )


def _finetune_masked(kind: str, init_from, data_uri, output_uri, config, max_steps, model_name, scheduler, nodes,
                     procs_per_node, gpus_per_node):  # fmt: skip
    """A known-frames finetune, registered as a candidate. No motion gate: the text-to-video
    motion evaluation does not measure interpolation or continuation (the evidence does)."""
    launch = {"scheduler": scheduler, "nodes": nodes, "procs_per_node": procs_per_node, "gpus_per_node": gpus_per_node}
    return _finetune(kind, init_from, data_uri, output_uri, config, max_steps, model_name, launch)


@dsl.pipeline(
    name="finetune-interpolation",
    description="Frame interpolation finetune (Video LDM, x4 by masked key frames) of a trained video model.",
)
def finetune_interpolation(
    init_from: str = "models:/vdm-text-to-video@champion",
    data_uri: str = "s3://vdm/curated/kfp/shards/",
    output_uri: str = "s3://vdm/runs/finetune-interpolation",
    config: str = "tiny",
    max_steps: int = 0,
    model_name: str = "vdm-interpolation",
    scheduler: str = "local_cwd",
    nodes: int = 1,
    procs_per_node: int = 1,
    gpus_per_node: int = 0,
):
    _finetune_masked("interpolation", init_from, data_uri, output_uri, config, max_steps, model_name, scheduler,
                     nodes, procs_per_node, gpus_per_node)  # fmt: skip


@dsl.pipeline(
    name="finetune-prediction",
    description="Long-video prediction finetune (Video LDM, masked context frames) of a trained video model.",
)
def finetune_prediction(
    init_from: str = "models:/vdm-text-to-video@champion",
    data_uri: str = "s3://vdm/curated/kfp/shards/",
    output_uri: str = "s3://vdm/runs/finetune-prediction",
    config: str = "tiny",
    max_steps: int = 0,
    model_name: str = "vdm-prediction",
    scheduler: str = "local_cwd",
    nodes: int = 1,
    procs_per_node: int = 1,
    gpus_per_node: int = 0,
):
    _finetune_masked("prediction", init_from, data_uri, output_uri, config, max_steps, model_name, scheduler,
                     nodes, procs_per_node, gpus_per_node)  # fmt: skip


@dsl.pipeline(
    name="finetune-temporal-decoder",
    description="Temporal VAE decoder finetune of a trained model (a new version of the same model, its decoder "
    "made temporal) -> evaluation -> promotion gate.",
)
def finetune_temporal_decoder(
    init_from: str = "models:/vdm-text-to-video@champion",
    data_uri: str = "s3://vdm/curated/kfp/shards/",
    output_uri: str = "s3://vdm/runs/finetune-temporal-decoder",
    config: str = "tiny",
    max_steps: int = 0,
    model_name: str = "vdm-text-to-video",
    scheduler: str = "local_cwd",
    nodes: int = 1,
    procs_per_node: int = 1,
    gpus_per_node: int = 0,
    metric: str = "motion_speed_error",
    direction: str = "minimize",
    min_improvement: float = 0.0,
    eval_clips: int = 8,
    eval_steps: int = 25,
):
    launch = {"scheduler": scheduler, "nodes": nodes, "procs_per_node": procs_per_node, "gpus_per_node": gpus_per_node}
    decoder = _finetune("temporal-decoder", init_from, data_uri, output_uri, config, max_steps, model_name, launch)
    _evaluate_and_promote(
        decoder.outputs["model_uri"], data_uri, metric, direction, min_improvement, eval_clips, eval_steps
    )


@dsl.pipeline(
    name="finetune-spatial-hq",
    description="Image-only spatial finetune (VideoCrafter2) of a trained video model on high-quality images -> "
    "motion evaluation on the video data -> promotion gate.",
)
def finetune_spatial_hq(
    init_from: str = "models:/vdm-text-to-video@champion",
    image_data_uri: str = "s3://vdm/images/high-quality/",
    video_data_uri: str = "s3://vdm/curated/kfp/shards/",
    output_uri: str = "s3://vdm/runs/finetune-spatial-hq",
    config: str = "tiny",
    max_steps: int = 0,
    model_name: str = "vdm-spatial-hq",
    scheduler: str = "local_cwd",
    nodes: int = 1,
    procs_per_node: int = 1,
    gpus_per_node: int = 0,
    metric: str = "motion_speed_error",
    direction: str = "minimize",
    min_improvement: float = 0.0,
    eval_clips: int = 8,
    eval_steps: int = 25,
):
    launch = {"scheduler": scheduler, "nodes": nodes, "procs_per_node": procs_per_node, "gpus_per_node": gpus_per_node}
    spatial = _finetune("spatial-hq", init_from, image_data_uri, output_uri, config, max_steps, model_name, launch)
    # Trained on images; the gate checks that the motion on the video data holds.
    _evaluate_and_promote(
        spatial.outputs["model_uri"], video_data_uri, metric, direction, min_improvement, eval_clips, eval_steps
    )


@dsl.pipeline(
    name="finetune-camera-lora",
    description="Camera-motion LoRA adapters of a trained video model, one per motion class in turn (pan, static, "
    "zoom_in, zoom_out), each added to the previous result; the last, base + every adapter, is registered "
    "(candidate).",
)
def finetune_camera_lora(
    init_from: str = "models:/vdm-text-to-video@champion",
    data_uri: str = "s3://vdm/curated/kfp/shards/",
    output_uri: str = "s3://vdm/runs/finetune-camera-lora",
    config: str = "tiny",
    max_steps: int = 0,
    model_name: str = "vdm-camera-lora",
    scheduler: str = "local_cwd",
    nodes: int = 1,
    procs_per_node: int = 1,
    gpus_per_node: int = 0,
):
    launch = {"scheduler": scheduler, "nodes": nodes, "procs_per_node": procs_per_node, "gpus_per_node": gpus_per_node}
    base = init_from
    classes = sorted(MOTION_CLASSES)
    for motion_class in classes:
        register_as = model_name if motion_class == classes[-1] else ""  # one version holding every adapter
        step = _finetune(
            "camera-lora", base, data_uri, f"{output_uri}/{motion_class}", config, max_steps, register_as, launch,
            motion_class=motion_class,
        )  # fmt: skip
        base = step.outputs["final"]


@dsl.pipeline(
    name="finetune-multiview",
    description="Multi-view finetune (SVD-MV) of an image-to-video model on orbit shards (JSON with the camera "
    "elevation, e.g. `vdm data orbits`), registered as a candidate.",
)
def finetune_multiview(
    init_from: str = "models:/vdm-image-to-video@champion",
    data_uri: str = "s3://vdm/orbits/",
    output_uri: str = "s3://vdm/runs/finetune-multiview",
    config: str = "tiny",
    max_steps: int = 0,
    model_name: str = "vdm-multiview",
    scheduler: str = "local_cwd",
    nodes: int = 1,
    procs_per_node: int = 1,
    gpus_per_node: int = 0,
):
    launch = {"scheduler": scheduler, "nodes": nodes, "procs_per_node": procs_per_node, "gpus_per_node": gpus_per_node}
    _finetune("multiview", init_from, data_uri, output_uri, config, max_steps, model_name, launch)


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
    metric: str = "motion_speed_error",
    direction: str = "minimize",
    min_improvement: float = 0.0,
    eval_clips: int = 8,
    eval_steps: int = 25,
):
    curated = _curate(input_uri, f"{work_uri}/curated", curation_config_yaml, videos_per_shard, random_weights, 2)
    shards = f"{work_uri}/curated/shards/"
    launch = {"scheduler": scheduler, "nodes": nodes, "procs_per_node": procs_per_node, "gpus_per_node": gpus_per_node}
    steps = (image_steps, video_steps, hq_steps)
    hq = _pretrain(shards, f"{work_uri}/train", config, vae, steps, model_name, launch, after=curated)
    gate = (metric, direction, min_improvement, eval_clips, eval_steps)
    _evaluate_and_promote(hq.outputs["model_uri"], shards, *gate)
    i2v = _finetune(
        "i2v", hq.outputs["final"], shards, f"{work_uri}/train/i2v", config, i2v_steps, i2v_model_name, launch
    )
    _evaluate_and_promote(i2v.outputs["model_uri"], shards, *gate)


PIPELINES = {
    "curation": curation,
    "pretraining": pretraining,
    "evaluate-and-promote": evaluate_and_promote,
    "finetune-i2v": finetune_i2v,
    "finetune-temporal-decoder": finetune_temporal_decoder,
    "finetune-spatial-hq": finetune_spatial_hq,
    "finetune-camera-lora": finetune_camera_lora,
    "finetune-multiview": finetune_multiview,
    "finetune-interpolation": finetune_interpolation,
    "finetune-prediction": finetune_prediction,
    "end-to-end": end_to_end,
}
