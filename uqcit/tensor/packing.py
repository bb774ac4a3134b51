"""Bit packing of small unsigned integer codes into bytes: the stored layout of quantized weights.

Layout (a little-endian bit stream, fixed; ``tests/tensor/test_packing.py`` pins it with golden bytes):
code ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``, its least significant bit first, and
stream bit ``t`` is bit ``t % 8`` (least significant first) of byte ``t // 8``. So for 1/2/4/8
bits one byte holds ``8 // bits`` whole codes, the first in the low bits; for 3 bits eight codes
fill three bytes and some codes straddle a byte boundary (5, 6 and 7 bits, used by
double-quantized scale codes, likewise: 8 codes in 5 bytes, 4 in 3, 8 in 7). The stream ends with the byte that
holds the last code: exactly ``ceil(count * bits / 8)`` bytes, no header (the same count that
``formats._packed_bits`` charges).

Everything is vectorized: codes are processed in chunks of ``lcm(bits, 8) / bits`` codes
(``lcm / 8`` bytes), the only Python loops run over the positions inside one chunk (at most 8).

>>> import torch
>>> pack(torch.tensor([1, 2, 3]), 2)
tensor([57], dtype=torch.uint8)
>>> unpack(pack(torch.tensor([1, 2, 3]), 2), 2, 3)
tensor([1, 2, 3], dtype=torch.uint8)
"""
from __future__ import annotations

import math

import torch

PACK_BITS = (1, 2, 3, 4, 5, 6, 7, 8)

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits occupy once packed."""
    _check_bits(bits)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return math.ceil(count * bits / 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D integer tensor of codes in ``[0, 2**bits)`` into a new uint8 tensor.

    Returns ``ceil(len(codes) * bits / 8)`` bytes on the codes' device (layout in the module doc).
    """
    _check_bits(bits)
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype not in _INT_DTYPES:
        raise ValueError(f"codes must have an integer dtype {_INT_DTYPES}, got {codes.dtype}")
    if codes.dim() != 1:
        raise ValueError(f"codes must be 1-D, got shape {tuple(codes.shape)}")
    count = codes.numel()
    nbytes = packed_nbytes(count, bits)
    if count == 0:
        return torch.empty(0, dtype=torch.uint8, device=codes.device)
    lo, hi = torch.aminmax(codes)
    if int(lo) < 0 or int(hi) >= 1 << bits:
        raise ValueError(
            f"codes must lie in [0, {1 << bits}) for {bits}-bit packing; got values in [{int(lo)}, {int(hi)}]"
        )
    if bits == 8:
        return codes.to(torch.uint8, copy=True)

    per_chunk, chunk_bytes = _chunk(bits)
    chunks = math.ceil(count / per_chunk)
    # A chunk of 1 byte is assembled in uint8 (cheap); 3-byte chunks (3 and 6 bits) need int32,
    # the 5- and 7-byte chunks of 5- and 7-bit codes int64.
    word_dtype = _word_dtype(chunk_bytes)
    padded = codes.to(word_dtype)
    if chunks * per_chunk != count:  # zero codes fill the last chunk; their bytes are cut below
        pad = torch.zeros(chunks * per_chunk - count, dtype=word_dtype, device=codes.device)
        padded = torch.cat([padded, pad])
    grid = padded.view(chunks, per_chunk)
    word = grid[:, 0].clone()
    for j in range(1, per_chunk):  # positions inside one chunk, not elements
        word |= grid[:, j] << (j * bits)
    if chunk_bytes == 1:
        out = word
    else:
        out = torch.stack([(word >> (8 * m)) & 0xFF for m in range(chunk_bytes)], dim=1)
        out = out.to(torch.uint8).view(-1)
    return out[:nbytes].clone() if out.numel() != nbytes else out


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack``: the first ``count`` codes of ``packed``, as a 1-D uint8 tensor.

    ``packed`` must hold exactly ``ceil(count * bits / 8)`` bytes, so a truncated or
    mislabeled buffer fails loudly instead of decoding garbage.
    """
    _check_packed(packed, bits, count)
    if count == 0:
        return torch.empty(0, dtype=torch.uint8, device=packed.device)
    if bits == 8:
        return packed.clone()
    per_chunk, chunk_bytes = _chunk(bits)
    chunks = math.ceil(count / per_chunk)
    full = chunks * chunk_bytes
    if full != packed.numel():
        pad = torch.zeros(full - packed.numel(), dtype=torch.uint8, device=packed.device)
        packed = torch.cat([packed, pad])
    if chunk_bytes == 1:
        word = packed
    else:
        grid = packed.view(chunks, chunk_bytes).to(_word_dtype(chunk_bytes))
        word = grid[:, 0].clone()
        for m in range(1, chunk_bytes):  # bytes inside one chunk, not elements
            word |= grid[:, m] << (8 * m)
    shifts = torch.arange(0, per_chunk * bits, bits, dtype=word.dtype, device=packed.device)
    codes = (word.unsqueeze(1) >> shifts) & ((1 << bits) - 1)  # [chunks, per_chunk]
    return codes.view(-1)[:count].to(torch.uint8)


def unpack_at(packed: torch.Tensor, bits: int, count: int, index: torch.Tensor) -> torch.Tensor:
    """Codes at positions ``index`` (any shape, int64) of a stream of ``count`` packed codes.

    Equals ``unpack(packed, bits, count)[index]`` without unpacking the whole stream: each code
    is read from the (at most two) bytes that hold it. Returns uint8 codes shaped like ``index``.
    """
    _check_packed(packed, bits, count)
    if index.numel() == 0:
        return torch.empty(index.shape, dtype=torch.uint8, device=packed.device)
    lo, hi = torch.aminmax(index)
    if int(lo) < 0 or int(hi) >= count:
        raise IndexError(f"code index out of range [0, {count}): got values in [{int(lo)}, {int(hi)}]")
    bitpos = index.to(torch.int64) * bits
    byte = bitpos >> 3
    shift = (bitpos & 7).to(torch.int32)
    word = packed[byte].to(torch.int32)
    if 8 % bits:  # 3/5/6/7-bit codes may straddle two bytes (never three); 1/2/4/8-bit codes never do
        # A code only reaches into the next byte if that byte exists (the stream ends with the
        # byte holding the last code), so clamping the second read to the last byte only ever
        # reads bits that the mask below discards.
        word |= packed[(byte + 1).clamp_(max=packed.numel() - 1)].to(torch.int32) << 8
    return ((word >> shift) & ((1 << bits) - 1)).to(torch.uint8)


def _chunk(bits: int) -> tuple[int, int]:
    """(codes per chunk, bytes per chunk): the smallest run of codes that ends on a byte boundary."""
    lcm = math.lcm(bits, 8)
    return lcm // bits, lcm // 8


def _word_dtype(chunk_bytes: int) -> torch.dtype:
    """The narrowest integer dtype that holds one chunk of ``chunk_bytes`` bytes."""
    return torch.uint8 if chunk_bytes == 1 else torch.int32 if chunk_bytes <= 3 else torch.int64


def _check_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise ValueError(f"bits must be one of {PACK_BITS}, got {bits!r}")


def _check_packed(packed: torch.Tensor, bits: int, count: int) -> None:
    expected = packed_nbytes(count, bits)
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed must be a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if packed.numel() != expected:
        raise ValueError(
            f"{count} codes of {bits} bits pack into {expected} bytes, but packed holds {packed.numel()}"
        )
