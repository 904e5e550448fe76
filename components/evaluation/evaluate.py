"""`vdm eval`: a trained model measured on held-out data, run against the platform.

What is measured: the kind's own figures (model/tasks: motion for text- and image-to-video,
in-between positions for interpolation, velocity for prediction, view retrieval for
multi-view, class accuracy for camera-motion adapters, the image-quality proxy for
spatial-HQ) and, beside them, FVD against the held-out clips, CLIP text-video similarity
on the evaluation prompt set and the aesthetic score of generated frames
(components/evaluation/video_metrics.py), with the evaluation networks of
`EvaluationNetworks`. The model comes from a folder, s3:// or the registry.

What is recorded: the figures (as metrics) and sample mp4s in an MLflow run; for a
registered model, the figures onto its version (the tags the gate reads) with the
evaluation's protocol (what must match for two versions' figures to be compared), the
networks that had random weights, and `report.html`: the candidate's and the champion's
videos on the same inputs and seeds side by side, the figure table and what the gate would
decide, linked from the version."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import json
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient

from components.common.media import write_video
from components.common.objectstore import ObjectStore, is_s3_uri
from components.common.settings import Settings
from components.common.tracking import connect, run_url, tracked_run
from components.evaluation.comparison import ComparisonPage, FigureRow, SideBySide, comparison_html
from components.evaluation.config import EvaluationNetworks
from components.evaluation.prompts import PromptSet, default_prompt_set, read_prompt_set
from components.evaluation.video_metrics import VideoScorer
from components.registry.promotion import (
    CANDIDATE,
    CHAMPION,
    Check,
    Decision,
    evaluate_gate,
    record_evaluation,
    registered_version,
)
from components.training.run import local_folder, published_shards, shard_urls, weights_cache
from model.pipeline import GenerationConfig, to_uint8
from model.stages import VideoDiffusion

REPORT = "report.html"
EVAL_REPORT_URL = "vdm.eval_report_url"
EVAL_PROTOCOL = "vdm.eval_protocol"
EVAL_RANDOM_NETWORKS = "vdm.eval_random_networks"


@dataclass(frozen=True)
class EvaluationReport:
    kind: str
    metric: str  # the kind's own headline figure, one of `metrics`
    direction: str
    metrics: dict[str, float]
    details: dict = field(default_factory=dict)
    model_version: str | None = None  # NAME/VERSION when the model is a registered one
    mlflow_run: str | None = None
    report_url: str | None = None  # report.html in the MLflow UI
    random_networks: tuple[str, ...] = ()
    protocol: str = ""
    prompt_set: str | None = None  # the prompt set's URI and version (its digest)
    promoted: bool | None = None  # what the gate would decide now (None: not a registered model)
    decision: str = ""
    page: str = ""  # the report page's HTML


def _numbers(details: dict, prefix: str = "") -> dict[str, float]:
    """The numeric figures of a details tree as flat metric names (`data_straightness`)."""
    flat = {}
    for key, value in details.items():
        if isinstance(value, dict):
            flat |= _numbers(value, f"{prefix}{key}_")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def _logged_model_id(version: tuple[str, str] | None) -> str | None:
    """The MLflow logged model behind a registered version (None: not registered, or a version
    made from a bare artifact source)."""
    if version is None:
        return None
    registered = MlflowClient().get_model_version(*version)
    # The REST API leaves `model_id` empty; the version's source names the logged model (models:/m-...).
    source = registered.source or ""
    return registered.model_id or (source.removeprefix("models:/") if source.startswith("models:/m-") else None)


def data_digest(data: str, store: ObjectStore) -> str:
    """16 hex digits naming the shards of `data` (the URIs, sizes and sha256s its published manifest lists;
    names and sizes of local files)."""
    if is_s3_uri(data):
        entries = [f"{e['uri']}:{e['size']}:{e['sha256']}" for e in published_shards(data, store)]
    else:
        entries = [f"{p.name}:{p.stat().st_size}" for p in sorted(Path(data).rglob("*.tar"))]
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


def protocol_digest(**parts) -> str:
    """16 hex digits over what makes two evaluations' figures comparable."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _prompt_set(prompts_uri: str | None, data: str, store: ObjectStore) -> PromptSet | None:
    """The given prompt set, else curation's beside the held-out data, else None (text kinds then
    generate from the held-out clips' captions... of which there are none: the empty prompt)."""
    return read_prompt_set(prompts_uri, store) if prompts_uri else default_prompt_set(data, store)


def side_by_side_videos(model: VideoDiffusion, items: list[dict], prompts: list[str] | None, steps: int) -> list:
    """One (T, H, W, 3) uint8 video per held-out item, generated as the evaluation generates (the
    kind's inputs of the item, prompt i in turn for text kinds, seed i): what the report shows."""
    task = model.task
    base = GenerationConfig.for_clip(model.config.clip, steps=steps, **task.generation_defaults(model.config))
    videos = []
    for i, item in enumerate(items):
        prompt = prompts[i % len(prompts)] if prompts else None
        inputs = task.evaluation_inputs(item, prompt)
        config = replace(base, seed=i, motion=float(item["motion"]))
        videos.append(to_uint8(task.sample(model, inputs, config).float().cpu()).numpy())
    return videos


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """On a GPU pod: bf16 autocast, as serving samples (the metrics read float32 frames back)."""
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _load(location: str, store: ObjectStore, scratch: Path, device: torch.device) -> VideoDiffusion:
    return VideoDiffusion.load(local_folder(location, store, scratch)).to(device).eval()


def run_evaluation(
    model_location: str,
    data: str,
    store: ObjectStore,
    settings: Settings,
    *,
    networks: EvaluationNetworks,
    clips: int = 8,
    steps: int = 25,
    reference: str | None = None,
    prompts_uri: str | None = None,
    prompts: int | None = None,
    report_videos: int = 4,
) -> EvaluationReport:
    """Evaluate the model at `model_location` on held-out `data` (`reference`: a second data set
    some kinds compare with, spatial-HQ's image set): `clips` generated videos, text kinds from
    the first `prompts` prompts of the prompt set (`prompts_uri`, default curation's beside
    `data`) in turn; the report shows `report_videos` of them beside the champion's."""
    connect(settings)
    version = registered_version(model_location)  # resolved first: the alias may move while we run
    prompt_set = _prompt_set(prompts_uri, data, store)
    prompt_list = list(prompt_set.first(prompts)) if prompt_set else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shards = shard_urls(data, store)
    with tempfile.TemporaryDirectory() as tmp:
        model = _load(model_location, store, Path(tmp) / "model", device)
        task = model.task
        with _autocast(device):
            evaluation = task.evaluate(
                model,
                shards,
                clips=clips,
                steps=steps,
                reference=shard_urls(reference, store) if reference else None,
                prompts=prompt_list,
            )
        figures = VideoScorer(networks, store, weights_cache()).measure(
            evaluation.samples, evaluation.references, evaluation.prompts, video=task.video
        )
        metrics = evaluation.metrics | figures.metrics
        items = list(itertools.islice(iter(task.dataset(model.config, shards, random_crop=False, heldout=True)),
                                      report_videos))  # fmt: skip
        with _autocast(device):
            candidate_videos = side_by_side_videos(model, items, prompt_list, steps)
        fps = model.config.clip.fps
        del model
        gc.collect()
        champion_version, champion_videos = _champion_videos(version, task.name, items, prompt_list, steps, store,
                                                             Path(tmp) / "champion", device)  # fmt: skip
        protocol = protocol_digest(
            kind=task.name,
            data=data_digest(data, store),
            reference=data_digest(reference, store) if reference else None,
            prompts=prompt_set.digest if prompt_set else None,
            prompt_count=prompts,
            clips=clips,
            steps=steps,
            networks=networks.weights_names(),
        )
        inputs = [model_location, data, *([reference] if reference else []), *([prompt_set.uri] if prompt_set else [])]
        config = {
            "clips": clips,
            "steps": steps,
            "kind": task.name,
            "kind_metric": task.metric.name,
            "prompts": prompts,
            "prompt_set": prompt_set.uri if prompt_set else None,
            "prompt_set_version": prompt_set.digest if prompt_set else None,
            "networks": networks.model_dump(),
            "protocol": protocol,
        }
        with tracked_run(f"vdm-eval-{task.name}", config=config, inputs=inputs, settings=settings) as run:
            details = json.loads(json.dumps(evaluation.details, default=float))  # numpy figures as plain JSON
            mlflow.log_metrics({k: v for k, v in _numbers(details).items() if k not in metrics})
            # The gate's figures also on the version's logged model: the version page lists them.
            mlflow.log_metrics(metrics, model_id=_logged_model_id(version))
            mlflow.log_dict(details, "details.json")
            mlflow.set_tags({EVAL_PROTOCOL: protocol, EVAL_RANDOM_NETWORKS: ",".join(figures.random_networks)})
            for i, video in enumerate(evaluation.samples):
                path = Path(tmp) / f"sample-{i:02d}.mp4"
                write_video(path, to_uint8(video).numpy(), fps, deterministic=False)
                mlflow.log_artifact(str(path), "samples")
            this_run = run_url(run, settings)
            report_url = f"{this_run}/artifacts/{REPORT}"
            decision = None
            if version:
                mlflow.set_tag("vdm.model_version", f"{version[0]}/{version[1]}")
                client = MlflowClient()
                for key, value in ((EVAL_PROTOCOL, protocol), (EVAL_RANDOM_NETWORKS, ",".join(figures.random_networks)),
                                   (EVAL_REPORT_URL, report_url)):  # fmt: skip
                    client.set_model_version_tag(*version, key, value)
                record_evaluation(*version, metrics, run_id=run.info.run_id, run_url=this_run)
                decision = _would_decide(*version)
            page = comparison_html(
                _page(
                    task.name,
                    version,
                    champion_version,
                    metrics,
                    decision,
                    candidate_videos,
                    champion_videos,
                    items,
                    prompt_list,
                    figures.random_networks,
                    this_run,
                    fps,
                    settings,
                )  # fmt: skip
            )
            mlflow.log_text(page, REPORT)
    return EvaluationReport(
        kind=task.name,
        metric=task.metric.name,
        direction=task.metric.direction,
        metrics=metrics,
        details=details,
        model_version=f"{version[0]}/{version[1]}" if version else None,
        mlflow_run=this_run,
        report_url=report_url,
        random_networks=figures.random_networks,
        protocol=protocol,
        prompt_set=f"{prompt_set.uri} ({prompt_set.digest})" if prompt_set else None,
        promoted=decision.promoted if decision else None,
        decision=decision.reason if decision else "",
        page=page,
    )


def _champion_videos(version: tuple[str, str] | None, kind: str, items: list[dict], prompts: list[str] | None,
                     steps: int, store: ObjectStore, scratch: Path, device: torch.device
                     ) -> tuple[str | None, list | None]:  # fmt: skip
    """The champion's version and its videos on the report's inputs and seeds, when `version` is a
    registered model with another version of the same kind as champion; else (its version or None, None)."""
    if version is None:
        return None, None
    aliases = MlflowClient().get_registered_model(version[0]).aliases
    champion = str(aliases[CHAMPION]) if CHAMPION in aliases else None
    if champion is None or champion == version[1]:
        return champion, None
    if MlflowClient().get_model_version(version[0], champion).tags.get("vdm.kind") != kind:
        return champion, None
    model = _load(f"models:/{version[0]}/{champion}", store, scratch, device)
    with _autocast(device):
        videos = side_by_side_videos(model, items, prompts, steps)
    del model
    gc.collect()
    return champion, videos


def _would_decide(name: str, version: str) -> Decision | None:
    """What the gate would decide now on `version`, moving no alias (the report's decision);
    None when another version holds `candidate` (the gate decides on that one)."""
    aliases = MlflowClient().get_registered_model(name).aliases
    if str(aliases.get(CANDIDATE)) != version:
        return None
    return evaluate_gate(name, actor="vdm eval")


def _training_run_url(name: str, version: str | None, settings: Settings) -> str | None:
    if version is None:
        return None
    run_id = MlflowClient().get_model_version(name, version).tags.get("vdm.training_run")
    return run_url(MlflowClient().get_run(run_id), settings) if run_id else None


def _page(kind, version, champion_version, metrics, decision, candidate_videos, champion_videos, items, prompts,
          random_networks, this_run, fps, settings) -> ComparisonPage:  # fmt: skip
    name = version[0] if version else None
    if decision is not None:
        rows = [_figure_row(check) for check in decision.checks]
        checked = {c.metric for c in decision.checks}
        champion_figures = decision.champion_figures
    else:
        rows, checked, champion_figures = [], set(), {}
    rows += [
        FigureRow(metric, value, champion_figures.get(metric), "")
        for metric, value in sorted(metrics.items())
        if metric not in checked
    ]
    return ComparisonPage(
        model=name,
        kind=kind,
        candidate_version=version[1] if version else None,
        champion_version=champion_version,
        candidate_training_run=_training_run_url(name, version[1], settings) if version else None,
        champion_training_run=_training_run_url(name, champion_version, settings) if name else None,
        evaluation_run=this_run,
        rows=[
            SideBySide(
                prompt=text or "",
                seed=i,
                candidate=video,
                champion=champion_videos[i] if champion_videos else None,
                label=f"held-out clip {item.get('key', i)}" + ("" if text is not None else ": from its frames"),
            )
            for i, (item, video) in enumerate(zip(items, candidate_videos, strict=True))
            for text in [_shown_prompt(kind, item, prompts[i % len(prompts)] if prompts else None)]
        ],
        figures=rows,
        decision=decision.reason if decision else _no_decision(version),
        promoted=decision.promoted if decision else None,
        policy=f"policy version {decision.policy_version}\n{decision.policy_text}" if decision else "",
        random_networks=tuple(random_networks),
        fps=fps,
    )


def _shown_prompt(kind: str, item: dict, prompt: str | None) -> str | None:
    """The text a report row's videos came from, as the kind's inputs took it; None for kinds
    that take no text (they generate from the clip's frames)."""
    from model.tasks import task_of

    return getattr(task_of(kind).evaluation_inputs(item, prompt), "prompt", None)


def _figure_row(check: Check) -> FigureRow:
    """A gate check as a row of the report's table; text values (protocols, network lists) go
    into the requirement, the table's numbers are numbers."""
    if isinstance(check.candidate, str) or isinstance(check.champion, str):
        said = f"{check.requirement} (candidate {check.candidate or '-'}, champion {check.champion or '-'})"
        return FigureRow(check.metric, None, None, check.role, said, check.passed)
    return FigureRow(check.metric, check.candidate, check.champion, check.role, check.requirement, check.passed)


def _no_decision(version: tuple[str, str] | None) -> str:
    if version is None:
        return "not a registered model: no gate decision"
    return f"v{version[1]} does not hold the alias {CANDIDATE!r}: the gate decides on the version that does"
