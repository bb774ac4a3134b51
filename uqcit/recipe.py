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

from uqcit.core.config import StageConfig, stage_rank
from uqcit.core.io import atomic_write
from uqcit.core.keys import ConfigError, check_keys

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
        """A copy where the stage of ``config``'s type is replaced, or inserted in pipeline order
        (before the first stage that runs after it, see ``uqcit.core.config.STAGE_MODULES``) when
        the recipe has none.

        >>> from uqcit.stages.rotation import RotationConfig
        >>> [s.type_tag for s in builtin_recipe("rtn-w4-g128").with_stage(RotationConfig()).stages][:2]
        ['rotation', 'levels']
        """
        stages = list(self.stages)
        for i, s in enumerate(stages):
            if s.type_tag == config.type_tag:
                stages[i] = config
                break
        else:
            mine = stage_rank(config)
            at = next((i for i, s in enumerate(stages) if stage_rank(s) > mine), len(stages))
            stages.insert(at, config)
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
        check_keys(data, ("name", "description", "stages"), "recipe", required=("name", "stages"))
        stages = tuple(StageConfig.from_dict(s) for s in data["stages"])  # types from the allow-list only
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
        atomic_write(path, (self.to_json() + "\n").encode())


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
