"""Typed validation of values read from outside (configs, metadata, stored run states, options).

One rule for every reader: a value *fits* a declared type when it is of that type, with two
refinements that JSON, TOML and pickled states need: a bool is not a number (``True`` is no
``int``), and a float must be finite. A whole number fits ``float`` (TOML's ``1`` for ``1.0``).
``check_fields`` applies a schema (field name -> accepted types) to a mapping and names the first
field that does not fit; ``schema_of`` derives the schema of a dataclass from its annotations.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any

from .errors import ConfigError

Kinds = type | tuple[type, ...]


def is_int(value: object) -> bool:
    """An ``int`` that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite int or float (bools are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fits(value: object, kind: type) -> bool:
    """Whether ``value`` has the declared type ``kind`` (``type(None)`` for null)."""
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return is_int(value)
    if kind is float:
        return is_number(value)
    return isinstance(value, kind) and not isinstance(value, bool)


def _as_tuple(kinds: Kinds) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def type_names(kinds: Kinds) -> str:
    """``"int or null"``: the accepted types, for messages."""
    return " or ".join("null" if k is type(None) else k.__name__ for k in _as_tuple(kinds))


def check_fields(
    values: Mapping[str, Any],
    schema: Mapping[str, Kinds],
    where: str,
    *,
    required: tuple[str, ...] | bool = (),
    allow_unknown: bool = False,
    error: type[Exception] = ConfigError,
    hint: str = "",
) -> None:
    """Raise ``error`` naming the first field of ``values`` that the ``schema`` does not allow.

    Args:
        values: field name -> value (a config, a metadata file, a stored state).
        schema: field name -> the accepted type(s) (``fits``).
        where: what ``values`` is, at the start of every message (``"metadata file x.json"``).
        required: fields that must be present (True: all of the schema's).
        allow_unknown: accept fields the schema does not name.
        hint: appended to every message (what to do about it).
    """
    suffix = f"; {hint}" if hint else ""
    if not isinstance(values, Mapping):
        raise error(f"{where} must be a mapping of names to values, got {type(values).__name__}{suffix}")
    if not allow_unknown:
        unknown = sorted(set(values) - set(schema), key=str)
        if unknown:
            raise error(f"{where} has unknown field(s) {unknown}; known: {list(schema)}{suffix}")
    needed = tuple(schema) if required is True else tuple(required or ())
    for name in needed:
        if name not in values:
            raise error(f"{where} has no '{name}'{suffix}")
    for name, kinds in schema.items():
        if name in values and not any(fits(values[name], kind) for kind in _as_tuple(kinds)):
            raise error(f"{where}: '{name}' must be of type {type_names(kinds)}, got {values[name]!r:.60}{suffix}")


def schema_of(cls: type) -> dict[str, tuple[type, ...]]:
    """The schema of a dataclass: each field and the types its annotation allows (the outer type of a
    generic: ``list[int] | None`` -> ``(list, NoneType)``)."""
    if not is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    schema = {}
    for f in fields(cls):
        hint = hints[f.name]
        kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _union_type()) else (hint,)
        schema[f.name] = tuple(typing.get_origin(k) or k for k in kinds)
    return schema


def _union_type() -> type:
    import types

    return types.UnionType
