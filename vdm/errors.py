"""Expected failures of `vdm` commands as one line saying what went wrong and how to fix it.

An expected failure is a typed error from outside the code: a server that cannot be reached,
a name that does not exist there, credentials it refuses. Anything else is a bug and keeps
its traceback. Client libraries are looked up in `sys.modules` only: an exception of a
library that was never imported cannot occur, and `vdm` starts without importing them.
"""

from __future__ import annotations

import re
import sys
import traceback

STACK_FIX = "start the local stack (`vdm stack up`)"
_S3_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"}


# The parts of a presigned URL that let anyone read the object until it expires (S3 signature v4).
_SECRET_QUERY = re.compile(r"(X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s'\"]+", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with every presigned URL's signature, credential and token replaced by `REDACTED`."""
    return _SECRET_QUERY.sub(r"\1REDACTED", text)


def redacted_traceback(error: BaseException) -> str:
    """The error's traceback as Python prints it, redacted: a data loader's error names the
    presigned URL of the shard it was reading."""
    return redact("".join(traceback.format_exception(error)))


def _loaded(module: str):
    return sys.modules.get(module)


def _chain(error: BaseException):
    """The error and the errors it was raised from or while handling."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def failure_message(error: BaseException) -> str | None:
    """One line for an expected failure (with the fix), None for anything else."""
    for describe in (_object_store, _mlflow, _kfp, _minio, _requests, _urllib3):
        message = describe(error)
        if message is not None:
            return message
    return None


def _object_store(error: BaseException) -> str | None:
    objectstore = _loaded("components.common.objectstore")
    if objectstore is None or not isinstance(error, objectstore.ObjectStoreError):
        return None
    if isinstance(error, objectstore.ObjectStoreUnavailableError):
        return f"{error}; {STACK_FIX} or set VDM_S3_ENDPOINT to the S3 server"
    if isinstance(error, objectstore.BucketNotFoundError):
        return f"{error}; check the s3:// URI's bucket (the local stack has `vdm` and `mlflow`)"
    if isinstance(error, objectstore.ObjectNotFoundError):
        return f"{error}; check the s3:// URI (list a prefix with `mc ls` or the SeaweedFS filer UI)"
    return str(error)


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def _mlflow(error: BaseException) -> str | None:
    exceptions = _loaded("mlflow.exceptions")
    if exceptions is None or not isinstance(error, exceptions.MlflowException):
        return None
    requests = _loaded("requests")
    if requests is not None and any(
        isinstance(e, requests.exceptions.ConnectionError | requests.exceptions.Timeout) for e in _chain(error)
    ):
        return f"cannot reach MLflow at {_tracking_uri()}: {STACK_FIX} or set MLFLOW_TRACKING_URI"
    code = error.error_code
    message = error.message.removeprefix(f"{code}: ")
    if code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or (
        code == "INVALID_PARAMETER_VALUE" and "not found" in message
    ):
        return (
            f"{message} (MLflow at {_tracking_uri()}); check the name and alias: "
            "`vdm registry list NAME` shows a model's versions and aliases"
        )
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED", "CUSTOMER_UNAUTHORIZED"):
        return (
            f"the MLflow server at {_tracking_uri()} refused access: {message}; "
            "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
        )
    return None


def _kfp(error: BaseException) -> str | None:
    exceptions = _loaded("kfp_server_api.exceptions")
    if exceptions is None or not isinstance(error, exceptions.ApiException):
        return None
    answer = f"the Kubeflow Pipelines API answered HTTP {error.status} {error.reason}"
    if error.status in (401, 403):
        return f"{answer}; check the credentials for --host (a token, or the cluster's auth proxy)"
    if error.status == 404:
        return f"{answer}; --host should be the KFP API, e.g. http://ml-pipeline-ui.kubeflow:80"
    return None


def _minio(error: BaseException) -> str | None:
    minio_error = _loaded("minio.error")
    if minio_error is None or not isinstance(error, minio_error.S3Error):
        return None
    if error.code in _S3_CREDENTIAL_CODES:
        return (
            f"the S3 server rejected the credentials ({error.code}); check AWS_ACCESS_KEY_ID and "
            'AWS_SECRET_ACCESS_KEY (locally: eval "$(vdm stack env)")'
        )
    if error.code in ("NoSuchBucket", "NoSuchKey", "NoSuchObject"):
        return f"{error.code}: {error.message} ({error.bucket_name}/{error.object_name or ''}); check the s3:// URI"
    return None


def _requests(error: BaseException) -> str | None:
    requests = _loaded("requests")
    if requests is None or not isinstance(error, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return None
    url = error.request.url if error.request is not None else "the server"
    return f"cannot reach {url}; check the address and that the server is up"


def _urllib3(error: BaseException) -> str | None:
    urllib3 = _loaded("urllib3")
    if urllib3 is None or not isinstance(error, urllib3.exceptions.MaxRetryError):
        return None
    pool = error.pool
    where = f"{pool.scheme}://{pool.host}:{pool.port}" if pool is not None else "the server"
    reason = error.reason if isinstance(error.reason, BaseException) else None
    why = "connection refused" if isinstance(reason, ConnectionRefusedError) or "refused" in str(reason) else reason
    if error.url and error.url.startswith("/apis/"):
        return (
            f"cannot reach the Kubeflow Pipelines API at {where} ({why}); check --host "
            "(e.g. http://ml-pipeline-ui.kubeflow:80, or `kubectl port-forward` to it)"
        )
    return f"cannot reach {where} ({why}); check the address and that the server is up"
