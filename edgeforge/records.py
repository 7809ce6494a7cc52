"""Typed records: what one stage hands the next, on disk as JSON.

A record is a frozen dataclass deriving from :class:`Record`, with class-level ``kind`` and ``version``;
its JSON object is ``{"kind": ..., "schema_version": ..., <field name>: <value>, ...}``, nothing renamed.
Nested dataclasses (a nested Record keeps its kind), ``list[...]``, ``dict[str, ...]``, ``X | None``, a union
of dataclasses (the first whose required fields the object holds), ``Path`` and ``str`` enums convert both
ways. A field computed from others (``init=False``, set in ``__post_init__``) is written, and computed again
on reading. A reader trusts fields, never string keys; a field added within a version is read as its default
by older files. Each field's ``doc`` (``described("...")``) feeds docs/report-schema.md.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from edgeforge.errors import InputError

R = TypeVar("R", bound="Record")
T = TypeVar("T")


def described(doc: str, **field_options) -> Any:
    """A dataclass field with its one-line meaning (shown in docs/report-schema.md)."""
    return dataclasses.field(metadata={"doc": doc}, **field_options)


def _encode(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _encode_fields(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(key): _encode(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(item) for item in value]
    return value


def _decode(annotation: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if value is None or annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in args if arg is not type(None)]
        if len(options) > 1 and all(dataclasses.is_dataclass(arg) for arg in options):
            return _decode(_matching(options, value, where), value, where)
        return _decode(options[0], value, where) if len(options) == 1 else value
    if origin in (list, tuple):
        return (list if origin is list else tuple)(_decode(args[0] if args else Any, item, where) for item in value)
    if origin is dict:
        return {key: _decode(args[1] if args else Any, item, where) for key, item in value.items()}
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected an object, found {type(value).__name__}")
        return _build(annotation, value, where)
    if isinstance(annotation, type) and issubclass(annotation, (enum.Enum, Path)):
        return annotation(value)
    return value


def _encode_fields(value: Any) -> dict:
    return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}


def _required(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING}


def _matching(options: list[type], value: Any, where: str) -> type:
    """The first of a union's dataclasses whose required fields the object holds."""
    found = next((cls for cls in options if isinstance(value, dict) and _required(cls) <= value.keys()), None)
    if found is None:
        raise InputError(f"{where}: an object of none of the shapes {', '.join(c.__name__ for c in options)}")
    return found


def _build(cls: type, data: dict, where: str) -> Any:
    """The dataclass from its JSON object; a field computed in __post_init__ (init=False) is computed again."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in data:
            values[f.name] = _decode(hints[f.name], data[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise InputError(f"{where}: field {f.name!r} is missing")
    return cls(**values)


def decode(cls: type[T], data: Any, *, where: str) -> T:
    """A nested dataclass of a record (no kind of its own) from its JSON object; InputError naming ``where``."""
    return _decode(cls, data, where)


@dataclasses.dataclass(frozen=True)
class Record:
    """Base of every stage record; subclasses set ``kind`` and ``version``."""

    kind: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def to_dict(self) -> dict:
        """The JSON object: kind, schema_version, then every field under its own name."""
        return {"kind": self.kind, "schema_version": self.version, **_encode_fields(self)}

    @classmethod
    def from_dict(cls: type[R], data: dict, *, path: str | Path | None = None) -> R:
        """Read a record; InputError (naming ``path``) on another kind, a newer version or a missing field."""
        if not isinstance(data, dict) or data.get("kind") != cls.kind:
            found = data.get("kind") if isinstance(data, dict) else type(data).__name__
            raise InputError(f"not a {cls.kind} record (kind {found!r})", path=path)
        if int(data.get("schema_version", 0)) > cls.version:
            raise InputError(f"{cls.kind} schema_version {data['schema_version']} is newer than this edgeforge "
                             f"reads ({cls.version}); upgrade edgeforge", path=path)
        try:
            return _build(cls, data, cls.kind)
        except InputError as error:
            raise InputError(error.problem, path=path) from None


def encode(value: Any) -> Any:
    """The JSON value of a record's nested dataclass (a Record's is its ``to_dict()``): the inverse of decode."""
    return _encode(value)


def _type_name(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return str(text).replace("typing.", "").replace("|", "\\|")


def schema_markdown(records: list[type[Record]]) -> str:
    """docs/report-schema.md: one table per record and per nested dataclass, from the fields' docs."""
    lines = ["# Record schemas", "", "Generated from the stages' record classes by "
             "`python -m edgeforge.report.schema` (a test checks it is current). Every record carries `kind` and "
             "`schema_version`; fields are only added within a version, renaming or removing one bumps it.", ""]
    seen: set[type] = set()
    queue: list[type] = list(records)
    while queue:
        cls = queue.pop(0)
        if cls in seen:
            continue
        seen.add(cls)
        title = f"`{cls.kind}` (version {cls.version}): {cls.__name__}" if issubclass(cls, Record) else cls.__name__
        lines += [f"## {title}", "", (cls.__doc__ or "").strip().splitlines()[0], "",
                  "| field | type | meaning |", "|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            lines.append(f"| `{f.name}` | `{_type_name(f.type)}` | {f.metadata.get('doc', '')} |")
            queue += [arg for arg in _nested_dataclasses(hints[f.name]) if arg not in seen]
        lines.append("")
    return "\n".join(lines)


def _nested_dataclasses(annotation: Any) -> list[type]:
    if dataclasses.is_dataclass(annotation):
        return [annotation]
    return [found for arg in typing.get_args(annotation) for found in _nested_dataclasses(arg)]
