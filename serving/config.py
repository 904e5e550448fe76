"""What the service serves and the limits it enforces, from `VDM_SERVE_*` variables
(the serving Deployment sets them; `vdm serve` sets them from its options).

Limits exist so that one request cannot take the pod down: frames x pixels x steps
bound the compute and memory of a generation, `max_concurrency` bounds how many
compute at once (more get 429, not an out-of-memory kill), `max_queued` how many
submitted tasks wait or run, and `max_request_bytes` how much of a body is read.

Callers authenticate with API keys read from files (one key per line, blank lines and
`#` comments ignored): `api_keys_file` and `admin_keys_file` (an admin key is also an
API key). With neither set the service refuses to start unless `allow_anonymous`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_ALIAS = "champion"
URI_PREFIX = "models:/"
FORM_ROOM_BYTES = 2**20  # a multipart form's fields and boundaries next to its largest upload


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VDM_SERVE_", extra="ignore", frozen=True)

    # The registered models to serve, any number of any kind: `NAME` (served at `alias`),
    # `NAME@ALIAS` or `models:/NAME@ALIAS`; comma separated in VDM_SERVE_MODELS.
    models: Annotated[tuple[str, ...], NoDecode] = ()
    alias: str = DEFAULT_ALIAS
    # How often the aliases are checked; 0: only on POST /reload.
    poll_seconds: float = 30.0

    # GPUs the service declares to BentoML (which pins its worker to them); unset: 1 where
    # torch sees a GPU, else 0. A CUDA_VISIBLE_DEVICES set for `vdm serve` turns BentoML's pinning off.
    gpus: int | None = Field(None, ge=0)
    max_concurrency: int = Field(2, ge=1)
    # A 14-frame 576x1024 generation takes minutes on a GPU; BentoML's default is 60 s.
    timeout_seconds: float = Field(900.0, gt=0)

    max_frames: int = Field(32, ge=1)  # generated, and in an uploaded video
    max_side: int = Field(1024, ge=8)  # pixels, height and width
    max_steps: int = Field(100, ge=1)
    max_prompt_chars: int = Field(1000, ge=1)
    max_image_bytes: int = Field(10 * 2**20, ge=1)
    max_video_bytes: int = Field(50 * 2**20, ge=1)
    # A request body beyond this is refused (413) before it is read; unset: the largest
    # upload plus room for the form's other fields.
    max_request_bytes: int | None = Field(None, ge=1)
    # Submitted tasks waiting for a generation slot or running; a submit beyond gets 429.
    max_queued: int = Field(8, ge=1)

    api_keys_file: Path | None = None
    admin_keys_file: Path | None = None
    allow_anonymous: bool = False

    @field_validator("models", mode="before")
    @classmethod
    def _comma_separated(cls, value: str | tuple[str, ...]) -> tuple[str, ...]:
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return tuple(value)

    @property
    def request_bytes(self) -> int:
        """The largest request body read."""
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        return max(self.max_image_bytes, self.max_video_bytes) + FORM_ROOM_BYTES

    def specs(self) -> tuple[ModelSpec, ...]:
        """The configured models, each with its alias."""
        return model_specs(self.models, self.alias)


@dataclass(frozen=True)
class ModelSpec:
    """One served model: a registered NAME followed at ALIAS."""

    name: str
    alias: str

    def __str__(self) -> str:
        return f"{URI_PREFIX}{self.name}@{self.alias}"


def model_specs(specs: tuple[str, ...] | list[str], alias: str) -> tuple[ModelSpec, ...]:
    """`NAME` (served at `alias`), `NAME@ALIAS` or `models:/NAME@ALIAS` specs, each model
    with its own alias. A name may appear once: a request picks its model by name."""
    parsed: list[ModelSpec] = []
    for spec in specs:
        text = spec.strip()
        uri = text.startswith(URI_PREFIX)
        name, sep, spec_alias = text.removeprefix(URI_PREFIX).partition("@")
        if (uri and not sep) or not name or (sep and not spec_alias) or "/" in name or "@" in spec_alias:
            raise ValueError(f"{spec!r}: expected NAME, NAME@ALIAS or models:/NAME@ALIAS")
        if any(p.name == name for p in parsed):
            raise ValueError(f"{name} is listed twice: serve each registered model once")
        parsed.append(ModelSpec(name, spec_alias or alias))
    return tuple(parsed)
