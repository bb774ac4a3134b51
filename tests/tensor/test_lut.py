"""Lookup-table formats (``w{b}-g{G}-lut``, ``uqcit.tensor.lut``): names and bits, the Lloyd-Max
fit, error against the integer grid, GPTQ on the table, packages, and the readers that refuse them."""
from __future__ import annotations

import math

import pytest
import torch

from uqcit.export.compressed_tensors import carried_bits
from uqcit.export.gguf import gguf_formats, gguf_type
from uqcit.export.hf import ExportError
from uqcit.tensor.formats import QuantFormat, parse_format
from uqcit.tensor.gptq import gptq_quantize, hessian_error
from uqcit.tensor.learned import LearnedWeight, supports
from uqcit.tensor.lut import absmax_scales, lloyd_max, normalized
from uqcit.tensor.quant import (
    dequantize,
    dequantize_at,
    quant_error,
    quant_params,
    quantize,
    quantize_with,
    scales_of,
    tensor_layout,
    zero_points,
)

from tensor_helpers import gen as _gen, hessian as _hessian, same_tensors, student_t

NAMES = ["w2-g32-lut", "w3-g64-lut", "w4-g32-lut", "w4-g128-lut", "w3-g30-lut"]


# ------------------------------------------------------------------------------ names and bits


@pytest.mark.parametrize("name", NAMES)
def test_names_round_trip_and_metadata(name):
    fmt = parse_format(name)
    assert fmt.lut and fmt.symmetric and not fmt.mixed and fmt.scale_bits is None
    assert fmt.name == name and QuantFormat.from_dict(fmt.to_dict()) == fmt
    assert fmt.to_dict()["lut"] is True
    assert "lut" not in parse_format("w4-g32-sym").to_dict()  # older formats' metadata stays as it was


@pytest.mark.parametrize("name", ["w5-g32-lut", "w8-g32-lut", "w4-g32-sym-lut", "w4-g32-lut-s6", "w4-g32-lut+w16@0.1",
                                  "w4-g0-lut"])
def test_names_that_are_no_lookup_table_format_are_refused(name):
    with pytest.raises(ValueError):
        parse_format(name)


def test_lookup_tables_are_symmetric_fp16_scaled_and_unmixed():
    for bad in (dict(symmetric=False), dict(scale_bits=6), dict(high_bits=16, high_fraction=0.1), dict(bits=6)):
        with pytest.raises(ValueError, match="lookup-table"):
            QuantFormat(**{**dict(bits=4, group_size=32, symmetric=True, lut=True), **bad})


@pytest.mark.parametrize("name,shape,bits", [
    # codes + one fp16 scale a group + a table of 2**b fp16 levels
    ("w4-g32-lut", (64, 96), 6144 * 4 + 192 * 16 + 16 * 16),  # 27904
    ("w3-g64-lut", (64, 96), 6144 * 3 + 96 * 16 + 8 * 16),  # 20096
    ("w2-g32-lut", (10, 10), 100 * 2 + 4 * 16 + 4 * 16),  # a short last group: 4 scales
    ("w3-g32-lut", (10, 10), 38 * 8 + 4 * 16 + 8 * 16),  # 300 code bits stored in 38 bytes
])
def test_bits_stored_are_counted_by_hand(name, shape, bits):
    fmt = parse_format(name)
    q = quantize(torch.randn(*shape, generator=_gen(0)), fmt)
    numel = math.prod(shape)
    assert q.stored_bits == fmt.bits_for(numel) == bits
    assert q.bits_per_weight == fmt.bits_per_weight(numel) == bits / numel
    assert sorted(q.tensors) == sorted(tensor_layout(numel, fmt)) == ["codes", "scales", "table"]
    assert q.tensors["table"].dtype == q.tensors["scales"].dtype == torch.float16
    assert q.tensors["table"].numel() == 1 << fmt.bits


# ------------------------------------------------------------------------------ the fit


def test_lloyd_max_never_increases_the_weighted_error():
    w = student_t((64, 1024), 3, 1)
    flat = w.reshape(-1)
    u = normalized(flat, 32, absmax_scales(flat, 32)).double()
    weight = torch.exp(torch.randn(1024, generator=_gen(3))).expand(64, 1024).reshape(-1).double()

    def error(levels: torch.Tensor) -> float:  # by brute force: every value to its nearest level
        return float(((u[:, None] - levels[None, :]).square().min(1).values * weight).sum())

    errors = [error(lloyd_max(u, 16, weight, iters=k)) for k in range(0, 400, 10)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0], errors  # measured: 438.0 at the quantile start, 100.9 at the end
    assert errors[-1] == error(lloyd_max(u, 16, weight))  # converged before the cap (measured: by 160 steps)


def test_lloyd_max_finds_max_s_levels_for_the_normal_distribution():
    # Max (1960), Table I: the MSE-optimal 4- and 8-level quantizers of the unit normal.
    n = 200_000  # even: no value sits on the middle midpoint (0), which would join the lower level
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    normal = math.sqrt(2) * torch.erfinv(2 * p - 1)  # the distribution, by its quantiles
    for levels, positive in ((4, [0.4528, 1.510]), (8, [0.2451, 0.7560, 1.344, 2.152])):
        fit = lloyd_max(normal, levels)
        assert torch.allclose(fit[levels // 2:], torch.tensor(positive, dtype=torch.float64), atol=1e-3)
        assert torch.allclose(fit, -fit.flip(0), rtol=0, atol=1e-9)
        start = lloyd_max(normal, levels, iters=0)  # the quantiles: far from the optimum
        assert float((start[levels // 2:] - torch.tensor(positive, dtype=torch.float64)).abs().max()) > 0.1


def test_the_weighting_moves_the_levels_where_the_weight_is():
    u = torch.linspace(-1, 1, 20001, dtype=torch.float64)
    weight = torch.where(u > 0, 100.0, 1.0).to(torch.float64)
    plain, weighted = lloyd_max(u, 8), lloyd_max(u, 8, weight)
    assert int((plain > 0).sum()) == 4 and int((weighted > 0).sum()) >= 6

    def error(levels: torch.Tensor) -> float:
        return float(((u[:, None] - levels[None, :]).square().min(1).values * weight).sum())

    assert error(weighted) < 0.5 * error(plain)  # measured: 2150 against 5260, with 7 of 8 levels above 0


def test_fit_inputs_are_checked():
    with pytest.raises(ValueError, match="NaN"):
        lloyd_max(torch.tensor([0.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="non-negative"):
        lloyd_max(torch.tensor([0.0, 1.0]), 2, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="elements"):
        quantize(torch.randn(4, 32), parse_format("w4-g32-lut"), table_weight=torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        quantize(torch.tensor([[1.0, float("nan")]]), parse_format("w4-g32-lut"))
    # No weight anywhere (e.g. a Hessian of dead inputs): the plain fit, not a degenerate one.
    w = torch.randn(4, 64, generator=_gen(0))
    fmt = parse_format("w3-g32-lut")
    assert same_tensors(quantize(w, fmt, table_weight=torch.zeros_like(w)), quantize(w, fmt))


def test_quantize_is_deterministic_and_rounds_to_the_nearest_level():
    w = student_t((48, 160), 4, 2)
    fmt = parse_format("w4-g32-lut")
    tw = torch.rand(48, 160, generator=_gen(1))
    assert same_tensors(quantize(w, fmt), quantize(w.clone(), fmt))
    assert same_tensors(quantize(w, fmt, table_weight=tw), quantize(w, fmt, table_weight=tw.clone()))
    assert not torch.equal(quantize(w, fmt, table_weight=tw).tensors["table"], quantize(w, fmt).tensors["table"])
    q = quantize(w, fmt)
    table = q.tensors["table"].float()
    scale = q.tensors["scales"].float().repeat_interleave(32)
    assert torch.equal(scale, absmax_scales(w.reshape(-1), 32).float().repeat_interleave(32))
    u = w.reshape(-1) / scale
    best = (u[:, None] - table[None, :]).abs().min(1).values
    got = (u - dequantize(q).reshape(-1) / scale).abs()
    assert torch.allclose(got, best, rtol=0, atol=1e-6)  # no level is nearer than the one stored


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_storage_is_bit_identical_to_cpu():
    w = student_t((33, 129), 3, 6)
    fmt = parse_format("w4-g32-lut")
    tw = torch.rand(33, 129, generator=_gen(7))
    for kw in ({}, {"table_weight": tw}):
        cpu = quantize(w, fmt, **kw)
        gpu = quantize(w.cuda(), fmt, **{k: v.cuda() for k, v in kw.items()})
        assert gpu.device.type == "cuda" and same_tensors(gpu.to("cpu"), cpu)
        assert torch.equal(dequantize(gpu).cpu(), dequantize(cpu))


def test_zero_tensor_and_dequantize_at():
    fmt = parse_format("w3-g32-lut")
    assert torch.equal(dequantize(quantize(torch.zeros(4, 64), fmt)), torch.zeros(4, 64))
    q = quantize(torch.randn(7, 45, generator=_gen(4)), parse_format("w3-g30-lut"))  # groups straddle rows
    index = torch.randint(0, q.numel, (5, 11), generator=_gen(5))
    assert torch.equal(dequantize_at(q, index), dequantize(q).reshape(-1)[index])


# ------------------------------------------------------------------------------ error against the integer grid


@pytest.mark.parametrize("kind", ["gaussian", "student-t3"])
def test_w4_g32_lut_has_lower_error_than_w4_g32_sym(kind):
    w = 0.02 * (torch.randn(256, 1024, generator=_gen(0)) if kind == "gaussian" else student_t((256, 1024), 3, 1))
    lut = quant_error(w, quantize(w, parse_format("w4-g32-lut")))["rel_fro"]
    sym = quant_error(w, quantize(w, parse_format("w4-g32-sym")))["rel_fro"]
    # Measured (relative Frobenius error): Gaussian 0.0817 vs 0.0972, Student-t(3) 0.0983 vs 0.1445,
    # for 256 bits more per tensor (the table).
    assert lut < (0.9 if kind == "gaussian" else 0.75) * sym, (lut, sym)


# ------------------------------------------------------------------------------ GPTQ


@pytest.mark.parametrize("name", ["w4-g32-lut", "w3-g64-lut", "w2-g32-lut"])
def test_gptq_on_the_table_beats_rounding_to_the_nearest_level(name):
    fmt = parse_format(name)
    w, h = student_t((64, 128), 3, 7), _hessian()
    rtn = hessian_error(w, dequantize(quantize(w, fmt)), h)
    for act_order in (True, False):
        q = gptq_quantize(w, h, fmt, act_order=act_order)
        assert q.fmt == fmt and q.stored_bits == fmt.bits_for(w.numel())
        gptq = hessian_error(w, dequantize(q), h)
        # Measured at w4-g32: 0.0939 to nearest, 0.0668 with act-order, 0.0708 without.
        assert gptq < 0.85 * rtn, (name, act_order, gptq, rtn)
        # The table was fitted once, on the original weights weighted by the Hessian diagonal.
        params = quant_params(w, fmt, table_weight=h.diagonal().expand_as(w))
        assert torch.equal(q.tensors["table"], params.low.table) and torch.equal(q.tensors["scales"], params.low.scales)
        assert not torch.equal(q.tensors["table"], quantize(w, fmt).tensors["table"])  # the weighting told
    assert same_tensors(gptq_quantize(w, h, fmt), gptq_quantize(w.clone(), h.clone(), fmt))


def test_gptq_with_an_identity_hessian_is_the_nearest_level():
    # No correlation, equal diagonal: no error to feed back, the plain fit; the loop's rounding
    # must then be the rounding quantize stores.
    w = torch.randn(32, 128, generator=_gen(8))
    fmt = parse_format("w3-g32-lut")
    assert same_tensors(gptq_quantize(w, torch.eye(128), fmt), quantize(w, fmt))
    assert same_tensors(quantize_with(w, quant_params(w, fmt, search=True)), quantize(w, fmt))  # no range to search


# ------------------------------------------------------------------------------ readers that refuse


def test_integer_grid_readers_refuse_lookup_tables():
    q = quantize(torch.randn(8, 64, generator=_gen(0)), parse_format("w4-g32-lut"))
    for reader in (zero_points, scales_of):
        with pytest.raises(ValueError, match=r"scale \* table\[code\]"):
            reader(q)
    assert supports(q.fmt, q.shape)  # learned rounding on a table: LearnedTable (tests/stages/test_signround.py)
    with pytest.raises(ValueError, match="learned rounding needs a plain integer format"):
        LearnedWeight(torch.randn(8, 64), q.fmt)


@pytest.mark.parametrize("name", ["w4-g32-lut", "w2-g64-lut"])
def test_gguf_and_compressed_tensors_refuse_lookup_tables_naming_the_hf_export(name):
    fmt = parse_format(name)
    for shape in ((64, 256), (64, 48)):  # 32-multiple rows or not: refused either way
        with pytest.raises(ExportError) as err:
            gguf_type(fmt, shape)
        message = str(err.value)
        assert "\n" not in message and name in message and "`uqcit export PACKAGE --to hf`" in message
    with pytest.raises(ExportError) as err:
        carried_bits("model.layers.0.mlp.up_proj", fmt, widen=True)
    message = str(err.value)
    assert "\n" not in message and f"model.layers.0.mlp.up_proj ({name})" in message
    assert "`uqcit export PACKAGE --to hf`" in message
    assert gguf_formats([name, "w4-g32-sym"]) == ["w4-g32-sym"]


# ------------------------------------------------------------------------------ packages


def test_package_round_trip_with_lookup_tables(tmp_path):
    from uqcit.export.targets import export_to
    from uqcit.inputs.tiny import tiny_model
    from uqcit.package import export_package, load_package, read_metadata
    from uqcit.runtime.modules import QuantEmbedding, QuantLinear
    from uqcit.stages.levels import analyze_levels
    from uqcit.stages.plan import PlanConfig, build_plan
    from uqcit.stages.quantize import quantize_model

    model, tok = tiny_model("llama")
    levels = analyze_levels(model)
    plan = build_plan(levels, PlanConfig(preset="uniform", bits=4, group_size=32, symmetric=True,
                                         overrides={"re:.*": "w4-g32-lut", "re:.*mlp.*": "w3-g64-lut"}))
    q = quantize_model(model, levels, plan, progress=False)
    path = export_package(q, tok, tmp_path / "pkg", source_model="tiny-llama", levels=levels)
    loaded = load_package(path, progress=False)
    ids = torch.randint(0, 256, (2, 24), generator=_gen(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, q.model(input_ids=ids).logits)
        assert not torch.allclose(loaded.model(input_ids=ids).logits, model(input_ids=ids).logits)
    mods = {n: m for n, m in loaded.model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    assert any(isinstance(m, QuantEmbedding) for m in mods.values())  # looked up through dequantize_at
    meta = read_metadata(path)
    assert {m.fmt.name for m in mods.values()} == {"w4-g32-lut", "w3-g64-lut"}
    for name, m in mods.items():
        assert meta["modules"][name]["format"] == m.fmt.name
        assert "table" in dict(m.named_buffers()) and m.table.numel() == 1 << m.fmt.bits
    assert meta["quantized_stored_bytes"] == q.stored_bits // 8
    for target in ("gguf", "compressed-tensors"):
        with pytest.raises(ExportError, match=r"lut\).*--to hf"):
            export_to(loaded, target, tmp_path / target)
        assert not (tmp_path / target).exists()


def _weight(t) -> torch.Tensor:
    """The weight a ``ScaleTrainableLinear`` computes with (the one its forward uses), flattened."""
    return (t.units() * t.scale().unsqueeze(1)).reshape(-1)[: t.numel]


@pytest.mark.parametrize("name", ["w4-g32-lut", "w3-g32-lut", "w4-g32-nl"])
@pytest.mark.parametrize("train_table", [True, False])
def test_scale_training_starts_from_the_stored_lookup_table_layer(name, train_table):
    # unit = table[code] from the codes: the wrapped layer computes the stored weight bit for bit
    # (a short last group: 6 x 40 = 7.5 groups of 32)
    from uqcit.runtime.modules import QuantLinear
    from uqcit.runtime.trainable import ScaleTrainableLinear

    q = quantize(student_t((6, 40), 3, 30), parse_format(name))
    lin = QuantLinear(q, torch.randn(6, generator=_gen(31)))
    t = ScaleTrainableLinear(lin, train_table=train_table)
    if name.endswith("-nl"):
        assert bool((t.s0 < 0).any() and (t.s0 > 0).any())  # IQ4_NL's signed scales, kept as stored
    assert (t.table is not None) == (train_table and name.endswith("-lut"))  # IQ4_NL's table is the format's
    assert torch.equal(_weight(t), dequantize(q).reshape(-1))
    x = torch.randn(3, 40, generator=_gen(32))
    with torch.no_grad():
        assert torch.equal(t(x), torch.nn.functional.linear(x, dequantize(q), lin.bias))
        torch.testing.assert_close(t(x), lin(x), rtol=1e-5, atol=1e-5)  # lin may run the packed kernel


@pytest.mark.parametrize("name", ["w4-g32-lut", "w3-g32-lut", "w4-g32-nl"])
def test_trained_lookup_table_layer_is_stored_as_trained(name):
    from uqcit.runtime.modules import QuantLinear
    from uqcit.runtime.trainable import ScaleTrainableLinear

    q = quantize(student_t((6, 40), 3, 33), parse_format(name))
    signs = q.tensors["scales"].sign().clone()
    lin = QuantLinear(q)
    t = ScaleTrainableLinear(lin)
    with torch.no_grad():
        t.log_scale.copy_(torch.linspace(-0.3, 0.3, t.log_scale.numel()))
        t.log_scale[0] = -60.0  # fp16 would round this scale to 0: a table's scale stays the smallest fp16
        if t.table is not None:  # swap the two middle levels' order: finish() must sort and renumber
            mid = t.table.numel() // 2
            t.table[mid - 1], t.table[mid] = t.table[mid] + 0.01, t.table[mid - 1] - 0.01
            t.table[0] -= 0.05
    x = torch.randn(3, 40, generator=_gen(34))
    with torch.no_grad():
        w, y = _weight(t).clone(), t(x)
    codes = q.tensors["codes"].clone()
    stored = t.finish()
    assert stored is lin and stored.scales.dtype == torch.float16 and stored.table.dtype == torch.float16
    assert torch.equal(stored.dequantized(torch.float32).reshape(-1), w)  # the model stored is the one trained
    with torch.no_grad():
        torch.testing.assert_close(stored(x), y, rtol=1e-5, atol=1e-5)
    assert torch.equal(stored.scales.sign(), signs) and float(stored.scales[0].abs()) > 0
    assert bool(torch.all(stored.table[1:] >= stored.table[:-1]))  # ascending, as every table is stored
    assert torch.equal(stored.codes, codes) == name.endswith("-nl")  # renumbered only where levels crossed


def test_scale_training_takes_lookup_tables_and_says_what_it_skips():
    from uqcit.runtime.modules import QuantLinear
    from uqcit.runtime.trainable import ScaleTrainableLinear, make_trainable

    names = ["w4-g32-lut", "w4-g32-nl", "w4-g32-sym", "fp16", "w2-g32+w16@0.1"]
    model = torch.nn.Sequential(*[QuantLinear(quantize(torch.randn(8, 64), parse_format(n))) for n in names])
    chosen, skipped = make_trainable(model, "scales")
    assert [t.name for t in chosen] == ["0", "1", "2"]
    assert [t.values for t in chosen] == [16 + 16, 16, 16]  # 16 groups; the fitted table's 16 levels
    assert all(isinstance(model[i], ScaleTrainableLinear) for i in range(3))
    assert [n for n, _ in skipped] == ["3", "4"]
    assert all("only plain integer and lookup-table formats" in why for _, why in skipped)
    chosen, _ = make_trainable(torch.nn.Sequential(QuantLinear(quantize(torch.randn(8, 64), parse_format(names[0])))),
                               "scales", train_table=False)
    assert chosen[0].values == 16
    with pytest.raises(ValueError, match="plain integer or lookup-table format, got fp16"):
        ScaleTrainableLinear(QuantLinear(quantize(torch.randn(8, 64), parse_format("fp16"))))


# ------------------------------------------------------------------------------ IQ4_NL's fixed table (-nl)


def test_nl_names_and_what_is_refused():
    fmt = parse_format("w4-g32-nl")
    assert fmt.lut and fmt.nl and fmt.name == "w4-g32-nl" and QuantFormat.from_dict(fmt.to_dict()) == fmt
    assert "nl" not in parse_format("w4-g32-lut").to_dict()  # fitted-table metadata stays as it was
    for name in ("w3-g32-nl", "w4-g32-sym-nl", "w4-g32-nl-s6"):
        with pytest.raises(ValueError):
            parse_format(name)
    with pytest.raises(ValueError, match="IQ4_NL"):
        QuantFormat(bits=4, group_size=32, symmetric=True, nl=True)  # nl without lut


def test_nl_stores_iq4_nl_levels_and_signed_scales():
    from uqcit.tensor.lut import IQ4_NL_LEVELS

    w = 0.02 * torch.randn(64, 256, generator=_gen(0))
    q = quantize(w, parse_format("w4-g32-nl"))
    assert q.tensors["table"].tolist() == list(IQ4_NL_LEVELS)
    scales = q.tensors["scales"]
    assert bool((scales < 0).any()) and bool((scales > 0).any())  # each group's larger side on the long end
    assert q.stored_bits == parse_format("w4-g32-lut").bits_for(w.numel())  # the same layout and bits
    assert same_tensors(q, quantize(w.clone(), parse_format("w4-g32-nl")))
    # an all-zero group: the smallest fp16 scale, so its codes decode to (almost) zero
    z = dequantize(quantize(torch.zeros(2, 64), parse_format("w4-g32-nl")))
    assert float(z.abs().max()) <= 2.0 ** -24


@pytest.mark.parametrize("kind", ["gaussian", "student-t3"])
def test_nl_error_against_the_integer_grid_and_the_fitted_table(kind):
    w = 0.02 * (torch.randn(256, 1024, generator=_gen(0)) if kind == "gaussian" else student_t((256, 1024), 3, 1))
    err = {name: quant_error(w, quantize(w, parse_format(name)))["rel_fro"]
           for name in ("w4-g32-sym", "w4-g32-lut", "w4-g32-nl")}
    # Measured (relative Frobenius error): Gaussian nl 0.0750, lut 0.0817, sym 0.0972; Student-t(3)
    # nl 0.0998, lut 0.0983, sym 0.1445. The fixed table fits bell-shaped groups; a fitted one, heavy tails.
    assert err["w4-g32-nl"] < 0.8 * err["w4-g32-sym"], err
    assert err["w4-g32-nl"] < (0.95 if kind == "gaussian" else 1.05) * err["w4-g32-lut"], err


def test_nl_scale_search_beats_its_first_start():
    from uqcit.tensor.lut import dequantize_lut, encode_lut, nl_grid, nl_table

    x = student_t((64 * 256,), 3, 2)
    grid = nl_grid(x, 32)
    m = x.view(-1, 32).gather(1, x.view(-1, 32).abs().argmax(1, keepdim=True)).squeeze(1)
    start = type(grid)((m / -127).to(torch.float16), nl_table())  # largest weight on level -127, no search
    err = lambda g: float((dequantize_lut(encode_lut(x, 4, 32, g), x.numel(), 4, 32) - x).square().sum())  # noqa: E731
    assert err(grid) < 0.97 * err(start), (err(grid), err(start))  # measured: 599 against 632
    weight = torch.rand(x.numel(), generator=_gen(3))
    assert not torch.equal(nl_grid(x, 32, weight).scales, grid.scales)  # the weighting told


def test_gptq_on_the_nl_table():
    fmt = parse_format("w4-g32-nl")
    w, h = student_t((64, 128), 3, 7), _hessian()
    rtn = hessian_error(w, dequantize(quantize(w, fmt)), h)
    for act_order in (True, False):
        q = gptq_quantize(w, h, fmt, act_order=act_order)
        # Measured: 0.101 to nearest, 0.075 with act-order, 0.080 without.
        assert hessian_error(w, dequantize(q), h) < 0.85 * rtn
        assert q.tensors["table"].tolist() == quantize(w, fmt).tensors["table"].tolist()
