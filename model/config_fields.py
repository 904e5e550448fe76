"""Config values from YAML or JSON as their fields' types, or a ValueError naming the field.

PyYAML reads YAML 1.1, where `1e-4` (no dot) is a string, not a number: `lr: 1e-4` would
reach the optimizer as "1e-4". Each value is validated against its dataclass field's type
(pydantic's lax mode): numbers written as strings become numbers, lists become tuples where
a tuple is meant, and a value of the wrong kind is refused with the field's name, before any
model is built.
"""

from __future__ import annotations

import functools
import typing
from typing import Any

from pydantic import TypeAdapter, ValidationError


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError:  # a type only imported for type checkers: those fields are taken as given
        return {}


@functools.cache
def _adapter(kind: Any) -> TypeAdapter:
    return TypeAdapter(kind)


def typed_fields(cls: type, raw: dict[str, Any], where: str = "") -> dict[str, Any]:
    """`raw`'s values as the types of `cls`'s fields (a dataclass); fields `cls` does not have are
    left as they are (the constructor refuses them). `where`: the fields' place in the config
    (`optim.`), for the error."""
    types = _field_types(cls)
    out = {}
    for name, value in raw.items():
        kind = types.get(name)
        if kind is None or kind is object:
            out[name] = value
            continue
        try:
            out[name] = _adapter(kind).validate_python(value)
        except ValidationError as e:
            reason = e.errors()[0]["msg"]
            raise ValueError(f"config {where}{name}: {value!r} is not valid ({reason})") from None
    return out


def typed_section(cls: type, raw: Any, name: str) -> Any:
    """The `name` section of a config (a mapping: `clip`, `optim`) as a `cls` built from its
    typed fields, or a ValueError naming the section or the field."""
    if not isinstance(raw, dict):
        raise ValueError(f"config {name}: a mapping of its fields, not {raw!r}")
    return cls(**typed_fields(cls, raw, f"{name}."))
