"""TensionForge compensation: the estimators against sampled data, the stage on tiny models,
its bit accounting, package round trip and pipeline stage, and one real-model check."""
from __future__ import annotations

import json
import math

import pytest
import torch

from uqcit.stages.compensate import (
    CompensateConfig,
    affine_correction,
    budget_ranks,
    compensate,
    corrected_output_noise,
    default_modules,
    lowrank_factors,
    output_noise,
    whitened_svd,
)
from uqcit.stages.quantize import quantize_model
from uqcit.core.config import ConfigError, StageConfig
from uqcit.stages.levels import analyze_levels
from uqcit.package import export_package, load_package
from uqcit.stages.plan import PlanConfig, build_plan
from uqcit.tensor.quant import dequantize
from uqcit.runtime.modules import QuantLinear
from uqcit.inputs.tiny import tiny_model


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def samples(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs with unequal channel scales, correlation and a non-zero mean (like activations)."""
    g = gen(seed)
    mix = torch.randn(d, d, generator=g) / math.sqrt(d)
    scales = torch.logspace(-1, 1, d)
    return (torch.randn(n, d, generator=g) @ mix) * scales + torch.randn(d, generator=g)


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(torch.float64)
    return (x.T @ x / x.shape[0]).to(torch.float32), x.mean(0).to(torch.float32)


def test_config_round_trip_and_errors():
    cfg = CompensateConfig(modules=r"o_proj$", rank=8, factor_format="w8-g64", scale=True)
    assert StageConfig.from_json(cfg.to_json()) == cfg
    assert cfg.method_prefix == "comp-lowrank-r8-w8-g64-scale"
    assert CompensateConfig(lowrank=False).method_prefix == "comp-bias"
    assert CompensateConfig(rank_budget=0.25).method_prefix == "comp-lowrank-b0.25-bias"
    with pytest.raises(ValueError, match="factor_format"):
        CompensateConfig(factor_format="w2-g128+w16@0.1")
    with pytest.raises(ValueError, match="nothing to do"):
        CompensateConfig(lowrank=False, bias=False)
    with pytest.raises(ConfigError, match="unknown key"):
        CompensateConfig.from_dict({"rank": 4, "ranks": 3})


def test_output_noise_is_the_sampled_output_error_ratio():
    x = samples(4000, 24)
    w, e = torch.randn(16, 24, generator=gen(1)), 0.1 * torch.randn(16, 24, generator=gen(2))
    h, _ = moments(x)
    sampled = ((x @ e.T).square().sum() / (x @ w.T).square().sum()).sqrt()
    assert output_noise(e, w, h) == pytest.approx(float(sampled), rel=1e-4)


def test_whitened_lowrank_beats_plain_svd_in_output_error():
    x = samples(4000, 32)
    h, _ = moments(x)
    w = torch.randn(20, 32, generator=gen(3))
    e = 0.2 * torch.randn(20, 32, generator=gen(4))
    u, s, _ = whitened_svd(e, h, damp=0.0)
    qa, qb = lowrank_factors(e, u, s, 4)
    whitened = output_noise(e - dequantize(qa) @ dequantize(qb), w, h)
    uu, ss, vv = torch.linalg.svd(e)
    plain = output_noise(e - (uu[:, :4] * ss[:4]) @ vv[:4], w, h)
    assert whitened < plain < output_noise(e, w, h)
    # The rank-r residual is what the remaining whitened singular values say (fp16 factors aside).
    expected = math.sqrt(float(s[4:].square().sum()) / float(((w.double() @ h.double()) * w.double()).sum()))
    assert whitened == pytest.approx(expected, rel=1e-3)
    # Full rank removes all of it.
    qa, qb = lowrank_factors(e, u, s, 20)
    assert output_noise(e - dequantize(qa) @ dequantize(qb), w, h) < 1e-3 * output_noise(e, w, h)


def test_integer_factors_cost_fewer_bits_and_stay_useful():
    x = samples(2000, 64)
    h, _ = moments(x)
    w, e = torch.randn(48, 64, generator=gen(5)), 0.2 * torch.randn(48, 64, generator=gen(6))
    u, s, _ = whitened_svd(e, h)
    fp16 = lowrank_factors(e, u, s, 8)
    int8 = lowrank_factors(e, u, s, 8, "w8-g64")
    assert sum(q.stored_bits for q in int8) < 0.6 * sum(q.stored_bits for q in fp16)
    base = output_noise(e, w, h)
    res16 = output_noise(e - dequantize(fp16[0]) @ dequantize(fp16[1]), w, h)
    res8 = output_noise(e - dequantize(int8[0]) @ dequantize(int8[1]), w, h)
    assert res16 <= res8 < 0.95 * base


def test_affine_correction_matches_sampled_least_squares():
    x = samples(3000, 24, seed=7)
    h, mu = moments(x)
    w = torch.randn(10, 24, generator=gen(8))
    w_hat = 0.9 * w + 0.05 * torch.randn(10, 24, generator=gen(9))  # shrunk: a scale error to fix
    y, yh = (x @ w.T).double(), (x @ w_hat.T).double()
    _, beta = affine_correction(w, w_hat, h, mu, scale=False)
    assert torch.allclose((y - yh).mean(0).float(), beta, atol=1e-4)  # bias: the mean error
    alpha, beta2 = affine_correction(w, w_hat, h, mu, scale=True)
    for n in range(3):  # the per-output least-squares line through the samples
        design = torch.stack([yh[:, n], torch.ones_like(yh[:, n])], 1)
        sol = torch.linalg.lstsq(design, y[:, n:n + 1]).solution.squeeze(1)
        assert float(alpha[n]) == pytest.approx(float(sol[0]), rel=1e-3)
        assert float(beta2[n]) == pytest.approx(float(sol[1]), rel=1e-3, abs=1e-3)
    sampled = lambda a, b: float(((y - (yh if a is None else yh * a.double()) - b.double()).square().sum()  # noqa: E731
                                  / y.square().sum()).sqrt())
    for a, b in ((None, beta), (alpha, beta2)):
        assert corrected_output_noise(w, w_hat, h, mu, a, b) == pytest.approx(sampled(a, b), rel=1e-3)
    assert sampled(alpha, beta2) < sampled(None, beta) < output_noise(w - w_hat, w, h)


def test_budget_ranks_spend_within_budget_on_the_best_directions():
    spectra = {"a": torch.tensor([10.0, 1.0, 0.1]), "b": torch.tensor([5.0, 4.0, 3.0])}
    signal, costs = {"a": 100.0, "b": 100.0}, {"a": 10, "b": 10}
    assert budget_ranks(spectra, signal, costs, 30) == {"a": 1, "b": 2}
    assert budget_ranks(spectra, signal, costs, 9) == {"a": 0, "b": 0}
    assert sum(budget_ranks(spectra, signal, costs, 1000).values()) == 6


@pytest.fixture(scope="module")
def w3_llama():
    model, tok = tiny_model("llama")
    levels = analyze_levels(model)
    q = quantize_model(model, levels, build_plan(levels, PlanConfig(preset="uniform", bits=3, group_size=32)),
                       progress=False)
    calib = torch.randint(0, 256, (8, 48), generator=gen(0))
    return model, tok, levels, q, calib


def test_compensate_level3_layers_with_counted_bits(w3_llama):
    model, tok, levels, q, calib = w3_llama
    res = compensate(q, model, levels, CompensateConfig(rank=4), calibration=calib, progress=False)
    names = [m.name for m in res.compensated]
    assert names == default_modules(levels) and all(n.endswith("o_proj") for n in names)
    for m in res.compensated:
        layer = res.model.get_submodule(m.name)
        out_f, in_f = layer.out_features, layer.in_features
        assert m.rank == 4 and m.extra_bits == 16 * 4 * (out_f + in_f) + 16 * out_f
        assert m.extra_bits == layer.compensation.stored_bits
        assert m.output_noise_after < 0.9 * m.output_noise
    assert res.stored_bits == q.stored_bits + sum(m.extra_bits for m in res.compensated)
    assert res.bpw == pytest.approx(res.stored_bits / q.weight_count)
    assert res.method_name == "comp-lowrank-r4-bias-" + q.method_name
    # Every quantized Linear has a noise estimate; the input model was not modified.
    assert set(res.noise) == {m.name for m in q.stored if isinstance(q.model.get_submodule(m.name), QuantLinear)}
    assert all(getattr(mod, "compensation", None) is None for mod in q.model.modules())
    assert "output noise" in res.summary() and len(res.figure().data) == 2


def test_compensation_makes_the_model_closer_to_the_reference(w3_llama):
    model, tok, levels, q, calib = w3_llama
    ids = torch.randint(0, 256, (4, 48), generator=gen(1))  # not the calibration text
    res = compensate(q, model, levels, CompensateConfig(modules=r"_proj$", rank=8), calibration=calib,
                     progress=False)
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits, -1)
        kl = lambda m: float(torch.sum(ref.exp() * (ref - torch.log_softmax(m(ids).logits, -1)), -1).mean())  # noqa: E731
        assert kl(res.model) < kl(q.model)


def test_rank_budget_is_respected(w3_llama):
    model, tok, levels, q, calib = w3_llama
    cfg = CompensateConfig(modules=r"_proj$", rank_budget=0.5)
    res = compensate(q, model, levels, cfg, calibration=calib, progress=False)
    numel = sum(m.numel for m in res.compensated)
    assert res.extra_bits <= 0.5 * numel
    assert len({m.rank for m in res.compensated}) > 1  # the greedy choice differs between layers


def test_package_round_trip_keeps_compensation(w3_llama, tmp_path):
    model, tok, levels, q, calib = w3_llama
    res = compensate(q, model, levels, CompensateConfig(rank=4, scale=True, factor_format="w8-g32"),
                     calibration=calib, progress=False)
    path = export_package(res, tok, tmp_path / "pkg", levels=levels)
    loaded = load_package(path, progress=False)
    ids = torch.randint(0, 256, (2, 40), generator=gen(2))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, res.model(ids).logits)
    meta = loaded.metadata
    assert meta["method"] == res.method_name and meta["average_bits_per_param"] == pytest.approx(res.bpw)
    entry = meta["modules"][res.compensated[0].name]
    assert entry["compensation"]["lowrank"]["a"]["format"] == "w8-g32"
    profile = json.loads((path / "validation" / "noise_profile.json").read_text())
    assert set(profile["modules"]) == set(res.noise)
    assert profile["modules"][res.compensated[0].name]["compensated"] is True


def test_pipeline_stage_compensates_after_quantize():
    from uqcit.pipeline import Session
    from uqcit.stages.levels import LevelsConfig
    from uqcit.stages.quantize import QuantizeConfig

    s = Session.from_model("tiny-llama", progress=False)
    for cfg in (LevelsConfig(), PlanConfig(preset="uniform", bits=3, group_size=32), QuantizeConfig()):
        s.run_stage(cfg)
    with pytest.raises(ValueError, match="matches no quantizable module"):
        s.run_stage(CompensateConfig(modules="no_such_layer", calib_samples=2, calib_seq_len=32))
    res = s.run_stage(CompensateConfig(rank=2, calib_samples=2, calib_seq_len=32))
    assert s.compressed is res.model


@pytest.mark.slow
def test_smollm2_level3_compensation_reduces_output_noise(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    levels = analyze_levels(model)
    plan = build_plan(levels, PlanConfig(preset="uniform", bits=3))
    q = quantize_model(model, levels, plan, progress=False)
    res = compensate(q, model, levels, CompensateConfig(rank=8, calib_samples=4, calib_seq_len=128),
                     tokenizer=tok, progress=False)
    level3 = [m.name for m in levels.modules if m.level == 3]  # o_proj of blocks 0-26 (27-29 are late: L5)
    assert sorted(m.name for m in res.compensated) == sorted(level3) and len(level3) == 27
    assert len(res.noise) == 210  # every Linear but the tied head
    assert all(m.output_noise_after < m.output_noise for m in res.compensated)
    assert res.extra_bits / res.weight_count < 0.05
