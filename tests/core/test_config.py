import dataclasses
import re

import pytest

from uqcit.core.config import ConfigError, FrozenMap, StageConfig
from uqcit.recipe import Recipe, builtin_recipe, builtin_recipes


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


def test_recipe_with_stage_inserts_a_new_stage_in_pipeline_order():
    from uqcit.stages.clusters import ClustersConfig
    from uqcit.stages.retrain import RetrainConfig
    from uqcit.stages.rotation import RotationConfig

    r = builtin_recipe("rtn-w4-g128")  # levels, plan, quantize, eval
    tags = [s.type_tag for s in r.with_stage(RotationConfig()).with_stage(ClustersConfig())
            .with_stage(RetrainConfig()).stages]
    assert tags == ["rotation", "levels", "clusters", "plan", "quantize", "retrain", "eval"]


def test_configs_are_immutable_and_hold_no_dict():
    from uqcit.stages.allocate import AllocateConfig
    from uqcit.stages.plan import PlanConfig, build_plan

    cfg = PlanConfig()
    assert isinstance(cfg.level_patterns, FrozenMap) and cfg.level_patterns == {"1": "46-54", "2": "30-70",
                                                                               "3": "10-90", "4": "30-70",
                                                                               "5": "46-54"}
    with pytest.raises(TypeError):
        cfg.level_patterns["3"] = "46-54"  # the shared default of build_plan cannot be edited
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.bits = 2
    assert build_plan.__defaults__[0].level_patterns["3"] == "10-90"
    pins = {"re:.*q_proj": "w8-g128"}
    a = AllocateConfig(pins=pins)
    pins["re:.*k_proj"] = "float"  # the caller's dict stays the caller's
    assert dict(a.pins) == {"re:.*q_proj": "w8-g128"} and hash(a) == hash(AllocateConfig(pins=dict(a.pins)))
    assert a.to_dict()["pins"] == {"re:.*q_proj": "w8-g128"} and type(a.to_dict()["pins"]) is dict
    import copy
    import pickle

    assert copy.deepcopy(a) == a and pickle.loads(pickle.dumps(a)) == a


@pytest.mark.parametrize("make, message", [
    ("QuantizeConfig(block_size=0)", "QuantizeConfig.block_size must be >= 1, got 0"),
    ("QuantizeConfig(method='awq')", "QuantizeConfig.method must be one of ['rtn', 'gptq', 'signround'], got 'awq'"),
    ("PlanConfig(group_size=0)", "PlanConfig.group_size must be >= 1, got 0"),
    ("PlanConfig(bits=7)", "PlanConfig.bits must be one of (2, 3, 4, 5, 6, 8, 16)"),
    ("PlanConfig(overrides={'x': 'w9'})", "PlanConfig.overrides: override 'x'"),
    ("PlanConfig(level_patterns={'3': '10-80'})", "PlanConfig.level_patterns['3']"),
    ("AllocateConfig(target_bpw=0)", "AllocateConfig.target_bpw must be positive, got 0"),
    ("AllocateConfig(formats=())", "AllocateConfig.formats is empty"),
    ("AllocateConfig(pins={'x': 'w9'})", "AllocateConfig.pins: pin 'x'"),
    ("EvalConfig(window=100, total_tokens=1024)", "EvalConfig.total_tokens must be a positive multiple"),
    ("EvalConfig(max_windows=0)", "EvalConfig.max_windows must be >= 1"),
    ("ClustersConfig(threshold=1.0)", "ClustersConfig.threshold must be in [0, 1)"),
    ("SensitivityConfig(formats=())", "SensitivityConfig.formats: formats is empty"),
    ("SensitivityConfig(calib_seq_len=1)", "SensitivityConfig.calib_seq_len must be >= 2, got 1"),
    ("RotationConfig(lr=0)", "RotationConfig.lr must be > 0, got 0"),
    ("RetrainConfig(mode='full')", "RetrainConfig.mode must be one of"),
    ("PruneConfig(tau=1.0)", "PruneConfig.tau must be in [0, 1)"),
    ("CompensateConfig(rank=-1)", "CompensateConfig.rank must be >= 0, got -1"),
    ("ImportanceConfig(calib_seq_len=1)", "ImportanceConfig.calib_seq_len must be >= 2"),
    ("LevelsConfig(late_fraction=-0.1)", "LevelsConfig.late_fraction must be in [0, 1]"),
])
def test_configs_are_validated_when_built_naming_the_field(make, message):
    from uqcit.core.config import config_types

    names = {cls.__name__: cls for cls in config_types().values()}
    with pytest.raises(ConfigError, match=re.escape(message)):
        eval(make, {}, names)
    cls_name, _, args = make.partition("(")
    with pytest.raises(ConfigError, match=re.escape(message)):
        eval(f"{cls_name}().replace({args}", {}, names)  # a changed copy is validated too
