"""Non-uniform grids: codes that index a per-tensor table of levels (the ``w{b}-g{G}-lut`` formats).

An integer grid spaces its ``2**b`` levels evenly between a group's extremes; weights are not
spread evenly (most sit near zero, a few far out), so even spacing spends levels where few
weights are. A lookup-table format stores the levels themselves: per group of ``G`` consecutive
weights one fp16 scale, the group's absmax, and per weight a ``b``-bit code into one table of
``2**b`` fp16 levels shared by the whole tensor,

    w_hat = scale_g * table[code]        (float32: the fp16 level times the fp16 scale)

The table is fitted to the tensor's group-normalized weights ``u = w / scale_g`` (so in about
[-1, 1]) by Lloyd-Max iterations (Lloyd 1957/1982, Max 1960: 1-D k-means, which alternates
"each value to its nearest level" and "each level to the weighted mean of its values" and
never increases the weighted squared error). Values can be weighted, as SqueezeLLM (Kim et al.
2023) weights its per-channel k-means by a sensitivity (there the Fisher information diagonal);
``gptq`` passes the input Hessian diagonal of each weight's column. Without weights it is plain
MSE. The start is deterministic: the levels at the weighted quantiles ``(i + 1/2) / 2**b``.

Rounding is to the nearest table entry (``nearest``: the midpoints between sorted levels, in
float32). Stored tensors: ``codes`` (packed ``b`` bits, ``uqcit.tensor.packing``), ``scales``
(fp16, one per group) and ``table`` (fp16, ``2**b``, ascending): ``formats.QuantFormat.bits_for``
counts all three.

>>> import torch
>>> x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
>>> grid = lut_grid(x, 3, 64)
>>> stored = encode_lut(x, 3, 64, grid)
>>> sorted(stored), stored["table"].numel(), bool(torch.all(stored["table"][1:] >= stored["table"][:-1]))
(['codes', 'scales', 'table'], 8, True)
>>> x_hat = dequantize_lut(stored, 4096, 3, 64)
>>> round(float((x_hat - x).square().mean()), 3)  # w3-g64-sym (7 even levels): 0.067, w3-g64: 0.039
0.032

The end levels are centroids of the tails, not the extremes: a group's largest weight is
rounded inward (here by up to 0.73, 18% of its group's scale), which the mean squared error
repays everywhere else.

``w4-g{G}-nl`` keeps the layout and the decoding but fixes the table to llama.cpp's IQ4_NL levels
(``IQ4_NL_LEVELS``, integers from -127 to 113, closer together near zero) and gives each group a
signed scale ``d`` searched by ``nl_scales``, so every group of 32 is an IQ4_NL block as stored
(``uqcit.export.gguf``): ``w_hat = d * level[code]``. The search is llama.cpp's idea (its
``quantize_row_iq4_nl``) written here from the format: put the group's largest weight on a level
near the negative end, round every weight to its nearest level, take the least-squares ``d`` for
those codes, and keep the best of a few such starts.

>>> grid = nl_grid(x, 32)
>>> grid.table.tolist()[:3], bool((grid.scales < 0).any() and (grid.scales > 0).any())
([-127.0, -104.0, -83.0], True)
>>> round(float((dequantize_lut(encode_lut(x, 4, 32, grid), 4096, 4, 32) - x).square().mean()), 4)
0.0057

(On these Gaussian weights w4-g32-sym gives 0.0093, w4-g32-lut 0.0068 and w4-g32, with fp16 zero
points at 5 bits/weight, 0.0067.)
"""
from __future__ import annotations

import dataclasses
import math

import torch

from uqcit.tensor.grid import FP16_TINY, TensorSpec, check_fp16_range, group_parts, per_group
from uqcit.tensor.packing import pack, packed_nbytes, unpack, unpack_at

# Cap on Lloyd-Max iterations. Each costs O(levels log n) on the sorted values (a thousand take about
# 0.1 s); measured on 256 x 1024 Gaussian and Student-t weights, 16 levels converged within 300.
LLOYD_ITERS = 1000
TABLE_NAME = "table"  # the stored tensor holding the levels


@dataclasses.dataclass(frozen=True, eq=False)
class LutGrid:
    """What a lookup-table tensor decides before it writes codes: its scales and its table."""

    scales: torch.Tensor  # fp16 [groups]: each group's absmax (at least the smallest fp16); nl: signed
    table: torch.Tensor  # fp16 [2**bits], ascending: the levels of the normalized weights


def lut_layout(count: int, bits: int, group_size: int) -> dict[str, TensorSpec]:
    """Names, dtypes and sizes of the tensors a ``count``-weight lookup-table tensor stores."""
    return {"codes": TensorSpec(torch.uint8, packed_nbytes(count, bits)),
            "scales": TensorSpec(torch.float16, math.ceil(count / group_size)),
            TABLE_NAME: TensorSpec(torch.float16, 1 << bits)}


def absmax_scales(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """fp16 absmax of each group of 1-D float32 ``x``, never below the smallest fp16 (an all-zero
    group then normalizes to zeros instead of dividing by zero)."""
    absmax = torch.cat([part.abs().amax(dim=1) for part in group_parts(x, group_size)])
    return absmax.to(torch.float16).clamp_(min=FP16_TINY)


def normalized(x: torch.Tensor, group_size: int, scales: torch.Tensor) -> torch.Tensor:
    """``x / scale_g`` group by group (float32), the values the table describes."""
    return per_group(x, group_size, lambda part, s: part / s, scales.to(torch.float32))


def lloyd_max(values: torch.Tensor, levels: int, weight: torch.Tensor | None = None, *,
              iters: int = LLOYD_ITERS) -> torch.Tensor:
    """The ``levels`` float64 levels (ascending) that Lloyd-Max fits to ``values`` in ``iters``
    iterations at most, minimizing ``sum weight * (value - nearest level)**2``.

    ``weight`` (same number of elements, non-negative; None: all 1) weights each value. Starts at
    the weighted quantiles ``(i + 1/2) / levels`` and stops early once a step changes nothing
    (``iters=0`` returns the start). A level whose values have no weight stays where it is.
    The values are sorted once; each step then finds every level's values by a binary search
    of the midpoints and their weighted sums from prefix sums, so a step costs
    ``O(levels log n)``. The fit runs on the CPU whatever the device of ``values`` (the levels
    come back on it): prefix sums on a GPU add in another order, and a table must not depend on
    where it was fitted.

    >>> lloyd_max(torch.tensor([0.0, 1.0, 2.0, 9.0, 10.0]), 2).tolist()  # starts at 1 and 9
    [1.0, 9.5]
    """
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    device = values.device
    flat = values.detach().reshape(-1).to("cpu", torch.float64)
    n = flat.numel()
    if n == 0:
        raise ValueError("cannot fit levels to no values")
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("values contain NaN or infinite values")
    v, order = torch.sort(flat, stable=True)  # stable: ties keep their order, so the sums are reproducible
    zero = torch.zeros(1, dtype=torch.float64)
    w = None
    if weight is not None:
        if weight.numel() != n:
            raise ValueError(f"weight has {weight.numel()} elements, values {n}")
        w = weight.detach().reshape(-1).to("cpu", torch.float64)
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError("weight must be finite and non-negative")
        w = w[order]
        if not float(w.sum()) > 0:  # nothing weighs anything: every value counts the same
            w = None
    del order
    # Prefix sums with a leading 0: the weight and the weighted sum of values[a:b] are differences.
    cw = torch.arange(n + 1, dtype=torch.float64) if w is None else torch.cat([zero, w.cumsum(0)])
    cwv = torch.cat([zero, (v if w is None else v * w).cumsum(0)])
    del w
    total = cw[-1]
    targets = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels * total
    # The weighted quantile: the first value whose prefix reaches the target and the last one whose
    # prefix before it does not pass it, averaged (they differ when the target falls between two
    # values), so that mirrored values start mirrored.
    first = v[torch.searchsorted(cw[1:], targets).clamp_(max=n - 1)]
    last = v[(torch.searchsorted(cw[:-1], targets, right=True) - 1).clamp_(min=0)]
    centers = (first + last) / 2
    ends = torch.tensor([n])
    for _ in range(iters):
        # Each value goes to its nearest level: the values up to a midpoint belong below it.
        cut = torch.searchsorted(v, (centers[1:] + centers[:-1]) / 2, right=True)
        edges = torch.cat([torch.zeros_like(ends), cut, ends])
        s0 = cw[edges[1:]] - cw[edges[:-1]]  # exact zero for no weight: prefix sums of w >= 0 never decrease
        s1 = cwv[edges[1:]] - cwv[edges[:-1]]
        new = torch.where(s0 > 0, s1 / torch.where(s0 > 0, s0, torch.ones_like(s0)), centers)
        # Sorting only guards against rounding at a shared edge: the set of levels, hence the error, is the same.
        new = torch.sort(new).values
        if torch.equal(new, centers):
            break
        centers = new
    return centers.to(device)


def fit_table(u: torch.Tensor, bits: int, weight: torch.Tensor | None = None, *,
              iters: int = LLOYD_ITERS) -> torch.Tensor:
    """The fp16 table (``2**bits`` levels, ascending) of normalized values ``u`` (``lloyd_max``)."""
    return lloyd_max(u, 1 << bits, weight, iters=iters).to(torch.float16)  # fp16 rounding keeps the order


def lut_grid(x: torch.Tensor, bits: int, group_size: int, weight: torch.Tensor | None = None, *,
             iters: int = LLOYD_ITERS) -> LutGrid:
    """The absmax scales of 1-D float32 ``x`` and the table fitted to ``x / scale`` (weighted by
    ``weight``, shaped like ``x``; None: plain MSE)."""
    check_fp16_range(x, "w")
    if x.numel() == 0:
        raise ValueError("cannot fit a table to an empty tensor")
    scales = absmax_scales(x, group_size)
    return LutGrid(scales, fit_table(normalized(x, group_size, scales), bits, weight, iters=iters))


# IQ4_NL's levels (llama.cpp's ``kvalues_iq4nl``): part of the GGUF format, as the bit layout is.
IQ4_NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
NL_TRIES = 7  # starts on each side of "largest weight on the end level": 15 in all, as llama.cpp tries


def nl_table() -> torch.Tensor:
    """IQ4_NL's 16 levels as an fp16 table (exact: small integers)."""
    return torch.tensor(IQ4_NL_LEVELS, dtype=torch.float16)


def nl_scales(x: torch.Tensor, group_size: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Signed fp16 scale ``d`` of each group of 1-D float32 ``x`` on IQ4_NL's table, minimizing
    ``sum weight * (x - d * level[nearest(x / d)])**2`` over ``2 * NL_TRIES + 1`` starts.

    Start ``t`` maps the group's largest-magnitude weight ``m`` to ``-127 + t`` (``x / m * (t - 127)``),
    rounds every weight to its nearest level ``q``, and takes the least-squares scale for those codes,
    ``d = sum(w q x) / sum(w q q)``, scored by the error it removes, ``sum(w q x)**2 / sum(w q q)``.
    A signed ``d`` lets the larger side of the group use the table's longer (negative) side. A group
    with no weight keeps ``m / -127``; an all-zero group gets the smallest fp16.
    """
    table = nl_table().to(torch.float32)
    outs = []
    parts = group_parts(x, group_size)
    weights = group_parts(weight, group_size) if weight is not None else [None] * len(parts)
    for part, w in zip(parts, weights):
        w = torch.ones_like(part) if w is None else w
        m = part.gather(1, part.abs().argmax(dim=1, keepdim=True)).squeeze(1)
        m = torch.where(m == 0, torch.ones_like(m), m)  # all-zero group: any scale rounds it to code 8 (level 1)
        best_d, best = m / table[0], torch.full_like(m, -math.inf)
        for t in range(-NL_TRIES, NL_TRIES + 1):
            q = table[nearest(part * ((table[0] + t) / m).unsqueeze(1), table)]
            sqx, sq2 = (w * q * part).sum(1), (w * q * q).sum(1)
            ok = sq2 > 0
            score = torch.where(ok, sqx * sqx / torch.where(ok, sq2, 1.0), -math.inf)
            better = score > best
            best_d = torch.where(better, sqx / torch.where(ok, sq2, 1.0), best_d)
            best = torch.where(better, score, best)
        outs.append(best_d)
    d = torch.cat(outs).to(torch.float16)
    return torch.where(d == 0, torch.tensor(FP16_TINY, dtype=torch.float16), d)


def nl_grid(x: torch.Tensor, group_size: int, weight: torch.Tensor | None = None) -> LutGrid:
    """IQ4_NL's table and the searched signed scales of 1-D float32 ``x`` (``nl_scales``)."""
    check_fp16_range(x, "w")
    if x.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    return LutGrid(nl_scales(x, group_size, weight), nl_table())


def nearest(u: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """int64 index of the nearest level of ascending ``table`` for every value of float32 ``u``
    (a value halfway between two levels takes the lower; beyond the ends, the end level)."""
    t = table.to(torch.float32)
    return torch.bucketize(u, (t[1:] + t[:-1]) / 2)


def encode_lut(x: torch.Tensor, bits: int, group_size: int, grid: LutGrid) -> dict[str, torch.Tensor]:
    """The stored tensors of 1-D float32 ``x`` on ``grid``: packed nearest-level codes, scales, table."""
    groups = math.ceil(x.numel() / group_size)
    if grid.scales.numel() != groups or grid.table.numel() != 1 << bits:
        raise ValueError(f"a table of {grid.table.numel()} levels over {grid.scales.numel()} groups does not fit "
                         f"{x.numel()} values at {bits} bits in groups of {group_size}")
    codes = nearest(normalized(x, group_size, grid.scales), grid.table)
    return {"codes": pack(codes.to(torch.uint8), bits), "scales": grid.scales, TABLE_NAME: grid.table}


def dequantize_lut(t: dict[str, torch.Tensor], count: int, bits: int, group_size: int) -> torch.Tensor:
    """``scale_g * table[code]`` (float32) of the ``count`` stored values."""
    codes = unpack(t["codes"], bits, count).to(torch.int64)
    out = t[TABLE_NAME].to(torch.float32)[codes]
    scale = t["scales"].to(torch.float32)
    start = 0
    for part in group_parts(out, group_size):  # views of out: scaled in place
        rows = slice(start, start + part.shape[0])
        part.mul_(scale[rows].unsqueeze(1))
        start = rows.stop
    return out


def dequantize_lut_at(t: dict[str, torch.Tensor], count: int, bits: int, group_size: int,
                      index: torch.Tensor) -> torch.Tensor:
    """``dequantize_lut(...)[index]`` without decoding the rest (the same float32 products)."""
    codes = unpack_at(t["codes"], bits, count, index).to(torch.int64)
    return t[TABLE_NAME].to(torch.float32)[codes].mul_(t["scales"].to(torch.float32)[index // group_size])
