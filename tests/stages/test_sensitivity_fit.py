"""Predicted sensitivity cells: the per-module KL-vs-error curve and its leave-one-out check."""
import math

import pytest
import torch

from uqcit.stages.sensitivity import SensitivityResult
from uqcit.stages.sensitivity_fit import SLOPE_RANGE, leave_one_out, predict_sensitivity

FORMATS = ["w2-g128", "w3-g128", "w4-g128", "w8-g128"]


def _table(kl_of, errors):
    """A SensitivityResult whose cell (m, f) is ``kl_of(m, errors[m][f])``."""
    modules = sorted(errors)
    table = torch.tensor([[kl_of(m, errors[m][f]) for f in FORMATS] for m in modules], dtype=torch.float64)
    return SensitivityResult(modules=modules, formats=list(FORMATS), table=table, numel=[64] * len(modules),
                             levels=[2] * len(modules), seconds=torch.zeros(len(modules), dtype=torch.float64),
                             meta={"floor_kl": 1e-9})


ERRORS = {f"m{i}": {"w2-g128": 8.0 * (i + 1), "w3-g128": 2.0 * (i + 1), "w4-g128": 0.5 * (i + 1),
                    "w8-g128": 0.002 * (i + 1), "w3-g32-sym": 1.0 * (i + 1), "fp16": 0.0} for i in range(6)}


def test_a_power_law_is_recovered_exactly_inside_and_outside_the_measured_points():
    # KL = c_m E^1.5 (c differs per module): the log-log curve is a straight line of slope 1.5
    scale = {m: 1e-3 * (k + 1) ** 2 for k, m in enumerate(sorted(ERRORS))}
    sens = _table(lambda m, e: scale[m] * e ** 1.5, ERRORS)
    wide = predict_sensitivity(sens, ERRORS, ["w3-g32-sym"])
    for m in ERRORS:
        assert wide.kl(m, "w3-g32-sym") == pytest.approx(scale[m] * ERRORS[m]["w3-g32-sym"] ** 1.5, rel=1e-9)
        assert wide.kl(m, "w2-g128") == sens.kl(m, "w2-g128")  # measured cells are copied
    check = leave_one_out(sens, ERRORS, "w2-g128")  # outside the other three: extrapolated with slope 1.5
    assert check["median_ratio"] == pytest.approx(1.0) and check["spearman"] == pytest.approx(1.0)
    assert wide.meta["predicted"]["formats"] == ["w3-g32-sym"]
    assert math.isnan(float(wide.sem[0, -1]))


def test_noisy_measurements_are_made_monotone_and_extrapolation_slopes_are_bounded():
    errors = {"m": {"w2-g128": 10.0, "w3-g128": 1.0, "w4-g128": 0.1, "w8-g128": 0.01,
                    "w3-g32-sym": 0.5, "w5": 100.0, "w6": 0.001}}
    # w3 measured below w4 (noise): the curve must not fall with more error
    kls = {"w2-g128": 1.0, "w3-g128": 0.001, "w4-g128": 0.002, "w8-g128": 1e-5}
    sens = _table(lambda m, e: kls[{10.0: "w2-g128", 1.0: "w3-g128", 0.1: "w4-g128", 0.01: "w8-g128"}[e]], errors)
    wide = predict_sensitivity(sens, errors, ["w3-g32-sym"])
    assert wide.kl("m", "w3-g32-sym") >= 0.002  # between w4 (0.1) and w3 (1.0) in error: at least w4's KL
    far = predict_sensitivity(sens, {"m": dict(errors["m"], **{"w3-g32-sym": 1000.0})}, ["w3-g32-sym"])
    # 100x the largest measured error: at most SLOPE_RANGE[1] decades of KL per decade of error
    assert far.kl("m", "w3-g32-sym") <= 1.0 * 100 ** SLOPE_RANGE[1] * (1 + 1e-9)


def test_an_exact_format_predicts_zero_and_missing_errors_are_named():
    sens = _table(lambda m, e: e, ERRORS)
    errors = {m: dict(e, **{"w3-g32-sym": 0.0}) for m, e in ERRORS.items()}
    assert predict_sensitivity(sens, errors, ["w3-g32-sym"]).kl("m0", "w3-g32-sym") == 0.0
    with pytest.raises(KeyError, match="w4-g32"):
        predict_sensitivity(sens, ERRORS, ["w4-g32"])


def test_the_allocate_stage_chooses_among_predicted_formats_and_stores_what_it_planned():
    from uqcit.inputs.tiny import tiny_model
    from uqcit.pipeline import Session
    from uqcit.stages.allocate import AllocateConfig
    from uqcit.stages.levels import LevelsConfig
    from uqcit.stages.quantize import QuantizeConfig
    from uqcit.stages.sensitivity import SensitivityConfig

    model, tok = tiny_model("llama")
    s = Session(name="tiny-llama", reference=model, tokenizer=tok, progress=False)
    s.run_stage(LevelsConfig())
    s.run_stage(SensitivityConfig(formats=("w2", "w4", "w8"), group_size=32, calib_samples=2, calib_seq_len=32))
    families = ("w2-g32-iz", "w3-g32-iz", "w4-g32-sym-s6")
    alloc = s.run_stage(AllocateConfig(target_bpw=3.4, predict=families, formats=families))
    chosen = {r.format for r in alloc.rows}
    assert chosen <= set(families) and alloc.achieved_bpw <= 3.4
    assert all(r.kl is not None and r.kl > 0 for r in alloc.rows)
    quantized = s.run_stage(QuantizeConfig())
    assert quantized.bpw == pytest.approx(alloc.achieved_bpw, abs=1e-12)


def test_an_unknown_predicted_format_is_refused_by_name():
    from uqcit.core.keys import ConfigError
    from uqcit.stages.allocate import AllocateConfig

    with pytest.raises(ConfigError, match="predict"):
        AllocateConfig(predict=("w9-g32",))
