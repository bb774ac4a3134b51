"""Keyed encoding (signed permutation): obfuscation of the weight files, not encryption.

Every stored tensor of a weight file is flattened, permuted and has a keyed half of its
entries "sign-flipped" (negated for floats, bit-inverted for integer codes: code c becomes
2^b-1-c, the reflection of a b-bit code). The package keeps its format and size and loads
as a model, but one that computes garbage until decoded with the key. It hides nothing
from anyone who has the original weights (the permutation is recovered by matching),
leaks every tensor's multiset of |values|, and each tensor's keystream is drawn from a
256-bit-seeded PCG64, not a cipher. Mixed formats' 1-bit salience masks are left as stored.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from uqcit.core.io import atomic_write_with
from uqcit.package.secure.secret import DerivedKeys

ENCODING_SCHEME = "signed-permutation-v1"
STRUCTURAL_TENSORS = ("mask",)  # left as stored by the keyed encoding (see _structural)


def _tensor_stream(keys: DerivedKeys, rel: str, name: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The permutation and flip mask of one tensor, from a 256-bit seed derived from the key."""
    seed = int.from_bytes(keys.sub(f"uqcit encode v1\0{rel}\0{name}".encode()), "big")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))
    perm = torch.from_numpy(rng.permutation(n))
    flip = torch.from_numpy(rng.integers(0, 2, size=n, dtype=np.uint8).astype(bool))
    return perm, flip


def _flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negate floats / bit-invert integers where ``mask``; an involution, exact for every dtype."""
    if x.dtype.is_floating_point:
        return torch.where(mask, -x, x)
    if x.dtype == torch.bool:
        return x ^ mask
    return torch.where(mask, torch.bitwise_not(x), x)


def _structural(name: str) -> bool:
    # A mixed format's 1-bit mask says where the salient weights are; scrambling it would make the
    # undecoded package fail to load instead of computing garbage, so it stays as stored.
    return name.rsplit(".", 1)[-1] in STRUCTURAL_TENSORS


def encode_tensors(tensors: dict[str, torch.Tensor], keys: DerivedKeys, rel: str) -> dict[str, torch.Tensor]:
    """Keyed signed permutation of every tensor but the structural masks (shapes and dtypes kept)."""
    return _keyed_permutation(tensors, keys, rel, inverse=False)


def decode_tensors(tensors: dict[str, torch.Tensor], keys: DerivedKeys, rel: str) -> dict[str, torch.Tensor]:
    """The exact inverse of ``encode_tensors`` under the same key."""
    return _keyed_permutation(tensors, keys, rel, inverse=True)


def _keyed_permutation(tensors: dict[str, torch.Tensor], keys: DerivedKeys, rel: str, *,
                       inverse: bool) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        if _structural(name):
            out[name] = t
            continue
        flat = t.reshape(-1)
        perm, flip = _tensor_stream(keys, rel, name, flat.numel())
        if inverse:
            x = torch.empty_like(flat)
            x[perm] = _flip(flat, flip)
            out[name] = x.reshape(t.shape)
        else:
            out[name] = _flip(flat[perm], flip).reshape(t.shape).contiguous()
    return out


def encode_file(path: Path, keys: DerivedKeys, rel: str) -> None:
    """Encode the safetensors file ``path`` (package-relative ``rel``) in place, atomically."""
    with safe_open(str(path), "pt") as f:
        header = dict(f.metadata() or {})
    encoded = encode_tensors(load_file(str(path)), keys, rel)
    atomic_write_with(path, lambda tmp: save_file(encoded, str(tmp),
                                                  metadata=header | {"uqcit_encoding": ENCODING_SCHEME}))
