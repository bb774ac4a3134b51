"""Typed stage configs, the JSON form they travel in, and the one registry of stages.

Every stage has one inert, frozen dataclass config, validated when it is built (a bad
value raises ``ConfigError`` naming the field). A config serializes to JSON with a
``type`` tag and a ``version``; loading resolves the tag only among the configs of the
modules in ``STAGE_MODULES`` (an explicit allow-list, imported on demand, never an
import path read from a file) and rejects unknown keys by name.

A stage's handler sits beside its config in its stage module (``@stage_handler``); the
pipeline looks it up with ``handler_for``, so a new stage is one new module plus one
line in ``STAGE_MODULES``, whose order is also the pipeline order (``stage_order``).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import types
import typing
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol, TypeVar

from uqcit.core.keys import ConfigError, check_keys
from uqcit.core.results import Result

if TYPE_CHECKING:
    from torch import nn

C = TypeVar("C", bound="StageConfig")

# The modules whose configs a recipe may name, in pipeline order (a rotation comes first: later
# stages analyse the rotated model; evaluation last). Nothing else is imported to resolve a type.
STAGE_MODULES: tuple[str, ...] = (
    "uqcit.stages.rotation",
    "uqcit.stages.levels",
    "uqcit.stages.clusters",
    "uqcit.stages.importance",
    "uqcit.stages.sensitivity",
    "uqcit.stages.plan",
    "uqcit.stages.allocate",
    "uqcit.stages.quantize",
    "uqcit.stages.compensate",
    "uqcit.stages.prune",
    "uqcit.stages.retrain",
    "uqcit.stages.evaluate",
)

CONFIG_TYPES: dict[str, type["StageConfig"]] = {}  # type tag -> config class (see register_config)
HANDLERS: dict[type["StageConfig"], "Handler"] = {}  # config class -> handler (see stage_handler)


class StageSession(Protocol):
    """What a stage handler may use of the session running it (``uqcit.pipeline.Session``)."""

    name: str
    reference: "nn.Module"  # the original float model; never replaced
    tokenizer: Any
    progress: bool
    results: dict[str, Result]  # each stage's result under its type tag
    plan: Any  # the BitPlan of the last plan/allocate stage, or None
    rotated: "nn.Module | None"  # the rotated model after a rotation stage, else None

    @property
    def working(self) -> "nn.Module": ...  # the model later stages analyse: rotated, else reference

    @property
    def compressed(self) -> "nn.Module | None": ...  # see uqcit.pipeline.compressed_result

    def require(self, tag: str) -> Result: ...


Handler = Callable[[StageSession, Any], Result]


def register_config(cls: type[C]) -> type[C]:
    """Class decorator: add a config dataclass to the registry under ``cls.type_tag``."""
    tag = cls.type_tag
    if tag in CONFIG_TYPES and CONFIG_TYPES[tag] is not cls:
        raise ConfigError(f"config type tag {tag!r} registered twice")
    CONFIG_TYPES[tag] = cls
    return cls


def stage_handler(config_type: type["StageConfig"]) -> Callable[[Handler], Handler]:
    """Decorator: ``handler(session, config) -> Result`` runs stages of ``config_type``.

    >>> @stage_handler(StageConfig)
    ... def _noop(session, config):
    ...     return None
    >>> handler_for(StageConfig) is _noop
    True
    >>> del HANDLERS[StageConfig]
    """
    def deco(fn: Handler) -> Handler:
        old = HANDLERS.get(config_type)
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ConfigError(f"stage {config_type.type_tag!r} has a handler already: "
                              f"{old.__module__}.{old.__qualname__}")
        HANDLERS[config_type] = fn
        return fn
    return deco


def load_stage_modules() -> None:
    """Import every module of the allow-list, so its configs and handlers are registered.

    Cheap after the first call (imported modules are cached); called before a type tag is
    resolved or a handler looked up, so neither depends on what happened to be imported.
    """
    for name in STAGE_MODULES:
        importlib.import_module(name)


def config_types() -> dict[str, type["StageConfig"]]:
    """Type tag -> config class of every stage a recipe may name, in pipeline order."""
    load_stage_modules()
    found = [cls for cls in CONFIG_TYPES.values() if cls.__module__ in STAGE_MODULES]
    return {cls.type_tag: cls for cls in sorted(found, key=_rank)}


def handler_for(config_type: type["StageConfig"]) -> Handler:
    """The handler registered for a config type; ``ConfigError`` naming the known ones if none."""
    load_stage_modules()
    handler = HANDLERS.get(config_type)
    if handler is None:
        known = sorted(c.type_tag for c in HANDLERS)
        raise ConfigError(f"no handler for stage type {config_type.type_tag!r}; known: {known}")
    return handler


def stage_order() -> tuple[str, ...]:
    """Type tags of the stages with a handler, in pipeline order (``STAGE_MODULES``' order)."""
    load_stage_modules()
    return tuple(cls.type_tag for cls in sorted(HANDLERS, key=_rank))


def stage_rank(config: "StageConfig") -> int:
    """Position of a config's stage in the pipeline; stages outside the allow-list come last."""
    return _rank(type(config))


def _rank(cls: type) -> int:
    return STAGE_MODULES.index(cls.__module__) if cls.__module__ in STAGE_MODULES else len(STAGE_MODULES)


class FrozenMap(Mapping):
    """A read-only, hashable mapping: what a frozen config holds where it would hold a dict.

    Compares equal to a dict with the same items; its JSON form is that dict.

    >>> m = FrozenMap({"a": "w4"})
    >>> m == {"a": "w4"}, m["a"], dict(m)
    (True, 'w4', {'a': 'w4'})
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping | None = None):
        object.__setattr__(self, "_data", dict(data or {}))

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __reduce__(self):
        return type(self), (self._data,)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._data!r})"


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Base of every stage config: frozen, typed, validated, JSON round-trip with a type tag.

    Subclasses validate in ``__post_init__`` (calling ``super().__post_init__()`` first, which
    checks ``Literal`` fields and freezes mapping fields) and report a bad value with ``check``.
    """

    type_tag: ClassVar[str] = "base"
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        for name, hint in _hints(type(self)).items():
            value = getattr(self, name)
            if typing.get_origin(hint) is typing.Literal:
                self.check(value in typing.get_args(hint), name, f"must be one of {list(typing.get_args(hint))}")
            elif _is_mapping(hint) and isinstance(value, Mapping) and not isinstance(value, FrozenMap):
                object.__setattr__(self, name, FrozenMap(value))  # a frozen config holds no mutable dict

    def check(self, ok: bool, field: str, rule: str) -> None:
        """Raise ``ConfigError("<Class>.<field> <rule>, got <value>")`` unless ``ok``."""
        if not ok:
            raise ConfigError(f"{type(self).__name__}.{field} {rule}, got {getattr(self, field)!r}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type_tag, "version": self.version}
        for f in dataclasses.fields(self):
            out[f.name] = _to_jsonable(getattr(self, f.name))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (configs are frozen), validated again."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        data = dict(data)
        tag = data.pop("type", cls.type_tag)
        version = data.pop("version", cls.version)
        if cls is StageConfig:
            known = config_types()
            if tag not in known:
                raise ConfigError(f"unknown stage type {tag!r}; known types: {sorted(known)}")
            return known[tag].from_dict({"type": tag, "version": version, **data})
        if tag != cls.type_tag:
            raise ConfigError(f"{cls.__name__} expects type {cls.type_tag!r}, got {tag!r}")
        if version != cls.version:
            raise ConfigError(
                f"{cls.__name__} (type {tag!r}) is version {cls.version}; "
                f"this file has version {version}"
            )
        check_keys(data, (f.name for f in dataclasses.fields(cls)), f"stage {tag!r}", required=())
        hints = _hints(cls)
        kwargs = {k: _from_jsonable(v, hints[k], f"{tag}.{k}") for k, v in data.items()}
        return cls(**kwargs)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config's fields (cached: every config build reads them)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_mapping(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_mapping(a) for a in typing.get_args(hint))
    return origin in (dict, Mapping)


def _to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if hasattr(value, "to_dict"):
            return value.to_dict()
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, Mapping):
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
    if origin in (dict, Mapping):
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
