"""KFP component of promotion: the gate over the candidate's evaluation figures, on the
registered model's gate policy. A refusal is a decision, not a failure: the step succeeds
and says why, with every check, in its output's metadata and in an HTML report the
Kubeflow UI renders."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Output

from components.common.settings import load_settings

IMAGE = load_settings().image


@dsl.component(base_image=IMAGE)
def promote_candidate(model_uri: str, pipeline_run: str, decision: Output[Artifact], report: Output[HTML]) -> bool:
    """`model_uri` (models:/NAME/VERSION) becomes the candidate, then the gate runs on the
    model's policy (a model without one gets its kind's default, stored), recorded as decided
    by `pipeline_run` (the run's id). `report`: the decision as a page."""
    from pathlib import Path

    from mlflow import MlflowClient

    from components.common.tracking import connect
    from components.registry.actor import pipeline_actor
    from components.registry.decision import decision_html, decision_metadata
    from components.registry.promotion import CANDIDATE, promote, registered_version

    connect()
    name, version = registered_version(model_uri)
    MlflowClient().set_registered_model_alias(name, CANDIDATE, version)
    # The version given, not the alias read back: a concurrent run may have moved `candidate`.
    result = promote(name, version=version, actor=pipeline_actor(pipeline_run))
    decision.metadata.update(decision_metadata(name, result))
    Path(report.path).write_text(decision_html(name, result))
    report.metadata.update({"model": name, "promoted": result.promoted, "policy_version": result.policy_version or 0})
    print(("promoted: " if result.promoted else "not promoted: ") + result.reason)
    return result.promoted
