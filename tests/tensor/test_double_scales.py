"""Double-quantized group scales (``QuantFormat.scale_bits``): bits, grid, every writer and reader."""
from __future__ import annotations

import math

import pytest
import torch

from uqcit.tensor.formats import SUPER_BLOCK, QuantFormat, parse_format
from uqcit.tensor.gptq import gptq_quantize
from uqcit.tensor.grid import FP16_NORMAL, super_index
from uqcit.tensor.learned import LearnedWeight
from uqcit.tensor.packing import pack, unpack
from uqcit.tensor.quant import (
    QuantizedTensor,
    codes_of,
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

from tensor_helpers import gen as _gen

FORMATS = ["w4-g32-sym-s6", "w3-g64-iz-s6", "w3-g48-iz-s6", "w2-g16-s4", "w8-g128-sym-s8", "w4-g32-s5",
           "w3-g32-s7+w8@0.1", "w2-g64-sym-s6+w16@0.05", "w5-g32-sym-s6", "w5-g64-iz-s6", "w6-g16-sym-s7"]


def test_names_parse_and_old_metadata_stays_byte_identical():
    fmt = parse_format("w3-g64-iz-s6")
    assert (fmt.bits, fmt.group_size, fmt.int_zeros, fmt.scale_bits) == (3, 64, True, 6)
    for name in FORMATS:
        assert parse_format(name).name == name
        assert QuantFormat.from_dict(parse_format(name).to_dict()) == parse_format(name)
    assert "scale_bits" not in QuantFormat(bits=4).to_dict()
    with pytest.raises(ValueError, match="scale_bits must be one of"):
        QuantFormat(bits=4, scale_bits=3)
    with pytest.raises(ValueError, match="scale_bits needs an integer format"):
        QuantFormat(bits=16, scale_bits=6)


def test_bits_for_counts_codes_scale_codes_and_super_scales():
    n = 576 * 576
    assert QuantFormat(bits=4, group_size=32, symmetric=True, scale_bits=6).bits_for(n) == 4.25 * n
    # 3-bit codes, 6912 six-bit scale codes, 6912 three-bit zero points, 1296 fp16 super-scales
    assert parse_format("w3-g48-iz-s6").bits_for(n) == 3 * n + 6912 * 6 + 6912 * 3 + 1296 * 16
    assert parse_format("w3-g48-iz-s6").bits_per_weight(n) < parse_format("w3-g64-iz").bits_per_weight(n)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("shape", [(24, 96), (5, 103), (3, 300), (1, 7)])  # 300, 515: partial last super-block
def test_stored_bits_are_the_planned_bits_and_dequantize_reads_them(name, shape):
    fmt = parse_format(name)
    w = torch.randn(shape, generator=_gen(sum(shape)))
    q = quantize(w, fmt)
    assert q.stored_bits == fmt.bits_for(w.numel())
    assert sum(8 * s.numel * s.dtype.itemsize for s in tensor_layout(w.numel(), fmt).values()) == q.stored_bits
    assert "scales" not in q.tensors
    w_hat = dequantize(q)
    index = torch.randint(0, w.numel(), (3, 11), generator=_gen(1))
    assert torch.equal(dequantize_at(q, index), w_hat.view(-1)[index])
    assert float((w_hat - w).abs().max()) < float(w.abs().max())  # a real approximation, not zeros
    # Storage is closed: re-encoding the dequantized weight on the same grid gives the same bytes.
    again = quantize_with(w_hat, quant_params(w, fmt))
    for key, t in q.tensors.items():
        assert torch.equal(again.tensors[key], t), key


@pytest.mark.parametrize("name", ["w4-g32-sym-s6", "w3-g48-iz-s6", "w2-g16-s4", "w5-g32-s6", "w6-g16-sym-s7"])
def test_encoding_follows_the_stated_rules(name):
    fmt = parse_format(name)
    w = torch.randn(7, 200, generator=_gen(3))
    w[2, :64] = 0.0  # all-zero groups must not blow up their super-block's scale
    q = quantize(w, fmt)
    count, gs, sb = w.numel(), fmt.group_size, fmt.scale_bits
    groups = math.ceil(count / gs)
    codes = unpack(q.tensors["scale_codes"], sb, groups).long()
    sup = q.tensors["super_scales"].float()
    assert sup.numel() == math.ceil(count / SUPER_BLOCK)
    assert int(codes.min()) >= 1 and int(codes.max()) <= (1 << sb) - 1
    assert float(sup.min()) >= FP16_NORMAL
    scale = codes.float() * sup[super_index(groups, gs)]
    assert torch.equal(scales_of(q), scale)
    # super = fp16(largest min/max scale of the super-block / (2**s - 1)): that group gets the top code
    flat = torch.nn.functional.pad(w.reshape(-1), (0, groups * gs - count)).view(groups, gs)
    if fmt.symmetric:
        raw = flat.abs().amax(1) / ((1 << (fmt.bits - 1)) - 1)
    else:
        raw = (flat.amax(1).clamp(min=0) - flat.amin(1).clamp(max=0)) / ((1 << fmt.bits) - 1)
    idx = super_index(groups, gs)
    for k in range(sup.numel()):
        members = idx == k
        if members.any():
            expect_sup = (raw[members].max() / ((1 << sb) - 1)).half().clamp(min=FP16_NORMAL)
            assert sup[k] == expect_sup.float()
            assert torch.equal(codes[members], torch.round(raw[members] / sup[k]).clamp(1, (1 << sb) - 1).long())
    # codes are round-to-nearest on the decoded grid
    offset = zero_points(q).repeat_interleave(gs)[:count]
    expect = (torch.round(w.reshape(-1) / scale.repeat_interleave(gs)[:count]) + offset)
    lo = 1 if fmt.symmetric else 0
    assert torch.equal(codes_of(q)["codes"].float(), expect.clamp(lo, (1 << fmt.bits) - 1))
    assert torch.equal(dequantize(q)[2, :64], torch.zeros(64))


@pytest.mark.parametrize("name", ["w4-g32-sym-s6", "w3-g64-s6", "w3-g48-iz-s6", "w5-g64-iz-s6", "w6-g16-sym-s7"])
def test_weights_on_a_representable_grid_come_back_exactly(name):
    # Power-of-two super-scales make every code * super an fp16 value; each group reaches its top
    # level and each super-block holds a group with the top scale code: quantize finds that grid.
    fmt = parse_format(name)
    rows, cols = 4, 3 * SUPER_BLOCK
    n, gs, sb = rows * cols, fmt.group_size, fmt.scale_bits
    groups = math.ceil(n / gs)
    g = _gen(5)
    top = (1 << sb) - 1
    sup = 2.0 ** torch.randint(-12, -6, (math.ceil(n / SUPER_BLOCK),), generator=g).float()
    idx = super_index(groups, gs)
    scale_codes = torch.randint(1, top + 1, (groups,), generator=g)
    first = torch.ones(groups, dtype=torch.bool)
    first[1:] = idx[1:] != idx[:-1]
    scale_codes[first] = top  # the first group of each super-block sets its super-scale
    scale = scale_codes.float() * sup[idx]
    if fmt.symmetric:
        qpos = (1 << (fmt.bits - 1)) - 1
        levels = torch.randint(-qpos, qpos + 1, (groups, gs), generator=g).float()
        levels[:, 0] = qpos
    else:
        qmax = (1 << fmt.bits) - 1
        zero = torch.randint(1, qmax, (groups, 1), generator=g).float()
        codes = torch.randint(0, qmax + 1, (groups, gs), generator=g).float()
        codes[:, 0], codes[:, 1] = 0, qmax
        levels = codes - zero
    w = (levels * scale.unsqueeze(1)).reshape(-1)[:n].view(rows, cols)
    q = quantize(w, fmt)
    assert torch.equal(unpack(q.tensors["scale_codes"], sb, groups), scale_codes.to(torch.uint8))
    assert torch.equal(dequantize(q), w)


def test_rtn_error_of_6_bit_scales_is_close_to_fp16_scales_and_beats_larger_groups():
    w = torch.randn(192, 576, generator=_gen(7)) * 0.02
    err = {name: quant_error(w, quantize(w, parse_format(name)))["rel_fro"]
           for name in ("w4-g32-sym", "w4-g32-sym-s6", "w4-g64-sym")}
    assert err["w4-g32-sym-s6"] < err["w4-g32-sym"] * 1.03
    assert err["w4-g32-sym-s6"] < err["w4-g64-sym"] * 0.97
    assert parse_format("w4-g32-sym-s6").bits_for(w.numel()) == parse_format("w4-g64-sym").bits_for(w.numel())


@pytest.mark.parametrize("name", ["w4-g32-sym-s6", "w3-g48-iz-s6", "w3-g32-s6+w8@0.1", "w5-g32-iz-s6"])
@pytest.mark.parametrize("grid_search", [False, True])
def test_gptq_stores_the_weights_it_rounded_onto_the_decoded_grid(name, grid_search):
    fmt = parse_format(name)
    x = torch.randn(256, 96, generator=_gen(8)) @ torch.randn(96, 96, generator=_gen(9))
    w = torch.randn(40, 96, generator=_gen(10))
    h = x.T @ x / 256
    q = gptq_quantize(w, h, fmt, grid_search=grid_search)
    assert q.stored_bits == fmt.bits_for(w.numel())
    w_hat = dequantize(q)
    # The stored weights are on the stored grid: re-encoding them on it changes nothing.
    again = quantize_with(w_hat, quant_params(w, fmt, search=grid_search,
                                              search_weight=h.diagonal().expand_as(w) if grid_search else None))
    assert torch.equal(dequantize(again), w_hat)
    rtn = dequantize(quantize(w, fmt))
    out_err = lambda wh: float((((wh - w) @ h) * (wh - w)).sum())  # noqa: E731
    assert out_err(w_hat) < out_err(rtn)


@pytest.mark.parametrize("name", ["w4-g32-sym-s6", "w3-g48-iz-s6", "w2-g64-s4", "w5-g32-iz-s6", "w6-g16-sym-s7"])
def test_learned_rounding_decodes_to_its_forward_weight(name):
    fmt = parse_format(name)
    w = torch.randn(6, 192, generator=_gen(11))
    lw = LearnedWeight(w, fmt)
    for _ in range(3):  # signed gradient steps (SignRound) move v, alpha and beta off their start
        lw.zero_grad()
        (lw.forward() - w * 0.9).square().sum().backward()
        assert lw.alpha.grad is not None and bool(lw.alpha.grad.abs().sum() > 0)  # the STE passes gradients
        with torch.no_grad():
            for p in lw.parameters():
                p.sub_(0.05 * p.grad.sign())
        lw.clamp_(0.7)
    q = lw.quantized()
    assert isinstance(q, QuantizedTensor) and q.stored_bits == fmt.bits_for(w.numel())
    assert torch.equal(dequantize(q), lw.forward().detach())


def test_scale_codes_pack_at_their_own_width():
    q = quantize(torch.randn(3, 256, generator=_gen(12)), parse_format("w4-g32-sym-s5"))
    codes = unpack(q.tensors["scale_codes"], 5, 24)
    assert torch.equal(pack(codes, 5), q.tensors["scale_codes"])
    assert q.tensors["scale_codes"].numel() == 15  # 24 codes * 5 bits


@pytest.fixture(scope="module")
def double_package(tmp_path_factory):
    """A tiny Llama whose every weight (embedding too) has double-quantized scales, as a package."""
    from uqcit.inputs.tiny import tiny_model
    from uqcit.package import export_package
    from uqcit.stages.levels import analyze_levels
    from uqcit.stages.plan import BitPlan
    from uqcit.stages.quantize import quantize_model

    model, tok = tiny_model("llama")
    levels = analyze_levels(model)
    plan = BitPlan(default=parse_format("w4-g32-sym-s6"), patterns=(("re:.*mlp.*", parse_format("w3-g48-iz-s6")),))
    q = quantize_model(model, levels, plan, progress=False)
    return q, export_package(q, tok, tmp_path_factory.mktemp("pkg") / "package", source_model="tiny-llama")


def test_a_package_with_double_quantized_scales_loads_back_with_the_same_logits(double_package):
    from uqcit.package import load_package
    from uqcit.runtime.modules import QuantEmbedding, QuantLinear

    q, path = double_package
    loaded = load_package(path, progress=False).model
    mods = [m for m in loaded.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    assert {m.fmt.name for m in mods} == {"w4-g32-sym-s6", "w3-g48-iz-s6"}
    assert any(isinstance(m, QuantEmbedding) for m in mods)
    ids = torch.randint(0, 200, (2, 24), generator=_gen(13))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, q.model(input_ids=ids).logits)
        one = loaded(input_ids=ids[:1, :1]).logits  # one token: the packed kernel where available
        for m in mods:
            if isinstance(m, QuantLinear):
                m.packed_kernel = False
        exact = loaded(input_ids=ids[:1, :1]).logits
    assert torch.allclose(one, exact, rtol=1e-4, atol=1e-4 * float(exact.abs().max()))


def test_exporters_refuse_double_quantized_scales_naming_the_module_and_the_way_out(double_package, tmp_path):
    from uqcit.export.compressed_tensors import export_compressed_tensors
    from uqcit.export.gguf import export_gguf, gguf_formats
    from uqcit.export.hf import ExportError

    _, path = double_package
    with pytest.raises(ExportError, match=r"module model\.layers\.0\.\S+ \(w[34]-g\d+\S*-s6\).*hf export"):
        export_compressed_tensors(path, tmp_path / "ct", widen=True)
    with pytest.raises(ExportError, match=r"module model\.\S+ \(w[34]-g\d+\S*-s6\).*hf export"):
        export_gguf(path, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())
    assert gguf_formats(["w4-g32-sym-s6", "w4-g32-sym"]) == ["w4-g32-sym"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["w4-g32-sym-s6", "w3-g48-iz-s6", "w3-g32-s6+w8@0.1"])
def test_cuda_storage_is_bit_identical_to_cpu(name):
    w = torch.randn(33, 300, generator=_gen(14))
    cpu, gpu = quantize(w, parse_format(name)), quantize(w.cuda(), parse_format(name))
    for key, t in cpu.tensors.items():
        assert torch.equal(gpu.tensors[key].cpu(), t), key
    assert torch.equal(dequantize(gpu).cpu(), dequantize(cpu))


def test_scale_training_trains_double_quantized_layers_as_their_codes(double_package):
    from uqcit.package import load_package
    from uqcit.runtime.trainable import ScaleTrainableLinear, make_trainable

    model = load_package(double_package[1], progress=False).model
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    chosen, _ = make_trainable(model, "scales")
    wrapped = [model.get_submodule(t.name) for t in chosen]
    assert wrapped and all(isinstance(m, ScaleTrainableLinear) and m.base.fmt.scale_bits for m in wrapped)
    with torch.no_grad():  # wrapped, untrained: the stored model's output
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)