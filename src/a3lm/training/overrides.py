"""Dotted settings of nested dataclass configs, read by the type of the field they set.

    apply_overrides(cfg, ["optim.lr=3e-4", "curriculum.stages=1,3"])   # -s / --set on the command line
    parse_as(list[int], "1,3") -> [1, 3]

One reader for every way a value reaches a config: `-s key=value`, the typed `--section.key VALUE`
options that the CLI generates from `leaves(TrainConfig)`, and the demo's own options. The field's
annotation decides: bool (true/false/1/0/yes/no), int, float, str, list[...] (comma-separated or a
JSON list), and `X | None` (none/null, else X).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterator
from functools import cache
from typing import Any

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


@cache
def field_types(cls: type) -> dict[str, Any]:
    """{field name: resolved annotation} of a dataclass (postponed annotations evaluated)."""
    return typing.get_type_hints(cls)


def parse_as(tp: Any, text: str) -> Any:
    """`text` read as a value of type `tp`; ValueError names what was expected."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.lower() in ("none", "null"):
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"no reader for fields of type {tp}")
        return parse_as(rest[0], text)
    if origin is list:
        item = args[0] if args else str
        values = (
            json.loads(text) if text.startswith("[") else [t.strip() for t in text.split(",") if t.strip()]
        )
        return [parse_as(item, v if isinstance(v, str) else json.dumps(v)) for v in values]
    if tp is bool:
        if text.lower() not in TRUE + FALSE:
            raise ValueError(f"expected a boolean (true/false), got {text!r}")
        return text.lower() in TRUE
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ValueError(f"expected {'an integer' if tp is int else 'a number'}, got {text!r}") from None
    if tp is str:
        return text
    raise TypeError(f"no reader for fields of type {tp}")


def leaves(cls: type, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, annotation) of every setting under dataclass `cls`, sections depth first."""
    for f in dataclasses.fields(cls):
        tp = field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from leaves(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp


def locate(cfg: Any, key: str) -> tuple[Any, str, Any]:
    """(the dataclass holding `key`, the field's name, its annotation); ValueError for unknown keys."""
    *path, name = key.strip().split(".")
    obj = cfg
    for part in path:
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names or not dataclasses.is_dataclass(getattr(obj, part)):
            sections = [
                f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))
            ]
            raise ValueError(f"unknown config section {key!r}; sections: {sections}")
        obj = getattr(obj, part)
    names = [f.name for f in dataclasses.fields(obj)]
    if name not in names:
        raise ValueError(f"unknown config key {key!r}; valid keys here: {names}")
    tp = field_types(type(obj))[name]
    if dataclasses.is_dataclass(tp):
        raise ValueError(
            f"{key!r} is a section: set one of its keys, e.g. {key}.{dataclasses.fields(tp)[0].name}=..."
        )
    return obj, name, tp


def assign(cfg: Any, key: str, value: Any) -> None:
    """Set the already-typed `value` at dotted `key` (in place)."""
    obj, name, _ = locate(cfg, key)
    setattr(obj, name, value)


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Set `section.key=value` (or top-level `key=value`) fields in place, in order; returns cfg."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value, e.g. optim.lr=3e-4")
        key, text = item.split("=", 1)
        obj, name, tp = locate(cfg, key)
        try:
            setattr(obj, name, parse_as(tp, text))
        except ValueError as e:
            raise ValueError(f"bad value for {key.strip()}: {e}") from e
    return cfg
