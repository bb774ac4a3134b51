"""Bit packing: golden bytes pin the stored layout; property tests pin pack/unpack as inverses."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from uqcit.tensor.formats import _packed_bits
from uqcit.tensor.packing import PACK_BITS, pack, packed_nbytes, unpack, unpack_at


def reference_pack(codes: list[int], bits: int) -> list[int]:
    """The documented layout, one bit at a time: code i at stream bits [i*bits, (i+1)*bits)."""
    out = [0] * math.ceil(len(codes) * bits / 8)
    for i, code in enumerate(codes):
        for b in range(bits):
            if code >> b & 1:
                t = i * bits + b
                out[t // 8] |= 1 << (t % 8)
    return out


# Fixed inputs and the bytes they must pack to. If one of these changes, files written by an
# earlier version no longer load: change the format version, not the expected bytes.
GOLDEN = {
    1: ([1, 0, 1, 1, 0, 0, 0, 1, 1, 1], [0x8D, 0x03]),
    2: ([1, 2, 3, 0, 3, 1], [0x39, 0x07]),
    3: ([1, 2, 3, 4, 5, 6, 7, 0, 5], [0xD1, 0x58, 0x1F, 0x05]),
    4: ([1, 15, 7, 8, 3], [0xF1, 0x87, 0x03]),
    5: ([1, 31, 16, 7, 9], [0xE1, 0xC3, 0x93, 0x00]),  # double-quantized scale codes (5-8 bits)
    6: ([1, 63, 32, 10, 5], [0xC1, 0x0F, 0x2A, 0x05]),
    7: ([1, 127, 64, 33, 2], [0x81, 0x3F, 0x30, 0x24, 0x00]),
    8: ([0, 255, 17], [0x00, 0xFF, 0x11]),
}


@pytest.mark.parametrize("bits", sorted(GOLDEN))
def test_golden_bytes(bits):
    codes, expected = GOLDEN[bits]
    assert reference_pack(codes, bits) == expected  # the hand-written bytes follow the documented layout
    packed = pack(torch.tensor(codes), bits)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == expected
    assert unpack(packed, bits, len(codes)).tolist() == codes


def test_golden_covers_every_width():
    assert sorted(GOLDEN) == sorted(PACK_BITS)


@settings(max_examples=150, deadline=None, database=None)
@given(data=st.data(), bits=st.sampled_from(PACK_BITS))
def test_round_trip_and_layout(data, bits):
    codes = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=70))
    dtype = data.draw(st.sampled_from([torch.uint8, torch.int16, torch.int32, torch.int64]))
    t = torch.tensor(codes, dtype=dtype)
    packed = pack(t, bits)
    assert packed.numel() == packed_nbytes(len(codes), bits) == _packed_bits(len(codes), bits) // 8
    assert packed.tolist() == reference_pack(codes, bits)
    back = unpack(packed, bits, len(codes))
    assert back.dtype == torch.uint8
    assert back.tolist() == codes
    if codes:
        index = torch.tensor(data.draw(st.lists(st.integers(0, len(codes) - 1), min_size=1, max_size=20)))
        assert unpack_at(packed, bits, len(codes), index).tolist() == [codes[i] for i in index.tolist()]


@pytest.mark.parametrize("bits", PACK_BITS)
def test_large_vector_round_trip(bits):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (100_003,), generator=gen)
    packed = pack(codes, bits)
    assert torch.equal(unpack(packed, bits, codes.numel()), codes.to(torch.uint8))
    index = torch.randint(0, codes.numel(), (7, 33), generator=gen)
    assert torch.equal(unpack_at(packed, bits, codes.numel(), index), codes[index].to(torch.uint8))


def test_pack_returns_fresh_tensor():
    codes = torch.tensor([1, 2, 3], dtype=torch.uint8)
    packed = pack(codes, 8)
    packed[0] = 9
    assert codes.tolist() == [1, 2, 3]


def test_empty():
    assert pack(torch.tensor([], dtype=torch.int64), 3).numel() == 0
    assert unpack(torch.empty(0, dtype=torch.uint8), 3, 0).numel() == 0


@pytest.mark.parametrize(
    "codes, bits, message",
    [
        (torch.tensor([0, 4]), 2, r"\[0, 4\).*\[0, 4\]"),
        (torch.tensor([-1, 0]), 2, r"\[-1, 0\]"),
        (torch.tensor([0.0, 1.0]), 2, "integer dtype"),
        (torch.tensor([[0, 1]]), 2, "1-D"),
        (torch.tensor([0, 1]), 9, "bits must be one of"),
    ],
)
def test_pack_rejects(codes, bits, message):
    with pytest.raises(ValueError, match=message):
        pack(codes, bits)


def test_unpack_rejects_wrong_sizes_and_types():
    packed = pack(torch.tensor([1, 2, 3]), 3)  # 9 bits -> 2 bytes
    with pytest.raises(ValueError, match="3 codes of 3 bits pack into 2 bytes, but packed holds 3"):
        unpack(torch.cat([packed, packed[:1]]), 3, 3)
    with pytest.raises(ValueError, match="1-D uint8"):
        unpack(packed.to(torch.int32), 3, 3)
    with pytest.raises(ValueError, match="bits must be one of"):
        unpack(packed, 9, 3)
    with pytest.raises(IndexError, match="out of range"):
        unpack_at(packed, 3, 3, torch.tensor([3]))
