"""Complex structures (seed 002 §2.2.3, "G = i" in real form) and the matrices they are built from.

A complex structure is a real orthogonal G with Gᵀ = −G, hence G⁻¹ = Gᵀ = −G, G + G⁻¹ = 0
and G² = −I. Every such G is ``P J Pᵀ`` for an orthogonal P, J being the 90° rotation in the
planes (0,1), (2,3), ...: ``complex_structure(P)`` builds G, ``symplectic_basis(G)`` recovers a P.

Constructions:

- ``hadamard_matrix(n)``: ±1 Hadamard matrices from Kronecker products of Sylvester (2^k),
  Paley I (q+1, q prime ≡ 3 mod 4) and Paley II (2(q+1), q prime ≡ 1 mod 4) matrices, e.g.
  576 = 72·8, 1536 = 384·4; ``randomized_hadamard(n, seed)`` = H·D/√n (entries ±1/√n).
- ``random_orthogonal(n, seed)``: QR of a seeded Gaussian with the sign fix (Haar measure).
- ``Rotation.hadamard(n, seed)``: the *randomized skew-Hadamard structure*
  G = D·(C_m ⊗ H_b)·D / √((m−1)·b), with C_m a Paley skew conference matrix (zero diagonal,
  ±1 elsewhere, Cᵀ = −C, C Cᵀ = (m−1) I), H_b a symmetric Hadamard matrix and D a seeded ±1
  diagonal. G is skew because C is and H, D are symmetric; its entries are 0 on a 1/m fraction
  and ±1/√((m−1)b) elsewhere — as flat as a Hadamard matrix, which is what spreads an outlier
  channel over all channels. Applying it costs O(n·(m+b)) per vector; storing it, n sign bits.
  (G = P J Pᵀ with P a randomized Hadamard matrix is a complex structure too, but *not* flat:
  the trailing Pᵀ undoes most of P's spreading and its rows carry Rademacher sums; on SmolLM2's
  layer-0 q_proj its 3-bit SQNR was 12.66 dB against 13.66 dB for the skew structure.)
- ``Rotation.random(n, seed)``: G = P J Pᵀ with P random orthogonal; stored as a dense matrix.

Unsupported orders (odd n always) raise ``UnsupportedOrderError``, whose message lists the
nearest supported orders. ``uqcit.tensor.invariants`` measures the invariants.

>>> g = Rotation.hadamard(576, seed=0).matrix()
>>> bool(torch.allclose(g @ g, -torch.eye(576, dtype=g.dtype), atol=1e-12))
True
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterable, Literal, Mapping

import torch

from uqcit.tensor.packing import pack, unpack

# =============================================================================================
# number theory for the constructions


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    r = int(math.isqrt(q))
    return all(q % d for d in range(3, r + 1, 2))


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _legendre(a: int, q: int) -> int:
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


class UnsupportedOrderError(ValueError):
    """No construction of the requested kind exists (here) for this matrix order."""


# =============================================================================================
# small ±1 building blocks (float64, exact integers)


@functools.lru_cache(maxsize=64)
def _sylvester(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of order n = 2^k: symmetric, ±1, H Hᵀ = n I."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=64)
def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i) over GF(q), q prime (χ the Legendre symbol)."""
    chi = torch.tensor([_legendre(a, q) for a in range(q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


@functools.lru_cache(maxsize=64)
def paley_conference(m: int) -> torch.Tensor:
    """Skew conference matrix of order m = q+1, q prime ≡ 3 (mod 4) (m = 2: the 90° rotation).

    Zero diagonal, ±1 elsewhere, Cᵀ = −C and C Cᵀ = (m−1) I. ``I + C`` is a (Paley I) Hadamard
    matrix.

    >>> c = paley_conference(12)
    >>> bool((c + c.T == 0).all()), bool((c @ c.T == 11 * torch.eye(12, dtype=c.dtype)).all())
    (True, True)
    """
    if m == 2:
        return torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    q = m - 1
    if not (_is_prime(q) and q % 4 == 3):
        raise UnsupportedOrderError(f"no Paley skew conference matrix of order {m}: {q} is not a prime ≡ 3 mod 4")
    c = torch.zeros(m, m, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = -1.0
    c[1:, 1:] = _jacobsthal(q)
    return c


@functools.lru_cache(maxsize=64)
def _paley2(n: int) -> torch.Tensor:
    """Symmetric Paley II Hadamard matrix of order n = 2(q+1), q prime ≡ 1 (mod 4)."""
    q = n // 2 - 1
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = _jacobsthal(q)  # symmetric for q ≡ 1 mod 4
    eye = torch.eye(q + 1, dtype=torch.float64)
    return torch.cat([torch.cat([c + eye, c - eye], 1), torch.cat([c - eye, -c - eye], 1)], 0)


def _paley1_order(m: int) -> bool:
    return m > 2 and _is_prime(m - 1) and (m - 1) % 4 == 3


def _paley2_order(m: int) -> bool:
    return m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1


@functools.lru_cache(maxsize=1024)
def _hadamard_factors(n: int) -> tuple[tuple[str, int], ...] | None:
    """A factorization of n into orders with a known Hadamard matrix, largest non-2^k core first.

    Factors: ("sylvester", 2^k), ("paley1", q+1), ("paley2", 2(q+1)). None if none is found.
    """
    if n < 1:
        return None
    if _is_pow2(n):
        return (("sylvester", n),)
    for m in sorted((d for d in range(4, n + 1) if n % d == 0), reverse=True):
        kind = "paley1" if _paley1_order(m) else "paley2" if _paley2_order(m) else None
        if kind is None:
            continue
        rest = _hadamard_factors(n // m)
        if rest is not None:
            return ((kind, m),) + rest
    return None


def _factor_matrix(kind: str, m: int) -> torch.Tensor:
    if kind == "sylvester":
        return _sylvester(m)
    if kind == "paley1":
        return paley_conference(m) + torch.eye(m, dtype=torch.float64)
    return _paley2(m)


def _kron_all(mats: Iterable[torch.Tensor]) -> torch.Tensor:
    out = torch.ones(1, 1, dtype=torch.float64)
    for m in mats:
        out = torch.kron(out, m)
    return out


def supported_orders(kind: Literal["hadamard", "structure"], lo: int, hi: int) -> list[int]:
    """The orders in [lo, hi] for which ``hadamard_matrix`` / ``structure_layout`` succeed."""
    test = (lambda n: _hadamard_factors(n) is not None) if kind == "hadamard" else \
        (lambda n: _structure_layout_or_none(n) is not None)
    return [n for n in range(max(lo, 1), hi + 1) if test(n)]


def _unsupported(kind: str, n: int) -> UnsupportedOrderError:
    near = supported_orders("hadamard" if kind == "Hadamard matrix" else "structure",
                            max(2, n - 64), n + 64)
    below = [m for m in near if m < n][-4:]
    above = [m for m in near if m > n][:4]
    why = "an odd order has no complex structure (G² = −I needs even n)" if n % 2 and kind != "Hadamard matrix" \
        else "it is not 2^k times a product of Paley orders (q+1 for primes q ≡ 3 mod 4, 2(q+1) for q ≡ 1 mod 4)"
    return UnsupportedOrderError(
        f"no {kind} of order {n} is built here: {why}. Nearest supported orders: "
        f"{below} below, {above} above. Use RotationConfig(construction='random') or "
        f"unsupported='random' for a dense random orthogonal structure instead.")


def hadamard_matrix(n: int) -> torch.Tensor:
    """A ±1 Hadamard matrix of order n (H Hᵀ = n I), float64, from Kronecker products of
    Sylvester (2^k), Paley I (q+1) and Paley II (2(q+1)) matrices.

    >>> h = hadamard_matrix(576)  # 72 (Paley I, q = 71) ⊗ 8 (Sylvester)
    >>> bool((h @ h.T == 576 * torch.eye(576, dtype=h.dtype)).all())
    True
    """
    factors = _hadamard_factors(n)
    if factors is None:
        raise _unsupported("Hadamard matrix", n)
    return _kron_all(_factor_matrix(k, m) for k, m in factors)


def randomized_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """P = H · D / √n: an orthogonal matrix with entries ±1/√n, D a seeded random ±1 diagonal."""
    signs = _random_signs(n, seed)
    return hadamard_matrix(n) * signs[None, :] / math.sqrt(n)


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """A Haar-random orthogonal matrix (float64): QR of a seeded Gaussian, R's diagonal made positive."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None, :]


def _random_signs(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1


# =============================================================================================
# complex structures


def j_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """J: the 90° rotation [[0, −1], [1, 0]] in each plane (2i, 2i+1); n must be even."""
    if n % 2 or n < 2:
        raise UnsupportedOrderError(f"J needs an even order ≥ 2 (planes of 2), got {n}: an odd-dimensional "
                                    "space has no complex structure")
    j = torch.zeros(n, n, dtype=dtype)
    i = torch.arange(0, n, 2)
    j[i + 1, i] = 1.0
    j[i, i + 1] = -1.0
    return j


def complex_structure(p: torch.Tensor) -> torch.Tensor:
    """G = P J Pᵀ for an orthogonal P (n even): orthogonal, Gᵀ = −G, G² = −I."""
    if p.dim() != 2 or p.shape[0] != p.shape[1]:
        raise ValueError(f"P must be square, got shape {tuple(p.shape)}")
    return p @ j_matrix(p.shape[0], p.dtype) @ p.T


def symplectic_basis(g: torch.Tensor) -> torch.Tensor:
    """An orthogonal P with P J Pᵀ = G, for a complex structure G (columns p₁, Gp₁, p₂, Gp₂, ...).

    The +i eigenspace of G is the range of the projector (I − iG)/2; an orthonormal basis uₖ of
    it (complex QR of the projector applied to a fixed Gaussian block) has the form
    uₖ = (pₖ − i G pₖ)/√2 with pₖ real, orthonormal and G-isotropic (pⱼᵀ G pₖ = 0), so the
    pairs (pₖ, G pₖ) form an orthonormal basis in which G acts as J. O(n³), float64.
    """
    n = g.shape[0]
    j_matrix(n)  # raises the odd-order error
    g = g.to(torch.float64)
    x = torch.randn(n, n // 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.complex(x, -(g @ x)) / 2)
    p = math.sqrt(2.0) * u.real  # [n, n/2]
    out = torch.empty(n, n, dtype=torch.float64)
    out[:, 0::2] = p
    out[:, 1::2] = g @ p
    if float((out.T @ out - torch.eye(n, dtype=torch.float64)).abs().max()) > 1e-6:
        raise ValueError("G is not a complex structure (orthogonal with Gᵀ = −G): no symplectic basis")
    return out


def _structure_layouts(n: int) -> list[tuple[int, int]]:
    """Every (m, b) with n = m·b, a skew conference matrix of order m and a symmetric Hadamard of order b."""
    if n % 2 or n < 2:
        return []
    return [(m, n // m) for m in range(2, n + 1, 2)
            if n % m == 0 and (m == 2 or _paley1_order(m))
            and (n // m == 1 or _symmetric_hadamard_factors(n // m) is not None)]


def _structure_layout_or_none(n: int, fast: bool = False) -> tuple[int, int] | None:
    layouts = _structure_layouts(n)
    if not layouts:
        return None
    if not fast:
        return layouts[-1]  # the largest conference core: fewest zero entries (1/m of them)
    # Cheapest to apply (m + b multiply-adds per entry) among those with at most 1/8 zeros.
    flat_enough = [lay for lay in layouts if lay[0] >= 8] or layouts[-1:]
    return min(flat_enough, key=lambda lay: (lay[0] + lay[1], -lay[0]))


@functools.lru_cache(maxsize=1024)
def _symmetric_hadamard_factors(n: int) -> tuple[tuple[str, int], ...] | None:
    """Orders with a *symmetric* Hadamard matrix here: products of 2^k and Paley II orders."""
    if _is_pow2(n):
        return (("sylvester", n),)
    for m in sorted((d for d in range(4, n + 1) if n % d == 0), reverse=True):
        if _paley2_order(m):
            rest = _symmetric_hadamard_factors(n // m)
            if rest is not None:
                return (("paley2", m),) + rest
    return None


def structure_layout(n: int, fast: bool = False) -> tuple[int, int]:
    """(m, b) with n = m·b for the hadamard structure C_m ⊗ H_b.

    Default: the largest conference order m (flattest: a 1/m fraction of zeros), for rotations
    folded into weights. ``fast=True``: the layout cheapest to apply online (fewest m + b
    multiply-adds per entry) among those with m ≥ 8 (e.g. 1536 → (48, 32) instead of (384, 4)).
    """
    layout = _structure_layout_or_none(n, fast)
    if layout is None:
        raise _unsupported("skew-Hadamard complex structure", n)
    return layout


@functools.lru_cache(maxsize=256)
def structure_factors(m: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized factors (A, B): A = C_m/√(m−1) skew orthogonal, B = H_b/√b symmetric orthogonal."""
    a = paley_conference(m) / math.sqrt(m - 1)
    if b == 1:
        h = torch.ones(1, 1, dtype=torch.float64)
    else:
        factors = _symmetric_hadamard_factors(b)
        h = _kron_all(_factor_matrix(k, f) for k, f in factors) / math.sqrt(b)
    return a, h


def kron_apply(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x (A ⊗ B) for row vectors x [..., m·b]: on the [m, b] view X it is Aᵀ X B, computed as
    ((X B)ᵀ A)ᵀ so that the large factor A is one GEMM over all rows."""
    m, bb = a.shape[0], b.shape[0]
    lead = x.shape[:-1]
    y = x.reshape(-1, m, bb)
    if bb > 1:
        y = y @ b
    y = y.transpose(1, 2).reshape(-1, m) @ a
    return y.reshape(-1, bb, m).transpose(1, 2).reshape(*lead, m * bb)


# =============================================================================================
# Rotation: one complex structure, structured (signs + layout) or dense


@dataclasses.dataclass(frozen=True, eq=False)
class Rotation:
    """One complex structure G of order n, applied to row vectors as x ↦ x G.

    ``kind == "structure"``: G = D (A ⊗ B) D with D = diag(signs), (A, B) from ``layout``
    (stored: n sign bits). ``kind == "dense"``: G given as a matrix (stored: n² float32).
    """

    n: int
    kind: Literal["structure", "dense"]
    signs: torch.Tensor | None = None  # float64 ±1 [n], structure only
    layout: tuple[int, int] | None = None  # (m, b), structure only
    dense: torch.Tensor | None = None  # float64 [n, n], dense only
    construction: str = "hadamard"  # what built it: hadamard / random / optimized

    @classmethod
    def hadamard(cls, n: int, seed: int = 0, fast: bool = False) -> "Rotation":
        """The randomized skew-Hadamard structure (``fast``: the layout cheapest to apply online)."""
        return cls(n, "structure", signs=_random_signs(n, seed), layout=structure_layout(n, fast))

    @classmethod
    def random(cls, n: int, seed: int = 0) -> "Rotation":
        return cls(n, "dense", dense=complex_structure(random_orthogonal(n, seed)), construction="random")

    @classmethod
    def from_matrix(cls, g: torch.Tensor, construction: str) -> "Rotation":
        return cls(g.shape[0], "dense", dense=g.to(torch.float64), construction=construction)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """G as a dense [n, n] matrix."""
        if self.kind == "dense":
            return self.dense.to(dtype)
        a, b = structure_factors(*self.layout)
        d = self.signs
        return (d[:, None] * torch.kron(a, b) * d[None, :]).to(dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x G along the last dimension (structured: O(n·(m+b)) per row instead of O(n²))."""
        if self.kind == "dense":
            return x @ self.dense.to(x.dtype)
        a, b = structure_factors(*self.layout)
        d = self.signs.to(x.dtype)
        return kron_apply(x * d, a.to(x.dtype), b.to(x.dtype)) * d

    def tensors(self) -> dict[str, torch.Tensor]:
        """What storing this rotation costs: packed sign bits + layout, or the float32 matrix."""
        if self.kind == "dense":
            return {"matrix": self.dense.to(torch.float32).contiguous()}
        bits = (self.signs < 0).to(torch.uint8)
        return {"signs": pack(bits, 1), "layout": torch.tensor(self.layout, dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, t: Mapping[str, torch.Tensor], n: int) -> "Rotation":
        if "matrix" in t:
            return cls(n, "dense", dense=t["matrix"].to(torch.float64), construction="stored")
        layout = tuple(int(v) for v in t["layout"].tolist())
        signs = 1.0 - 2.0 * unpack(t["signs"], 1, n).to(torch.float64)
        return cls(n, "structure", signs=signs, layout=layout)

    @property
    def stored_bits(self) -> int:
        return sum(8 * v.numel() * v.element_size() for v in self.tensors().values())

    def describe(self) -> str:
        if self.kind == "dense":
            return f"{self.construction} dense {self.n}×{self.n}"
        m, b = self.layout
        return f"skew-Hadamard C{m}⊗H{b} (random signs)"


def structure_for(n: int, construction: str, seed: int, unsupported: str,
                  fast: bool = False) -> tuple[Rotation, str | None]:
    """The rotation of order n for a construction; on an unsupported order, the documented fallback.

    Returns (rotation, fallback note or None). ``"optimized"`` starts from the hadamard structure
    (the optimizer conjugates it afterwards); ``fast`` picks the hadamard layout for online use.
    """
    if n % 2:
        raise _unsupported("complex structure", n)
    if construction == "random":
        return Rotation.random(n, seed), None
    try:
        return Rotation.hadamard(n, seed, fast), None
    except UnsupportedOrderError as exc:
        if unsupported != "random":
            raise
        return Rotation.random(n, seed), f"order {n}: {exc.args[0].split(':')[0]}; fell back to random"
