"""Binary-concentration check: the precision distribution read back from a package equals its plan."""
from __future__ import annotations

import pytest

from uqcit.inputs.tiny import tiny_model
from uqcit.package import export_package
from uqcit.stages.levels import analyze_levels
from uqcit.stages.plan import PlanConfig, build_plan
from uqcit.stages.quantize import QuantizeConfig, quantize_model
from uqcit.validation.concentration import check_concentration, max_abs_diff, plan_distribution


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model("llama")
    return model, tok, analyze_levels(model)


def _package(tiny, plan, path):
    model, tok, levels = tiny
    q = quantize_model(model, levels, plan, QuantizeConfig(), progress=False)
    return export_package(q, tok, path, levels=levels)


def test_seed_preset_package_matches_plan_and_document(tiny, tmp_path):
    levels = tiny[2]
    plan = build_plan(levels, PlanConfig(group_size=32))
    res = check_concentration(_package(tiny, plan, tmp_path / "p"), levels, plan)
    assert res.vs_plan == 0.0  # exact counts read from the stored masks
    assert res.vs_document < 0.002  # only rounding of the high-precision count per module
    assert set(res.package[3]) == {"fp16", "int2"} and res.package[3]["fp16"] == pytest.approx(0.1, abs=2e-3)
    assert res.figure().data  # a stacked bar per precision


def test_other_plan_with_float_modules_is_read_back(tiny, tmp_path):
    levels = tiny[2]
    # An allocated-style plan: different patterns per level, the FFN left in float.
    plan = build_plan(levels, PlanConfig(group_size=32, level_patterns={"1": "20-80", "2": "50-50", "3": "10-90",
                                                                        "4": "30-70", "5": "46-54"},
                                         overrides={"re:.*mlp\\.up_proj": "float"}))
    res = check_concentration(_package(tiny, plan, tmp_path / "p"), levels, plan)
    assert res.vs_plan == 0.0
    assert "float32" in res.package[4] and res.vs_document > 0.1  # differs from the seed's patterns
    seed = plan_distribution(levels, build_plan(levels, PlanConfig(group_size=32)))
    assert max_abs_diff(res.package, seed) > 0.1  # the check can fail: another plan does not match
