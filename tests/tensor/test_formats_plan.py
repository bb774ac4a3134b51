import pytest

from uqcit.tensor.formats import QuantFormat, parse_format
from uqcit.stages.plan import BitPlan, PlanConfig, build_plan, pattern_format


@pytest.fixture(scope="module")
def tiny_llama_levels():
    from uqcit.stages.levels import analyze_levels
    from uqcit.inputs.tiny import tiny_model

    return analyze_levels(tiny_model("llama")[0])


@pytest.mark.parametrize("name", ["w4-g128", "w2-g64-sym", "w3-g32", "w8-g128", "fp16",
                                  "w2-g128+w16@0.1", "w4-g128+w8@0.46", "w5-g32-sym", "w5-g64-iz",
                                  "w6-g16-sym-s7", "w6-g128+w8@0.1"])
def test_format_names_round_trip(name):
    assert parse_format(name).name == name


def test_format_rejects_bad_values():
    for bits in (1, 7, 9):
        with pytest.raises(ValueError, match=r"bits must be one of \(2, 3, 4, 5, 6, 8, 16\)"):
            QuantFormat(bits=bits)
    with pytest.raises(ValueError, match="high_fraction"):
        QuantFormat(bits=2, high_bits=16, high_fraction=1.5)
    with pytest.raises(ValueError, match="cannot read format"):
        parse_format("int4")


def test_bits_for_counts_codes_scales_zeros_and_mask():
    # 1,000 weights at 4 bits in groups of 128: 500 code bytes, 8 groups x (scale+zero) x 16 bits.
    assert QuantFormat(bits=4, group_size=128).bits_for(1000) == 4000 + 8 * 32
    assert QuantFormat(bits=4, group_size=128, symmetric=True).bits_for(1000) == 4000 + 8 * 16
    # 3 bits pack to whole bytes: 1,001 codes -> 376 bytes.
    assert QuantFormat(bits=3, group_size=1001).bits_for(1001) == 376 * 8 + 32
    # 5 bits: 1,001 codes -> 626 bytes. 6 bits in 16 groups of 64: 750 code bytes, 16 fp16 scales,
    # 16 six-bit zero points in 12 bytes.
    assert QuantFormat(bits=5, group_size=1001, symmetric=True).bits_for(1001) == 626 * 8 + 16
    assert QuantFormat(bits=6, group_size=64, int_zeros=True).bits_for(1000) == 750 * 8 + 16 * 16 + 12 * 8
    # Mixed: 100 fp16 weights, 900 int2 in 8 groups, 1-bit mask of 1,000 -> 125 bytes.
    f = QuantFormat(bits=2, group_size=128, high_bits=16, high_fraction=0.1)
    assert f.bits_for(1000) == 100 * 16 + (900 * 2 + 8 * 32) + 125 * 8


def test_seed_patterns():
    assert pattern_format("10-90").name == "w2-g128+w16@0.1"
    assert pattern_format("30-70").name == "w4-g128+w8@0.3"
    assert pattern_format("46-54").name == "w4-g128+w8@0.46"
    assert pattern_format("20-80").name == "w4-g128+w8@0.2"
    with pytest.raises(ValueError, match="H\\+L=100"):
        pattern_format("20-70")


def test_plan_resolution_order_exact_then_pattern_then_default():
    plan = BitPlan(default=QuantFormat(bits=8),
                   patterns=(("re:.*mlp.*", QuantFormat(bits=3)),),
                   exact={"a.mlp.up": QuantFormat(bits=2)})
    assert plan.format_for("a.mlp.up").bits == 2
    assert plan.format_for("a.mlp.down").bits == 3
    assert plan.format_for("a.attn.q").bits == 8
    assert plan.with_format("a.attn.q", None).format_for("a.attn.q") is None
    assert plan.format_for("a.attn.q").bits == 8  # plans are immutable
    assert BitPlan.from_dict(plan.to_dict()) == plan
    with pytest.raises(ValueError, match="re:"):
        BitPlan(patterns=(("mlp", None),))


def test_binary_concentration_plan_follows_levels(tiny_llama_levels):
    levels = tiny_llama_levels
    plan = build_plan(levels, PlanConfig())
    for m in levels.modules:
        expected = {1: "46-54", 2: "30-70", 3: "10-90", 4: "30-70", 5: "46-54"}[m.level]
        assert plan.format_for(m.name) == pattern_format(expected)
    s = plan.summarize(levels)
    assert s.weight_count == sum(m.numel for m in levels.modules if m.tied_to is None)
    assert s.total_bits == sum(plan.format_for(m.name).bits_for(m.numel)
                               for m in levels.modules if m.tied_to is None)
    assert 4.0 < s.avg_bpw < 8.0
    assert len(s.figure().data) == len({m.level for m in levels.modules})


def test_plan_overrides_and_uniform(tiny_llama_levels):
    levels = tiny_llama_levels
    name = levels.modules[3].name
    plan = build_plan(levels, PlanConfig(preset="uniform", bits=3, overrides={name: "float",
                                                                              "re:.*q_proj": "w8-g32"}))
    assert plan.name == "rtn-w3-g128"
    assert plan.format_for(name) is None
    q = next(m.name for m in levels.modules if m.name.endswith("q_proj"))
    assert plan.format_for(q).name == "w8-g32"
    other = next(m.name for m in levels.modules if m.name.endswith("k_proj"))
    assert plan.format_for(other).name == "w3-g128"
    with pytest.raises(ValueError, match="matches no module"):
        build_plan(levels, PlanConfig(overrides={"re:nothing": "w4-g128"}))
    with pytest.raises(ValueError, match="names no weight-bearing module"):
        build_plan(levels, PlanConfig(overrides={"nope": "w4-g128"}))


def test_uniform_plans_at_5_and_6_bits(tiny_llama_levels):
    from uqcit.core.keys import ConfigError

    levels = tiny_llama_levels
    for name in ("w5-g32-sym", "w6-g64-iz"):
        f = parse_format(name)
        plan = build_plan(levels, PlanConfig(preset="uniform", bits=f.bits, group_size=f.group_size,
                                             symmetric=f.symmetric, int_zeros=f.int_zeros))
        assert plan.name == f"rtn-{name}"
        assert {plan.format_for(m.name).name for m in levels.modules} == {name}
    with pytest.raises(ConfigError, match=r"bits must be one of \(2, 3, 4, 5, 6, 8, 16\)"):
        PlanConfig(bits=7)


def test_plan_kind_overrides_and_integer_zero_points(tiny_llama_levels):
    from uqcit.core.keys import ConfigError

    levels = tiny_llama_levels
    plan = build_plan(levels, PlanConfig(preset="uniform", bits=2, group_size=32, int_zeros=True,
                                         overrides={"kind:embedding": "w3-g64-iz"}))
    assert plan.name == "rtn-w2-g32-iz"
    for m in levels.modules:
        assert plan.format_for(m.name).name == ("w3-g64-iz" if m.kind == "embedding" else "w2-g32-iz")
    with pytest.raises(ValueError, match=r"kind:conv.*kinds: \["):
        build_plan(levels, PlanConfig(overrides={"kind:conv": "w4-g128"}))
    with pytest.raises(ConfigError, match="int_zeros"):
        PlanConfig(preset="uniform", symmetric=True, int_zeros=True)
