"""One integer part of a quantized tensor: its group grid, its codes, and their exact inverse.

A part is a 1-D float32 tensor cut into groups of ``group_size`` consecutive values (the last
group may be short). ``int_grid`` chooses each group's fp16 scale (and zero point),
``encode_int`` writes the packed codes on a grid, ``dequantize_int`` / ``dequantize_int_at``
read them back. The rules (asymmetric and symmetric ranges, fp16 rounding of the scale, the
one-ulp step that keeps the top code reachable, constant groups) are stated in the docstring of
``uqcit.tensor.quant``, which assembles whole formats (mixed masks, fp16 parts) from these parts.

>>> import torch
>>> x = torch.tensor([0.0, 1.0, 2.0, 3.0, -2.0, 2.0])  # 2 bits, groups of 4: scales 1 and 4/3
>>> stored = encode_int(x, 2, 4, False, int_grid(x, 2, 4, symmetric=False), "")
>>> sorted(stored), dequantize_int(stored, "", 6, 2, 4, False)[:4].tolist()
(['codes', 'scales', 'zeros'], [0.0, 1.0, 2.0, 3.0])

With ``scale_bits`` (double quantization) a part stores no fp16 ``scales``: each group's scale
is ``scale_codes[g] * super_scales[k]`` (float32; the product of a code of at most 8 bits and an
fp16 value is exact in float32, so every reader computes the same scale), where ``k`` is the
super-block of ``SUPER_BLOCK`` consecutive values that holds the group's first value. The rules
(``double_grid``): the group scales of the min/max grid in float32 (no fp16 rounding, no
constant-group rule), ``super = fp16(max scale of its super-block / (2**s - 1))`` floored at the
smallest fp16 normal, ``code = clamp(round(scale / super), 1, 2**s - 1)``; zero points and codes
are then computed against the decoded scales, so the stored codes are round-to-nearest on the
stored grid.

>>> x = torch.arange(64.0) - 20  # 4 bits, groups of 32 (absmax 20 and 43), 6-bit scale codes
>>> g = int_grid(x, 4, 32, symmetric=True, scale_bits=6)  # scales 20/7, 43/7; super 43/7/63
>>> g.scale_codes.tolist(), g.super_scales.tolist(), sorted(encode_int(x, 4, 32, True, g, "", scale_bits=6))
([29, 63], [0.0975341796875], ['codes', 'scale_codes', 'super_scales'])
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import torch

from uqcit.tensor.formats import SUPER_BLOCK
from uqcit.tensor.packing import pack, packed_nbytes, unpack, unpack_at

FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal): the floor for a scale
FP16_NORMAL = 2.0**-14  # smallest normal fp16: the floor for a super-scale (full 11-bit precision)


class TensorSpec(NamedTuple):
    """Dtype and element count of one stored 1-D tensor."""

    dtype: torch.dtype
    numel: int


def int_layout(prefix: str, count: int, bits: int, group_size: int, symmetric: bool, *,
               int_zeros: bool = False, scale_bits: int | None = None) -> dict[str, TensorSpec]:
    groups = math.ceil(count / group_size)
    layout = {prefix + "codes": TensorSpec(torch.uint8, packed_nbytes(count, bits))}
    if scale_bits is None:
        layout[prefix + "scales"] = TensorSpec(torch.float16, groups)
    else:
        layout[prefix + "scale_codes"] = TensorSpec(torch.uint8, packed_nbytes(groups, scale_bits))
        layout[prefix + "super_scales"] = TensorSpec(torch.float16, math.ceil(count / SUPER_BLOCK))
    if not symmetric:
        layout[prefix + "zeros"] = (TensorSpec(torch.uint8, packed_nbytes(groups, bits)) if int_zeros
                                    else TensorSpec(torch.float16, groups))
    return layout


@dataclasses.dataclass(frozen=True, eq=False)
class IntGrid:
    """The grid of one integer part: a scale (and zero point) per group of its values.

    Plain grids hold fp16 ``scales``; double-quantized ones (``scale_bits``) hold the float32
    decoded scales ``scale_codes * super_scales`` with the codes and super-scales they store.
    """

    scales: torch.Tensor  # fp16 [groups], or float32 [groups] decoded when double-quantized
    zeros: torch.Tensor | None  # fp16 [groups]; None for symmetric formats
    scale_codes: torch.Tensor | None = None  # uint8 [groups], in [1, 2**scale_bits - 1]; double-quantized only
    super_scales: torch.Tensor | None = None  # fp16 [ceil(count / SUPER_BLOCK)]; double-quantized only


def int_grid(x: torch.Tensor, bits: int, group_size: int, symmetric: bool,
             scale_bits: int | None = None) -> IntGrid:
    """Group-wise scales (and zeros) of 1-D float32 ``x`` (rules in the docstring of ``uqcit.tensor.quant``;
    with ``scale_bits``, in this module's docstring)."""
    if x.numel() == 0:
        empty = torch.empty(0, dtype=torch.float16, device=x.device)
        zeros = None if symmetric else empty.clone()
        if scale_bits is None:
            return IntGrid(empty, zeros)
        return IntGrid(empty.float(), zeros, torch.empty(0, dtype=torch.uint8, device=x.device), empty.clone())
    lo, hi = _group_minmax(x, group_size)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("w contains NaN or infinite values")
    if float(torch.maximum(-lo, hi).max()) > FP16_MAX:
        raise ValueError(f"integer formats store fp16 scales: |w| must be <= {FP16_MAX}")
    if scale_bits is not None:
        return double_grid(lo, hi, bits, group_size, symmetric, scale_bits, x.numel())
    if symmetric:
        return IntGrid(_symmetric_params(lo, hi, bits), None)
    return IntGrid(*_asymmetric_params(lo, hi, bits))


def double_grid(lo: torch.Tensor, hi: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                scale_bits: int, count: int, super_scales: torch.Tensor | None = None) -> IntGrid:
    """The double-quantized grid of groups with float32 minima ``lo`` and maxima ``hi`` (rules in
    the module docstring) in a part of ``count`` values; ``super_scales`` fixes the super-scales
    instead of deriving them (the clipping search keeps those of the unclipped grid)."""
    qmax = (1 << bits) - 1
    lo0, hi0 = lo.clamp(max=0.0), hi.clamp(min=0.0)
    # Float32 scales of the min/max grid. Constant groups take the same rule (not the fp16 rule's
    # scale |c|, which would be 2**(b-1) - 1 times larger and set the super-scale of its neighbours).
    raw = torch.maximum(-lo0, hi0) / ((1 << (bits - 1)) - 1) if symmetric else (hi0 - lo0) / qmax
    if super_scales is None:
        super_scales = group_super_scales(raw, count, group_size, scale_bits)
    codes, scales = quantize_scales(raw, super_scales, group_size, scale_bits)
    zeros = None if symmetric else _zero_and_top(lo0, hi0, scales, qmax)[0]
    return IntGrid(scales, zeros, codes, super_scales)


def super_index(groups: int, group_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The super-block of each group (the one that holds its first value): int64 ``[groups]``."""
    return torch.arange(groups, device=device) * group_size // SUPER_BLOCK


def group_super_scales(raw: torch.Tensor, count: int, group_size: int, scale_bits: int) -> torch.Tensor:
    """fp16 super-scales of float32 group scales ``raw``: each super-block's largest over the top
    code ``2**scale_bits - 1``, never below the smallest fp16 normal (also for a super-block that
    no group starts in, which stores the floor)."""
    top = torch.zeros(math.ceil(count / SUPER_BLOCK), dtype=torch.float32, device=raw.device)
    top.scatter_reduce_(0, super_index(raw.numel(), group_size, raw.device), raw, "amax")
    return (top / ((1 << scale_bits) - 1)).to(torch.float16).clamp_(min=FP16_NORMAL)


def quantize_scales(raw: torch.Tensor, super_scales: torch.Tensor, group_size: int,
                    scale_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes ``clamp(round(raw / super), 1, 2**scale_bits - 1)`` of float32 group scales
    ``raw`` under fp16 ``super_scales``, and the float32 scales they decode to."""
    sup = super_scales.to(torch.float32)[super_index(raw.numel(), group_size, raw.device)]
    codes = torch.round(raw / sup).clamp_(1, (1 << scale_bits) - 1)
    return codes.to(torch.uint8), codes.mul_(sup)  # exact: <= 8 bits times 11 bits fits float32


def group_scales(t: dict[str, torch.Tensor], prefix: str, count: int, group_size: int,
                 scale_bits: int | None = None) -> torch.Tensor:
    """Float32 scale of every group of a stored part of ``count`` values (fp16 ``scales``, or the
    decoded ``scale_codes * super_scales``). Every decoder reads scales through this."""
    if scale_bits is None:
        return t[prefix + "scales"].to(torch.float32)
    groups = math.ceil(count / group_size)
    codes = unpack(t[prefix + "scale_codes"], scale_bits, groups).to(torch.float32)
    sup = t[prefix + "super_scales"].to(torch.float32)
    return codes.mul_(sup[super_index(groups, group_size, codes.device)])


def searched_grid(x: torch.Tensor, bits: int, group_size: int, symmetric: bool, *,
                  weight: torch.Tensor | None = None, steps: int = 20, min_ratio: float = 0.5,
                  scale_bits: int | None = None) -> IntGrid:
    """The grid of ``int_grid`` with each group's range shrunk by the factor in
    ``linspace(1, min_ratio, steps)`` that minimizes its squared rounding error (clipping search).

    ``weight`` (same shape as ``x``, non-negative) weights each value's squared error, e.g. the
    input Hessian diagonal of its column; ``None`` is plain MSE. Clipping trades a few large
    errors at the group's extremes for a finer step everywhere else; the factor 1 (no clipping)
    is always among the candidates, so the result is never worse than ``int_grid`` on ``x``.
    With ``scale_bits`` the super-scales of the unclipped grid stay fixed (clipping only shrinks
    scales, so none exceeds its super-block's top code) and each group searches its scale code.

    >>> import torch
    >>> x = torch.cat([torch.randn(63), torch.tensor([8.0])])  # one outlier stretches the grid
    >>> err = lambda g: float((dequantize_int(encode_int(x, 3, 64, False, g, ""), "", 64, 3, 64, False) - x).square().sum())
    >>> err(searched_grid(x, 3, 64, False)) <= err(int_grid(x, 3, 64, False))
    True
    """
    base = int_grid(x, bits, group_size, symmetric, scale_bits)
    if x.numel() == 0 or steps < 2:
        return base
    w = torch.ones_like(x) if weight is None else weight.reshape(-1).to(x)
    lo, hi = _group_minmax(x, group_size)
    best = base
    best_err = _grid_error(x, w, bits, group_size, symmetric, base, scale_bits)
    const = lo == hi  # constant groups keep their exact grid
    for ratio in torch.linspace(1.0, min_ratio, steps)[1:].tolist():
        if scale_bits is not None:
            cand = double_grid(lo * ratio, hi * ratio, bits, group_size, symmetric, scale_bits, x.numel(),
                               base.super_scales)
        elif symmetric:
            cand = IntGrid(_symmetric_params(lo * ratio, hi * ratio, bits), None)
        else:
            cand = IntGrid(*_asymmetric_params(lo * ratio, hi * ratio, bits))
        cand = _where(const, base, cand)
        err = _grid_error(x, w, bits, group_size, symmetric, cand, scale_bits)
        better = err < best_err
        if bool(better.any()):
            best_err = torch.where(better, err, best_err)
            best = _where(better, cand, best)
    return best


def _where(cond: torch.Tensor, a: IntGrid, b: IntGrid) -> IntGrid:
    """Per group: ``a``'s scale, zero and scale code where ``cond``, else ``b``'s (super-scales: ``a``'s,
    which the search never changes)."""
    pick = lambda u, v: None if u is None else torch.where(cond, u, v)  # noqa: E731
    return IntGrid(pick(a.scales, b.scales), pick(a.zeros, b.zeros), pick(a.scale_codes, b.scale_codes),
                   a.super_scales)


def _grid_error(x: torch.Tensor, w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                grid: IntGrid, scale_bits: int | None) -> torch.Tensor:
    """Per-group weighted squared error of ``x`` encoded on ``grid`` (float32 [groups])."""
    stored = encode_int(x, bits, group_size, symmetric, grid, "", scale_bits=scale_bits)
    err = (dequantize_int(stored, "", x.numel(), bits, group_size, symmetric, scale_bits=scale_bits) - x)
    err = err.square_().mul_(w)
    return torch.cat([part.sum(dim=1) for part in group_parts(err, group_size)])


def encode_int(x: torch.Tensor, bits: int, group_size: int, symmetric: bool, grid: IntGrid,
                prefix: str, *, int_zeros: bool = False, scale_bits: int | None = None) -> dict[str, torch.Tensor]:
    """Packed codes of 1-D float32 ``x`` on ``grid``, with the grid's scales and zeros
    (``int_zeros``: the zero points packed ``bits`` wide; they are integers in ``[0, 2**bits - 1]``;
    ``scale_bits``: the grid's scale codes packed that wide, and its super-scales)."""
    groups = math.ceil(x.numel() / group_size)
    if grid.scales.numel() != groups or (grid.zeros is None) != symmetric or (
            grid.zeros is not None and grid.zeros.numel() != groups):
        raise ValueError(f"a grid of {grid.scales.numel()} groups does not fit {x.numel()} values "
                         f"in groups of {group_size} ({'symmetric' if symmetric else 'asymmetric'})")
    if (grid.scale_codes is None) != (scale_bits is None):
        raise ValueError(f"a grid {'without' if grid.scale_codes is None else 'with'} scale codes does not fit "
                         f"scale_bits={scale_bits}")
    if x.numel() == 0:
        layout = int_layout(prefix, 0, bits, group_size, symmetric, int_zeros=int_zeros, scale_bits=scale_bits)
        return {k: torch.empty(0, dtype=spec.dtype, device=x.device) for k, spec in layout.items()}
    scale, zero = grid.scales, grid.zeros
    if symmetric:
        # + 2**(b-1) turns the signed level into the unsigned code; clamping the code to
        # [1, qmax] clamps the level to +-(2**(b-1) - 1), symmetric, so code 0 is never used.
        offset = torch.full_like(scale, float(1 << (bits - 1)), dtype=torch.float32)
    else:
        offset = zero.to(torch.float32)
    s32 = scale.to(torch.float32)
    qmax = (1 << bits) - 1
    qmin = 1 if symmetric else 0

    def encode(part: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        q = torch.round(part / s)  # same op, same operands as the top-code checks of the params
        return q.add_(z).clamp_(qmin, qmax).to(torch.uint8)

    codes = per_group(x, group_size, encode, s32, offset)
    out = {prefix + "codes": pack(codes, bits)}
    if scale_bits is None:
        out[prefix + "scales"] = scale
    else:
        out[prefix + "scale_codes"] = pack(grid.scale_codes, scale_bits)
        out[prefix + "super_scales"] = grid.super_scales
    if zero is not None:
        out[prefix + "zeros"] = pack(zero.to(torch.uint8), bits) if int_zeros else zero
    return out


def _asymmetric_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scale and zero per group from its float32 min/max (rules in the docstring of ``uqcit.tensor.quant``)."""
    qmax = (1 << bits) - 1
    lo0 = lo.clamp(max=0.0)
    hi0 = hi.clamp(min=0.0)
    scale = _fp16_scale((hi0 - lo0) / qmax)
    zero, top = _zero_and_top(lo0, hi0, scale, qmax)
    short = _short(scale, top, qmax)
    if bool(short.any()):
        scale = torch.where(short, _one_ulp_down(scale), scale)
        zero, _ = _zero_and_top(lo0, hi0, scale, qmax)
    const = lo == hi
    if bool(const.any()):
        # c > 0: scale |c|, zero 0, code 1.  c < 0: scale |c|, zero 1, code 0.  c == 0: scale 1, code 0.
        c = lo
        scale = torch.where(const, _const_scale(c), scale)
        zero = torch.where(const, (c < 0).to(torch.float16), zero)
    return scale, zero


def _zero_and_top(lo0: torch.Tensor, hi0: torch.Tensor, scale: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    s32 = scale.to(torch.float32)
    zero = torch.round(-lo0 / s32).clamp_(0, qmax)
    top = torch.round(hi0 / s32) + zero  # the code the largest value gets, computed as in encode
    return zero.to(torch.float16), top


def _symmetric_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    qpos = (1 << (bits - 1)) - 1
    absmax = torch.maximum(-lo, hi)
    scale = _fp16_scale(absmax / qpos)
    top = torch.round(absmax / scale.to(torch.float32))  # |level| of the absmax value, as in encode
    short = _short(scale, top, qpos)
    if bool(short.any()):
        scale = torch.where(short, _one_ulp_down(scale), scale)
    const = lo == hi
    if bool(const.any()):
        scale = torch.where(const, _const_scale(lo), scale)
    return scale


def _short(scale: torch.Tensor, top: torch.Tensor, qtop: int) -> torch.Tensor:
    """Groups whose largest value fell short of the top code because fp16 rounded the scale up.

    A scale rounded to the nearest fp16 can exceed the exact one: by up to 2**-12 relative for
    normal fp16, far more for subnormal scales (below 2**-14, where fp16 has fewer digits). Then
    the group's extreme lands below the top code, and re-quantizing the dequantized group
    would find a smaller range and a different scale. One fp16 ulp down puts the scale below
    the exact one, so the extreme reaches the top code (or just past it, and is clamped).
    """
    return (top < qtop) & (scale > FP16_TINY)


def _one_ulp_down(scale: torch.Tensor) -> torch.Tensor:
    """The next smaller fp16 of positive fp16 ``scale`` (positive floats order like their bits)."""
    return (scale.view(torch.int16) - 1).view(torch.float16)


def _const_scale(c: torch.Tensor) -> torch.Tensor:
    """Scale that stores a constant group ``c`` exactly as code +-1 (1 for c == 0)."""
    mag = _fp16_scale(c.abs())
    return torch.where(c == 0, torch.ones_like(mag), mag)


def _fp16_scale(s: torch.Tensor) -> torch.Tensor:
    """Round float32 scales to fp16, never to zero (a zero scale would divide by zero)."""
    return s.to(torch.float16).clamp_(min=FP16_TINY)


def check_fp16_range(x: torch.Tensor, name: str) -> None:
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x)
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        raise ValueError(f"{name} contains NaN or infinite values")
    if max(-float(lo), float(hi)) > FP16_MAX:
        raise ValueError(f"{name} has values beyond the fp16 range (|x| <= {FP16_MAX})")


def _group_minmax(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max of 1-D ``x`` (last group may be short)."""
    lows, highs = [], []
    for part in group_parts(x, group_size):
        lo, hi = torch.aminmax(part, dim=1)
        lows.append(lo)
        highs.append(hi)
    return torch.cat(lows), torch.cat(highs)


def group_parts(x: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    """2-D views of 1-D ``x``: the full groups [G, group_size], then the short last group [1, r]."""
    full = x.numel() // group_size
    parts = []
    if full:
        parts.append(x[: full * group_size].view(full, group_size))
    if x.numel() > full * group_size:
        parts.append(x[full * group_size :].view(1, -1))
    return parts


def per_group(x: torch.Tensor, group_size: int, fn: Callable[..., torch.Tensor], *params: torch.Tensor) -> torch.Tensor:
    """Apply ``fn(part2d, *params_per_row)`` group-wise and return the flat result.

    ``params`` hold one value per group; each is passed as a column that broadcasts over its
    group. Full groups are handled as one 2-D view, the short last group separately, so no
    padded copy of ``x`` is ever made.
    """
    outs = []
    start = 0
    for part in group_parts(x, group_size):
        rows = part.shape[0]
        outs.append(fn(part, *(p[start : start + rows].unsqueeze(1) for p in params)).reshape(-1))
        start += rows
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def dequantize_int(t: dict[str, torch.Tensor], prefix: str, count: int, bits: int, group_size: int, symmetric: bool,
                   *, int_zeros: bool = False, scale_bits: int | None = None) -> torch.Tensor:
    codes = unpack(t[prefix + "codes"], bits, count).to(torch.float32)
    scale = group_scales(t, prefix, count, group_size, scale_bits)
    offset = group_offsets(t, prefix, scale.numel(), bits, symmetric, int_zeros)
    # In place on the fresh float copy of the codes: (code - offset) * scale, group by group.
    start = 0
    for part in group_parts(codes, group_size):
        rows = slice(start, start + part.shape[0])
        part.sub_(offset[rows].unsqueeze(1)).mul_(scale[rows].unsqueeze(1))
        start = rows.stop
    return codes


def group_offsets(t: dict[str, torch.Tensor], prefix: str, groups: int, bits: int, symmetric: bool,
                  int_zeros: bool = False) -> torch.Tensor:
    """Per-group float32 code offset of a stored part of ``groups`` groups: its zero points (fp16 or
    packed integers), or ``2**(bits-1)`` for symmetric groups. ``w_hat = (code - offset) * scale``."""
    device = t[prefix + "codes"].device
    if symmetric:
        return torch.full((groups,), float(1 << (bits - 1)), dtype=torch.float32, device=device)
    if int_zeros:
        return unpack(t[prefix + "zeros"], bits, groups).to(torch.float32)
    return t[prefix + "zeros"].to(torch.float32)


def dequantize_int_at(t: dict[str, torch.Tensor], prefix: str, count: int, bits: int, group_size: int,
                       symmetric: bool, index: torch.Tensor, *, int_zeros: bool = False,
                       scale_bits: int | None = None) -> torch.Tensor:
    codes = unpack_at(t[prefix + "codes"], bits, count, index).to(torch.float32)
    group = index // group_size
    groups = math.ceil(count / group_size)
    if scale_bits is None:
        scale = t[prefix + "scales"].to(torch.float32)[group]
    else:  # decode only the looked-up groups' scales: the product of group_scales, element-wise
        scale = unpack_at(t[prefix + "scale_codes"], scale_bits, groups, group).to(torch.float32)
        # super_index's rule for the looked-up groups only: super_index(groups) is O(groups) per lookup
        scale.mul_(t[prefix + "super_scales"].to(torch.float32)[group * group_size // SUPER_BLOCK])
    offset = group_offsets(t, prefix, groups, bits, symmetric, int_zeros)
    return codes.sub_(offset[group]).mul_(scale)  # the ops of dequantize_int, element-wise
