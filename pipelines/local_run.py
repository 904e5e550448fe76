"""`vdm run`: the end-to-end pipeline through `kfp.local` (SubprocessRunner, this
environment) against the local stack, on tiny configs.

kfp.local is verbose (every executor's log); the full log goes to
`$VDM_HOME/runs/<run>.log` while the terminal gets one line per step. The summary is
read back from what the steps published, not from kfp.local's return value: the
dataset card, each stage's and the image-to-video finetune's `result.json` (its attempt's,
under `attempts/`), the registry.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mlflow import MlflowClient

from components.common.objectstore import ObjectStore, S3Uri
from components.common.settings import Settings
from components.common.tracking import connect
from components.curation.tracking import EXPERIMENT as CURATION_EXPERIMENT
from components.curation.tracking import TAG_OUTPUT
from components.registry.promotion import CANDIDATE, CHAMPION, recorded_decision
from components.training.request import RunResult
from components.training.run import RESULT

STAGES = ("stage1", "stage2", "stage3")
# This machine, not a GPU node: every step on the CPU, training as one rank in the step's process tree,
# the tiny models from scratch on random weights (none ship with the project), a CPU-sized evaluation.
LOCAL_PARAMETERS = {
    "scheduler": "local_cwd",
    "nodes": 1,
    "gpus_per_node": "0",
    "annotate_gpus": "0",
    "eval_gpus": "0",
    "config": "tiny",
    "image_init_from": "",
    # 3 of the sample data's 11 videos held out (curation's split is by video): clips to evaluate on.
    "curation_config_yaml": "output: {heldout_fraction: 0.1}",
    "random_weights": True,
    "eval_clips": 4,
    "eval_steps": 12,
    # Random evaluation networks, the tiny open_clip: the demo policy allows them, its figures mean nothing.
    "eval_networks_yaml": "tiny: true",
    "random_networks": True,
}
_TASK_LINE = re.compile(r"Task '([\w-]+)' finished with status (\w+)")  # kfp.local's, colours stripped
_ANSI = re.compile(r"\x1b\[[\d;]*m")


@contextlib.contextmanager
def _output_to(log_file: Path) -> Iterator[None]:
    """Send this process's stdout/stderr (and its children's) to `log_file`; report
    each step's end on the terminal (the original stderr) while it runs."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    sys.stdout.reconfigure(line_buffering=True)  # kfp.local logs step ends here: see them as they happen
    terminal = open(os.dup(saved[1]), "w", buffering=1)  # noqa: SIM115 (closed in `finally`)

    def progress(line: str) -> None:
        terminal.write(line + "\n")

    with open(log_file, "ab") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
    done = threading.Event()
    start = time.perf_counter()

    def follow() -> None:
        with open(log_file, errors="replace") as f:
            while not done.is_set() or f.tell() < os.path.getsize(log_file):
                line = f.readline()
                if not line:
                    time.sleep(0.2)
                    continue
                match = _TASK_LINE.search(_ANSI.sub("", line))
                if match:
                    progress(f"[{time.perf_counter() - start:6.0f} s] {match.group(1):<28} {match.group(2)}")

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        done.set()
        thread.join(timeout=5)
        terminal.close()


def run_end_to_end(
    settings: Settings,
    input_uri: str,
    work_uri: str,
    *,
    model_name: str = "vdm-text-to-video",
    i2v_model_name: str = "vdm-image-to-video",
    params: dict | None = None,
    progress: Callable[[str], None] = print,
) -> dict:
    import kfp.local

    from pipelines.kubeflow import end_to_end

    home = Path(settings.home)
    (home / "runs").mkdir(parents=True, exist_ok=True)
    name = f"end-to-end-{time.strftime('%Y%m%d-%H%M%S')}"
    log_file = home / "runs" / f"{name}.log"
    progress(f"vdm run: {name}; full log {log_file}")
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(home / "kfp"))
    started = time.perf_counter()
    arguments = {
        "input_uri": input_uri,
        "work_uri": work_uri,
        "model_name": model_name,
        "i2v_model_name": i2v_model_name,
        **LOCAL_PARAMETERS,
        **(params or {}),
    }
    with _output_to(log_file):
        end_to_end(**arguments)
    return summarize(settings, work_uri, model_name, i2v_model_name, time.perf_counter() - started, log_file)


def _registered(client: MlflowClient, result: RunResult, name: str) -> tuple[dict, str | None]:
    """A trained step's registered version (name, version, aliases, the gate's decision and why,
    on which policy version) and its evaluation run."""
    version = client.get_model_version(name, result.registered.rsplit("/", 1)[1])  # models:/NAME/VERSION
    decision = recorded_decision(version.tags)  # the gate step's, on the version
    if decision is None:
        promotion = "not decided: the promotion gate did not run on this version"
    else:
        verdict = "promoted" if decision.promoted else "not promoted"
        policy = f"gate policy v{decision.policy_version}" if decision.policy_version else "a given gate policy"
        promotion = f"{verdict} ({policy}): {decision.reason}"
    summary = {"name": name, "version": version.version, "aliases": sorted(version.aliases), "promotion": promotion}
    return summary, version.tags.get("vdm.eval_run")


def _curation_run(client: MlflowClient, output: S3Uri) -> str | None:
    """The latest curation run that wrote `output` (None if there is none)."""
    experiment = client.get_experiment_by_name(CURATION_EXPERIMENT)
    if experiment is None:
        return None
    found = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{TAG_OUTPUT}` = '{output}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0].info.run_id if found else None


def _step_result(store: ObjectStore, output: S3Uri) -> RunResult:
    """The result of the training step that wrote `output` (this run's own folder): the one its
    last successful attempt wrote under `attempts/<attempt id>/`."""
    written = [o for o in store.list(output.join("attempts")) if o.uri.key.endswith(f"/{RESULT}")]
    if not written:
        raise ValueError(f"{output}: no training result under attempts/ (the step did not finish)")
    return RunResult.from_json(store.get_bytes(max(written, key=lambda o: o.last_modified).uri))


def summarize(
    settings: Settings,
    work_uri: str,
    model_name: str,
    i2v_model_name: str,
    seconds: float,
    log_file: Path,
) -> dict:
    store = ObjectStore.from_settings(settings)
    work = S3Uri.parse(work_uri)
    results = {s: _step_result(store, work.join("train", s)) for s in (*STAGES, "i2v")}
    connect(settings)
    client = MlflowClient()
    text, text_eval = _registered(client, results["stage3"], model_name)
    image, image_eval = _registered(client, results["i2v"], i2v_model_name)
    # One alias per service: the champions once both models have one (whichever versions), else the candidates.
    has_champion = all(CHAMPION in client.get_registered_model(n).aliases for n in (model_name, i2v_model_name))
    alias = CHAMPION if has_champion else CANDIDATE
    runs = {f"train_{s}": results[s].mlflow_run_id for s in STAGES} | {"finetune_i2v": results["i2v"].mlflow_run_id}
    runs |= {k: v for k, v in (("evaluate", text_eval), ("evaluate_i2v", image_eval)) if v}
    if curation := _curation_run(client, work.join("curated")):
        runs["curation"] = curation
    return {
        "dataset_card_uri": str(work.join("curated", "dataset_card.html")),
        "dataset_shards": str(work.join("curated", "shards")) + "/",
        "hq_shards": str(work.join("curated", "subsets", "hq", "shards")) + "/",  # Stage III's data
        "mlflow_run_ids": runs,
        "mlflow_runs": {s: results[s].mlflow_run for s in (*STAGES, "i2v")},
        "registered_model": {k: text[k] for k in ("name", "version", "aliases")},
        "promotion": text["promotion"],
        "image_to_video_model": image,
        "serve_command": f"vdm serve --model models:/{model_name}@{alias} --model models:/{i2v_model_name}@{alias}",
        "seconds": round(seconds, 1),
        "log": str(log_file),
    }
