"""Every pipeline compiles with `vdm pipeline compile`, and the YAML carries what a
cluster needs where it belongs: GPU, toleration, node selector, /dev/shm and retries
on training; Secret and ConfigMap env on every step; caching on for curation, off
for training; ParallelFor's parallelism; a default for every run-form parameter."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from model.tasks import FINETUNES
from pipelines.kubeflow import PIPELINES, PLATFORM_CONFIG_MAP, S3_SECRET


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    out = tmp_path_factory.mktemp("compiled")
    result = subprocess.run(
        [sys.executable, "-m", "vdm.cli", "pipeline", "compile", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    docs = {p.stem: list(yaml.safe_load_all(p.read_text())) for p in out.glob("*.yaml")}
    return {name: (d[0], d[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]) for name, d in docs.items()}


def test_every_pipeline_compiles_with_defaults_for_every_parameter(compiled):
    assert set(compiled) == set(PIPELINES)
    for name, (spec, _) in compiled.items():
        parameters = spec["root"]["inputDefinitions"]["parameters"]
        missing = [p for p, d in parameters.items() if "defaultValue" not in d]
        assert parameters and not missing, (name, missing)


def test_training_steps_get_gpus_tolerations_shm_and_retries(compiled):
    spec, platform = compiled["end-to-end"]
    resources = spec["deploymentSpec"]["executors"]["exec-train-stage"]["container"]["resources"]
    assert (
        resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        and resources["accelerator"]["resourceCount"] == "8"
    )
    assert resources["resourceMemoryLimit"] == resources["resourceMemoryRequest"]
    train = platform["exec-train-stage"]
    assert {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"} in train["tolerations"]
    assert train["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert train["emptyDirMounts"] == [
        {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "64Gi", "volumeName": "dshm"}
    ]
    tasks = spec["root"]["dag"]["tasks"]
    for stage in ("train-stage", "train-stage-2", "train-stage-3"):
        assert tasks[stage]["cachingOptions"] == {} and tasks[stage]["retryPolicy"]["maxRetryCount"] == 2
    # CPU steps get no accelerator and no GPU toleration
    cpu = spec["deploymentSpec"]["executors"]["exec-plan-curation"]["container"]["resources"]
    assert "accelerator" not in cpu and "tolerations" not in platform["exec-plan-curation"]


def test_no_training_stage_starts_before_curation_has_written_the_shards(compiled):
    # The stages read the shards by URI (a string, no data edge): Stage I must name curation's
    # last task explicitly, or it races curation (kfp.local once ran it first: "no .tar shards").
    tasks = compiled["end-to-end"][0]["root"]["dag"]["tasks"]

    def upstream(name: str) -> set[str]:
        direct = set(tasks[name].get("dependentTasks", []))
        return direct.union(*(upstream(d) for d in direct))

    curation = next(name for name in tasks if name.startswith("finalize-curation"))
    for stage in ("train-stage", "train-stage-2", "train-stage-3"):
        assert curation in upstream(stage), (stage, upstream(stage))


def test_the_i2v_finetune_is_a_gpu_step_started_from_the_last_stage_then_evaluated(compiled):
    for name in ("end-to-end", "finetune-i2v"):
        spec, platform = compiled[name]
        tasks = spec["root"]["dag"]["tasks"]
        finetune = tasks["finetune-model"]
        assert finetune["inputs"]["parameters"]["kind"] == {"runtimeValue": {"constant": "i2v"}}
        assert finetune["cachingOptions"] == {} and finetune["retryPolicy"]["maxRetryCount"] == 2
        resources = spec["deploymentSpec"]["executors"]["exec-finetune-model"]["container"]["resources"]
        assert resources["accelerator"]["resourceCount"] == "8"
        assert {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"} in platform[
            "exec-finetune-model"
        ]["tolerations"]
        evaluation = "evaluate-model-2" if name == "end-to-end" else "evaluate-model"
        assert tasks[evaluation]["inputs"]["parameters"]["model_uri"] == {
            "taskOutputParameter": {"outputParameterKey": "model_uri", "producerTask": "finetune-model"}
        }
    tasks = compiled["end-to-end"][0]["root"]["dag"]["tasks"]
    assert tasks["finetune-model"]["inputs"]["parameters"]["init_from"] == {
        "taskOutputParameter": {"outputParameterKey": "final", "producerTask": "train-stage-3"}
    }


def test_the_spatial_hq_finetune_trains_on_the_image_set_and_is_evaluated_on_the_video_data(compiled):
    spec, platform = compiled["finetune-spatial-hq"]
    tasks = spec["root"]["dag"]["tasks"]
    finetune = tasks["finetune-model"]["inputs"]["parameters"]
    assert finetune["kind"] == {"runtimeValue": {"constant": "spatial-hq"}}
    assert finetune["data_uri"] == {"componentInputParameter": "data_uri"}
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["data_uri"]["defaultValue"] == "s3://vdm/images/high-quality/"
    assert tasks["finetune-model"]["retryPolicy"]["maxRetryCount"] == 2
    assert "nvidia.com/gpu" in str(platform["exec-finetune-model"]["tolerations"])
    evaluation = tasks["evaluate-model"]["inputs"]["parameters"]
    assert evaluation["data_uri"] == {"componentInputParameter": "eval_data_uri"}
    assert evaluation["reference_uri"] == {"componentInputParameter": "data_uri"}  # the image set
    assert evaluation["model_uri"] == {
        "taskOutputParameter": {"outputParameterKey": "model_uri", "producerTask": "finetune-model"}
    }
    assert "promote-candidate" in tasks


def test_the_multiview_finetune_is_a_gpu_step_from_an_image_to_video_model_on_orbits(compiled):
    spec, platform = compiled["finetune-multiview"]
    finetune = spec["root"]["dag"]["tasks"]["finetune-model"]
    assert finetune["inputs"]["parameters"]["kind"] == {"runtimeValue": {"constant": "multiview"}}
    assert finetune["cachingOptions"] == {} and finetune["retryPolicy"]["maxRetryCount"] == 2
    resources = spec["deploymentSpec"]["executors"]["exec-finetune-model"]["container"]["resources"]
    assert resources["accelerator"]["resourceCount"] == "8"
    assert {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"} in platform["exec-finetune-model"][
        "tolerations"
    ]
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert parameters["init_from"]["defaultValue"] == "models:/vdm-image-to-video@champion"
    assert parameters["model_name"]["defaultValue"] == "vdm-multiview"


def test_every_step_reads_credentials_from_the_secret_and_endpoints_from_the_config_map(compiled):
    for name, (spec, platform) in compiled.items():
        executors = spec["deploymentSpec"]["executors"]
        assert set(platform) == set(executors), name  # every step has Kubernetes settings
        for executor, config in platform.items():
            (secret,) = config["secretAsEnv"]
            assert secret["secretName"] == S3_SECRET
            assert {k["envVar"] for k in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
            (config_map,) = config["configMapAsEnv"]
            assert config_map["configMapName"] == PLATFORM_CONFIG_MAP
            assert "MLFLOW_TRACKING_URI" in {k["envVar"] for k in config_map["keyToEnv"]}
            assert "AWS_SECRET_ACCESS_KEY" not in str(executors[executor]["container"].get("env", ""))


def test_curation_fans_out_over_shards_with_caching(compiled):
    spec, _ = compiled["curation"]
    tasks = spec["root"]["dag"]["tasks"]
    loop = next(t for n, t in tasks.items() if n.startswith("for-loop"))
    assert loop["iteratorPolicy"] == {"parallelismLimit": 8}
    assert tasks["plan-curation"]["cachingOptions"] == {"enableCache": True}
    assert tasks["finalize-curation"]["cachingOptions"] == {"enableCache": True}
    image = spec["deploymentSpec"]["executors"]["exec-plan-curation"]["container"]["image"]
    assert image.startswith("vdm-platform:") and not image.endswith(":latest")


def test_the_temporal_decoder_finetune_is_a_gpu_step_whose_candidate_is_evaluated(compiled):
    spec, platform = compiled["finetune-temporal-decoder"]
    tasks = spec["root"]["dag"]["tasks"]
    finetune = tasks["finetune-model"]
    assert finetune["inputs"]["parameters"]["kind"] == {"runtimeValue": {"constant": "temporal-decoder"}}
    assert finetune["cachingOptions"] == {} and finetune["retryPolicy"]["maxRetryCount"] == 2
    assert "accelerator" in spec["deploymentSpec"]["executors"]["exec-finetune-model"]["container"]["resources"]
    assert tasks["evaluate-model"]["inputs"]["parameters"]["model_uri"] == {
        "taskOutputParameter": {"outputParameterKey": "model_uri", "producerTask": "finetune-model"}
    }


def test_the_camera_lora_pipeline_adds_one_adapter_per_class_to_the_previous_result(compiled):
    spec, platform = compiled["finetune-camera-lora"]
    tasks = spec["root"]["dag"]["tasks"]
    chain = ["finetune-model", "finetune-model-2", "finetune-model-3", "finetune-model-4"]
    assert sorted(tasks) == ["evaluate-model", *chain, "promote-candidate"]
    inputs = [tasks[t]["inputs"]["parameters"] for t in chain]
    assert [i["motion_class"]["runtimeValue"]["constant"] for i in inputs] == ["pan", "static", "zoom_in", "zoom_out"]
    assert inputs[0]["init_from"] == {"componentInputParameter": "init_from"}
    for before, i in zip(chain[:-1], inputs[1:], strict=True):
        assert i["init_from"] == {"taskOutputParameter": {"outputParameterKey": "final", "producerTask": before}}
    # Only the last registers: one version holding the base and every adapter.
    assert [i["register_as"] for i in inputs] == [{"runtimeValue": {"constant": ""}}] * 3 + [
        {"componentInputParameter": "model_name"}
    ]
    for task in chain:
        assert tasks[task]["retryPolicy"]["maxRetryCount"] == 2
        executor = "exec-" + task
        resources = spec["deploymentSpec"]["executors"][executor]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"} in platform[executor][
            "tolerations"
        ]


@pytest.mark.parametrize("kind", ["interpolation", "prediction"])
def test_a_masked_finetune_is_a_gpu_step_from_its_run_form_that_registers_a_candidate(compiled, kind):
    spec, platform = compiled[f"finetune-{kind}"]
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"finetune-model", "evaluate-model", "promote-candidate"}
    parameters = tasks["finetune-model"]["inputs"]["parameters"]
    assert parameters["kind"] == {"runtimeValue": {"constant": kind}}
    assert parameters["init_from"] == {"componentInputParameter": "init_from"}
    assert parameters["register_as"] == {"componentInputParameter": "model_name"}
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["model_name"]["defaultValue"] == f"vdm-{kind}"
    assert tasks["finetune-model"]["retryPolicy"]["maxRetryCount"] == 2
    resources = spec["deploymentSpec"]["executors"]["exec-finetune-model"]["container"]["resources"]
    assert resources["accelerator"]["resourceCount"] == "8"
    assert {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"} in platform["exec-finetune-model"][
        "tolerations"
    ]


@pytest.mark.parametrize("kind", sorted(FINETUNES))
def test_every_finetune_pipeline_ends_in_its_kinds_evaluation_and_the_gate(compiled, kind):
    task = FINETUNES[kind]
    spec, _ = compiled[f"finetune-{kind}"]
    tasks = spec["root"]["dag"]["tasks"]
    finetunes = sorted(t for t in tasks if t.startswith("finetune-model"))
    last = finetunes[-1]
    evaluation = tasks["evaluate-model"]
    assert evaluation["inputs"]["parameters"]["model_uri"] == {
        "taskOutputParameter": {"outputParameterKey": "model_uri", "producerTask": last}
    }
    gate = tasks["promote-candidate"]
    assert gate["dependentTasks"] == ["evaluate-model"] or "evaluate-model" in gate["dependentTasks"]
    # The gate decides on the kind's metric (empty: read from the candidate's kind).
    assert gate["inputs"]["parameters"]["metric"] == {"runtimeValue": {"constant": ""}}
    assert evaluation["taskInfo"]["name"] == f"evaluate {kind}" and gate["taskInfo"]["name"] == f"promotion gate {kind}"
    # The run form explains every parameter, and names the kind's metric.
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert all(p.get("description") for p in parameters.values()), kind
    assert task.metric.name in parameters["min_improvement"]["description"]
    assert parameters["model_name"]["defaultValue"] == task.registered_name
