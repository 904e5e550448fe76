"""The models a pod serves: any number of `models:/NAME@ALIAS`, each resolved in the
MLflow registry, downloaded once per version into a cache, loaded, and swapped
atomically when its alias moves. The cache keeps the served and the previous version of
each model (the one to go back to): older versions' folders are removed after a swap.
A model's kind is its task (model/tasks): the task's `endpoint` is the API that serves
it. A request takes the current `ServedModel` once and keeps it, so requests in flight
finish on the version they started with while new ones get the new one."""

from __future__ import annotations

import functools
import logging
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from mlflow import MlflowClient

from components.common.tracking import connect
from components.registry.pipeline_model import download_pipeline
from model.camera_lora import adapter_names
from model.stages import VideoDiffusion
from model.tasks import Task
from serving.config import ModelSpec
from serving.metrics import GPU_MEMORY_BYTES, MODEL_LOAD_SECONDS, SERVED_MODEL

log = logging.getLogger(__name__)
COMPLETE = ".complete"  # written after a download finishes: a half-downloaded version is fetched again


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    alias: str
    run_id: str | None
    lineage: dict[str, str]
    pipeline: VideoDiffusion = field(repr=False)
    # The adapter in use is state of the shared UNet: a model with adapters samples one
    # request at a time (one without them runs requests side by side).
    sampling_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def task(self) -> Task:
        return self.pipeline.task

    @property
    def kind(self) -> str:
        return self.task.name

    @property
    def endpoint(self) -> str | None:
        """The API that serves this model (None: a kind not served on its own)."""
        return self.task.endpoint

    @property
    def device(self) -> torch.device:
        return next(self.pipeline.unet.parameters()).device

    def info(self, lineage: bool = True) -> dict:
        """What `model_info` says of this model; `lineage`: also its training run and lineage
        tags (git commit, run ids, data URIs), for admin keys only."""
        provenance = {"run_id": self.run_id, "lineage": self.lineage} if lineage else {}
        return {
            "name": self.name,
            "version": self.version,
            "alias": self.alias,
            "kind": self.kind,
            "endpoint": self.endpoint,
            **provenance,
            "device": str(self.device),
            # What a request gets when it sets nothing (the training data's rendition is not a request field).
            "default_clip": {k: v for k, v in asdict(self.pipeline.config.clip).items() if k != "rendition"},
            "camera_motions": self.camera_motions,
            # Parts with seeded random weights (tests and demos): its videos mean nothing.
            "random_weights": list(self.pipeline.random_weights),
        }

    @functools.cached_property  # read on every request; a loaded model's adapters do not change
    def camera_motions(self) -> list[str]:
        """The camera-motion adapters this model can sample with (`camera_motion`)."""
        return adapter_names(self.pipeline.unet)


def serving_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def record_gpu_memory() -> None:
    if torch.cuda.is_available():
        GPU_MEMORY_BYTES.labels("allocated").set(torch.cuda.memory_allocated())
        GPU_MEMORY_BYTES.labels("reserved").set(torch.cuda.memory_reserved())


def load_version(client: MlflowClient, name: str, version: str, alias: str, cache: Path) -> ServedModel:
    """One registered version, downloaded into `cache/NAME/VERSION` unless already there."""
    start = time.perf_counter()
    destination = cache / name / version
    if not (destination / COMPLETE).exists():
        destination.mkdir(parents=True, exist_ok=True)
        folder = download_pipeline(f"models:/{name}/{version}", destination)
        (destination / COMPLETE).write_text(str(folder.relative_to(destination)))
    folder = destination / (destination / COMPLETE).read_text()
    pipeline = VideoDiffusion.load(folder).to(serving_device()).eval()
    details = client.get_model_version(name, version)
    lineage = {k: v for k, v in details.tags.items() if k.startswith("vdm.")}
    MODEL_LOAD_SECONDS.labels(name).observe(time.perf_counter() - start)
    record_gpu_memory()
    return ServedModel(name, version, alias, details.run_id, lineage, pipeline)


def prune_cache(folder: Path, keep: set[str]) -> list[str]:
    """Remove the version folders of one model's cache but `keep`; the removed versions.
    Requests in flight on a removed version go on: its weights are in memory."""
    removed = []
    for version in sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        if version not in keep:
            shutil.rmtree(folder / version, ignore_errors=True)
            removed.append(version)
    if removed:
        log.info("removed %s versions %s from the model cache (kept %s)", folder.name, removed, sorted(keep))
    return removed


class UnknownKind(LookupError):
    """No served model answers the endpoint (HTTP 404)."""


class WrongModel(ValueError):
    """The model a request names is not served here, or is of another kind (HTTP 400)."""


class LiveModels:
    """The current version of each configured model, kept in step with its alias."""

    def __init__(self, specs: tuple[ModelSpec, ...], cache: Path):
        if not specs:
            raise ValueError("no model to serve: set VDM_SERVE_MODELS (or `vdm serve --model NAME`)")
        self.specs, self.cache = specs, cache
        self._by_name: dict[str, ServedModel] = {}
        self._lock = threading.Lock()  # one refresh at a time; readers never wait on it

    @property
    def ready(self) -> bool:
        return len(self._by_name) == len(self.specs)

    def _loaded(self) -> str:
        return ", ".join(f"{m.name} v{m.version} ({m.kind})" for m in self.all()) or "none yet"

    def get(self, endpoint: str, name: str | None = None) -> ServedModel:
        """The model `name` if it serves `endpoint` (else WrongModel); without a name the
        endpoint's default, the first configured model that serves it (else UnknownKind)."""
        by_name = self._by_name  # one snapshot: a swap mid-lookup does not mix versions
        if name is not None:
            served = by_name.get(name)
            if served is None:
                raise WrongModel(f"model: {name!r} is not served here (served: {self._loaded()})")
            if served.endpoint != endpoint:
                answered = f"the {served.endpoint} endpoint" if served.endpoint else "no endpoint"
                raise WrongModel(f"model: {name} is a {served.kind!r} model, served by {answered}, not {endpoint}")
            return served
        for spec in self.specs:
            served = by_name.get(spec.name)
            if served is not None and served.endpoint == endpoint:
                return served
        raise UnknownKind(f"no model for the {endpoint} endpoint is served here (loaded: {self._loaded()})")

    def all(self) -> list[ServedModel]:
        """The loaded models in configured order."""
        by_name = self._by_name
        return [by_name[spec.name] for spec in self.specs if spec.name in by_name]

    def refresh(self) -> list[str]:
        """Load the version each alias points at where it moved; returns what changed."""
        with self._lock:
            connect()
            client = MlflowClient()
            changes = []
            for spec in self.specs:
                name, alias = spec.name, spec.alias
                version = client.get_model_version_by_alias(name, alias).version
                current = self._by_name.get(name)
                if current and current.version == version:
                    continue
                served = load_version(client, name, version, alias, self.cache)
                self._by_name = {**self._by_name, name: served}  # one assignment: readers see old or new
                if current:
                    SERVED_MODEL.labels(name, current.version, alias, current.kind, current.endpoint or "").set(0)
                SERVED_MODEL.labels(name, version, alias, served.kind, served.endpoint or "").set(1)
                if current:
                    prune_cache(self.cache / name, keep={version, current.version})
                changes.append(f"{spec}: v{current.version if current else '-'} -> v{version}")
                log.info(
                    "serving %s v%s (%s, endpoint %s) on %s", name, version, served.kind, served.endpoint, served.device
                )
            return changes

    def poll(self, every: float, stop: threading.Event) -> None:
        """Refresh every `every` seconds until `stop`; a failed check keeps the current models."""
        while not stop.wait(every):
            try:
                self.refresh()
            except Exception:
                log.exception("checking %s for a moved alias failed; still serving what is loaded", self.specs)
