"""The service's own documentation: the API docs page at `/docs`, served with its assets
(no CDN, so it works offline), and an OpenAPI document (`/docs.json`) that carries the
service's description and the one error shape (serving/errors.py) on every operation.

BentoML serves its Swagger page at `/` with a tag manager loaded from the internet; `/`
redirects to `/docs` here. The Swagger UI files are the ones BentoML ships."""

from __future__ import annotations

from http import HTTPStatus
from pathlib import Path

import bentoml
from bentoml._internal import server as bentoml_server
from bentoml._internal.service.openapi.specification import MediaType, OpenAPISpecification, Reference, Schema
from bentoml._internal.service.openapi.specification import Response as OpenAPIResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.errors import ErrorBody, UniformErrors

SWAGGER_ASSETS = Path(bentoml_server.__file__).parent / "static_content"
ERROR_SCHEMA = "Error"
# The statuses any operation may answer with, each in the one error shape.
ERROR_STATUSES = {
    400: "An invalid request: `field` names the request field at fault.",
    401: "No API key, or an unknown one: send `Authorization: Bearer <key>`.",
    403: "An admin path (`/reload`) called with a key that is not an admin key.",
    404: "No model serves this endpoint here.",
    413: "The request body is larger than the server reads (`max_request_bytes`); refused before it is read.",
    429: "Every generation slot is taken (`max_concurrency`), or the task queue is full (`max_queued`); retry later.",
    500: "The generation failed; `error_id` is in the server log.",
    503: "The models are still loading (see /readyz).",
    504: "The request took longer than the server's timeout.",
}
PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{title}: API</title>
  <link rel="stylesheet" href="assets/swagger-ui.css">
  <link rel="icon" type="image/png" href="assets/favicon-light-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="assets/swagger-ui-bundle.js"></script>
  <script src="assets/swagger-ui-standalone-preset.js"></script>
  <script>
    window.ui = SwaggerUIBundle({{
      url: "../docs.json",
      dom_id: "#swagger-ui",
      deepLinking: true,
      validatorUrl: null,
      presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
      layout: "BaseLayout",
    }});
  </script>
</body>
</html>
"""


def docs_app(title: str) -> Starlette:
    """The API docs page (`/docs/`) and its Swagger UI assets (`/docs/assets/...`)."""

    async def page(_: Request) -> HTMLResponse:
        return HTMLResponse(PAGE.format(title=title))

    return Starlette(
        routes=[Route("/", page), Mount("/assets", StaticFiles(directory=SWAGGER_ASSETS), name="docs-assets")]
    )


class DocsAtRoot:
    """ASGI middleware: `GET /` (BentoML's page, which needs the internet) redirects to `/docs/`."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/" and scope["method"] in ("GET", "HEAD"):
            await RedirectResponse("/docs/")(scope, receive, send)
            return
        await self.app(scope, receive, send)


class DocumentedService(bentoml.Service):
    """A BentoML service that describes itself (its `description` in the OpenAPI document,
    not BentoML's readme), declares the one error shape, and answers every error in it."""

    @property
    def doc(self) -> str:
        return self.description or super().doc

    def guard(self, app: ASGIApp) -> ASGIApp:
        """The middlewares between the docs redirect and BentoML's app (authentication and
        limits); none here."""
        return app

    def to_asgi(self, is_main: bool = True) -> ASGIApp:
        return UniformErrors(DocsAtRoot(self.guard(super().to_asgi(is_main))))

    @property
    def openapi_spec(self) -> OpenAPISpecification:
        spec = super().openapi_spec
        schemas = spec.components["schemas"]
        for bentoml_error in ("InvalidArgument", "NotFound", "InternalServerError"):
            schemas.pop(bentoml_error, None)
        schemas[ERROR_SCHEMA] = Schema(**ErrorBody.model_json_schema())
        content = {"application/json": MediaType(schema=Reference(f"#/components/schemas/{ERROR_SCHEMA}"))}
        errors = {
            status: OpenAPIResponse(description=f"{HTTPStatus(status).phrase}. {why}", content=content)
            for status, why in ERROR_STATUSES.items()
        }
        for path in spec.paths.values():
            for operation in (path.get, path.post, path.put):
                if isinstance(operation, dict) and "responses" in operation:  # BentoML's API operations
                    kept = {code: r for code, r in operation["responses"].items() if int(code) < 400}
                    operation["responses"] = kept | errors
                    for body in operation.get("requestBody", {}).get("content", {}).values():
                        _add_examples(body.schema)
        return spec


def _add_examples(schema: Schema) -> None:
    """OpenAPI 3.0 (BentoML's version) has a property's `example`, not JSON Schema's
    `examples` that pydantic writes: Swagger UI fills its forms from the former."""
    for field in (schema.properties or {}).values():
        if isinstance(field, dict) and field.get("examples") and "example" not in field:
            field["example"] = field["examples"][0]
