"""KFP component of evaluation: the model's kind decides what is measured (model/tasks);
figures into the step's Metrics (the Kubeflow UI shows them) and onto the registered
version (the promotion gate reads them)."""

from kfp import dsl
from kfp.dsl import Metrics, Output

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
    gpus: str = "0",
) -> str:
    """Returns the evaluation's MLflow run URL. `reference_uri`: a second data set the kind
    compares with (spatial-HQ: its image set); empty for the others. `gpus`: the GPUs the
    step's pod requested; "0" hides every GPU (CUDA_VISIBLE_DEVICES="", so a CPU pod that
    lands on a GPU node leaves its GPUs alone), else the evaluation may use CUDA."""
    import os

    if not float(gpus or 0):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from components.common.objectstore import ObjectStore
    from components.common.settings import load_settings
    from components.evaluation.evaluate import run_evaluation

    settings = load_settings()
    report = run_evaluation(
        model_uri,
        data_uri,
        ObjectStore.from_settings(settings),
        settings,
        clips=clips,
        steps=steps,
        reference=reference_uri or None,
    )
    for name, value in report.metrics.items():
        evaluation.log_metric(name, float(value))
    evaluation.metadata.update({"kind": report.kind, "gate_metric": report.metric})
    return report.mlflow_run
