"""The one registry of stages: every config round-trips through JSON, every handler runs, and
what a recipe may name comes from the allow-list (``STAGE_MODULES``), never from import history."""
import dataclasses
import json
import math
import subprocess
import sys

import pytest

from uqcit.core.config import (
    HANDLERS, STAGE_MODULES, ConfigError, StageConfig, config_types, handler_for, stage_order)
from uqcit.core.results import Result


@pytest.mark.parametrize("tag,cls", sorted(config_types().items()))
def test_every_config_round_trips_through_json(tag, cls):
    cfg = cls()
    back = StageConfig.from_json(cfg.to_json())
    assert type(back) is cls and back == cfg
    d = cfg.to_dict()
    assert d["type"] == tag and d["version"] == cls.version
    assert json.loads(back.to_json()) == d  # same keys, same values
    assert cls.__module__ in STAGE_MODULES


def test_every_stage_config_has_a_handler_and_the_order_is_the_allow_list():
    assert list(config_types()) == list(stage_order())
    assert stage_order() == ("rotation", "levels", "clusters", "importance", "sensitivity", "plan", "allocate",
                             "quantize", "compensate", "prune", "retrain", "eval")
    for cls in config_types().values():
        assert handler_for(cls).__module__ == cls.__module__  # the handler sits beside its config
    with pytest.raises(ConfigError, match="no handler for stage type 'base'"):
        handler_for(StageConfig)


def _small_configs():
    """Each stage with settings small enough for a tiny model, by type tag."""
    from uqcit.stages.allocate import AllocateConfig
    from uqcit.stages.clusters import ClustersConfig
    from uqcit.stages.compensate import CompensateConfig
    from uqcit.stages.evaluate import EvalConfig
    from uqcit.stages.importance import ImportanceConfig
    from uqcit.stages.levels import LevelsConfig
    from uqcit.stages.plan import PlanConfig
    from uqcit.stages.prune import PruneConfig
    from uqcit.stages.quantize import QuantizeConfig
    from uqcit.stages.retrain import RetrainConfig
    from uqcit.stages.rotation import RotationConfig
    from uqcit.stages.sensitivity import SensitivityConfig

    configs = [
        RotationConfig(group_size=32),
        LevelsConfig(),
        ClustersConfig(),
        ImportanceConfig(calib_samples=2, calib_seq_len=32),
        SensitivityConfig(formats=("w2", "w4", "w8"), group_size=32, calib_samples=2, calib_seq_len=32),
        PlanConfig(preset="uniform", bits=4, group_size=32),
        AllocateConfig(target_bpw=5.0),
        QuantizeConfig(),
        CompensateConfig(rank=2, calib_samples=2, calib_seq_len=32),
        PruneConfig(method="magnitude"),
        RetrainConfig(n_sequences=4, heldout_sequences=2, seq_len=24, prompts=("The", "A"), gen_batch=4,
                      batch_size=2, steps_per_window=1),
        EvalConfig(max_windows=1, window=128, total_tokens=1024),
    ]
    return {c.type_tag: c for c in configs}


def _numbers(value, path=""):
    """Every float or int in a JSON-like value, as (path, number) (bools excluded)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [(path, value)]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in _numbers(v, f"{path}.{k}")]
    if isinstance(value, (list, tuple)):
        return [n for i, v in enumerate(value) for n in _numbers(v, f"{path}[{i}]")]
    return []


def _finite(path: str, x: float) -> bool:
    # A module stored without error (fp16, or w8 of a tiny matrix) has an SQNR of +inf dB: true, not broken.
    return math.isfinite(x) or (path.endswith("_db") and x == math.inf)


def test_every_handler_runs_on_a_tiny_model():
    from uqcit.pipeline import Session

    small = _small_configs()
    assert set(small) == set(stage_order()), "give every registered stage small settings here"
    s = Session.from_model("tiny-llama", progress=False)
    original = s.reference
    for tag in stage_order():
        result = s.run_stage(small[tag])
        assert isinstance(result, Result) and s.results[tag] is result, tag
        numbers = _numbers(result.to_dict())
        assert numbers, f"{tag}: its result carries no numbers"
        bad = [(p, n) for p, n in numbers if not _finite(p, n)]
        assert not bad, f"{tag}: non-finite numbers {bad[:5]}"
    assert s.reference is original and s.working is s.results["rotation"].model
    assert s.compressed is s.results["retrain"].model
    assert s.results["eval"].kl > 0


def test_a_recipe_with_a_compensate_stage_loads_in_a_fresh_interpreter():
    """Only uqcit.recipe imported: the stage module comes from the allow-list, not from history."""
    from uqcit.stages.compensate import CompensateConfig

    recipe = {"type": "recipe", "version": 1, "name": "comp", "stages": [CompensateConfig(rank=4).to_dict()]}
    code = ("import json, sys\n"
            "from uqcit.recipe import Recipe\n"
            "assert 'uqcit.stages.compensate' not in sys.modules\n"
            f"r = Recipe.from_dict(json.loads({json.dumps(json.dumps(recipe))}))\n"
            "print(type(r.stages[0]).__name__, r.stages[0].rank)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["CompensateConfig", "4"]


def test_only_the_allow_list_resolves_a_type_whatever_was_imported():
    import uqcit.package.secure  # noqa: F401  (ProtectConfig: an export option, not a stage)

    with pytest.raises(ConfigError, match="unknown stage type 'protect'"):
        StageConfig.from_dict({"type": "protect"})

    @dataclasses.dataclass(frozen=True)
    class Stray(StageConfig):  # defined here, outside the allow-list
        type_tag = "stray-test"

    from uqcit.core.config import CONFIG_TYPES, register_config

    register_config(Stray)
    try:
        with pytest.raises(ConfigError, match="unknown stage type 'stray-test'"):
            StageConfig.from_dict({"type": "stray-test"})
    finally:
        CONFIG_TYPES.pop("stray-test")
    assert StageConfig not in HANDLERS
