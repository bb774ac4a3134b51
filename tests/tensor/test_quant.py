"""quantize/dequantize: exact bit accounting, exact re-quantization, error bounds, storage."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from uqcit.tensor.formats import QuantFormat, parse_format
from uqcit.tensor.mask import top_mask
from uqcit.tensor.packing import unpack
from uqcit.tensor.quant import (
    QuantizedTensor,
    codes_of,
    dequantize,
    dequantize_at,
    quant_error,
    quantize,
    tensor_layout,
    zero_points,
)

FP16_TINY = 2.0**-24

FORMATS = [
    QuantFormat(bits=2, group_size=128),
    QuantFormat(bits=3, group_size=64),
    QuantFormat(bits=4, group_size=128),
    QuantFormat(bits=4, group_size=32, symmetric=True),
    QuantFormat(bits=8, group_size=7),
    QuantFormat(bits=16),
    QuantFormat(bits=2, group_size=128, high_bits=16, high_fraction=0.1),
    QuantFormat(bits=3, group_size=64, high_bits=8, high_fraction=0.3),
    QuantFormat(bits=4, group_size=128, high_bits=8, high_fraction=0.46, symmetric=True),
    QuantFormat(bits=2, group_size=5, high_bits=8, high_fraction=0.5),
    QuantFormat(bits=3, group_size=64, int_zeros=True),
    QuantFormat(bits=2, group_size=5, high_bits=8, high_fraction=0.5, int_zeros=True),
    QuantFormat(bits=5, group_size=32, symmetric=True),  # 5 bits: 8 codes in 5 bytes
    QuantFormat(bits=5, group_size=48, int_zeros=True),  # 5-bit zero points, packed too
    QuantFormat(bits=6, group_size=64),  # 6 bits: 4 codes in 3 bytes
    QuantFormat(bits=6, group_size=7, symmetric=True),
    QuantFormat(bits=5, group_size=32, high_bits=16, high_fraction=0.1),
    QuantFormat(bits=6, group_size=16, high_bits=8, high_fraction=0.3, int_zeros=True),
]
SHAPES = [(1,), (3,), (7, 5), (64, 96), (33, 129), (10, 3, 13), (1000,)]


def gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_stored_bits_equal_planned_bits(fmt, shape):
    q = quantize(gaussian(*shape), fmt)
    numel = math.prod(shape)
    assert q.numel == numel
    assert q.stored_bits == fmt.bits_for(numel)
    assert q.nbytes * 8 == q.stored_bits
    assert q.bits_per_weight == pytest.approx(fmt.bits_per_weight(numel))
    assert dequantize(q).shape == shape


def test_bits_per_weight_matches_hand_count():
    # 2 x 200 weights at w4-g128: 400 codes (200 bytes) + 4 groups x (scale + zero) x 16 bits.
    q = quantize(gaussian(2, 200), QuantFormat(bits=4, group_size=128))
    assert q.stored_bits == 400 * 4 + 4 * 32
    # Mixed, odd high count: 301 weights, 10% -> 30 fp16 weights, 271 at 2 bits, 301-bit mask.
    fmt = QuantFormat(bits=2, group_size=64, high_bits=16, high_fraction=0.1)
    q = quantize(gaussian(301), fmt)
    assert fmt.high_count(301) == 30
    assert q.tensors["high_values"].numel() == 30
    assert q.stored_bits == 8 * math.ceil(271 * 2 / 8) + 5 * 32 + 8 * math.ceil(301 / 8) + 30 * 16


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [5, 6])
def test_5_and_6_bit_codes_pack_into_the_bit_stream_and_dequantize(bits, symmetric):
    w = gaussian(3, 101, seed=7)  # 303 codes: the last chunk (8 codes at 5 bits, 4 at 6) is partial
    q = quantize(w, QuantFormat(bits=bits, group_size=32, symmetric=symmetric))
    assert q.tensors["codes"].numel() == math.ceil(303 * bits / 8)  # 190 bytes at 5 bits, 228 at 6
    codes = codes_of(q)["codes"]
    group = torch.arange(303) // 32
    s = q.tensors["scales"].float()[group]
    offset = torch.full_like(s, 2.0 ** (bits - 1)) if symmetric else q.tensors["zeros"].float()[group]
    expected = torch.clamp(torch.round(w.reshape(-1) / s) + offset, 1 if symmetric else 0, (1 << bits) - 1)
    assert torch.equal(codes.float(), expected)
    assert int(codes.max()) == (1 << bits) - 1  # the top bit is used
    assert torch.equal(dequantize(q).reshape(-1), (expected - offset) * s)
    # The stored bytes are packing.py's little-endian stream: code i at stream bits [i * bits, (i + 1) * bits).
    stream = int.from_bytes(bytes(q.tensors["codes"].tolist()), "little")
    assert [(stream >> (i * bits)) & ((1 << bits) - 1) for i in range(303)] == codes.tolist()


# --- exact re-quantization -----------------------------------------------------------------


def _parts(x: torch.Tensor, q: QuantizedTensor):
    """(prefix, bits, compacted original values) of each integer part of q."""
    fmt = q.fmt
    flat = x.reshape(-1).float()
    if not fmt.mixed:
        return [("", fmt.bits, flat)]
    mask = codes_of(q)["mask"].bool()
    parts = [("", fmt.bits, flat[~mask])]
    if fmt.high_bits == 8:
        parts.append(("high_", 8, flat[mask]))
    return parts


def _assert_requantizes(x: torch.Tensor, fmt: QuantFormat, importance: torch.Tensor | None = None):
    """quantize(dequantize(q)) == q, group by group, except the degenerate groups (module doc)."""
    q1 = quantize(x, fmt, importance)
    d1 = dequantize(q1)
    q2 = quantize(d1, fmt, importance if importance is not None else x.abs())
    if fmt.bits == 16:
        assert torch.equal(q1.tensors["values"], q2.tensors["values"])
        return
    if fmt.mixed:
        assert torch.equal(q1.tensors["mask"], q2.tensors["mask"])
        if fmt.high_bits == 16:
            assert torch.equal(q1.tensors["high_values"], q2.tensors["high_values"])
    c1, c2 = codes_of(q1), codes_of(q2)
    checked = 0
    for prefix, bits, orig in _parts(x, q1):
        deq = _parts(d1, q1)[0 if prefix == "" else 1][2]
        s1, s2 = q1.tensors[prefix + "scales"], q2.tensors[prefix + "scales"]
        z1 = None if fmt.symmetric else zero_points(q1, prefix)
        z2 = None if fmt.symmetric else zero_points(q2, prefix)
        codes1, codes2 = c1[prefix + "codes"], c2[prefix + "codes"]
        gs = fmt.group_size
        for g in range(s1.numel()):
            sl = slice(g * gs, (g + 1) * gs)
            o, d = orig[sl], deq[sl]
            collapsed = bool((d == d[0]).all()) and not bool((o == o[0]).all())
            if float(s1[g]) == FP16_TINY or collapsed:
                continue  # degenerate: scale at the fp16 floor, or all codes equal after rounding
            checked += 1
            assert s1[g] == s2[g], (prefix, g)
            if z1 is not None:
                assert z1[g] == z2[g], (prefix, g)
            assert torch.equal(codes1[sl], codes2[sl]), (prefix, g)
    return checked


formats = st.builds(
    QuantFormat,
    bits=st.sampled_from([2, 3, 4, 5, 6, 8, 16]),
    group_size=st.sampled_from([1, 2, 3, 5, 8, 16, 64]),
    symmetric=st.booleans(),
)
mixed_formats = st.builds(
    QuantFormat,
    bits=st.sampled_from([2, 3, 4, 5, 6, 8]),
    group_size=st.sampled_from([1, 3, 8, 16]),
    symmetric=st.booleans(),
    high_bits=st.sampled_from([8, 16]),
    high_fraction=st.sampled_from([0.01, 0.1, 0.3, 0.5, 0.9]),
)


@st.composite
def tensors(draw):
    shape = draw(st.lists(st.integers(1, 9), min_size=1, max_size=3))
    n = math.prod(shape)
    kind = draw(st.sampled_from(["float", "small-int", "gauss"]))
    if kind == "float":  # adversarial values: ties, zeros, repeats, wide ranges
        values = draw(st.lists(st.floats(-1e3, 1e3, width=16, allow_subnormal=False), min_size=n, max_size=n))
        x = torch.tensor(values, dtype=torch.float32)
    elif kind == "small-int":  # exact half-integers and integers: rounding ties everywhere
        values = draw(st.lists(st.integers(-8, 8), min_size=n, max_size=n))
        x = torch.tensor(values, dtype=torch.float32) / 2
    else:
        scale = draw(st.sampled_from([1e-3, 0.02, 1.0, 300.0]))
        x = gaussian(n, seed=draw(st.integers(0, 10_000))) * scale
    return x.view(shape)


@settings(max_examples=120, deadline=None, database=None)
@given(x=tensors(), fmt=formats)
def test_requantize_reproduces_codes_scales_zeros(x, fmt):
    _assert_requantizes(x, fmt)


@settings(max_examples=80, deadline=None, database=None)
@given(x=tensors(), fmt=mixed_formats)
def test_requantize_mixed_with_same_importance(x, fmt):
    _assert_requantizes(x, fmt, importance=x.abs())


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_requantize_gaussian_checks_every_group(fmt):
    x = gaussian(48, 100, seed=3) * 0.05
    checked = _assert_requantizes(x, fmt, importance=x.abs())
    if fmt.bits != 16:
        n_groups = sum(math.ceil(spec.numel) for name, spec in tensor_layout(x.numel(), fmt).items()
                       if name.endswith("scales"))
        assert checked == n_groups  # no Gaussian group is degenerate


# --- accuracy ---------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
def test_error_decreases_with_bits(symmetric):
    w = gaussian(256, 256, seed=1)
    errors = [quant_error(w, quantize(w, QuantFormat(bits=b, group_size=64, symmetric=symmetric)))["rel_fro"]
              for b in (2, 3, 4, 5, 6, 8)]
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] > 0
    assert errors[-1] < 0.01  # 8 bits per group of 64 Gaussians: well under 1%
    fp16 = quant_error(w, quantize(w, QuantFormat(bits=16)))["rel_fro"]
    assert fp16 < errors[-1]


def test_mixed_precision_beats_its_low_part():
    w = gaussian(128, 256, seed=2)
    low = quant_error(w, quantize(w, QuantFormat(bits=2, group_size=64)))["rel_fro"]
    for high_bits in (8, 16):
        fmt = QuantFormat(bits=2, group_size=64, high_bits=high_bits, high_fraction=0.1)
        assert quant_error(w, quantize(w, fmt))["rel_fro"] < 0.9 * low


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f.bits != 16 and not f.mixed], ids=lambda f: f.name)
def test_dequantized_within_half_a_step(fmt):
    w = gaussian(37, 91, seed=4) * 0.1
    q = quantize(w, fmt)
    flat, deq = w.reshape(-1), dequantize(q).reshape(-1)
    group = torch.arange(flat.numel()) // fmt.group_size
    scale = q.tensors["scales"].float()[group]
    qmax = (1 << fmt.bits) - 1
    qmin = 1 if fmt.symmetric else 0
    offset = (torch.full_like(scale, 2.0 ** (fmt.bits - 1)) if fmt.symmetric
              else zero_points(q)[group])
    raw = torch.round(flat / scale) + offset
    inside = (raw >= qmin) & (raw <= qmax)
    err = (flat - deq).abs()
    assert inside.float().mean() > 0.95
    assert bool((err[inside] <= scale[inside] * (0.5 + 1e-6)).all())
    # Clamped values (the group extremes) stay within a step too.
    assert bool((err <= scale * (0.5 + qmax * 2.0**-11) + 1e-7).all())


def test_codes_are_the_rounding_rule_with_stored_scales():
    w = gaussian(4, 64, seed=5)
    q = quantize(w, QuantFormat(bits=4, group_size=16))
    s = q.tensors["scales"].float().repeat_interleave(16)
    z = q.tensors["zeros"].float().repeat_interleave(16)
    expected = torch.clamp(torch.round(w.reshape(-1) / s) + z, 0, 15)
    assert torch.equal(codes_of(q)["codes"].float(), expected)
    assert torch.equal(dequantize(q).reshape(-1), (expected - z) * s)


def test_symmetric_codes_never_use_the_lowest_level():
    w = gaussian(64, 64, seed=6)
    w[0, :32] *= 1e-3  # subnormal fp16 scales: the scale may step below the exact one
    w[1, :32] = torch.linspace(-6.1774e-04, 6.1155e-05, 32)
    for bits in (2, 3, 4, 5, 6, 8):
        q = quantize(w, QuantFormat(bits=bits, group_size=32, symmetric=True))
        codes = codes_of(q)["codes"]
        assert int(codes.min()) >= 1
        assert int(codes.max()) == (1 << bits) - 1  # absmax reaches the top level
        assert "zeros" not in q.tensors


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_constant_and_zero_groups_are_exact(bits, symmetric):
    # Groups of 4: constant positive, constant negative, zero, and one ordinary group.
    w = torch.tensor([0.3125] * 4 + [-7.5] * 4 + [0.0] * 4 + [0.1, -0.2, 0.3, 0.4] + [1e-3] * 3)
    q = quantize(w, QuantFormat(bits=bits, group_size=4, symmetric=symmetric))
    deq = dequantize(q)
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[:12], w[:12])
    assert deq[16:].eq(torch.tensor(1e-3).half().float()).all()  # not fp16-exact: nearest fp16
    assert torch.equal(dequantize(quantize(torch.zeros(5, 3), QuantFormat(bits=bits))), torch.zeros(5, 3))


def test_group_size_one_is_fp16_exact():
    w = gaussian(9, 11).half().float()
    assert torch.equal(dequantize(quantize(w, QuantFormat(bits=2, group_size=1))), w)


def test_one_sided_groups_use_the_whole_code_range():
    w = torch.linspace(10.0, 11.0, 16)  # all positive: the range is widened to include 0
    q = quantize(w, QuantFormat(bits=4, group_size=16))
    assert q.tensors["zeros"].item() == 0
    assert int(codes_of(q)["codes"].max()) == 15
    assert quant_error(w, q)["max_abs"] <= q.tensors["scales"].float().item() / 2 + 1e-6


def test_mixed_keeps_the_most_important_weights_exactly():
    w = gaussian(20, 30, seed=7)
    fmt = QuantFormat(bits=2, group_size=32, high_bits=16, high_fraction=0.1)
    q = quantize(w, fmt)
    mask = codes_of(q)["mask"].bool().view(w.shape)
    assert int(mask.sum()) == 60
    assert w.abs()[mask].min() >= w.abs()[~mask].max()
    assert torch.equal(dequantize(q)[mask], w[mask].half().float())
    # A caller's importance overrides |w|: take the first row by importance.
    importance = torch.zeros_like(w)
    importance[0] = 1.0
    q = quantize(w, QuantFormat(bits=2, group_size=32, high_bits=16, high_fraction=0.05), importance)
    assert codes_of(q)["mask"].bool().view(w.shape)[0].all()
    assert torch.equal(dequantize(q)[0], w[0].half().float())


@pytest.mark.parametrize("n", [1000, (1 << 20) + 123])  # small (direct) and large (bracketed) selection
def test_top_mask_is_exact_and_breaks_ties_by_index(n):
    gen = torch.Generator().manual_seed(8)
    importance = torch.randint(0, 50, (n,), generator=gen).float()  # many ties
    for k in (0, 1, n // 10, n // 2 + 1, n):
        mask = top_mask(importance, k)
        expected = torch.zeros(n, dtype=torch.bool)
        expected[torch.argsort(importance, descending=True, stable=True)[:k]] = True
        assert torch.equal(mask, expected), k


def test_quantize_does_not_touch_its_inputs():
    w = gaussian(16, 40)
    importance = gaussian(16, 40, seed=1)
    w0, i0 = w.clone(), importance.clone()
    version = w._version
    for fmt in FORMATS:
        q = quantize(w, fmt, importance)
        for t in q.tensors.values():
            assert t.data_ptr() != w.data_ptr()
    assert torch.equal(w, w0) and torch.equal(importance, i0)
    assert w._version == version


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_and_output_dtypes(dtype):
    w = gaussian(8, 64).to(dtype)
    fmt = QuantFormat(bits=4, group_size=32)
    q = quantize(w, fmt)
    assert torch.equal(q.tensors["codes"], quantize(w.float(), fmt).tensors["codes"])
    out = dequantize(q, dtype=dtype)
    assert out.dtype == dtype
    assert torch.equal(out, dequantize(q).to(dtype))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_dequantize_at_matches_full_dequantize(fmt):
    w = gaussian(33, 129)
    q = quantize(w, fmt)
    index = torch.randint(0, w.numel(), (5, 40), generator=torch.Generator().manual_seed(0))
    index[0, :3] = torch.tensor([0, w.numel() - 1, 8])  # both ends and a byte boundary of the mask
    full = dequantize(q).reshape(-1)
    assert torch.equal(dequantize_at(q, index), full[index])
    assert torch.equal(dequantize_at(q, torch.arange(w.numel())), full)
    assert dequantize_at(q, index, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(IndexError, match="out of range"):
        dequantize_at(q, torch.tensor([w.numel()]))


# --- storage -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_safetensors_round_trip(fmt, tmp_path):
    w = gaussian(5, 7)  # tiny: some mixed parts are empty tensors
    q = quantize(w, fmt)
    path = tmp_path / "q.safetensors"
    save_file(q.state_dict("layer.weight."), str(path))
    meta = json.loads(json.dumps(q.meta()))
    back = QuantizedTensor.from_state_dict(load_file(str(path)), "layer.weight.", tuple(meta["shape"]),
                                           QuantFormat.from_dict(meta["fmt"]))
    assert back.fmt == fmt and back.shape == (5, 7)
    assert torch.equal(dequantize(back), dequantize(q))
    assert path.stat().st_size >= q.nbytes


def test_quantized_tensor_rejects_inconsistent_storage():
    q = quantize(gaussian(4, 32), QuantFormat(bits=4, group_size=16))
    bad = dict(q.tensors, scales=q.tensors["scales"].float())
    with pytest.raises(ValueError, match="'scales'.*float16"):
        QuantizedTensor(q.shape, q.fmt, bad)
    with pytest.raises(ValueError, match="stores tensors"):
        QuantizedTensor(q.shape, q.fmt, {k: v for k, v in q.tensors.items() if k != "zeros"})
    with pytest.raises(ValueError, match="'codes'"):
        QuantizedTensor((4, 33), q.fmt, q.tensors)
    with pytest.raises(ValueError, match=r"lacks \['x.zeros'\]"):
        QuantizedTensor.from_state_dict({"x.codes": q.tensors["codes"], "x.scales": q.tensors["scales"]},
                                        "x.", q.shape, q.fmt)


@pytest.mark.parametrize(
    "w, message",
    [
        (torch.tensor([1.0, float("nan")]), "NaN or infinite"),
        (torch.tensor([1.0, float("inf")]), "NaN or infinite"),
        (torch.tensor([1.0, 1e5]), "65504"),
        (torch.zeros(0), "empty"),
        (torch.tensor([1, 2]), "floating-point"),
    ],
)
@pytest.mark.parametrize("fmt", [QuantFormat(bits=4, group_size=2), QuantFormat(bits=16),
                                 QuantFormat(bits=2, group_size=2, high_bits=8, high_fraction=0.5)],
                         ids=lambda f: f.name)
def test_quantize_rejects_bad_weights(w, message, fmt):
    with pytest.raises(ValueError, match=message):
        quantize(w, fmt)


def test_quantize_rejects_bad_importance():
    fmt = QuantFormat(bits=2, group_size=8, high_bits=16, high_fraction=0.25)
    w = gaussian(4, 8)
    with pytest.raises(ValueError, match="importance has shape"):
        quantize(w, fmt, torch.ones(32))
    with pytest.raises(ValueError, match="NaN"):
        quantize(w, fmt, torch.full((4, 8), float("nan")))


def test_quant_error_fields():
    w = gaussian(32, 32)
    q = quantize(w, QuantFormat(bits=3, group_size=32))
    e = quant_error(w, q)
    assert set(e) == {"rel_fro", "sqnr_db", "mse", "max_abs"}
    assert e["sqnr_db"] == pytest.approx(-20 * math.log10(e["rel_fro"]))
    assert e["mse"] == pytest.approx(float((dequantize(q) - w).square().mean()), rel=1e-5)
    exact = quantize(w.half().float(), QuantFormat(bits=16))
    assert quant_error(w.half().float(), exact)["sqnr_db"] == math.inf


def test_repr_is_short():
    q = quantize(gaussian(64, 64), QuantFormat(bits=4, group_size=64))
    assert repr(q) == "QuantizedTensor(shape=(64, 64), fmt=w4-g64, bpw=4.5, nbytes=2304)"


def test_unpack_of_stored_codes_has_expected_length():
    q = quantize(gaussian(3, 50), QuantFormat(bits=3, group_size=16))
    assert unpack(q.tensors["codes"], 3, 150).numel() == 150


@pytest.mark.parametrize("symmetric", [False, True])
def test_groups_narrower_than_fp16_stay_finite(symmetric):
    # Ranges far below the smallest fp16 scale: the scale floors at 2**-24 instead of 0.
    w = torch.tensor([0.0, 1e-9, -2e-9, 3e-9, 1e-12, 1e-12, 2e-12, 0.0])
    q = quantize(w, QuantFormat(bits=4, group_size=4, symmetric=symmetric))
    assert bool((q.tensors["scales"].float() > 0).all())
    deq = dequantize(q)
    assert torch.isfinite(deq).all()
    assert float((deq - w).abs().max()) <= FP16_TINY / 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_cuda_storage_is_bit_identical_to_cpu(fmt):
    w = gaussian(33, 129)
    cpu = quantize(w, fmt)
    gpu = quantize(w.cuda(), fmt)
    assert gpu.device.type == "cuda"
    for name, t in cpu.tensors.items():
        assert torch.equal(gpu.tensors[name].cpu(), t), name
    assert torch.equal(dequantize(gpu).cpu(), dequantize(cpu))


@pytest.mark.parametrize("fmt", ["w3-g64", "w2-g5+w8@0.5", "w4-g30"])
def test_integer_zero_points_store_the_same_weights_in_fewer_bits(fmt):
    w = gaussian(33, 129) * torch.linspace(0.1, 3, 129) + 0.3  # skewed groups: zeros differ
    fp16_zeros = parse_format(fmt)
    int_zeros = dataclasses.replace(fp16_zeros, int_zeros=True)
    a, b = quantize(w, fp16_zeros), quantize(w, int_zeros)
    assert torch.equal(dequantize(a), dequantize(b))
    assert torch.equal(a.tensors["codes"], b.tensors["codes"])
    saved = 0
    for prefix in ("", "high_") if fp16_zeros.mixed else ("",):
        assert b.tensors[prefix + "zeros"].dtype == torch.uint8
        saved += 16 * a.tensors[prefix + "scales"].numel() - 8 * b.tensors[prefix + "zeros"].numel()
    assert a.stored_bits - b.stored_bits == saved > 0
    assert int_zeros.name == fp16_zeros.name.replace(f"g{fp16_zeros.group_size}", f"g{fp16_zeros.group_size}-iz")
    assert parse_format(int_zeros.name) == int_zeros
    assert torch.equal(zero_points(a), zero_points(b))
    index = torch.tensor([0, 5, 128, 4000, w.numel() - 1])
    assert torch.equal(dequantize_at(b, index), dequantize(a).view(-1)[index])


def test_integer_zero_points_need_an_asymmetric_integer_format():
    with pytest.raises(ValueError, match="int_zeros"):
        QuantFormat(bits=4, group_size=64, symmetric=True, int_zeros=True)
    assert "int_zeros" not in QuantFormat(bits=4).to_dict()  # old metadata stays byte-identical
    assert QuantFormat.from_dict(QuantFormat(bits=3, int_zeros=True).to_dict()).int_zeros


@pytest.mark.parametrize("fmt", ["w3-g64", "w4-g32-sym", "w2-g30-iz", "w3-g64+w8@0.1"])
def test_clipping_search_never_loses_and_wins_on_outliers(fmt):
    from uqcit.tensor.quant import quant_params, quantize_with

    fmt = parse_format(fmt)
    w = gaussian(24, 120)
    w[::5, ::7] *= 6  # outliers stretch their groups' ranges
    weight = torch.rand(120, generator=torch.Generator().manual_seed(2)).expand_as(w)
    plain = quantize(w, fmt)
    searched = quantize_with(w, quant_params(w, fmt, search=True, search_weight=weight))
    assert searched.stored_bits == plain.stored_bits
    err = lambda q: float(((dequantize(q) - w).square() * weight).sum())  # noqa: E731
    assert err(searched) < 0.95 * err(plain)
    calm = gaussian(24, 120, seed=5)  # plain MSE search: never worse than min/max on its own metric
    mse = lambda q: float((dequantize(q) - calm).square().sum())  # noqa: E731
    assert mse(quantize_with(calm, quant_params(calm, fmt, search=True))) <= mse(quantize(calm, fmt))
