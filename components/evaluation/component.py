"""KFP component of evaluation: the model's kind decides what is measured (model/tasks);
figures into the step's Metrics (the Kubeflow UI shows them), onto the registered version
(the promotion gate reads them) and into an HTML report the Kubeflow UI renders."""

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
    gpus: str = "0",
) -> str:
    """Returns the evaluation's MLflow run URL. `reference_uri`: a second data set the kind
    compares with (spatial-HQ: its image set); empty for the others. `gpus`: the GPUs the
    step's pod requested; "0" hides every GPU (CUDA_VISIBLE_DEVICES="", so a CPU pod that
    lands on a GPU node leaves its GPUs alone), else the evaluation may use CUDA. `report`:
    the figures as a page."""
    import os
    from pathlib import Path

    if not float(gpus or 0):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from components.common.objectstore import ObjectStore
    from components.common.settings import load_settings
    from components.evaluation.evaluate import run_evaluation
    from components.evaluation.report import report_html

    settings = load_settings()
    result = run_evaluation(
        model_uri,
        data_uri,
        ObjectStore.from_settings(settings),
        settings,
        clips=clips,
        steps=steps,
        reference=reference_uri or None,
    )
    for name, value in result.metrics.items():
        evaluation.log_metric(name, float(value))
    evaluation.metadata.update({"kind": result.kind, "gate_metric": result.metric})
    figures = {name: float(value) for name, value in result.metrics.items()}
    Path(report.path).write_text(
        report_html(result.kind, result.metric, result.direction, figures, result.model_version, result.mlflow_run)
    )
    report.metadata.update({"kind": result.kind, "gate_metric": result.metric, "mlflow_run": result.mlflow_run or ""})
    return result.mlflow_run
