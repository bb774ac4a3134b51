"""The one check of the keys of a JSON object read back into a typed record.

Every ``from_dict`` of the workbench rejects keys it does not know, by name, and names the keys
that are missing, so a typo in a recipe or a file from a newer version fails loudly instead of
being ignored.

>>> check_keys({"level": 2, "role": "q"}, {"pattern", "level", "role"}, "LevelRule")
Traceback (most recent call last):
...
uqcit.core.keys.ConfigError: LevelRule is missing key(s) ['pattern']
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any



class ConfigError(ValueError):
    """A config, recipe or record that cannot be read; the message names the bad key or field."""


def check_keys(data: Any, allowed: Iterable[str], what: str, required: Iterable[str] | None = None) -> None:
    """Raise ``ConfigError`` unless ``data`` is a mapping with only ``allowed`` keys and every ``required`` one.

    ``required`` defaults to every allowed key; pass ``()`` where all keys have defaults.

    >>> check_keys({"name": "x", "colour": 1}, {"name"}, "RuleSet")
    Traceback (most recent call last):
    ...
    uqcit.core.keys.ConfigError: unknown key(s) ['colour'] for RuleSet; allowed keys: ['name']
    """
    allowed = set(allowed)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what}: expected an object, got {data!r}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} for {what}; allowed keys: {sorted(allowed)}")
    missing = sorted((allowed if required is None else set(required)) - set(data))
    if missing:
        raise ConfigError(f"{what} is missing key(s) {missing}")
