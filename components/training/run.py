"""`vdm train`: one stage of training against the platform's services.

Data: an s3:// prefix (or folder) of WebDataset shards, read by the loader through
presigned URLs. Checkpoints: published under `<output>/checkpoints/step-NNNNNNNN/`
(manifest last, so a half-uploaded checkpoint is never picked up); `--resume`
continues from the newest complete one. The final UNet goes to `<output>/final/`.
MLflow records the config, the lineage (data, init, output) and the loss curve.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import mlflow

from components.common.objectstore import MANIFEST_NAME, ObjectStore, S3Uri, is_s3_uri
from components.common.settings import Settings
from components.common.tracking import run_url, tracked_run
from model.stages import Stage, named_config
from model.train import train

CHECKPOINTS = "checkpoints"


def shard_urls(data: str, store: ObjectStore) -> list[str]:
    """Every .tar under a folder or s3:// prefix (curation's `shards/` included), as paths or presigned URLs."""
    if is_s3_uri(data):
        return [store.presigned_get(o.uri) for o in store.list(data) if o.uri.key.endswith(".tar")]
    return sorted(str(p) for p in Path(data).rglob("*.tar"))


def latest_checkpoint(output: S3Uri, store: ObjectStore) -> S3Uri | None:
    """The newest checkpoint whose manifest was written (so: completely uploaded)."""
    done = [o.uri for o in store.list(output.join(CHECKPOINTS)) if o.uri.key.endswith(MANIFEST_NAME)]
    if not done:
        return None
    newest = max(done, key=lambda u: u.key)
    return S3Uri(newest.bucket, newest.key.rsplit("/", 1)[0])


def local_folder(location: str, store: ObjectStore, scratch: Path) -> Path:
    """A folder as a local path: itself, or its s3:// copy downloaded into `scratch`."""
    if not is_s3_uri(location):
        return Path(location)
    store.download_folder(location, scratch)
    return scratch


def run_training(
    stage: Stage,
    config_name: str,
    data: str,
    output: str,
    store: ObjectStore,
    settings: Settings,
    *,
    init_from: str | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    config = named_config(config_name, stage)
    if max_steps is not None:
        config = replace(config, max_steps=max_steps)
    out = S3Uri.parse(output)
    shards = shard_urls(data, store)
    if not shards:
        raise ValueError(f"no .tar shards under {data}")

    with tempfile.TemporaryDirectory(prefix="vdm-train-") as tmp:
        scratch = Path(tmp)
        init = local_folder(init_from, store, scratch / "init") if init_from else None
        checkpoint = latest_checkpoint(out, store) if resume else None
        resume_from = local_folder(str(checkpoint), store, scratch / "resume") if checkpoint else None

        def on_log(step: int, metrics: dict[str, float]) -> None:
            mlflow.log_metrics(metrics, step=step)
            if progress:
                print(f"step {step:>6}  " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)

        def on_checkpoint(folder: Path, step: int) -> None:
            store.publish_folder(folder, out.join(CHECKPOINTS, f"step-{step:08d}"))
            shutil.rmtree(folder)  # published: the local copy is not needed

        lineage = {"data": data, "init_from": init_from or "", "output": output}
        with tracked_run(
            f"vdm-train-{stage}",
            run_name=f"{stage}-{config_name}",
            config={**asdict(config), **lineage},
            inputs=[data],
            settings=settings,
        ) as run:
            mlflow.set_tag("vdm.resumed_from", str(checkpoint or ""))
            result = train(
                config,
                shards,
                scratch / "work",
                init_from=init,
                resume=resume_from,
                on_log=on_log,
                on_checkpoint=on_checkpoint,
            )
            final = out.join("final")
            store.publish_folder(result.final, final)
            mlflow.set_tag("vdm.outputs", str(final))
    return {
        "steps": result.steps,
        "final": str(final),
        "losses": result.losses,
        "mlflow_run": run_url(run, settings),
        "resumed_from": str(checkpoint) if resume_from else None,
    }
