"""What a job request may name: recipe fields that are files, models outside the model folders."""
from __future__ import annotations

import typing
from pathlib import Path

import pytest

from uqcit.core.config import config_types
from uqcit.server.checks import FILE_FIELDS, ApiError, resolve_model
from uqcit.server.settings import ServerSettings

# str fields of stage configs known to name no file (patterns, format names, text). A new str field
# must be added here or to uqcit.server.checks.FILE_FIELDS: the server has to decide about it.
NOT_FILES = {
    ("allocate", "pins"), ("allocate", "formats"), ("allocate", "predict"), ("clusters", "modules"), ("compensate", "modules"),
    ("compensate", "factor_format"), ("importance", "weights"), ("importance", "sensitivity_format"),
    ("levels", "ruleset"), ("plan", "level_patterns"), ("plan", "overrides"), ("prune", "modules"),
    ("retrain", "prompts"), ("retrain", "modules"), ("sensitivity", "formats"), ("sensitivity", "modules"),
    ("sensitivity", "method"), ("allocate", "budget_over"),
}


def _mentions_str(hint) -> bool:
    return hint is str or any(_mentions_str(a) for a in typing.get_args(hint))


def test_every_str_field_of_every_stage_is_classified():
    found = set()
    for tag, cls in config_types().items():
        for name, hint in typing.get_type_hints(cls).items():
            if typing.get_origin(hint) is typing.ClassVar or typing.get_origin(hint) is typing.Literal:
                continue
            if _mentions_str(hint):
                found.add((tag, name))
    unclassified = found - NOT_FILES - set(FILE_FIELDS)
    assert not unclassified, f"decide whether these fields name files (uqcit.server.checks.FILE_FIELDS): {unclassified}"
    assert set(FILE_FIELDS) <= found  # the table names real fields


@pytest.mark.parametrize("model", ["/srv/models/../secrets", "/srv/uqcit/models", "/srv/modelsX/m", "/etc/passwd"])
def test_model_paths_outside_are_refused_before_any_lookup(model):
    s = ServerSettings(data=Path("/srv/uqcit"), model_dirs=(Path("/srv/models"),))
    with pytest.raises(ApiError) as err:
        resolve_model(model, s)
    assert err.value.status == 403


def test_a_link_inside_a_model_folder_cannot_lead_out(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "out").symlink_to(tmp_path)
    s = ServerSettings(data=tmp_path / "data", model_dirs=(tmp_path / "models",))
    assert resolve_model(str(tmp_path / "models" / "m"), s) == str(tmp_path / "models" / "m")
    with pytest.raises(ApiError, match="outside"):
        resolve_model(str(tmp_path / "models" / "out" / "data"), s)
