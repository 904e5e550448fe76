"""KFP component of evaluation: the model's kind decides what is measured (model/tasks), FVD,
CLIP score and the aesthetic score come beside it (components/evaluation/video_metrics.py);
figures into the step's Metrics (the Kubeflow UI shows them), onto the registered version
(the promotion gate reads them) and the side-by-side report as the step's HTML artifact."""

from kfp import dsl
from kfp.dsl import HTML, Metrics, Output

from components.common.settings import load_settings

IMAGE = load_settings().image


@dsl.component(base_image=IMAGE)
def evaluate_model(
    model_uri: str,
    data_uri: str,
    reference_uri: str,
    clips: int,
    steps: int,
    evaluation: Output[Metrics],
    report: Output[HTML],
    networks_yaml: str = "",
    random_networks: bool = False,
    prompts_uri: str = "",
    prompts: int = 0,
    gpus: str = "0",
) -> str:
    """Returns the evaluation's MLflow run URL. `data_uri`: held-out shards (curation's
    heldout/); `reference_uri`: a second data set the kind compares with (spatial-HQ: its
    image set), empty for the others. `networks_yaml`: the evaluation networks (YAML text,
    components/evaluation/public-weights.yaml's form); empty with `random_networks`: seeded
    random networks (the tiny demo). `prompts_uri`: the prompt set (empty: curation's beside
    the held-out data); `prompts`: how many of its prompts (0: all). `gpus`: the GPUs the
    step's pod requested; "0" hides every GPU (CUDA_VISIBLE_DEVICES="", so a CPU pod that
    lands on a GPU node leaves its GPUs alone), else the evaluation uses CUDA. `report`: the
    candidate's and the champion's videos side by side, the figures and the decision."""
    import os
    from pathlib import Path

    if not float(gpus or 0):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import yaml

    from components.common.objectstore import ObjectStore
    from components.common.settings import load_settings
    from components.evaluation.config import EvaluationNetworks
    from components.evaluation.evaluate import run_evaluation

    settings = load_settings()
    if networks_yaml.strip():
        raw = yaml.safe_load(networks_yaml) or {}
        chosen = EvaluationNetworks(**raw.get("networks", raw))
        chosen = chosen.model_copy(update={"allow_random_networks": random_networks or chosen.allow_random_networks})
    elif random_networks:
        chosen = EvaluationNetworks(allow_random_networks=True)
    else:
        raise ValueError("no evaluation networks: give networks_yaml, or random_networks for the tiny demo")
    result = run_evaluation(
        model_uri,
        data_uri,
        ObjectStore.from_settings(settings),
        settings,
        networks=chosen,
        clips=clips,
        steps=steps,
        reference=reference_uri or None,
        prompts_uri=prompts_uri or None,
        prompts=prompts or None,
    )
    for name, value in result.metrics.items():
        evaluation.log_metric(name, float(value))
    evaluation.metadata.update(
        {"kind": result.kind, "kind_metric": result.metric, "protocol": result.protocol,
         "random_networks": ",".join(result.random_networks), "report": result.report_url or ""}
    )  # fmt: skip
    Path(report.path).write_text(result.page)
    report.metadata.update({"kind": result.kind, "mlflow_run": result.mlflow_run or ""})
    return result.mlflow_run
