"""A Llama-family package as a GGUF file for llama.cpp, its quantized blocks kept where they fit.

Each weight gets the llama.cpp type that its package format maps to (rows must be multiples of 32,
the block of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0; a format's group must be a multiple of 32 so every block lies
in one group; the K-quants' super-block of 256 must likewise start at a row start):

=====================================  ========  =================================================
package format                         GGUF      how
=====================================  ========  =================================================
``w2/w3/w4-g{32k}-sym``                Q4_0      bit-identical: ``d = scale``, ``q = code - 2**(b-1) + 8``
``w2/w3/w4-g{32k}`` (zero points)      Q4_1      ``d = scale``, ``q = code``, ``m = fp16(-zero * scale)``:
                                                 exact but for the fp16 rounding of ``m``
``w5-g{32k}-sym``                      Q5_0      bit-identical: ``d = scale``, ``q = code`` (``d * (q - 16)``)
``w5-g{32k}`` (zero points)            Q5_1      ``d = scale``, ``q = code``, ``m = fp16(-zero * scale)``
                                                 (``d * q + m``): exact but for the fp16 rounding of ``m``
``w6/w8-g{32k}-sym``                   Q8_0      bit-identical: ``d = scale``, ``q = code - 2**(b-1)``
``w6/w8-g{32k}`` (zero points)         Q8_0      re-quantized (gguf's ``quants.quantize``) from the
                                                 dequantized weight: Q8_0 has no zero point
other groups, 32-multiple rows         Q8_0      re-quantized from the dequantized weight
``fp16``, mixed formats, float         F16       the dequantized weight rounded to fp16
norms, and rows not a multiple of 32   F32       exact
``w4-g32-sym-s6``, 256-multiple rows   Q4_K      bit-identical: ``d = super``, ``dmin = 8 * super``,
                                                 ``sc = m = scale code``, ``q = code`` (``d*sc*q - dmin*m``)
``w6-g{16j}-sym-s{4..7}``, 16j | 256,  Q6_K      bit-identical: ``d = super``, ``scale = scale code`` (its
256-multiple rows                                group's), ``q = code`` (``d * scale * (q - 32)``)
other double-quantized ``-s{S}``, or   refused   (``ExportError``: a Q4_0/Q4_1 block holds an fp16
rows not a multiple of 256                       scale, not ``code * super``; a K-quant block, one row's)
``w4-g{32k}-nl`` (IQ4_NL's table)     IQ4_NL    bit-identical: ``d = scale`` (signed), ``q = code``
                                                 (``d * level[q]``); other groups: Q8_0, re-quantized
``w{b}-g{G}-lut`` (fitted tables)      refused   (``ExportError``: no GGUF type holds a fitted table)
``w{b}-g{G}-vq{d}`` (codebooks)        refused   (``ExportError``: no GGUF type this export writes holds one)
=====================================  ========  =================================================

So a plan of 2-6-bit groups of 32/64/128 runs in llama.cpp on the package's own codes; only
asymmetric ``w6``/``w8`` and odd group sizes are re-quantized (the docstring of ``gguf_type`` says which).
IQ4_NL is Q4_0's block with the code indexing llama.cpp's 16 fixed levels instead of ``q - 8``.
2-4-bit codes would fit Q5 blocks too; Q4_0/Q4_1 hold them in less. Q5_0 and Q5_1 are Q4_0 and Q4_1
with a fifth bit per code in a 32-bit ``qh`` field. Q4_K holds ``w4-g32-sym-s6`` because its 256-weight
super-block is the format's: an fp16 ``d`` and ``dmin``, eight 6-bit scales and mins, 32 4-bit codes
per scale. It takes 4.5 bits per weight to the package's 4.25: Q4_K also stores the mins and ``dmin``,
which here only repeat the scales. Q6_K's super-block is an fp16 ``d`` over sixteen signed 8-bit
scales of 16 6-bit codes each: symmetric 6-bit groups of 16 to 256 weights with scale codes of at
most 7 bits (at most 127, and ``d * scale * (q - 32)`` exact in float32: 11 + 7 + 6 bits) are its
blocks as stored, ``w6-g16-sym-s7`` at 6.5 bits in 6.5625 (8-bit codes would overflow its int8
scales and float32's 24 bits: refused). Q5_K and the other K-quants are not written.

Q and K projections are permuted the way llama.cpp's ``convert_hf_to_gguf.py`` does
(``LlamaModel.permute``: the rotary halves interleaved), which transformers' GGUF loader undoes.
The tokenizer is written as a ``gpt2`` (byte-level BPE) vocabulary with its merges and chat
template; sentencepiece (``tokenizer.model``) vocabularies are not supported yet.

>>> import tempfile
>>> from uqcit.package import export_package
>>> from uqcit.package.examples import tiny_quantized
>>> q, tok = tiny_quantized(symmetric=True)
>>> with tempfile.TemporaryDirectory() as d:
...     result = export_gguf(export_package(q, tok, f"{d}/pkg", source_model="tiny-llama"), f"{d}/m.gguf")
>>> result.types["blk.0.attn_q.weight"], result.exact["blk.0.attn_q.weight"]
('Q4_0', True)
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from uqcit.export.hf import ExportError, as_loaded, dequantized_state, refuse_rotations, tied_output_key
from uqcit.package.format import LoadedPackage
from uqcit.runtime.modules import QuantEmbedding, QuantLinear
from uqcit.tensor.formats import FLOAT_BITS, SCALE_BITS, SUPER_BLOCK, QuantFormat, parse_format
from uqcit.tensor.packing import unpack
from uqcit.tensor.quant import QuantizedTensor, codes_of, zero_points

BLOCK = 32  # elements per Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 block, and per Q4_K sub-block
Q4_K_FORMAT = "w4-g32-sym-s6"  # the one double-quantized format Q4_K holds as stored
Q6_K_SUB = 16  # weights per Q6_K sub-block (one int8 scale each)
Q6_K_SCALE_BITS = 7  # widest scale code that Q6_K's int8 scales hold, exactly in float32 products
CENTRE = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 0}  # x = d * (q - CENTRE) (Q8_0: q a signed int8)
DEQUANTIZED = "the hf export (uqcit.export.hf.export_dequantized, float weights) carries it"
LLAMA_FAMILY = ("llama", "mistral")  # transformers model types with llama.cpp's "llama" graph


def _file_types() -> dict[str, int]:
    import gguf

    lft = gguf.LlamaFileType
    # Q4_K: MOSTLY_Q4_K_M, the file type llama.cpp's model loader infers for a file whose most common
    # type is Q4_K (llama_model_loader, when general.file_type is absent); it is only a label.
    return {"F32": lft.ALL_F32, "F16": lft.MOSTLY_F16, "Q4_0": lft.MOSTLY_Q4_0, "Q4_1": lft.MOSTLY_Q4_1,
            "Q5_0": lft.MOSTLY_Q5_0, "Q5_1": lft.MOSTLY_Q5_1, "Q8_0": lft.MOSTLY_Q8_0, "Q4_K": lft.MOSTLY_Q4_K_M,
            "Q6_K": lft.MOSTLY_Q6_K, "IQ4_NL": lft.MOSTLY_IQ4_NL}


@dataclasses.dataclass(frozen=True)
class GgufExport:
    """What ``export_gguf`` wrote: the file, each tensor's GGUF type, and whether its values are
    the package's own (``exact``: the stored codes and scales, or a float copy) or re-quantized."""

    path: Path
    types: dict[str, str]  # GGUF tensor name -> GGML type name, e.g. "Q4_0"
    exact: dict[str, bool]  # GGUF tensor name -> codes carried over (True) or re-quantized (False)
    nbytes: int  # file size


def gguf_type(fmt: QuantFormat | None, shape: tuple[int, ...]) -> tuple[str, bool]:
    """``(GGML type name, carried exactly)`` for a tensor of ``shape`` stored in ``fmt`` (None: float).

    >>> from uqcit.tensor.formats import parse_format
    >>> gguf_type(parse_format("w4-g128"), (64, 64)), gguf_type(parse_format("w8-g32"), (64, 64))
    (('Q4_1', True), ('Q8_0', False))
    >>> gguf_type(parse_format("w5-g64-sym"), (64, 64)), gguf_type(parse_format("w6-g32-sym"), (64, 64))
    (('Q5_0', True), ('Q8_0', True))
    >>> gguf_type(parse_format("w4-g32-sym-s6"), (64, 512)), gguf_type(parse_format("w6-g16-sym-s7"), (64, 512))
    (('Q4_K', True), ('Q6_K', True))

    >>> gguf_type(parse_format("w4-g32-nl"), (64, 64))
    ('IQ4_NL', True)

    Other formats with double-quantized scales (``scale_bits``), and those two on rows that are not
    a multiple of 256, have no GGUF type here: ``ExportError``; so have fitted lookup tables (``-lut``)
    and vector codebooks (``-vq{d}``).
    """
    if fmt is not None and fmt.lut and not fmt.nl:
        raise _no_lut(f"format {fmt.name} of shape {tuple(shape)}", fmt)
    if fmt is not None and fmt.vq:
        raise _no_vq(f"format {fmt.name} of shape {tuple(shape)}", fmt)
    if fmt is not None and fmt.scale_bits is not None:
        k_quant = _k_quant(fmt, shape)
        if k_quant is None:
            raise _no_type(f"format {fmt.name} of shape {tuple(shape)}", fmt)
        return k_quant, True
    if len(shape) != 2 or shape[-1] % BLOCK:
        return "F32", True
    if fmt is None or fmt.bits == FLOAT_BITS or fmt.mixed:
        return "F16", fmt is not None and fmt.bits == FLOAT_BITS
    if fmt.group_size % BLOCK:
        return "Q8_0", False
    if fmt.nl:
        return "IQ4_NL", True
    if fmt.bits <= 5:  # 4-bit blocks for 2-4-bit codes, 5-bit ones for 5; _0 centred, _1 with an offset m
        return f"Q{max(fmt.bits, 4)}_{0 if fmt.symmetric else 1}", True
    return "Q8_0", fmt.symmetric  # 6 and 8 bits: int8 blocks hold centred codes, not zero points


# Bits per weight of each GGML type the exporter writes (a block's codes plus its fp16 scale/offset).
# Q5_0/Q5_1: Q4_0/Q4_1 and a 32-bit qh per 32 weights. Q4_K: 144 bytes per 256 weights (fp16 d and
# dmin, 12 bytes of 6-bit scales and mins, 128 of codes). Q6_K: 210 bytes per 256 (128 of low nibbles,
# 64 of top 2 bits, 16 int8 scales, fp16 d).
TYPE_BITS = {"Q4_0": 4.5, "IQ4_NL": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q8_0": 8.5, "Q4_K": 4.5,
             "Q6_K": 6.5625, "F16": 16.0, "F32": 32.0}


def _k_quant(fmt: QuantFormat, shape: tuple[int, ...]) -> str | None:
    """The K-quant that holds double-quantized ``fmt`` on ``shape`` as stored, or None: Q4_K for
    ``w4-g32-sym-s6``; Q6_K for symmetric 6-bit groups that tile its 16-weight sub-blocks and its
    super-block, with scale codes of at most 7 bits. Both need 2-D rows of whole super-blocks (a
    super-scale covers 256 weights of the flattened tensor; a K-quant block, of a row)."""
    if fmt.mixed or len(shape) != 2 or shape[-1] <= 0 or shape[-1] % SUPER_BLOCK:
        return None
    if fmt.name == Q4_K_FORMAT:
        return "Q4_K"
    if (fmt.bits == 6 and fmt.symmetric and fmt.scale_bits <= Q6_K_SCALE_BITS
            and fmt.group_size % Q6_K_SUB == 0 and SUPER_BLOCK % fmt.group_size == 0):
        return "Q6_K"
    return None


def _no_type(where: str, fmt: QuantFormat) -> ExportError:
    """The refusal of a double-quantized format, one wording wherever it is met."""
    return ExportError(f"{where}: its group scales are {fmt.scale_bits}-bit codes under fp16 super-scales, "
                       f"which GGUF holds only as Q4_K, for {Q4_K_FORMAT}, and as Q6_K, for symmetric 6-bit "
                       f"groups of {Q6_K_SUB} to {SUPER_BLOCK} weights with scale codes of at most "
                       f"{Q6_K_SCALE_BITS} bits (e.g. w6-g16-sym-s7), on rows that are multiples of "
                       f"{SUPER_BLOCK}; {DEQUANTIZED}")


def _no_lut(where: str, fmt: QuantFormat) -> ExportError:
    """The refusal of a lookup-table format."""
    return ExportError(f"{where}: its codes index a table of {1 << fmt.bits} fitted levels, which no GGUF type "
                       f"this export writes holds (they decode integer codes); {DEQUANTIZED}, as does "
                       f"`uqcit export PACKAGE --to hf`")


def _no_vq(where: str, fmt: QuantFormat) -> ExportError:
    """The refusal of a vector codebook format."""
    return ExportError(f"{where}: each code stands for {fmt.vq} weights, a point of a codebook of "
                       f"{1 << (fmt.vq * fmt.bits)} fitted points, which no GGUF type this export writes holds (they "
                       f"decode one weight a code); {DEQUANTIZED}, as does `uqcit export PACKAGE --to hf`")


def gguf_formats(names) -> list[str]:
    """The format names among ``names`` that a GGUF holds bit for bit in no more than the package's
    size: the codes carried exactly (``gguf_type``) and the GGML type at most as many bits per weight
    as the package stores (``w4-g32-nl`` stores its table of levels, 256 bits a tensor, which IQ4_NL
    does not). Allow only these to the allocator for a GGUF target,
    ``AllocateConfig(formats=tuple(gguf_formats(sensitivity.formats)))``, and its bits/weight budget
    is the file's. (Other exact formats export too, but larger: ``w2-g128`` rides in Q4_1 blocks,
    ``w6-g32-sym`` in Q8_0, ``w4-g32-sym-s6`` at 4.25 bits in Q4_K at 4.5 and ``w6-g16-sym-s7`` at 6.5
    in Q6_K at 6.5625, on rows that are multiples of 256.)

    >>> gguf_formats(["w2-g128", "w4-g32-sym", "w4-g32", "w4-g32-iz", "w4-g128-sym", "w8-g32-sym", "fp16",
    ...               "w4-g32-sym-s6", "w5-g32-sym", "w5-g32", "w5-g32-iz", "w6-g32-sym", "w6-g16-sym-s7",
    ...               "w4-g32-nl", "w4-g64-nl"])
    ['w4-g32-sym', 'w4-g32', 'w8-g32-sym', 'fp16', 'w5-g32-sym', 'w5-g32', 'w4-g32-nl']
    """
    out = []
    for name in names:
        fmt = parse_format(name)
        try:  # rows of whole K-quant super-blocks: the most any type asks
            qtype, exact = gguf_type(fmt, (SUPER_BLOCK, SUPER_BLOCK))
        except ExportError:  # refused by the export
            continue
        table = (1 << fmt.bits) * SCALE_BITS if fmt.lut else 0  # the package's levels; IQ4_NL knows them
        if exact and fmt.bits_for(SUPER_BLOCK ** 2) - table == TYPE_BITS[qtype] * SUPER_BLOCK ** 2:
            out.append(name)
    return out


def blocks_of(q: QuantizedTensor, qtype: str) -> np.ndarray:
    """The llama.cpp blocks of ``q`` (a [rows, cols] tensor, ``cols % 32 == 0``) from its own codes:
    uint8 ``[rows, cols // 32 * block_bytes]`` (K-quants: ``cols // 256 * block_bytes``). ``qtype`` must
    be the type ``gguf_type`` carries ``q`` in exactly (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, Q4_K or Q6_K).

    A Q4_0/Q4_1 block is fp16 ``d`` (Q4_1: and fp16 ``m``) and 16 bytes whose low nibbles are codes
    0-15, high nibbles codes 16-31 (IQ4_NL: the same, each code an index into its levels); Q5_0/Q5_1
    put a little-endian 32-bit ``qh`` holding the fifth bit of code ``j`` at bit ``j`` between the two;
    Q8_0 is fp16 ``d`` and 32 int8 ``q``.
    """
    if gguf_type(q.fmt, q.shape) != (qtype, True):
        raise ValueError(f"a {q.fmt.name} tensor of shape {q.shape} is not carried exactly as {qtype} "
                         f"(gguf_type: {gguf_type(q.fmt, q.shape)})")
    if qtype == "Q4_K":
        return _q4_k_blocks(q)
    if qtype == "Q6_K":
        return _q6_k_blocks(q)
    fmt, (rows, cols) = q.fmt, q.shape
    codes = codes_of(q)["codes"].to(torch.int32).view(-1, BLOCK)  # [blocks, 32]
    group = torch.arange(codes.shape[0]) * BLOCK // fmt.group_size
    scale = q.tensors["scales"][group]  # fp16 [blocks]
    head = scale.numpy().view(np.uint8).reshape(-1, 2)  # d
    if qtype == "IQ4_NL":  # the same table, the same codes
        qs = codes
    elif qtype in CENTRE:  # symmetric: the code's centre 2**(b-1) moved to the type's
        qs = codes - (1 << (fmt.bits - 1)) + CENTRE[qtype]
    else:  # Q4_1/Q5_1: x = d * q + m
        qs = codes
        m = (-zero_points(q)[group] * scale.to(torch.float32)).to(torch.float16)
        head = np.concatenate([head, m.numpy().view(np.uint8).reshape(-1, 2)], axis=1)
    if qtype == "Q8_0":
        body = qs.to(torch.int8).numpy().view(np.uint8)
    else:
        nib = qs & 15
        body = (nib[:, :16] | (nib[:, 16:] << 4)).to(torch.uint8).numpy()
        if qtype in ("Q5_0", "Q5_1"):
            qh = np.packbits((qs >> 4).to(torch.uint8).numpy(), axis=1, bitorder="little")  # [blocks, 4]
            body = np.concatenate([qh, body], axis=1)
    out = np.concatenate([head, body], axis=1)
    return np.ascontiguousarray(out.reshape(rows, -1))


def _q4_k_dmin(q: QuantizedTensor) -> torch.Tensor:
    """fp16 ``dmin = 8 * super`` of each super-block of a ``w4-g32-sym-s6`` tensor (exact: a power of
    two times an fp16 value), or ``ExportError`` where it overflows fp16 (super-scales above 8188)."""
    dmin = q.tensors["super_scales"] * 8
    if not bool(torch.isfinite(dmin).all()):
        raise ExportError(f"a {q.fmt.name} tensor of shape {q.shape} has super-scales up to "
                          f"{float(q.tensors['super_scales'].float().max()):g}; Q4_K's fp16 dmin = 8 * super-scale "
                          f"overflows above 8188; {DEQUANTIZED}")
    return dmin


def _q4_k_blocks(q: QuantizedTensor) -> np.ndarray:
    """Q4_K blocks of a ``w4-g32-sym-s6`` tensor whose rows are whole super-blocks (``gguf_type``).

    A block is fp16 ``d``, fp16 ``dmin``, 12 bytes of eight 6-bit scales ``sc`` and mins ``m``, 128
    bytes of 4-bit ``q``; weight ``j`` of sub-block ``i`` reads ``d*sc[i]*q - dmin*m[i]``. Here
    ``d = super``, ``dmin = 8 * super``, ``sc = m = scale code``, ``q = code``: the package's own
    ``(code - 8) * scale code * super``, every product exact in float32 (at most 4 + 6 + 11 bits).
    The 12 bytes: bytes 0-3 hold ``sc[0:4]`` in their low 6 bits, 4-7 ``m[0:4]``; sub-blocks 4-7
    have their low 4 bits in bytes 8-11 (``sc`` low nibble, ``m`` high) and their top 2 bits in the
    top 2 bits of bytes 0-3 (``sc``) and 4-7 (``m``). The 128 bytes are four runs of 32: run ``r``
    holds sub-block ``2r`` in its low nibbles and ``2r + 1`` in its high nibbles.
    """
    rows, cols = q.shape
    n = q.numel // SUPER_BLOCK
    codes = codes_of(q)["codes"].to(torch.int32).view(n, 4, 2, BLOCK)  # [super-block, run, nibble, 32]
    sc = unpack(q.tensors["scale_codes"], q.fmt.scale_bits, n * 8).to(torch.int32).view(n, 8)
    lo, hi = sc[:, :4], sc[:, 4:]
    six = (lo & 0x3F) | ((hi >> 4) << 6)  # bytes 0-3, and (m == sc) bytes 4-7
    scales = torch.cat([six, six, (hi & 0x0F) | ((hi & 0x0F) << 4)], dim=1)
    qs = (codes[:, :, 0] | (codes[:, :, 1] << 4)).view(n, 4 * BLOCK)
    head = torch.stack([q.tensors["super_scales"], _q4_k_dmin(q)], dim=1).numpy().view(np.uint8)  # [n, 4]
    out = np.concatenate([head, torch.cat([scales, qs], dim=1).to(torch.uint8).numpy()], axis=1)
    return np.ascontiguousarray(out.reshape(rows, cols // SUPER_BLOCK * 144))


def _q6_k_blocks(q: QuantizedTensor) -> np.ndarray:
    """Q6_K blocks of a symmetric 6-bit tensor with double-quantized scales whose rows are whole
    super-blocks (``gguf_type``).

    A block is 128 bytes ``ql`` (the codes' low 4 bits), 64 bytes ``qh`` (their top 2 bits), 16 int8
    scales (one per sub-block of 16 weights) and fp16 ``d``; weight ``j`` of sub-block ``i`` reads
    ``d * scale[i] * (q - 32)``. Here ``d = super``, ``scale[i]`` = the scale code of the group holding
    sub-block ``i``, ``q = code``: the package's own ``(code - 32) * scale code * super``, every product
    exact in float32 (at most 6 + 7 + 11 bits). Each half of 128 weights has 64 ``ql`` bytes, byte ``l``
    holding weight ``l`` in its low nibble and ``l + 64`` in its high one, and 32 ``qh`` bytes, byte
    ``l`` holding the top bits of weights ``l``, ``l + 32``, ``l + 64``, ``l + 96`` at bits 0, 2, 4, 6.
    """
    rows, cols = q.shape
    n, gs = q.numel // SUPER_BLOCK, q.fmt.group_size
    codes = codes_of(q)["codes"].to(torch.int32).view(n, 2, 128)  # [super-block, half, 128]
    low, top = codes & 15, (codes >> 4).view(n, 2, 4, 32)
    ql = (low[..., :64] | (low[..., 64:] << 4)).view(n, 128)
    qh = (top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)).view(n, 64)
    sc = unpack(q.tensors["scale_codes"], q.fmt.scale_bits, q.numel // gs).to(torch.int32)
    scales = sc[torch.arange(n * SUPER_BLOCK // Q6_K_SUB) * Q6_K_SUB // gs].view(n, 16)  # codes < 128: int8
    body = torch.cat([ql, qh, scales], dim=1).to(torch.uint8).numpy()
    d = q.tensors["super_scales"].numpy().view(np.uint8).reshape(n, 2)
    return np.ascontiguousarray(np.concatenate([body, d], axis=1).reshape(rows, cols // SUPER_BLOCK * 210))


def permute_rows(rows: int, n_head: int) -> torch.Tensor:
    """Row order of llama.cpp's Q/K permutation (``convert_hf_to_gguf.LlamaModel.permute``) for a
    projection of ``rows`` outputs over ``n_head`` heads: new row i is old row ``order[i]``."""
    idx = torch.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def export_gguf(package: str | os.PathLike | LoadedPackage, out_file: str | os.PathLike, *,
                tokenizer_pre: str = "gpt-2", float_type: str = "F16") -> GgufExport:
    """Write a Llama-family ``package`` as the GGUF file ``out_file``; return what went where.

    Types per tensor follow the module docstring's table: the package's codes where a llama.cpp
    type holds them, else a re-quantization (Q8_0) or a float copy; a layer with compensation is
    written as its folded float weight (F16). ``tokenizer_pre`` is llama.cpp's name for the text
    split before BPE (``tokenizer.ggml.pre``): a transformers ``ByteLevel`` pre-tokenizer is GPT-2's
    regex ("gpt-2"); SmolLM2's original GGUF says "smollm", Llama 3's "llama-bpe". ``float_type="F32"``
    writes the matrices the table puts at F16 in float32 instead, exactly (e.g. a float reference for
    llama.cpp's own quantizer, ``benchmarks/gguf_llamacpp.py``). Raises
    ``ExportError`` for a non-Llama architecture, online rotations, or a tokenizer that is not
    byte-level BPE.
    """
    import gguf

    if float_type not in ("F16", "F32"):
        raise ValueError(f"float_type must be 'F16' or 'F32', got {float_type!r}")
    pkg = as_loaded(package)
    refuse_rotations(pkg, "GGUF file")
    model, config = pkg.model, pkg.model.config
    if config.model_type not in LLAMA_FAMILY:
        raise ExportError(f"{pkg.path}: GGUF export supports the Llama family {LLAMA_FAMILY}, not "
                          f"{config.model_type!r}; use uqcit.export.hf.export_dequantized and llama.cpp's converter")
    out_file = Path(out_file)
    n_layers, n_head = config.num_hidden_layers, config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    quantized = {name: mod.qtensor for name, mod in model.named_modules()
                 if isinstance(mod, (QuantLinear, QuantEmbedding))
                 and not (isinstance(mod, QuantLinear) and mod.compensation is not None)}
    for name, q in quantized.items():  # before anything is written
        if q.fmt.lut and not q.fmt.nl:
            raise _no_lut(f"module {name} ({q.fmt.name}) of shape {q.shape}", q.fmt)
        if q.fmt.vq:
            raise _no_vq(f"module {name} ({q.fmt.name}) of shape {q.shape}", q.fmt)
        if q.fmt.scale_bits is not None:
            k_quant = _k_quant(q.fmt, q.shape)
            if k_quant is None:
                raise _no_type(f"module {name} ({q.fmt.name}) of shape {q.shape}", q.fmt)
            if k_quant == "Q4_K":
                _q4_k_dmin(q)
    state = dequantized_state(model)
    tied = tied_output_key(model, state)

    partial = out_file.with_name(f".{out_file.name}.partial")
    writer = gguf.GGUFWriter(str(partial), "llama")
    _write_metadata(writer, pkg, config, n_head, n_kv, head_dim, tokenizer_pre)
    types: dict[str, str] = {}
    exact: dict[str, bool] = {}
    for key in sorted(state):
        if key == tied:
            continue  # llama.cpp falls back to token_embd when output.weight is absent
        gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ExportError(f"{pkg.path}: tensor {key} has no llama.cpp name; the model is not plain Llama")
        module = key.rsplit(".", 1)[0]
        q = quantized.get(module) if key.endswith(".weight") else None
        weight = state[key]
        qname, same = gguf_type(q.fmt if q is not None else None, tuple(weight.shape))
        if qname == "F16" and float_type == "F32":
            qname, same = "F32", True  # the weight the package computes with, unrounded
        if q is None and qname == "F16" and weight.dim() == 2:
            same = bool(torch.equal(weight.to(torch.float16).to(torch.float32), weight))
        order = None
        if key.endswith(("q_proj.weight", "k_proj.weight")):
            order = permute_rows(weight.shape[0], n_head if "q_proj" in key else n_kv)
        qtype = gguf.GGMLQuantizationType[qname]
        if qname not in ("F16", "F32") and same:  # the package's own blocks
            data = blocks_of(q, qname)
            if order is not None:
                data = data[order.numpy()]
            writer.add_tensor(gname, np.ascontiguousarray(data), raw_dtype=qtype)
        else:
            arr = (weight if order is None else weight[order]).numpy().astype(np.float32)
            if qname == "F32":
                writer.add_tensor(gname, arr)
            elif qname == "F16":
                writer.add_tensor(gname, arr.astype(np.float16))
            else:
                writer.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        types[gname], exact[gname] = qname, same
    matrices = [t for t in types.values() if t != "F32"]
    writer.add_file_type(_file_types()[max(set(matrices), key=matrices.count) if matrices else float_type])
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, out_file)
    finally:
        partial.unlink(missing_ok=True)
    return GgufExport(out_file, types, exact, out_file.stat().st_size)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _write_metadata(writer, pkg: LoadedPackage, config, n_head: int, n_kv: int, head_dim: int,
                    tokenizer_pre: str) -> None:
    """llama.* architecture keys and the tokenizer (byte-level BPE: tokens, types, merges, specials, chat template)."""
    import gguf

    writer.add_name(str(pkg.metadata.get("source_model", pkg.path.name)))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tok = pkg.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "BPE" or type(backend.decoder).__name__ != "ByteLevel":
        raise ExportError(f"{pkg.path}: GGUF export writes byte-level BPE vocabularies; this tokenizer "
                          f"({type(tok).__name__}) is not one. Use uqcit.export.hf.export_dequantized")
    vocab = tok.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    special = set(tok.all_special_ids)
    tokens, ttypes = [], []
    for i in range(config.vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            ttypes.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
        else:  # the model's embedding is wider than the vocabulary
            tokens.append(f"[PAD{i}]")
            ttypes.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(tokens)
    writer.add_token_types(ttypes)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        special_vocab = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=len(tokens))
        if not special_vocab.merges:  # a byte vocabulary without merges: readers then derive merges
            writer.add_token_scores([0.0] * len(tokens))  # from scores, which must be present (none follow)
        special_vocab.add_to_gguf(writer, quiet=True)
