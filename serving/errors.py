"""One shape for every error response: `{"error": ..., "field": ..., "error_id": ...}`.

BentoML answers errors in shapes of its own: a pydantic validation error as `error` plus
a `detail` list, an `InvalidArgument` as a one-item list, the traffic limits' 429 and
504 as a bare `error`, Starlette's 404 as plain text. `UniformErrors` wraps the whole
app, outside BentoML's own middlewares, and rewrites each of them into this shape; the
service's own errors are already in it (`error_response`). Every error id is logged
with its error, so a caller's report can be found in the server log."""

from __future__ import annotations

import json
import logging
import uuid
from http import HTTPStatus

from bentoml.exceptions import InvalidArgument
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("vdm.serving")


class ErrorBody(BaseModel):
    """Every error response's body."""

    error: str = Field(
        description="What went wrong; for a request error, which value and what is allowed.",
        examples=["num_frames: Input should be less than or equal to 32"],
    )
    field: str | None = Field(
        description="The request field at fault; null when the error is not about one field.",
        examples=["num_frames"],
    )
    error_id: str = Field(
        description="This error's id; the server log has the error under it.", examples=["5f0c2a9e81d4"]
    )


FIELDS = frozenset(ErrorBody.model_fields)


class FieldError(InvalidArgument):
    """A request value the service rejects after the schema's validation (HTTP 400);
    `message` names the field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def new_error_id() -> str:
    return uuid.uuid4().hex[:12]


def error_body(status: int, message: str, field: str | None = None, error_id: str | None = None) -> bytes:
    """The JSON of an error answered with `status`, logged under its (new) id."""
    error_id = error_id or new_error_id()
    log.warning("error id %s: HTTP %d, field %s: %s", error_id, status, field, message)
    return ErrorBody(error=message, field=field, error_id=error_id).model_dump_json().encode()


def error_response(status: int, message: str, field: str | None = None, error_id: str | None = None) -> JSONResponse:
    body = error_body(status, message, field, error_id)
    return JSONResponse(json.loads(body), status_code=status)


def _location(loc: list) -> str | None:
    return ".".join(str(part) for part in loc) or None


def uniform(status: int, body: bytes) -> bytes:
    """`body` of an error response with `status`, in the one shape (kept if already in it)."""
    try:
        data = json.loads(body)
    except ValueError:
        data = body.decode(errors="replace").strip()
    field = None
    if isinstance(data, dict) and set(data) == FIELDS:
        return body
    if isinstance(data, list) and len(data) == 1:  # BentoML's InvalidArgument and its kin
        data = data[0]
    if isinstance(data, dict) and isinstance(data.get("detail"), list) and data["detail"]:
        # pydantic's validation errors, each with its field's location
        errors = data["detail"]
        message = "; ".join(f"{_location(e.get('loc', [])) or 'request'}: {e.get('msg')}" for e in errors)
        field = _location(errors[0].get("loc", []))
    elif isinstance(data, dict):
        message = str(data.get("error") or data.get("detail") or "")
    else:
        message = str(data)
    return error_body(status, message or HTTPStatus(status).phrase, field)


class UniformErrors:
    """ASGI middleware: every HTTP response with status >= 400 gets the one error shape."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def rewrite(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = uniform(start["status"], b"".join(chunks))
            replaced = (b"content-length", b"content-type")
            headers = [(key, value) for key, value in start.get("headers", []) if key not in replaced]
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)
