"""QuantLinear / QuantEmbedding: exact forward, storage round trips, and whole tiny models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from uqcit.tensor.formats import QuantFormat
from uqcit.tensor.quant import dequantize, quantize
from uqcit.runtime.modules import (
    QuantEmbedding,
    QuantLinear,
    linear_weight,
    quantize_embedding,
    quantize_linear,
    replace_module,
)
from uqcit.inputs.tiny import tiny_model

W4 = QuantFormat(bits=4, group_size=32)
FORMATS = [
    W4,
    QuantFormat(bits=3, group_size=48, symmetric=True),
    QuantFormat(bits=8, group_size=64),
    QuantFormat(bits=16),
    QuantFormat(bits=2, group_size=32, high_bits=16, high_fraction=0.1),
    QuantFormat(bits=4, group_size=32, high_bits=8, high_fraction=0.3),
    QuantFormat(bits=4, group_size=32, symmetric=True, scale_bits=6),  # double-quantized scales
    QuantFormat(bits=3, group_size=48, int_zeros=True, scale_bits=6),
    QuantFormat(bits=5, group_size=32, symmetric=True),  # 5- and 6-bit codes straddle bytes
    QuantFormat(bits=6, group_size=48, int_zeros=True),
    QuantFormat(bits=5, group_size=32, high_bits=8, high_fraction=0.2),
]


def seeded(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_quant_linear_equals_linear_on_dequantized_weight(fmt):
    w, b, x = seeded(24, 40), seeded(24, seed=1), seeded(3, 5, 40, seed=2)
    q = quantize(w, fmt)
    layer = QuantLinear(q, b, packed_kernel=False)
    assert (layer.out_features, layer.in_features) == (24, 40)
    assert torch.equal(layer(x), F.linear(x, dequantize(q), b))
    assert torch.equal(QuantLinear(q, packed_kernel=False)(x), F.linear(x, dequantize(q)))
    # The default may compute these 15 rows from the packed codes: equal up to float32 rounding.
    assert torch.allclose(QuantLinear(q, b)(x), F.linear(x, dequantize(q), b), rtol=1e-5, atol=1e-5)
    # Only the stored tensors are buffers, and they are the stored bits.
    assert {n for n, _ in layer.named_buffers()} == set(q.tensors)
    assert sum(8 * t.numel() * t.element_size() for t in layer.buffers()) == fmt.bits_for(w.numel())
    assert fmt.name in repr(layer) and "bpw=" in repr(layer)


def test_quant_linear_follows_input_dtype():
    q = quantize(seeded(16, 32), W4)
    layer = QuantLinear(q, seeded(16))
    x = seeded(2, 32).to(torch.bfloat16)
    out = layer(x)  # few rows: the packed kernel where it is available, in float32, then bfloat16
    assert out.dtype == torch.bfloat16
    exact = F.linear(x, dequantize(q, torch.bfloat16), layer.bias.to(torch.bfloat16))
    assert torch.allclose(out.float(), exact.float(), rtol=2e-2, atol=2e-2)
    plain = QuantLinear(q, layer.bias.detach(), packed_kernel=False)  # the dequantize path, exactly
    assert torch.equal(plain(x), exact)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_state_dict_round_trip_through_safetensors(fmt, tmp_path):
    layer = QuantLinear(quantize(seeded(24, 40), fmt), seeded(24, seed=1))
    save_file(layer.state_dict(), str(tmp_path / "layer.safetensors"))
    fresh = QuantLinear.empty(24, 40, fmt, bias=True)
    fresh.load_state_dict(load_file(str(tmp_path / "layer.safetensors")))
    x = seeded(4, 40, seed=3)
    assert torch.equal(fresh(x), layer(x))
    assert fresh.qtensor.stored_bits == fmt.bits_for(24 * 40)


def test_state_dict_keys_mirror_quantized_tensor():
    q = quantize(seeded(8, 32), W4)
    model = nn.Sequential(QuantLinear(q))
    assert set(model.state_dict()) == set(q.state_dict("0."))


def test_dtype_casts_keep_the_stored_format():
    q = quantize(seeded(16, 32), W4)
    layer = QuantLinear(q, seeded(16)).to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and layer.zeros.dtype == torch.float16
    assert torch.equal(layer.scales, q.tensors["scales"])
    assert layer.bias.dtype == torch.bfloat16
    layer.half().float()
    assert torch.equal(layer.qtensor.tensors["scales"], q.tensors["scales"])


def test_cache_dequantized_is_reused_and_invalidated():
    q = quantize(seeded(16, 32), W4)
    layer = QuantLinear(q, cache_dequantized=True)
    x = seeded(2, 32)
    first = layer(x)
    cached = layer._cache
    assert cached is not None and torch.equal(cached, dequantize(q))
    assert torch.equal(layer(x), first) and layer._cache is cached
    other = QuantLinear(quantize(seeded(16, 32, seed=9), W4), packed_kernel=False)
    layer.load_state_dict(other.state_dict())
    assert layer._cache is None
    assert torch.equal(layer(x), other(x))
    assert QuantLinear(q)._cache is None and (QuantLinear(q)(x) is not None)


def test_conv1d_replacement_matches_conv1d_with_dequantized_weight():
    conv = Conv1D(24, 40)  # nf=24 outputs, nx=40 inputs; weight stored [40, 24]
    with torch.no_grad():
        conv.weight.copy_(seeded(40, 24))
        conv.bias.copy_(seeded(24, seed=1))
    w, b = linear_weight(conv)
    assert w.shape == (24, 40)
    x = seeded(2, 3, 40, seed=2)
    assert torch.allclose(F.linear(x, w, b), conv(x), atol=1e-5)
    q = quantize(w, W4)
    layer = QuantLinear(q, b)
    reference = Conv1D(24, 40)
    with torch.no_grad():
        reference.weight.copy_(dequantize(q).t())
        reference.bias.copy_(b)
    assert layer(x).shape == conv(x).shape
    assert torch.allclose(layer(x), reference(x), atol=1e-5, rtol=0)
    assert not torch.allclose(layer(x), conv(x), atol=1e-5)  # and quantization did change it


def test_linear_weight_rejects_other_modules():
    with pytest.raises(TypeError, match="Embedding"):
        linear_weight(nn.Embedding(4, 4))


@pytest.mark.parametrize("fmt", FORMATS + [QuantFormat(bits=2, group_size=1)], ids=lambda f: f.name)
def test_quant_embedding_equals_embedding_of_dequantized_table(fmt):
    table = seeded(50, 24)  # 24 is not a multiple of the 48/64 groups: groups straddle rows
    q = quantize(table, fmt)
    emb = QuantEmbedding(q, padding_idx=3)
    ids = torch.tensor([[0, 3, 49, 7], [7, 7, 1, 0]])
    out = emb(ids)
    assert out.shape == (2, 4, 24)
    assert torch.equal(out, F.embedding(ids, dequantize(q)))
    assert torch.equal(emb.weight, dequantize(q))
    assert (emb.num_embeddings, emb.embedding_dim, emb.padding_idx) == (50, 24, 3)
    with pytest.raises(IndexError, match="ids must lie in"):
        QuantEmbedding(quantize(table, W4))(torch.tensor([50]))


def test_quant_embedding_dtype_follows_module():
    emb = quantize_embedding(nn.Embedding(10, 32), W4).to(torch.bfloat16)
    assert emb.scales.dtype == torch.float16
    assert emb.weight.dtype == torch.bfloat16
    assert emb(torch.tensor([1, 2])).dtype == torch.bfloat16
    fresh = QuantEmbedding.empty(10, 32, W4)
    fresh.load_state_dict(emb.state_dict())
    assert fresh.dtype == torch.float32
    assert torch.equal(fresh(torch.tensor([4])).to(torch.bfloat16), emb(torch.tensor([4])))


def test_quantized_modules_trace_into_a_graph():
    # torch.export is the first step of torch.onnx.export: the graph must hold neither the C kernel
    # call (eager takes it for these 3 rows) nor a branch on the token ids' values.
    from uqcit.runtime import kernel

    model = nn.Sequential(QuantEmbedding(quantize(seeded(50, 32), W4)),
                          QuantLinear(quantize(seeded(16, 32, seed=1), W4), seeded(16, seed=2)))
    ids = torch.tensor([[3, 7, 49]])
    if kernel.available():
        assert model[1]._packed_kernel(model[0](ids)) is not None  # eager: from the packed codes
    graph = torch.export.export(model, (ids,)).module()
    for probe in (ids, torch.tensor([[0, 1, 2]])):  # the graph is not specialised to the traced ids
        torch.testing.assert_close(graph(probe), model(probe), rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError, match="ids must lie in"):  # eager still checks them
        model(torch.tensor([[50]]))


def test_replace_module_by_dotted_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.Linear(4, 4), nn.ReLU()]))
    new = nn.Identity()
    replace_module(model, "1.0", new)
    assert model[1][0] is new
    replace_module(model, "0", new)
    assert model[0] is new
    with pytest.raises(ValueError, match="no child module '5'"):
        replace_module(model, "1.5", nn.Identity())
    with pytest.raises(ValueError, match="no submodule"):
        replace_module(model, "7.0", nn.Identity())
    with pytest.raises(TypeError):
        replace_module(model, "0", torch.zeros(1))


def _quantize_all(model: nn.Module, fmt: QuantFormat, embeddings: bool = False) -> int:
    """Replace every Linear/Conv1D (and optionally Embedding) of ``model``; return the count."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    if embeddings:
        targets += [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Embedding)]
    for name, module in targets:
        new = quantize_embedding(module, fmt) if isinstance(module, nn.Embedding) else quantize_linear(module, fmt)
        replace_module(model, name, new)
    return len(targets)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_quantized_tiny_model_tracks_float_model(family):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    reference, _ = tiny_model(family)
    ref = _logits(reference, ids)
    errors = {}
    for fmt in (QuantFormat(bits=16), QuantFormat(bits=8, group_size=32), QuantFormat(bits=3, group_size=32)):
        model, _ = tiny_model(family)
        n = _quantize_all(model, fmt)
        assert n >= 4 * (4 if family == "gpt2" else 7)
        assert not any(isinstance(m, (nn.Linear, Conv1D)) for m in model.modules())
        errors[fmt.name] = float((_logits(model, ids) - ref).abs().max() / ref.abs().max())
    assert errors["fp16"] < 1e-2
    assert errors["w8-g32"] < 3e-2
    assert errors["fp16"] < errors["w8-g32"] < errors["w3-g32"]


def test_generate_runs_on_a_fully_quantized_llama():
    model, tok = tiny_model("llama")
    reference, _ = tiny_model("llama")
    _quantize_all(model, QuantFormat(bits=8, group_size=32), embeddings=True)
    assert isinstance(model.get_input_embeddings(), QuantEmbedding)
    ids = tok("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
        ref = reference.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == ref.shape == (1, ids.shape[1] + 6)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    ref_logits = _logits(reference, ids)
    assert float((_logits(model, ids) - ref_logits).abs().max() / ref_logits.abs().max()) < 3e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_modules_move_to_cuda():
    q = quantize(seeded(24, 40), W4)
    layer = QuantLinear(q, seeded(24)).to("cuda")
    emb = QuantEmbedding(q).to("cuda")
    x = seeded(2, 40)
    assert layer.codes.is_cuda and layer.scales.dtype == torch.float16
    assert torch.allclose(layer(x.cuda()).cpu(), QuantLinear(q, seeded(24))(x), atol=1e-5)
    ids = torch.tensor([0, 5, 23])
    assert torch.equal(emb(ids.cuda()).cpu(), QuantEmbedding(q)(ids))
