"""The GGUF export read back by gguf's reader (names, types, shapes, values) and transformers' GGUF loader (logits)."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from uqcit.export.gguf import blocks_of, export_gguf, gguf_formats, gguf_type, permute_rows
from uqcit.export.hf import ExportError, dequantized_state
from uqcit.package import LoadedPackage, export_package, load_package
from uqcit.tensor.formats import parse_format
from uqcit.tensor.quant import quantize

IDS = torch.tensor([[1, 2, 3, 40, 50, 60, 7]])
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def _package(tmp_path_factory, bits: int, symmetric: bool, fmt: str | None = None) -> LoadedPackage:
    from uqcit.inputs.tiny import tiny_model
    from uqcit.stages.levels import analyze_levels
    from uqcit.stages.plan import PlanConfig, build_plan
    from uqcit.stages.quantize import quantize_model

    model, tok = tiny_model("llama")
    levels = analyze_levels(model)
    plan = build_plan(levels, PlanConfig(preset="uniform", bits=bits, group_size=32, symmetric=symmetric,
                                         overrides={"re:.*": fmt} if fmt else {}))
    q = quantize_model(model, levels, plan, progress=False)
    path = export_package(q, tok, tmp_path_factory.mktemp("pkg") / "package", source_model="tiny-llama")
    return load_package(path, progress=False)


# (bits, symmetric) -> the llama.cpp type and whether the package's codes are carried bit for bit
CASES = {(4, True): ("Q4_0", True), (4, False): ("Q4_1", True), (5, True): ("Q5_0", True),
         (5, False): ("Q5_1", True), (8, True): ("Q8_0", True), (8, False): ("Q8_0", False)}


@pytest.fixture(scope="module", params=sorted(CASES), ids=lambda c: f"w{c[0]}-g32{'-sym' if c[1] else ''}")
def exported(request, tmp_path_factory):
    pkg = _package(tmp_path_factory, *request.param)
    out = export_gguf(pkg, tmp_path_factory.mktemp("gguf") / "model.gguf")
    return request.param, pkg, out


def _hf_key(name: str) -> str:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    _, n, part, _ = name.split(".")
    return f"model.layers.{n}.{HF_NAMES[part]}.weight"


def _tolerance(qname: str, exact: bool, ref: np.ndarray, pkg_q) -> float:
    """How far a GGUF block type may sit from the package's dequantized weight."""
    if qname in ("F32", "Q4_0", "Q5_0") or (qname == "Q8_0" and exact):
        return 0.0  # the same codes times the same fp16 scale, in float32
    if qname in ("Q4_1", "Q5_1"):  # m = fp16(-zero * scale): half an fp16 ulp of the largest offset
        scale = pkg_q.tensors["scales"].float()
        return float((pkg_q.tensors["zeros"].float() * scale).abs().max()) * 2.0 ** -11
    if qname == "Q8_0":  # re-quantized: half a step of amax / 127 per block, plus the fp16 scale rounding
        return float(np.abs(ref).max()) / 127
    return float(np.abs(ref).max()) * 2.0 ** -11  # F16


def test_reader_sees_llama_names_types_shapes_and_values(exported):
    (bits, sym), pkg, out = exported
    qname, exact = CASES[(bits, sym)]
    reader = gguf.GGUFReader(out.path)
    state = dequantized_state(pkg.model)
    quantized = {f"{n}.weight": m.qtensor for n, m in pkg.model.named_modules() if hasattr(m, "qtensor")}
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reads token_embd
    assert names == {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{n}.{p}.weight" for n in range(4) for p in HF_NAMES}
    config = pkg.model.config
    for t in reader.tensors:
        key = _hf_key(t.name)
        ref = state[key].numpy()
        want = "F32" if ref.ndim == 1 else qname
        assert t.tensor_type.name == want == out.types[t.name], t.name
        assert out.exact[t.name] == (exact or want == "F32")
        assert tuple(int(s) for s in reversed(t.shape)) == ref.shape  # GGUF lists dims innermost first
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape)
        if "attn_q" in t.name or "attn_k" in t.name:  # stored in llama.cpp's rotary order
            heads = config.num_attention_heads if "attn_q" in t.name else config.num_key_value_heads
            ref = ref[permute_rows(ref.shape[0], heads).numpy()]
        tol = _tolerance(want, out.exact[t.name], ref, quantized.get(key))
        np.testing.assert_allclose(got, ref, rtol=0, atol=tol, err_msg=t.name)
    fields = reader.fields
    arch = {k: fields[f"llama.{k}"].contents() for k in (
        "context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
        "attention.head_count_kv", "vocab_size")}
    assert arch == {"context_length": 512, "embedding_length": 64, "block_count": 4, "feed_forward_length": 128,
                    "attention.head_count": 4, "attention.head_count_kv": 2, "vocab_size": 256}
    assert fields["general.file_type"].contents() == gguf.LlamaFileType[f"MOSTLY_{qname}"]
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"].contents()) == 256


def test_transformers_gguf_loader_gives_the_package_logits(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (bits, sym), pkg, out = exported
    model = AutoModelForCausalLM.from_pretrained(out.path.parent, gguf_file=out.path.name).eval()
    with torch.no_grad():
        got, ref = model(IDS).logits, pkg.model(IDS).logits
    # Exact types: float32 rounding only. Q4_1's and Q5_1's fp16 offset m moves each weight by <= 2**-11
    # of it; the re-quantized Q8_0 (w8 with zero points) by up to half a step of its block's amax / 127.
    qname, exact = CASES[(bits, sym)]
    atol = 1e-5 if qname not in ("Q4_1", "Q5_1") and exact else 5e-3 if exact else 2e-2
    torch.testing.assert_close(got, ref, rtol=0, atol=atol)
    tok = AutoTokenizer.from_pretrained(out.path.parent, gguf_file=out.path.name)
    assert tok("hello world").input_ids == pkg.tokenizer("hello world").input_ids


def test_blocks_carry_the_codes_bit_for_bit():
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    for name, qname in (("w4-g64-sym", "Q4_0"), ("w2-g32-sym", "Q4_0"), ("w3-g128", "Q4_1"), ("w8-g32-sym", "Q8_0"),
                        ("w6-g32-sym", "Q8_0"), ("w6-g64-sym", "Q8_0"), ("w4-g32-nl", "IQ4_NL"),
                        ("w4-g64-nl", "IQ4_NL")):
        q = quantize(w, parse_format(name))
        assert gguf_type(q.fmt, q.shape) == (qname, True)
        qtype = gguf.GGMLQuantizationType[qname]
        got = gguf.quants.dequantize(blocks_of(q, qname), qtype)
        from uqcit.tensor.quant import dequantize

        tol = 0.0 if qname != "Q4_1" else float(dequantize(q).abs().max()) * 2.0 ** -10
        np.testing.assert_allclose(got, dequantize(q).numpy(), rtol=0, atol=tol, err_msg=name)


def _gguf_q4_k(q) -> np.ndarray:
    """gguf-py's reference decode of our Q4_K blocks of ``q``, float32 ``q.shape``."""
    blocks = blocks_of(q, "Q4_K")
    assert blocks.shape == (q.shape[0], q.shape[1] // 256 * 144) and blocks.dtype == np.uint8
    return gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_K).astype(np.float32).reshape(q.shape)


def _trained_looking(w: torch.Tensor, fmt, gen: torch.Generator):
    """``w`` in ``fmt`` with random learned-rounding offsets and clipping, so that the lowest code
    (the most negative level) occurs, as it does after training."""
    from uqcit.tensor.learned import LearnedWeight
    from uqcit.tensor.quant import codes_of

    lw = LearnedWeight(w, fmt)
    with torch.no_grad():
        lw.v.uniform_(-0.5, 0.5, generator=gen)
        lw.alpha.uniform_(0.6, 1.0, generator=gen)
        lw.beta.uniform_(0.6, 1.0, generator=gen)
    learned = lw.quantized()
    assert int((codes_of(learned)["codes"] == 0).sum()) > 0
    return learned


def test_q4_k_blocks_carry_double_quantized_scales_bit_for_bit():
    from uqcit.tensor.quant import dequantize

    gen = torch.Generator().manual_seed(1)
    fmt = parse_format("w4-g32-sym-s6")
    # Column magnitudes from 0.01 to 3: the super-scales and scale codes differ from block to block.
    w = torch.randn(8, 512, generator=gen) * torch.linspace(0.01, 3.0, 512)
    rtn = quantize(w, fmt)
    learned = _trained_looking(w, fmt, gen)
    assert len(set(rtn.tensors["super_scales"].tolist())) > 1
    for q in (rtn, learned):
        assert gguf_type(q.fmt, q.shape) == ("Q4_K", True)
        assert np.array_equal(_gguf_q4_k(q), dequantize(q).numpy())
    huge = quantize(w, fmt)  # a super-scale whose 8x overflows Q4_K's fp16 dmin
    huge.tensors["super_scales"][0] = 8192.0
    with pytest.raises(ExportError, match="dmin = 8 \\* super-scale overflows"):
        blocks_of(huge, "Q4_K")


@pytest.mark.parametrize("name", ["w5-g32-sym", "w5-g128-sym", "w5-g32", "w5-g64-iz"])
def test_q5_blocks_carry_the_codes(name):
    """gguf-py's Q5_0 decode is the package's weight bit for bit; its Q5_1 decode is exactly
    ``code * scale + fp16(-zero * scale)``, within half an fp16 ulp of that offset of the package's."""
    from uqcit.tensor.quant import codes_of, dequantize, scales_of, zero_points

    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.01, 3.0, 256)
    w[0, :128] = w[0, :128].abs() + 0.5  # all-positive groups: zero point 0, so Q5_1's m = 0 is exact
    q = quantize(w, parse_format(name))
    qname = "Q5_0" if q.fmt.symmetric else "Q5_1"
    assert gguf_type(q.fmt, q.shape) == (qname, True)
    blocks = blocks_of(q, qname)
    assert blocks.dtype == np.uint8 and blocks.shape == (8, 256 // 32 * (22 if q.fmt.symmetric else 24))
    got = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qname]).astype(np.float32).reshape(q.shape)
    codes = codes_of(q)["codes"]
    assert bool((codes >= 16).any()) and bool((codes < 16).any())  # the fifth bit (qh) is set and clear
    ref = dequantize(q).numpy()
    if q.fmt.symmetric:
        assert np.array_equal(got, ref)
        return
    group = torch.arange(q.numel) // q.fmt.group_size
    scale, zero = scales_of(q)[group], zero_points(q)[group]
    m = (-zero * scale).half().float()
    assert np.array_equal(got.reshape(-1), (codes.float() * scale + m).numpy())  # the stated formula, exactly
    assert np.array_equal(got[0, :128], ref[0, :128])
    tol = float((zero * scale).abs().max()) * 2.0 ** -11 + float(np.abs(ref).max()) * 2.0 ** -23
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol)


def test_q6_k_blocks_carry_double_quantized_6_bit_codes_bit_for_bit():
    from uqcit.tensor.packing import unpack
    from uqcit.tensor.quant import dequantize

    gen = torch.Generator().manual_seed(2)
    # Column magnitudes from 0.01 to 3: the super-scales and scale codes differ from block to block.
    w = torch.randn(4, 512, generator=gen) * torch.linspace(0.01, 3.0, 512)
    for name in ("w6-g16-sym-s7", "w6-g64-sym-s5", "w6-g128-sym-s4"):
        fmt = parse_format(name)
        rtn = quantize(w, fmt)
        learned = _trained_looking(w, fmt, gen)
        scale_codes = unpack(rtn.tensors["scale_codes"], fmt.scale_bits, w.numel() // fmt.group_size)
        assert int(scale_codes.max()) == (1 << fmt.scale_bits) - 1 and len(set(scale_codes.tolist())) > 1
        assert len(set(rtn.tensors["super_scales"].tolist())) > 1
        for q in (rtn, learned):
            assert gguf_type(q.fmt, q.shape) == ("Q6_K", True)
            blocks = blocks_of(q, "Q6_K")
            assert blocks.dtype == np.uint8 and blocks.shape == (4, 2 * 210)
            got = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q6_K).astype(np.float32)
            assert np.array_equal(got.reshape(q.shape), dequantize(q).numpy()), name


@pytest.mark.parametrize("name,shape", [("w4-g32-sym-s6", (8, 576)), ("w4-g32-sym-s5", (8, 512)),
                                        ("w4-g64-sym-s6", (8, 512)), ("w3-g48-iz-s6", (8, 768)),
                                        ("w6-g16-sym-s8", (8, 512)), ("w6-g16-s6", (8, 512)),
                                        ("w6-g8-sym-s6", (8, 512)), ("w6-g16-sym-s7", (8, 576)),
                                        ("w6-g16-sym-s7+w8@0.1", (8, 512)), ("w5-g32-sym-s6", (8, 512))])
def test_other_double_quantized_scales_are_refused_saying_what_exports(name, shape):
    with pytest.raises(ExportError) as err:
        gguf_type(parse_format(name), shape)
    message = str(err.value)
    assert "\n" not in message and name in message and str(shape) in message
    assert ("only as Q4_K, for w4-g32-sym-s6, and as Q6_K, for symmetric 6-bit groups of 16 to 256 weights "
            "with scale codes of at most 7 bits (e.g. w6-g16-sym-s7), on rows that are multiples of 256") in message
    assert "export_dequantized" in message


@pytest.mark.parametrize("name", ["w2-g32-vq4", "w3-g64-vq2"])
def test_vector_codebooks_are_refused_before_anything_is_written(name, tmp_path):
    from uqcit.inputs.tiny import tiny_model
    from uqcit.stages.levels import analyze_levels
    from uqcit.stages.plan import PlanConfig, build_plan
    from uqcit.stages.quantize import quantize_model

    fmt = parse_format(name)
    for shape in ((64, 256), (64, 48)):  # 32-multiple rows or not: refused either way
        with pytest.raises(ExportError) as err:
            gguf_type(fmt, shape)
        message = str(err.value)
        assert "\n" not in message and name in message and "codebook" in message
        assert "`uqcit export PACKAGE --to hf`" in message
    assert gguf_formats([name, "w4-g32-sym"]) == ["w4-g32-sym"]
    model, tok = tiny_model("llama")
    levels = analyze_levels(model)
    q = quantize_model(model, levels, build_plan(levels, PlanConfig(preset="uniform", bits=4, group_size=32, overrides={
        "re:.*mlp.down_proj": name})), progress=False)
    with pytest.raises(ExportError, match=rf"module model.layers.0.mlp.down_proj \({name}\) of shape \(64, 128\): "
                                          rf"each code stands for {fmt.vq} weights.*--to hf"):
        export_gguf(LoadedPackage(q.model, tok, {}, tmp_path / "pkg", 0.0), tmp_path / "model.gguf")
    assert not list(tmp_path.iterdir())


def test_type_choice():
    assert gguf_type(None, (64,)) == ("F32", True)
    assert gguf_type(parse_format("w4-g128"), (64, 48)) == ("F32", True)  # rows not a multiple of 32
    assert gguf_type(parse_format("w4-g16"), (64, 64)) == ("Q8_0", False)  # group splits a block
    assert gguf_type(parse_format("w2-g128+w16@0.1"), (64, 64)) == ("F16", False)
    assert gguf_type(parse_format("fp16"), (64, 64)) == ("F16", True)
    assert gguf_type(parse_format("w5-g32-sym"), (64, 48)) == ("F32", True)
    assert gguf_type(parse_format("w5-g48-sym"), (64, 96)) == ("Q8_0", False)  # a group splits a Q5 block
    assert gguf_type(parse_format("w5-g64-iz"), (64, 64)) == ("Q5_1", True)
    assert gguf_type(parse_format("w6-g32"), (64, 64)) == ("Q8_0", False)  # zero points: re-quantized
    assert gguf_type(parse_format("w6-g16-sym-s7"), (64, 256)) == ("Q6_K", True)
    assert gguf_type(parse_format("w6-g256-sym-s4"), (64, 256)) == ("Q6_K", True)
    assert gguf_type(parse_format("w4-g48-nl"), (64, 96)) == ("Q8_0", False)  # a group splits an IQ4_NL block
    assert gguf_type(parse_format("w4-g32-nl"), (64, 48)) == ("F32", True)
    with pytest.raises(ValueError, match="not carried exactly as Q5_0"):
        blocks_of(quantize(torch.randn(4, 64), parse_format("w5-g32")), "Q5_0")  # Q5_1's, not Q5_0's


def test_permutation_matches_llama_cpp():
    def permute(weights, n_head):  # convert_hf_to_gguf.py, LlamaModel.permute
        return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2) \
            .reshape(weights.shape)

    w = torch.randn(96, 8)
    assert torch.equal(w[permute_rows(96, 3)], permute(w, 3))


def test_non_llama_is_refused(tmp_path):
    from uqcit.inputs.tiny import tiny_model

    model, tok = tiny_model("gpt2")
    with pytest.raises(ExportError, match="Llama family.*gpt2.*export_dequantized"):
        export_gguf(LoadedPackage(model, tok, {}, tmp_path, 0.0), tmp_path / "m.gguf")


def test_a_tokenizer_that_is_not_byte_level_is_refused(tmp_path):
    from tokenizers import decoders

    from uqcit.inputs.tiny import tiny_model

    model, tok = tiny_model("llama")
    tok.backend_tokenizer.decoder = decoders.ByteFallback()  # as sentencepiece-converted vocabularies decode
    with pytest.raises(ExportError, match="byte-level BPE"):
        export_gguf(LoadedPackage(model, tok, {}, tmp_path, 0.0), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_smollm2_round_trips_through_transformers(smollm2, tmp_path):
    """The real SmolLM2-135M (w4-g32-sym: every weight Q4_0, codes as stored), with its BPE merges
    and chat template, read back by transformers' GGUF loader.

    The loader takes ~40 of this test's seconds on one core (gguf's reader parses the 49k-token
    vocabulary twice), so the tokenizer is rebuilt with the loader's own converter from one read
    (``AutoTokenizer.from_pretrained(..., gguf_file=...)`` runs the same two steps, in ~12 s more).
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    from uqcit.stages.levels import analyze_levels
    from uqcit.stages.plan import PlanConfig, build_plan
    from uqcit.stages.quantize import quantize_model

    levels = analyze_levels(smollm2.model)
    plan = build_plan(levels, PlanConfig(preset="uniform", bits=4, group_size=32, symmetric=True))
    q = quantize_model(smollm2.model, levels, plan, progress=False)
    pkg = LoadedPackage(q.model, smollm2.tokenizer, {"source_model": "smollm2-135m"}, tmp_path, 0.0)
    out = export_gguf(pkg, tmp_path / "smollm2.gguf", tokenizer_pre="smollm")  # as its original GGUF says
    assert set(out.types.values()) == {"Q4_0", "F32"} and all(out.exact.values())
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.path.name).eval()
    text = "The capital of France is <|im_start|> 12345 héllo"
    ids = smollm2.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        got, ref = model(ids).logits, q.model(ids).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-3)  # same weights; float32 summation order only

    arch, vocab, tok_config = get_gguf_tokenizer(str(out.path))
    assert arch == "llama" and len(vocab["merges"]) > 40_000 and vocab["pre_tokenizer_type"] == "smollm"
    assert tok_config["chat_template"] == smollm2.tokenizer.chat_template
    backend, _ = convert_gguf_tokenizer(arch, vocab)
    assert backend.encode(text).ids == ids[0].tolist()


def test_a_float_model_can_be_written_in_float32_exactly(tmp_path):
    from uqcit.inputs.tiny import tiny_model

    model, tok = tiny_model("llama")  # a float model, as benchmarks/gguf_llamacpp.py writes its reference
    out = export_gguf(LoadedPackage(model, tok, {}, tmp_path, 0.0), tmp_path / "m.gguf", float_type="F32")
    reader = gguf.GGUFReader(out.path)
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"} and all(out.exact.values())
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    state = dequantized_state(model)
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    np.testing.assert_array_equal(np.asarray(emb.data), state["model.embed_tokens.weight"].numpy())
    with pytest.raises(ValueError, match="float_type must be 'F16' or 'F32'"):
        export_gguf(LoadedPackage(model, tok, {}, tmp_path, 0.0), tmp_path / "x.gguf", float_type="BF16")


def test_iq4_nl_package_runs_in_transformers_gguf_loader(tmp_path_factory):
    # w4-g32-nl: IQ4_NL's levels with the package's own signed scales, so the file holds the codes
    from transformers import AutoModelForCausalLM

    pkg = _package(tmp_path_factory, 4, True, "w4-g32-nl")
    out = export_gguf(pkg, tmp_path_factory.mktemp("gguf") / "model.gguf")
    matrices = {n: t for n, t in out.types.items() if t != "F32"}
    assert set(matrices.values()) == {"IQ4_NL"} and all(out.exact.values())
    reader = gguf.GGUFReader(out.path)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_IQ4_NL
    state = dequantized_state(pkg.model)
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(state["model.layers.0.mlp.down_proj.weight"].shape)
    assert np.array_equal(got, state["model.layers.0.mlp.down_proj.weight"].numpy())
    model = AutoModelForCausalLM.from_pretrained(out.path.parent, gguf_file=out.path.name).eval()
    with torch.no_grad():
        ref = pkg.model(IDS).logits  # the packed kernel: equal to float32 rounding
        torch.testing.assert_close(model(IDS).logits, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
