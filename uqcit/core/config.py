"""Typed stage configs and the JSON form they travel in.

Every stage has one inert dataclass config. A config serializes to JSON with a
``type`` tag and a ``version``; loading resolves the tag through an allow-list
(``CONFIG_TYPES``), never an import path, and rejects unknown keys by name.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="StageConfig")

CONFIG_TYPES: dict[str, type["StageConfig"]] = {}


class ConfigError(ValueError):
    """A config or recipe that cannot be read; the message names the bad key."""


def register_config(cls: type[C]) -> type[C]:
    """Class decorator: add a config dataclass to the allow-list under ``cls.type_tag``."""
    tag = cls.type_tag
    if tag in CONFIG_TYPES and CONFIG_TYPES[tag] is not cls:
        raise ConfigError(f"config type tag {tag!r} registered twice")
    CONFIG_TYPES[tag] = cls
    return cls


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Base of every stage config: frozen, typed, JSON round-trip with a type tag."""

    type_tag: ClassVar[str] = "base"
    version: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type_tag, "version": self.version}
        for f in dataclasses.fields(self):
            out[f.name] = _to_jsonable(getattr(self, f.name))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (configs are frozen)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        data = dict(data)
        tag = data.pop("type", cls.type_tag)
        version = data.pop("version", cls.version)
        if cls is StageConfig:
            if tag not in CONFIG_TYPES:
                raise ConfigError(
                    f"unknown stage type {tag!r}; known types: {sorted(CONFIG_TYPES)}"
                )
            return CONFIG_TYPES[tag].from_dict({"type": tag, "version": version, **data})
        if tag != cls.type_tag:
            raise ConfigError(f"{cls.__name__} expects type {cls.type_tag!r}, got {tag!r}")
        if version != cls.version:
            raise ConfigError(
                f"{cls.__name__} (type {tag!r}) is version {cls.version}; "
                f"this file has version {version}"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(
                f"unknown key(s) {unknown} for stage {tag!r}; allowed keys: {sorted(fields)}"
            )
        hints = typing.get_type_hints(cls)
        kwargs = {k: _from_jsonable(v, hints[k], f"{tag}.{k}") for k, v in data.items()}
        return cls(**kwargs)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))


def _to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if hasattr(value, "to_dict"):
            return value.to_dict()
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    return value


def _from_jsonable(value: Any, hint: Any, where: str) -> Any:
    """Convert a JSON value to the annotated type; only the shapes configs use."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _from_jsonable(value, arg, where)
            except (ConfigError, TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} fits none of {hint}: {errors}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_jsonable(v, args[0], where) for v in value)
        return tuple(_from_jsonable(v, a, where) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {value!r}")
        return {k: _from_jsonable(v, args[1], where) for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object for {hint.__name__}, got {value!r}")
        if hasattr(hint, "from_dict"):
            return hint.from_dict(value)
        return hint(**value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value
