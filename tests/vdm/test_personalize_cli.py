"""`vdm personalize` end to end on tiny models against the local stack: a registered
text-to-video model whose weights are the DreamBooth image model's (spatial) and the video
model's (temporal), that `vdm sample` generates from; bad input as one `error:` line with
nothing published."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient
from PIL import Image

from components.sample_data.shards import write_shapes_shards
from model.networks import UNetConfig, is_temporal, video_key, video_unet
from model.stages import VideoDiffusion, named_config
from vdm.cli import main


def _vdm(*args: str):
    return CliRunner().invoke(main, list(args))


def _assert_one_error_line(result, *expected: str) -> None:
    assert result.exit_code == 1, (result.exit_code, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Stage I model and a tiny video model (its temporal layers moved off the identity)."""
    root = tmp_path_factory.mktemp("personalize-models")
    torch.manual_seed(0)
    image = VideoDiffusion.create(named_config("tiny", "image")).save(root / "image")
    video = VideoDiffusion.create(named_config("tiny", "video"))
    with torch.no_grad():
        for name, p in video.unet.named_parameters():
            if is_temporal(name):
                p.add_(torch.randn_like(p) * 0.01)
    return image, video.save(root / "video")


def _subject_images(folder: Path, count: int) -> Path:
    folder.mkdir()
    checks = ((np.arange(40)[:, None] // 8 + np.arange(40)[None] // 8) % 2).astype(bool)
    for i in range(count):
        rgb = np.where(checks[..., None], [255, 0, 200], [20, 20, 20]).astype(np.uint8)
        Image.fromarray(np.roll(rgb, i, axis=1)).save(folder / f"subject-{i}.png")
    return folder


def _args(images: Path, models: tuple[Path, Path], output: str, *extra: str) -> list[str]:
    return [
        "personalize", "--images", str(images), "--image-model", str(models[0]), "--video-model", str(models[1]),
        "--output", output, "--max-steps", "2", "--class-images", "2", *extra,
    ]  # fmt: skip


def test_personalize_registers_a_text_to_video_model_that_generates(stack, store, prefix, models, tmp_path):
    images = _subject_images(tmp_path / "subject", 3)
    result = _vdm(*_args(images, models, prefix, "--token", "sks", "--class-noun", "disc"))
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert "registered  models:/vdm-personalized/1 (alias candidate)" in result.stdout
    assert "prompt      a sks disc" in result.stdout

    client = MlflowClient()
    version = client.get_model_version_by_alias("vdm-personalized", "candidate")
    assert version.tags["vdm.kind"] == "video"  # the text_to_video endpoint serves it
    assert version.tags["vdm.personalized_token"] == "sks" and version.tags["vdm.subject_prompt"] == "a sks disc"
    run = client.get_run(version.run_id)
    assert run.data.metrics["class_images"] == 2 and "prior_loss" in run.data.metrics

    from components.registry.pipeline_model import download_pipeline

    served = VideoDiffusion.load(download_pipeline("models:/vdm-personalized@candidate", tmp_path / "served"))
    assert served.task.endpoint == "text_to_video"
    store.download_folder(f"{prefix}/image", tmp_path / "dreambooth")
    tuned = VideoDiffusion.load(tmp_path / "dreambooth")
    video = VideoDiffusion.load(models[1])
    weights, base = served.unet.state_dict(), VideoDiffusion.load(models[0]).unet.state_dict()
    assert any(not torch.equal(v, base[k]) for k, v in tuned.unet.state_dict().items())  # DreamBooth trained
    for name, value in tuned.unet.state_dict().items():
        assert torch.equal(weights[video_key(name)], value), name
    for name, value in video.unet.state_dict().items():
        if is_temporal(name):
            assert torch.equal(weights[name], value), name

    mp4 = tmp_path / "sks.mp4"
    sampled = _vdm("sample", "--model", "models:/vdm-personalized@candidate", "--prompt", "a sks disc",
                   "--frames", "2", "--sample-steps", "2", "--output", str(mp4))  # fmt: skip
    assert sampled.exit_code == 0, sampled.stderr
    assert mp4.stat().st_size > 0


def test_realignment_trains_only_the_temporal_layers_on_the_data_and_the_subjects_stills(
    stack, store, prefix, models, tmp_path
):
    data = tmp_path / "data"
    write_shapes_shards(data, shards=1, clips_per_shard=4, num_frames=12, fps=8.0, height=32, width=32)
    images = _subject_images(tmp_path / "subject", 3)
    realign = ("--realign-data", str(data), "--realign-steps", "3", "--realign-stills", "1")
    subject = ("--token", "sks", "--class-noun", "disc", "--register-as", "vdm-realigned")
    result = _vdm(*_args(images, models, prefix, *subject, *realign))
    assert result.exit_code == 0, (result.stderr, result.exception)

    client = MlflowClient()
    run = client.get_run(client.get_model_version_by_alias("vdm-realigned", "candidate").run_id)
    assert run.data.metrics["realign_still_clips"] == 3
    assert [m.step for m in client.get_metric_history(run.info.run_id, "realign_loss")][-1] == 3
    assert run.data.params["realign_steps"] == "3" and run.data.params["realign_data"] == str(data)
    store.download_folder(f"{prefix}/final", tmp_path / "final")
    store.download_folder(f"{prefix}/image", tmp_path / "dreambooth")
    weights = VideoDiffusion.load(tmp_path / "final").unet.state_dict()
    for name, value in VideoDiffusion.load(tmp_path / "dreambooth").unet.state_dict().items():
        assert torch.equal(weights[video_key(name)], value), name  # the spatial layers stay DreamBooth's
    video = VideoDiffusion.load(models[1]).unet.state_dict()
    temporal = [name for name in video if is_temporal(name)]
    moved = [name for name in temporal if not torch.equal(weights[name], video[name])]
    assert len(moved) > len(temporal) // 2  # trained from the video model's


@pytest.mark.parametrize(
    ("count", "extra", "message"),
    [
        (2, ("--token", "sks", "--class-noun", "disc"), "images: 2 subject images; DreamBooth takes 3 to 8"),
        (9, ("--token", "sks", "--class-noun", "disc"), "images: 9 subject images"),
        (3, ("--class-noun", "disc"), "token: give the subject's identifier"),
        (3, ("--token", "sks"), "class noun: say what the subject is"),
        (3, ("--token", "sks", "--class-noun", "disc", "--realign-steps", "2"), "realign data: realignment trains on"),
        (
            3,
            ("--token", "sks", "--class-noun", "disc", "--realign-steps", "2", "--realign-data", "/nonexistent"),
            "no .tar shards under /nonexistent",
        ),
    ],
)
def test_bad_input_is_one_error_line_and_nothing_is_published(stack, store, prefix, models, tmp_path, count, extra,
                                                              message):  # fmt: skip
    result = _vdm(*_args(_subject_images(tmp_path / "subject", count), models, prefix, *extra))
    _assert_one_error_line(result, message)
    assert not list(store.list(prefix))


def test_a_video_model_of_another_spatial_architecture_is_one_error_line(stack, store, prefix, models, tmp_path):
    layout = UNetConfig(block_out_channels=(32, 32), attention_heads=(2, 2), layers_per_block=1, cross_attention_dim=64)
    other = VideoDiffusion(named_config("tiny", "video"), video_unet(layout)).save(tmp_path / "other")
    images = _subject_images(tmp_path / "subject", 3)
    result = _vdm(*_args(images, (models[0], other), prefix, "--token", "sks", "--class-noun", "disc"))
    _assert_one_error_line(result, "video model: its spatial architecture does not match", "channels (32, 32)")
    assert not list(store.list(prefix))


def test_the_personalize_pipeline_evaluates_and_gates_the_version_it_registers(tmp_path):
    import subprocess
    import sys

    import yaml

    # In a fresh process: kfp inspects the call stack per step, which is slow with torch's modules loaded.
    code = "import sys; from kfp import compiler; from pipelines.kubeflow import PIPELINES as P; " \
           "compiler.Compiler().compile(P['personalize'], sys.argv[1])"  # fmt: skip
    path = tmp_path / "personalize.yaml"
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=300, cwd=Path(__file__).parents[2])
    spec, platform = yaml.safe_load_all(path.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    step = tasks["personalize-subject"]
    assert step["taskInfo"]["name"] == "personalize text-to-video"
    inputs = step["inputs"]["parameters"]
    assert inputs["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    assert inputs["output_uri"]["taskOutputParameter"]["producerTask"] == "run-folder"
    assert inputs["register_as"]["componentInputParameter"] == "model_name"
    for name in ("realign_data_uri", "realign_steps", "realign_stills"):
        assert inputs[name]["componentInputParameter"] == name
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["realign_steps"]["defaultValue"] == 0 and "realign_data_uri" in defaults
    for consumer in ("evaluate-model", "promote-candidate"):
        model_uri = tasks[consumer]["inputs"]["parameters"]["model_uri"]["taskOutputParameter"]
        assert model_uri == {"outputParameterKey": "model_uri", "producerTask": "personalize-subject"}
    resources = spec["deploymentSpec"]["executors"]["exec-personalize-subject"]["container"]["resources"]
    assert "accelerator" in resources  # a GPU step
    assert spec["root"]["inputDefinitions"]["parameters"]["model_name"]["defaultValue"] == "vdm-personalized"
    kube = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-personalize-subject"]
    assert kube["secretAsEnv"] and kube["configMapAsEnv"]
