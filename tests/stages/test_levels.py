"""Layer analysis, Levels 1-5: concrete classifications on real HF architectures."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from uqcit.core.config import ConfigError, StageConfig
from uqcit.stages.levels import (
    GENERIC_RULES,
    RULESETS,
    LevelRule,
    LevelsConfig,
    LevelsResult,
    RuleSet,
    UnclassifiedModulesError,
    analyze_levels,
    block_of,
    n_late_blocks,
    ruleset_for,
    select_modules,
)
from uqcit.inputs.tiny import TINY_FAMILIES, tiny_model


@pytest.fixture(scope="module")
def models():
    """One tiny model per family, built once (each has 4 blocks)."""
    return {family: tiny_model(family)[0] for family in TINY_FAMILIES}


def unique_matrix_params(model: nn.Module) -> int:
    """Parameters of all >=2-D weights, each shared tensor once (named_parameters dedups ties)."""
    return sum(p.numel() for p in model.parameters() if p.ndim >= 2)


# --------------------------------------------------------------------------- families


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_llama_like_roles_and_levels(models, family):
    r = analyze_levels(models[family])
    assert r.ruleset.name == "llama" and r.model_type == family and r.n_blocks == 4
    expect = {
        "model.embed_tokens": ("embed", 1),
        "model.layers.0.self_attn.q_proj": ("q", 2),
        "model.layers.0.self_attn.k_proj": ("k", 2),
        "model.layers.0.self_attn.v_proj": ("v", 2),
        "model.layers.0.self_attn.o_proj": ("attn_out", 3),
        "model.layers.2.mlp.gate_proj": ("gate", 4),
        "model.layers.2.mlp.up_proj": ("up", 4),
        "model.layers.2.mlp.down_proj": ("down", 4),
        "lm_head": ("lm_head", 5),
    }
    for name, (role, level) in expect.items():
        e = r.entry(name)
        assert (e.role, e.level, e.late) == (role, level, False), name
    # Default late_fraction 0.1 of 4 blocks rounds up to the last block: L5, role kept.
    q3 = r.entry("model.layers.3.self_attn.q_proj")
    assert (q3.role, q3.role_level, q3.level, q3.late, q3.block) == ("q", 2, 5, True, 3)
    assert {m.level for m in r.modules if m.block == 3} == {5}
    assert r.entry("model.layers.0.mlp.down_proj").shape == (64, 128)  # (out, in)
    assert r.entry("model.layers.0.self_attn.k_proj").shape == (32, 64)  # 2 KV heads of 16
    assert len(r.modules) == 1 + 7 * 4 + 1


@pytest.mark.parametrize("family,tied", [("llama", True), ("qwen2", True), ("mistral", False)])
def test_tied_lm_head_counted_once(models, family, tied):
    model = models[family]
    r = analyze_levels(model)
    head = r.entry("lm_head")
    assert head.tied_to == ("model.embed_tokens" if tied else None)
    assert r.entry("model.embed_tokens").tied_to is None
    counts = r.level_counts()
    assert sum(c.params for c in counts.values()) == r.total_params == unique_matrix_params(model)
    assert counts[5].tied == (1 if tied else 0)
    assert len(r.quantizable()) == len(r.modules) - (1 if tied else 0)


def test_llama_level_counts_by_hand(models):
    counts = analyze_levels(models["llama"]).level_counts()
    # 4 blocks, the last late. Per block: q 4096, k 2048, v 2048, o 4096, gate/up/down 8192 each.
    assert {lv: (c.modules, c.params, c.tied) for lv, c in counts.items()} == {
        1: (1, 256 * 64, 0),
        2: (9, 3 * 8192, 0),
        3: (3, 3 * 4096, 0),
        4: (9, 3 * 3 * 8192, 0),
        5: (7, 8192 + 4096 + 3 * 8192, 1),  # block 3, plus the tied lm_head
    }


def test_gpt2_fused_qkv_and_two_c_proj(models):
    r = analyze_levels(models["gpt2"], LevelsConfig(late_fraction=0))
    assert r.ruleset.name == "gpt2"
    c_attn = r.entry("transformer.h.0.attn.c_attn")
    assert (c_attn.kind, c_attn.role, c_attn.level, c_attn.shape) == ("conv1d", "qkv", 2, (192, 64))
    assert (r.level_of("transformer.h.0.attn.c_proj"), r.entry("transformer.h.0.attn.c_proj").role) == (3, "attn_out")
    down = r.entry("transformer.h.0.mlp.c_proj")
    assert (down.level, down.role, down.shape) == (4, "down", (64, 256))  # Conv1D stores (in, out)
    assert r.level_of("transformer.h.3.mlp.c_fc") == 4  # late blocks disabled
    assert (r.level_of("transformer.wte"), r.entry("transformer.wpe").role) == (1, "position")
    assert r.entry("lm_head").tied_to == "transformer.wte"
    assert r.total_params == unique_matrix_params(models["gpt2"])


def test_select_modules_by_kind_or_regex(models):
    r = analyze_levels(models["llama"])
    linears = select_modules(r, "kind:linear")
    assert linears and all(e.kind == "linear" for e in linears)
    assert [e.name for e in select_modules(r, "kind:embedding")] == ["model.embed_tokens"]
    assert len(linears) + 1 == len(select_modules(r, None))  # the tied head is not its own module
    assert [e.name for e in select_modules(r, r"layers\.0\.mlp\.down")] == ["model.layers.0.mlp.down_proj"]
    with pytest.raises(ValueError, match="kind:conv1d.*kinds: embedding, linear"):
        select_modules(r, "kind:conv1d")
    with pytest.raises(ValueError, match="matches no quantizable module"):
        select_modules(r, "nothing-here")


def test_bert_roles(models):
    r = analyze_levels(models["bert"])
    assert r.ruleset.name == "bert" and r.n_blocks == 4
    layer = "bert.encoder.layer.0."
    assert [r.level_of(layer + s) for s in ("attention.self.query", "attention.self.key", "attention.self.value")] == [2, 2, 2]
    assert r.entry(layer + "attention.output.dense").role == "attn_out"
    assert r.level_of(layer + "attention.output.dense") == 3
    assert (r.entry(layer + "intermediate.dense").role, r.level_of(layer + "intermediate.dense")) == ("up", 4)
    assert (r.entry(layer + "output.dense").role, r.level_of(layer + "output.dense")) == ("down", 4)
    for emb in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        assert r.level_of(f"bert.embeddings.{emb}") == 1
    decoder = r.entry("cls.predictions.decoder")
    assert (decoder.level, decoder.role, decoder.tied_to) == (5, "lm_head", "bert.embeddings.word_embeddings")
    assert r.level_of("cls.predictions.transform.dense") == 5
    assert r.level_of("bert.encoder.layer.3.output.dense") == 5  # late block


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_generic_ruleset_agrees_with_family_rules(models, family):
    """The fallback must reach the same roles and levels as each dedicated set."""
    model = models[family]
    own = analyze_levels(model)
    generic = analyze_levels(model, ruleset=GENERIC_RULES)
    assert generic.ruleset.name == "generic"
    assert [(m.name, m.role, m.level, m.tied_to) for m in generic.modules] == \
           [(m.name, m.role, m.level, m.tied_to) for m in own.modules]


def _tiny_other(model_type: str, **kw):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.for_model(model_type, vocab_size=256, **kw)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return auto.from_config(config)


def test_generic_fallback_on_unmapped_architectures():
    neox = analyze_levels(_tiny_other("gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4), LevelsConfig(late_fraction=0))
    assert neox.ruleset.name == "generic"
    assert neox.level_of("gpt_neox.embed_in") == 1
    assert neox.entry("gpt_neox.layers.0.attention.query_key_value").role == "qkv"
    assert neox.level_of("gpt_neox.layers.0.attention.dense") == 3  # dense inside attention
    assert neox.level_of("gpt_neox.layers.0.mlp.dense_4h_to_h") == 4
    assert neox.level_of("lm_head") == 5

    # Encoder-decoder: cross-attention is L3 and each stack has its own late blocks.
    t5 = analyze_levels(_tiny_other("t5", d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16),
                        LevelsConfig(late_fraction=0.5))
    assert t5.n_blocks == 4
    cross = t5.entry("decoder.block.0.layer.1.EncDecAttention.q")
    assert (cross.role, cross.level) == ("cross_attn", 3)
    assert t5.level_of("encoder.block.0.layer.0.SelfAttention.o") == 3
    assert t5.level_of("encoder.block.0.layer.1.DenseReluDense.wo") == 4
    assert t5.entry("encoder.block.1.layer.1.DenseReluDense.wo").late
    assert t5.entry("decoder.block.1.layer.0.SelfAttention.q").late
    assert t5.entry("encoder.embed_tokens").tied_to == "shared"
    fig = t5.figure()
    assert list(fig.data[1].y) == ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]


def test_fused_moe_experts_are_reported_unhandled():
    # transformers 5 stores MoE experts as 3-D parameters, not Linear modules.
    r = analyze_levels(_tiny_other("mixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, num_local_experts=2))
    assert "model.layers.0.mlp.experts.gate_up_proj" in r.unhandled
    assert "outside Linear/Embedding/Conv1D" in r.summary()


# --------------------------------------------------------------------------- late blocks


def test_n_late_blocks():
    assert n_late_blocks(30, 0.1) == 3  # 0.1 * 30 is 3.0000000000000004 in floats
    assert n_late_blocks(4, 0.1) == 1  # any positive fraction marks at least one block
    assert n_late_blocks(4, 0.0) == 0
    assert n_late_blocks(4, 0.5) == 2
    assert n_late_blocks(4, 1.0) == 4
    assert n_late_blocks(0, 0.1) == 0


@pytest.mark.parametrize("fraction,late_blocks", [(0.0, set()), (0.5, {2, 3}), (1.0, {0, 1, 2, 3})])
def test_late_fraction_controls_level5(models, fraction, late_blocks):
    r = analyze_levels(models["llama"], LevelsConfig(late_fraction=fraction))
    assert {m.block for m in r.modules if m.late} == late_blocks
    for m in r.modules:
        assert m.level == (5 if m.late else m.role_level)


# --------------------------------------------------------------------------- rules and configs


class Odd(nn.Module):
    """An architecture no built-in rule knows."""

    def __init__(self, n_mixers: int = 1):
        super().__init__()
        self.tok = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList(nn.ModuleDict({"mixer": nn.Linear(8, 8)}) for _ in range(n_mixers))
        self.readout = nn.Linear(8, 10)


def test_unknown_architecture_error_names_modules():
    with pytest.raises(UnclassifiedModulesError) as err:
        analyze_levels(Odd())
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert {"tok", "blocks.0.mixer", "readout"} == set(err.value.modules)
    assert "blocks.0.mixer" in msg and "readout" in msg and "'generic'" in msg
    assert "analyze_levels(model, ruleset=" in msg and "with_rules(" in msg


def test_unknown_architecture_error_lists_first_ten():
    with pytest.raises(UnclassifiedModulesError) as err:
        analyze_levels(Odd(n_mixers=12))
    assert len(err.value.modules) == 14
    assert "blocks.8.mixer" in str(err.value) and "blocks.11.mixer" not in str(err.value)
    assert "(+4 more)" in str(err.value)


def test_user_ruleset_classifies_unknown_architecture():
    rules = GENERIC_RULES.with_rules(
        LevelRule(r"(?:^|\.)tok$", 1, "embed"),
        LevelRule(r"(?:^|\.)mixer$", 4, "up"),
        LevelRule(r"^readout$", 5, "lm_head"),
        name="odd",
    )
    r = analyze_levels(Odd(n_mixers=3), ruleset=rules)
    assert r.ruleset.name == "odd" and r.n_blocks == 3 and r.model_type is None
    assert [(m.name, m.block, m.level) for m in r.modules] == [
        ("tok", None, 1), ("blocks.0.mixer", 0, 4), ("blocks.1.mixer", 1, 4), ("blocks.2.mixer", 2, 5),
        ("readout", None, 5),
    ]
    assert r.entry("blocks.2.mixer").rule == r"(?:^|\.)mixer$"


def test_first_matching_rule_wins():
    rs = RuleSet("x", (LevelRule(r"attention\.output\.dense$", 3, "attn_out"), LevelRule(r"output\.dense$", 4, "down")))
    assert rs.match("encoder.layer.0.attention.output.dense").role == "attn_out"
    assert rs.match("encoder.layer.0.output.dense").role == "down"
    assert rs.match("pooler") is None


def test_ruleset_selection(models):
    assert ruleset_for("mistral").name == "llama" and ruleset_for("gpt2").name == "gpt2"
    assert ruleset_for("something_new").name == "generic" and ruleset_for(None).name == "generic"
    assert analyze_levels(models["llama"], LevelsConfig(ruleset="generic")).ruleset.name == "generic"
    with pytest.raises(ValueError, match="unknown ruleset 'nope'"):
        analyze_levels(models["llama"], LevelsConfig(ruleset="nope"))
    with pytest.raises(ValueError, match="config names ruleset 'gpt2'"):
        analyze_levels(models["llama"], LevelsConfig(ruleset="gpt2"), ruleset=RULESETS["llama"])
    # GPT-2 rules do not know llama's names: an error, not a guess.
    with pytest.raises(UnclassifiedModulesError, match="q_proj"):
        analyze_levels(models["llama"], LevelsConfig(ruleset="gpt2"))


def test_block_of():
    assert block_of("model.layers.12.self_attn.q_proj") == 12
    assert block_of("transformer.h.3.attn.c_attn.weight") == 3
    assert block_of("bert.encoder.layer.5.output.dense") == 5
    assert block_of("model.layers.0.mlp.experts.7.w1") == 0  # expert index is not a block
    assert block_of("model.embed_tokens") is None and block_of("lm_head") is None


@pytest.mark.parametrize("name", sorted(RULESETS))
def test_ruleset_json_round_trip(name):
    rs = RULESETS[name]
    back = RuleSet.from_json(rs.to_json())
    assert back == rs and isinstance(back.rules, tuple)


def test_ruleset_rejects_bad_data():
    good = RULESETS["gpt2"].to_dict()
    with pytest.raises(ConfigError, match="unknown key"):
        RuleSet.from_dict({**good, "extra": 1})
    with pytest.raises(ConfigError, match="unknown key"):
        RuleSet.from_dict({**good, "rules": [{"pattern": "x", "level": 2, "role": "q", "weight": 1}]})
    with pytest.raises(ConfigError, match="version"):
        RuleSet.from_dict({**good, "version": 99})
    with pytest.raises(ValueError, match="not a valid regex"):
        LevelRule("(", 2, "q")
    with pytest.raises(ValueError, match="level must be one of"):
        LevelRule("q$", 6, "q")
    with pytest.raises(ValueError, match="block index"):
        RuleSet("x", (), block_pattern=r"layers\.\d+")


def test_levels_config_json_round_trip():
    cfg = LevelsConfig(ruleset="bert", late_fraction=0.25)
    assert StageConfig.from_json(cfg.to_json()) == cfg  # dispatch by type tag "levels"
    assert LevelsConfig.from_json(LevelsConfig().to_json()) == LevelsConfig()
    assert cfg.to_dict()["type"] == "levels"
    with pytest.raises(ConfigError, match="unknown key"):
        LevelsConfig.from_dict({"type": "levels", "late_fraction": 0.1, "rules": []})
    with pytest.raises(ValueError, match="late_fraction"):
        LevelsConfig(late_fraction=1.5)


# --------------------------------------------------------------------------- result views


def test_result_round_trip_and_views(models):
    r = analyze_levels(models["llama"])
    assert LevelsResult.from_json(r.to_json()) == r
    d = r.to_dict()
    assert d["level_counts"]["5"] == {"modules": 7, "params": 36864, "tied": 1}
    assert d["ruleset"]["name"] == "llama" and d["config"]["type"] == "levels"
    by = r.by_level()
    assert sorted(by) == [1, 2, 3, 4, 5] and sum(map(len, by.values())) == len(r.modules)
    columns, rows = r.table_rows()
    assert len(rows) == len(r.modules) and len(columns) == len(rows[0])
    html = r._repr_html_()
    assert "<table>" in html and "model.layers.0.self_attn.o_proj" in html
    assert repr(r).startswith("<LevelsResult: 29 weight modules")
    with pytest.raises(KeyError, match="no weight-bearing module named 'nope'"):
        r.level_of("nope")


def test_figures_are_deterministic(models):
    r = analyze_levels(models["llama"])
    fig = r.figure()
    assert [t.uid for t in fig.data] == ["levels-outside", "levels-blocks"]
    outside, blocks = fig.data
    assert list(outside.x) == ["model.embed_tokens", "lm_head"] and list(outside.z[0]) == [1, 5]
    assert list(blocks.x) == ["q", "k", "v", "attn_out", "gate", "up", "down"]
    assert list(blocks.y) == ["block 0", "block 1", "block 2", "block 3"]
    assert [list(row) for row in blocks.z] == [[2, 2, 2, 3, 4, 4, 4]] * 3 + [[5] * 7]
    assert "late block; role level 2" in blocks.hovertext[3][0]
    assert "tied to model.embed_tokens" in outside.hovertext[0][1]
    assert fig.to_json() == analyze_levels(models["llama"]).figure().to_json()

    bars = r.level_figure()
    assert len(bars.data) == 1 and bars.data[0].uid == "levels-params"
    assert sum(bars.data[0].y) == r.total_params
    assert bars.to_json() == r.level_figure().to_json()


def test_levels_module_imports_no_widgets():
    code = ("import sys, uqcit.stages.levels; "
            "sys.exit(any(m.split('.')[0] in ('ipywidgets', 'jupyter', 'anywidget') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_levels(smollm2):
    model = smollm2.model  # the session fixture of conftest.py: loaded once for the suite
    r = analyze_levels(model)
    assert (r.model_type, r.ruleset.name, r.n_blocks) == ("llama", "llama", 30)
    assert len(r.modules) == 212 and r.unhandled == ()
    assert len(r.quantizable()) == 211  # 7 linear x 30 + embedding; lm_head is tied
    assert r.entry("lm_head").tied_to == "model.embed_tokens"
    assert {m.block for m in r.modules if m.late} == {27, 28, 29}
    # hidden 576, 9 heads of 64 (3 KV heads: k/v 192 wide), FFN 1536, vocab 49152.
    attn_qo, attn_kv, ffn = 576 * 576, 192 * 576, 1536 * 576
    counts = {lv: (c.modules, c.params, c.tied) for lv, c in r.level_counts().items()}
    assert counts == {
        1: (1, 49152 * 576, 0),
        2: (81, 27 * (attn_qo + 2 * attn_kv), 0),
        3: (27, 27 * attn_qo, 0),
        4: (81, 27 * 3 * ffn, 0),
        5: (21, 3 * (2 * attn_qo + 2 * attn_kv + 3 * ffn), 1),
    }
    assert r.total_params == unique_matrix_params(model)
