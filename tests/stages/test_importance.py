"""Importance scores: per-weight definitions, per-layer aggregation, combination, result views,
the pipeline stage, and activation-aware selection of high-precision weights in compress."""
from __future__ import annotations

import json
import math

import pytest
import torch

from uqcit.inputs.calibration import InputStats
from uqcit.stages.quantize import QuantizeConfig, quantize_model
from uqcit.core.config import StageConfig
from uqcit.tensor.formats import QuantFormat
from uqcit.stages.importance import (
    ImportanceConfig,
    ImportanceResult,
    LayerImportance,
    activation_source,
    combine,
    score_importance,
    weight_importance,
)
from uqcit.stages.levels import analyze_levels
from uqcit.stages.plan import uniform_plan
from uqcit.tensor.quant import codes_of
from uqcit.inputs.tiny import tiny_model

QUICK = ImportanceConfig(calib_samples=2, calib_seq_len=32)
Q0 = "model.layers.0.self_attn.q_proj"


def calib(n: int = 2, seq: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(0))


class FakeSensitivity:
    """Duck-typed stand-in for sensitivity.SensitivityResult: .modules, .formats, .kl()."""

    def __init__(self, kls: dict[str, float]):
        self.modules = list(kls)
        self.formats = ["w8-g128", "w2-g128", "fp16"]
        self._kls = kls
        self.asked: set[str] = set()

    def kl(self, module: str, format_name: str) -> float:
        self.asked.add(format_name)
        return self._kls[module] * (10.0 if format_name == "w2-g128" else 1.0)


def test_weight_scores_follow_their_definitions():
    w = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])
    assert torch.equal(weight_importance("magnitude", w), w.abs())
    stats = InputStats("m", "linear", 8, torch.tensor([1.0, 4.0, 0.0]))
    assert torch.equal(weight_importance("activation", w, stats=stats), w.abs() * torch.tensor([1.0, 2.0, 0.0]))
    fisher = torch.rand(2, 3)
    assert torch.equal(weight_importance("fisher", w, fisher=fisher), fisher)
    with pytest.raises(ValueError, match="needs input statistics"):
        weight_importance("activation", w)
    with pytest.raises(ValueError, match="per layer only"):
        weight_importance("output_information", w)


def test_activation_ranks_the_layer_with_a_loud_input_first():
    model, tok = tiny_model("llama")
    with torch.no_grad():  # input channel 5 of layer 0's q/k/v is 100x louder
        model.model.layers[0].input_layernorm.weight[5] = 100.0
    levels = analyze_levels(model)
    res = score_importance(model, levels, QUICK.replace(scores=("magnitude", "activation")),
                           calibration=calib(), progress=False)
    ranking = res.ranking("activation")
    assert set(ranking[:3]) == {Q0, "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"}
    assert res.layer(Q0).scores["magnitude"] == pytest.approx(
        float(model.get_submodule(Q0).weight.detach().abs().mean()), rel=1e-6)
    # the tied embedding is scored with the LM head's (dense) inputs
    assert activation_source(levels, "model.embed_tokens") == "lm_head"
    assert res.calibration_tokens == 64 and "scoring" in res.seconds


def test_all_scores_with_a_sensitivity_measurement_and_combination():
    model, tok = tiny_model("llama")
    levels = analyze_levels(model)
    names = [m.name for m in levels.quantizable()]
    sens = FakeSensitivity({n: float(i) for i, n in enumerate(names[1:])})  # the embedding not measured
    cfg = QUICK.replace(scores=("magnitude", "fisher", "activation", "output_information"), aggregate="sum")
    res = score_importance(model, levels, cfg, tokenizer=tok, sensitivity=sens, progress=False)
    assert sens.asked == {"w2-g128"} and res.sensitivity_format == "w2-g128"  # lowest bits by default
    assert math.isnan(res.layer(names[0]).scores["output_information"])
    assert res.layer(names[-1]).scores["output_information"] == pytest.approx(10.0 * (len(names) - 2))
    assert res.layer(Q0).scores["magnitude"] == pytest.approx(
        float(model.get_submodule(Q0).weight.detach().abs().sum()), rel=1e-5)
    combined = [lay.scores["combined"] for lay in res.layers]
    assert all(0.0 <= c <= 1.0 for c in combined)
    assert res.ranking()[0] in names
    # histograms count every weight of each level exactly once
    for s in ("magnitude", "fisher", "activation"):
        for lvl, counts in res.histograms[s].items():
            n = sum(m.numel for m in levels.quantizable() if m.level == lvl)
            assert sum(counts) + res.zeros[s][lvl] == n
    with pytest.raises(ValueError, match="needs a sensitivity measurement"):
        score_importance(model, levels, cfg, tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match="was not measured"):
        score_importance(model, levels, cfg.replace(sensitivity_format="w4-g128"), tokenizer=tok,
                         sensitivity=sens, progress=False)


def test_combine_rank_and_sum_normalizations():
    layers = [LayerImportance(f"l{i}", 2, "linear", 10, {"a": a, "b": b})
              for i, (a, b) in enumerate([(1.0, 300.0), (2.0, 100.0), (3.0, math.nan)])]
    ranks = combine(layers, ("a", "b"), {"a": 1.0, "b": 1.0}, "rank")
    assert ranks == pytest.approx([(0.0 + 1.0) / 2, (0.5 + 0.0) / 2, 1.0])  # missing b: a alone
    shares = combine(layers, ("a", "b"), {"a": 3.0, "b": 1.0}, "sum")
    assert shares[0] == pytest.approx((3 * 1 / 6 + 1 * 300 / 400) / 4)
    assert combine(layers, ("a", "b"), {"a": 1.0, "b": 0.0})[2] == pytest.approx(1.0)


def test_result_json_round_trip_and_figure_uids():
    model, tok = tiny_model("llama")
    res = score_importance(model, analyze_levels(model), QUICK, tokenizer=tok, progress=False)
    back = ImportanceResult.from_dict(json.loads(res.to_json()))
    assert back.to_dict() == res.to_dict()
    assert back.ranking("fisher") == res.ranking("fisher")
    fig = res.figure()
    uids = [t.uid for t in fig.data]
    assert len(uids) == len(set(uids)) and "importance-bars-L2" in uids and "importance-dist-L4" in uids
    assert res.figure(score="fisher", distribution="activation").data
    with pytest.raises(ValueError, match="not computed"):
        res.figure(score="output_information")
    assert "combined by rank" in res.summary() and "<table>" in res._repr_html_()


def test_config_validation_and_round_trip():
    cfg = ImportanceConfig(scores=("fisher", "output_information"), weights={"fisher": 2.0},
                           sensitivity_format="w2-g128")
    assert StageConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown score"):
        ImportanceConfig(scores=("magnitude", "vibes"))
    with pytest.raises(ValueError, match=">= 0"):
        ImportanceConfig(weights={"fisher": -1.0})


def test_pipeline_stage_runs_importance():
    from uqcit.stages.levels import LevelsConfig
    from uqcit.pipeline import Session

    model, tok = tiny_model("llama")
    s = Session(name="tiny-llama", reference=model, tokenizer=tok, progress=False)
    s.run_stage(LevelsConfig())
    res = s.run_stage(QUICK.replace(scores=("magnitude",)))
    assert isinstance(res, ImportanceResult) and s.results["importance"] is res


def test_activation_importance_keeps_the_loud_column_high_in_mixed_formats():
    model, tok = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] = 1000.0
        model.get_submodule(Q0).weight[:, 5] = 0.01  # small weights (std is 0.02): magnitude drops them all
    levels = analyze_levels(model)
    plan = uniform_plan([m.name for m in levels.quantizable()],
                        QuantFormat(bits=2, group_size=32, high_bits=16, high_fraction=0.1))
    masks = {}
    for importance in ("magnitude", "activation"):
        res = quantize_model(model, levels, plan, QuantizeConfig(importance=importance),
                             calibration=calib(), progress=False)
        q = res.model.get_submodule(Q0).qtensor
        masks[importance] = codes_of(q)["mask"].bool().view(q.shape)
    assert bool(masks["activation"][:, 5].all())
    assert not bool(masks["magnitude"][:, 5].any())
    with pytest.raises(ValueError, match="needs calibration text"):
        quantize_model(model, levels, plan, QuantizeConfig(importance="activation"), progress=False)
