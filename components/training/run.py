"""`vdm train`: one stage of training against the platform's services.

Data: a published dataset (an s3:// folder with a `_MANIFEST.json`, or a folder of a curated
output whose root has one) or a local folder of WebDataset shards. The shard list is the
manifest's `.tar` entries (each with its sha256), never a listing of the prefix; the loader reads
`s3://` shards through the object store's resumable reader (signed requests, retried and resumed
on short faults). Checkpoints: published under `<output>/checkpoints/step-NNNNNNNN/`, their
manifest recording the run they belong to (`run_id`: the KFP run's id; None for a CLI run);
`--resume` continues from the newest complete one of the same run, and a checkpoint of another
run only when named (`resume_from`). An output that holds checkpoints or a final model already is
refused unless this run continues there. The final UNet goes to `<output>/final/` (an
image-to-video model also to `<output>/svd/`, in StableVideoDiffusionPipeline's format). MLflow
records the config, the lineage (data, init, output; the data also as the run's dataset), the
training and validation losses (and their curve as `loss_curve.png`), and the samples (mp4s and
a `frames.png` grid per sampling step). The result goes to `result_uri` (the KFP step's: under
its attempt's own path), else `<output>/result.json`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities.model_registry import ModelVersion

from components.common.media import write_video
from components.common.objectstore import (
    MANIFEST_NAME,
    ObjectNotFoundError,
    ObjectStore,
    S3Uri,
    check_entry_sha256,
    is_s3_uri,
    register_shard_reader,
)
from components.common.settings import Settings, load_settings
from components.common.tracking import (
    DATASET_CARD,
    across_broken_exchanges,
    connect,
    log_curated_data,
    run_url,
    tracked_run,
)
from components.common.weights import is_weights_ref, resolve_weights
from components.registry.pipeline_model import download_pipeline, register_pipeline
from components.training.request import RunResult
from model.autoencoder import AutoencoderTraining, reconstruction_error, train_autoencoder
from model.conditioning import LatentCodec
from model.data import ClipDataset, ClipSpec
from model.latents import vae_fingerprint, write_latent_shards
from model.pipeline import to_uint8
from model.records import HELDOUT, RENDITIONS, SMALL, TRAIN, rendition_folder
from model.stages import StageConfig, VideoDiffusion, named_config
from model.svd import export_svd
from model.train import TrainResult, leave_distributed, train

CHECKPOINTS = "checkpoints"
RESULT = "result.json"


def training_data(data: str, store: ObjectStore) -> str:
    """Where training reads `data`: a curated output's root (its dataset card there) is read as
    its training folder, `shards/` (the README's `--data s3://…/curated/seed-0`); under the root
    are also the held-out split and the raw annotation parts. Any other location as given."""
    root = data.rstrip("/")
    if is_s3_uri(root):
        curated = store.exists(S3Uri.parse(root).join(DATASET_CARD))
    else:
        curated = (Path(root) / DATASET_CARD).is_file()
    return f"{root}/{rendition_folder(TRAIN, SMALL)}/" if curated else data


def published_shards(data: str, store: ObjectStore) -> list[dict]:
    """The `.tar` entries (`uri`, `size`, `sha256`) of the published dataset at s3:// `data`:
    from `data`'s own `_MANIFEST.json`, or from the first folder above it that has one (a curated
    output's root lists `shards/`, `heldout/`, ...), those under `data`. Never a listing: a shard
    that was not published is not read. An entry without a sha256 is refused."""
    folder = S3Uri.parse(data.rstrip("/"))
    base, inner = folder, ""
    while True:
        try:
            manifest = store.read_manifest(base)
            break
        except ObjectNotFoundError:
            if not base.key:
                raise ValueError(
                    f"{data} is not a published dataset: no {MANIFEST_NAME} in it or a folder above it "
                    "(training reads the shards a dataset's manifest lists; publish it with vdm curate or "
                    "ObjectStore.publish_folder)"
                ) from None
            head, _, last = base.key.rpartition("/")
            base, inner = S3Uri(base.bucket, head), f"{last}/{inner}"
    shards = []
    for entry in manifest["files"]:
        if entry["path"].endswith(".tar") and entry["path"].startswith(inner):
            check_entry_sha256(base, entry)
            shards.append({"uri": str(base.join(entry["path"])), "size": entry["size"], "sha256": entry["sha256"]})
    return sorted(shards, key=lambda e: e["uri"])


def shard_urls(data: str, store: ObjectStore) -> list[str]:
    """The shards of `data`: for s3://, the `s3://` URIs its published manifest lists
    (`published_shards`), which the loader reads through `store` (`register_shard_reader`: signed
    requests, retries, resumed streams); for a local folder, every .tar under it."""
    if is_s3_uri(data):
        shards = published_shards(data, store)
        # Each shard is checked against the manifest's sha256, which its own metadata cannot overrule.
        register_shard_reader(store, expected_sha256={e["uri"]: e["sha256"] for e in shards})
        urls = [e["uri"] for e in shards]
    else:
        urls = sorted(str(p) for p in Path(data).rglob("*.tar"))
    if not urls:
        raise ValueError(f"no .tar shards under {data}")
    return urls


def rendition_data(data: str, rendition: str) -> str:
    """Where a stage that reads `rendition` finds its clips: a curated output's training folder
    of another rendition (`<out>/shards/` for a stage that reads `hq`) becomes that rendition's
    (`<out>/shards-hq/`); any other location is read as given."""
    head, _, last = data.rstrip("/").rpartition("/")
    if head and last in {rendition_folder(TRAIN, name) for name in RENDITIONS}:
        return f"{head}/{rendition_folder(TRAIN, rendition)}/"
    return data


def refuse_heldout_data(data: str) -> None:
    """A ValueError when `data` is a curated output's held-out split (its `heldout/` folder)."""
    head, _, last = data.rstrip("/").rpartition("/")
    if last == HELDOUT:
        raise ValueError(
            f"{data} is the held-out split of a curated output, which training never reads (evaluation "
            f"compares generated videos with it): train on {head}/shards/"
        )


def latest_checkpoint(output: S3Uri, store: ObjectStore) -> S3Uri | None:
    """The newest checkpoint whose manifest was written (so: completely uploaded)."""
    done = [o.uri for o in store.list(output.join(CHECKPOINTS)) if o.uri.key.endswith(f"/{MANIFEST_NAME}")]
    if not done:
        return None
    newest = max(done, key=lambda u: u.key)
    return S3Uri(newest.bucket, newest.key.rsplit("/", 1)[0])


def _run_name(run_id: str | None) -> str:
    return f"run {run_id!r}" if run_id else "a run without an id (the CLI's)"


def resume_checkpoint(
    output: S3Uri, store: ObjectStore, *, run_id: str | None, resume: bool, resume_from: str | None = None
) -> S3Uri | None:
    """The checkpoint a run continues from: `resume_from` when given (any run's, named on
    purpose), else with `resume` the newest under `output` if this run (`run_id`) published it.
    A ValueError, in one line, for another run's checkpoint (naming the `resume_from` that would
    take it) or, without `resume`, for an output that holds checkpoints already."""
    if resume_from:
        named = S3Uri.parse(resume_from.rstrip("/"))
        if not store.exists(named.join(MANIFEST_NAME)):
            raise ValueError(f"resume_from {resume_from}: no published checkpoint there (no {MANIFEST_NAME})")
        return named
    newest = latest_checkpoint(output, store)
    if newest is None:
        return None
    owner = store.read_manifest(newest).get("run_id")
    if not resume:
        raise ValueError(
            f"{output} already holds checkpoints of {_run_name(owner)} (newest {newest}): train into a new "
            "output, or continue them (--resume; another run's: --resume-from)"
        )
    if owner != run_id:
        raise ValueError(
            f"{newest} belongs to {_run_name(owner)}, not this one ({_run_name(run_id)}): a run resumes only its own "
            f"checkpoints; to continue from it, name it: --resume-from {newest}"
        )
    return newest


def refuse_published_final(output: S3Uri, store: ObjectStore, run_id: str | None, resuming: S3Uri | None) -> bool:
    """Whether `<output>/final` is this run's own (a retried KFP step that published it already, or
    a CLI run that resumes: it is replaced); a ValueError when another run published it."""
    return refuse_published(output.join("final"), store, run_id, resuming)


def refuse_published(folder: S3Uri, store: ObjectStore, run_id: str | None, resuming: S3Uri | None = None) -> bool:
    """Whether the published `folder` is this run's own (see `refuse_published_final`); False
    when nothing is published there, a ValueError when another run published it."""
    try:
        owner = store.read_manifest(folder).get("run_id")
    except ObjectNotFoundError:
        return False
    if owner != run_id or (run_id is None and resuming is None):
        raise ValueError(f"{folder} is already published by {_run_name(owner)}: write into a new output")
    return True


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
            target = scratch / name / Path(S3Uri.parse(value).key).name
            return str(store.download_file(value, target, require_sha256=True))
        return str(local_folder(value, store, scratch / name))

    fields = ("vae", "text_weights", "image_weights")
    return replace(config, **{f: local(v, f) for f in fields if (v := getattr(config, f)) is not None})


def random_weights_tags(parts: tuple[str, ...]) -> dict[str, str]:
    """What the MLflow run (and so the registered version) says of random weights."""
    return {"vdm.random_weights": "true", "vdm.random_parts": ",".join(parts)} if parts else {}


class TrainingProgress:
    """What a run shows on stderr while it trains: a tqdm bar with the loss, steps/s and time
    left when stderr is a terminal, else a plain line per log step with the same; the
    validation loss as a line of its own."""

    def __init__(self, max_steps: int | None = None, terminal: bool | None = None):
        self.max_steps = max_steps
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = None
        self.previous: tuple[int, float] | None = None  # (step, time) of the last log

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        of = f"/{self.max_steps}" if self.max_steps else ""
        now = time.perf_counter()
        if self.terminal and self.bar is None:
            from tqdm import tqdm

            # Called once per log step, not per step: draw on every call.
            self.bar = tqdm(
                total=self.max_steps, initial=step, unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=0
            )
        if "val_loss" in metrics:
            self._line(f"step {step}{of}  val_loss {metrics['val_loss']:.4g}")
            self.previous = self.previous or (step, now)
            return
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "samples_per_s")}, False)
            self.bar.update(step - self.bar.n)
            if self.max_steps and step >= self.max_steps:
                self.bar.close()
            return
        parts = [f"step {step}{of}", *(f"{k} {v:.4g}" for k, v in metrics.items())]
        if self.previous is not None and now > self.previous[1] and step > self.previous[0]:
            rate = (step - self.previous[0]) / (now - self.previous[1])
            parts.append(f"{rate:.3g} steps/s")
            if self.max_steps:
                parts.append(f"eta {datetime.timedelta(seconds=round((self.max_steps - step) / rate))}")
        self.previous = step, now
        self._line("  ".join(parts))

    def _line(self, text: str) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)


def metrics_logger(progress: bool, max_steps: int | None = None, prefix: str = ""):
    """Metrics to the active MLflow run (named `<prefix><name>`: a second loop in the same run
    keeps its own curves) and, with `progress`, to the terminal (TrainingProgress)."""
    show = TrainingProgress(max_steps) if progress else None

    def on_log(step: int, metrics: dict[str, float]) -> None:
        logged = {f"{prefix}{name}": value for name, value in metrics.items()}
        across_broken_exchanges(lambda: mlflow.log_metrics(logged, step=step))
        if show:
            show(step, metrics)

    return on_log


def frame_grid(videos: list[torch.Tensor], columns: int = 8, min_side: int = 128) -> np.ndarray:
    """One picture of a sampling step: a row per video (T, 3, H, W) in [-1, 1], `columns`
    frames spread over its length, each scaled up (nearest) to at least `min_side` pixels
    on its shorter side; (rows * H', columns * W', 3) uint8."""
    rows = []
    for video in videos:
        frames = to_uint8(video).numpy()
        picked = np.linspace(0, len(frames) - 1, min(columns, len(frames))).round().astype(int)
        row = np.concatenate([frames[i] for i in picked], axis=1)
        rows.append(np.pad(row, ((0, 0), (0, (columns - len(picked)) * frames.shape[2]), (0, 0))))
    grid = np.concatenate(rows, axis=0)
    scale = max(1, -(-min_side // min(videos[0].shape[-2:])))
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def write_png(image: np.ndarray, path: Path) -> Path:
    from PIL import Image

    Image.fromarray(image).save(path)
    return path


LOSS_CURVE_SIZE = (960, 540)  # pixels of loss_curve.png


def write_loss_curve(result: TrainResult, path: Path) -> Path:
    """Training loss per step and validation loss against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = result.steps - len(result.losses) + 1  # this run's first step (after any resume)
    fig, ax = plt.subplots(figsize=(LOSS_CURVE_SIZE[0] / 100, LOSS_CURVE_SIZE[1] / 100), dpi=100)
    ax.plot(range(first, result.steps + 1), result.losses, lw=1, alpha=0.6, label="training loss (random noise levels)")
    if result.val_losses:
        steps = sorted(result.val_losses)
        ax.plot(steps, [result.val_losses[s] for s in steps], "o-", lw=2, label="validation loss (fixed noise)")
    ax.set_xlabel("step")
    ax.set_ylabel("EDM-weighted denoising loss")
    ax.set_title("training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
    run_id: str | None = None,
    resume_from: str | None = None,
    result_uri: str | None = None,
) -> RunResult:
    """Train one stage; publish checkpoints and the final folder under `output`; with
    `register_as`, register the final pipeline as a new `candidate` version of that model.
    `overrides`: config fields to replace (None values ignored), e.g. max_steps, strategy.
    `experiment`: the MLflow experiment (default vdm-train-<stage>). `run_id`: the run this is
    (recorded in its checkpoints; `resume` continues only that run's), `resume_from`: a
    checkpoint to continue from, of any run; `result_uri`: where the result goes."""
    out = S3Uri.parse(output)
    refuse_heldout_data(data)
    checkpoint = resume_checkpoint(out, store, run_id=run_id, resume=resume, resume_from=resume_from)
    replace_final = refuse_published_final(out, store, run_id, checkpoint)
    data = training_data(data, store)

    with tempfile.TemporaryDirectory(prefix="vdm-train-") as tmp:
        scratch = Path(tmp)
        named = stage_config(config_name, stage, store, scratch, overrides)
        shards = shard_urls(rendition_data(data, named.clip.rendition), store)
        named = replace(named, vae=vae) if vae else named
        config = with_local_weights(named, store, scratch / "weights")
        init = local_folder(init_from, store, scratch / "init") if init_from else None
        resume_folder = local_folder(str(checkpoint), store, scratch / "resume") if checkpoint else None

        def on_samples(step: int, videos: list) -> None:
            folder = scratch / "samples" / f"step-{step:08d}"
            folder.mkdir(parents=True)
            for i, video in enumerate(videos):
                write_video(folder / f"prompt-{i}.mp4", to_uint8(video).numpy(), config.clip.fps, deterministic=False)
            write_png(frame_grid(videos), folder / "frames.png")  # shown inline, unlike a 32-pixel mp4
            across_broken_exchanges(lambda: mlflow.log_artifacts(str(folder), f"samples/step-{step:08d}"))

        def on_checkpoint(folder: Path, step: int) -> None:
            store.publish_folder(folder, out.join(CHECKPOINTS, f"step-{step:08d}"), run_id=run_id)
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
                log_curated_data(data, store)
            result = train(
                config,
                shards,
                scratch / "work",
                init_from=init,
                resume=resume_folder,
                on_log=metrics_logger(progress, config.max_steps),
                on_checkpoint=on_checkpoint,
                on_samples=on_samples,
            )
            leave_distributed()  # the training's collectives are over; the rest is rank 0's
            if not lead:
                return RunResult(steps=result.steps, final=None, losses=result.losses)
            mlflow.set_tags(random_weights_tags(result.model.random_weights))
            if result.losses:
                mlflow.log_artifact(str(write_loss_curve(result, scratch / "loss_curve.png")))
            svd_model = result.model if result.model.task.conditioning == "image" else None
            final, version = publish_final(
                result.final, out, store, scratch, data, register_as, svd_model, run_id=run_id, replace=replace_final
            )
    summary = write_summary(
        out, store, settings, run, result.steps, final, register_as, version, checkpoint, result_uri=result_uri
    )
    return replace(summary, losses=result.losses)


def publish_final(
    folder: Path,
    out: S3Uri,
    store: ObjectStore,
    scratch: Path,
    data: str,
    register_as: str | None,
    svd_model: VideoDiffusion | None,
    *,
    run_id: str | None = None,
    replace: bool = False,
) -> tuple[str, ModelVersion | None]:
    """Publish a trained model folder as `<out>/final` (an image-to-video `svd_model` also in
    StableVideoDiffusionPipeline's format, `<out>/svd`) and, with `register_as`, register it
    as a candidate; in the active MLflow run. `replace`: this run's retry publishes them again."""
    final = out.join("final")
    store.publish_folder(folder, final, run_id=run_id, replace=replace)
    mlflow.set_tag("vdm.outputs", str(final))
    if svd_model is not None:
        svd = out.join("svd")
        store.publish_folder(export_svd(svd_model, scratch / "svd"), svd, run_id=run_id, replace=replace)
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
    result_uri: str | None = None,
) -> RunResult:
    """A training run's result, also written to `result_uri` (default `<out>/result.json`): what
    a launcher that cannot see this process (TorchX on a cluster) reads back; a KFP step gives
    each attempt its own `result_uri`, so it never reads another attempt's."""
    result = RunResult(
        steps=steps,
        final=final,
        registered=f"models:/{register_as}/{version.version}" if version else None,
        mlflow_run=run_url(run, settings),
        mlflow_run_id=run.info.run_id,
        resumed_from=str(resumed_from) if resumed_from else None,
        metrics=metrics or {},
    )
    store.put_bytes(result_uri or out.join(RESULT), result.to_json().encode())
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
    shards = shard_urls(training_data(data, store), store)
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
        vae = train_autoencoder(LatentCodec.tiny().vae, frames(), config, metrics_logger(progress, config.steps))
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
    shards = shard_urls(training_data(data, store), store)
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
