"""KFP component of promotion: the gate over the candidate's evaluation figures. A
refusal is a decision, not a failure: the step succeeds and says why, in its output's
metadata and in an HTML report the Kubeflow UI renders."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Output

from components.common.settings import load_settings

IMAGE = load_settings().image


@dsl.component(base_image=IMAGE)
def promote_candidate(
    model_uri: str, metric: str, direction: str, min_improvement: float, decision: Output[Artifact],
    report: Output[HTML],
) -> bool:  # fmt: skip
    """`model_uri` (models:/NAME/VERSION) becomes the candidate, then the gate runs on `metric`
    in `direction`, or (both empty) on the metric of the candidate's kind. `report`: the
    decision as a page."""
    from dataclasses import asdict
    from pathlib import Path

    from mlflow import MlflowClient

    from components.common.tracking import connect
    from components.registry.decision import decision_html
    from components.registry.promotion import CANDIDATE, Gate, kind_gate, promote, registered_version

    connect()
    name, version = registered_version(model_uri)
    MlflowClient().set_registered_model_alias(name, CANDIDATE, version)
    if metric and direction:
        gate = Gate(metric, direction, float(min_improvement))
    else:  # the candidate's kind's metric, direction and guard
        gate = kind_gate(name, float(min_improvement))
    result = promote(name, gate, actor="kubeflow-pipelines")
    decision.metadata.update(
        {k: v for k, v in asdict(result).items() if v is not None} | {"model": name, "metric": gate.metric}
    )
    page = decision_html(name, gate.metric, gate.direction, result.promoted, result.reason, result.candidate,
                         result.champion, result.candidate_value, result.champion_value)  # fmt: skip
    Path(report.path).write_text(page)
    report.metadata.update({"model": name, "promoted": result.promoted})
    print(("promoted: " if result.promoted else "not promoted: ") + result.reason)
    return result.promoted
