"""Recipes: a named, ordered list of stage configs, with a JSON form.

The same recipe drives the notebook, the widgets and the CLI, and an exported
package embeds it. Built-in recipes live in ``uqcit/recipes/*.json``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from uqcit.core.config import ConfigError, StageConfig

RECIPE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Recipe:
    """An ordered list of stage configs under a name.

    >>> r = builtin_recipe("uqcit-default")
    >>> Recipe.from_json(r.to_json()) == r
    True
    """

    name: str
    stages: tuple[StageConfig, ...]
    description: str = ""

    def stage(self, type_tag: str) -> StageConfig | None:
        """The first stage config of a type, or None."""
        return next((s for s in self.stages if s.type_tag == type_tag), None)

    def with_stage(self, config: StageConfig) -> "Recipe":
        """A copy where the stage of ``config``'s type is replaced (or appended)."""
        stages = list(self.stages)
        for i, s in enumerate(stages):
            if s.type_tag == config.type_tag:
                stages[i] = config
                break
        else:
            stages.append(config)
        return dataclasses.replace(self, stages=tuple(stages))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "recipe", "version": RECIPE_VERSION, "name": self.name,
                "description": self.description, "stages": [s.to_dict() for s in self.stages]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        data = dict(data)
        if data.pop("type", "recipe") != "recipe":
            raise ConfigError("not a recipe: its 'type' is not 'recipe'")
        version = data.pop("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise ConfigError(f"recipe version {version} is not {RECIPE_VERSION}")
        unknown = sorted(set(data) - {"name", "description", "stages"})
        if unknown:
            raise ConfigError(f"unknown recipe key(s) {unknown}; allowed: ['description', 'name', 'stages']")
        if "name" not in data or "stages" not in data:
            raise ConfigError("a recipe needs 'name' and 'stages'")
        _register_all()
        stages = tuple(StageConfig.from_dict(s) for s in data["stages"])
        return cls(name=data["name"], stages=stages, description=data.get("description", ""))

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Recipe":
        p = Path(path)
        try:
            return cls.from_json(p.read_text())
        except (json.JSONDecodeError, ConfigError) as exc:
            raise ConfigError(f"{p}: {exc}") from exc

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json() + "\n")


def _register_all() -> None:
    """Import the stage modules so their configs are on the allow-list."""
    from uqcit.stages import allocate
    from uqcit.stages import clusters
    from uqcit.stages import quantize as compress
    from uqcit.stages import evaluate
    from uqcit.stages import importance
    from uqcit.stages import levels
    from uqcit.stages import plan
    from uqcit.stages import prune
    from uqcit.stages import retrain
    from uqcit.stages import rotation
    from uqcit.stages import sensitivity  # noqa: F401


def _recipes_dir():
    return resources.files("uqcit").joinpath("recipes")


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with the workbench."""
    return sorted(p.name[:-5] for p in _recipes_dir().iterdir()
                  if p.name.endswith(".json"))


def builtin_recipe(name: str) -> Recipe:
    """A shipped recipe by name, e.g. ``"uqcit-default"``."""
    names = builtin_recipes()
    if name not in names:
        raise ConfigError(f"no built-in recipe {name!r}; built-in recipes: {names}")
    return Recipe.from_json(_recipes_dir().joinpath(f"{name}.json").read_text())


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a recipe JSON file by path."""
    if name_or_path.endswith(".json") or os.path.sep in name_or_path:
        return Recipe.from_file(name_or_path)
    return builtin_recipe(name_or_path)
