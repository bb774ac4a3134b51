"""Storage formats for one weight tensor, and what each costs in bits.

A ``QuantFormat`` says how a tensor is stored: group-wise integer codes at 2/3/4/5/6/8
bits with fp16 scales (and zero points when asymmetric: fp16 by default, or packed
``bits``-wide integers with ``int_zeros``, the convention of GPTQ/AutoRound checkpoints,
which costs ``bits`` instead of 16 bits per group), or fp16 pass-through; optionally a top fraction of weights (by importance) kept at a
higher precision, located by a 1-bit mask. With ``lut`` (``w{b}-g{G}-lut``) the codes index a
per-tensor table of ``2**b`` fp16 levels instead of an integer grid: ``w = scale_g * table[code]``, one
fp16 absmax scale per group (``uqcit.tensor.lut``; the table's bits are counted). ``nl``
(``w4-g{G}-nl``) fixes that table to llama.cpp's IQ4_NL levels and signs and searches the scales, so
the codes run in llama.cpp as IQ4_NL blocks. With ``vq`` (``w{b}-g{G}-vq{d}``) each run of ``d``
consecutive weights is one vector: one ``d * b``-bit code into a per-tensor codebook of ``2**(d*b)``
fp16 points in ``d`` dimensions, times the group's fp16 absmax scale (``uqcit.tensor.vq``; the codebook's
bits are counted). With ``scale_bits``
the group scales themselves are quantized (double quantization, as llama.cpp's K-quants): each is an
unsigned ``scale_bits``-wide integer code times one fp16 super-scale per ``SUPER_BLOCK`` consecutive
weights. ``bits_for`` is the exact storage cost that ``quant.quantize`` produces: the same arithmetic,
so planned and stored bits agree.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from uqcit.core.keys import check_keys

INT_BITS = (2, 3, 4, 5, 6, 8)  # integer code widths (packing.py packs any width from 1 to 8)
FLOAT_BITS = 16
HIGH_BITS = (8, 16)
SCALE_BITS = 16  # scales and zero points are stored as fp16
LUT_BITS = (2, 3, 4)  # code widths of lookup-table formats (a table of 2**bits fp16 levels per tensor)
SCALE_CODE_BITS = (4, 5, 6, 7, 8)  # widths of double-quantized scale codes
SUPER_BLOCK = 256  # weights sharing one fp16 super-scale (llama.cpp's K-quant super-block)
VQ_DIMS = (2, 4)  # weights per vector of a vector codebook format
VQ_CODE_BITS = 8  # most bits of one vector's code (d * bits): a codebook of at most 256 points


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """How one tensor is stored.

    >>> QuantFormat(bits=4, group_size=128).name
    'w4-g128'
    >>> QuantFormat(bits=2, group_size=128, high_bits=16, high_fraction=0.1).name
    'w2-g128+w16@0.1'
    >>> QuantFormat(bits=3, group_size=64, int_zeros=True).bits_per_weight(576 * 576)
    3.296875
    >>> QuantFormat(bits=4, group_size=32, symmetric=True, scale_bits=6).bits_per_weight(576 * 576)
    4.25
    >>> QuantFormat(bits=5, group_size=32, symmetric=True).bits_per_weight(576 * 576)  # 5-bit codes, 8 in 5 bytes
    5.5
    >>> QuantFormat(bits=4, group_size=32, symmetric=True, lut=True).bits_for(64 * 64)  # codes, scales, table
    18688
    >>> fmt = QuantFormat(bits=2, group_size=64, vq=4)  # 8-bit codes of 4 weights, a codebook of 256 points
    >>> fmt.name, fmt.symmetric, fmt.bits_for(576 * 1536) - 16 * 4 * 256, fmt.bits_per_weight(576 * 1536)
    ('w2-g64-vq4', True, 1990656, 2.2685185185185186)
    """

    bits: int = 4  # 2, 3, 4, 5, 6, 8 (integer codes, INT_BITS) or 16 (fp16 pass-through)
    group_size: int = 128  # weights sharing one scale, consecutive in row-major order
    symmetric: bool = False  # symmetric stores no zero point; asymmetric fits skewed groups better
    high_bits: int | None = None  # salient weights' precision: 8 (int8 groups) or 16 (fp16)
    high_fraction: float = 0.0  # fraction of weights, by importance, stored at high_bits
    int_zeros: bool = False  # asymmetric: zero points packed as integers of the part's bits, not fp16
    scale_bits: int | None = None  # group scales as codes of this many bits under fp16 super-scales; None: fp16
    lut: bool = False  # codes index a per-tensor table of 2**bits fp16 levels (symmetric absmax scales only)
    nl: bool = False  # lut with IQ4_NL's fixed 16 levels and searched signed scales (llama.cpp's IQ4_NL)
    vq: int | None = None  # weights per vector (VQ_DIMS) coded jointly into a per-tensor codebook; None: scalar codes

    def __post_init__(self) -> None:
        if self.bits not in INT_BITS + (FLOAT_BITS,):
            raise ValueError(f"bits must be one of {INT_BITS + (FLOAT_BITS,)}, got {self.bits}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.vq is not None:
            self._check_vq()
        if self.high_bits is not None:
            if self.high_bits not in HIGH_BITS:
                raise ValueError(f"high_bits must be one of {HIGH_BITS} or None, got {self.high_bits}")
            if not 0.0 < self.high_fraction < 1.0:
                raise ValueError(
                    f"high_fraction must be in (0, 1) when high_bits is set, got {self.high_fraction}"
                )
            if self.bits == FLOAT_BITS:
                raise ValueError("a mixed format needs integer low bits, not fp16")
        elif self.high_fraction:
            raise ValueError("high_fraction is set but high_bits is None")
        if self.int_zeros and (self.symmetric or self.bits == FLOAT_BITS):
            raise ValueError("int_zeros needs an asymmetric integer format (symmetric ones store no zero point)")
        if self.scale_bits is not None:
            if self.scale_bits not in SCALE_CODE_BITS:
                raise ValueError(f"scale_bits must be one of {SCALE_CODE_BITS} or None (fp16 scales), "
                                 f"got {self.scale_bits}")
            if self.bits == FLOAT_BITS:
                raise ValueError("scale_bits needs an integer format (fp16 pass-through stores no scales)")
        if self.lut:
            if self.bits not in LUT_BITS:
                raise ValueError(f"lookup-table formats take bits in {LUT_BITS}, got {self.bits}")
            if not self.symmetric or self.mixed or self.scale_bits is not None:
                raise ValueError("a lookup-table format is symmetric (absmax scales, no zero point), with fp16 "
                                 "scales and no high-precision part: QuantFormat(bits, group_size, symmetric=True, "
                                 "lut=True)")
        if self.nl and not (self.lut and self.bits == 4):
            raise ValueError("nl is IQ4_NL's table of 16 levels: a 4-bit lookup-table format, "
                             "QuantFormat(bits=4, group_size, symmetric=True, lut=True, nl=True)")

    def _check_vq(self) -> None:
        """A vector codebook format has absmax fp16 scales and nothing else: each refusal in one line."""
        d, b = self.vq, self.bits
        if isinstance(d, bool) or d not in VQ_DIMS:
            raise ValueError(f"vq is the number of weights per vector, one of {VQ_DIMS} (or None), got {d!r}")
        if b == FLOAT_BITS or b * d > VQ_CODE_BITS:
            raise ValueError(f"a vq{d} code holds {d} weights of {b} bits in at most {VQ_CODE_BITS} bits: vq2 takes "
                             f"bits 2, 3 or 4 and vq4 bits 2, got w{b}-g{self.group_size}-vq{d}")
        for flag, why in ((self.mixed, "high-precision part (high_bits)"), (self.int_zeros, "zero points (int_zeros)"),
                          (self.scale_bits is not None, "double-quantized scales (scale_bits)"),
                          (self.nl, "IQ4_NL table (nl)"), (self.lut, "scalar lookup table (lut)")):
            if flag:
                raise ValueError(f"a vector codebook format (vq={d}) has no {why}: it stores fp16 absmax scales "
                                 f"and its own codebook, QuantFormat(bits, group_size, vq={d})")
        if self.group_size % d:
            raise ValueError(f"group_size must be a multiple of vq={d} so that groups hold whole vectors, "
                             f"got {self.group_size}")
        # Absmax scales, no zero point: symmetric whatever was passed, so each format has one spelling.
        object.__setattr__(self, "symmetric", True)

    @property
    def mixed(self) -> bool:
        return self.high_bits is not None

    @property
    def name(self) -> str:
        if self.bits == FLOAT_BITS:
            return "fp16"
        if self.lut:
            return f"w{self.bits}-g{self.group_size}-{'nl' if self.nl else 'lut'}"
        if self.vq is not None:
            return f"w{self.bits}-g{self.group_size}-vq{self.vq}"
        base = f"w{self.bits}-g{self.group_size}" + ("-sym" if self.symmetric else "")
        base += "-iz" if self.int_zeros else ""
        base += f"-s{self.scale_bits}" if self.scale_bits is not None else ""
        if self.mixed:
            base += f"+w{self.high_bits}@{self.high_fraction:g}"
        return base

    def high_count(self, numel: int) -> int:
        """How many weights of a ``numel`` tensor go to high precision (rounded to nearest)."""
        if not self.mixed:
            return 0
        return int(round(self.high_fraction * numel))

    def bits_for(self, numel: int) -> int:
        """Exact number of bits stored for a tensor of ``numel`` weights in this format."""
        if self.bits == FLOAT_BITS:
            return FLOAT_BITS * numel
        if self.vq is not None:  # one code per vector (the last may be short), fp16 scales, the codebook
            codebook = self.vq * (1 << (self.vq * self.bits)) * SCALE_BITS
            return (_packed_bits(math.ceil(numel / self.vq), self.vq * self.bits)
                    + math.ceil(numel / self.group_size) * SCALE_BITS + codebook)
        n_high = self.high_count(numel)
        n_low = numel - n_high
        total = _int_part_bits(n_low, self.bits, self.group_size, self.symmetric, self.int_zeros, self.scale_bits)
        if self.lut:
            total += (1 << self.bits) * SCALE_BITS  # the table: 2**bits fp16 levels
        if self.mixed:
            total += _packed_bits(numel, 1)  # the mask
            if self.high_bits == FLOAT_BITS:
                total += FLOAT_BITS * n_high
            else:
                total += _int_part_bits(n_high, self.high_bits, self.group_size, self.symmetric, self.int_zeros,
                                        self.scale_bits)
        return total

    def bits_per_weight(self, numel: int) -> float:
        return self.bits_for(numel) / numel

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        # Absent unless used: formats written before these fields existed stay byte-identical.
        if not self.int_zeros:
            del out["int_zeros"]
        if self.scale_bits is None:
            del out["scale_bits"]
        if not self.lut:
            del out["lut"]
        if not self.nl:
            del out["nl"]
        if self.vq is None:
            del out["vq"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantFormat":
        check_keys(data, {f.name for f in dataclasses.fields(cls)}, "QuantFormat", required=())
        return cls(**data)


def _packed_bits(count: int, bits: int) -> int:
    """Bits of ``count`` codes packed ``bits`` wide into whole bytes (as ``packing.pack`` stores them)."""
    return 8 * math.ceil(count * bits / 8)


def _int_part_bits(count: int, bits: int, group_size: int, symmetric: bool, int_zeros: bool = False,
                   scale_bits: int | None = None) -> int:
    if count == 0:
        return 0
    groups = math.ceil(count / group_size)
    total = _packed_bits(count, bits)
    if scale_bits is None:
        total += groups * SCALE_BITS
    else:  # packed scale codes, and one fp16 super-scale per super-block (the last may be partial)
        total += _packed_bits(groups, scale_bits) + math.ceil(count / SUPER_BLOCK) * SCALE_BITS
    # Codes of the padded last group are not stored: packing covers exactly `count` codes.
    if not symmetric:
        total += _packed_bits(groups, bits) if int_zeros else groups * SCALE_BITS
    return total


_LUT_RE = re.compile(r"^w(?P<bits>\d+)-g(?P<group>\d+)-(?P<kind>lut|nl)$")
_VQ_RE = re.compile(r"^w(?P<bits>\d+)-g(?P<group>\d+)-vq(?P<dim>\d+)$")
_NAME_RE = re.compile(
    r"^w(?P<bits>\d+)-g(?P<group>\d+)(?P<sym>-sym)?(?P<iz>-iz)?(?:-s(?P<sb>\d+))?(?:\+w(?P<high>\d+)@(?P<frac>[0-9.eE-]+))?$"
)


def parse_format(name: str) -> QuantFormat:
    """Read a format back from its ``name``, e.g. ``"w4-g128"``, ``"w3-g64-iz"``, ``"w4-g32-sym-s6"``,
    ``"w2-g64-sym+w16@0.1"``, ``"w4-g32-lut"``, ``"w4-g32-nl"``, ``"w2-g64-vq4"``, ``"fp16"``.

    >>> parse_format("w3-g64-iz-s6").scale_bits
    6
    >>> parse_format("w3-g64-lut").lut, parse_format("w4-g32-nl").nl, parse_format("w3-g64-vq2").vq
    (True, True, 2)
    """
    if name == "fp16":
        return QuantFormat(bits=FLOAT_BITS)
    m = _LUT_RE.match(name.strip())
    if m:
        return QuantFormat(bits=int(m.group("bits")), group_size=int(m.group("group")), symmetric=True, lut=True,
                           nl=m.group("kind") == "nl")
    m = _VQ_RE.match(name.strip())
    if m:
        return QuantFormat(bits=int(m.group("bits")), group_size=int(m.group("group")), vq=int(m.group("dim")))
    m = _NAME_RE.match(name.strip())
    if not m:
        raise ValueError(
            f"cannot read format {name!r}; expected e.g. 'w4-g128', 'w3-g64-sym', "
            "'w4-g32-sym-s6', 'w2-g128+w16@0.1', 'w4-g32-lut', 'w2-g64-vq4' or 'fp16'"
        )
    high = m.group("high")
    return QuantFormat(
        bits=int(m.group("bits")),
        group_size=int(m.group("group")),
        symmetric=bool(m.group("sym")),
        int_zeros=bool(m.group("iz")),
        scale_bits=int(m.group("sb")) if m.group("sb") else None,
        high_bits=int(high) if high else None,
        high_fraction=float(m.group("frac")) if high else 0.0,
    )
