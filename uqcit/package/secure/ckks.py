"""CKKS demo: one linear layer evaluated on CKKS-encrypted activations (optional, needs ``tenseal``).

Real homomorphic encryption of the *input*, with plaintext weights, and its measured error
and time overhead. Nothing in the workbench computes on encrypted weights.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import time
from typing import Any

import numpy as np
import torch

from uqcit.core.results import Result


@dataclasses.dataclass(repr=False)
class CKKSResult(Result):
    """One linear layer y = x Wᵀ evaluated on CKKS-encrypted activations (TenSEAL), vs plaintext.

    The weights stay in plaintext on the evaluating side; only the activations are
    encrypted. Error is of the decrypted result against the float64 plaintext product.
    """

    rows: int
    cols: int
    tokens: int
    poly_modulus_degree: int
    scale_bits: int
    max_abs_error: float
    max_abs_output: float
    seconds: dict[str, float]  # context/keys, encrypt, evaluate, decrypt (all tokens), plaintext
    ciphertext_bytes: int  # one encrypted activation vector, serialized
    plaintext_bytes: int  # the same vector as float32

    @property
    def rel_error(self) -> float:
        return self.max_abs_error / max(self.max_abs_output, 1e-30)

    @property
    def overhead(self) -> float:
        """(encrypt + evaluate + decrypt) time over plaintext time, same inputs, same run."""
        enc = self.seconds["encrypt"] + self.seconds["evaluate"] + self.seconds["decrypt"]
        return enc / max(self.seconds["plaintext"], 1e-12)

    def summary(self) -> str:
        return (f"CKKS {self.rows}x{self.cols} layer, {self.tokens} token(s): max |error| "
                f"{self.max_abs_error:.2e} ({self.rel_error:.1e} of max |y|), "
                f"{self.overhead:,.0f}x the plaintext time, ciphertext {self.ciphertext_bytes:,} B "
                f"vs {self.plaintext_bytes:,} B")

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "cols": self.cols, "tokens": self.tokens,
                "poly_modulus_degree": self.poly_modulus_degree, "scale_bits": self.scale_bits,
                "max_abs_error": self.max_abs_error, "max_abs_output": self.max_abs_output,
                "rel_error": self.rel_error, "seconds": self.seconds, "overhead": self.overhead,
                "ciphertext_bytes": self.ciphertext_bytes, "plaintext_bytes": self.plaintext_bytes}

    def table_rows(self):
        return ("step", "seconds"), list(self.seconds.items())

    def figure(self):
        import plotly.graph_objects as go

        fig = go.Figure(go.Bar(x=list(self.seconds), y=list(self.seconds.values()), uid="ckks-seconds"))
        fig.update_layout(title="CKKS vs plaintext time (s, log scale)", yaxis_type="log", height=320)
        return fig


def ckks_available() -> bool:
    """Whether ``tenseal`` is installed (the demo's only extra dependency)."""
    return importlib.util.find_spec("tenseal") is not None


def ckks_linear(weight: torch.Tensor, x: torch.Tensor, *, poly_modulus_degree: int = 8192,
                scale_bits: int = 40, plain_repeats: int = 200) -> CKKSResult:
    """Evaluate ``x @ weight.T`` with ``x`` (tokens, cols) CKKS-encrypted; needs ``tenseal``.

    Each token's activation vector is one ciphertext; each output is an encrypted dot
    product with a plaintext weight row (multiply, then rotate-and-sum), decrypted at the
    end. ``weight`` is e.g. a dequantized slice of a quantized projection.
    """
    try:
        import tenseal as ts
    except ImportError as exc:
        raise ImportError("the CKKS demo needs tenseal: pip install 'uqcit-workbench[he]' "
                          "(or pip install tenseal)") from exc
    if weight.dim() != 2 or x.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"need weight (rows, cols) and x (tokens, cols); got {tuple(weight.shape)} "
                         f"and {tuple(x.shape)}")
    if weight.shape[1] > poly_modulus_degree // 2:
        raise ValueError(f"{weight.shape[1]} inputs exceed the {poly_modulus_degree // 2} CKKS slots; "
                         "raise poly_modulus_degree")
    w64 = weight.detach().double().numpy()
    x64 = x.detach().double().numpy()
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    mid = scale_bits
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=poly_modulus_degree,
                     coeff_mod_bit_sizes=[mid + 20, mid, mid + 20])
    ctx.global_scale = 2.0 ** scale_bits
    ctx.generate_galois_keys()
    seconds["context_keys"] = time.perf_counter() - t0

    rows = [r.tolist() for r in w64]
    t0 = time.perf_counter()
    enc = [ts.ckks_vector(ctx, xt.tolist()) for xt in x64]
    seconds["encrypt"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = [[e.dot(r) for r in rows] for e in enc]
    seconds["evaluate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    y = np.array([[v.decrypt()[0] for v in row] for row in out])
    seconds["decrypt"] = time.perf_counter() - t0

    w32, x32 = weight.detach().float(), x.detach().float()
    t0 = time.perf_counter()
    for _ in range(plain_repeats):
        y32 = x32 @ w32.T
    seconds["plaintext"] = (time.perf_counter() - t0) / plain_repeats
    del y32
    ref = x64 @ w64.T
    return CKKSResult(rows=weight.shape[0], cols=weight.shape[1], tokens=x.shape[0],
                      poly_modulus_degree=poly_modulus_degree, scale_bits=scale_bits,
                      max_abs_error=float(np.abs(y - ref).max()), max_abs_output=float(np.abs(ref).max()),
                      seconds=seconds, ciphertext_bytes=len(enc[0].serialize()),
                      plaintext_bytes=4 * weight.shape[1])
