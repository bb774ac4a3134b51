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
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import torch

from uqcit.tensor.packing import pack, packed_nbytes, unpack, unpack_at

FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal): the floor for a scale


class TensorSpec(NamedTuple):
    """Dtype and element count of one stored 1-D tensor."""

    dtype: torch.dtype
    numel: int


def int_layout(prefix: str, count: int, bits: int, group_size: int, symmetric: bool, *,
               int_zeros: bool = False) -> dict[str, TensorSpec]:
    groups = math.ceil(count / group_size)
    layout = {
        prefix + "codes": TensorSpec(torch.uint8, packed_nbytes(count, bits)),
        prefix + "scales": TensorSpec(torch.float16, groups),
    }
    if not symmetric:
        layout[prefix + "zeros"] = (TensorSpec(torch.uint8, packed_nbytes(groups, bits)) if int_zeros
                                    else TensorSpec(torch.float16, groups))
    return layout


@dataclasses.dataclass(frozen=True, eq=False)
class IntGrid:
    """The grid of one integer part: an fp16 scale (and zero point) per group of its values."""

    scales: torch.Tensor  # fp16 [groups]
    zeros: torch.Tensor | None  # fp16 [groups]; None for symmetric formats


def int_grid(x: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> IntGrid:
    """Group-wise fp16 scales (and zeros) of 1-D float32 ``x`` (rules in the docstring of ``uqcit.tensor.quant``)."""
    if x.numel() == 0:
        empty = torch.empty(0, dtype=torch.float16, device=x.device)
        return IntGrid(empty, None if symmetric else empty.clone())
    lo, hi = _group_minmax(x, group_size)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("w contains NaN or infinite values")
    if float(torch.maximum(-lo, hi).max()) > FP16_MAX:
        raise ValueError(f"integer formats store fp16 scales: |w| must be <= {FP16_MAX}")
    if symmetric:
        return IntGrid(_symmetric_params(lo, hi, bits), None)
    return IntGrid(*_asymmetric_params(lo, hi, bits))


def searched_grid(x: torch.Tensor, bits: int, group_size: int, symmetric: bool, *,
                  weight: torch.Tensor | None = None, steps: int = 20, min_ratio: float = 0.5) -> IntGrid:
    """The grid of ``int_grid`` with each group's range shrunk by the factor in
    ``linspace(1, min_ratio, steps)`` that minimizes its squared rounding error (clipping search).

    ``weight`` (same shape as ``x``, non-negative) weights each value's squared error, e.g. the
    input Hessian diagonal of its column; ``None`` is plain MSE. Clipping trades a few large
    errors at the group's extremes for a finer step everywhere else; the factor 1 (no clipping)
    is always among the candidates, so the result is never worse than ``int_grid`` on ``x``.

    >>> import torch
    >>> x = torch.cat([torch.randn(63), torch.tensor([8.0])])  # one outlier stretches the grid
    >>> err = lambda g: float((dequantize_int(encode_int(x, 3, 64, False, g, ""), "", 64, 3, 64, False) - x).square().sum())
    >>> err(searched_grid(x, 3, 64, False)) <= err(int_grid(x, 3, 64, False))
    True
    """
    base = int_grid(x, bits, group_size, symmetric)
    if x.numel() == 0 or steps < 2:
        return base
    w = torch.ones_like(x) if weight is None else weight.reshape(-1).to(x)
    lo, hi = _group_minmax(x, group_size)
    best = base
    best_err = _grid_error(x, w, bits, group_size, symmetric, base)
    const = lo == hi  # constant groups keep their exact grid
    for ratio in torch.linspace(1.0, min_ratio, steps)[1:].tolist():
        if symmetric:
            cand = IntGrid(torch.where(const, base.scales, _symmetric_params(lo * ratio, hi * ratio, bits)), None)
        else:
            sc, ze = _asymmetric_params(lo * ratio, hi * ratio, bits)
            cand = IntGrid(torch.where(const, base.scales, sc), torch.where(const, base.zeros, ze))
        err = _grid_error(x, w, bits, group_size, symmetric, cand)
        better = err < best_err
        if bool(better.any()):
            best_err = torch.where(better, err, best_err)
            best = IntGrid(torch.where(better, cand.scales, best.scales),
                           None if symmetric else torch.where(better, cand.zeros, best.zeros))
    return best


def _grid_error(x: torch.Tensor, w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                grid: IntGrid) -> torch.Tensor:
    """Per-group weighted squared error of ``x`` encoded on ``grid`` (float32 [groups])."""
    stored = encode_int(x, bits, group_size, symmetric, grid, "")
    err = (dequantize_int(stored, "", x.numel(), bits, group_size, symmetric) - x).square_().mul_(w)
    return torch.cat([part.sum(dim=1) for part in group_parts(err, group_size)])


def encode_int(x: torch.Tensor, bits: int, group_size: int, symmetric: bool, grid: IntGrid,
                prefix: str, *, int_zeros: bool = False) -> dict[str, torch.Tensor]:
    """Packed codes of 1-D float32 ``x`` on ``grid``, with the grid's scales and zeros
    (``int_zeros``: the zero points packed ``bits`` wide; they are integers in ``[0, 2**bits - 1]``)."""
    groups = math.ceil(x.numel() / group_size)
    if grid.scales.numel() != groups or (grid.zeros is None) != symmetric or (
            grid.zeros is not None and grid.zeros.numel() != groups):
        raise ValueError(f"a grid of {grid.scales.numel()} groups does not fit {x.numel()} values "
                         f"in groups of {group_size} ({'symmetric' if symmetric else 'asymmetric'})")
    if x.numel() == 0:
        layout = int_layout(prefix, 0, bits, group_size, symmetric, int_zeros=int_zeros)
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
    out = {prefix + "codes": pack(codes, bits), prefix + "scales": scale}
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
                   *, int_zeros: bool = False) -> torch.Tensor:
    codes = unpack(t[prefix + "codes"], bits, count).to(torch.float32)
    scale = t[prefix + "scales"].to(torch.float32)
    offset = group_offsets(t, prefix, bits, symmetric, int_zeros)
    # In place on the fresh float copy of the codes: (code - offset) * scale, group by group.
    start = 0
    for part in group_parts(codes, group_size):
        rows = slice(start, start + part.shape[0])
        part.sub_(offset[rows].unsqueeze(1)).mul_(scale[rows].unsqueeze(1))
        start = rows.stop
    return codes


def group_offsets(t: dict[str, torch.Tensor], prefix: str, bits: int, symmetric: bool,
                  int_zeros: bool = False) -> torch.Tensor:
    """Per-group float32 code offset of a stored part: its zero points (fp16 or packed integers),
    or ``2**(bits-1)`` for symmetric groups. ``w_hat = (code - offset) * scale``."""
    scales = t[prefix + "scales"]
    if symmetric:
        return torch.full(scales.shape, float(1 << (bits - 1)), dtype=torch.float32, device=scales.device)
    if int_zeros:
        return unpack(t[prefix + "zeros"], bits, scales.numel()).to(torch.float32)
    return t[prefix + "zeros"].to(torch.float32)


def dequantize_int_at(t: dict[str, torch.Tensor], prefix: str, count: int, bits: int, group_size: int,
                       symmetric: bool, index: torch.Tensor, *, int_zeros: bool = False) -> torch.Tensor:
    codes = unpack_at(t[prefix + "codes"], bits, count, index).to(torch.float32)
    group = index // group_size
    scale = t[prefix + "scales"].to(torch.float32)
    offset = group_offsets(t, prefix, bits, symmetric, int_zeros)
    return codes.sub_(offset[group]).mul_(scale[group])  # the ops of dequantize_int, element-wise
