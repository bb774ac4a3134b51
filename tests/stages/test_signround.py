"""Learned rounding (SignRound): exact storage, better than its start, deterministic, composable."""
from __future__ import annotations

import pytest
import torch

from uqcit.inputs.calibration import collect_input_stats
from uqcit.inputs.tiny import tiny_model
from uqcit.stages.evaluate import EvalConfig, evaluate_many
from uqcit.stages.levels import analyze_levels
from uqcit.stages.plan import uniform_plan
from uqcit.stages.quantize import QuantizeConfig, quantize_model
from uqcit.tensor.formats import QuantFormat, parse_format
from uqcit.tensor.gptq import hessian_error
from uqcit.tensor.learned import LearnedTable, LearnedWeight, learned_weight, supports
from uqcit.tensor.quant import dequantize, quantize


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model("llama")
    levels = analyze_levels(model)
    batch = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(3))
    return model, tok, levels, batch


def _run(tiny, fmt: str, **cfg):
    model, _, levels, batch = tiny
    plan = uniform_plan([m.name for m in levels.quantizable() if m.kind != "embedding"], parse_format(fmt))
    config = QuantizeConfig(**{"method": "signround", "iters": 20, "micro_batch": 4, **cfg})
    return quantize_model(model, levels, plan, config, calibration=batch, progress=False)


@pytest.mark.parametrize("fmt", ["w4-g32", "w3-g32-iz", "w4-g32-sym"])
def test_learned_weight_stores_exactly_what_it_trains(fmt):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    lw = LearnedWeight(w, parse_format(fmt))
    with torch.no_grad():
        lw.v.uniform_(-0.5, 0.5)
        lw.alpha.fill_(0.8)
    q = lw.quantized()
    assert q.stored_bits == q.fmt.bits_for(w.numel())
    assert torch.equal(dequantize(q), lw().detach())


def test_learned_weight_starts_at_round_to_nearest():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    fmt = QuantFormat(bits=3, group_size=32)
    assert torch.equal(LearnedWeight(w, fmt)().detach(), dequantize(quantize(w, fmt)))
    assert not supports(QuantFormat(bits=3, group_size=48), (16, 64))  # groups must tile the tensor
    assert not supports(parse_format("w2-g32+w16@0.1"), (16, 64))


@pytest.mark.parametrize("fmt", ["w4-g32-nl", "w3-g32-lut", "w2-g64-lut"])
def test_learned_table_starts_at_the_nearest_level_and_stores_exactly_what_it_trains(fmt):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    lt = learned_weight(w, parse_format(fmt))
    assert isinstance(lt, LearnedTable) and supports(lt.fmt, (16, 64))
    start = quantize(w, lt.fmt)
    assert torch.equal(lt().detach(), dequantize(start))  # v = 0, alpha = 1: quantize's codes
    with torch.no_grad():
        lt.v.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(1))
        lt.alpha.fill_(0.9)
    q = lt.quantized()
    assert q.stored_bits == q.fmt.bits_for(w.numel()) and torch.equal(q.tensors["table"], start.tensors["table"])
    assert torch.equal(dequantize(q), lt().detach()) and not torch.equal(dequantize(q), dequantize(start))
    lt().square().sum().backward()  # the offsets and clipping get gradients through the table
    assert float(lt.v.grad.abs().sum()) > 0 and float(lt.alpha.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="lookup tables"):
        LearnedWeight(w, lt.fmt)


@pytest.mark.parametrize("fmt", ["w3-g32-lut", "w2-g32-vq2"])
def test_signround_on_tables_and_codebooks_beats_rounding_to_the_nearest_point(tiny, fmt):
    model, tok, levels, batch = tiny
    sr = _run(tiny, fmt)
    rtn = quantize_model(model, levels, sr.plan, progress=False)
    assert sr.stored_bits == rtn.stored_bits and {m.method for m in sr.stored} == {"signround"}
    assert all(r.mse_learned < r.mse_rtn and r.kept == "learned" for r in sr.rounding)
    if fmt.endswith("-lut"):  # codebooks: the block errors fall 3-5x, but on this random tiny model and its
        # random-token calibration the KL of 2 windows does not follow (measured on SmolLM2 in the benchmarks)
        ev = evaluate_many({"rtn": rtn.model, "sr": sr.model}, tok,
                           EvalConfig(max_windows=2, window=256, total_tokens=1024), reference=model, progress=False)
        assert ev["sr"].kl < ev["rtn"].kl
    else:
        assert sum(r.mse_learned for r in sr.rounding) < 0.5 * sum(r.mse_rtn for r in sr.rounding)


def test_signround_beats_rtn_and_gptq_stores_the_planned_bits_and_repeats(tiny):
    model, tok, levels, batch = tiny
    sr = _run(tiny, "w2-g32")
    plan = sr.plan
    rtn = quantize_model(model, levels, plan, progress=False)
    gptq = quantize_model(model, levels, plan, QuantizeConfig(method="gptq"), calibration=batch, progress=False)
    assert sr.method_name == "signround-w2-g32" and sr.stored_bits == rtn.stored_bits
    assert {m.method for m in sr.stored} == {"signround"}
    assert all(r.mse_learned < r.mse_rtn and r.kept == "learned" for r in sr.rounding)
    assert len(sr.rounding) == len(model.model.layers)
    ev = evaluate_many({"rtn": rtn.model, "gptq": gptq.model, "sr": sr.model}, tok,
                       EvalConfig(max_windows=2, window=256, total_tokens=1024), reference=model,
                       progress=False)
    assert ev["sr"].kl < ev["gptq"].kl < ev["rtn"].kl
    again = _run(tiny, "w2-g32")
    for a, b in zip(sr.stored, again.stored):
        assert (a.name, a.rel_error) == (b.name, b.rel_error)


def test_zero_iterations_is_round_to_nearest_on_the_full_range(tiny):
    model, _, levels, _ = tiny
    sr = _run(tiny, "w4-g32", iters=0)
    rtn = quantize_model(model, levels, sr.plan, progress=False)
    by = {m.name: m for m in rtn.stored}
    # The same min/max grid (up to quantize's one-ulp scale step for fp16-rounded scales).
    assert all(m.rel_error == pytest.approx(by[m.name].rel_error, rel=1e-2) for m in sr.stored)



def test_groups_that_do_not_tile_a_weight_fall_back_to_rtn_with_a_warning(tiny):
    model, _, levels, _ = tiny
    shapes = {tuple(model.get_submodule(m.name).weight.shape) for m in levels.quantizable() if m.kind != "embedding"}
    assert all((a * b) % 48 for a, b in shapes)  # no block weight of the tiny model is a multiple of 48 values
    with pytest.warns(UserWarning, match=r"learned rounding skips \d+ of \d+ planned modules .* do not tile"):
        sr = _run(tiny, "w4-g48")
    assert sr.rounding == []  # nothing was learned
    rtn = quantize_model(model, levels, sr.plan, progress=False)
    assert [(m.name, m.method, m.rel_error) for m in sr.stored] == [(m.name, m.method, m.rel_error) for m in rtn.stored]


def test_head_feedback_rounds_a_tied_embedding_against_the_heads_inputs(tiny):
    # The objective: the head's output error on its calibration inputs, tr(ΔW H ΔWᵀ). (On
    # SmolLM2, w3-g64-iz embedding only, 6 windows: KL 0.553 with rounding to nearest, 0.206 with
    # feedback; a random tiny model's lookup error hides the gain in its logits.)
    model, _, levels, batch = tiny
    emb = next(m for m in levels.quantizable() if m.kind == "embedding")
    head = next(m.name for m in levels.modules if m.tied_to == emb.name)
    plan = uniform_plan([emb.name], parse_format("w2-g32"))
    runs = {fb: quantize_model(model, levels, plan, QuantizeConfig(method="gptq", head_feedback=fb),
                               calibration=batch, progress=False) for fb in (False, True)}
    assert {m.method for m in runs[False].stored} == {"rtn"} and {m.method for m in runs[True].stored} == {"gptq"}
    assert runs[True].stored_bits == runs[False].stored_bits
    h = collect_input_stats(model, batch, [head], progress=False)[head].hessian
    w = model.get_submodule(emb.name).weight.detach()
    err = {fb: hessian_error(w, dequantize(r.model.get_submodule(emb.name).qtensor), h) for fb, r in runs.items()}
    assert err[True] < 0.9 * err[False], err  # measured: 0.292 vs 0.374


def test_calibration_sources_corpus_self_and_mix(tiny):
    """"self" samples text from the float model (its prompts lead each row); "mix" is half of
    each, corpus rows first; both are the same under the same seed, and different from the corpus."""
    from uqcit.inputs.selftext import DEFAULT_PROMPTS, encode
    from uqcit.stages.quantize import _calibration

    model, tok, _, _ = tiny
    batches = {src: _calibration(model, tok, None, QuantizeConfig(calib_samples=4, calib_seq_len=64,
                                                                  calib_source=src), "test", False)
               for src in ("corpus", "self", "mix")}
    assert all(b.shape == (4, 64) for b in batches.values())
    first = encode(tok, DEFAULT_PROMPTS[0])
    assert torch.equal(batches["self"][0, :first.numel()], first)
    assert torch.equal(batches["mix"][:2], batches["corpus"][:2])
    assert torch.equal(batches["mix"][2:], batches["self"][:2])
    assert not torch.equal(batches["self"], batches["corpus"])
    again = _calibration(model, tok, None, QuantizeConfig(calib_samples=4, calib_seq_len=64, calib_source="self"),
                         "test", False)
    assert torch.equal(again, batches["self"])
    with pytest.raises(ValueError, match="calib_source"):
        QuantizeConfig(calib_source="web")
