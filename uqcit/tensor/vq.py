"""Vector codebooks: one code for several weights (the ``w{b}-g{G}-vq{d}`` formats).

A lookup-table format (``uqcit.tensor.lut``) gives every weight its own ``b``-bit code into a
table of levels; the codes of two neighbouring weights then always form a grid, the product of
the levels with themselves. Vector quantization spends the same bits on ``d`` consecutive weights
at once (a *vector*): one ``d * b``-bit code into one codebook of ``2**(d*b)`` points in ``d``
dimensions per tensor, so the points can sit where pairs (or fours) of weights actually fall.
GPTVQ (van Baalen et al. 2024) showed such codebooks inside GPTQ's error feedback; this module
holds the format, its fit and its encoding (``uqcit.tensor.gptq`` the error feedback).

Layout, as lut's: groups of ``G`` consecutive row-major weights, one fp16 absmax scale each; each
group is cut into vectors of ``d`` consecutive weights (``G`` is a multiple of ``d``: no vector
crosses a group; the tensor's last vector may be short). Decoding, in float32 on fp16 values:

    w_hat[vector] = scale_g * codebook[code]

Stored tensors: ``codes`` (``ceil(n / d)`` codes of ``d * b`` bits, ``uqcit.tensor.packing``),
``scales`` (fp16, one per group) and ``table`` (fp16, the codebook ``[2**(d*b), d]`` flattened
row by row: point ``k``'s coordinates at ``k*d .. k*d + d - 1``); ``formats.QuantFormat.bits_for``
counts all three.

The codebook is fitted to the normalized vectors ``u = w / scale_g`` by weighted k-means (Lloyd's
algorithm in ``d`` dimensions), each coordinate's squared error weighted by its own weight (``gptq``
passes the input Hessian diagonal of the weight's column; None: plain MSE). The start is the
Cartesian product of the 1-D table that ``lut`` fits to the same values with ``2**b`` levels (code
``k``'s coordinate ``j`` is level ``(k >> (b*j)) % 2**b``); the nearest point of a product is the
nearest level coordinate by coordinate, so the start stores lut's weights (float ties aside). Each step sends
every vector to its nearest point (as encoding does) and moves each point's coordinates to the
weighted means of its vectors' (a point no vector chose, or a coordinate without weight, stays).
The steps run on at most ``FIT_VECTORS`` vectors drawn with a fixed seed, the codebook rounded to
fp16 after each; the best codebook met is then scored on all the vectors, as they will be encoded,
and kept only if it beats the start: the fit never does worse than lut's table on its objective.

Encoding is the nearest point by Euclidean distance in the normalized space (float32, the squares
summed coordinate by coordinate, the lowest code on a tie; a short last vector by its coordinates).

>>> import torch
>>> x = torch.randn(8192, generator=torch.Generator().manual_seed(0))
>>> grid = vq_grid(x, 2, 64, 2)
>>> stored = encode_vq(x, 2, 64, 2, grid)
>>> sorted(stored), stored["codes"].numel(), stored["table"].numel()  # 4096 codes of 4 bits; 16 points
(['codes', 'scales', 'table'], 2048, 32)
>>> round(float((dequantize_vq(stored, 8192, 2, 64, 2) - x).square().mean()), 4)  # w2-g64-lut: 0.1225
0.1086
"""
from __future__ import annotations

import dataclasses
import math

import torch

from uqcit.tensor.grid import TensorSpec, check_fp16_range
from uqcit.tensor.lut import TABLE_NAME, absmax_scales, fit_table, nearest, normalized
from uqcit.tensor.packing import pack, packed_nbytes, unpack, unpack_at

# Vectors per distance block: a [CHUNK, 2**(d*b)] float32 block of distances is at most 4 MiB (256
# points), so encoding SmolLM2's largest matrices (442k vectors of 2, 884k weights) holds a few MiB of
# temporaries instead of the 450 MB of all distances at once; the work is per distance either way.
CHUNK = 4096
# k-means steps run on at most this many vectors (512 a point at 256 points), at most VQ_ITERS of them.
# Measured on SmolLM2-135M's layers.10.mlp.down_proj (error relative to lut's start, CPU seconds of the
# fit on one thread): w2-vq4 0.800 in 3.4 s, w4-vq2 0.875 in 2.5 s; all their vectors (221k, 442k) and
# 100 steps gave 0.791 in 9 s and 0.863 in 13 s; 2**15 vectors and 30 steps 0.820 and 0.926 in 0.6 s.
FIT_VECTORS = 1 << 17
VQ_ITERS = 60
SEED = 0  # the draw of the fitting sample: the same weights always give the same codebook


@dataclasses.dataclass(frozen=True, eq=False)
class VqGrid:
    """What a vector-codebook tensor decides before it writes codes: its scales and its codebook."""

    scales: torch.Tensor  # fp16 [groups]: each group's absmax (at least the smallest fp16)
    table: torch.Tensor  # fp16 [2**(d*bits), d]: the codebook of the normalized vectors


def vq_layout(count: int, bits: int, group_size: int, d: int) -> dict[str, TensorSpec]:
    """Names, dtypes and sizes of the tensors a ``count``-weight vector-codebook tensor stores."""
    return {"codes": TensorSpec(torch.uint8, packed_nbytes(math.ceil(count / d), d * bits)),
            "scales": TensorSpec(torch.float16, math.ceil(count / group_size)),
            TABLE_NAME: TensorSpec(torch.float16, d << (d * bits))}


def product_table(levels: torch.Tensor, d: int) -> torch.Tensor:
    """The ``len(levels)**d`` points whose coordinates are levels: code ``k``'s coordinate ``j`` is
    ``levels[(k >> (b*j)) % 2**b]`` for ``2**b`` levels (same dtype as ``levels``).

    >>> product_table(torch.tensor([-1.0, 1.0]), 2).tolist()
    [[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]]
    """
    n = levels.numel()
    b = n.bit_length() - 1
    if n != 1 << b:
        raise ValueError(f"a product table needs 2**b levels, got {n}")
    k = torch.arange(n ** d, device=levels.device)
    return torch.stack([levels[(k >> (b * j)) % n] for j in range(d)], dim=1)


def nearest_points(u: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """int64 index of the nearest point of ``table`` ``[K, d]`` for each row of float32 ``u`` ``[n, d]``:
    squared distances in float32 summed coordinate by coordinate, the lowest index on a tie.

    >>> nearest_points(torch.tensor([[0.4, 0.9], [0.5, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    tensor([2, 0])
    """
    t = table.to(device=u.device, dtype=torch.float32)
    cols = [t[:, j].contiguous() for j in range(t.shape[1])]
    out = torch.empty(u.shape[0], dtype=torch.int64, device=u.device)
    for a in range(0, u.shape[0], CHUNK):
        x = u[a:a + CHUNK]
        dist = (x[:, :1] - cols[0]).square_()
        for j in range(1, len(cols)):
            dist.add_((x[:, j:j + 1] - cols[j]).square_())
        out[a:a + CHUNK] = dist.min(dim=1).indices  # the first minimum: deterministic ties
    return out


def nearest_k(u: torch.Tensor, table: torch.Tensor, k: int = 1, chunk: int = 1 << 16) -> torch.Tensor:
    """int64 ``[n, k]``: the ``k`` nearest points of ``table`` ``[K, d]`` for each row of float32 ``u``
    ``[n, d]``, nearest first, by ``|c|² - 2 u·c`` (one matrix product per chunk). Its float rounding,
    and a BLAS that differs between machines, may break near-ties the other way, so the encoder and
    the k-means keep ``nearest_points``; learned rounding's candidate search uses this.

    >>> nearest_k(torch.tensor([[0.4, 0.9], [0.5, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), 2)
    tensor([[2, 0],
            [0, 1]])
    """
    t = table.to(device=u.device, dtype=torch.float32)
    k = min(k, t.shape[0])
    c2 = t.square().sum(1)
    out = torch.empty(u.shape[0], k, dtype=torch.int64, device=u.device)
    for a in range(0, u.shape[0], chunk):
        dist = torch.addmm(c2, u[a:a + chunk], t.t(), alpha=-2.0)
        out[a:a + chunk] = dist.argmin(1, keepdim=True) if k == 1 else dist.topk(k, dim=1, largest=False).indices
    return out


def encode_vectors(u: torch.Tensor, table: torch.Tensor, d: int) -> torch.Tensor:
    """int64 codes of flat normalized values ``u`` cut into vectors of ``d`` (the last may be short:
    its nearest point by the coordinates it has)."""
    full = u.numel() // d
    codes = nearest_points(u[:full * d].view(full, d), table)
    if u.numel() > full * d:
        rest = u[full * d:]
        codes = torch.cat([codes, nearest_points(rest.view(1, -1), table[:, :rest.numel()])])
    return codes


def table_index(codes: torch.Tensor, count: int, bits: int, d: int) -> torch.Tensor:
    """int64 position in the flat ``table`` of each of ``count`` weights: ``code * d + coordinate``."""
    c = unpack(codes, d * bits, math.ceil(count / d)).to(torch.int64)
    return (c.unsqueeze(1) * d + torch.arange(d, device=c.device)).reshape(-1)[:count]


def _objective(u: torch.Tensor, w: torch.Tensor | None, table: torch.Tensor, codes: torch.Tensor) -> float:
    """``sum w * (u - point)**2`` (float64) of vectors ``u`` ``[n, d]`` with weights ``w`` (None: 1)."""
    err = (u - table.to(torch.float32)[codes]).double().square_()
    return float(err.sum() if w is None else (err * w).sum())


def fit_codebook(u: torch.Tensor, bits: int, d: int, weight: torch.Tensor | None = None, *,
                 iters: int = VQ_ITERS, sample: int = FIT_VECTORS) -> torch.Tensor:
    """The fp16 codebook ``[2**(d*bits), d]`` of flat normalized values ``u`` (module docstring):
    weighted k-means from the product of lut's table, never worse than that start on the objective
    ``sum weight * (u - nearest point)**2`` over all of ``u``. Fitted on the CPU whatever the device
    (as lut's table), returned on ``u``'s device. ``iters=0`` returns the start.

    >>> u = torch.rand(4000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    >>> start = fit_codebook(u, 2, 2, iters=0)
    >>> bool(torch.equal(start, product_table(fit_table(u, 2), 2)))
    True
    """
    device = u.device
    u = u.detach().reshape(-1).to("cpu", torch.float32)
    levels = fit_table(u, bits, weight)  # checks u and weight as lut does
    w = None if weight is None else weight.detach().reshape(-1).to("cpu", torch.float64)
    if w is not None and not float(w.sum()) > 0:  # nothing weighs anything: every value counts the same
        w = None
    start = product_table(levels, d)
    full = u.numel() // d
    if iters <= 0 or full == 0:
        return start.to(device)
    vecs = u[:full * d].view(full, d)
    wv = None if w is None else w[:full * d].view(full, d)
    if full > sample:
        pick = torch.randperm(full, generator=torch.Generator().manual_seed(SEED))[:sample].sort().values
        vecs, wv = vecs[pick], None if wv is None else wv[pick]
    mass = torch.ones_like(vecs, dtype=torch.float64) if wv is None else wv
    wu = mass * vecs.double()
    points, best, best_err, prev = start, start, math.inf, None
    for step in range(iters + 1):
        codes = nearest_points(vecs, points)
        err = _objective(vecs, wv, points, codes)
        if err < best_err:
            best, best_err = points, err
        if step == iters or (prev is not None and torch.equal(codes, prev)):
            break
        prev = codes
        k = points.shape[0]
        s0 = torch.zeros(k, d, dtype=torch.float64).index_add_(0, codes, mass)
        s1 = torch.zeros(k, d, dtype=torch.float64).index_add_(0, codes, wu)
        mean = s1 / torch.where(s0 > 0, s0, torch.ones_like(s0))
        points = torch.where(s0 > 0, mean, points.double()).to(torch.float16)  # stored precision at every step
    if best is not start:  # scored on all values, as encoded; the start's error is lut's, level by level
        flat_w = None if w is None else w.view(-1, 1)
        start_err = _objective(u.view(-1, 1), flat_w, levels.view(-1, 1), nearest(u, levels))
        index = (encode_vectors(u, best, d).unsqueeze(1) * d + torch.arange(d)).reshape(-1)[:u.numel()]
        if _objective(u.view(-1, 1), flat_w, best.reshape(-1, 1), index) >= start_err:
            best = start
    return best.to(device)


def vq_grid(x: torch.Tensor, bits: int, group_size: int, d: int, weight: torch.Tensor | None = None, *,
            iters: int = VQ_ITERS) -> VqGrid:
    """The absmax scales of 1-D float32 ``x`` and the codebook fitted to ``x / scale`` (weighted by
    ``weight``, shaped like ``x``; None: plain MSE)."""
    check_fp16_range(x, "w")
    if x.numel() == 0:
        raise ValueError("cannot fit a codebook to an empty tensor")
    scales = absmax_scales(x, group_size)
    return VqGrid(scales, fit_codebook(normalized(x, group_size, scales), bits, d, weight, iters=iters))


def encode_vq(x: torch.Tensor, bits: int, group_size: int, d: int, grid: VqGrid) -> dict[str, torch.Tensor]:
    """The stored tensors of 1-D float32 ``x`` on ``grid``: packed nearest-point codes, scales, codebook."""
    if grid.scales.numel() != math.ceil(x.numel() / group_size) or tuple(grid.table.shape) != (1 << (d * bits), d):
        raise ValueError(f"a codebook of shape {tuple(grid.table.shape)} over {grid.scales.numel()} groups does not "
                         f"fit {x.numel()} values at {bits} bits in vectors of {d} and groups of {group_size}")
    codes = encode_vectors(normalized(x, group_size, grid.scales), grid.table, d)
    return {"codes": pack(codes.to(torch.uint8), d * bits), "scales": grid.scales,
            TABLE_NAME: grid.table.reshape(-1).contiguous()}


def dequantize_vq(t: dict[str, torch.Tensor], count: int, bits: int, group_size: int, d: int) -> torch.Tensor:
    """``scale_g * codebook[code]`` (float32) of the ``count`` stored values."""
    out = t[TABLE_NAME].to(torch.float32)[table_index(t["codes"], count, bits, d)]
    return out.mul_(t["scales"].to(torch.float32).repeat_interleave(group_size)[:count])


def dequantize_vq_at(t: dict[str, torch.Tensor], count: int, bits: int, group_size: int, d: int,
                     index: torch.Tensor) -> torch.Tensor:
    """``dequantize_vq(...)[index]`` without decoding the rest (the same float32 products)."""
    codes = unpack_at(t["codes"], d * bits, math.ceil(count / d), index // d).to(torch.int64)
    scale = t["scales"].to(torch.float32)[index // group_size]
    return t[TABLE_NAME].to(torch.float32)[codes * d + index % d].mul_(scale)


def round_vectors(w: torch.Tensor, scale: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``d`` rows of ``Wᵀ`` (``[d, out]``: the ``d`` columns of W that form each row's vector), each
    row's vector rounded to its nearest point times its scale (``scale``, shaped like ``w``): the
    operations of ``encode_vq`` and ``dequantize_vq``, so GPTQ's loop rounds as the stored codes decode."""
    t = table.to(torch.float32)
    codes = nearest_points((w / scale).t().contiguous(), t)
    return t[codes].t().mul(scale)


def vector_order(diag: torch.Tensor, d: int) -> torch.Tensor:
    """GPTQ's act-order for vectors of ``d`` columns: whole vectors by decreasing sum of their columns'
    ``diag`` (stable), each vector's columns kept together and in order (the column permutation).

    >>> vector_order(torch.tensor([1.0, 1.0, 5.0, 0.0, 2.0, 2.0]), 2).tolist()
    [2, 3, 4, 5, 0, 1]
    """
    order = torch.argsort(diag.reshape(-1, d).sum(1), descending=True, stable=True)
    return (order.unsqueeze(1) * d + torch.arange(d, device=diag.device)).reshape(-1)
