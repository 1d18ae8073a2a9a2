"""One typed serialiser: dataclasses to JSON data and back, and their JSON Schema, all read from the type hints.

Reproducers, configurations, operations, budgets and findings go through here, so a
field means the same thing in every file and every bad field gets the same kind of
error: `SerialError` names the file, the field path (``ops[2].offset``), the value and
the rule it breaks. A union of dataclasses (the operations) is tagged by the class
name in the field ``op``.

Supported hints: int, bool, float, str, None, enums (by value), ``X | None``,
``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``, dataclasses, and unions of dataclasses.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any

TAG = "op"  # the field that names the class inside a union of dataclasses


class SerialError(ValueError):
    """A value in a file breaks a rule of its type; names the file, the field, the value and the rule."""

    def __init__(self, where: str, field: str, value: object, rule: str) -> None:
        self.where, self.field, self.value, self.rule = where, field, value, rule
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        at = f"field '{field}' = {shown}" if field else f"value {shown}"
        super().__init__(f"{where}: {at}: {rule}")


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """The resolved type hint of each dataclass field, in declaration order."""
    resolved = typing.get_type_hints(cls)
    return {f.name: resolved[f.name] for f in dataclasses.fields(cls) if f.init}


def to_data(obj: object, tp: Any = None) -> object:
    """JSON-ready data: dataclasses as objects (union members tagged), enums by value, tuples as lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        data = {name: to_data(getattr(obj, name), t) for name, t in hints(type(obj)).items()}
        return {TAG: type(obj).__name__, **data} if _tagged_union(tp) else data
    if isinstance(obj, enum.Enum):
        return obj.value
    item = typing.get_args(tp)[0] if typing.get_origin(tp) in (list, tuple) else None
    if isinstance(obj, (list, tuple)):
        return [to_data(x, item) for x in obj]
    if isinstance(obj, dict):
        value = typing.get_args(tp)[1] if typing.get_origin(tp) is dict else None
        return {str(k): to_data(v, value) for k, v in obj.items()}
    return obj


def _tagged_union(tp: Any) -> bool:
    """A union of two or more dataclasses (optionally with None): written with TAG naming the class."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return False
    members = [a for a in typing.get_args(tp) if a is not type(None)]
    return len(members) > 1 and all(isinstance(m, type) and dataclasses.is_dataclass(m) for m in members)


def from_data(tp: Any, data: object, *, where: str, field: str = "") -> Any:
    """Build a value of type `tp` from JSON data, or raise SerialError naming where, the field, the value and the rule."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _union(tp, data, where, field)
    if origin is list:
        (item,) = typing.get_args(tp)
        _need(isinstance(data, list), where, field, data, "must be a list")
        return [from_data(item, x, where=where, field=f"{field}[{i}]") for i, x in enumerate(data)]
    if origin is tuple:
        item = typing.get_args(tp)[0]
        _need(isinstance(data, list), where, field, data, "must be a list")
        return tuple(from_data(item, x, where=where, field=f"{field}[{i}]") for i, x in enumerate(data))
    if origin is dict:
        _key, item = typing.get_args(tp)
        _need(isinstance(data, dict), where, field, data, "must be an object")
        return {k: from_data(item, v, where=where, field=f"{field}.{k}") for k, v in data.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass(tp, data, where, field)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = [m.value for m in tp]
        _need(data in values and not isinstance(data, bool), where, field, data,
              f"must be one of {', '.join(map(str, values))}")
        return tp(data)
    return _scalar(tp, data, where, field)


def _need(ok: bool, where: str, field: str, value: object, rule: str) -> None:
    if not ok:
        raise SerialError(where, field, value, rule)


def _scalar(tp: Any, data: object, where: str, field: str) -> object:
    if tp is type(None):
        _need(data is None, where, field, data, "must be null")
    elif tp is bool:
        _need(isinstance(data, bool), where, field, data, "must be true or false")
    elif tp is int:
        _need(isinstance(data, int) and not isinstance(data, bool), where, field, data, "must be a whole number")
    elif tp is float:
        _need(isinstance(data, (int, float)) and not isinstance(data, bool), where, field, data, "must be a number")
        return float(data)  # type: ignore[arg-type]
    elif tp is str:
        _need(isinstance(data, str), where, field, data, "must be a string")
    elif tp is not Any and tp is not object:
        raise TypeError(f"serial: no rule for type {tp!r} (field '{field}')")
    return data


def _union(tp: Any, data: object, where: str, field: str) -> object:
    members = [a for a in typing.get_args(tp) if a is not type(None)]
    if data is None:
        _need(len(members) < len(typing.get_args(tp)), where, field, data, "must not be null")
        return None
    if _tagged_union(tp):
        names = {m.__name__: m for m in members}
        _need(isinstance(data, dict) and data.get(TAG) in names, where, f"{field}.{TAG}" if field else TAG,
              data.get(TAG) if isinstance(data, dict) else data, f"must name one of {', '.join(names)}")
        body = {k: v for k, v in data.items() if k != TAG}  # type: ignore[union-attr]
        return _dataclass(names[data[TAG]], body, where, field)  # type: ignore[index]
    if len(members) == 1:
        return from_data(members[0], data, where=where, field=field)
    errors = []
    for m in members:
        try:
            return from_data(m, data, where=where, field=field)
        except SerialError as exc:
            errors.append(exc.rule)
    raise SerialError(where, field, data, " or ".join(errors))


def _dataclass(cls: type, data: object, where: str, field: str) -> object:
    _need(isinstance(data, dict), where, field, data, f"must be an object ({cls.__name__})")
    fields = hints(cls)
    prefix = f"{field}." if field else ""
    unknown = [k for k in data if k not in fields]  # type: ignore[union-attr]
    if unknown:
        raise SerialError(where, prefix + unknown[0], data[unknown[0]],  # type: ignore[index]
                          f"not a field of {cls.__name__} (fields: {', '.join(fields) or 'none'})")
    required = {f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING}
    missing = [k for k in fields if k in required and k not in data]  # type: ignore[operator]
    if missing:
        raise SerialError(where, prefix + missing[0], None, f"missing; {cls.__name__} needs it")
    kwargs = {}
    for k, v in data.items():  # type: ignore[union-attr]
        try:
            kwargs[k] = from_data(fields[k], v, where=where, field=prefix + k)
        except SerialError as exc:
            if exc.field != prefix + k:
                raise
            raise SerialError(where, exc.field, v, f"{exc.rule} ({cls.__name__}.{k})") from None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise SerialError(where, field, data, f"{cls.__name__}: {exc}") from None


def schema(tp: Any, defs: dict[str, dict] | None = None) -> dict:
    """The JSON Schema of a type hint; dataclasses go to `defs` (by class name) and are referenced."""
    defs = {} if defs is None else defs
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        alts = [_tagged_ref(m, defs) for m in members] if _tagged_union(tp) else [schema(m, defs) for m in members]
        if len(members) < len(typing.get_args(tp)):
            alts.append({"type": "null"})
        return alts[0] if len(alts) == 1 else {"anyOf": alts}
    if origin in (list, tuple):
        return {"type": "array", "items": schema(typing.get_args(tp)[0], defs)}
    if origin is dict:
        return {"type": "object", "additionalProperties": schema(typing.get_args(tp)[1], defs)}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if tp.__name__ not in defs:
            defs[tp.__name__] = {}  # placeholder against recursion
            defs[tp.__name__] = _dataclass_schema(tp, defs)
        return {"$ref": f"#/$defs/{tp.__name__}"}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [m.value for m in tp]}
    return {bool: {"type": "boolean"}, int: {"type": "integer"}, float: {"type": "number"}, str: {"type": "string"},
            type(None): {"type": "null"}}.get(tp, {})


def _dataclass_schema(cls: type, defs: dict[str, dict]) -> dict:
    props = {name: schema(t, defs) for name, t in hints(cls).items()}
    required = [f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    out: dict = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = required
    return out


def _tagged_ref(cls: type, defs: dict[str, dict]) -> dict:
    """A union member as written by `to_data`: TAG names the class, then the class's fields."""
    if cls.__name__ not in defs:
        body = _dataclass_schema(cls, defs)
        body["properties"] = {TAG: {"const": cls.__name__}, **body["properties"]}
        body["required"] = [TAG, *body.get("required", [])]
        defs[cls.__name__] = body
    return {"$ref": f"#/$defs/{cls.__name__}"}
