"""`vdm train`: one stage of training against the platform's services.

Data: an s3:// prefix (or folder) of WebDataset shards, read by the loader through
presigned URLs. Checkpoints: published under `<output>/checkpoints/step-NNNNNNNN/`
(manifest last, so a half-uploaded checkpoint is never picked up); `--resume`
continues from the newest complete one. The final UNet goes to `<output>/final/`
(an image-to-video model also to `<output>/svd/`, in StableVideoDiffusionPipeline's
format). MLflow records the config, the lineage (data, init, output) and the loss curve.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import mlflow
import torch
from mlflow.entities.model_registry import ModelVersion

from components.common.media import write_video
from components.common.objectstore import MANIFEST_NAME, ObjectStore, S3Uri, is_s3_uri
from components.common.settings import Settings, load_settings
from components.common.tracking import connect, run_url, tracked_run
from components.common.weights import is_weights_ref, resolve_weights
from components.registry.pipeline_model import download_pipeline, register_pipeline
from components.training.request import RunResult
from model.autoencoder import AutoencoderTraining, reconstruction_error, train_autoencoder
from model.conditioning import LatentCodec
from model.data import ClipDataset, ClipSpec
from model.latents import vae_fingerprint, write_latent_shards
from model.pipeline import to_uint8
from model.stages import StageConfig, VideoDiffusion, named_config
from model.svd import export_svd
from model.train import leave_distributed, train

CHECKPOINTS = "checkpoints"
RESULT = "result.json"


def shard_urls(data: str, store: ObjectStore) -> list[str]:
    """Every .tar under a folder or s3:// prefix (curation's `shards/` included), as paths or presigned URLs."""
    if is_s3_uri(data):
        urls = [store.presigned_get(o.uri) for o in store.list(data) if o.uri.key.endswith(".tar")]
    else:
        urls = sorted(str(p) for p in Path(data).rglob("*.tar"))
    if not urls:
        raise ValueError(f"no .tar shards under {data}")
    return urls


def latest_checkpoint(output: S3Uri, store: ObjectStore) -> S3Uri | None:
    """The newest checkpoint whose manifest was written (so: completely uploaded)."""
    done = [o.uri for o in store.list(output.join(CHECKPOINTS)) if o.uri.key.endswith(MANIFEST_NAME)]
    if not done:
        return None
    newest = max(done, key=lambda u: u.key)
    return S3Uri(newest.bucket, newest.key.rsplit("/", 1)[0])


def local_folder(location: str, store: ObjectStore, scratch: Path) -> Path:
    """A model folder as a local path: itself, its s3:// copy downloaded into `scratch`,
    the pipeline of a registered model (`models:/NAME@ALIAS`), or imported weights
    (`weights:NAME`, kept in the weights cache)."""
    if location.startswith("models:/"):
        connect()
        return download_pipeline(location, scratch)
    if is_weights_ref(location):
        return resolve_weights(location, store, weights_cache())
    if not is_s3_uri(location):
        return Path(location)
    store.download_folder(location, scratch)
    return scratch


def weights_cache() -> Path:
    return load_settings().home / "cache"


def config_file(config: str, store: ObjectStore, scratch: Path) -> str:
    """A config as `named_config` reads it: a shipped name or a local YAML as given, an
    s3:// YAML copied into `scratch` (a new config needs no image rebuild)."""
    if not is_s3_uri(config):
        return config
    path = scratch / Path(S3Uri.parse(config).key).name
    path.write_bytes(store.get_bytes(S3Uri.parse(config)))
    return str(path)


def stage_config(config: str, stage: str, store: ObjectStore, scratch: Path, overrides: dict | None = None):
    """The stage's config (`config_file`), with `overrides` (None values ignored) applied."""
    named = named_config(config_file(config, store, scratch), stage)
    return named.with_fields(**{k: v for k, v in (overrides or {}).items() if v is not None})


def with_local_weights(config: StageConfig, store: ObjectStore, scratch: Path) -> StageConfig:
    """The config with its weights as local copies: `weights:NAME` from the weights cache,
    an s3:// VAE folder or tower file downloaded into `scratch`."""

    def local(value: str, name: str) -> str:
        if is_s3_uri(value) and not is_weights_ref(value) and name != "vae":  # a single checkpoint file
            return str(store.download_file(value, scratch / name / Path(S3Uri.parse(value).key).name))
        return str(local_folder(value, store, scratch / name))

    fields = ("vae", "text_weights", "image_weights")
    return replace(config, **{f: local(v, f) for f in fields if (v := getattr(config, f)) is not None})


def random_weights_tags(parts: tuple[str, ...]) -> dict[str, str]:
    """What the MLflow run (and so the registered version) says of random weights."""
    return {"vdm.random_weights": "true", "vdm.random_parts": ",".join(parts)} if parts else {}


def _metrics_logger(progress: bool):
    """Metrics to the active MLflow run, and a line per log step on the terminal."""

    def on_log(step: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics(metrics, step=step)
        if progress:
            print(f"step {step:>6}  " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)

    return on_log


def run_training(
    stage: str,
    config_name: str,
    data: str,
    output: str,
    store: ObjectStore,
    settings: Settings,
    *,
    init_from: str | None = None,
    vae: str | None = None,
    overrides: dict | None = None,
    resume: bool = False,
    register_as: str | None = None,
    progress: bool = True,
    experiment: str | None = None,
) -> RunResult:
    """Train one stage; publish checkpoints and the final folder under `output`; with
    `register_as`, register the final pipeline as a new `candidate` version of that model.
    `overrides`: config fields to replace (None values ignored), e.g. max_steps, strategy.
    `experiment`: the MLflow experiment (default vdm-train-<stage>)."""
    out = S3Uri.parse(output)
    shards = shard_urls(data, store)

    with tempfile.TemporaryDirectory(prefix="vdm-train-") as tmp:
        scratch = Path(tmp)
        named = stage_config(config_name, stage, store, scratch, overrides)
        named = replace(named, vae=vae) if vae else named
        config = with_local_weights(named, store, scratch / "weights")
        init = local_folder(init_from, store, scratch / "init") if init_from else None
        checkpoint = latest_checkpoint(out, store) if resume else None
        resume_from = local_folder(str(checkpoint), store, scratch / "resume") if checkpoint else None

        def on_samples(step: int, videos: list) -> None:
            folder = scratch / "samples" / f"step-{step:08d}"
            folder.mkdir(parents=True)
            for i, video in enumerate(videos):
                write_video(folder / f"prompt-{i}.mp4", to_uint8(video).numpy(), config.clip.fps, deterministic=False)
            mlflow.log_artifacts(str(folder), f"samples/step-{step:08d}")

        def on_checkpoint(folder: Path, step: int) -> None:
            store.publish_folder(folder, out.join(CHECKPOINTS, f"step-{step:08d}"))
            shutil.rmtree(folder)  # published: the local copy is not needed

        lineage = {"data": data, "init_from": init_from or "", "vae_from": vae or "", "output": output}
        # Under torchrun every rank trains; rank 0 alone tracks, publishes and registers.
        lead = int(os.environ.get("RANK", "0")) == 0
        tracking = tracked_run(
            experiment or f"vdm-train-{stage}",
            run_name=f"{stage}-{config_name}",
            config={**named.to_dict(), **lineage},
            inputs=[data],
            settings=settings,
        )
        with tracking if lead else contextlib.nullcontext() as run:
            if lead:
                # The kind of model (model/tasks): what it is generated from and which API serves it.
                mlflow.set_tags({"vdm.resumed_from": str(checkpoint or ""), "vdm.kind": config.stage})
                if config.data == "images":  # Stage I or an image-only finetune: the lineage names its image set
                    mlflow.set_tag("vdm.image_set", data)
            result = train(
                config,
                shards,
                scratch / "work",
                init_from=init,
                resume=resume_from,
                on_log=_metrics_logger(progress),
                on_checkpoint=on_checkpoint,
                on_samples=on_samples,
            )
            leave_distributed()  # the training's collectives are over; the rest is rank 0's
            if not lead:
                return RunResult(steps=result.steps, final=None, losses=result.losses)
            mlflow.set_tags(random_weights_tags(result.model.random_weights))
            svd_model = result.model if result.model.task.conditioning == "image" else None
            final, version = publish_final(result.final, out, store, scratch, data, register_as, svd_model)
    summary = write_summary(out, store, settings, run, result.steps, final, register_as, version, checkpoint)
    return replace(summary, losses=result.losses)


def publish_final(
    folder: Path,
    out: S3Uri,
    store: ObjectStore,
    scratch: Path,
    data: str,
    register_as: str | None,
    svd_model: VideoDiffusion | None,
) -> tuple[str, ModelVersion | None]:
    """Publish a trained model folder as `<out>/final` (an image-to-video `svd_model` also in
    StableVideoDiffusionPipeline's format, `<out>/svd`) and, with `register_as`, register it
    as a candidate; in the active MLflow run."""
    final = out.join("final")
    store.publish_folder(folder, final)
    mlflow.set_tag("vdm.outputs", str(final))
    if svd_model is not None:
        svd = out.join("svd")
        store.publish_folder(export_svd(svd_model, scratch / "svd"), svd)
        mlflow.set_tag("vdm.svd_format", str(svd))
    lineage = {"vdm.data": data, "vdm.final": str(final)}
    version = register_pipeline(folder, register_as, lineage) if register_as else None
    return str(final), version


def write_summary(
    out: S3Uri,
    store: ObjectStore,
    settings: Settings,
    run,
    steps: int,
    final: str,
    register_as: str | None,
    version: ModelVersion | None,
    resumed_from: S3Uri | None,
    metrics: dict[str, float] | None = None,
) -> RunResult:
    """A training run's result, also written to `<out>/result.json`: what a launcher that
    cannot see this process (TorchX on a cluster) reads back."""
    result = RunResult(
        steps=steps,
        final=final,
        registered=f"models:/{register_as}/{version.version}" if version else None,
        mlflow_run=run_url(run, settings),
        mlflow_run_id=run.info.run_id,
        resumed_from=str(resumed_from) if resumed_from else None,
        metrics=metrics or {},
    )
    store.put_bytes(out.join(RESULT), result.to_json().encode())
    return result


def run_autoencoder_training(
    data: str,
    output: str,
    store: ObjectStore,
    settings: Settings,
    *,
    size: int = 32,
    config: AutoencoderTraining | None = None,
    progress: bool = True,
) -> dict:
    """Train the tiny frame VAE on the data's frames and publish it as a diffusers folder,
    which `vdm train --vae` (or a stage config's `vae:`) then uses, frozen."""
    config = config or AutoencoderTraining()
    shards = shard_urls(data, store)
    clips = iter(ClipDataset(shards, ClipSpec(num_frames=4, fps=8.0, height=size, width=size), seed=config.seed))

    def frames():
        while True:
            yield torch.cat([next(clips)["video"] for _ in range(config.batch_frames // 4)])

    with (
        tempfile.TemporaryDirectory(prefix="vdm-vae-") as tmp,
        tracked_run(
            "vdm-train-vae",
            run_name=f"vae-{size}",
            config={**asdict(config), "size": size, "data": data},
            inputs=[data],
            settings=settings,
        ) as run,
    ):
        vae = train_autoencoder(LatentCodec.tiny().vae, frames(), config, _metrics_logger(progress))
        error = reconstruction_error(vae, next(frames()))
        mlflow.log_metrics({"reconstruction_l1": error, "scaling_factor": vae.config.scaling_factor})
        vae.save_pretrained(Path(tmp) / "vae", safe_serialization=True)
        store.publish_folder(Path(tmp) / "vae", output)
        mlflow.set_tag("vdm.outputs", output)
    return {"output": output, "reconstruction_l1": error, "mlflow_run": run_url(run, settings)}


def run_latent_caching(
    stage: str,
    config_name: str,
    data: str,
    output: str,
    store: ObjectStore,
    settings: Settings,
    *,
    vae: str | None = None,
) -> dict:
    """Encode every clip of `data` once, at the stage's frames/fps/size, with the VAE the
    stage will train with; publish the latent shards to `output` (train on them with
    `data: latents` in the stage config)."""
    shards = shard_urls(data, store)
    with tempfile.TemporaryDirectory(prefix="vdm-latents-") as tmp:
        config = stage_config(config_name, stage, store, Path(tmp))
        codec = LatentCodec.from_folder(local_folder(vae, store, Path(tmp) / "vae")) if vae else LatentCodec.tiny()
        codec.to("cuda" if torch.cuda.is_available() else "cpu")
        clips = ClipDataset(shards, config.clip, seed=config.seed, epochs=1)
        with tracked_run(
            "vdm-cache-latents",
            run_name=f"{stage}-{config_name}",
            config={"stage": stage, "config": config_name, "data": data, "vae": vae or "", "clip": asdict(config.clip)},
            inputs=[data],
            settings=settings,
        ) as run:
            written = list(write_latent_shards(clips, codec, Path(tmp) / "latents"))
            store.publish_folder(Path(tmp) / "latents", output)
            mlflow.log_metric("shards", len(written))
            mlflow.set_tags({"vdm.outputs": output, "vdm.vae_fingerprint": vae_fingerprint(codec)})
    return {"output": output, "shards": len(written), "mlflow_run": run_url(run, settings)}
