"""The 1-bit mask of a mixed format: which weights it keeps at high precision, and where they go.

``high_mask`` picks the ``fmt.high_count(numel)`` weights of largest importance (``top_mask``:
ties go to the lower row-major index), ``select`` compacts a part in row-major order, and
``mask_rank`` locates an element inside its compacted part straight from the packed mask (so
``quant.dequantize_at`` reads single elements without unpacking the mask).

>>> import torch
>>> from uqcit.tensor.packing import pack
>>> importance = torch.tensor([0.1, 3.0, 2.0, 3.0, 0.5])
>>> mask = top_mask(importance, 2)  # the two 3.0s
>>> mask.tolist(), select(importance, ~mask).tolist()
([False, True, False, True, False], [0.10000000149011612, 2.0, 0.5])
>>> is_high, rank = mask_rank(pack(mask.view(torch.uint8), 1), torch.tensor([3, 4]))
>>> is_high.tolist(), rank.tolist()  # element 3: second high value; element 4: 4 - 2 = third low value
([True, False], [1, 2])
"""
from __future__ import annotations

import math

import torch

from uqcit.tensor.formats import QuantFormat


def high_mask(flat: torch.Tensor, shape: tuple[int, ...], fmt: QuantFormat,
              importance: torch.Tensor | None) -> torch.Tensor:
    """The ``fmt.high_count`` weights of largest importance (default ``|w|``), as a 1-D bool mask."""
    if importance is None:
        importance = flat.abs()
    else:
        if tuple(importance.shape) != shape:
            raise ValueError(f"importance has shape {tuple(importance.shape)}, w has {shape}")
        importance = importance.detach().reshape(-1).to(device=flat.device, dtype=torch.float32)
        if not torch.isfinite(importance.sum()) and bool(torch.isnan(importance).any()):
            raise ValueError("importance contains NaN")
    return top_mask(importance, fmt.high_count(flat.numel()))


def top_mask(importance: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (1-D) of the ``k`` largest entries of 1-D ``importance``; ties go to lower indices."""
    n = importance.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if k == 0 or k == n:
        return torch.full((n,), k == n, dtype=torch.bool, device=importance.device)
    threshold = _kth_smallest(importance, n - k + 1)  # the k-th largest value
    mask = importance >= threshold
    extra = int(torch.count_nonzero(mask)) - k  # entries tied at the threshold beyond the k-th
    if extra > 0:  # drop the tied entries with the highest indices
        ties = torch.nonzero(importance == threshold).squeeze(1)
        mask[ties[ties.numel() - extra :]] = False
    return mask


def _kth_smallest(x: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank``-th smallest (1-based) value of 1-D ``x``, exactly.

    ``torch.kthvalue`` over tens of millions of elements takes most of a second on a laptop,
    so a fixed random sample first brackets the answer and the exact selection then runs on
    the few elements inside the bracket. Falls back to the full selection if the bracket
    misses (which only costs time, never correctness).
    """
    n = x.numel()
    if n <= 1 << 20:
        return torch.kthvalue(x, rank).values
    m = 1 << 16
    gen = torch.Generator().manual_seed(0)
    sample = x[torch.randint(n, (m,), generator=gen).to(x.device)]
    margin = 8 * math.sqrt(m) / 2 + 16  # ~8 binomial standard deviations of a sample quantile
    p = rank / n * m
    lo_rank = max(1, int(p - margin))
    hi_rank = min(m, int(p + margin) + 1)
    lo = torch.kthvalue(sample, lo_rank).values
    hi = torch.kthvalue(sample, hi_rank).values
    below = int(torch.count_nonzero(x < lo))
    window = select(x, (x >= lo) & (x <= hi))
    if below < rank <= below + window.numel():
        return torch.kthvalue(window, rank - below).values
    return torch.kthvalue(x, rank).values


def select(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x[mask]`` for 1-D tensors. On CPU numpy's boolean indexing is used: for the dense masks
    of mixed formats (90% of a 28M-element embedding) it is ~4x faster than torch's."""
    if x.device.type == "cpu":
        return torch.from_numpy(x.numpy()[mask.numpy()])
    return x[mask]


def _popcount(x: torch.Tensor) -> torch.Tensor:
    """Set bits of each uint8 (SWAR bit tricks: a few cheap uint8 passes, no lookup gather)."""
    x = x - ((x >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return (x + (x >> 4)) & 0x0F


def mask_rank(mask: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each position in ``index`` (int64) of the packed 1-bit ``mask``: is its bit set, and how
    many set bits precede it."""
    per_byte = _popcount(mask)
    before_byte = torch.cumsum(per_byte, 0, dtype=torch.int64) - per_byte  # set bits in earlier bytes
    byte, bit = index >> 3, index & 7
    value = mask[byte]
    is_high = ((value >> bit) & 1).bool()
    below = _popcount(value & ((1 << bit) - 1).to(torch.uint8))  # set bits before it in its byte
    return is_high, before_byte[byte] + below
