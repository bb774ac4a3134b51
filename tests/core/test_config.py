import dataclasses

import pytest

from uqcit.core.config import CONFIG_TYPES, ConfigError, StageConfig
from uqcit.recipe import Recipe, builtin_recipe, builtin_recipes


def _all_configs():
    import uqcit.recipe

    uqcit.recipe._register_all()
    return sorted(CONFIG_TYPES.items())


@pytest.mark.parametrize("tag,cls", _all_configs())
def test_every_config_round_trips_through_json(tag, cls):
    cfg = cls()
    back = StageConfig.from_json(cfg.to_json())
    assert type(back) is cls and back == cfg
    d = cfg.to_dict()
    assert d["type"] == tag and d["version"] == cls.version


def test_unknown_key_is_rejected_by_name():
    from uqcit.stages.plan import PlanConfig

    bad = PlanConfig().to_dict() | {"bitz": 3}
    with pytest.raises(ConfigError, match="bitz"):
        StageConfig.from_dict(bad)


def test_unknown_type_and_wrong_version_are_rejected():
    with pytest.raises(ConfigError, match="unknown stage type 'nope'"):
        StageConfig.from_dict({"type": "nope"})
    from uqcit.stages.evaluate import EvalConfig

    d = EvalConfig().to_dict() | {"version": 99}
    with pytest.raises(ConfigError, match="version"):
        StageConfig.from_dict(d)


def test_wrong_value_type_is_rejected():
    from uqcit.stages.evaluate import EvalConfig

    with pytest.raises(ConfigError, match="eval.window"):
        StageConfig.from_dict(EvalConfig().to_dict() | {"window": "big"})
    with pytest.raises(ConfigError, match="plan.preset"):
        from uqcit.stages.plan import PlanConfig
        StageConfig.from_dict(PlanConfig().to_dict() | {"preset": "magic"})


def test_builtin_recipes_load_and_round_trip(tmp_path):
    names = builtin_recipes()
    assert "uqcit-default" in names and "rtn-w4-g128" in names
    for n in names:
        r = builtin_recipe(n)
        assert r.name == n
        p = tmp_path / f"{n}.json"
        r.save(p)
        assert Recipe.from_file(p) == r


def test_recipe_rejects_unknown_keys_and_names():
    d = builtin_recipe("uqcit-default").to_dict() | {"stagez": []}
    with pytest.raises(ConfigError, match="stagez"):
        Recipe.from_dict(d)
    with pytest.raises(ConfigError, match="no built-in recipe 'nope'"):
        builtin_recipe("nope")


def test_recipe_with_stage_replaces_by_type():
    from uqcit.stages.evaluate import EvalConfig

    r = builtin_recipe("uqcit-default")
    r2 = r.with_stage(EvalConfig(max_windows=2))
    assert r2.stage("eval").max_windows == 2
    assert r.stage("eval").max_windows is None  # the original is untouched
    assert [s.type_tag for s in r2.stages] == [s.type_tag for s in r.stages]
    assert dataclasses.is_dataclass(r2)
