"""Sparse storage of a pruned weight: its kept values plus a bitmap or an index list.

A pruned ``[out, in]`` weight is stored as the kept entries in row-major order and either
one bit per weight (``bitmap``) or one flat index per kept weight (``indices``), whichever
takes fewer bytes (``sparse_storage``). ``sparse_decode`` is the exact inverse of
``sparse_encode``.

>>> w = torch.tensor([[0.5, 0.0], [0.0, -1.0]])
>>> enc = sparse_encode(w, w != 0)
>>> sorted(enc), enc["values"].tolist()
(['bitmap', 'values'], [0.5, -1.0])
>>> weight, mask = sparse_decode(enc, (2, 2))
>>> torch.equal(weight, w), mask.tolist()
(True, [[True, False], [False, True]])
"""
from __future__ import annotations

import math

import torch

from uqcit.tensor.packing import pack, packed_nbytes, unpack

VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def index_dtype(numel: int) -> torch.dtype:
    """The narrowest unsigned integer dtype holding flat indices ``0..numel-1``."""
    for dtype, bound in ((torch.uint8, 2**8), (torch.uint16, 2**16), (torch.uint32, 2**32)):
        if numel <= bound:
            return dtype
    return torch.int64


def sparse_storage(numel: int, kept: int, value_dtype: str = "float32") -> tuple[str, int]:
    """The smaller layout for ``kept`` of ``numel`` weights, and its exact stored bits.

    ``bitmap``: one bit per weight, ``ceil(numel / 8)`` bytes; ``indices``: one flat index per
    kept weight in the narrowest unsigned dtype (``index_dtype``). Plus the kept values in
    ``value_dtype`` either way.
    """
    value_bits = kept * torch.finfo(VALUE_DTYPES[value_dtype]).bits
    bitmap = packed_nbytes(numel, 1) * 8
    indices = kept * torch.iinfo(index_dtype(numel)).bits
    return ("indices", value_bits + indices) if indices < bitmap else ("bitmap", value_bits + bitmap)


def sparse_encode(weight: torch.Tensor, mask: torch.Tensor,
                  value_dtype: str = "float32") -> dict[str, torch.Tensor]:
    """The stored tensors of a pruned ``weight``: ``values`` and ``bitmap`` or ``indices``.

    Values are the kept entries in row-major order, cast to ``value_dtype``. Inverse:
    ``sparse_decode``.
    """
    flat = mask.reshape(-1).to(torch.bool)
    idx = flat.nonzero().squeeze(1)
    out = {"values": weight.detach().reshape(-1)[idx].to(VALUE_DTYPES[value_dtype]).contiguous()}
    layout, _ = sparse_storage(flat.numel(), idx.numel(), value_dtype)
    if layout == "bitmap":
        out["bitmap"] = pack(flat.to(torch.uint8), 1)
    else:
        out["indices"] = idx.to(index_dtype(flat.numel())).contiguous()
    return out


def sparse_decode(tensors: dict[str, torch.Tensor], shape: tuple[int, int],
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rebuild ``(weight, mask)`` ``[out, in]`` from ``sparse_encode``'s tensors."""
    numel = math.prod(shape)
    if "bitmap" in tensors:
        flat = unpack(tensors["bitmap"], 1, numel).to(torch.bool)
    elif "indices" in tensors:
        flat = torch.zeros(numel, dtype=torch.bool)
        flat[tensors["indices"].to(torch.int64)] = True
    else:
        raise ValueError(f"sparse tensors need 'bitmap' or 'indices', got {sorted(tensors)}")
    values = tensors["values"]
    if values.numel() != int(flat.sum()):
        raise ValueError(f"{values.numel()} stored values for {int(flat.sum())} kept positions")
    weight = torch.zeros(numel, dtype=dtype)
    weight[flat] = values.to(dtype)
    return weight.view(shape), flat.view(shape)
