"""The packed CPU kernel: numerics against dequantize for every supported layout, when
QuantLinear uses it, copies, and decoding a packed model loaded from a package."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from uqcit.runtime import kernel as packed
from uqcit.stages.quantize import quantize_model
from uqcit.tensor.formats import QuantFormat
from uqcit.stages.levels import analyze_levels
from uqcit.package import export_package, load_package
from uqcit.stages.plan import PlanConfig, build_plan
from uqcit.tensor.quant import dequantize, quantize
from uqcit.runtime.modules import KERNEL_MAX_ROWS, QuantLinear
from uqcit.inputs.tiny import tiny_model

needs_kernel = pytest.mark.skipif(not packed.available(), reason=f"packed kernel unavailable: {packed.unavailable_reason()}")


def seeded(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# Aligned layouts (phase path) and ones whose rows or groups start mid-byte (any-alignment path).
CASES = [
    (QuantFormat(bits=4, group_size=128), (96, 576)),  # groups straddle rows (576 = 4.5 groups)
    (QuantFormat(bits=3, group_size=128), (40, 576)),
    (QuantFormat(bits=2, group_size=64), (40, 192)),
    (QuantFormat(bits=8, group_size=128), (40, 200)),
    (QuantFormat(bits=4, group_size=32, symmetric=True), (24, 96)),
    (QuantFormat(bits=4, group_size=30), (17, 45)),  # odd row length: rows start mid-byte
    (QuantFormat(bits=3, group_size=12), (11, 37)),
    (QuantFormat(bits=2, group_size=128), (9, 130)),
    (QuantFormat(bits=3, group_size=64, int_zeros=True), (40, 192)),  # packed integer zero points
    (QuantFormat(bits=4, group_size=32, symmetric=True, scale_bits=6), (24, 576)),  # double-quantized scales
    (QuantFormat(bits=3, group_size=48, int_zeros=True, scale_bits=6), (40, 192)),
    (QuantFormat(bits=4, group_size=30, scale_bits=5), (17, 45)),
    (QuantFormat(bits=5, group_size=32, symmetric=True), (24, 96)),  # 5 bits: 8 codes in 5 bytes
    (QuantFormat(bits=5, group_size=128), (40, 200)),  # groups straddle rows, chunk-aligned
    (QuantFormat(bits=5, group_size=40, int_zeros=True), (17, 45)),  # rows start mid-byte
    (QuantFormat(bits=6, group_size=64), (40, 192)),  # 6 bits: 4 codes in 3 bytes
    (QuantFormat(bits=6, group_size=12, symmetric=True), (9, 36)),  # rows of 9 chunks of 4
    (QuantFormat(bits=6, group_size=30, int_zeros=True), (11, 37)),
    (QuantFormat(bits=6, group_size=16, symmetric=True, scale_bits=7), (8, 512)),
    (QuantFormat(bits=5, group_size=32, int_zeros=True, scale_bits=6), (24, 576)),
    # lookup tables (w = scale * table[code]): aligned 4-bit codes a byte at a time, the rest one by one
    (QuantFormat(bits=4, group_size=32, symmetric=True, lut=True), (24, 96)),
    (QuantFormat(bits=4, group_size=30, symmetric=True, lut=True), (17, 45)),  # rows start mid-byte
    (QuantFormat(bits=3, group_size=64, symmetric=True, lut=True), (40, 192)),
    (QuantFormat(bits=2, group_size=12, symmetric=True, lut=True), (11, 37)),
    (QuantFormat(bits=4, group_size=32, symmetric=True, lut=True, nl=True), (24, 96)),  # signed scales
    # whole-row vector paths with a scalar tail in every group (20 codes: 16 + 4) and groups that straddle rows
    (QuantFormat(bits=4, group_size=20), (10, 110)),
    (QuantFormat(bits=4, group_size=20, symmetric=True, lut=True), (10, 110)),
    (QuantFormat(bits=4, group_size=22, symmetric=True, lut=True, nl=True), (9, 55)),  # odd rows: mid-byte starts
    (QuantFormat(bits=8, group_size=20, symmetric=True), (9, 37)),  # 8-bit groups with tails
    (QuantFormat(bits=3, group_size=36, int_zeros=True, scale_bits=6), (12, 576)),  # 3-bit groups off chunks
    (QuantFormat(bits=2, group_size=24, int_zeros=True, scale_bits=6), (12, 576)),  # the 2.5 bar's blocks
    (QuantFormat(bits=3, group_size=54, symmetric=True, lut=True), (9, 108)),  # 3-bit tables off chunks
    # vector codebooks (w = scale * codebook[code][coordinate]): 4-, 6- and 8-bit codes of 2 or 4 weights
    (QuantFormat(bits=2, group_size=32, vq=2), (24, 96)),
    (QuantFormat(bits=3, group_size=64, vq=2), (40, 192)),  # 6-bit codes straddle bytes
    (QuantFormat(bits=4, group_size=32, vq=2), (24, 96)),  # 8-bit codes, 256 points
    (QuantFormat(bits=2, group_size=64, vq=4), (24, 192)),  # 8-bit codes of 4 weights
    # odd rows: vectors straddle rows, a short last group (765 = 25.5 x 30) and a short last vector
    (QuantFormat(bits=4, group_size=30, vq=2), (17, 45)),
    (QuantFormat(bits=3, group_size=20, vq=2), (9, 37)),
    (QuantFormat(bits=2, group_size=12, vq=2), (11, 37)),
    (QuantFormat(bits=2, group_size=12, vq=4), (11, 37)),  # 407 weights: 101 vectors of 4 and one of 3
    # fp16 pass-through (a tied head kept in fp16): 8 values at a time, the rest of a row one by one
    (QuantFormat(bits=16), (40, 192)),
    (QuantFormat(bits=16), (11, 37)),
]


@needs_kernel
@pytest.mark.parametrize("fmt,shape", CASES, ids=[f"{f.name}-{s[0]}x{s[1]}" for f, s in CASES])
def test_packed_matmul_equals_matmul_on_dequantized_weight(fmt, shape):
    w = seeded(*shape) * torch.linspace(0.1, 3, shape[1])  # uneven columns: groups differ
    q = quantize(w, fmt)
    assert packed.supports(q)
    for rows in (1, 3):
        x = seeded(rows, shape[1], seed=rows) * 4
        ref = (x.double() @ dequantize(q).double().T)
        got = packed.packed_matmul(x, q)
        assert got.dtype == torch.float32 and got.shape == (rows, shape[0])
        assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_every_integer_width_has_a_kernel_path():
    from uqcit.tensor.formats import INT_BITS

    assert packed.KERNEL_BITS == INT_BITS
    if packed.available():  # chunk-aligned rows and groups take the phase layout, others the any-alignment loop
        for bits, shape, phased in ((5, (4, 96), 1), (6, (4, 36), 1), (5, (4, 36), 0), (6, (4, 45), 0)):
            q = quantize(seeded(*shape), QuantFormat(bits=bits, group_size=shape[1]))
            assert packed.PackedKernel(q)._phased == phased, (bits, shape)


def test_unsupported_formats_are_declined():
    w = seeded(16, 64)
    mixed = quantize(w, QuantFormat(bits=2, group_size=32, high_bits=16, high_fraction=0.1))
    assert not packed.supports(mixed)
    if packed.available():
        with pytest.raises(ValueError, match="handles plain"):
            packed.packed_matmul(seeded(1, 64), mixed)
    # QuantLinear still computes them (dequantize path).
    q = quantize(w, QuantFormat(bits=2, group_size=32, high_bits=16, high_fraction=0.1))
    x = seeded(1, 64, seed=1)
    assert torch.equal(QuantLinear(q)(x), F.linear(x, dequantize(q)))


@needs_kernel
def test_quant_linear_uses_the_kernel_only_for_few_rows():
    q = quantize(seeded(48, 128), QuantFormat(bits=4, group_size=64))
    layer = QuantLinear(q, seeded(48, seed=2))
    few, many = seeded(2, 3, 128, seed=3), seeded(KERNEL_MAX_ROWS + 1, 128, seed=4)
    out = layer(few)
    assert isinstance(layer._kernel, packed.PackedKernel) and out.shape == (2, 3, 48)
    assert torch.allclose(out, F.linear(few, dequantize(q), layer.bias), rtol=1e-5, atol=1e-5)
    assert torch.equal(layer(many), F.linear(many, dequantize(q), layer.bias))  # the exact path
    assert layer._cache is None  # nothing dequantized is kept
    low = layer(few.to(torch.bfloat16))  # bfloat16: the kernel too, in float32, the result back in bfloat16
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), F.linear(few.to(torch.bfloat16).float(), dequantize(q), layer.bias), rtol=2e-2, atol=2e-2)
    off = QuantLinear(q, layer.bias.detach(), packed_kernel=False)
    assert torch.equal(off(few), F.linear(few, dequantize(q), layer.bias)) and off._kernel is None


@needs_kernel
def test_quant_linear_runs_lookup_tables_on_the_kernel_and_on_dequantize():
    q = quantize(seeded(48, 128), QuantFormat(bits=3, group_size=32, symmetric=True, lut=True))
    layer = QuantLinear(q, seeded(48, seed=2))
    few, many = seeded(2, 128, seed=3), seeded(KERNEL_MAX_ROWS + 1, 128, seed=4)
    out = layer(few)
    assert isinstance(layer._kernel, packed.PackedKernel)
    assert torch.allclose(out, F.linear(few, dequantize(q), layer.bias), rtol=1e-5, atol=1e-5)
    assert torch.equal(layer(many), F.linear(many, dequantize(q), layer.bias))  # the exact path
    negated = F.linear(few, -dequantize(q), layer.bias)
    with torch.no_grad():
        layer.table.neg_()  # the buffers are q's tensors: an edit in place, seen after clear_cache
    layer.clear_cache()
    assert torch.allclose(layer(few), negated, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("name", ["w2-g32-vq4", "w3-g32-vq2"])
def test_quant_linear_runs_vector_codebooks_on_the_kernel_and_on_dequantize(name):
    from uqcit.tensor.formats import parse_format

    q = quantize(seeded(48, 128), parse_format(name))
    layer = QuantLinear(q, seeded(48, seed=2))
    few, many = seeded(2, 128, seed=3), seeded(KERNEL_MAX_ROWS + 1, 128, seed=4)
    out = layer(few)
    assert isinstance(layer._kernel, packed.PackedKernel) and layer._kernel._fn is packed._lib().uq_matmul_vq
    assert torch.allclose(out, F.linear(few, dequantize(q), layer.bias), rtol=1e-5, atol=1e-5)
    assert torch.equal(layer(many), F.linear(many, dequantize(q), layer.bias))  # the exact path
    swapped = q.tensors["table"].view(-1, q.fmt.vq).flip(1).reshape(-1)  # every point's coordinates reversed
    with torch.no_grad():
        layer.table.copy_(swapped)  # the buffers are q's tensors: an edit in place, seen after clear_cache
    layer.clear_cache()
    assert torch.allclose(layer(few), F.linear(few, dequantize(q), layer.bias), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(layer(few), out, rtol=1e-3, atol=1e-3)


@needs_kernel
def test_copies_get_their_own_kernel():
    q = quantize(seeded(32, 64), QuantFormat(bits=3, group_size=32))
    layer = QuantLinear(q)
    x = seeded(1, 64, seed=5)
    expected = layer(x)
    twin = copy.deepcopy(layer)
    assert twin._kernel is not layer._kernel
    with torch.no_grad():
        layer.codes.zero_()  # the copy must not read the original's memory
        layer.scales.fill_(0)
    assert torch.equal(twin(x), expected)
    fresh = QuantLinear(quantize(seeded(32, 64, seed=9), QuantFormat(bits=3, group_size=32)))
    twin.load_state_dict(fresh.state_dict())
    assert twin._kernel is None and torch.equal(twin(x), fresh(x))


def test_generate_with_a_packed_package_matches_the_dequantize_path(tmp_path):
    model, tok = tiny_model("llama")
    levels = analyze_levels(model)
    q = quantize_model(model, levels, build_plan(levels, PlanConfig(preset="uniform", bits=4, group_size=32)),
                       progress=False)
    loaded = load_package(export_package(q, tok, tmp_path / "pkg", levels=levels), progress=False).model
    ids = tok("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        out = loaded.generate(ids, max_new_tokens=8, do_sample=False)
        assert out.shape == (1, ids.shape[1] + 8)
        step = loaded(input_ids=out[:, -1:]).logits  # one token: kernel path where available
        for m in loaded.modules():
            if isinstance(m, QuantLinear):
                m.packed_kernel = False
        exact = loaded(input_ids=out[:, -1:]).logits
    assert torch.allclose(step, exact, rtol=1e-4, atol=1e-4 * float(exact.abs().max()))
