"""What the service serves and the limits it enforces, from `VDM_SERVE_*` variables
(the serving Deployment sets them; `vdm serve` sets them from its options).

Limits exist so that one request cannot take the pod down: frames x pixels x steps
bound the compute and memory of a generation, and `max_concurrency` bounds how many
run at once (more get 429, not an out-of-memory kill)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_ALIAS = "champion"


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VDM_SERVE_", extra="ignore", frozen=True)

    # Registered model names; each is a text- or an image-to-video model (at most one of each).
    models: Annotated[tuple[str, ...], NoDecode] = ()
    alias: str = DEFAULT_ALIAS
    # How often the alias is checked; 0: only on POST /reload.
    poll_seconds: float = 30.0

    max_concurrency: int = Field(2, ge=1)
    # A 14-frame 576x1024 generation takes minutes on a GPU; BentoML's default is 60 s.
    timeout_seconds: float = Field(900.0, gt=0)

    max_frames: int = Field(32, ge=1)
    max_side: int = Field(1024, ge=8)  # pixels, height and width
    max_steps: int = Field(100, ge=1)
    max_prompt_chars: int = Field(1000, ge=1)
    max_image_bytes: int = Field(10 * 2**20, ge=1)

    @field_validator("models", mode="before")
    @classmethod
    def _comma_separated(cls, value: str | tuple[str, ...]) -> tuple[str, ...]:
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return tuple(value)


def model_names(specs: tuple[str, ...], alias: str) -> tuple[tuple[str, ...], str]:
    """`NAME` (served at `alias`) or `models:/NAME@ALIAS` specs as (names, alias). One
    alias for the whole service: its models follow the same promotion."""
    names, aliases = [], set()
    for spec in specs:
        name, spec_alias = spec, alias
        if spec.startswith("models:/"):
            name, sep, spec_alias = spec.removeprefix("models:/").partition("@")
            if not (sep and name and spec_alias):
                raise ValueError(f"{spec}: expected models:/NAME@ALIAS")
        names.append(name)
        aliases.add(spec_alias)
    if len(aliases) > 1:
        raise ValueError(f"one alias per service, got {sorted(aliases)}")
    return tuple(names), aliases.pop() if aliases else alias
