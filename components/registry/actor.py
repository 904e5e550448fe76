"""Who acts on the registry, as promotions, rollbacks and gate policies record it: inside a
pipeline, the pipeline run (the promotion step is given the run's id; elsewhere in a
pipeline `KFP_RUN_ID`); elsewhere, the MLflow user the client authenticates as, confirmed
by the server (MLflow's auth API `users/get`, which answers a user about themselves). A
server without MLflow's auth app has no users: the actor is then `ANONYMOUS`.
"""

from __future__ import annotations

import os

import mlflow
import requests

PIPELINE_RUN_ENV = "KFP_RUN_ID"
ANONYMOUS = "anonymous (MLflow without authentication)"


class LoginError(ValueError):
    """The tracking server refused the login, or could not be asked. Its message says what to do."""


def current_actor() -> str:
    """`pipeline run <id>` inside a pipeline, else the authenticated MLflow user's name."""
    if run := os.environ.get(PIPELINE_RUN_ENV, "").strip():
        return pipeline_actor(run)
    return authenticated_user()


def pipeline_actor(run_id: str) -> str:
    """How a pipeline run is recorded as the one who acted."""
    if not run_id.strip():
        raise ValueError("a pipeline run's id is empty")
    return f"pipeline run {run_id.strip()}"


def authenticated_user() -> str:
    """The name of the MLflow user the client's login (MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD) authenticates as on the tracking server; `ANONYMOUS` for a
    server that does not authenticate."""
    uri = mlflow.get_tracking_uri().rstrip("/")
    if not uri.startswith(("http://", "https://")):
        return ANONYMOUS
    username = os.environ.get("MLFLOW_TRACKING_USERNAME") or ""
    login = (username, os.environ.get("MLFLOW_TRACKING_PASSWORD") or "") if username else None
    try:
        reply = requests.get(f"{uri}/api/2.0/mlflow/users/get", params={"username": username}, auth=login, timeout=10)
    except requests.RequestException:
        raise LoginError(
            f"cannot reach MLflow at {uri}: start the local stack (`vdm stack up`) or set MLFLOW_TRACKING_URI"
        ) from None
    if reply.status_code in (401, 403):
        raise LoginError(
            f"MLflow at {uri} refused the login ({reply.status_code}): set MLFLOW_TRACKING_USERNAME and "
            'MLFLOW_TRACKING_PASSWORD to an account of that server (locally: eval "$(vdm stack env)")'
        )
    try:
        return reply.json()["user"]["username"]
    except (ValueError, KeyError, TypeError):  # no auth app: the route does not exist
        return ANONYMOUS
