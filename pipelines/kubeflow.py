"""The platform's Kubeflow pipelines (kfp v2), wired from the components' KFP steps.

Every pipeline input is a string or a number with a default and a description, so each shows
up usable and explained in the Kubeflow UI's run form. Cluster settings live here, not in
the components: credentials and endpoints from the Secret and ConfigMap that k8s/ creates,
GPU requests with the NVIDIA toleration and node selector plus a memory-backed /dev/shm for
training, caching on for annotation and finalization (unchanged inputs skip) and off for
listing the inputs and for training. The resources of a training step are run-form
parameters (`gpus_per_node`, `cpu_per_node`, `memory_per_node`, `shm_per_node`; defaults:
`GPU_STEP`), and one rank runs per GPU. Each training step comes in two variants, chosen by
`scheduler` when the run starts (`dsl.If`/`dsl.Else`, outputs merged with `dsl.OneOf`): the
step trains in its own GPU pod (`local_cwd`), or a small step submits a Volcano job whose
pods get those resources and waits for it (`kubernetes`). Pod resources taken from run
parameters are strings: the KFP backend resolves only string parameters into a pod's
resources. `kfp.local` ignores the Kubernetes settings, so the same pipelines run locally.
Every step has a display name that says which model it works on ("evaluate text-to-video");
the dataset card and each evaluation's and gate's report are HTML artifacts the UI renders,
each trained model a Model artifact. Runs share no state: a pipeline's output (`output_uri`,
end-to-end's `work_uri`) left empty is the run's own folder, `s3://<data bucket>/runs/<pipeline>/<run
id>` (the "run folder" step resolves it from KFP's run id), and each training step records that
run id in its checkpoints, so a retry resumes only its own run's. (No `from __future__ import
annotations` here or in the component modules: kfp reads the annotations of pipeline and component
functions as types.)
"""

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import yaml
from kfp import dsl, kubernetes

import model
from components.common.settings import load_settings
from components.curation.component import annotate_input_shard, finalize_curation, plan_curation
from components.evaluation.component import evaluate_model
from components.registry.component import promote_candidate
from components.training.component import finetune_model, train_stage
from components.training.launch import (
    FORWARDED_ENV,
    GPU_NODE_SELECTOR,
    GPU_RESOURCE,
    MLFLOW_SECRET,
    S3_SECRET,
    SECRET_ENV,
)
from model.tasks import FINETUNES

# Names shared with k8s/ and the training pods (components/training/launch.py): the steps get
# the same credentials and settings as the ranks they launch.
S3_SECRET_KEYS = {var: key for var, (secret, key) in SECRET_ENV.items() if secret == S3_SECRET}
MLFLOW_SECRET_KEYS = {var: key for var, (secret, key) in SECRET_ENV.items() if secret == MLFLOW_SECRET}
PLATFORM_CONFIG_MAP = "vdm-platform-config"
PLATFORM_CONFIG_KEYS = {k: k for k in FORWARDED_ENV}


@dataclass(frozen=True)
class GPUStep:
    """Resources of a training node: the run form's defaults for `gpus_per_node`,
    `cpu_per_node`, `memory_per_node` and `shm_per_node`, and how a GPU pod is scheduled
    (components/training/launch.py schedules the Volcano job's pods the same way)."""

    gpus: int = 8
    accelerator: str = GPU_RESOURCE
    cpu: str = "32"
    memory: str = "256G"
    shm: str = "64Gi"
    node_selector: tuple[str, str] = GPU_NODE_SELECTOR  # the Volcano pods' too (components/training/launch.py)


GPU_STEP = GPUStep()
# The step that submits a Volcano job (scheduler=kubernetes) and streams its log: no GPU.
LAUNCHER_CPU, LAUNCHER_MEMORY = "1", "2G"
# Input shards annotated at once; a compile-time number (KFP cannot take it from a run parameter).
CURATION_PARALLELISM = 8
# The shipped model sizes: model/configs/<size>-<kind>.yaml.
CONFIG_SIZES = sorted({p.name.split("-", 1)[0] for p in (Path(model.__file__).parent / "configs").glob("*-*.yaml")})
TRAINING_OUTPUTS = ("final", "model_uri", "mlflow_run_id")
# What a run from the UI trains and curates with unless told otherwise: SVD's size from imported
# weights (docs/training.md, Weights); `vdm run` passes the tiny, CPU-sized settings instead.
DEFAULT_CONFIG = "svd"
DEFAULT_STAGE_ONE_INIT = "weights:sd21"
# One line (JSON is YAML): a run form's default with line breaks breaks KFP's compiled YAML.
PUBLIC_WEIGHTS_CURATION = json.dumps(
    yaml.safe_load((Path(__file__).parents[1] / "components" / "curation" / "public-weights.yaml").read_text())
)

PUBLIC_WEIGHTS_EVALUATION = json.dumps(
    yaml.safe_load((Path(__file__).parents[1] / "components" / "evaluation" / "public-weights.yaml").read_text())
)
# Where a curation run with output_uri s3://vdm/curated/kfp puts its subsets (docs/curation.md, Subsets):
# the filtered set lvd-f (Stages I and II) and the hq subset (Stage III).
CURATED_URI = "s3://vdm/curated/kfp"
FILTERED_SHARDS = f"{CURATED_URI}/shards/"
HQ_SHARDS = f"{CURATED_URI}/subsets/hq/shards/"
# Production evaluations: the policies' minimum evaluation size (docs/evaluation.md); FVD on fewer is noise.
EVAL_CLIPS = 256

# What the run forms say about their parameters (the Kubeflow UI shows it beside each one).
HELP = {
    "config": f"The model config: a shipped size ({', '.join(CONFIG_SIZES)}; model/configs/<size>-<kind>.yaml) "
    "or an s3:// YAML file. svd is SVD's size, for 80 GB GPUs; tiny trains on CPU (the demo data, with "
    "random weights).",
    "scheduler": "TorchX scheduler of the training steps: local_cwd (the ranks run in the step's own pod, "
    "which gets the resources below: one node) or kubernetes (the step, with no GPU, "
    f"{LAUNCHER_CPU} CPU and {LAUNCHER_MEMORY} memory, submits a Volcano job to the queue vdm-training whose "
    "pods get the resources below, and waits for it).",
    "nodes": "Nodes per training step, gpus_per_node ranks each; more than 1 needs scheduler=kubernetes.",
    "gpus_per_node": f"GPUs ({GPU_STEP.accelerator}) per training node, one rank per GPU; 0: one CPU rank "
    "(a cluster without GPUs; with config tiny). A string, as the other resources: KFP resolves only strings "
    "into a pod's resources.",
    "cpu_per_node": "CPU per training node, request and limit (a Kubernetes quantity: 32, 500m).",
    "memory_per_node": "Memory per training node, request and limit (a Kubernetes quantity: 256G, 512Gi); "
    "/dev/shm counts against it.",
    "shm_per_node": "Size limit of the memory-backed /dev/shm in the Volcano job's pods (scheduler=kubernetes); "
    "empty: memory_per_node alone bounds it. A step that trains in its own pod (local_cwd) gets "
    f"{GPU_STEP.shm}: KFP cannot size a volume from a run parameter.",
    "annotate_gpus": "GPUs per 'annotate shard' step (neural annotators on CUDA, bf16); 0: a CPU pod (a cluster "
    "without GPUs; fine for the demo's random-weight annotators).",
    "eval_gpus": "GPUs per evaluation step; 0: a CPU pod (a cluster without GPUs; the tiny config).",
    "eval_clips": f"Videos each evaluation generates from held-out clips and compares with them (FVD); the gate "
    f"policies refuse fewer than their min_clips (default {EVAL_CLIPS}, multi-view 64).",
    "eval_steps": "Sampling steps per generated video in the evaluation.",
    "eval_networks_yaml": "The evaluation networks (YAML, components/evaluation/public-weights.yaml's form): the "
    "I3D for FVD, OpenCLIP and the aesthetic head, as imported weights (vdm weights import NAME PATH first, "
    "docs/evaluation.md); empty with random_networks true for the demo.",
    "random_networks": "Run evaluation networks that have no weights with random ones (demos: the figures mean "
    "nothing, and a production gate policy refuses them).",
    "eval_prompts_uri": 'The evaluation prompt set (s3:// JSONL of {"prompt": ...}); empty: curation\'s '
    "prompts.jsonl beside the held-out data (its captions).",
    "eval_prompts": "How many of the set's prompts text models cycle through; 0: all.",
    "image_init_from": "What Stage I starts from: imported weights (weights:sd21: SD 2.1's UNet and VAE; import "
    "them once first: vdm weights import sd21 PATH, docs/training.md), an s3:// model folder, or empty: from "
    "scratch (the tiny config only: a real-size one needs a VAE).",
}
LAUNCH_PARAMETERS = ("scheduler", "nodes", "gpus_per_node", "cpu_per_node", "memory_per_node", "shm_per_node")


def _documented(summary: str, descriptions: dict[str, str]):
    """Give a pipeline function the docstring the Kubeflow UI's run form reads: `summary`, then
    `Args:` with a description for every parameter (a missing one fails here)."""

    def document(func):
        names = list(inspect.signature(func).parameters)
        missing = [n for n in names if n not in descriptions]
        if missing:
            raise ValueError(f"{func.__name__}: no description for {missing}")
        args = "\n".join(f"    {n}: {descriptions[n]}" for n in names)
        func.__doc__ = f"{summary}\n\nArgs:\n{args}\n"
        return func

    return document


@dsl.component(base_image=load_settings().image)
def run_folder(output_uri: str, pipeline: str, run_id: str, subfolder: str = "") -> str:
    """The folder a run writes to: `output_uri` as given, or (empty) this run's own,
    `s3://<VDM_DATA_BUCKET>/runs/<pipeline>/<run_id>`; then `subfolder` in it, if given.
    `run_id`: KFP's run id placeholder."""
    import os

    if output_uri:
        folder = output_uri.rstrip("/")
    elif not run_id or "{{" in run_id:
        raise ValueError(f"run_id {run_id!r}: KFP did not resolve the run's id; give output_uri explicitly")
    else:
        folder = f"s3://{os.environ.get('VDM_DATA_BUCKET') or 'vdm'}/runs/{pipeline}/{run_id}"
    return f"{folder}/{subfolder}" if subfolder else folder


def _run_folder(output_uri, pipeline: str, subfolder: str = ""):
    """The run's output folder (`run_folder`; `subfolder` in it), as a step's output."""
    task = run_folder(output_uri=output_uri, pipeline=pipeline, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                      subfolder=subfolder)  # fmt: skip
    cpu_step(task, cpu="1", memory="1G", cache=False)
    task.set_display_name(f"run folder{' ' + subfolder if subfolder else ''}")
    return task.output


def platform_env(task: dsl.PipelineTask) -> dsl.PipelineTask:
    kubernetes.use_secret_as_env(task, S3_SECRET, S3_SECRET_KEYS)
    kubernetes.use_secret_as_env(task, MLFLOW_SECRET, MLFLOW_SECRET_KEYS)
    kubernetes.use_config_map_as_env(task, PLATFORM_CONFIG_MAP, PLATFORM_CONFIG_KEYS)
    return task


def cpu_step(task: dsl.PipelineTask, cpu: str = "2", memory: str = "8G", cache: bool = True) -> dsl.PipelineTask:
    platform_env(task)
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    task.set_caching_options(cache)
    return task


def with_gpus(task: dsl.PipelineTask, gpus, step: GPUStep = GPU_STEP) -> dsl.PipelineTask:
    """Request `gpus` (a number, or a string run parameter; "0": none) and tolerate the GPU
    nodes' taint; no node selector, so a CPU-only request still schedules anywhere."""
    task.set_accelerator_type(step.accelerator).set_accelerator_limit(gpus)
    kubernetes.add_toleration(task, key=step.accelerator, operator="Exists", effect="NoSchedule")
    return task


def gpu_step(task: dsl.PipelineTask, gpus=GPU_STEP.gpus, cpu=GPU_STEP.cpu, memory=GPU_STEP.memory,
             step: GPUStep = GPU_STEP) -> dsl.PipelineTask:  # fmt: skip
    """A training step that trains in its own pod: `gpus`, `cpu`, `memory` (constants or string
    run parameters) as request and limit, on a GPU node, with a memory-backed /dev/shm."""
    platform_env(task)
    with_gpus(task, gpus, step)
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    kubernetes.add_node_selector(task, *step.node_selector)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=step.shm)
    task.set_caching_options(False)  # training has side effects (checkpoints, registry)
    task.set_retry(2)  # retries resume from the last checkpoint
    return task


def launcher_step(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """A training step that submits a Volcano job and waits for it: no GPU, little CPU and memory."""
    cpu_step(task, cpu=LAUNCHER_CPU, memory=LAUNCHER_MEMORY, cache=False)
    task.set_retry(2)  # a retry submits a new job, which resumes from the last checkpoint
    return task


def _training(component, name: str, launch: dict, after=None, **inputs) -> dict:
    """A training step (`component`: train_stage or finetune_model) in its two variants, one
    of which runs: with scheduler != kubernetes the step trains in its own GPU pod sized by
    `launch`; with kubernetes a launcher step submits the Volcano job sized by `launch`.
    Returns the outputs (`TRAINING_OUTPUTS`), each the one that ran (`dsl.OneOf`). The
    in-pod variant, the one a local run runs, comes first in each pair (end-to-end's stages:
    train-stage, train-stage-3, train-stage-5). `after`: a task that must finish first (no
    data edge to it)."""
    # The run's id: recorded in the step's checkpoints, so a retry resumes this run's and no other's.
    arguments = {**inputs, **{k: launch[k] for k in LAUNCH_PARAMETERS}, "run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}
    with dsl.If(launch["scheduler"] != "kubernetes", name=f"{name}: in the step's pod"):
        in_pod = gpu_step(component(**arguments), launch["gpus_per_node"], launch["cpu_per_node"],
                          launch["memory_per_node"])  # fmt: skip
        in_pod.set_display_name(name)
        if after is not None:
            in_pod.after(after)
    with dsl.Else(name=f"{name}: Volcano job"):
        launcher = launcher_step(component(**arguments))
        launcher.set_display_name(f"{name} (Volcano job)")
        if after is not None:
            launcher.after(after)
    return {k: dsl.OneOf(in_pod.outputs[k], launcher.outputs[k]) for k in TRAINING_OUTPUTS}


def _curate(input_uri: str, output_uri: str, config_yaml: str, videos_per_shard: int, random_weights: bool,
            workers: int, annotate_gpus):  # fmt: skip
    # Never cached: a cache key is the inputs' values, and a growing prefix keeps its URI (a schedule would
    # reuse the first run's file list); unchanged shards still hit the annotate steps' cache.
    plan = cpu_step(
        plan_curation(
            input_uri=input_uri, videos_per_shard=videos_per_shard, config_yaml=config_yaml, output_uri=output_uri
        ),
        cache=False,
    )
    plan.set_display_name("list and shard inputs")
    with dsl.ParallelFor(plan.output, parallelism=CURATION_PARALLELISM, name="input-shards") as shard:
        part = cpu_step(
            annotate_input_shard(
                shard=shard, output_uri=output_uri, config_yaml=config_yaml, random_weights=random_weights,
                workers=workers, gpus=annotate_gpus,
            ),
            cpu="4", memory="16G",
        )  # fmt: skip
        with_gpus(part, annotate_gpus)
        part.set_display_name("annotate shard")
    final = cpu_step(
        finalize_curation(
            parts=dsl.Collected(part.output), input_uri=input_uri, output_uri=output_uri, config_yaml=config_yaml
        )
    )
    final.set_display_name("filter, shards, dataset card")
    return final


@dsl.pipeline(name="curation-steps", description="Curation's steps, writing to output_uri.")
def curation_steps(input_uri: str, output_uri: str, config_yaml: str, videos_per_shard: int, random_weights: bool,
                   workers: int, annotate_gpus: str):  # fmt: skip
    """Curation's steps as one nested pipeline: its steps get the output folder (a step's output, the
    run folder) as this pipeline's parameter, which kfp.local resolves inside the ParallelFor (a
    step's output used directly there, it replaces by the loop's item)."""
    _curate(input_uri, output_uri, config_yaml, videos_per_shard, random_weights, workers, annotate_gpus)


_CURATION_HELP = {
    "input_uri": "Raw videos: an s3:// prefix, listed anew on every run (new videos are seen). The default is "
    "where `vdm run` puts the demo videos (seed 0).",
    "output_uri": "s3:// prefix for the curated data: shards/, the manifest and the dataset card; empty: this "
    "run's own folder, s3://vdm/runs/curation/<run id>/ (set it, e.g. to s3://vdm/curated/kfp, the training "
    "pipelines' default data, to publish a dataset there; a run does not write over another's).",
    "config_yaml": "Curation config as YAML text (docs/curation.md; JSON is YAML too); empty: the built-in "
    "defaults. The default names the public annotator weights (weights:open-clip-vit-l-14, "
    "weights:laion-aesthetic, weights:coca-vit-l-14): import them once first (vdm weights import, "
    "docs/training.md), or for the demo data set this empty and random_weights true.",
    "videos_per_shard": "Videos per input shard, each annotated by one step; 0: the config's.",
    "random_weights": "Run the neural annotators with random weights where the config names none (demos: "
    "with config_yaml empty). The default config names imported weights, so false needs those imported.",
    "workers": "Decoding processes per 'annotate shard' step; 0: one.",
    "annotate_gpus": HELP["annotate_gpus"],
}


@dsl.pipeline(name="curation", description="Raw videos to filtered WebDataset shards with a dataset card.")
@_documented("Curate raw videos into filtered WebDataset shards with a dataset card.", _CURATION_HELP)
def curation(
    input_uri: str = "s3://vdm/samples/seed-0",
    output_uri: str = "",
    config_yaml: str = PUBLIC_WEIGHTS_CURATION,
    videos_per_shard: int = 4,
    random_weights: bool = False,
    workers: int = 2,
    annotate_gpus: str = "1",
):
    curation_steps(input_uri=input_uri, output_uri=_run_folder(output_uri, "curation"), config_yaml=config_yaml,
                   videos_per_shard=videos_per_shard, random_weights=random_weights, workers=workers,
                   annotate_gpus=annotate_gpus).set_display_name("curate")  # fmt: skip


# How step names call a model: its kind, or what it generates where the kind's name is an abbreviation.
MODEL_LABELS = {"i2v": "image-to-video"}
STAGE_LABELS = {"image": "Stage I (image)", "video": "Stage II (video)", "hq": "Stage III (hq)"}


def _stage(stage: str, init_from, launch: dict, after=None, **kwargs) -> dict:
    return _training(train_stage, f"train {STAGE_LABELS[stage]}", launch, after, stage=stage, init_from=init_from,
                     **kwargs)  # fmt: skip


def _pretrain(data: dict, output_uri, config, image_init_from, vae, steps: tuple, register_as, launch: dict,
              after=None) -> dict:  # fmt: skip
    """Stage I (from `image_init_from`) -> II -> III, each on its data (`data`: stage -> URI: image,
    video, hq); Stage I waits for `after` (the task that writes the data). Returns Stage III's outputs."""
    common = {"config": config, "vae": vae}
    image = _stage("image", image_init_from, launch, after, output_uri=f"{output_uri}/stage1", max_steps=steps[0],
                   register_as="", data_uri=data["image"], **common)  # fmt: skip
    video = _stage("video", image["final"], launch, output_uri=f"{output_uri}/stage2", max_steps=steps[1],
                   register_as="", data_uri=data["video"], **common)  # fmt: skip
    return _stage("hq", video["final"], launch, output_uri=f"{output_uri}/stage3", max_steps=steps[2],
                  register_as=register_as, data_uri=data["hq"], **common)  # fmt: skip


@dsl.component(base_image=load_settings().image)
def stage_data(image_data_uri: str, video_data_uri: str, hq_data_uri: str, curated_uri: str) -> NamedTuple(
    "StageData", [("image", str), ("video", str), ("hq", str)]
):
    """Each pretraining stage's data: as given, or (empty) the subset of the curated output
    `curated_uri` the stage trains on: Stage I (frames of its clips) and Stage II the filtered set
    lvd-f (`shards/`), Stage III the hq subset (`subsets/hq/shards/`)."""
    from collections import namedtuple

    from components.curation.finalize import subset_folder
    from model.records import HQ_SUBSET, LVD_F

    base = curated_uri.rstrip("/")

    def shards(subset: str) -> str:
        folder = subset_folder(subset)
        return f"{base}/{folder}/shards/" if folder else f"{base}/shards/"

    outputs = namedtuple("StageData", ["image", "video", "hq"])
    return outputs(image_data_uri or shards(LVD_F), video_data_uri or shards(LVD_F), hq_data_uri or shards(HQ_SUBSET))


# What each stage trains on (the run forms of pretraining and end-to-end).
STAGE_DATA_HELP = {
    "image_data_uri": "Stage I (image) data: curated clips whose frames it trains on, one frame per clip (a curated "
    "output's shards/, the filtered set lvd-f), or an image set (a WebDataset of images) with a config whose image "
    "stage reads data: images.",
    "video_data_uri": "Stage II (video) data: the filtered set lvd-f, a curated output's shards/ "
    "(subsets/lvd/shards/: every clip, before the quality filters, for ablations).",
    "hq_data_uri": "Stage III (high quality) data: the hq subset, a curated output's subsets/hq/shards/ (a config "
    "whose clips are the hq rendition reads subsets/hq/shards-hq/ from it).",
}


_TRAINING_HELP = {
    "config": HELP["config"],
    "image_init_from": HELP["image_init_from"],
    "vae": "The VAE the stages use frozen (weights:NAME, or an s3:// diffusers folder); empty: the config's, "
    "else the one of the folder a stage starts from.",
    "image_steps": "Stage I (image) training steps; 0: the config's max_steps.",
    "video_steps": "Stage II (video) training steps; 0: the config's max_steps.",
    "hq_steps": "Stage III (high quality) training steps; 0: the config's max_steps.",
    **{k: HELP[k] for k in LAUNCH_PARAMETERS},
}


@dsl.pipeline(name="pretraining", description="Stage I (image) -> Stage II (video) -> Stage III (high quality).")
@_documented(
    "Stage I (image) -> Stage II (video) -> Stage III (high quality); Stage III is registered as a candidate.",
    {
        **{
            name: f"{text} Default: where a curation run with output_uri {CURATED_URI} puts it."
            for name, text in STAGE_DATA_HELP.items()
        },
        "output_uri": "s3:// prefix for each stage's checkpoints and final model (stage1/, stage2/, stage3/); empty: "
        "this run's own folder, s3://vdm/runs/pretraining/<run id>/.",
        "register_as": "Registered model Stage III is added to (alias candidate); empty: not registered.",
        **_TRAINING_HELP,
    },
)
def pretraining(
    image_data_uri: str = FILTERED_SHARDS,
    video_data_uri: str = FILTERED_SHARDS,
    hq_data_uri: str = HQ_SHARDS,
    output_uri: str = "",
    config: str = DEFAULT_CONFIG,
    image_init_from: str = DEFAULT_STAGE_ONE_INIT,
    vae: str = "",
    image_steps: int = 0,
    video_steps: int = 0,
    hq_steps: int = 0,
    register_as: str = "vdm-text-to-video",
    scheduler: str = "local_cwd",
    nodes: int = 1,
    gpus_per_node: str = str(GPU_STEP.gpus),
    cpu_per_node: str = GPU_STEP.cpu,
    memory_per_node: str = GPU_STEP.memory,
    shm_per_node: str = GPU_STEP.shm,
):
    launch = dict(zip(LAUNCH_PARAMETERS, (scheduler, nodes, gpus_per_node, cpu_per_node, memory_per_node,
                                          shm_per_node), strict=True))  # fmt: skip
    steps = (image_steps, video_steps, hq_steps)
    output = _run_folder(output_uri, "pretraining")
    data = {"image": image_data_uri, "video": video_data_uri, "hq": hq_data_uri}
    _pretrain(data, output, config, image_init_from, vae, steps, register_as, launch)


# The run-form parameters of an evaluation step, and the step's inputs they fill.
EVAL_PARAMETERS = {
    "eval_clips": "clips",
    "eval_steps": "steps",
    "eval_gpus": "gpus",
    "eval_networks_yaml": "networks_yaml",
    "random_networks": "random_networks",
    "eval_prompts_uri": "prompts_uri",
    "eval_prompts": "prompts",
}


def _evaluation(parameters: dict) -> dict:
    """The evaluation step's inputs from a run form's `eval_*` parameters."""
    return {step: parameters[form] for form, step in EVAL_PARAMETERS.items()}


def _evaluate_and_promote(model_uri, data_uri, evaluation: dict, label: str, reference_uri=""):
    """The evaluation of a registered version (`evaluation`: the step's clips, steps, gpus ("0":
    a CPU pod), networks_yaml, random_networks, prompts_uri, prompts), then the promotion gate
    on the registered model's gate policy (docs/evaluation.md). `label`: the model in the
    steps' names ("evaluate LABEL", "promotion gate LABEL")."""
    gpus = evaluation["gpus"]
    evaluation = cpu_step(
        evaluate_model(model_uri=model_uri, data_uri=data_uri, reference_uri=reference_uri, **evaluation),
        cache=False,
    )
    with_gpus(evaluation, gpus)
    evaluation.set_display_name(f"evaluate {label}")
    promotion = cpu_step(
        promote_candidate(model_uri=model_uri, pipeline_run=dsl.PIPELINE_JOB_ID_PLACEHOLDER),
        cache=False,
    ).after(evaluation)
    return evaluation, promotion.set_display_name(f"promotion gate {label}")


@dsl.pipeline(name="evaluate-and-promote", description="A version's evaluation (its kind's), then the promotion gate.")
@_documented(
    "Evaluate a registered version by its kind's evaluation and run the promotion gate.",
    {
        "model_uri": "The version to evaluate and promote: models:/NAME/VERSION; the default exists once a "
        "pretraining or end-to-end run has registered its first text-to-video version.",
        "data_uri": "Held-out shards to evaluate on (s3:// prefix: curation's heldout/), or orbits for multi-view "
        "models.",
        "reference_uri": "A second data set the kind compares with (spatial-HQ: its image set); empty for the others.",
        "clips": HELP["eval_clips"],
        "steps": HELP["eval_steps"],
        "gpus": HELP["eval_gpus"],
        "networks_yaml": HELP["eval_networks_yaml"],
        "random_networks": HELP["random_networks"],
        "prompts_uri": HELP["eval_prompts_uri"],
        "prompts": HELP["eval_prompts"],
    },
)
def evaluate_and_promote(
    model_uri: str = "models:/vdm-text-to-video/1",
    data_uri: str = "s3://vdm/curated/kfp/heldout/",
    reference_uri: str = "",
    clips: int = EVAL_CLIPS,
    steps: int = 25,
    gpus: str = "1",
    networks_yaml: str = PUBLIC_WEIGHTS_EVALUATION,
    random_networks: bool = False,
    prompts_uri: str = "",
    prompts: int = 0,
):
    evaluation = {"clips": clips, "steps": steps, "gpus": gpus, "networks_yaml": networks_yaml,
                  "random_networks": random_networks, "prompts_uri": prompts_uri, "prompts": prompts}  # fmt: skip
    _evaluate_and_promote(model_uri, data_uri, evaluation, "model", reference_uri)


def _finetune(kind: str, init_from, data_uri, output_uri, config, max_steps, register_as, launch: dict,
              **kind_inputs) -> dict:  # fmt: skip
    """`kind_inputs`: run options of the kind (camera-lora: motion_class). Returns the outputs."""
    name = " ".join(["finetune", MODEL_LABELS.get(kind, kind), *kind_inputs.values()])
    return _training(finetune_model, name, launch, kind=kind, config=config, data_uri=data_uri,
                     output_uri=output_uri, init_from=init_from, max_steps=max_steps, register_as=register_as,
                     **kind_inputs)  # fmt: skip


# The run form of a finetune pipeline: (name, type, default, description); the kind fills in the
# defaults that depend on it.
def _finetune_parameters(task) -> list[tuple[str, type, object, str]]:
    return [
        ("init_from", str, f"models:/{task.starts_from}@champion",
         "The trained model to finetune: models:/NAME@ALIAS (the default needs a champion: a promoted version), "
         "an s3:// model folder, or imported weights (weights:NAME, imported first with vdm weights import; "
         "image-to-video: weights:svd-img2vid)."),
        ("data_uri", str, task.training_data, f"Training data (s3:// prefix of WebDataset shards). {task.title}."),
        ("eval_data_uri", str, task.evaluation_data, "Held-out shards the candidate is evaluated on."),
        ("output_uri", str, "", "s3:// prefix for checkpoints and the final model; empty: this run's own folder, "
         f"s3://vdm/runs/finetune-{task.name}/<run id>/."),
        ("config", str, DEFAULT_CONFIG, HELP["config"]),
        ("max_steps", int, 0, "Training steps; 0: the config's max_steps."),
        ("model_name", str, task.registered_name, "Registered model the result is added to (alias candidate); "
         "the evaluation and the gate run on that version."),
        ("scheduler", str, "local_cwd", HELP["scheduler"]),
        ("nodes", int, 1, HELP["nodes"]),
        ("gpus_per_node", str, str(GPU_STEP.gpus), HELP["gpus_per_node"]),
        ("cpu_per_node", str, GPU_STEP.cpu, HELP["cpu_per_node"]),
        ("memory_per_node", str, GPU_STEP.memory, HELP["memory_per_node"]),
        ("shm_per_node", str, GPU_STEP.shm, HELP["shm_per_node"]),
        ("eval_clips", int, EVAL_CLIPS, HELP["eval_clips"]),
        ("eval_steps", int, 25, HELP["eval_steps"]),
        ("eval_gpus", str, "1", HELP["eval_gpus"]),
        ("eval_networks_yaml", str, PUBLIC_WEIGHTS_EVALUATION, HELP["eval_networks_yaml"]),
        ("random_networks", bool, False, HELP["random_networks"]),
        ("eval_prompts_uri", str, "", HELP["eval_prompts_uri"]),
        ("eval_prompts", int, 0, HELP["eval_prompts"]),
        *_cascade_parameters(task),
    ]  # fmt: skip


def _cascade_parameters(task) -> list[tuple[str, type, object, str]]:
    """The run form of the cascade step (Video LDM) of a kind that upsamples another model's
    videos (its `cascade_base`: the registered text-to-video model): none for the other kinds."""
    cascade_base = task.cascade_base
    if cascade_base is None:
        return []
    return [
        ("cascade_base", str, f"models:/{cascade_base}@champion",
         "The text-to-video model whose videos the candidate upsamples in the cascade step (models:/NAME@ALIAS "
         "or an s3:// model folder); empty: no cascade step."),
        ("cascade_prompts", str, "a red disc moving right",
         "Prompts of the cascade step, separated by | : each is generated by cascade_base, then upsampled x4 by "
         "the candidate; both mp4s go to the run's cascade/ folder."),
    ]  # fmt: skip


@dsl.component(base_image=load_settings().image)
def generate_and_upscale(base_uri: str, upsampler_uri: str, prompts: str, output_uri: str, steps: int,
                         gpus: str = "0") -> str:  # fmt: skip
    """The cascade (Video LDM): each of `prompts` (separated by |) generated by the text-to-video
    model `base_uri`, then upsampled x4 by the upsampler `upsampler_uri` (each a models:/ URI, an
    s3:// model folder or a local one), seed = the prompt's index; both videos are written to
    `output_uri` as NNN-base.mp4 and NNN-x4.mp4. `gpus`: as the evaluation step's ("0" hides
    every GPU). Returns `output_uri`."""
    import os
    import tempfile
    from dataclasses import replace
    from pathlib import Path

    if not float(gpus or 0):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    from components.common.media import video_bytes
    from components.common.objectstore import ObjectStore
    from components.common.settings import load_settings
    from components.training.run import local_folder
    from model.pipeline import GenerationConfig, to_uint8
    from model.pipeline import generate_and_upscale as cascade
    from model.stages import VideoDiffusion

    texts = [text.strip() for text in prompts.split("|") if text.strip()]
    if not texts:
        raise ValueError("prompts: give at least one prompt (separated by |)")
    store = ObjectStore.from_settings(load_settings())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = output_uri.rstrip("/")
    with tempfile.TemporaryDirectory() as scratch:
        models = {}
        for role, location in (("base", base_uri), ("upsampler", upsampler_uri)):
            (Path(scratch) / role).mkdir()
            models[role] = VideoDiffusion.load(local_folder(location, store, Path(scratch) / role)).to(device)
        config = GenerationConfig.for_clip(models["base"].config.clip, steps=steps)
        for i, text in enumerate(texts):
            videos = cascade(models["base"], models["upsampler"], text, replace(config, seed=i))
            for name, frames in zip(("base", "x4"), videos, strict=True):
                mp4 = video_bytes(to_uint8(frames.float()).numpy(), config.fps)
                store.put_bytes(f"{folder}/{i:03d}-{name}.mp4", mp4, "video/mp4")
    return folder


def _finetune_pipeline(task):
    """The `finetune-KIND` pipeline of a finetune kind (model/tasks): finetune (a run per value
    of the kind's run option, each added to the previous result; the last registers) ->
    the kind's evaluation -> the promotion gate on the model's policy. Its run form is an explicit
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
        launch = {k: p[k] for k in LAUNCH_PARAMETERS}
        runs = [{}]
        if task.run_options:  # e.g. camera-lora: one adapter per motion class, chained
            (option,) = task.run_options
            runs = [{option: value} for value in task.option_choices(option)]
        base, step = p["init_from"], None
        folder = _run_folder(p["output_uri"], f"finetune-{task.name}")
        for i, options in enumerate(runs):
            last = i == len(runs) - 1
            output = folder if len(runs) == 1 else f"{folder}/{'-'.join(options.values())}"
            step = _finetune(task.name, base, p["data_uri"], output, p["config"], p["max_steps"],
                             p["model_name"] if last else "", launch, **options)  # fmt: skip
            base = step["final"]
        reference = p["data_uri"] if task.training_data_is_reference else ""
        _evaluate_and_promote(step["model_uri"], p["eval_data_uri"], _evaluation(p),
                              MODEL_LABELS.get(task.name, task.name), reference)  # fmt: skip
        if "cascade_base" in p:  # an upsampler: the candidate upsamples the text-to-video model's videos
            with dsl.If(p["cascade_base"] != "", name="cascade"):
                cascade = generate_and_upscale(base_uri=p["cascade_base"], upsampler_uri=step["model_uri"],
                                               prompts=p["cascade_prompts"], output_uri=f"{folder}/cascade",
                                               steps=p["eval_steps"], gpus=p["eval_gpus"])  # fmt: skip
                with_gpus(cpu_step(cascade, cache=False), p["eval_gpus"]).set_display_name("generate and upscale")

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
@_documented(
    "Curate, pretrain (Stage I/II/III), finetune image-to-video from Stage III; each of the two models is "
    "registered as a candidate, evaluated and gated.",
    {
        "input_uri": _CURATION_HELP["input_uri"],
        "work_uri": "s3:// prefix for this run's data and models (curated/, train/); empty: this run's own folder, "
        "s3://vdm/runs/end-to-end/<run id>/.",
        "curation_config_yaml": _CURATION_HELP["config_yaml"],
        "random_weights": _CURATION_HELP["random_weights"],
        "videos_per_shard": _CURATION_HELP["videos_per_shard"],
        "annotate_gpus": HELP["annotate_gpus"],
        **{name: f"{text} Empty: this run's curated subset." for name, text in STAGE_DATA_HELP.items()},
        "model_name": "Registered model the text-to-video model (Stage III) is added to (alias candidate).",
        "i2v_steps": "Image-to-video finetune steps; 0: the config's max_steps.",
        "i2v_model_name": "Registered model the image-to-video model is added to (alias candidate).",
        **{k: HELP[k] for k in EVAL_PARAMETERS},
        **_TRAINING_HELP,
    },
)
def end_to_end(
    input_uri: str = "s3://vdm/samples/seed-0",
    work_uri: str = "",
    curation_config_yaml: str = PUBLIC_WEIGHTS_CURATION,
    random_weights: bool = False,
    videos_per_shard: int = 4,
    annotate_gpus: str = "1",
    image_data_uri: str = "",
    video_data_uri: str = "",
    hq_data_uri: str = "",
    config: str = DEFAULT_CONFIG,
    image_init_from: str = DEFAULT_STAGE_ONE_INIT,
    vae: str = "",
    image_steps: int = 0,
    video_steps: int = 0,
    hq_steps: int = 0,
    model_name: str = "vdm-text-to-video",
    i2v_steps: int = 0,
    i2v_model_name: str = "vdm-image-to-video",
    scheduler: str = "local_cwd",
    nodes: int = 1,
    gpus_per_node: str = str(GPU_STEP.gpus),
    cpu_per_node: str = GPU_STEP.cpu,
    memory_per_node: str = GPU_STEP.memory,
    shm_per_node: str = GPU_STEP.shm,
    eval_clips: int = EVAL_CLIPS,
    eval_steps: int = 25,
    eval_gpus: str = "1",
    eval_networks_yaml: str = PUBLIC_WEIGHTS_EVALUATION,
    random_networks: bool = False,
    eval_prompts_uri: str = "",
    eval_prompts: int = 0,
):
    curated = curation_steps(input_uri=input_uri, output_uri=_run_folder(work_uri, "end-to-end", "curated"),
                             config_yaml=curation_config_yaml, videos_per_shard=videos_per_shard,
                             random_weights=random_weights, workers=2, annotate_gpus=annotate_gpus)  # fmt: skip
    curated.set_display_name("curate")
    work_uri = _run_folder(work_uri, "end-to-end")
    launch = dict(zip(LAUNCH_PARAMETERS, (scheduler, nodes, gpus_per_node, cpu_per_node, memory_per_node,
                                          shm_per_node), strict=True))  # fmt: skip
    steps = (image_steps, video_steps, hq_steps)
    # Each stage its subset of this run's curation (Stage III the hq subset), unless the run form names other data.
    data = cpu_step(stage_data(image_data_uri=image_data_uri, video_data_uri=video_data_uri, hq_data_uri=hq_data_uri,
                               curated_uri=f"{work_uri}/curated"), cpu="1", memory="1G").after(curated)  # fmt: skip
    data.set_display_name("stage data")
    data = {stage: data.outputs[stage] for stage in ("image", "video", "hq")}
    hq = _pretrain(data, f"{work_uri}/train", config, image_init_from, vae, steps, model_name, launch, after=curated)
    # Both models are measured on the split curation held out, which training never reads.
    heldout = f"{work_uri}/curated/heldout/"
    evaluation = _evaluation(locals())
    _evaluate_and_promote(hq["model_uri"], heldout, evaluation, label="text-to-video")
    i2v = _finetune("i2v", hq["final"], data["video"], f"{work_uri}/train/i2v", config, i2v_steps, i2v_model_name,
                    launch)  # fmt: skip
    _evaluate_and_promote(i2v["model_uri"], heldout, evaluation, label=MODEL_LABELS["i2v"])


@dsl.component(base_image=load_settings().image)
def personalize_subject(
    images_uri: str,
    token: str,
    class_noun: str,
    image_model: str,
    video_model: str,
    output_uri: str,
    max_steps: int,
    prior_loss_weight: float,
    class_images: int,
    learning_rate: float,
    lora_rank: int,
    realign_data_uri: str,
    realign_steps: int,
    realign_stills: int,
    register_as: str,
    model: dsl.Output[dsl.Model],
    run_id: str = "",
) -> NamedTuple("PersonalizeOutputs", [("final", str), ("model_uri", str), ("mlflow_run_id", str)]):
    """`vdm personalize` in this step's pod (components/training/personalize.py): one process,
    no ranks to launch. Outputs as `train_stage`'s; `run_id`: KFP's, so a retry replaces what
    this run published."""
    from collections import namedtuple

    from components.common.objectstore import ObjectStore
    from components.common.settings import load_settings
    from components.training.model_artifact import describe_model
    from components.training.personalize import PersonalizationRequest, run_personalization

    settings = load_settings()
    request = PersonalizationRequest(
        images=images_uri, token=token, class_noun=class_noun, image_model=image_model, video_model=video_model,
        output=output_uri, register_as=register_as or None, max_steps=max_steps,
        prior_loss_weight=prior_loss_weight, class_images=class_images, lr=learning_rate, lora_rank=lora_rank or None,
        realign_data=realign_data_uri or None, realign_steps=realign_steps, realign_stills=realign_stills,
        run_id=run_id or None,
    )  # fmt: skip
    result = run_personalization(request, ObjectStore.from_settings(settings), settings, progress=False)
    describe_model(model, result)
    outputs = namedtuple("PersonalizeOutputs", ["final", "model_uri", "mlflow_run_id"])
    return outputs(result.final, result.registered or "", result.mlflow_run_id)


_PERSONALIZE_HELP = {
    "images_uri": "s3:// prefix of 3 to 8 images (PNG, JPEG, WebP) of one subject.",
    "token": "The rare identifier word the subject is called by: prompts say 'a TOKEN CLASS_NOUN'.",
    "class_noun": "What the subject is (the prior: images the base Stage I model generates for 'a CLASS_NOUN').",
    "image_model": "The Stage I (text-to-image) model DreamBooth finetunes: models:/NAME@ALIAS or an s3:// folder.",
    "video_model": "The trained text-to-video model whose temporal layers animate the finetuned image model; its "
    "spatial layout, VAE and text encoder must be the image model's.",
    "output_uri": "s3:// prefix for the DreamBooth image model (image/) and the personalized model (final/); empty: "
    "this run's own folder, s3://vdm/runs/personalize/<run id>/.",
    "max_steps": "DreamBooth steps (0: none, the video model with the image model's spatial weights).",
    "prior_loss_weight": "Weight of the class images' loss (prior preservation); 0 turns it off.",
    "class_images": "Class images the base Stage I model generates for the prior (0: none).",
    "learning_rate": "DreamBooth's learning rate: lower keeps the image model nearer the one the temporal layers "
    "were trained on (their motion), higher learns the subject sooner.",
    "lora_rank": "0: DreamBooth trains every weight of the image UNet; a rank (4, 8, ...): only LoRA modules of that "
    "rank in its attention projections, merged afterwards (the image model moves less).",
    "realign_data_uri": "Video shards (the video model's training data, say) the temporal layers are realigned on "
    "after the transfer; empty: no realignment.",
    "realign_steps": "Steps of realignment: the temporal layers trained on realign_data_uri with the subject's images "
    "among the clips as stills, the DreamBooth spatial layers frozen, so they move what those draw (0: none, the "
    "temporal layers as the video model trained them).",
    "realign_stills": "Still clips of each subject image among the realignment data (more: the subject moves less).",
    "model_name": "Registered model the personalized model is added to (alias candidate); the evaluation and the "
    "gate run on that version.",
    "eval_data_uri": "Held-out shards the personalized model's motion is evaluated on.",
    "gpus": "GPUs of the personalization step (one process uses the first); 0: a CPU pod (the tiny models).",
    "cpu": "CPU of the personalization step, request and limit (a Kubernetes quantity: 8, 500m).",
    "memory": "Memory of the personalization step, request and limit (a Kubernetes quantity: 64G).",
    **{k: HELP[k] for k in EVAL_PARAMETERS},
}


@dsl.pipeline(
    name="personalize",
    description="DreamBooth on the Stage I model with a few images of a subject -> the video model's temporal "
    "layers on it (realigned on video data when realign_steps > 0) -> evaluation -> promotion gate.",
)
@_documented(
    "Personalized text-to-video (Video LDM): DreamBooth with prior preservation on the Stage I model, then the "
    "trained video model's temporal layers moved onto it; registered as a candidate, evaluated and gated.",
    _PERSONALIZE_HELP,
)
def personalize(
    images_uri: str = "s3://vdm/subjects/sks-disc/",
    token: str = "sks",
    class_noun: str = "disc",
    image_model: str = "models:/vdm-text-to-image@champion",
    video_model: str = "models:/vdm-text-to-video@champion",
    output_uri: str = "",
    max_steps: int = 200,
    prior_loss_weight: float = 1.0,
    class_images: int = 8,
    learning_rate: float = 5e-4,
    lora_rank: int = 0,
    realign_data_uri: str = "",
    realign_steps: int = 0,
    realign_stills: int = 1,
    model_name: str = "vdm-personalized",
    eval_data_uri: str = "s3://vdm/curated/kfp/heldout/",
    gpus: str = "1",
    cpu: str = "8",
    memory: str = "64G",
    eval_clips: int = EVAL_CLIPS,
    eval_steps: int = 25,
    eval_gpus: str = "1",
    eval_networks_yaml: str = PUBLIC_WEIGHTS_EVALUATION,
    random_networks: bool = False,
    eval_prompts_uri: str = "",
    eval_prompts: int = 0,
):
    step = personalize_subject(
        images_uri=images_uri, token=token, class_noun=class_noun, image_model=image_model, video_model=video_model,
        output_uri=_run_folder(output_uri, "personalize"), max_steps=max_steps, prior_loss_weight=prior_loss_weight,
        class_images=class_images, learning_rate=learning_rate, lora_rank=lora_rank, realign_data_uri=realign_data_uri,
        realign_steps=realign_steps, realign_stills=realign_stills, register_as=model_name,
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    )  # fmt: skip
    gpu_step(step, gpus, cpu, memory).set_display_name("personalize text-to-video")
    _evaluate_and_promote(step.outputs["model_uri"], eval_data_uri, _evaluation(locals()), "personalized")


PIPELINES = {
    "curation": curation,
    "pretraining": pretraining,
    "evaluate-and-promote": evaluate_and_promote,
    **FINETUNE_PIPELINES,
    "end-to-end": end_to_end,
    "personalize": personalize,
}
