"""GPTQ error-feedback rounding: equals RTN when inputs are uncorrelated, beats it when they are
correlated, act-order, mixed formats, exact bits, the static-grid split of quantize, and the
asymmetric (GPTAQ) target."""
from __future__ import annotations

import pytest
import torch

from uqcit.tensor.formats import QuantFormat
from uqcit.tensor.gptq import asymmetric_target, gptq_quantize, hessian_error
from uqcit.tensor.quant import codes_of, dequantize, quant_params, quantize, quantize_with

OUT, IN = 64, 256


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated_inputs(n: int = 2048, width: int = IN, seed: int = 0, skew: bool = False) -> torch.Tensor:
    """Inputs with strongly correlated channels (a random mixing of a few latent factors)."""
    g = _gen(seed)
    latent = torch.randn(n, width // 8, generator=g)
    x = latent @ torch.randn(width // 8, width, generator=g) + 0.3 * torch.randn(n, width, generator=g)
    if skew:  # a few channels with inputs 10x larger: what act-order is for
        x[:, torch.randperm(width, generator=g)[: width // 16]] *= 10.0
    return x


def weights(seed: int = 1) -> torch.Tensor:
    return 0.05 * torch.randn(OUT, IN, generator=_gen(seed))


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float(torch.linalg.norm(x @ w.T - x @ w_hat.T))


def same_tensors(a, b) -> bool:
    return set(a.tensors) == set(b.tensors) and all(
        torch.equal(a.tensors[k].view(torch.int16) if a.tensors[k].dtype == torch.float16 else a.tensors[k],
                    b.tensors[k].view(torch.int16) if b.tensors[k].dtype == torch.float16 else b.tensors[k])
        for k in a.tensors)


FORMATS = [
    QuantFormat(bits=2, group_size=64),
    QuantFormat(bits=3, group_size=128),
    QuantFormat(bits=4, group_size=32, symmetric=True),
    QuantFormat(bits=2, group_size=64, high_bits=16, high_fraction=0.1),
    QuantFormat(bits=3, group_size=128, high_bits=8, high_fraction=0.3),
    QuantFormat(bits=5, group_size=64),
    QuantFormat(bits=6, group_size=32, symmetric=True),
]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_identity_hessian_gives_exactly_the_rtn_codes(fmt):
    w = weights()
    for act_order in (True, False):
        q = gptq_quantize(w, torch.eye(IN), fmt, act_order=act_order)
        assert same_tensors(q, quantize(w, fmt))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
def test_gptq_beats_rtn_on_correlated_inputs(bits):
    x = correlated_inputs()
    h = x.T @ x / x.shape[0]
    w = weights()
    fmt = QuantFormat(bits=bits, group_size=128)
    rtn = output_error(x, w, dequantize(quantize(w, fmt)))
    gptq = output_error(x, w, dequantize(gptq_quantize(w, h, fmt)))
    assert gptq < 0.6 * rtn, (bits, gptq, rtn)  # a wide margin, not a tie
    # hessian_error is the same quantity, relative: ‖X(W−Ŵ)ᵀ‖ / ‖XWᵀ‖
    q = gptq_quantize(w, h, fmt)
    assert hessian_error(w, dequantize(q), h) == pytest.approx(
        output_error(x, w, dequantize(q)) / float(torch.linalg.norm(x @ w.T)), rel=1e-3)


def test_act_order_helps_when_a_few_inputs_dominate():
    x = correlated_inputs(skew=True, seed=3)
    h = x.T @ x / x.shape[0]
    w = weights(seed=4)
    fmt = QuantFormat(bits=3, group_size=128)
    with_order = output_error(x, w, dequantize(gptq_quantize(w, h, fmt, act_order=True)))
    without = output_error(x, w, dequantize(gptq_quantize(w, h, fmt, act_order=False)))
    rtn = output_error(x, w, dequantize(quantize(w, fmt)))
    assert with_order <= without * 1.001 < rtn


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_output_is_an_ordinary_quantized_tensor_on_the_rtn_grid(fmt):
    x = correlated_inputs(seed=5)
    w = weights(seed=6)
    q = gptq_quantize(w, x.T @ x / x.shape[0], fmt)
    assert q.stored_bits == fmt.bits_for(w.numel())
    rtn = quantize(w, fmt)
    # Static grid: scales, zeros and mask are RTN's; only the codes (and fp16 values) moved.
    for name in q.tensors:
        if name.endswith(("scales", "zeros")) or name == "mask":
            assert torch.equal(q.tensors[name], rtn.tensors[name]), name
    assert not torch.equal(codes_of(q)["codes"], codes_of(rtn)["codes"])
    # Storing what it dequantizes to, on the same grid, gives the same bytes back.
    assert same_tensors(quantize_with(dequantize(q), quant_params(w, fmt)), q)


def test_mixed_format_importance_chooses_the_high_weights():
    x = correlated_inputs(seed=7)
    w = weights(seed=8)
    fmt = QuantFormat(bits=2, group_size=64, high_bits=16, high_fraction=0.1)
    importance = torch.zeros_like(w)
    importance[:, :26] = 1.0  # ~10% of weights: the first 26 columns of every row (plus ties)
    q = gptq_quantize(w, x.T @ x / x.shape[0], fmt, importance=importance)
    mask = codes_of(q)["mask"].bool().view(OUT, IN)
    assert int(mask.sum()) == fmt.high_count(w.numel())
    assert bool(mask[:, 26:].sum() == 0)
    # fp16 high weights hold their (error-compensated) value to fp16 precision
    assert bool(torch.isfinite(dequantize(q)).all())


def test_dead_inputs_and_fp16_and_bad_arguments():
    x = correlated_inputs(seed=9)
    x[:, :10] = 0.0  # ten inputs never fire on this calibration text
    h = x.T @ x / x.shape[0]
    w = weights(seed=10)
    fmt = QuantFormat(bits=3, group_size=128)
    q = gptq_quantize(w, h, fmt)
    # dead columns are rounded to nearest (kept, not zeroed): they match RTN's dequantized values
    assert torch.equal(dequantize(q)[:, :10], dequantize(quantize(w, fmt))[:, :10])
    assert output_error(x, w, dequantize(q)) < output_error(x, w, dequantize(quantize(w, fmt)))
    assert same_tensors(gptq_quantize(w, h, QuantFormat(bits=16)), quantize(w, QuantFormat(bits=16)))
    with pytest.raises(ValueError, match=r"hessian must be \[256, 256\]"):
        gptq_quantize(w, h[:10, :10], fmt)
    with pytest.raises(ValueError, match="2-D"):
        gptq_quantize(w.reshape(-1), h, fmt)
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(w, h, fmt, damp=-1.0)


def test_block_size_changes_speed_not_result():
    x = correlated_inputs(seed=11)
    h = x.T @ x / x.shape[0]
    w = weights(seed=12)
    fmt = QuantFormat(bits=3, group_size=128)
    a = dequantize(gptq_quantize(w, h, fmt, block_size=128))
    b = dequantize(gptq_quantize(w, h, fmt, block_size=7))
    # The lazy updates only reorder float additions: nearly every weight lands on the same code.
    assert float((a != b).float().mean()) < 0.01
    assert gptq_quantize(w, h, fmt).shape == (OUT, IN)
    assert torch.equal(w, weights(seed=12))  # inputs untouched
    row, h_copy = w[:1].clone(), h.clone()
    gptq_quantize(row, h, fmt)  # a single row: its transpose is contiguous, still not updated in place
    assert torch.equal(row, w[:1]) and torch.equal(h, h_copy)


def test_quant_params_split_reproduces_quantize_bytes():
    g = _gen(13)
    for fmt in FORMATS + [QuantFormat(bits=8, group_size=7), QuantFormat(bits=16)]:
        for shape in [(3,), (33, 129), (5, 7, 11)]:
            w = torch.randn(*shape, generator=g)
            assert same_tensors(quantize_with(w, quant_params(w, fmt)), quantize(w, fmt)), (fmt, shape)
    w = torch.randn(8, 8, generator=g)
    with pytest.raises(ValueError, match="shape"):
        quantize_with(w[:4], quant_params(w, FORMATS[0]))
    with pytest.raises(ValueError, match="NaN"):
        quantize_with(torch.full_like(w, float("nan")), quant_params(w, FORMATS[0]))


def test_gptq_through_quantize_model_and_the_pipeline():
    from uqcit.stages.quantize import QuantizeConfig, quantize_model
    from uqcit.stages.evaluate import EvalConfig, evaluate_many
    from uqcit.stages.levels import LevelsConfig
    from uqcit.pipeline import Session
    from uqcit.stages.plan import PlanConfig
    from uqcit.inputs.tiny import tiny_model

    model, tok = tiny_model("llama")
    s = Session(name="tiny-llama", reference=model, tokenizer=tok, progress=False)
    s.run_stage(LevelsConfig())
    s.run_stage(PlanConfig(preset="uniform", bits=3, group_size=32))
    rtn = quantize_model(model, s.results["levels"], s.plan, progress=False)
    gptq = s.run_stage(QuantizeConfig(method="gptq", calib_samples=4, calib_seq_len=64))
    assert gptq.method == "gptq" and gptq.method_name == "gptq-w3-g32"
    assert gptq.bpw == rtn.bpw and gptq.stored_bits == rtn.stored_bits
    by = {m.name: m for m in gptq.modules}
    assert by["model.embed_tokens"].method == "rtn" and by["model.layers.0.self_attn.q_proj"].method == "gptq"
    assert 0 < by["model.layers.0.self_attn.q_proj"].out_error < 1 and {"calibration", "quantize"} <= set(gptq.stage_seconds)
    ev = evaluate_many({"rtn": rtn.model, "gptq": gptq.model}, tok,
                       EvalConfig(max_windows=2, window=256, total_tokens=1024), reference=model,
                       progress=False)
    assert ev["gptq"].kl < ev["rtn"].kl
    assert not gptq.sequential
    seq = quantize_model(model, s.results["levels"], s.plan,
                         QuantizeConfig(method="gptq", sequential=True, calib_samples=4, calib_seq_len=64),
                         tokenizer=tok, progress=False)
    assert seq.sequential and seq.stored_bits == rtn.stored_bits
    assert {m.method for m in seq.modules if m.kind == "linear" and m.tied_to is None} == {"gptq"}


def test_sequential_gptq_on_an_untied_head_model():
    from uqcit.stages.quantize import QuantizeConfig, quantize_model
    from uqcit.stages.levels import analyze_levels
    from uqcit.stages.plan import uniform_plan
    from uqcit.inputs.tiny import tiny_model

    model, tok = tiny_model("mistral")  # untied LM head: outside the block stack
    levels = analyze_levels(model)
    plan = uniform_plan([m.name for m in levels.quantizable()], QuantFormat(bits=4, group_size=32))
    batch = torch.randint(0, 256, (4, 32), generator=_gen(14))
    res = quantize_model(model, levels, plan, QuantizeConfig(method="gptq", sequential=True),
                         calibration=batch, progress=False)
    by = {m.name: m for m in res.modules}
    assert res.sequential and by["lm_head"].method == "gptq" and by["model.embed_tokens"].method == "rtn"
    assert [m.name for m in res.modules] == [m.name for m in levels.quantizable()]  # model order kept
    with torch.no_grad():
        logits = res.model(input_ids=batch[:1]).logits
    assert bool(torch.isfinite(logits).all())


def test_inverse_cholesky_is_the_papers_factor():
    from uqcit.tensor.gptq import _inverse_cholesky_upper

    x = correlated_inputs(n=512, width=64, seed=15)
    h = x.T @ x / 512
    u = _inverse_cholesky_upper(h, 0.01)
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(64)
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    torch.testing.assert_close(u, reference, rtol=1e-3, atol=1e-5)
    assert torch.equal(u, torch.triu(u))
    with pytest.warns(RuntimeWarning, match="retrying"), pytest.raises(ValueError, match="singular"):
        _inverse_cholesky_upper(torch.full((4, 4), float("nan")), 0.01)


# ------------------------------------------------------------------ asymmetric calibration (GPTAQ)


def drifted_inputs(x: torch.Tensor, seed: int, scale: float = 0.1) -> torch.Tensor:
    """``x`` as a layer sees it after quantized layers before it: plus noise ``scale`` times its spread."""
    return x + scale * x.std() * torch.randn(x.shape, generator=_gen(seed), dtype=x.dtype)


def test_asymmetric_target_is_w_when_the_inputs_agree():
    x = correlated_inputs(n=512, width=64, seed=20)
    w = 0.05 * torch.randn(16, 64, generator=_gen(21))
    h = x.T @ x / 512
    for damp in (0.0, 0.01, 0.1):
        assert torch.equal(asymmetric_target(w, h, h.clone(), damp=damp), w)  # exactly: no ridge shrinkage
    # Slightly different inputs move it slightly (not at all would mean the cross term is ignored).
    xq = drifted_inputs(x, 22, scale=0.01)
    moved = float((asymmetric_target(w, xq.T @ xq / 512, x.T @ xq / 512) - w).norm() / w.norm())
    assert 1e-4 < moved < 0.1, moved


@pytest.mark.parametrize("damp", [0.0, 0.05])
def test_asymmetric_target_is_the_damped_least_squares_fit(damp):
    # The claim of the docstring, checked on the data directly: W' minimizes
    # ‖X Wᵀ − X̃ W'ᵀ‖²/N + λ‖W' − W‖² (an augmented least-squares problem, solved by lstsq).
    n, width = 400, 48
    x = correlated_inputs(n=n, width=width, seed=23).double()
    xq = drifted_inputs(x, 24, scale=0.2)
    xq[:, 5] = 0.0  # an input the quantized model never excites: its weights stay W's
    w = 0.05 * torch.randn(12, width, generator=_gen(25), dtype=torch.float64)
    h, c = xq.T @ xq / n, x.T @ xq / n
    target = asymmetric_target(w, h, c, damp=damp)
    diag = h.diagonal().clone()
    diag[5] = 1.0  # gptq_quantize's dead-input rule, which sets λ
    lam = damp * float(diag.mean())
    reg = torch.diag((lam + (diag != h.diagonal()).double()).sqrt())  # λ, and 1 + λ on the dead input
    a = torch.cat([xq / n ** 0.5, reg])
    b = torch.cat([x @ w.T / n ** 0.5, reg @ w.T])
    fit = torch.linalg.lstsq(a, b).solution.T
    assert target.dtype == torch.float32 and target.shape == w.shape
    torch.testing.assert_close(target.double(), fit, rtol=1e-4, atol=1e-6)
    assert torch.equal(target[:, 5], w[:, 5].float())


def test_gptq_on_the_asymmetric_target_matches_the_float_outputs_better():
    # Output error against the float model, ‖XWᵀ − X̃Ŵᵀ‖: plain (sequential) GPTQ rounds W on X̃, the
    # asymmetric variant rounds W'. Measured over 4 seeds: ratio 0.644-0.649 each (noise at
    # 0.1 of the inputs' spread; at 0.05 the mean ratio is 0.86, at 0.2 0.44).
    fmt = QuantFormat(bits=3, group_size=128)
    ratios = []
    for seed in range(4):
        x = correlated_inputs(seed=seed)
        xq = drifted_inputs(x, 100 + seed)
        w = weights(seed + 1)
        h, c = xq.T @ xq / x.shape[0], x.T @ xq / x.shape[0]
        plain = dequantize(gptq_quantize(w, h, fmt))
        asym_q = gptq_quantize(asymmetric_target(w, h, c), h, fmt)
        assert asym_q.stored_bits == fmt.bits_for(w.numel())
        err = {k: float(torch.linalg.norm(x @ w.T - xq @ v.T)) for k, v in
               {"plain": plain, "asym": dequantize(asym_q)}.items()}
        ratios.append(err["asym"] / err["plain"])
    assert max(ratios) < 0.8 and sum(ratios) / len(ratios) < 0.75, ratios


def test_asymmetric_target_bad_arguments():
    w, h = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match="hessian and cross"):
        asymmetric_target(w, h, torch.eye(7))
    with pytest.raises(ValueError, match="damp"):
        asymmetric_target(w, h, h, damp=-1.0)
    with pytest.raises(ValueError, match="not positive definite"):
        asymmetric_target(w, -h, h, damp=0.0)
