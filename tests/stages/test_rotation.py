"""The G=i rotation engine (uqcit.tensor.structures, uqcit.stages.rotation, uqcit.stages.compressibility): constructions,
invariants, function-preserving folding, online rotations that survive quantization and
packaging, and the compressibility report."""
from __future__ import annotations

import json
import math

import pytest
import torch

from uqcit.stages.quantize import quantize_model
from uqcit.core.config import StageConfig
from uqcit.tensor.formats import QuantFormat
from uqcit.stages.levels import analyze_levels
from uqcit.stages.plan import uniform_plan
from uqcit.stages.compressibility import compressibility_report
from uqcit.runtime.online import (
    OnlineRotation,
    RotatedGatedMLP,
    RotatedRMSNorm,
    apply_online_rotations,
    is_rotation_key,
    rotation_tensors_for_layer_dir,
)
from uqcit.stages.rotation import RotationConfig, rotate_model
from uqcit.tensor.structures import (
    Rotation,
    UnsupportedOrderError,
    complex_structure,
    hadamard_matrix,
    j_matrix,
    paley_conference,
    random_orthogonal,
    randomized_hadamard,
    structure_layout,
    symplectic_basis,
)
from uqcit.tensor.invariants import structure_checks
from uqcit.inputs.tiny import tiny_model

ORDERS = (4, 8, 12, 20, 48, 64, 576, 1536)
LLAMA_LIKE = ("llama", "mistral", "qwen2")


def eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64)


def ids(batch: int = 2, seq: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def logits(model, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x).logits


# ------------------------------------------------------------------------------ constructions

@pytest.mark.parametrize("n", ORDERS)
def test_hadamard_matrix_is_hadamard_and_randomized_is_orthogonal_with_flat_entries(n):
    h = hadamard_matrix(n)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * eye(n))
    p = randomized_hadamard(n, seed=3)
    assert torch.allclose(p @ p.T, eye(n), atol=1e-12)
    assert torch.allclose(p.abs(), torch.full_like(p, 1 / math.sqrt(n)), atol=1e-15)
    if n >= 12:  # (for tiny n two seeds can draw the same signs)
        assert not torch.equal(p, randomized_hadamard(n, seed=4))  # the signs follow the seed


@pytest.mark.parametrize("n", ORDERS[:-1])  # 1536: three dense 1536² inverses, too slow for the fast suite
def test_random_orthogonal_and_structures_are_complex_structures(n):
    q = random_orthogonal(n, seed=1)
    assert torch.allclose(q.T @ q, eye(n), atol=1e-12)
    for g in (Rotation.hadamard(n, seed=2).matrix(), complex_structure(q),
              complex_structure(randomized_hadamard(n, 5))):
        assert torch.allclose(g + torch.linalg.inv(g), torch.zeros(n, n, dtype=g.dtype), atol=1e-10)
        assert torch.allclose(g @ g, -eye(n), atol=1e-10)
        assert torch.allclose(g.T @ g, eye(n), atol=1e-10)


def test_skew_hadamard_structure_is_flat_and_its_fast_apply_matches_the_matrix():
    rot = Rotation.hadamard(576, seed=0)
    assert rot.layout == structure_layout(576) == (72, 8)
    g = rot.matrix()
    nonzero = g[g != 0].abs()
    assert torch.allclose(nonzero, torch.full_like(nonzero, 1 / math.sqrt(71 * 8)))
    assert (g == 0).double().mean().item() == pytest.approx(1 / 72)
    x = torch.randn(3, 5, 576, dtype=torch.float64)
    assert torch.allclose(rot.apply(x), x @ g, atol=1e-12)
    # Stored as sign bits (+ its two layout integers) and rebuilt exactly from them.
    again = Rotation.from_tensors(rot.tensors(), 576)
    assert torch.equal(again.matrix(), g)
    assert rot.stored_bits == 576 + 2 * 64
    fast = Rotation.hadamard(1536, seed=0, fast=True)  # the layout online rotations use
    assert fast.layout == (48, 32) and structure_layout(1536) == (384, 4)
    assert all(c.passed for c in structure_checks(fast.matrix(), "fast 1536"))


def test_conference_matrix_and_symplectic_basis():
    c = paley_conference(20)
    assert torch.equal(c, -c.T) and torch.equal(c @ c.T, 19 * eye(20))
    for g in (Rotation.hadamard(64, 1).matrix(), Rotation.random(48, 1).matrix()):
        p = symplectic_basis(g)
        assert torch.allclose(p.T @ p, eye(g.shape[0]), atol=1e-10)
        assert torch.allclose(complex_structure(p), g, atol=1e-10)
    assert all(c.passed for c in structure_checks(Rotation.hadamard(96, 0).matrix(), "test"))


def test_odd_and_unsupported_orders_fail_clearly():
    with pytest.raises(UnsupportedOrderError, match="odd"):
        j_matrix(7)
    with pytest.raises(UnsupportedOrderError, match="odd order"):
        structure_layout(9)
    with pytest.raises(UnsupportedOrderError, match="Nearest supported orders"):
        hadamard_matrix(6)
    with pytest.raises(UnsupportedOrderError, match="unsupported='random'"):
        Rotation.hadamard(18, 0)  # even, but 18 = 2·9 and 9 has no Hadamard matrix
    assert Rotation.random(18, 0).matrix().shape == (18, 18)  # the documented fallback exists


# ------------------------------------------------------------------ function-preserving folding

@pytest.mark.parametrize("family", LLAMA_LIKE)
@pytest.mark.parametrize("kw", [
    {},
    {"online_down_proj": False, "per_head_vo": False},
    {"construction": "random", "tied_head": "untie"},
    {"construction": "optimized", "optimize_steps": 3},
], ids=["hadamard-all", "residual-only", "random-untie", "optimized"])
def test_rotated_llama_family_computes_the_same_function(family, kw):
    model, _ = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = rotate_model(model, RotationConfig(**kw), check_ids=ids(), progress=False)
    assert res.family == "llama"
    assert res.max_logit_diff < 1e-4
    assert (logits(res.model, ids(seed=1)) - logits(model, ids(seed=1))).abs().max() < 1e-4
    assert res.invariants.passed, res.invariants.worst
    # The caller's model is untouched.
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, (RotatedGatedMLP, RotatedRMSNorm, OnlineRotation)) for m in model.modules())
    online = [m for m in res.model.modules() if isinstance(m, OnlineRotation)]
    assert bool(online) == (kw.get("online_down_proj", True) or res.tied_head == "keep")
    assert res.stored_bits == sum(o.stored_bits for o in online)


def test_tied_head_keeps_its_tie_or_costs_a_counted_matrix():
    model, _ = tiny_model("llama")
    kept = rotate_model(model, RotationConfig(), progress=False).model
    assert kept.lm_head.weight is kept.model.embed_tokens.weight
    assert isinstance(kept.model.norm, RotatedRMSNorm)
    untied = rotate_model(model, RotationConfig(tied_head="untie"), progress=False)
    assert untied.model.lm_head.weight.data_ptr() != untied.model.model.embed_tokens.weight.data_ptr()
    assert untied.extra_weights == 256 * 64 and untied.tied_head == "untie"


def test_generic_family_gets_online_input_rotations():
    model, _ = tiny_model("gpt2")
    res = rotate_model(model, RotationConfig(), check_ids=ids(), progress=False)
    assert res.family == "generic" and res.max_logit_diff < 1e-4
    assert any("lm_head" in f for f in res.fallbacks)  # tied to wte: left alone, and said so
    assert all(m.online for m in res.modules)


# ------------------------------------------------------------- quantization and the package

def _quantize(model, fmt=QuantFormat(bits=8, group_size=32)):
    levels = analyze_levels(model)
    return quantize_model(model, levels, uniform_plan([m.name for m in levels.modules], fmt), progress=False)


@pytest.mark.parametrize("family", ("llama", "gpt2"))
def test_rotated_model_quantizes_and_online_rotations_survive_or_reattach(family):
    model, _ = tiny_model(family)
    res = rotate_model(model, RotationConfig(), progress=False)
    q = _quantize(res.model)
    x = ids(seed=2)
    err_plain = (logits(_quantize(model).model, x) - logits(model, x)).abs().max()
    tensors = {k: v for d in res.rotation_tensors_for_layer_dir().values() for k, v in d.items()}
    if family == "gpt2":
        # Generic input rotations hang on the replaced Linear: quantizing drops them; re-attach.
        apply_online_rotations(q.model, tensors)
    err_rot = (logits(q.model, x) - logits(model, x)).abs().max()
    assert err_rot < 3 * err_plain + 1e-3  # a lost rotation would be an O(1) error


def test_package_hooks_rebuild_the_online_rotations_on_a_fresh_model():
    from transformers import AutoModelForCausalLM

    model, _ = tiny_model("qwen2")
    res = rotate_model(model, RotationConfig(), progress=False)
    by_layer = rotation_tensors_for_layer_dir(res.model)
    assert set(by_layer) == {"layer_000", "layer_001", "layer_002", "layer_003", "outer"}
    assert all(v.dtype in (torch.uint8, torch.int64) for d in by_layer.values() for v in d.values())
    stored = sum(8 * v.numel() * v.element_size() for d in by_layer.values() for v in d.values())
    assert stored == res.stored_bits
    # What the package does: float weights without the rotation keys, then the hook.
    fresh = AutoModelForCausalLM.from_config(res.model.config).eval()
    weights = {k: v for k, v in res.model.state_dict().items() if not is_rotation_key(k)}
    fresh.load_state_dict(weights, strict=False)
    merged = {k: v for d in by_layer.values() for k, v in d.items()}
    sites = apply_online_rotations(fresh, merged)
    assert len(sites) == 5
    apply_online_rotations(fresh, merged)  # idempotent
    x = ids(seed=3)
    assert torch.equal(logits(fresh, x), logits(res.model, x))


def test_rotation_lowers_3bit_error_on_a_model_with_outlier_channels():
    model, _ = tiny_model("llama")
    with torch.no_grad():  # plant outlier input channels, as real LLM residual streams have
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                         layer.mlp.gate_proj, layer.mlp.up_proj):
                proj.weight[:, [3, 17, 40]] *= 25.0
    res = rotate_model(model, RotationConfig(), progress=False)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    comp = compressibility_report(model, res.model, modules=linear, bits=(3,), group_size=32, progress=False)
    mse_before = sum(r.before.mse[3] * r.numel for r in comp.rows)
    mse_after = sum(r.after.mse[3] * r.numel for r in comp.rows)
    # The outlier weights carry most of the energy, so weight MSE falls less than kurtosis does
    # (about 1 dB on this model); the rotation must still lower it clearly.
    assert mse_after < 0.9 * mse_before
    planted = [r for r in comp.rows if r.name.endswith("q_proj")]
    assert all(r.after.kurtosis < r.before.kurtosis for r in planted)
    assert comp.pooled_sqnr(3, "after") > comp.pooled_sqnr(3, "before")


# ------------------------------------------------------------------------ results and config

def test_config_round_trip_and_results_serialize_with_trace_uids():
    cfg = RotationConfig(construction="random", seed=4, tied_head="untie")
    assert StageConfig.from_json(cfg.to_json()) == cfg
    model, _ = tiny_model("mistral")
    res = rotate_model(model, cfg, progress=False)
    data = json.loads(res.to_json())
    assert data["max_logit_diff"] < 1e-4 and data["invariants"]["passed"]
    assert "RotationResult" in repr(res) and len(repr(res)) < 400
    comp = compressibility_report(model, res.model, group_size=32, progress=False)
    json.loads(comp.to_json())
    for fig in (res.figure(), comp.figure(), comp.histogram_figure()):
        assert all(t.uid for t in fig.data)
    row = comp.rows[0]
    assert row.after.gap_db(3) == pytest.approx(6.0206 * 3 - row.after.sqnr_db[3], abs=1e-3)


@pytest.mark.slow
def test_smollm2_rotated_float_model_matches_the_original(smollm2):
    from uqcit.inputs.corpus import calibration_batch

    x = calibration_batch(smollm2.tokenizer, n_samples=2, seq_len=64)
    res = rotate_model(smollm2.model, RotationConfig(), check_ids=x, progress=False)
    assert res.max_logit_diff < 1e-3
    assert res.invariants.passed
    assert res.model.lm_head.weight is res.model.model.embed_tokens.weight  # the tie is kept
    assert res.stored_bits < 64 * 1024  # only sign bits: no dense matrix anywhere
