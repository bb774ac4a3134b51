"""A package as a compressed-tensors checkpoint: transformers (and vLLM) run its integer codes.

``export_compressed_tensors`` writes the folder that ``AutoModelForCausalLM.from_pretrained``
loads through transformers' own compressed-tensors support (``pip install compressed-tensors``;
nothing of uqcit): ``config.json`` with a ``quantization_config`` (``quant_method:
compressed-tensors``, format ``pack-quantized``, one config group per package format, the float
linear layers in ``ignore``), ``model.safetensors``, the tokenizer and the generation config.

Each quantized linear layer keeps the package's own codes and scales. compressed-tensors stores a
layer as ``weight_packed`` (int32 ``[rows, ceil(cols * b / 32)]``: each row's codes as a
little-endian bit stream, the bit layout of ``uqcit.tensor.packing``, padded to whole words),
``weight_scale`` (``[rows, cols // group]``), ``weight_zero_point`` (asymmetric only: int32
``[ceil(rows * b / 32), cols // group]``, packed down the columns) and ``weight_shape``. Its codes
are signed, ``w = (q - zp) * scale`` with ``q, zp`` in ``[-2**(b-1), 2**(b-1))``, and packing adds
``2**(b-1)``, so the packed unsigned values are exactly the workbench's codes and zero points
(``uqcit.tensor.quant``: ``(code - zero) * scale``, symmetric ``(code - 2**(b-1)) * scale``).
Scales stay fp16, the values the package stores; the loader casts them to the model's dtype, so a
float32 model dequantizes ``(code - zero) * scale`` in float32 as the package does: bit for bit.

===================================  =========================================================
package format                       compressed-tensors
===================================  =========================================================
``w2/w4/w8-g{G}[-sym|-iz]``          int, ``strategy: group``, bits kept, ``group_size: G`` when
                                     ``G`` divides the rows (``cols``); else ``gcd(G, cols)``
                                     (see below)
``w3-g{G}[-sym|-iz]``                refused: releases disagree on 3-bit packing (ten codes a
                                     word before, a dense stream now); ``widen=True`` stores the
                                     same codes in 4 bits, exactly
``fp16``, float, pruned layers       float weights, the linear ones listed in ``ignore``
embeddings, the output layer         float weights (dequantized, exact): runtimes quantize
                                     neither through compressed-tensors
mixed ``+w8@``/``+w16@``             refused (no salient-weight mask in compressed-tensors)
double-quantized scales ``-s{S}``    refused (no scale codes under super-scales)
tables ``-lut``/``-nl``, ``-vq{d}``  refused (no table of levels, no codebook of vectors)
compensation, online rotations       refused
===================================  =========================================================

The workbench's groups run through the flattened weight, so a group may span rows (SmolLM2's
576-wide rows in groups of 128); compressed-tensors' groups lie within a row. Groups of
``gcd(G, cols)`` tile both: every workbench group boundary (a multiple of ``G``) is one of theirs,
so each smaller group takes its workbench group's scale and zero point and the weights stay exact;
only the scales (and zero points) are repeated, ``G / gcd(G, cols)`` times.

Every refusal is an ``ExportError`` (a ``ValueError``) naming the layer and its format and the
export that carries it: ``uqcit.export.hf.export_dequantized`` (float weights, compensation folded)
carries all of it but online rotations, and ``uqcit.export.gguf.export_gguf`` carries 2-5-bit
groups of multiples of 32 (and symmetric 6- and 8-bit ones) as llama.cpp blocks.

Who loads what (transformers 5.23, compressed-tensors 0.20.1, the pinned set; tested):

- symmetric layers, any mix of formats: ``from_pretrained(out)``, the package's logits (float32).
- asymmetric layers (zero points): written as compressed-tensors specifies (packed zero points,
  as llm-compressor writes them), but this transformers cannot load them compressed: it builds
  the zero-point parameter unpacked on the meta device and refuses the checkpoint's shape. What
  loads is ``from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))``,
  and only for a checkpoint of one format (that path applies the first config group to every
  layer); it dequantizes in the scales' fp16. compressed-tensors' own decompressor reads every
  layer exactly (``tests/export/test_compressed_tensors.py``).
- vLLM (not tested here: no GPU build on the workbench machines) runs 4- and 8-bit group layers,
  one scheme for the layers it fuses (q/k/v, gate/up) and group sizes its kernels take (32, 64,
  128); ``widen=True`` turns 2- and 3-bit plans into 4-bit storage it can run.

A model loaded in bfloat16 rounds the fp16 scales to bfloat16: exact weights need float32 or fp16.

>>> import tempfile
>>> from uqcit.package import export_package
>>> from uqcit.package.examples import tiny_quantized
>>> q, tok = tiny_quantized()
>>> with tempfile.TemporaryDirectory() as d:
...     out = export_compressed_tensors(export_package(q, tok, f"{d}/pkg", source_model="tiny-llama"), f"{d}/ct")
>>> out.formats["model.layers.0.self_attn.q_proj"], out.dense[:1]
('w4-g32', ('lm_head',))
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from pathlib import Path

import torch
from torch import nn

from uqcit.export.hf import ExportError, as_loaded, dequantized_state, refuse_rotations, write_checkpoint
from uqcit.package.format import LoadedPackage
from uqcit.package.validate import build_model
from uqcit.runtime.modules import QuantLinear
from uqcit.tensor.formats import FLOAT_BITS, QuantFormat
from uqcit.tensor.packing import pack
from uqcit.tensor.quant import QuantizedTensor, codes_of, zero_points

WORD = 32  # compressed-tensors packs codes into int32 words
PORTABLE_BITS = (2, 4, 8)  # widths whose packing all compressed-tensors releases agree on (b | 32)
WIDE_BITS = 4  # what widen=True stores 2- and 3-bit codes in (5- and 6-bit ones: 8)
CARRIERS = ("the hf export (uqcit.export.hf.export_dequantized, float weights) carries it; "
            "so does `uqcit export PACKAGE --to hf`")


@dataclasses.dataclass(frozen=True)
class CompressedTensorsExport:
    """What ``export_compressed_tensors`` wrote: the folder, the layers carried as codes (with the
    package format and the bits stored), and the modules written as float weights."""

    path: Path
    formats: dict[str, str]  # module -> its package format, e.g. "w4-g32-sym" (its codes carried)
    bits: dict[str, int]  # module -> bits per code in the checkpoint (4 for a widened 2/3-bit layer)
    group_size: dict[str, int]  # module -> the checkpoint's group size, gcd(package group size, row length)
    dense: tuple[str, ...]  # linear layers written as float weights (the config's ``ignore``)
    nbytes: int  # size of model.safetensors


def zero_point_codes(q: QuantizedTensor) -> torch.Tensor:
    """The integer zero point of each group of asymmetric ``q``: int32 ``[groups]``.

    The workbench's zero points are integers however they are stored (fp16, or packed with
    ``int_zeros``); ``uqcit.tensor.quant.zero_points`` reads either, this checks and converts.

    >>> from uqcit.tensor.formats import parse_format
    >>> from uqcit.tensor.quant import quantize
    >>> zero_point_codes(quantize(torch.tensor([[-1.0, 0.0, 1.0, 2.0]]), parse_format("w2-g4"))).tolist()
    [1]
    """
    offsets = zero_points(q)  # float32 [groups]
    out = offsets.to(torch.int32)
    if not torch.equal(out.to(offsets.dtype), offsets):
        raise ExportError(f"a {q.fmt.name} tensor holds non-integer zero points; it cannot be stored as codes")
    return out


def carried_bits(name: str, fmt: QuantFormat, widen: bool = False) -> int:
    """Bits per code a layer of ``fmt`` gets in the checkpoint; ``ExportError`` naming ``name``, its
    format and the export that carries it when compressed-tensors cannot hold it.

    >>> from uqcit.tensor.formats import parse_format
    >>> carried_bits("m", parse_format("w2-g32")), carried_bits("m", parse_format("w3-g32"), widen=True)
    (2, 4)
    """
    where = f"module {name} ({fmt.name})"
    if fmt.mixed:
        raise ExportError(f"{where}: its salient weights sit at higher precision under a mask, which "
                          f"compressed-tensors cannot express; {CARRIERS}")
    if fmt.scale_bits is not None:
        raise ExportError(f"{where}: its group scales are {fmt.scale_bits}-bit codes under fp16 super-scales, "
                          f"which compressed-tensors cannot express; {CARRIERS}")
    if fmt.lut:
        raise ExportError(f"{where}: its codes index a table of {1 << fmt.bits} levels (a non-uniform grid), "
                          f"which compressed-tensors cannot express; {CARRIERS}")
    if fmt.vq:
        raise ExportError(f"{where}: each code stands for {fmt.vq} weights, a point of a codebook of "
                          f"{1 << (fmt.vq * fmt.bits)} fitted points, which compressed-tensors cannot express; "
                          f"{CARRIERS}")
    if widen and fmt.bits < WIDE_BITS:
        return WIDE_BITS
    if widen and fmt.bits not in PORTABLE_BITS:
        return 8
    if fmt.bits in PORTABLE_BITS:
        return fmt.bits
    wide, gguf = (WIDE_BITS, "Q4_0/Q4_1") if fmt.bits < WIDE_BITS else (8, "Q5_0/Q5_1 and Q8_0")
    raise ExportError(f"{where}: compressed-tensors releases pack {fmt.bits}-bit codes differently (they do "
                      f"not divide a 32-bit word), so a {fmt.bits}-bit checkpoint would read wrong in some; pass "
                      f"widen=True (`--widen`) to store the same codes in {wide} bits, exactly, or use the gguf "
                      f"export ({gguf} hold them exactly for groups of multiples of 32); {CARRIERS}")


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``codes`` ``[rows, cols]`` as compressed-tensors' int32 words ``[rows, ceil(cols * bits / 32)]``.

    Each row is the little-endian bit stream of ``uqcit.tensor.packing.pack``, zero-padded to a
    whole number of words (little-endian int32: byte ``k`` of the stream is byte ``k % 4`` of word
    ``k // 4``).

    >>> pack_rows(torch.tensor([[1, 2, 3]]), 4).tolist()
    [[801]]
    """
    rows, cols = codes.shape
    words = math.ceil(cols * bits / WORD)
    per_word = WORD // math.gcd(WORD, bits)  # codes that fill a whole number of words
    padded = torch.zeros(rows, math.ceil(cols / per_word) * per_word, dtype=torch.uint8)
    padded[:, :cols] = codes
    stream = pack(padded.reshape(-1), bits)  # rows end on word boundaries: no row shares a word
    return _words(stream.view(rows, -1))[:, :words].contiguous()


def _words(stream: torch.Tensor) -> torch.Tensor:
    """uint8 ``[rows, 4k]`` little-endian byte streams as int32 ``[rows, k]``, on any host byte order."""
    b = stream.to(torch.int64).view(stream.shape[0], -1, 4)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)


def row_group_size(group_size: int, cols: int) -> int:
    """The largest group size that lies within rows of ``cols`` and within groups of ``group_size``.

    >>> row_group_size(128, 576), row_group_size(32, 576)
    (64, 32)
    """
    return math.gcd(group_size, cols)


def layer_tensors(q: QuantizedTensor, bits: int) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one layer (names without the module prefix), from ``q``'s
    own codes, scales and zero points, stored ``bits`` wide (``bits >= q.fmt.bits``), in groups of
    ``row_group_size(q.fmt.group_size, cols)``."""
    fmt, (rows, cols) = q.fmt, q.shape
    codes = codes_of(q)["codes"].view(rows, cols).to(torch.int32)
    g = row_group_size(fmt.group_size, cols)
    own = torch.arange(rows * cols // g) * g // fmt.group_size  # the workbench group of each of ours
    if fmt.symmetric:  # level = code - 2**(b-1); stored = level + 2**(bits-1)
        codes = codes + ((1 << (bits - 1)) - (1 << (fmt.bits - 1)))
    out = {"weight_packed": pack_rows(codes, bits),
           "weight_scale": q.tensors["scales"][own].view(rows, cols // g),
           "weight_shape": torch.tensor([rows, cols], dtype=torch.int64)}
    if not fmt.symmetric:  # zp = zero - 2**(bits-1), stored + 2**(bits-1): the zero point itself
        out["weight_zero_point"] = pack_rows(zero_point_codes(q)[own].view(rows, cols // g).T, bits).T.contiguous()
    return out


def quantization_config(groups: dict[tuple[int, int, bool], list[str]], ignore: list[str]) -> dict:
    """``config.json``'s ``quantization_config``: one group per (bits, group size, symmetric), its
    layers named exactly (no pattern can catch another layer), float linear layers in ``ignore``."""
    config_groups = {}
    for i, ((bits, group_size, symmetric), names) in enumerate(sorted(groups.items())):
        config_groups[f"group_{i}"] = {
            "targets": sorted(names), "format": "pack-quantized",
            "weights": {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group",
                        "group_size": group_size, "dynamic": False, "actorder": None},
            "input_activations": None, "output_activations": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "config_groups": config_groups,
            "ignore": sorted(ignore), "kv_cache_scheme": None, "global_compression_ratio": None}


def export_compressed_tensors(package: str | os.PathLike | LoadedPackage, out_dir: str | os.PathLike, *,
                              widen: bool = False) -> CompressedTensorsExport:
    """Write ``package`` as a compressed-tensors checkpoint at ``out_dir`` (which must not exist).

    Quantized linear layers keep their codes (the module docstring's table); embeddings, the output
    layer and float layers are written as float32 weights. ``widen=True`` stores 2- and 3-bit codes
    in 4 bits (same values; for 3-bit plans, and for vLLM, which runs 4 and 8 bits). Every layer is
    checked before anything is written; ``ExportError`` names the first that cannot be carried.
    """
    pkg = as_loaded(package)
    refuse_rotations(pkg, "compressed-tensors checkpoint")
    model = pkg.model
    plain = build_model(pkg.path, type(model), model.config, "meta")  # the architecture's own modules
    plain_modules = dict(plain.named_modules())
    output = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
    carried: dict[str, tuple[QuantizedTensor, int]] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear) or mod.qtensor.fmt.bits == FLOAT_BITS or name == output:
            continue
        if not isinstance(plain_modules.get(name), nn.Linear):
            raise ExportError(f"module {name} ({mod.qtensor.fmt.name}) is a {type(plain_modules.get(name)).__name__} "
                              f"in {type(model).__name__}, not a Linear layer compressed-tensors quantizes; {CARRIERS}")
        if mod.compensation is not None:
            raise ExportError(f"module {name} ({mod.qtensor.fmt.name}) carries compensation (low-rank or "
                              f"output scale/shift), which compressed-tensors cannot express; {CARRIERS} "
                              "with the compensation folded into its weight")
        carried[name] = (mod.qtensor, carried_bits(name, mod.qtensor.fmt, widen))

    state = dequantized_state(model)
    groups: dict[tuple[int, int, bool], list[str]] = {}
    for name, (q, bits) in carried.items():
        del state[f"{name}.weight"]
        state.update({f"{name}.{k}": v for k, v in layer_tensors(q, bits).items()})
        groups.setdefault((bits, row_group_size(q.fmt.group_size, q.shape[1]), q.fmt.symmetric), []).append(name)
    dense = sorted(n for n, m in plain_modules.items() if isinstance(m, nn.Linear) and n not in carried)
    config = copy.deepcopy(model.config)
    config.quantization_config = quantization_config(groups, dense)
    out = write_checkpoint(pkg, out_dir, state, config)
    return CompressedTensorsExport(out, {n: q.fmt.name for n, (q, _) in carried.items()},
                                   {n: bits for n, (_, bits) in carried.items()},
                                   {n: row_group_size(q.fmt.group_size, q.shape[1]) for n, (q, _) in carried.items()},
                                   tuple(dense), (out / "model.safetensors").stat().st_size)
