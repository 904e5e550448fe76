"""Every pipeline compiles with `vdm pipeline compile`, and the YAML carries what a
cluster needs where it belongs: each training step in two variants chosen by `scheduler`
(trains in its own GPU pod sized by the run form, or a small launcher submits the Volcano
job), the same run-form parameters feeding the pod's resources and the step's launch (one
rank per GPU); GPU, toleration, node selector, /dev/shm and retries on training; GPUs on
the annotate and evaluation steps from their parameters; Secret and ConfigMap env on every
step; caching on for annotating and finalizing curation, off for listing its inputs and for
training; ParallelFor's parallelism; a default, a description and the declared type for every
run-form parameter; a display name per step that names its model; the dataset card and the
reports as HTML artifacts, the trained models as Model artifacts."""

from __future__ import annotations

import inspect
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from model.tasks import FINETUNES
from pipelines.kubeflow import (
    GPU_STEP,
    LAUNCH_PARAMETERS,
    LAUNCHER_CPU,
    LAUNCHER_MEMORY,
    MLFLOW_SECRET,
    MODEL_LABELS,
    PIPELINES,
    PLATFORM_CONFIG_MAP,
    S3_SECRET,
)

GPU_TOLERATION = {"effect": "NoSchedule", "key": GPU_STEP.accelerator, "operator": "Exists"}
IN_POD = "inputs.parameter_values['pipelinechannel--scheduler'] != 'kubernetes'"  # the variant's trigger
VOLCANO = f"!({IN_POD})"
TRAINING_COMPONENTS = ("comp-train-stage", "comp-finetune-model")
SHIPPED_SIZES = sorted({p.name.split("-")[0] for p in (Path(__file__).parents[2] / "model" / "configs").glob("*.yaml")})


class Pipeline:
    """A compiled pipeline: its spec, its Kubernetes settings, and where each value comes from."""

    def __init__(self, spec: dict, platform: dict):
        self.spec, self.platform = spec, platform
        self.components = {"root": spec["root"], **spec["components"]}
        self.executors = spec["deploymentSpec"]["executors"]
        # task name -> (the component whose DAG holds it, the task); KFP names tasks uniquely
        self.tasks = {
            name: (owner, task)
            for owner, component in self.components.items()
            for name, task in component.get("dag", {}).get("tasks", {}).items()
        }
        self.parent = {task["componentRef"]["name"]: name for name, (_, task) in self.tasks.items()}

    @property
    def parameters(self) -> dict:
        return self.spec["root"]["inputDefinitions"]["parameters"]

    def executor(self, task_name: str) -> str:
        return self.components[self.tasks[task_name][1]["componentRef"]["name"]]["executorLabel"]

    def resources(self, task_name: str) -> dict:
        return self.executors[self.executor(task_name)]["container"]["resources"]

    def kubernetes(self, task_name: str) -> dict:
        return self.platform[self.executor(task_name)]

    def of(self, component: str) -> list[str]:
        """The tasks that run `component` (e.g. comp-train-stage), in creation order."""
        names = [n for n, (_, t) in self.tasks.items() if t["componentRef"]["name"].startswith(component)]
        return sorted(names, key=lambda n: int(n.rsplit("-", 1)[1]) if n[-1].isdigit() else 1)

    def trigger(self, task_name: str) -> str | None:
        """The condition of the dsl.If/Else branch that holds the task (None: unconditional)."""
        owner, _ = self.tasks[task_name]
        if owner == "root" or owner not in self.parent:
            return None
        return self.tasks[self.parent[owner]][1].get("triggerPolicy", {}).get("condition")

    def sources(self, task_name: str, input_name: str) -> set[tuple]:
        """Where a task's input parameter comes from, through every DAG above it: ("param",
        root parameter), ("task", producing task, output key) or ("const", value); an input
        fed by a dsl.OneOf has one source per branch."""
        owner, task = self.tasks[task_name]
        return self._resolve(owner, task["inputs"]["parameters"][input_name])

    def _resolve(self, owner: str, spec: dict) -> set[tuple]:
        if "componentInputParameter" in spec:
            name = spec["componentInputParameter"]
            if owner == "root":
                return {("param", name)}
            parent_owner, parent = self.tasks[self.parent[owner]]
            return self._resolve(parent_owner, parent["inputs"]["parameters"][name])
        if "taskOutputParameter" in spec:
            producer, key = (
                spec["taskOutputParameter"]["producerTask"],
                spec["taskOutputParameter"]["outputParameterKey"],
            )
            return self._output(producer, key)
        return {("const", spec["runtimeValue"]["constant"])}

    def _output(self, task_name: str, key: str) -> set[tuple]:
        component = self.components[self.tasks[task_name][1]["componentRef"]["name"]]
        if "dag" not in component:
            return {("task", task_name, key)}
        output = component["dag"]["outputs"]["parameters"][key]
        if "valueFromParameter" in output:
            selectors = [output["valueFromParameter"]]
        else:
            selectors = output["valueFromOneof"]["parameterSelectors"]
        return set().union(*(self._output(s["producerSubtask"], s["outputParameterKey"]) for s in selectors))

    def upstream(self, task_name: str) -> set[str]:
        """Every task that must finish before this one starts, at every DAG level above it."""
        found: set[str] = set()
        name = task_name
        while True:
            owner, _ = self.tasks[name]
            tasks = self.components[owner]["dag"]["tasks"]
            todo = list(tasks[name].get("dependentTasks", []))
            while todo:
                before = todo.pop()
                if before not in found:
                    found.add(before)
                    todo += tasks[before].get("dependentTasks", [])
            if owner == "root":
                return found
            name = self.parent[owner]

    def training_pairs(self) -> list[tuple[str, str]]:
        """(in-pod variant, Volcano variant) of every training step, in creation order."""
        names = [n for c in TRAINING_COMPONENTS for n in self.of(c)]
        in_pod = [n for n in names if self.trigger(n) == IN_POD]
        volcano = [n for n in names if self.trigger(n) == VOLCANO]
        assert len(in_pod) + len(volcano) == len(names), [(n, self.trigger(n)) for n in names]
        pairs = [(a, b) for a in in_pod for b in volcano if self._siblings(a, b)]
        assert len(pairs) == len(in_pod) == len(volcano)
        return pairs

    def _siblings(self, a: str, b: str) -> bool:
        """Two branches of the same dsl.If/Else."""
        return self.tasks[self.parent[self.tasks[a][0]]][0] == self.tasks[self.parent[self.tasks[b][0]]][0]


def placeholder(parameter: str) -> str:
    """How a resource taken from a run parameter reads in the compiled YAML."""
    return f"{{{{$.inputs.parameters['pipelinechannel--{parameter}']}}}}"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, Pipeline]:
    out = tmp_path_factory.mktemp("compiled")
    result = subprocess.run(
        [sys.executable, "-m", "vdm.cli", "pipeline", "compile", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    docs = {p.stem: list(yaml.safe_load_all(p.read_text())) for p in out.glob("*.yaml")}
    return {n: Pipeline(d[0], d[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]) for n, d in docs.items()}


TRAINING_PIPELINES = ["pretraining", "end-to-end", *(f"finetune-{kind}" for kind in sorted(FINETUNES))]


def test_every_pipeline_compiles_with_a_default_and_a_description_for_every_parameter(compiled):
    assert set(compiled) == set(PIPELINES)
    for name, pipeline in compiled.items():
        parameters = pipeline.parameters
        missing = [p for p, d in parameters.items() if "defaultValue" not in d or not d.get("description")]
        assert parameters and not missing, (name, missing)


@pytest.mark.parametrize("name", TRAINING_PIPELINES)
def test_the_run_forms_training_resources_default_to_one_gpu_node(compiled, name):
    parameters = compiled[name].parameters
    assert "procs_per_node" not in parameters  # ranks follow the GPUs
    defaults = {p: parameters[p]["defaultValue"] for p in LAUNCH_PARAMETERS}
    assert defaults == {
        "scheduler": "local_cwd",
        "nodes": 1.0,  # KFP writes integer defaults as floats
        "gpus_per_node": str(GPU_STEP.gpus),
        "cpu_per_node": GPU_STEP.cpu,
        "memory_per_node": GPU_STEP.memory,
        "shm_per_node": GPU_STEP.shm,
    }
    # Resources are strings: the KFP backend resolves only string parameters into a pod's resources.
    for resource in ("gpus_per_node", "cpu_per_node", "memory_per_node", "shm_per_node"):
        assert parameters[resource]["parameterType"] == "STRING", resource
    assert parameters["nodes"]["parameterType"] == "NUMBER_INTEGER"
    assert "kubernetes" in parameters["nodes"]["description"]
    config = parameters["config"]
    assert config["defaultValue"] == "svd" and "s3://" in config["description"]  # a run from the UI: SVD's size
    assert SHIPPED_SIZES and all(size in config["description"] for size in SHIPPED_SIZES)


@pytest.mark.parametrize("name", TRAINING_PIPELINES)
def test_a_training_step_in_its_own_pod_requests_the_run_forms_gpus_cpu_and_memory(compiled, name):
    pipeline = compiled[name]
    pairs = pipeline.training_pairs()
    assert pairs
    for in_pod, _ in pairs:
        resources = pipeline.resources(in_pod)
        assert resources["accelerator"]["resourceType"] == GPU_STEP.accelerator
        assert resources["accelerator"]["resourceCount"] == placeholder("gpus_per_node")
        assert resources["resourceCpuRequest"] == resources["resourceCpuLimit"] == placeholder("cpu_per_node")
        assert resources["resourceMemoryRequest"] == resources["resourceMemoryLimit"] == placeholder("memory_per_node")
        # ... and the placeholders read the run form's parameters, which also feed the step's launch
        for parameter in ("gpus_per_node", "cpu_per_node", "memory_per_node"):
            assert pipeline.sources(in_pod, f"pipelinechannel--{parameter}") == {("param", parameter)}
        for parameter in LAUNCH_PARAMETERS:
            assert pipeline.sources(in_pod, parameter) == {("param", parameter)}, (in_pod, parameter)
        kube = pipeline.kubernetes(in_pod)
        assert GPU_TOLERATION in kube["tolerations"]
        assert kube["nodeSelector"]["labels"] == dict([GPU_STEP.node_selector])
        assert kube["emptyDirMounts"] == [
            {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": GPU_STEP.shm, "volumeName": "dshm"}
        ]
        task = pipeline.tasks[in_pod][1]
        assert task["cachingOptions"] == {} and task["retryPolicy"]["maxRetryCount"] == 2


@pytest.mark.parametrize("name", TRAINING_PIPELINES)
def test_with_the_kubernetes_scheduler_the_launcher_requests_no_gpu_and_passes_the_resources_on(compiled, name):
    pipeline = compiled[name]
    for in_pod, volcano in pipeline.training_pairs():
        resources = pipeline.resources(volcano)
        assert "accelerator" not in resources
        assert resources["resourceCpuRequest"] == resources["resourceCpuLimit"] == LAUNCHER_CPU
        assert resources["resourceMemoryRequest"] == resources["resourceMemoryLimit"] == LAUNCHER_MEMORY
        kube = pipeline.kubernetes(volcano)
        assert not {"tolerations", "nodeSelector", "emptyDirMounts"} & set(kube)
        task = pipeline.tasks[volcano][1]
        assert task["cachingOptions"] == {} and task["retryPolicy"]["maxRetryCount"] == 2
        # the Volcano job gets the same run-form values the in-pod variant's pod gets
        for parameter in LAUNCH_PARAMETERS:
            assert pipeline.sources(volcano, parameter) == {("param", parameter)}, (volcano, parameter)
        # and both variants train the same thing
        same = set(pipeline.tasks[in_pod][1]["inputs"]["parameters"]) - {
            "pipelinechannel--" + p for p in LAUNCH_PARAMETERS
        }
        same -= {"accelerator_count", "cpu_request", "cpu_limit", "memory_request", "memory_limit"}
        for key in same:
            assert pipeline.sources(in_pod, key) == pipeline.sources(volcano, key), (in_pod, key)


def test_the_training_components_take_the_launch_parameters(compiled):
    pipeline = compiled["end-to-end"]
    for component in TRAINING_COMPONENTS:
        inputs = pipeline.components[component]["inputDefinitions"]["parameters"]
        assert set(LAUNCH_PARAMETERS) <= set(inputs) and "procs_per_node" not in inputs
        for resource in ("gpus_per_node", "cpu_per_node", "memory_per_node", "shm_per_node"):
            assert inputs[resource]["parameterType"] == "STRING"


def test_the_next_step_takes_whichever_variant_ran(compiled):
    pipeline = compiled["end-to-end"]
    stages = {}
    for in_pod, volcano in pipeline.training_pairs():
        stage = pipeline.sources(in_pod, "stage") if in_pod.startswith("train-stage") else {("const", "i2v")}
        stages[next(iter(stage))[1]] = (in_pod, volcano)
    assert set(stages) == {"image", "video", "hq", "i2v"}
    for before, after in (("image", "video"), ("video", "hq"), ("hq", "i2v")):
        for variant in stages[after]:
            assert pipeline.sources(variant, "init_from") == {("task", t, "final") for t in stages[before]}
    evaluations = pipeline.of("comp-evaluate-model")
    assert [pipeline.sources(e, "model_uri") for e in evaluations] == [
        {("task", t, "model_uri") for t in stages["hq"]},
        {("task", t, "model_uri") for t in stages["i2v"]},
    ]
    # a local run (scheduler local_cwd) runs the in-pod variants: their task names number as before
    assert [stages[s][0] for s in ("image", "video", "hq", "i2v")] == [
        "train-stage", "train-stage-3", "train-stage-5", "finetune-model"
    ]  # fmt: skip


def test_no_training_stage_starts_before_curation_has_written_the_shards(compiled):
    # The stages read the shards by URI (a string, no data edge): Stage I must name curation's
    # last task explicitly, or it races curation (kfp.local once ran it first: "no .tar shards").
    pipeline = compiled["end-to-end"]
    (finalize,) = pipeline.of("comp-finalize-curation")
    # Curation runs as a nested pipeline (curation_steps), which ends when its last task has.
    owner, _ = pipeline.tasks[finalize]
    curation = pipeline.parent[owner]
    assert curation == "curation-steps"
    for in_pod, volcano in pipeline.training_pairs():
        for task in (in_pod, volcano):
            assert curation in pipeline.upstream(task), (task, pipeline.upstream(task))


@pytest.mark.parametrize(("name", "parameter"), [("curation", "annotate_gpus"), ("end-to-end", "annotate_gpus")])
def test_the_annotate_steps_gpus_come_from_the_run_form(compiled, name, parameter):
    pipeline = compiled[name]
    (annotate,) = pipeline.of("comp-annotate-input-shard")
    resources = pipeline.resources(annotate)
    assert resources["accelerator"] == {
        "resourceType": GPU_STEP.accelerator, "type": GPU_STEP.accelerator, "resourceCount": placeholder(parameter)
    }  # fmt: skip
    assert pipeline.sources(annotate, f"pipelinechannel--{parameter}") == {("param", parameter)}
    assert pipeline.sources(annotate, "gpus") == {("param", parameter)}  # the step knows: 0 hides the GPUs
    kube = pipeline.kubernetes(annotate)
    assert GPU_TOLERATION in kube["tolerations"] and "nodeSelector" not in kube  # 0 GPUs: any node
    assert pipeline.parameters[parameter]["defaultValue"] == "1"  # the UI's default: the public annotators, on a GPU
    assert pipeline.parameters[parameter]["parameterType"] == "STRING"


@pytest.mark.parametrize(
    ("name", "parameter"),
    [
        ("evaluate-and-promote", "gpus"),
        ("end-to-end", "eval_gpus"),
        *((f"finetune-{k}", "eval_gpus") for k in FINETUNES),
    ],
)
def test_the_evaluation_steps_gpus_come_from_the_run_form(compiled, name, parameter):
    pipeline = compiled[name]
    evaluations = pipeline.of("comp-evaluate-model")
    assert evaluations
    for evaluation in evaluations:
        resources = pipeline.resources(evaluation)
        assert resources["accelerator"]["resourceType"] == GPU_STEP.accelerator
        assert resources["accelerator"]["resourceCount"] == placeholder(parameter)
        assert pipeline.sources(evaluation, f"pipelinechannel--{parameter}") == {("param", parameter)}
        assert pipeline.sources(evaluation, "gpus") == {("param", parameter)}
        kube = pipeline.kubernetes(evaluation)
        assert GPU_TOLERATION in kube["tolerations"] and "nodeSelector" not in kube
    assert pipeline.parameters[parameter]["defaultValue"] == "1"  # the UI's default: an svd model, sampled on a GPU


def test_cpu_steps_get_no_accelerator_and_no_gpu_toleration(compiled):
    pipeline = compiled["end-to-end"]
    for component in ("comp-plan-curation", "comp-finalize-curation", "comp-promote-candidate"):
        for task in pipeline.of(component):
            assert "accelerator" not in pipeline.resources(task)
            assert "tolerations" not in pipeline.kubernetes(task)


def test_the_i2v_finetune_is_a_gpu_step_started_from_the_last_stage_then_evaluated(compiled):
    for name in ("end-to-end", "finetune-i2v"):
        pipeline = compiled[name]
        ((in_pod, volcano),) = [p for p in pipeline.training_pairs() if p[0].startswith("finetune-model")]
        for task in (in_pod, volcano):
            assert pipeline.sources(task, "kind") == {("const", "i2v")}
        assert pipeline.resources(in_pod)["accelerator"]["resourceCount"] == placeholder("gpus_per_node")
        evaluation = pipeline.of("comp-evaluate-model")[-1]
        assert pipeline.sources(evaluation, "model_uri") == {("task", t, "model_uri") for t in (in_pod, volcano)}
    pipeline = compiled["end-to-end"]
    ((in_pod, _),) = [p for p in pipeline.training_pairs() if p[0].startswith("finetune-model")]
    stages = [t for pair in pipeline.training_pairs() for t in pair if t.startswith("train-stage")]
    stage3 = {t for t in stages if pipeline.sources(t, "stage") == {("const", "hq")}}
    assert len(stage3) == 2 and pipeline.sources(in_pod, "init_from") == {("task", t, "final") for t in stage3}


def test_the_spatial_hq_finetune_trains_on_the_image_set_and_is_evaluated_on_the_video_data(compiled):
    pipeline = compiled["finetune-spatial-hq"]
    pairs = pipeline.training_pairs()
    ((in_pod, volcano),) = pairs
    for task in (in_pod, volcano):
        assert pipeline.sources(task, "kind") == {("const", "spatial-hq")}
        assert pipeline.sources(task, "data_uri") == {("param", "data_uri")}
    assert pipeline.parameters["data_uri"]["defaultValue"] == "s3://vdm/images/high-quality/"
    (evaluation,) = pipeline.of("comp-evaluate-model")
    assert pipeline.sources(evaluation, "data_uri") == {("param", "eval_data_uri")}
    assert pipeline.sources(evaluation, "reference_uri") == {("param", "data_uri")}  # the image set
    assert pipeline.sources(evaluation, "model_uri") == {("task", t, "model_uri") for t in (in_pod, volcano)}
    assert pipeline.of("comp-promote-candidate")


def test_the_multiview_finetune_starts_from_an_image_to_video_model_on_orbits(compiled):
    pipeline = compiled["finetune-multiview"]
    ((in_pod, volcano),) = pipeline.training_pairs()
    assert pipeline.sources(in_pod, "kind") == {("const", "multiview")}
    assert pipeline.parameters["init_from"]["defaultValue"] == "models:/vdm-image-to-video@champion"
    assert pipeline.parameters["model_name"]["defaultValue"] == "vdm-multiview"


def test_every_step_reads_credentials_from_the_secret_and_endpoints_from_the_config_map(compiled):
    for name, pipeline in compiled.items():
        assert set(pipeline.platform) == set(pipeline.executors), name  # every step has Kubernetes settings
        for executor, config in pipeline.platform.items():
            secrets = {s["secretName"]: {k["envVar"] for k in s["keyToEnv"]} for s in config["secretAsEnv"]}
            assert secrets == {
                S3_SECRET: {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
                MLFLOW_SECRET: {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"},
            }
            (config_map,) = config["configMapAsEnv"]
            assert config_map["configMapName"] == PLATFORM_CONFIG_MAP
            assert "MLFLOW_TRACKING_URI" in {k["envVar"] for k in config_map["keyToEnv"]}
            assert "AWS_SECRET_ACCESS_KEY" not in str(pipeline.executors[executor]["container"].get("env", ""))
            assert "MLFLOW_TRACKING_PASSWORD" not in str(pipeline.executors[executor]["container"].get("env", ""))


@pytest.mark.parametrize("name", ["curation", "end-to-end"])
def test_curation_fans_out_over_shards_with_caching_but_lists_its_inputs_anew(compiled, name):
    pipeline = compiled[name]
    # Curation's steps run as a nested pipeline (the run folder is its parameter).
    tasks = pipeline.components["comp-curation-steps"]["dag"]["tasks"]
    assert "curation-steps" in pipeline.spec["root"]["dag"]["tasks"]
    loop = next(t for n, t in tasks.items() if n.startswith("for-loop"))
    assert loop["iteratorPolicy"] == {"parallelismLimit": 8}
    # A growing input prefix keeps its URI: a cached listing would never see the new videos.
    assert tasks["plan-curation"]["cachingOptions"] == {}
    (annotate,) = pipeline.of("comp-annotate-input-shard")
    assert pipeline.tasks[annotate][1]["cachingOptions"] == {"enableCache": True}
    assert tasks["finalize-curation"]["cachingOptions"] == {"enableCache": True}
    image = pipeline.executors["exec-plan-curation"]["container"]["image"]
    assert image.startswith("vdm-platform:") and not image.endswith(":latest")


def test_the_camera_lora_pipeline_adds_one_adapter_per_class_to_the_previous_result(compiled):
    pipeline = compiled["finetune-camera-lora"]
    pairs = pipeline.training_pairs()
    assert [pipeline.sources(a, "motion_class") for a, _ in pairs] == [
        {("const", c)} for c in ("pan", "static", "zoom_in", "zoom_out")
    ]
    assert pipeline.sources(pairs[0][0], "init_from") == {("param", "init_from")}
    for before, pair in zip(pairs[:-1], pairs[1:], strict=True):
        for task in pair:
            assert pipeline.sources(task, "init_from") == {("task", t, "final") for t in before}
    # Only the last registers: one version holding the base and every adapter.
    assert [pipeline.sources(a, "register_as") for a, _ in pairs] == [{("const", "")}] * 3 + [{("param", "model_name")}]
    for in_pod, _ in pairs:
        assert pipeline.resources(in_pod)["accelerator"]["resourceType"] == GPU_STEP.accelerator
        assert GPU_TOLERATION in pipeline.kubernetes(in_pod)["tolerations"]
    (evaluation,) = pipeline.of("comp-evaluate-model")
    assert pipeline.sources(evaluation, "model_uri") == {("task", t, "model_uri") for t in pairs[-1]}


@pytest.mark.parametrize("kind", ["interpolation", "prediction", "temporal-decoder"])
def test_a_finetune_from_its_run_form_registers_a_candidate(compiled, kind):
    pipeline = compiled[f"finetune-{kind}"]
    ((in_pod, volcano),) = pipeline.training_pairs()
    for task in (in_pod, volcano):
        assert pipeline.sources(task, "kind") == {("const", kind)}
        assert pipeline.sources(task, "init_from") == {("param", "init_from")}
        assert pipeline.sources(task, "register_as") == {("param", "model_name")}
    assert pipeline.parameters["model_name"]["defaultValue"] == FINETUNES[kind].registered_name
    (evaluation,) = pipeline.of("comp-evaluate-model")
    assert pipeline.sources(evaluation, "model_uri") == {("task", t, "model_uri") for t in (in_pod, volcano)}


@pytest.mark.parametrize("kind", sorted(FINETUNES))
def test_every_finetune_pipeline_ends_in_its_kinds_evaluation_and_the_gate(compiled, kind):
    task = FINETUNES[kind]
    pipeline = compiled[f"finetune-{kind}"]
    last = pipeline.training_pairs()[-1]
    (evaluation,) = pipeline.of("comp-evaluate-model")
    assert pipeline.sources(evaluation, "model_uri") == {("task", t, "model_uri") for t in last}
    (gate,) = pipeline.of("comp-promote-candidate")
    assert evaluation in pipeline.upstream(gate)
    # The gate takes only the version (the registered model's gate policy says what it requires) and the
    # run's id, whom the decision is recorded as.
    assert set(pipeline.tasks[gate][1]["inputs"]["parameters"]) == {"model_uri", "pipeline_run"}
    assert pipeline.sources(gate, "pipeline_run") == {("const", RUN_ID)}
    tasks = pipeline.spec["root"]["dag"]["tasks"]
    label = MODEL_LABELS.get(kind, kind)
    assert tasks[evaluation]["taskInfo"]["name"] == f"evaluate {label}"
    assert tasks[gate]["taskInfo"]["name"] == f"promotion gate {label}"
    # The run form has no gate margins: they are the model's policy.
    parameters = pipeline.parameters
    assert not {"min_improvement", "metric", "direction"} & set(parameters)
    assert parameters["model_name"]["defaultValue"] == task.registered_name


@pytest.mark.parametrize("name", ["pretraining", "end-to-end"])
def test_a_run_from_the_ui_trains_svds_size_from_sd21_and_curates_with_the_public_weights(compiled, name):
    pipeline = compiled[name]
    assert pipeline.parameters["config"]["defaultValue"] == "svd"
    init = pipeline.parameters["image_init_from"]
    assert init["defaultValue"] == "weights:sd21" and "weights:NAME" not in init["description"]
    assert "SD 2.1" in init["description"]
    if name == "end-to-end":
        curation = yaml.safe_load(pipeline.parameters["curation_config_yaml"]["defaultValue"])
        assert curation["neural"]["clip_weights"] == "weights:open-clip-vit-l-14"
        assert curation["neural"]["aesthetic_weights"] == "weights:laion-aesthetic"
        assert curation["neural"]["coca_weights"] == "weights:coca-vit-l-14"
        assert pipeline.parameters["random_weights"]["defaultValue"] is False


RUN_FORM_TYPES = {str: "STRING", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", bool: "BOOLEAN"}


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_every_parameter_has_its_declared_type_and_says_what_not_set_means(compiled, name):
    signature = inspect.signature(PIPELINES[name].pipeline_func)
    parameters = compiled[name].parameters
    assert set(parameters) == set(signature.parameters)
    for key, declared in signature.parameters.items():
        field = parameters[key]
        assert field["parameterType"] == RUN_FORM_TYPES[declared.annotation], (name, key)
        description = field["description"]
        assert len(description) > 20 and "\n" not in description, (name, key, description)
        # A form cannot leave a field unset: where 0 or "" stands for the config's value, the form says so.
        if declared.default == 0 and declared.annotation is int:
            assert "0:" in description, (name, key, description)
        if declared.default == "":
            assert "empty" in description.lower(), (name, key, description)


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_every_step_has_its_own_readable_display_name(compiled, name):
    pipeline = compiled[name]
    steps = {n: t for n, (_, t) in pipeline.tasks.items() if "executorLabel" in pipeline.components[
        t["componentRef"]["name"]]}  # fmt: skip
    shown = [t["taskInfo"]["name"] for t in steps.values()]
    assert all(" " in s for s in shown), shown  # set by the pipeline, not KFP's task key ("train-stage-3")
    assert not [s for s, count in Counter(shown).items() if count > 1], shown


def test_end_to_end_names_each_models_evaluation_and_gate(compiled):
    pipeline = compiled["end-to-end"]
    shown = {t["taskInfo"]["name"] for _, (_, t) in pipeline.tasks.items()}
    models = ("text-to-video", "image-to-video")
    assert {f"evaluate {m}" for m in models} | {f"promotion gate {m}" for m in models} <= shown
    assert {"finetune image-to-video", "train Stage III (hq)", "list and shard inputs", "annotate shard"} <= shown
    # ... and each evaluation and gate is the one of its model
    evaluations = pipeline.of("comp-evaluate-model")
    gates = pipeline.of("comp-promote-candidate")
    tasks = pipeline.spec["root"]["dag"]["tasks"]
    assert [tasks[t]["taskInfo"]["name"] for t in evaluations] == [f"evaluate {m}" for m in models]
    assert [tasks[t]["taskInfo"]["name"] for t in gates] == [f"promotion gate {m}" for m in models]
    for evaluation, gate in zip(evaluations, gates, strict=True):
        assert pipeline.sources(gate, "model_uri") == pipeline.sources(evaluation, "model_uri")


OUTPUT_ARTIFACTS = {
    "comp-finalize-curation": {"dataset": "system.Dataset", "card": "system.HTML"},
    "comp-evaluate-model": {"evaluation": "system.Metrics", "report": "system.HTML"},
    "comp-promote-candidate": {"decision": "system.Artifact", "report": "system.HTML"},
    "comp-train-stage": {"model": "system.Model"},
    "comp-finetune-model": {"model": "system.Model"},
}


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_the_card_and_reports_are_html_and_the_models_model_artifacts(compiled, name):
    pipeline = compiled[name]
    seen = set()
    for component, spec in pipeline.components.items():
        kind = next((k for k in OUTPUT_ARTIFACTS if component == k or component.startswith(f"{k}-")), None)
        if kind is None:
            continue
        artifacts = spec["outputDefinitions"]["artifacts"]
        assert {k: a["artifactType"]["schemaTitle"] for k, a in artifacts.items()} == OUTPUT_ARTIFACTS[kind]
        seen.add(kind)
    assert seen, name
    if name in ("end-to-end", "curation"):
        assert "comp-finalize-curation" in seen
    if name != "curation":
        assert "comp-evaluate-model" in seen or name == "pretraining"


RUN_OUTPUTS = {
    "curation": "output_uri",
    "pretraining": "output_uri",
    "end-to-end": "work_uri",
    **{f"finetune-{name}": "output_uri" for name in FINETUNES},
}
RUN_ID = "{{$.pipeline_job_uuid}}"  # dsl.PIPELINE_JOB_ID_PLACEHOLDER


@pytest.mark.parametrize("name", sorted(RUN_OUTPUTS))
def test_outputs_default_to_the_runs_own_folder_and_training_records_the_run(compiled, name):
    pipeline, parameter = compiled[name], RUN_OUTPUTS[name]
    assert pipeline.parameters[parameter]["defaultValue"] == ""
    assert "<run id>" in pipeline.parameters[parameter]["description"]
    folders = pipeline.of("comp-run-folder")
    assert folders
    for task in folders:
        assert pipeline.sources(task, "output_uri") == {("param", parameter)}
        assert pipeline.sources(task, "run_id") == {("const", RUN_ID)}
        assert pipeline.sources(task, "pipeline") == {("const", name)}
    folder_outputs = {("task", f, "Output") for f in folders}
    # Every step that writes takes its folder from a run-folder step: as is, or below it.
    for component in ("comp-plan-curation", "comp-annotate-input-shard", "comp-finalize-curation"):
        for task in pipeline.of(component):
            assert pipeline.sources(task, "output_uri") <= folder_outputs, task
    for pair in pipeline.training_pairs():
        for task in pair:
            assert pipeline.sources(task, "run_id") == {("const", RUN_ID)}
            ((kind, *source),) = pipeline.sources(task, "output_uri")
            owner, spec = pipeline.tasks[task]
            if kind == "const":  # an f-string below the run folder: "{{...run-folder-Output...}}/stage1"
                assert source[0].startswith("{{$.inputs.parameters['pipelinechannel--run-folder"), source
                channel = source[0].split("'")[1]
                assert pipeline._resolve(owner, spec["inputs"]["parameters"][channel]) <= folder_outputs
            else:
                assert (kind, *source) in folder_outputs


def test_the_run_folder_is_the_runs_own_unless_an_output_is_given(monkeypatch):
    from pipelines.kubeflow import run_folder

    resolve = run_folder.python_func
    monkeypatch.delenv("VDM_DATA_BUCKET", raising=False)
    assert resolve("", "pretraining", "7f3a") == "s3://vdm/runs/pretraining/7f3a"
    monkeypatch.setenv("VDM_DATA_BUCKET", "data")
    assert resolve("", "end-to-end", "7f3a", "curated") == "s3://data/runs/end-to-end/7f3a/curated"
    assert resolve("s3://b/mine/", "curation", "7f3a") == "s3://b/mine"
    with pytest.raises(ValueError, match="did not resolve the run's id"):
        resolve("", "curation", RUN_ID)


STAGE_DATA = {"image": "image_data_uri", "video": "video_data_uri", "hq": "hq_data_uri"}


def _stage_tasks(pipeline: Pipeline) -> dict[str, list[str]]:
    """Stage (image, video, hq) -> its two training variants."""
    stages: dict[str, list[str]] = {}
    for pair in pipeline.training_pairs():
        for task in pair:
            if task.startswith("train-stage"):
                ((_, stage),) = pipeline.sources(task, "stage")
                stages.setdefault(stage, []).append(task)
    return stages


def test_pretraining_takes_each_stages_data_from_its_own_parameter(compiled):
    pipeline = compiled["pretraining"]
    assert "data_uri" not in pipeline.parameters
    defaults = {name: pipeline.parameters[name]["defaultValue"] for name in STAGE_DATA.values()}
    assert defaults == {
        "image_data_uri": "s3://vdm/curated/kfp/shards/",  # frames of the filtered set lvd-f
        "video_data_uri": "s3://vdm/curated/kfp/shards/",  # lvd-f
        "hq_data_uri": "s3://vdm/curated/kfp/subsets/hq/shards/",  # the hq subset
    }
    stages = _stage_tasks(pipeline)
    assert sorted(stages) == ["hq", "image", "video"]
    for stage, tasks in stages.items():
        assert len(tasks) == 2
        for task in tasks:
            assert pipeline.sources(task, "data_uri") == {("param", STAGE_DATA[stage])}
    # The run form says which subset each stage reads.
    assert "lvd-f" in pipeline.parameters["video_data_uri"]["description"]
    assert "hq subset" in pipeline.parameters["hq_data_uri"]["description"]
    assert "frames" in pipeline.parameters["image_data_uri"]["description"]


def test_end_to_end_trains_each_stage_on_its_subset_of_the_runs_curation(compiled):
    pipeline = compiled["end-to-end"]
    assert {pipeline.parameters[name]["defaultValue"] for name in STAGE_DATA.values()} == {""}
    (resolver,) = pipeline.of("comp-stage-data")
    for stage, tasks in _stage_tasks(pipeline).items():
        for task in tasks:
            assert pipeline.sources(task, "data_uri") == {("task", resolver, stage)}
            assert resolver in pipeline.upstream(task)
    for parameter in STAGE_DATA.values():
        assert pipeline.sources(resolver, parameter) == {("param", parameter)}
    # The image-to-video finetune trains on Stage II's data, the filtered set.
    for task in pipeline.training_pairs()[-1]:
        assert task.startswith("finetune-model") and pipeline.sources(task, "data_uri") == {("task", resolver, "video")}
    # The curated output of this run: `<run folder>/curated`, written before the stages read it.
    (folder,) = [t for t in pipeline.of("comp-run-folder") if pipeline.sources(t, "subfolder") == {("const", "")}]
    channel = f"pipelinechannel--{folder}-Output"
    assert pipeline.sources(resolver, "curated_uri") == {("const", f"{{{{$.inputs.parameters['{channel}']}}}}/curated")}
    assert pipeline.sources(resolver, channel) == {("task", folder, "Output")}
    assert "curation-steps" in pipeline.upstream(resolver)
    assert pipeline.tasks[resolver][1]["taskInfo"]["name"] == "stage data"


def test_stage_data_is_the_runs_curated_subset_unless_the_run_form_names_other_data():
    from pipelines.kubeflow import stage_data

    resolve = stage_data.python_func
    assert tuple(resolve("", "", "", "s3://b/runs/end-to-end/7f3a/curated/")) == (
        "s3://b/runs/end-to-end/7f3a/curated/shards/",
        "s3://b/runs/end-to-end/7f3a/curated/shards/",
        "s3://b/runs/end-to-end/7f3a/curated/subsets/hq/shards/",
    )
    assert tuple(resolve("s3://img/", "", "s3://b/mine/hq/", "s3://b/c")) == (
        "s3://img/",
        "s3://b/c/shards/",
        "s3://b/mine/hq/",
    )
