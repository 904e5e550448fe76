"""KFP component of the motion evaluation: figures into the step's Metrics (the
Kubeflow UI shows them) and onto the registered version (the promotion gate reads them)."""

from kfp import dsl
from kfp.dsl import Metrics, Output

from components.common.settings import load_settings

IMAGE = load_settings().image


@dsl.component(base_image=IMAGE)
def evaluate_motion(model_uri: str, data_uri: str, clips: int, steps: int, evaluation: Output[Metrics]) -> str:
    """Returns the evaluation's MLflow run URL."""
    from components.common.objectstore import ObjectStore
    from components.common.settings import load_settings
    from components.evaluation.motion import run_motion_evaluation

    settings = load_settings()
    report = run_motion_evaluation(
        model_uri, data_uri, ObjectStore.from_settings(settings), settings, clips=clips, steps=steps
    )
    for name, value in {**report["gate_metrics"], **{f"data_{k}": v for k, v in report["data"].items()}}.items():
        evaluation.log_metric(name, float(value))
    return report["mlflow_run"]
