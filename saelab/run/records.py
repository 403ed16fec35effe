"""Typed records read back from the JSON their `to_json` wrote: one decoder for frozen dataclasses, NamedTuples,
tuples, lists, dicts, optionals and literals, driven by the record's own type hints.

A stage's result type saves with `to_json` and loads with `decode(ResultType, json)`, so the owner of an artifact
defines its layout once (its fields) and every reader gets the typed record back, not a dict of string keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

T = TypeVar("T")


class RecordError(ValueError):
    """An artifact's JSON does not match the record type it should hold (a corrupt or foreign file)."""


def decode(tp: Any, value: Any, where: str = "record") -> Any:
    """`value` (parsed JSON) as an instance of the type `tp`; keys the type does not know are ignored (a record
    may carry provenance beside its fields), missing ones without a default are an error."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return decode(arg, value, where)
            except (RecordError, TypeError, ValueError) as err:
                errors.append(str(err))
        raise RecordError(f"{where}: {value!r} matches none of {args} ({'; '.join(errors)})")
    if origin is typing.Literal:
        if value not in args:
            raise RecordError(f"{where}: {value!r} is not one of {args}")
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _fields(tp, value, where, {f.name: f for f in dataclasses.fields(tp)})
    if isinstance(tp, type) and issubclass(tp, tuple) and hasattr(tp, "_fields"):  # NamedTuple
        return _fields(tp, value, where, None)
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise RecordError(f"{where}: expected a list, got {type(value).__name__}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if origin is tuple:
            return tuple(
                decode(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        return [decode(args[0] if args else Any, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecordError(f"{where}: expected an object, got {type(value).__name__}")
        kt, vt = args if args else (Any, Any)
        return {_key(kt, k): decode(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if value is None:  # non-finite floats are written as null (JSON has no inf / nan)
            return -math.inf
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecordError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecordError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise RecordError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    return value


def _key(tp: Any, key: str) -> Any:
    return int(key) if tp is int else key


def _fields(tp: type, value: Any, where: str, fields: dict[str, dataclasses.Field] | None) -> Any:
    if not isinstance(value, dict):
        raise RecordError(f"{where}: expected an object for {tp.__name__}, got {type(value).__name__}")
    hints = typing.get_type_hints(tp)
    kwargs = {}
    for name, hint in hints.items():
        if fields is not None and (name not in fields or not fields[name].init):
            continue
        if name.startswith("_") and fields is None:
            continue
        if name in value:
            kwargs[name] = decode(hint, value[name], f"{where}.{name}")
        elif (
            fields is not None
            and (
                fields[name].default is dataclasses.MISSING
                and fields[name].default_factory is dataclasses.MISSING
            )
        ) or (fields is None and name not in getattr(tp, "_field_defaults", {})):
            raise RecordError(f"{where}: {tp.__name__} field {name!r} is missing")
    return tp(**kwargs)


def load_json(path: Path, tp: type[T]) -> T:
    """The record of type `tp` saved as JSON at `path`; a file that is not such a record is a RecordError naming
    the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordError(f"{path} is not valid JSON ({err}); rerun the stage that writes it") from None
    try:
        return typing.cast(T, decode(tp, data, path.name))
    except (RecordError, TypeError) as err:
        raise RecordError(
            f"{path} does not hold a {tp.__name__} ({err}); rerun the stage that writes it"
        ) from None
