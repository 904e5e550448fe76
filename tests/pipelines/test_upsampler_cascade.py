"""The cascade step (Video LDM) of the upsampler's finetune pipeline: compiled, it upsamples
the candidate it just registered on the text-to-video champion's videos, on the evaluation's
GPUs, unless the run form leaves `cascade_base` empty; run (its function, against the real
local object store), it writes each prompt's generated video and its x4 upsampling."""

from __future__ import annotations

import io
import uuid

import av
import pytest
import yaml
from kfp import compiler
from test_compile import Pipeline, placeholder

from model.stages import VideoDiffusion, named_config
from pipelines.kubeflow import PIPELINES, generate_and_upscale


def _compiled(name: str, tmp_path) -> Pipeline:
    path = tmp_path / f"{name}.yaml"
    compiler.Compiler().compile(PIPELINES[name], str(path))
    spec, platform = yaml.safe_load_all(path.read_text())
    return Pipeline(spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"])


def test_the_upsamplers_pipeline_upsamples_the_text_to_video_champions_videos_with_the_candidate(tmp_path):
    pipeline = _compiled("finetune-upsampler", tmp_path)
    assert pipeline.parameters["cascade_base"]["defaultValue"] == "models:/vdm-text-to-video@champion"
    (cascade,) = pipeline.of("comp-generate-and-upscale")
    ((in_pod, volcano),) = pipeline.training_pairs()
    assert pipeline.sources(cascade, "upsampler_uri") == {("task", t, "model_uri") for t in (in_pod, volcano)}
    assert pipeline.sources(cascade, "base_uri") == {("param", "cascade_base")}
    assert pipeline.sources(cascade, "prompts") == {("param", "cascade_prompts")}
    assert pipeline.sources(cascade, "gpus") == {("param", "eval_gpus")}
    assert pipeline.resources(cascade)["accelerator"]["resourceCount"] == placeholder("eval_gpus")
    assert pipeline.trigger(cascade) == "inputs.parameter_values['pipelinechannel--cascade_base'] != ''"
    ((kind, output),) = pipeline.sources(cascade, "output_uri")
    assert kind == "const" and output.endswith("/cascade")
    # Kinds that upsample nothing have no cascade.
    other = _compiled("finetune-i2v", tmp_path)
    assert not other.of("comp-generate-and-upscale") and "cascade_base" not in other.parameters


def _size(mp4: bytes) -> tuple[int, int, int]:
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        return sum(1 for _ in container.decode(stream)), stream.width, stream.height


def test_the_step_writes_each_prompts_video_and_its_x4_upsampling(store, tmp_path):
    base = VideoDiffusion.create(named_config("tiny", "video")).save(tmp_path / "video")
    upsampler = VideoDiffusion.create(named_config("tiny", "upsampler")).save(tmp_path / "upsampler")
    output = f"s3://vdm/test/upsampler-cascade/{uuid.uuid4().hex[:8]}"
    written = generate_and_upscale.python_func(
        base_uri=str(base), upsampler_uri=str(upsampler), prompts="a red disc | a blue disc", output_uri=output, steps=1
    )
    assert written == output
    keys = sorted(info.uri.key.rsplit("/", 1)[1] for info in store.list(output))
    assert keys == ["000-base.mp4", "000-x4.mp4", "001-base.mp4", "001-x4.mp4"]
    clip = named_config("tiny", "video").clip
    assert _size(store.get_bytes(f"{output}/001-base.mp4")) == (clip.num_frames, clip.width, clip.height)
    assert _size(store.get_bytes(f"{output}/001-x4.mp4")) == (clip.num_frames, 4 * clip.width, 4 * clip.height)
    with pytest.raises(ValueError, match="prompts: give at least one prompt"):
        generate_and_upscale.python_func(
            base_uri=str(base), upsampler_uri=str(upsampler), prompts=" | ", output_uri=output, steps=1
        )
