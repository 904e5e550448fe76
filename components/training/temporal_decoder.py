"""`vdm finetune temporal-decoder`: a trained model's VAE decoder made temporal and
finetuned on clips (model/temporal_decoder.py); everything else in the model folder is
kept. Its own loop (a decoder and a discriminator, no UNet), with what `run_training`
gives a stage: data from a published dataset's shards, checkpoints under
`<output>/checkpoints/` and `--resume` (the same run's only, or `resume_from`), MLflow
tracking (`vdm-finetune-temporal-decoder`: losses, and flicker / L1 / PSNR of the image
decoder and the new one on held-out clips), the final folder at `<output>/final` (an
image-to-video model also in SVD's format at `<output>/svd`), registration as `candidate`
with lineage, and the result for KFP (`result_uri`)."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import mlflow
import torch

from components.common.objectstore import ObjectStore, S3Uri
from components.common.settings import Settings
from components.common.tracking import tracked_run
from components.training.request import RunResult
from components.training.run import (
    CHECKPOINTS,
    config_file,
    local_folder,
    metrics_logger,
    publish_final,
    refuse_published_final,
    resume_checkpoint,
    shard_urls,
    training_data,
    write_summary,
)
from model.conditioning import LatentCodec
from model.data import ClipDataset
from model.folder import ModelFolder
from model.stages import VideoDiffusion
from model.tasks import task_of
from model.temporal_decoder import (
    KIND,
    TemporalDecoderTrainer,
    decoding_metrics,
    named_config,
    temporal_vae,
    train_temporal_decoder,
)
from model.training import seed_everything

# Clips for the metrics of the decoder the model came with (`before_*`: its image decoder,
# or a temporal one being finetuned further) and the finetuned one (`after_*`), drawn in
# another order than training's; and the latent noise they are decoded at.
EVAL_CLIPS = 4
EVAL_LATENT_NOISE = (0.0, 0.1)


def _evaluate(vae, video: torch.Tensor, prefix: str) -> dict[str, float]:
    metrics = {}
    for noise in EVAL_LATENT_NOISE:
        for name, value in decoding_metrics(vae, video, latent_noise=noise).items():
            metrics[f"{prefix}_{name}_noise_{noise:g}"] = value
    return metrics


def run_temporal_decoder_finetune(
    config_name: str,
    data: str,
    output: str,
    init_from: str,
    store: ObjectStore,
    settings: Settings,
    *,
    overrides: dict | None = None,
    resume: bool = False,
    register_as: str | None = None,
    progress: bool = True,
    run_id: str | None = None,
    resume_from: str | None = None,
    result_uri: str | None = None,
) -> RunResult:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("the temporal-decoder finetune trains on one process: launch it with one rank")
    out = S3Uri.parse(output)
    checkpoint = resume_checkpoint(out, store, run_id=run_id, resume=resume, resume_from=resume_from)
    replace_final = refuse_published_final(out, store, run_id, checkpoint)
    shards = shard_urls(training_data(data, store), store)
    with tempfile.TemporaryDirectory(prefix="vdm-temporal-decoder-") as tmp:
        scratch = Path(tmp)
        config = named_config(config_file(config_name, store, scratch))
        config = replace(config, **{k: v for k, v in (overrides or {}).items() if v is not None})
        init = local_folder(init_from, store, scratch / "init")
        layout = ModelFolder(init)
        if not layout.config_file.exists() or not layout.has_vae():
            raise ValueError(f"{init_from} is not a model folder with {layout.CONFIG_FILE} and {layout.VAE}/")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        initial_vae = LatentCodec.from_folder(layout.vae).vae.to(device)
        seed_everything(config.seed)
        vae, dropped = temporal_vae(initial_vae)
        vae.to(device)
        trainer = TemporalDecoderTrainer(vae, config)
        if checkpoint:
            trainer.load(local_folder(str(checkpoint), store, scratch / "resume"))
        evaluation_clips = torch.stack(
            [c["video"] for c in itertools.islice(ClipDataset(shards, config.clip, seed=config.seed + 1), EVAL_CLIPS)]
        ).to(device)
        clips = iter(ClipDataset(shards, config.clip, seed=config.seed, start=trainer.state.data_position))

        def batches():
            while True:
                yield torch.stack([next(clips)["video"] for _ in range(config.batch_size)]).to(device)

        def on_checkpoint(step: int) -> None:
            folder = trainer.save(scratch / f"checkpoint-{step:08d}")
            store.publish_folder(folder, out.join(CHECKPOINTS, f"step-{step:08d}"), run_id=run_id)
            shutil.rmtree(folder)

        lineage = {"data": data, "init_from": init_from, "output": output}
        with tracked_run(
            f"vdm-finetune-{KIND}",
            run_name=f"{KIND}-{config_name}",
            config={**asdict(config), **lineage},
            inputs=[data],
            settings=settings,
        ) as run:
            kind = task_of(layout.kind())  # the model's, kept
            mlflow.set_tags(
                {
                    "vdm.resumed_from": str(checkpoint or ""),
                    "vdm.kind": kind.name,
                    "vdm.vae_dropped_weights": ",".join(dropped),
                }
            )
            before = _evaluate(initial_vae, evaluation_clips, "before")
            state = train_temporal_decoder(
                trainer,
                batches(),
                validation=evaluation_clips,
                on_log=metrics_logger(progress, config.max_steps),
                on_checkpoint=on_checkpoint,
            )
            after = _evaluate(vae, evaluation_clips, "after")
            mlflow.log_metrics(before | after)
            final_folder = scratch / "final"
            shutil.copytree(init, final_folder, ignore=shutil.ignore_patterns(layout.VAE))
            vae.to("cpu").save_pretrained(ModelFolder(final_folder).vae, safe_serialization=True)
            svd_model = VideoDiffusion.load(final_folder) if kind.conditioning == "image" else None
            final, version = publish_final(
                final_folder, out, store, scratch, data, register_as, svd_model, run_id=run_id, replace=replace_final
            )
    summary = write_summary(
        out, store, settings, run, state.step, final, register_as, version, checkpoint,
        metrics=before | after, result_uri=result_uri,
    )  # fmt: skip
    return replace(summary, losses=state.losses)
