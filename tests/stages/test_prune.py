import doctest
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import uqcit.stages.prune
from uqcit.inputs.calibration import InputStats
from uqcit.core.config import ConfigError, StageConfig
from uqcit.stages.levels import analyze_levels
from uqcit.package import export_package, load_package, read_metadata
from uqcit.stages.prune import (
    MaskedLinear,
    PruneConfig,
    prime_indices,
    prime_mask,
    prune_model,
    quantile_threshold,
    row_topk_mask,
    sparse_decode,
    sparse_encode,
    sparse_storage,
    topk_mask,
)
from uqcit.inputs.tiny import tiny_model

GEN = torch.Generator().manual_seed(0)


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_doctests():
    assert doctest.testmod(uqcit.stages.prune).failed == 0


@pytest.mark.parametrize("base", [0, 1])
def test_prime_indices_follow_the_stated_convention(base):
    got = prime_indices(1000, base)
    assert got.tolist() == [_is_prime(i + base) for i in range(1000)]
    assert int(prime_indices(1000, 0).sum()) == 168  # π(999)
    assert prime_indices(0, base).numel() == 0


def test_quantile_threshold_keeps_the_top_share():
    v = torch.arange(1, 101, dtype=torch.float32).flip(0)
    t = quantile_threshold(v, 0.8)
    assert t == 80.0 and int((v > t).sum()) == 20
    assert quantile_threshold(v, 0.0) == -math.inf
    assert quantile_threshold(torch.empty(0), 0.8) == math.inf
    ties = torch.tensor([1.0, 2.0, 2.0, 2.0, 2.0])
    assert int((ties > quantile_threshold(ties, 0.8)).sum()) == 0  # ties at the threshold are dropped


@pytest.mark.parametrize("base,over", list(itertools.product([0, 1], ["prime", "matrix"])))
def test_prime_mask_matches_the_rule_entry_by_entry(base, over):
    w = torch.randn(23, 31, generator=GEN)
    mask, thr = prime_mask(w, 0.8, quantile_over=over, index_base=base)
    pool = [abs(float(w[i, j])) for i in range(23) for j in range(31)
            if over == "matrix" or (_is_prime(i + base) and _is_prime(j + base))]
    pool.sort()
    expected_thr = pool[math.ceil(0.8 * len(pool)) - 1]
    assert thr == pytest.approx(expected_thr)
    for i in range(23):
        for j in range(31):
            keep = _is_prime(i + base) and _is_prime(j + base) and abs(float(w[i, j])) > expected_thr
            assert bool(mask[i, j]) == keep, (i, j)
    if over == "prime":  # top 20% of the prime-indexed entries (no ties in random floats)
        assert int(mask.sum()) == len(pool) - math.ceil(0.8 * len(pool))


def test_topk_masks_keep_exactly_k_and_rows_are_balanced():
    s = torch.rand(7, 10, generator=GEN)
    m = topk_mask(s, 13)
    assert int(m.sum()) == 13 and s[m].min() >= s[~m].max()
    r = row_topk_mask(s, 23)  # 3 per row, 2 rows get a 4th
    assert int(r.sum()) == 23
    per_row = r.sum(1)
    assert sorted(per_row.tolist()) == [3] * 5 + [4] * 2
    for i in range(7):  # each row keeps its own largest
        assert s[i][r[i]].min() >= s[i][~r[i]].max()
    fourth = s.sort(1, descending=True).values[:, 3]
    assert set(torch.nonzero(per_row == 4).flatten().tolist()) == set(fourth.topk(2).indices.tolist())
    assert bool(row_topk_mask(s, 70).all()) and not bool(row_topk_mask(s, 0).any())
    with pytest.raises(ValueError):
        topk_mask(s, 71)


def test_wanda_score_prefers_weights_on_loud_inputs():
    w = torch.ones(4, 6)
    w[:, 0] = 2.0  # largest magnitudes in column 0 ...
    stats = InputStats("x", "linear", 10, torch.tensor([1.0, 1, 1, 1, 1, 100.0]))  # ... loudest input is 5
    from uqcit.inputs.calibration import channel_importance

    wanda = row_topk_mask(channel_importance(stats, w), 4)
    magnitude = topk_mask(w.abs(), 4)
    assert wanda[:, 5].all() and not wanda[:, 0].any()
    assert magnitude[:, 0].all()


@pytest.mark.parametrize("layout,kept", [("indices", 5), ("bitmap", 700)])
def test_sparse_round_trip_and_the_smaller_layout(layout, kept):
    w = torch.randn(40, 30, generator=GEN)
    mask = topk_mask(torch.rand(40, 30, generator=GEN), kept)
    enc = sparse_encode(w, mask)
    assert layout in enc and set(enc) == {"values", layout}
    chosen, bits = sparse_storage(1200, kept)
    assert chosen == layout
    assert bits == 8 * sum(t.numel() * t.element_size() for t in enc.values())
    other = 1200 if layout == "indices" else kept * 16  # bitmap bits / uint16 index bits
    assert bits - 32 * kept < other
    weight, m = sparse_decode(enc, (40, 30))
    assert torch.equal(m, mask) and torch.equal(weight, w * mask)


def test_prune_model_keeps_the_contract_and_leaves_the_caller_model_alone():
    model, tok = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    levels = analyze_levels(model)
    res = prune_model(model, levels, PruneConfig(), progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, MaskedLinear) for m in model.modules())

    named = dict(res.model.named_modules())
    assert len(res.stored) == 28  # 4 blocks x 7 Linears; the tied embedding/head stay dense
    assert type(named["model.embed_tokens"]) is torch.nn.Embedding
    assert type(named["lm_head"]) is torch.nn.Linear
    for rec in res.stored:
        mod = named[rec.name]
        x = torch.randn(3, mod.in_features, generator=GEN)
        assert isinstance(mod, MaskedLinear) and isinstance(mod.weight, torch.nn.Parameter)
        assert mod.mask.dtype == torch.bool and mod.mask.shape == mod.weight.shape
        assert "mask" in dict(mod.named_buffers())
        assert bool((mod.weight[~mod.mask] == 0).all()) and int(mod.mask.sum()) == rec.kept
        orig = dict(model.named_modules())[rec.name]
        assert torch.equal(mod.weight[mod.mask], orig.weight[mod.mask])
        assert torch.equal(mod(x), F.linear(x, orig.weight * mod.mask, orig.bias))
    # gradients never reach a pruned weight's effect
    mod = named[res.stored[0].name]
    x = torch.randn(3, mod.in_features, generator=GEN)
    with torch.no_grad():  # inference skips the product: the zeros are the contract
        assert torch.equal(mod(x), F.linear(x, mod.weight * mod.mask))
    mod.weight.data[~mod.mask] = 1.0
    mod(x).sum().backward()
    assert bool((mod.weight.grad[~mod.mask] == 0).all())
    with torch.no_grad():
        assert not torch.equal(mod(x), F.linear(x, mod.weight * mod.mask))
        mod.apply_mask_()
        assert torch.equal(mod(x), F.linear(x, mod.weight * mod.mask))


def test_pruned_model_computes_the_original_with_pruned_weights_zeroed():
    model, _ = tiny_model("qwen2")
    levels = analyze_levels(model)
    res = prune_model(model, levels, PruneConfig(method="magnitude", kept_fraction=0.3), progress=False)
    manual = tiny_model("qwen2")[0]
    named = dict(manual.named_modules())
    with torch.no_grad():
        for name, mask in res.masks().items():
            named[name].weight.mul_(mask)
    ids = torch.randint(0, 256, (2, 20), generator=GEN)
    torch.testing.assert_close(_logits(res.model, ids), _logits(manual, ids))
    assert not torch.allclose(_logits(res.model, ids), _logits(model, ids))


def test_baselines_match_prime_kept_counts_layer_by_layer():
    model, tok = tiny_model("llama")
    levels = analyze_levels(model)
    prime = prune_model(model, levels, PruneConfig(tau=0.5), progress=False)
    batch = torch.randint(0, 256, (2, 32), generator=GEN)
    for method in ("magnitude", "wanda"):
        other = prune_model(model, levels, PruneConfig(method=method, tau=0.5, match_prime=True),
                            calibration=batch, progress=False)
        assert [m.kept for m in other.stored] == [m.kept for m in prime.stored]
        assert other.method_name == f"{method}-as-prime-tau0.5"
        # same budget, different weights: the baselines are not restricted to prime indices
        assert any(not torch.equal(other.masks()[n], m) for n, m in prime.masks().items())
    wanda = prune_model(model, levels, PruneConfig(method="wanda", kept_fraction=0.25), calibration=batch,
                        progress=False)
    for name, mask in wanda.masks().items():  # Wanda compares within each output row
        assert mask.sum(1).max() - mask.sum(1).min() <= 1
        assert int(mask.sum()) == round(0.25 * mask.numel())


def test_wanda_needs_calibration_text_and_can_reuse_statistics():
    model, tok = tiny_model("llama")
    levels = analyze_levels(model)
    with pytest.raises(ValueError, match="tokenizer"):
        prune_model(model, levels, PruneConfig(method="wanda"), progress=False)
    cfg = PruneConfig(method="wanda", calib_samples=2, calib_seq_len=16)
    a = prune_model(model, levels, cfg, tokenizer=tok, progress=False)
    from uqcit.inputs.calibration import collect_input_stats
    from uqcit.inputs.corpus import calibration_batch
    from uqcit.stages.prune import prune_targets

    batch = calibration_batch(tok, n_samples=2, seq_len=16, seed=0)
    stats = collect_input_stats(model, batch, [e.name for e in prune_targets(levels, cfg)], hessian=False,
                                progress=False)
    b = prune_model(model, levels, cfg, stats=stats, progress=False)
    assert "calibration" in a.stage_seconds and "calibration" not in b.stage_seconds
    assert all(torch.equal(a.masks()[n], m) for n, m in b.masks().items())


def test_which_layers_are_pruned_is_recipe_controlled():
    model, _ = tiny_model("mistral")  # untied LM head
    levels = analyze_levels(model)
    ffn = prune_model(model, levels, PruneConfig(levels=(4,)), progress=False)
    assert {m.level for m in ffn.stored} == {4} and all(".mlp." in m.name for m in ffn.stored)
    assert all(m.block is not None for m in levels.modules if m.name in {r.name for r in ffn.stored})
    one = prune_model(model, levels, PruneConfig(modules=r"layers\.0\.self_attn\.q_proj$"), progress=False)
    assert [m.name for m in one.stored] == ["model.layers.0.self_attn.q_proj"]
    head = prune_model(model, levels, PruneConfig(method="magnitude", outside_blocks=True), progress=False)
    assert isinstance(head.model.lm_head, MaskedLinear)
    assert type(head.model.model.embed_tokens) is torch.nn.Embedding  # level 1 not asked for
    with pytest.raises(ValueError, match="selects no layer"):
        prune_model(model, levels, PruneConfig(levels=(1,)), progress=False)  # embeddings are outside blocks


@pytest.mark.parametrize("method", ["prime", "wanda"])
def test_a_pruned_embedding_shares_weight_and_mask_with_its_tied_head(method, tmp_path):
    model, tok = tiny_model("llama")  # tied embedding / LM head
    levels = analyze_levels(model)
    cfg = PruneConfig(method=method, levels=(1,), outside_blocks=True, tau=0.5, kept_fraction=0.3)
    res = prune_model(model, levels, cfg, calibration=torch.randint(0, 256, (2, 16), generator=GEN),
                      progress=False)
    emb, head = res.model.model.embed_tokens, res.model.lm_head
    assert isinstance(emb, uqcit.stages.prune.MaskedEmbedding) and isinstance(head, MaskedLinear)
    assert head.weight is emb.weight and head.mask is emb.mask
    assert [m.name for m in res.stored] == ["model.embed_tokens"] and res.modules[-1].tied_to == "model.embed_tokens"
    ids = torch.randint(0, 256, (2, 12), generator=GEN)
    manual = tiny_model("llama")[0]
    with torch.no_grad():
        manual.model.embed_tokens.weight.mul_(emb.mask)  # tied: the head sees it too
    torch.testing.assert_close(_logits(res.model, ids), _logits(manual, ids))
    loaded = load_package(export_package(res, tok, tmp_path / "pkg"), progress=False).model
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(_logits(loaded, ids), _logits(res.model, ids))


def test_accounting_totals_and_the_n_over_ln_n_claim():
    model, _ = tiny_model("llama")
    levels = analyze_levels(model)
    res = prune_model(model, levels, PruneConfig(), progress=False)
    acc = res.accounting()
    p, w = acc["pruned_layers"], acc["whole_model"]
    assert p["N"] == sum(m.numel for m in res.stored) == res.weight_count
    assert p["kept"] == sum(int(m.sum()) for m in res.masks().values())
    assert p["claim_n_over_ln_n"] == pytest.approx(p["N"] / math.log(p["N"]))
    assert w["N"] == levels.total_params and w["stored_weights"] == p["kept"] + (w["N"] - p["N"])
    for m in res.stored:
        rows = sum(_is_prime(i) for i in range(m.shape[0]))
        cols = sum(_is_prime(j) for j in range(m.shape[1]))
        assert (m.prime_rows, m.prime_cols, m.candidates) == (rows, cols, rows * cols)
        assert m.kept <= m.candidates
        assert m.claim == pytest.approx(m.numel / math.log(m.numel))
    d = json.loads(res.to_json())
    assert d["method"] == "prime-tau0.8" and len(d["modules"]) == len(res.modules)
    fig = res.figure()
    assert all(t.uid for t in fig.data) and {t.name for t in fig.data} >= {"seed claim: 1 / ln N"}
    assert "kept" in res._repr_html_() and "prime-tau0.8" in repr(res)


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral"])
def test_package_stores_pruned_layers_sparse_and_loads_them_back(family, tmp_path):
    model, tok = tiny_model(family)
    levels = analyze_levels(model)
    res = prune_model(model, levels, PruneConfig(method="magnitude", kept_fraction=0.2, outside_blocks=True),
                      progress=False)
    path = export_package(res, tok, tmp_path / "pkg", source_model=f"tiny-{family}", levels=levels)
    loaded = load_package(path, progress=False)
    ids = torch.randint(0, 256, (2, 24), generator=GEN)
    assert torch.equal(_logits(loaded.model, ids), _logits(res.model, ids))
    pruned = {m.name for m in res.stored}
    assert {n for n, m in loaded.model.named_modules() if isinstance(m, MaskedLinear)} == pruned
    # no dense copy of a pruned weight in the files; bits reported are the bytes stored
    stored_bits = 0
    for f in (path / "layers").glob("*/weights.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                module, part = key.rsplit(".", 1)
                if module in pruned:
                    assert part in ("values", "bitmap", "indices", "bias"), key
                    if part != "bias":
                        t = st.get_tensor(key)
                        stored_bits += 8 * t.numel() * t.element_size()
    assert stored_bits == res.stored_bits
    meta = read_metadata(path)
    assert meta["method"] == "magnitude-keep0.2-L2345-outer" and meta["plan"] is None
    assert meta["pruning"]["accounting"]["pruned_layers"]["kept"] == res.kept
    pmap = {}
    for f in (path / "layers").glob("*/precision_map.json"):
        pmap.update(json.loads(f.read_text()))
    assert sum(v["stored_bits"] for k, v in pmap.items() if k in pruned) == res.stored_bits


def test_float16_values_are_what_the_model_runs(tmp_path):
    model, tok = tiny_model("llama")
    levels = analyze_levels(model)
    res = prune_model(model, levels, PruneConfig(value_dtype="float16"), progress=False)
    assert res.method_name == "prime-tau0.8-float16"
    for name, mod in res.model.named_modules():
        if isinstance(mod, MaskedLinear):
            assert torch.equal(mod.weight, mod.weight.half().float())
    path = export_package(res, tok, tmp_path / "pkg")
    ids = torch.randint(0, 256, (1, 16), generator=GEN)
    assert torch.equal(_logits(load_package(path, progress=False).model, ids), _logits(res.model, ids))
    assert res.bpw < prune_model(model, levels, PruneConfig(), progress=False).bpw


def test_config_round_trip_and_errors():
    cfg = PruneConfig(method="wanda", match_prime=True, levels=(2, 4), modules="mlp", index_base=1,
                      quantile_over="matrix")
    assert StageConfig.from_json(cfg.to_json()) == cfg
    assert cfg.method_name == "wanda-as-prime-tau0.8-qmatrix-base1-L24-subset"
    assert PruneConfig(levels=(1, 2, 3, 4, 5), outside_blocks=True).method_name == "prime-tau0.8-L12345-outer"
    with pytest.raises(ConfigError, match="unknown key"):
        StageConfig.from_dict({"type": "prune", "sparsity": 0.5})
    for bad in (dict(tau=1.0), dict(index_base=2), dict(kept_fraction=0.0), dict(levels=(6,)),
                dict(method="random"), dict(value_dtype="int8")):
        with pytest.raises(ValueError):
            PruneConfig(**bad)


def test_prune_recipe_runs_as_a_job(tmp_path):
    from uqcit.stages.evaluate import quick_eval_config
    from uqcit.pipeline import Session, run_job
    from uqcit.recipe import builtin_recipe

    recipe = builtin_recipe("prime-tau0.8")
    session = Session.from_model("tiny-llama", progress=False)
    report = run_job("tiny-llama", recipe, tmp_path / "pkg", eval_config=quick_eval_config(1),
                     progress=False, session=session)
    assert report.method == "prime-tau0.8"
    assert report.bpw == session.results["prune"].bpw
    assert isinstance(session.compressed.model.layers[0].mlp.up_proj, MaskedLinear)
    assert read_metadata(tmp_path / "pkg")["recipe"]["name"] == "prime-tau0.8"


@pytest.mark.slow
def test_prime_selection_on_smollm2(smollm2):
    levels = analyze_levels(smollm2.model)
    res = prune_model(smollm2.model, levels, PruneConfig(), progress=False)
    assert len(res.stored) == 210  # 30 blocks x 7 Linears; the tied embedding stays dense
    named = dict(smollm2.model.named_modules())
    for rec in res.stored[:7]:  # block 0: the rule checked against its definition
        w = named[rec.name].weight.detach()
        grid = prime_indices(w.shape[0])[:, None] & prime_indices(w.shape[1])[None, :]
        pool = w.abs()[grid].sort().values
        thr = pool[math.ceil(round(0.8 * pool.numel(), 9)) - 1]
        assert rec.threshold == pytest.approx(float(thr))
        assert rec.kept == int((grid & (w.abs() > thr)).sum())
    ids = smollm2.tokenizer("The quick brown fox", return_tensors="pt").input_ids
    assert torch.isfinite(_logits(res.model, ids)).all()
