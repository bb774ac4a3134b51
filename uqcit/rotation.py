"""The G=i rotation engine (seed 002 §2.2.3): orthogonal complex structures that make weights
easier to quantize, folded into the network so that it computes the same function.

**The matrix that rotates the weights is G**, a real *complex structure*: G orthogonal with
Gᵀ = −G, hence G⁻¹ = Gᵀ = −G, G + G⁻¹ = 0 and G² = −I (the real form of multiplying by i).
Every such G is ``P J Pᵀ`` for some orthogonal P, with J the 90° rotation in the planes
(0,1), (2,3), ...; ``complex_structure(P)`` builds G from P and ``symplectic_basis(G)``
recovers a P from G. Three constructions (``RotationConfig.construction``):

- ``"hadamard"``: G = D·(C_m ⊗ H_b)·D / √((m−1)·b), a *randomized skew-Hadamard structure*:
  C_m is a Paley conference matrix (m = q+1, q prime ≡ 3 mod 4; zero diagonal, ±1 elsewhere,
  Cᵀ = −C, C Cᵀ = (m−1) I), H_b a symmetric ±1 Hadamard matrix (Sylvester, or Paley II),
  D a seeded random ±1 diagonal. G is skew because C is skew and H, D symmetric. Its entries
  are 0 on a 1/m fraction and ±1/√((m−1)b) elsewhere: as flat as a Hadamard matrix, which is
  what spreads an outlier channel over all channels. Applying it costs O(n·(m+b)), storing it
  n sign bits. (The obvious alternative, G = P J Pᵀ with P a randomized Hadamard matrix, is a
  valid complex structure but *not* flat: the trailing Pᵀ undoes most of P's spreading, its
  rows carry Rademacher sums; ``randomized_hadamard`` is provided for that P and for tests.)
- ``"random"``: G = P J Pᵀ with P = QR of a seeded Gaussian (a uniformly random complex
  structure). Stored, where it is not folded, as a dense float32 matrix.
- ``"optimized"``: G = R G₀ Rᵀ starting from the hadamard G₀, R learned by Riemannian
  gradient steps on the orthogonal group with the Cayley retraction. Conjugation keeps G a
  complex structure exactly. What is minimized (weights only, no activations): the
  uniform-noise model of round-to-nearest error, Σ over quantization groups of
  ``group_size · range²`` (the RTN MSE of a group is ≈ Δ²/12 with Δ = range/(2^b−1), so one
  proxy serves every bit width), divided by the weights' energy, over rows sampled from every
  matrix the residual rotation touches.

Orders: ``hadamard_matrix(n)`` exists for n = 2^k · ∏(Paley orders), e.g. 12, 20, 48, 576 =
72·8, 1536 = 384·4; the skew structure needs n = m·b as above (``structure_layout``). Other
n (odd n always: a complex structure needs even n) raise ``UnsupportedOrderError`` listing the
nearest supported orders; ``RotationConfig(unsupported="random")`` falls back to ``"random"``
instead, and the result records every fallback.

How it is applied without changing the function (Llama family: llama, mistral, qwen2):
fusing each RMSNorm's scale into the linear layers that read it, then rotating the residual
stream by one G (embedding rows E ← E G; inputs of q/k/v/gate/up/lm_head W ← W G; outputs of
o_proj/down_proj W ← Gᵀ W, bias b ← b G), a per-head G between V and O (v_proj output rows and
o_proj input columns, the kv head shared by a GQA group), and an online rotation of the
down_proj input (its W ← W G_online, its input x ← x G_online at run time: ``RotatedGatedMLP``).
A tied LM head keeps its tie: the final norm becomes ``RotatedRMSNorm``, which applies its
scale in the unrotated basis (x ← ((x Gᵀ) ⊙ g) G, an online op on one d-vector per token);
``tied_head="untie"`` instead folds the scale into a separate head matrix (costs vocab×d
weights). Other families get an online input rotation on every Linear (a forward pre-hook;
see ``apply_online_rotations``).

>>> from uqcit.tiny import tiny_model
>>> model, _ = tiny_model("llama")
>>> res = rotate_model(model, RotationConfig(), progress=False)
>>> res.max_logit_diff < 1e-4, res.invariants.passed
(True, True)
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import time
from typing import Any, Iterable, Literal, Mapping

import torch
from torch import nn

from .config import StageConfig, register_config
from .packing import pack, unpack
from .results import Result

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
OUTER = "outer"  # package folder of modules outside the blocks (same naming as uqcit.package)

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


def _structure_layout_or_none(n: int) -> tuple[int, int] | None:
    if n % 2 or n < 2:
        return None
    best = None
    for m in range(2, n + 1, 2):
        if n % m or not (m == 2 or _paley1_order(m)):
            continue
        b = n // m
        if b == 1 or _symmetric_hadamard_factors(b) is not None:
            best = (m, b)  # keep the largest conference core: fewest zero entries (1/m of them)
    return best


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


def structure_layout(n: int) -> tuple[int, int]:
    """(m, b) with n = m·b for the hadamard structure C_m ⊗ H_b (largest conference order m)."""
    layout = _structure_layout_or_none(n)
    if layout is None:
        raise _unsupported("skew-Hadamard complex structure", n)
    return layout


@functools.lru_cache(maxsize=256)
def _structure_factors(m: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized factors (A, B): A = C_m/√(m−1) skew orthogonal, B = H_b/√b symmetric orthogonal."""
    a = paley_conference(m) / math.sqrt(m - 1)
    if b == 1:
        h = torch.ones(1, 1, dtype=torch.float64)
    else:
        factors = _symmetric_hadamard_factors(b)
        h = _kron_all(_factor_matrix(k, f) for k, f in factors) / math.sqrt(b)
    return a, h


def _kron_apply(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
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
    def hadamard(cls, n: int, seed: int = 0) -> "Rotation":
        return cls(n, "structure", signs=_random_signs(n, seed), layout=structure_layout(n))

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
        a, b = _structure_factors(*self.layout)
        d = self.signs
        return (d[:, None] * torch.kron(a, b) * d[None, :]).to(dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x G along the last dimension (structured: O(n·(m+b)) per row instead of O(n²))."""
        if self.kind == "dense":
            return x @ self.dense.to(x.dtype)
        a, b = _structure_factors(*self.layout)
        d = self.signs.to(x.dtype)
        return _kron_apply(x * d, a.to(x.dtype), b.to(x.dtype)) * d

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


def _structure_for(n: int, construction: str, seed: int, unsupported: str) -> tuple[Rotation, str | None]:
    """The rotation of order n for a construction; on an unsupported order, the documented fallback.

    Returns (rotation, fallback note or None). ``"optimized"`` starts from the hadamard structure
    (the optimizer conjugates it afterwards).
    """
    if n % 2:
        raise _unsupported("complex structure", n)
    if construction == "random":
        return Rotation.random(n, seed), None
    try:
        return Rotation.hadamard(n, seed), None
    except UnsupportedOrderError as exc:
        if unsupported != "random":
            raise
        return Rotation.random(n, seed), f"order {n}: {exc.args[0].split(':')[0]}; fell back to random"


# =============================================================================================
# invariants (seed 002 §2.2.3.2, made real)


@dataclasses.dataclass(frozen=True)
class InvariantCheck:
    """One measured invariant: its value and the tolerance it must stay under."""

    name: str
    where: str  # which rotation or block it was measured on
    value: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.value <= self.tolerance


@dataclasses.dataclass(frozen=True)
class InvariantReport:
    """Invariant checks of the complex structures used and of rotated square weight blocks.

    Per structure G (float64, G⁻¹ from ``torch.linalg.inv``): ‖G + G⁻¹‖_max, ‖GᵀG − I‖_max,
    ‖G² + I‖_max, ‖G + Gᵀ‖_max, |det G − 1|, and ‖P J Pᵀ − G‖_max for a P recovered by
    ``symplectic_basis``. Per square block A (a weight matrix of the model), under the
    similarity A ↦ Gᵀ A G: |tr A − tr GᵀAG| / ‖A‖_F, the sorted eigenvalues of the symmetric
    part (so λ_max too), and the singular values of the one-sided rotation A G (what the
    model actually stores), relative to ‖A‖₂.
    """

    checks: tuple[InvariantCheck, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def worst(self) -> InvariantCheck | None:
        return max(self.checks, key=lambda c: c.value / c.tolerance, default=None)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed,
                "checks": [dataclasses.asdict(c) | {"passed": c.passed} for c in self.checks]}


STRUCTURE_TOL = 1e-9  # float64 arithmetic on n ≤ a few thousand: errors ~1e-13, this leaves room
SPECTRUM_TOL = 1e-9


def structure_checks(g: torch.Tensor, where: str, tol: float = STRUCTURE_TOL) -> list[InvariantCheck]:
    """G + G⁻¹ = 0, GᵀG = I, G² = −I, Gᵀ = −G, det G = 1, G = P J Pᵀ (all in float64)."""
    g = g.to(torch.float64)
    n = g.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    inv = torch.linalg.inv(g)
    p = symplectic_basis(g)
    sign, logdet = torch.linalg.slogdet(g)
    det = float(sign) * math.exp(float(logdet))
    return [
        InvariantCheck("|G + G^-1|_max", where, float((g + inv).abs().max()), tol),
        InvariantCheck("|G^T G - I|_max", where, float((g.T @ g - eye).abs().max()), tol),
        InvariantCheck("|G^2 + I|_max", where, float((g @ g + eye).abs().max()), tol),
        InvariantCheck("|G + G^T|_max", where, float((g + g.T).abs().max()), tol),
        InvariantCheck("|det G - 1|", where, abs(det - 1.0), tol * n),
        InvariantCheck("|P J P^T - G|_max", where, float((complex_structure(p) - g).abs().max()), tol * 10),
    ]


def block_checks(a: torch.Tensor, g: torch.Tensor, where: str, tol: float = SPECTRUM_TOL) -> list[InvariantCheck]:
    """Trace, symmetric-part spectrum and singular values preserved by rotating square block A."""
    a = a.to(torch.float64)
    g = g.to(torch.float64)
    sim = g.T @ a @ g
    fro = float(a.norm()) or 1.0
    two = float(torch.linalg.matrix_norm(a, ord=2)) or 1.0
    ev = torch.linalg.eigvalsh((a + a.T) / 2)
    ev_rot = torch.linalg.eigvalsh((sim + sim.T) / 2)
    sv = torch.linalg.svdvals(a)
    sv_rot = torch.linalg.svdvals(a @ g)
    return [
        InvariantCheck("|tr A - tr G^T A G| / |A|_F", where, abs(float(a.trace() - sim.trace())) / fro, tol),
        InvariantCheck("|eig(sym A) - eig(sym G^T A G)|_max / |A|_2", where,
                       float((ev - ev_rot).abs().max()) / two, tol),
        InvariantCheck("|lambda_max change| / |A|_2", where, abs(float(ev[-1] - ev_rot[-1])) / two, tol),
        InvariantCheck("|sv(A) - sv(A G)|_max / |A|_2", where, float((sv - sv_rot).abs().max()) / two, tol),
    ]


# =============================================================================================
# run-time modules: online rotations that cannot be folded into a weight


class OnlineRotation(nn.Module):
    """Applies x ↦ x G at run time (last dimension). Its persistent buffers are exactly what is
    stored: packed sign bits + layout for a structure, or the float32 matrix for a dense G.

    ``enabled = False`` turns it into the identity (used only to time its cost).
    """

    def __init__(self, rotation: Rotation):
        super().__init__()
        self.n = rotation.n
        self.kind = rotation.kind
        self.factors = rotation.layout  # (m, b) for a structure; the "layout" buffer stores the same
        self.description = rotation.describe()
        self.enabled = True
        for name, t in rotation.tensors().items():
            self.register_buffer(name, t.clone(), persistent=True)
        if rotation.kind == "structure":
            a, b = _structure_factors(*rotation.layout)
            self.register_buffer("_signs", rotation.signs.to(torch.float32), persistent=False)
            self.register_buffer("_a", a.to(torch.float32), persistent=False)
            self.register_buffer("_b", b.to(torch.float32), persistent=False)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> "OnlineRotation":
        if "matrix" in tensors:
            n = tensors["matrix"].shape[0]
        else:
            m, b = (int(v) for v in tensors["layout"].tolist())
            n = m * b
        return cls(Rotation.from_tensors(tensors, n))

    @property
    def stored_bits(self) -> int:
        return sum(8 * t.numel() * t.element_size() for t in self.state_dict().values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if x.shape[-1] != self.n:
            raise ValueError(f"online rotation of order {self.n} got inputs of width {x.shape[-1]}")
        if self.kind == "dense":
            return x @ self.matrix.to(x.dtype)
        d = self._signs.to(x.dtype)
        return _kron_apply(x * d, self._a.to(x.dtype), self._b.to(x.dtype)) * d

    def extra_repr(self) -> str:
        return f"n={self.n}, {self.description}, stored_bits={self.stored_bits}"


class RotatedGatedMLP(nn.Module):
    """A gated MLP (Llama/Mistral/Qwen2) whose down_proj input is rotated online.

    Holds the original MLP's children under their own names (``gate_proj``, ``up_proj``,
    ``down_proj``, ``act_fn``), so any quantizer that replaces ``...mlp.down_proj`` by name
    still finds it, and the rotation survives the replacement:
    ``down_proj(online_rotation(act_fn(gate_proj(x)) * up_proj(x)))``.
    """

    def __init__(self, mlp: nn.Module, rotation: OnlineRotation):
        super().__init__()
        for name in ("gate_proj", "up_proj", "down_proj"):
            if not hasattr(mlp, name):
                raise TypeError(f"{type(mlp).__name__} has no {name}: not a gated MLP")
        for name, child in mlp.named_children():
            if name != "online_rotation":
                self.add_module(name, child)
        self.act_fn = mlp.act_fn  # an nn.Module in transformers (ACT2FN), kept as a child
        self.online_rotation = rotation
        self.source_class = getattr(mlp, "source_class", type(mlp).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.online_rotation(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


class RotatedRMSNorm(nn.Module):
    """RMSNorm whose per-channel scale g acts in the unrotated basis of a rotated residual stream.

    Input h' = h G. Output ((n(h') Gᵀ) ⊙ g) G = −((n(h') G) ⊙ g) G, with n the scale-free RMS
    normalization; equals RMSNorm_g(h)·G. It lets a tied LM head (whose weight is the rotated
    embedding E G) keep its tie: the scale cannot be folded into a shared matrix.
    ``weight`` keeps the name and value of the original norm's scale.
    """

    def __init__(self, weight: torch.Tensor, eps: float, rotation: OnlineRotation):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.variance_epsilon = eps
        self.scale_rotation = rotation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        h = h.to(dtype)
        return -self.scale_rotation(self.scale_rotation(h) * self.weight.to(dtype))


def _input_rotation_hook(module: nn.Module, args: tuple) -> tuple:
    return (module.input_rotation(args[0]),) + tuple(args[1:])


def attach_input_rotation(module: nn.Module, rotation: OnlineRotation) -> None:
    """Rotate ``module``'s first input online (generic fallback): child ``input_rotation`` + a
    forward pre-hook. Replacing the module (e.g. by a ``QuantLinear``) drops both; re-attach with
    ``apply_online_rotations``."""
    if hasattr(module, "input_rotation") and isinstance(module.input_rotation, OnlineRotation):
        module.input_rotation = rotation  # the hook is already there
        return
    module.input_rotation = rotation
    module.register_forward_pre_hook(_input_rotation_hook)


_SITES = {"online_rotation": "mlp", "scale_rotation": "final_norm", "input_rotation": "linear"}


def is_rotation_key(key: str) -> bool:
    """Whether a state-dict key belongs to an online rotation (stored in rotation.safetensors)."""
    parts = key.split(".")
    return len(parts) >= 2 and parts[-2] in _SITES and parts[-1] in ("signs", "layout", "matrix")


def _layer_dir(name: str) -> str:
    from .levels import block_of

    block = block_of(name)
    return OUTER if block is None else f"layer_{block:03d}"


def rotation_tensors_for_layer_dir(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Every online rotation's stored tensors, grouped by package layer folder.

    Keys are full state-dict keys (e.g. ``model.layers.3.mlp.online_rotation.signs``); folders
    are named as ``uqcit.package`` names them (``layer_003``, ``outer``). Folded rotations
    store nothing and do not appear.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, OnlineRotation):
            layer = _layer_dir(name)
            for key, t in mod.state_dict().items():
                out.setdefault(layer, {})[f"{name}.{key}"] = t.detach().contiguous()
    return out


def apply_online_rotations(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Install the online rotations described by ``tensors`` (keys as written by
    ``rotation_tensors_for_layer_dir``) into ``model``, in place; returns the sites installed.

    Works on a model freshly built from its config (package loading: call it after the weights
    are loaded), and on a model whose linear layers were replaced by quantized ones (it
    re-attaches generic input rotations that the replacement dropped). Idempotent.
    """
    sites: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not is_rotation_key(key):
            raise ValueError(f"{key!r} is not an online-rotation tensor key")
        site, _, tname = key.rpartition(".")
        sites.setdefault(site, {})[tname] = t
    done = []
    for site, ts in sorted(sites.items()):
        owner_name, _, kind = site.rpartition(".")
        rot = OnlineRotation.from_tensors(ts)
        owner = model.get_submodule(owner_name)
        if kind == "online_rotation":
            if isinstance(owner, RotatedGatedMLP):
                owner.online_rotation = rot
            else:
                _replace(model, owner_name, RotatedGatedMLP(owner, rot))
        elif kind == "scale_rotation":
            if isinstance(owner, RotatedRMSNorm):
                owner.scale_rotation = rot
            else:
                eps = getattr(owner, "variance_epsilon", getattr(owner, "eps", None))
                if eps is None or not hasattr(owner, "weight"):
                    raise TypeError(f"{owner_name} ({type(owner).__name__}) is not an RMSNorm")
                _replace(model, owner_name, RotatedRMSNorm(owner.weight, eps, rot))
        else:
            attach_input_rotation(owner, rot)
        done.append(site)
    return done


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    from .runtime import replace_module

    replace_module(model, name, new)


@torch.no_grad()
def _set_online_enabled(model: nn.Module, enabled: bool) -> None:
    for mod in model.modules():
        if isinstance(mod, OnlineRotation):
            mod.enabled = enabled


# =============================================================================================
# config and result


@register_config
@dataclasses.dataclass(frozen=True)
class RotationConfig(StageConfig):
    """Which complex structure rotates the model, and where (see the module docstring)."""

    type_tag = "rotation"

    construction: Literal["hadamard", "random", "optimized", "none"] = "hadamard"  # flat skew-Hadamard spreads outliers most evenly and is stored as sign bits
    seed: int = 0  # seeds the signs / Gaussians; same seed, same rotation
    residual: bool = True  # rotate the residual stream: fully folded, no run-time cost
    per_head_vo: bool = True  # per-head rotation between v_proj and o_proj: fully folded
    online_down_proj: bool = True  # rotate the down_proj input at run time (skew-Hadamard, n sign bits)
    tied_head: Literal["keep", "untie"] = "keep"  # keep the embedding/head tie (final-norm scale online); untie stores vocab×d more weights
    unsupported: Literal["error", "random"] = "error"  # an order with no Hadamard structure: fail, or fall back to dense random
    optimize_steps: int = 60  # Cayley steps of "optimized" (each on freshly sampled rows)
    lr: float = 0.02  # step length of "optimized", radians of rotation per step (the gradient is normalized)
    optimize_rows: int = 32  # rows sampled per matrix per step: keeps a step well under a second on a CPU
    optimize_matrices: int = 32  # matrices sampled per step (of the ~7 per block the residual touches)
    group_size: int = 128  # quantization group of the optimizer's proxy; match the plan's
    check_samples: int = 2  # calibration sequences of the end-to-end logit check (when none are given)
    check_seq_len: int = 64  # tokens per check sequence

    @property
    def method_name(self) -> str:
        return "" if self.construction == "none" else f"rot-{self.construction}"


@dataclasses.dataclass(frozen=True)
class ModuleRotation:
    """What happened to one module: the rotations on its input and output side, and how."""

    name: str
    input_rotation: str  # "" none; "residual", "per-head", "online", "online (generic)"
    output_rotation: str  # "" none; "residual", "per-head"
    online: bool  # an online rotation runs on its input at run time
    stored_bits: int  # bits of rotations stored for it (0 when everything is folded)
    norm_fused: str = ""  # the RMSNorm scale fused into it, if any


@dataclasses.dataclass(frozen=True)
class StructureInfo:
    """One complex structure used: where, its order and construction, and what storing it costs."""

    site: str  # "residual", "model.layers.3.self_attn per-head kv0", "model.layers.3.mlp.online_rotation"...
    n: int
    description: str
    folded: bool  # True: folded into weights, nothing stored
    stored_bits: int


@dataclasses.dataclass(repr=False)  # keep Result's short __repr__
class RotationResult(Result):
    """The rotated model and what rotating it did, cost and preserved."""

    model: nn.Module
    config: RotationConfig
    model_type: str | None
    family: str  # "llama" (folded residual stream) or "generic" (online per Linear)
    modules: list[ModuleRotation]
    structures: list[StructureInfo]
    invariants: InvariantReport
    max_logit_diff: float  # max |logits(rotated) − logits(original)| on the check sequences
    max_abs_logit: float  # max |logits(original)|, for scale
    check_tokens: int
    tied_head: str  # "keep" / "untie" / "not tied"
    extra_weights: int  # weights added by rotating (untied head), 0 otherwise
    fallbacks: list[str]
    optimize_history: list[tuple[int, float]]  # (step, proxy loss on the fixed evaluation rows)
    seconds: dict[str, float]
    forward_seconds: dict[str, float]  # original / rotated / rotated with online rotations off

    @property
    def stored_bits(self) -> int:
        """Bits of every rotation that is not folded away (what rotation.safetensors holds)."""
        return sum(s.stored_bits for s in self.structures if not s.folded)

    @property
    def online_overhead(self) -> float | None:
        """Forward time of the rotated model over the same model with its online rotations off."""
        f = self.forward_seconds
        if not f.get("rotated_online_off"):
            return None
        return f["rotated"] / f["rotated_online_off"]

    def rotation_tensors_for_layer_dir(self) -> dict[str, dict[str, torch.Tensor]]:
        """The online rotations' tensors by package layer folder (see the module function)."""
        return rotation_tensors_for_layer_dir(self.model)

    def summary(self) -> str:
        online = sum(m.online for m in self.modules)
        return (f"{self.config.construction} rotation of a {self.model_type} model ({self.family}): "
                f"{len(self.modules)} modules rotated, {online} with an online rotation, "
                f"{self.stored_bits / 8 / 1024:.1f} KiB of rotations stored; max |Δlogit| "
                f"{self.max_logit_diff:.2e}; invariants {'pass' if self.invariants.passed else 'FAIL'}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(), "model_type": self.model_type, "family": self.family,
            "stored_bits": self.stored_bits, "max_logit_diff": self.max_logit_diff,
            "max_abs_logit": self.max_abs_logit, "check_tokens": self.check_tokens,
            "tied_head": self.tied_head, "extra_weights": self.extra_weights,
            "fallbacks": list(self.fallbacks), "optimize_history": [list(h) for h in self.optimize_history],
            "seconds": dict(self.seconds), "forward_seconds": dict(self.forward_seconds),
            "online_overhead": self.online_overhead,
            "invariants": self.invariants.to_dict(),
            "structures": [dataclasses.asdict(s) for s in self.structures],
            "modules": [dataclasses.asdict(m) for m in self.modules],
        }

    def table_rows(self):
        return (("module", "input side", "output side", "norm fused", "online", "stored bits"),
                [(m.name, m.input_rotation, m.output_rotation, m.norm_fused, m.online, m.stored_bits)
                 for m in self.modules])

    def figure(self):
        """Each invariant's worst value against its tolerance (log scale)."""
        import plotly.graph_objects as go

        by_name: dict[str, InvariantCheck] = {}
        for c in self.invariants.checks:
            prev = by_name.get(c.name)
            if prev is None or c.value / c.tolerance > prev.value / prev.tolerance:
                by_name[c.name] = c
        names = list(by_name)
        fig = go.Figure()
        fig.add_bar(x=names, y=[max(by_name[n].value, 1e-18) for n in names], name="measured (worst)",
                    uid="rot-invariant-value", hovertext=[by_name[n].where for n in names])
        fig.add_scatter(x=names, y=[by_name[n].tolerance for n in names], mode="markers", name="tolerance",
                        marker_symbol="line-ew-open", marker_size=24, uid="rot-invariant-tol")
        fig.update_yaxes(type="log", title="value")
        fig.update_layout(title=f"G = i invariants ({self.config.construction}); end-to-end max |Δlogit| "
                                f"{self.max_logit_diff:.1e}", height=380)
        return fig


# =============================================================================================
# applying rotations without changing the function


def _derive_seed(seed: int, *parts: Any) -> int:
    """A stable per-site seed (crc32 of the site name mixed with the config seed)."""
    import zlib

    return (zlib.crc32("/".join(map(str, parts)).encode()) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF


@torch.no_grad()
def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write a float64 result into a parameter, keeping its dtype (and any tie: same storage)."""
    param.data.copy_(value.to(param.dtype))


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def rotate_model(model: nn.Module, config: RotationConfig = RotationConfig(), *,
                 check_ids: torch.Tensor | None = None, progress: bool = True) -> RotationResult:
    """Rotate a copy of ``model`` by complex structures G so that, before quantization, it
    computes the same function, and measure that it does (the caller's model is untouched).

    ``check_ids`` ([batch, seq] token ids, e.g. ``data.calibration_batch``) drive the end-to-end
    logit check; by default ``config.check_samples`` seeded random sequences.

    >>> from uqcit.tiny import tiny_model
    >>> res = rotate_model(tiny_model("qwen2")[0], RotationConfig(construction="random"), progress=False)
    >>> res.max_logit_diff < 1e-4
    True
    """
    t_all = time.perf_counter()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    out = copy.deepcopy(model)
    out.eval()
    seconds["copy"] = time.perf_counter() - t0
    model_type = getattr(getattr(out, "config", None), "model_type", None)
    ctx = _Ctx(config, progress)
    t0 = time.perf_counter()
    if config.construction == "none":
        family = "none"
    elif model_type in LLAMA_FAMILY:
        family = "llama"
        _rotate_llama(out, ctx)
    else:
        family = "generic"
        _rotate_generic(out, ctx)
    seconds["rotate"] = time.perf_counter() - t0 - ctx.optimize_seconds
    if ctx.optimize_seconds:
        seconds["optimize"] = ctx.optimize_seconds

    t0 = time.perf_counter()
    invariants = InvariantReport(tuple(ctx.checks))
    seconds["invariants"] = time.perf_counter() - t0 + ctx.check_seconds

    t0 = time.perf_counter()
    ids = check_ids if check_ids is not None else _random_ids(out, config)
    diff, scale, fwd = _logit_check(model, out, ids)
    seconds["logit_check"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_all
    return RotationResult(
        model=out, config=config, model_type=model_type, family=family, modules=ctx.records,
        structures=ctx.structures, invariants=invariants, max_logit_diff=diff, max_abs_logit=scale,
        check_tokens=int(ids.numel()), tied_head=ctx.tied_head, extra_weights=ctx.extra_weights,
        fallbacks=ctx.fallbacks, optimize_history=ctx.history, seconds=seconds, forward_seconds=fwd)


class _Ctx:
    """Mutable bookkeeping of one ``rotate_model`` call (records, structures, checks)."""

    def __init__(self, config: RotationConfig, progress: bool):
        self.config = config
        self.progress = progress
        self.records: list[ModuleRotation] = []
        self.structures: list[StructureInfo] = []
        self.checks: list[InvariantCheck] = []
        self.fallbacks: list[str] = []
        self.history: list[tuple[int, float]] = []
        self.tied_head = "not tied"
        self.extra_weights = 0
        self.optimize_seconds = 0.0
        self.check_seconds = 0.0
        self._checked: set[str] = set()

    def structure(self, n: int, site: str, seed_parts: tuple, construction: str | None = None) -> Rotation:
        cfg = self.config
        rot, note = _structure_for(n, construction or cfg.construction, _derive_seed(cfg.seed, *seed_parts),
                                   cfg.unsupported)
        if note:
            self.fallbacks.append(f"{site}: {note}")
        return rot

    def note(self, site: str, rot: Rotation, folded: bool, check_kind: str | None = None,
             block: torch.Tensor | None = None) -> None:
        self.structures.append(StructureInfo(site, rot.n, rot.describe(), folded, 0 if folded else rot.stored_bits))
        if check_kind is not None and check_kind not in self._checked:
            self._checked.add(check_kind)  # check one structure of each kind (O(n³) each)
            t0 = time.perf_counter()
            g = rot.matrix()
            self.checks.extend(structure_checks(g, site))
            if block is not None:
                a = _f64(block)
                if a.shape[0] != a.shape[1]:
                    a = a.T @ a if a.shape[1] == rot.n else a @ a.T  # Gram matrix in G's space
                self.checks.extend(block_checks(a, g, f"{site} on a {tuple(block.shape)} weight block"))
            self.check_seconds += time.perf_counter() - t0


def _rotate_llama(model: nn.Module, ctx: _Ctx) -> None:
    from tqdm.auto import tqdm

    cfg = ctx.config
    base = model.model
    embed, layers, final_norm, head = base.embed_tokens, base.layers, base.norm, model.lm_head
    d = embed.weight.shape[1]
    tied = head.weight.data_ptr() == embed.weight.data_ptr()

    # 1. The residual structure ("optimized": learned on the norm-fused weights, before any change).
    rot: Rotation | None = None
    if cfg.residual:
        rot = ctx.structure(d, "residual", ("residual",),
                            "hadamard" if cfg.construction == "optimized" else None)
        if cfg.construction == "optimized" and rot.kind == "structure":
            t0 = time.perf_counter()
            rot = _optimize_residual(model, rot, ctx)
            ctx.optimize_seconds = time.perf_counter() - t0
        ctx.note("residual", rot, folded=True, check_kind="residual",
                 block=layers[0].self_attn.q_proj.weight[:d, :d] if len(layers) else embed.weight[:d])

    def rin(w: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:  # input side: (W diag g) G
        x = _f64(w) if g is None else _f64(w) * _f64(g)[None, :]
        return x if rot is None else rot.apply(x)

    def rout(w: torch.Tensor) -> torch.Tensor:  # output side: Gᵀ W = (Wᵀ G)ᵀ
        return _f64(w) if rot is None else rot.apply(_f64(w).T).T

    def rbias(b: torch.Tensor | None) -> None:  # a bias added to the residual: b ← b G
        if b is not None and rot is not None:
            _assign(b, rot.apply(_f64(b)))

    res = "residual" if rot is not None else ""
    # 2. Final norm and LM head (an untied head needs E before the embedding is rotated).
    gf = final_norm.weight.detach().clone()
    head_name, norm_name = _name(model, head), _name(model, final_norm)
    if rot is not None:
        if not tied:
            _assign(head.weight, rin(head.weight, gf))
            ctx.records.append(ModuleRotation(head_name, res, "", False, 0, norm_name))
        elif cfg.tied_head == "untie":
            head.weight = nn.Parameter(rin(embed.weight, gf).to(head.weight.dtype))  # E diag(g) G
            model.config.tie_word_embeddings = False
            ctx.tied_head, ctx.extra_weights = "untie", head.weight.numel()
            ctx.records.append(ModuleRotation(head_name, res, "", False, 0, norm_name))
        else:
            online = OnlineRotation(rot)
            eps = getattr(final_norm, "variance_epsilon", getattr(final_norm, "eps", 1e-6))
            _replace(model, norm_name, RotatedRMSNorm(gf, eps, online))
            ctx.structures.append(StructureInfo(f"{norm_name}.scale_rotation", d, rot.describe(), False,
                                                online.stored_bits))
            ctx.tied_head = "keep"
            ctx.records.append(ModuleRotation(head_name, "residual (tied to the embedding)", "", False, 0))
            ctx.records.append(ModuleRotation(norm_name, "online: scale applied in the unrotated basis",
                                              "", True, online.stored_bits))
        if ctx.tied_head != "keep":
            with torch.no_grad():
                final_norm.weight.fill_(1.0)
        _assign(embed.weight, rin(embed.weight, None))  # E ← E G (a kept tie follows: same storage)
        ctx.records.append(ModuleRotation(_name(model, embed), "", res, False, 0))

    # 3. Every block.
    for li, layer in enumerate(tqdm(layers, desc="rotate", unit="block", disable=not ctx.progress)):
        attn, mlp = layer.self_attn, layer.mlp
        lname = _name(model, layer)
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        g1 = n1.weight.detach().clone() if rot is not None else None
        g2 = n2.weight.detach().clone() if rot is not None else None
        for proj, g, gname in ((attn.q_proj, g1, "input_layernorm"), (attn.k_proj, g1, "input_layernorm"),
                               (attn.v_proj, g1, "input_layernorm"),
                               (mlp.gate_proj, g2, "post_attention_layernorm"),
                               (mlp.up_proj, g2, "post_attention_layernorm")):
            if rot is not None:
                _assign(proj.weight, rin(proj.weight, g))
            heads_out = "per-head" if proj is attn.v_proj and cfg.per_head_vo else ""
            ctx.records.append(ModuleRotation(_name(model, proj), res, heads_out, False, 0,
                                              f"{lname}.{gname}" if rot is not None else ""))
        if rot is not None:
            with torch.no_grad():
                n1.weight.fill_(1.0)
                n2.weight.fill_(1.0)
            _assign(attn.o_proj.weight, rout(attn.o_proj.weight))
            rbias(attn.o_proj.bias)
        if cfg.per_head_vo:
            _rotate_heads(model, attn, li, ctx)
        ctx.records.append(ModuleRotation(_name(model, attn.o_proj), "per-head" if cfg.per_head_vo else "",
                                          res, False, 0))
        # down_proj: residual on the output side, an online structure on the input side.
        down_name = _name(model, mlp.down_proj)
        w_down = rout(mlp.down_proj.weight) if rot is not None else None
        stored = 0
        if cfg.online_down_proj:
            n_mid = mlp.down_proj.weight.shape[1]
            # Online rotations are always the skew-Hadamard structure: cheap to run and to store.
            rot_on = ctx.structure(n_mid, f"{down_name} input", ("online", li), "hadamard")
            w_down = rot_on.apply(w_down if w_down is not None else _f64(mlp.down_proj.weight))
            online = OnlineRotation(rot_on)
            mlp_name = _name(model, mlp)
            _replace(model, mlp_name, RotatedGatedMLP(mlp, online))
            ctx.note(f"{mlp_name}.online_rotation", rot_on, folded=False, check_kind="online")
            stored = online.stored_bits
        if w_down is not None:
            _assign(mlp.down_proj.weight, w_down)
        rbias(mlp.down_proj.bias)
        ctx.records.append(ModuleRotation(down_name, "online" if stored else "", res, bool(stored), stored))


def _rotate_heads(model: nn.Module, attn: nn.Module, li: int, ctx: _Ctx) -> None:
    """Per-head G between v_proj (output rows) and o_proj (input columns); GQA-aware."""
    cfg = model.config
    hd = getattr(attn, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_heads = attn.o_proj.weight.shape[1] // hd
    n_kv = attn.v_proj.weight.shape[0] // hd
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads are not a multiple of {n_kv} key/value heads")
    group = n_heads // n_kv
    wv, wo = _f64(attn.v_proj.weight), _f64(attn.o_proj.weight)
    bv = attn.v_proj.bias
    bv64 = None if bv is None else _f64(bv)
    lname = _name(model, attn)
    for j in range(n_kv):
        rot = ctx.structure(hd, f"{lname} head {j}", ("head", li, j))
        rows = slice(j * hd, (j + 1) * hd)
        wv[rows] = rot.apply(wv[rows].T).T  # Gᵀ W_v[head j]: the head's values come out as v G
        if bv64 is not None:
            bv64[rows] = rot.apply(bv64[rows])
        for h in range(j * group, (j + 1) * group):  # query heads reading kv head j (repeat_kv order)
            cols = slice(h * hd, (h + 1) * hd)
            wo[:, cols] = rot.apply(wo[:, cols])  # W_o[:, head h] G: undoes it at o_proj's input
        ctx.note(f"{lname} per-head kv{j}", rot, folded=True, check_kind="per-head",
                 block=attn.o_proj.weight[:hd, :hd])
    _assign(attn.v_proj.weight, wv)
    _assign(attn.o_proj.weight, wo)
    if bv is not None:
        _assign(bv, bv64)


def _rotate_generic(model: nn.Module, ctx: _Ctx) -> None:
    """Online input rotation for every Linear / Conv1D that owns its weight (generic families)."""
    from transformers.pytorch_utils import Conv1D

    import collections

    cfg = ctx.config
    if cfg.construction == "optimized":
        ctx.fallbacks.append("optimized applies to the residual stream of Llama-family models; "
                             "generic online rotations use the hadamard structure")
    seen: set[int] = set()
    uses = collections.Counter(p.data_ptr() for _, p in model.named_parameters(remove_duplicate=False))
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, (nn.Linear, Conv1D)):
            continue
        w = mod.weight
        if w.data_ptr() in seen or uses[w.data_ptr()] > 1:
            ctx.fallbacks.append(f"{name}: weight shared with another module; not rotated")
            continue
        seen.add(w.data_ptr())
        n_in = w.shape[0] if isinstance(mod, Conv1D) else w.shape[1]
        try:
            rot = ctx.structure(n_in, name, ("generic", name),
                                "hadamard" if cfg.construction == "optimized" else None)
        except UnsupportedOrderError:
            if cfg.unsupported == "error":
                raise
            ctx.fallbacks.append(f"{name}: input width {n_in} has no complex structure; not rotated")
            continue
        # Linear [out, in]: W G.  Conv1D stores [in, out] and computes x W: Gᵀ W.
        _assign(w, rot.apply(_f64(w).T).T if isinstance(mod, Conv1D) else rot.apply(_f64(w)))
        online = OnlineRotation(rot)
        attach_input_rotation(mod, online)
        ctx.note(f"{name}.input_rotation", rot, folded=False, check_kind="generic", block=None)
        ctx.records.append(ModuleRotation(name, "online (generic)", "", True, online.stored_bits))


def _name(model: nn.Module, module: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of the model")


# =============================================================================================
# the optimized construction: Cayley steps on the orthogonal group


def _optimize_residual(model: nn.Module, rot0: Rotation, ctx: _Ctx) -> Rotation:
    """G = R G₀ Rᵀ with R learned to minimize the RTN-error proxy of the rotated weights.

    Proxy (uniform-noise model of round-to-nearest): for each quantization group of a rotated
    matrix, ``group_size · range²`` (range = max(hi, 0) − min(lo, 0), as the quantizer widens
    it), summed and divided by the matrix's energy; averaged over matrices. Matrices: the
    embedding, q/k/v (× input-norm scale), gate/up (× post-attention-norm scale) on the input
    side, o_proj and down_proj (without its online rotation) on the output side, and an untied
    head (× final-norm scale). Each step samples ``optimize_matrices`` matrices ×
    ``optimize_rows`` rows; a fixed sample of every matrix scores progress, and the best R seen
    is kept. Riemannian gradient Ω = ∇Rᵀ − R∇ᵀ (skew), normalized to ‖Ω‖_F = 1, then the
    Cayley retraction R ← (I + τ/2 Ω)⁻¹ (I − τ/2 Ω) R with τ = ``lr``.
    """
    from tqdm.auto import tqdm

    cfg = ctx.config
    base = model.model
    mats: list[tuple[str, torch.Tensor]] = [("in", base.embed_tokens.weight.detach())]
    for layer in base.layers:
        g1, g2 = layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()
        a, m = layer.self_attn, layer.mlp
        mats += [("in", p.weight.detach() * g1) for p in (a.q_proj, a.k_proj, a.v_proj)]
        mats += [("in", p.weight.detach() * g2) for p in (m.gate_proj, m.up_proj)]
        mats += [("out", a.o_proj.weight.detach()), ("out", m.down_proj.weight.detach())]
    head, emb = model.lm_head, base.embed_tokens
    if head.weight.data_ptr() != emb.weight.data_ptr():
        mats.append(("in", head.weight.detach() * base.norm.weight.detach()))
    gs = cfg.group_size
    gen = torch.Generator().manual_seed(_derive_seed(cfg.seed, "optimize"))
    fixed = [_sample_rows(kind, w, cfg.optimize_rows, gs, gen) for kind, w in mats]
    n = rot0.n
    g0 = rot0.matrix(torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    r = eye.clone()

    def score(r_: torch.Tensor) -> float:
        with torch.no_grad():
            return float(_proxy(fixed, (r_ @ g0 @ r_.T).to(torch.float32), gs))

    best = (score(r), r)
    ctx.history.append((0, best[0]))
    for step in tqdm(range(1, cfg.optimize_steps + 1), desc="optimize rotation", unit="step",
                     disable=not ctx.progress):
        pick = torch.randperm(len(mats), generator=gen)[: cfg.optimize_matrices].tolist()
        batch = [_sample_rows(mats[i][0], mats[i][1], cfg.optimize_rows, gs, gen) for i in pick]
        rg = r.clone().requires_grad_(True)
        g = (rg @ g0 @ rg.T).to(torch.float32)
        _proxy(batch, g, gs).backward()
        grad = rg.grad
        omega = grad @ r.T - r @ grad.T
        norm = float(omega.norm())
        if norm == 0.0:
            break
        omega = omega / norm
        half = cfg.lr / 2
        r = torch.linalg.solve(eye + half * omega, (eye - half * omega) @ r)
        if step % 10 == 0 or step == cfg.optimize_steps:
            s = score(r)
            ctx.history.append((step, s))
            if s < best[0]:
                best = (s, r)
    r = best[1]
    g = r @ g0 @ r.T
    g = (g - g.T) / 2  # exact skew-symmetry; orthogonality holds to float64 rounding
    return Rotation.from_matrix(g, "optimized")


def _sample_rows(kind: str, w: torch.Tensor, rows: int, gs: int, gen: torch.Generator) -> tuple:
    """Rows of the rotated matrix to score, in whole blocks so quantization groups line up.

    "in": (kind, rows of W [k, cols], energy) — rotated as rows @ G.
    "out": (kind, W, row index [k], energy) — rotated rows are G[:, idx]ᵀ @ W.
    """
    n_rows, cols = w.shape
    block = math.lcm(cols, gs) // cols
    n_blocks = max(1, n_rows // block)
    take = min(n_blocks, max(1, rows // block))
    starts = torch.randperm(n_blocks, generator=gen)[:take] * block
    idx = (starts[:, None] + torch.arange(block)[None, :]).reshape(-1).clamp_(max=n_rows - 1)
    w32 = w.to(torch.float32)
    if kind == "in":
        sel = w32[idx]
        return ("in", sel, float(sel.square().sum()))
    energy = float(w32.square().sum()) * idx.numel() / n_rows
    return ("out", w32, idx, energy)


def _proxy(samples: list[tuple], g: torch.Tensor, gs: int) -> torch.Tensor:
    total = g.new_zeros(())
    for s in samples:
        if s[0] == "in":
            y, energy = s[1] @ g, s[2]
        else:
            y, energy = g[:, s[2]].T @ s[1], s[3]
        flat = y.reshape(-1)
        k = flat.numel() // gs * gs
        grp = flat[:k].view(-1, gs)
        rng = grp.amax(1).clamp(min=0) - grp.amin(1).clamp(max=0)
        total = total + gs * rng.square().sum() / 12 / max(energy, 1e-30)
    return total / len(samples)


# =============================================================================================
# the end-to-end check


def _random_ids(model: nn.Module, config: RotationConfig) -> torch.Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(_derive_seed(config.seed, "check"))
    return torch.randint(0, vocab, (config.check_samples, config.check_seq_len), generator=gen)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids.to(next(model.parameters()).device), use_cache=False) \
        if _accepts_cache(model) else model(input_ids=ids.to(next(model.parameters()).device))
    t = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return t.detach().float()


def _accepts_cache(model: nn.Module) -> bool:
    return hasattr(model, "generation_config") or type(model).__name__.endswith("ForCausalLM")


@torch.inference_mode()
def _logit_check(original: nn.Module, rotated: nn.Module, ids: torch.Tensor,
                 reps: int = 2) -> tuple[float, float, dict[str, float]]:
    def timed(m: nn.Module) -> tuple[torch.Tensor, float]:
        best, out = math.inf, None
        for _ in range(reps):
            t0 = time.perf_counter()
            out = _logits(m, ids)
            best = min(best, time.perf_counter() - t0)
        return out, best

    ref, t_ref = timed(original)
    rot, t_rot = timed(rotated)
    fwd = {"original": t_ref, "rotated": t_rot}
    if any(isinstance(m, OnlineRotation) for m in rotated.modules()):
        _set_online_enabled(rotated, False)
        try:
            _, fwd["rotated_online_off"] = timed(rotated)
        finally:
            _set_online_enabled(rotated, True)
    return float((rot - ref).abs().max()), float(ref.abs().max()), fwd


# =============================================================================================
# compressibility report: before / after, per layer


GAUSSIAN_DB_PER_BIT = 20 * math.log10(2)  # 6.02 dB: the rate-distortion slope of a Gaussian source


@dataclasses.dataclass(frozen=True)
class WeightStats:
    """Distribution and quantization error of one weight matrix (RTN, asymmetric groups)."""

    kurtosis: float  # Pearson kurtosis E[(w−μ)⁴]/σ⁴ (3 for a Gaussian; outliers raise it)
    max_over_std: float  # max |w − μ| / σ
    mse: dict[int, float]  # bits -> mean squared error of RTN at that width
    sqnr_db: dict[int, float]  # bits -> 10 log10(‖W‖² / ‖W − Ŵ‖²)

    def gap_db(self, bits: int) -> float:
        """Distance to the Gaussian rate-distortion bound at ``bits`` code bits: 6.02·bits − SQNR."""
        return GAUSSIAN_DB_PER_BIT * bits - self.sqnr_db[bits]

    def to_dict(self) -> dict[str, Any]:
        return {"kurtosis": self.kurtosis, "max_over_std": self.max_over_std,
                "mse": {str(b): v for b, v in self.mse.items()},
                "sqnr_db": {str(b): v for b, v in self.sqnr_db.items()},
                "gap_db": {str(b): self.gap_db(b) for b in self.sqnr_db}}


@dataclasses.dataclass(frozen=True)
class ModuleCompressibility:
    name: str
    block: int | None
    shape: tuple[int, int]
    numel: int
    before: WeightStats
    after: WeightStats


@dataclasses.dataclass(repr=False)  # keep Result's short __repr__
class CompressibilityResult(Result):
    """Per-module compressibility before and after rotation, and a weight histogram."""

    rows: list[ModuleCompressibility]
    bits: tuple[int, ...]
    group_size: int
    histogram_module: str
    histogram_edges: list[float]
    histogram_before: list[int]
    histogram_after: list[int]
    seconds: float

    def pooled_sqnr(self, bits: int, which: str) -> float:
        """SQNR over all modules together: 10 log10(Σ signal / Σ noise), signal from MSE/SQNR."""
        sig = noise = 0.0
        for r in self.rows:
            s = getattr(r, which)
            noise += s.mse[bits] * r.numel
            sig += s.mse[bits] * r.numel * 10 ** (s.sqnr_db[bits] / 10)
        return 10 * math.log10(sig / noise) if noise > 0 else math.inf

    def per_block(self) -> list[dict[str, Any]]:
        """Per transformer block (None: outside the blocks): mean kurtosis and pooled SQNR."""
        groups: dict[int | None, list[ModuleCompressibility]] = {}
        for r in self.rows:
            groups.setdefault(r.block, []).append(r)
        out = []
        for block in sorted(groups, key=lambda b: (b is not None, b if b is not None else -1)):
            rs = groups[block]
            entry: dict[str, Any] = {"block": block, "modules": len(rs)}
            for which in ("before", "after"):
                entry[f"kurtosis_{which}"] = sum(getattr(r, which).kurtosis for r in rs) / len(rs)
                for b in self.bits:
                    noise = sum(getattr(r, which).mse[b] * r.numel for r in rs)
                    sig = sum(getattr(r, which).mse[b] * r.numel * 10 ** (getattr(r, which).sqnr_db[b] / 10)
                              for r in rs)
                    entry[f"sqnr{b}_{which}"] = 10 * math.log10(sig / noise) if noise > 0 else math.inf
            out.append(entry)
        return out

    def summary(self) -> str:
        parts = [f"{len(self.rows)} modules, group {self.group_size}"]
        for b in self.bits:
            before, after = self.pooled_sqnr(b, "before"), self.pooled_sqnr(b, "after")
            parts.append(f"{b}-bit SQNR {before:.2f} → {after:.2f} dB "
                         f"(gap to 6.02 dB/bit {GAUSSIAN_DB_PER_BIT * b - before:.2f} → "
                         f"{GAUSSIAN_DB_PER_BIT * b - after:.2f})")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bits": list(self.bits), "group_size": self.group_size, "seconds": self.seconds,
            "pooled_sqnr_db": {str(b): {"before": self.pooled_sqnr(b, "before"),
                                        "after": self.pooled_sqnr(b, "after")} for b in self.bits},
            "per_block": self.per_block(),
            "modules": [{"name": r.name, "block": r.block, "shape": list(r.shape), "numel": r.numel,
                         "before": r.before.to_dict(), "after": r.after.to_dict()} for r in self.rows],
            "histogram": {"module": self.histogram_module, "edges": self.histogram_edges,
                          "before": self.histogram_before, "after": self.histogram_after},
        }

    def table_rows(self):
        b = 3 if 3 in self.bits else self.bits[0]
        return (("module", "kurtosis before", "after", "max/std before", "after",
                 f"SQNR@{b} before", "after", f"gap@{b} before", "after"),
                [(r.name, r.before.kurtosis, r.after.kurtosis, r.before.max_over_std, r.after.max_over_std,
                  r.before.sqnr_db[b], r.after.sqnr_db[b], r.before.gap_db(b), r.after.gap_db(b))
                 for r in self.rows])

    def histogram_figure(self):
        """Weight histogram of one module before and after rotation (all weights, log counts)."""
        import plotly.graph_objects as go

        e = self.histogram_edges
        mids = [(a + b) / 2 for a, b in zip(e[:-1], e[1:])]
        fig = go.Figure()
        fig.add_bar(x=mids, y=self.histogram_before, name="before", opacity=0.6, uid="comp-hist-before")
        fig.add_bar(x=mids, y=self.histogram_after, name="after", opacity=0.6, uid="comp-hist-after")
        fig.update_layout(barmode="overlay", bargap=0, title=f"weights of {self.histogram_module}",
                          xaxis_title="weight", yaxis_type="log", height=360)
        return fig

    def layer_figure(self):
        """Per block: mean kurtosis and pooled 3-bit SQNR (or the first width), before vs after."""
        from plotly.subplots import make_subplots

        b = 3 if 3 in self.bits else self.bits[0]
        rows = self.per_block()
        x = ["outside" if r["block"] is None else str(r["block"]) for r in rows]
        fig = make_subplots(rows=1, cols=2, subplot_titles=("mean kurtosis", f"SQNR @ {b} bits (dB)"))
        for which, color in (("before", "#9e9e9e"), ("after", "#4c78a8")):
            fig.add_bar(x=x, y=[r[f"kurtosis_{which}"] for r in rows], name=which, marker_color=color,
                        uid=f"comp-kurt-{which}", legendgroup=which, row=1, col=1)
            fig.add_bar(x=x, y=[r[f"sqnr{b}_{which}"] for r in rows], name=which, marker_color=color,
                        uid=f"comp-sqnr-{which}", legendgroup=which, showlegend=False, row=1, col=2)
        fig.update_yaxes(type="log", row=1, col=1)
        fig.update_xaxes(title="block")
        fig.update_layout(barmode="group", height=380, title=self.summary()[:120])
        return fig

    def figure(self):
        return self.layer_figure()


def _weight_of(module: nn.Module) -> torch.Tensor:
    from .runtime import linear_weight

    if isinstance(module, nn.Embedding):
        return module.weight.detach()
    return linear_weight(module)[0]


def _weight_stats(w: torch.Tensor, bits: tuple[int, ...], group_size: int) -> WeightStats:
    from .formats import QuantFormat
    from .quant import quant_error, quantize

    x = w.detach().to(torch.float64).reshape(-1)
    mu = x.mean()
    c = x - mu
    var = float(c.square().mean())
    kurt = float(c.pow(4).mean()) / var**2 if var > 0 else math.nan
    mos = float(c.abs().max()) / math.sqrt(var) if var > 0 else math.nan
    mse, sqnr = {}, {}
    w32 = w.detach().to(torch.float32)
    for b in bits:
        err = quant_error(w32, quantize(w32, QuantFormat(bits=b, group_size=group_size)))
        mse[b], sqnr[b] = err["mse"], err["sqnr_db"]
    return WeightStats(kurt, mos, mse, sqnr)


def compressibility_report(before: nn.Module, after: nn.Module, *, modules: Iterable[str] | None = None,
                           bits: tuple[int, ...] = (2, 3, 4), group_size: int = 128,
                           histogram_module: str | None = None, bins: int = 120,
                           progress: bool = True) -> CompressibilityResult:
    """Compare the weights of ``before`` and ``after`` (e.g. ``rotate_model(m).model``) module by module.

    ``modules`` defaults to every Linear/Conv1D/Embedding that owns its weight in ``before`` (a
    tied head is counted once, at the embedding). Quantization is ``uqcit.quant.quantize`` at
    each width with asymmetric groups of ``group_size`` (use the plan's); the gap to the
    Gaussian bound counts code bits only (the fp16 scale/zero overhead is not in ``bits``).
    """
    from tqdm.auto import tqdm
    from transformers.pytorch_utils import Conv1D

    from .levels import block_of

    t0 = time.perf_counter()
    named_b, named_a = dict(before.named_modules()), dict(after.named_modules())
    if modules is None:
        seen: set[int] = set()
        modules = []
        for name, mod in before.named_modules():
            if isinstance(mod, (nn.Linear, nn.Embedding, Conv1D)) and mod.weight.data_ptr() not in seen:
                seen.add(mod.weight.data_ptr())
                modules.append(name)
    modules = list(modules)
    missing = [m for m in modules if m not in named_b or m not in named_a]
    if missing:
        raise ValueError(f"modules not in both models: {missing[:5]}")
    rows = []
    for name in tqdm(modules, desc="compressibility", unit="module", disable=not progress):
        wb, wa = _weight_of(named_b[name]), _weight_of(named_a[name])
        rows.append(ModuleCompressibility(name, block_of(name), tuple(wb.shape), wb.numel(),
                                          _weight_stats(wb, bits, group_size), _weight_stats(wa, bits, group_size)))
    if histogram_module is None:
        histogram_module = max(rows, key=lambda r: r.before.kurtosis).name if rows else ""
    edges, hb, ha = [], [], []
    if histogram_module:
        xb = _weight_of(named_b[histogram_module]).float().reshape(-1)
        xa = _weight_of(named_a[histogram_module]).float().reshape(-1)
        lo = float(torch.minimum(xb.min(), xa.min()))
        hi = float(torch.maximum(xb.max(), xa.max()))
        hi = hi if hi > lo else lo + 1.0
        hb = torch.histc(xb, bins=bins, min=lo, max=hi).long().tolist()
        ha = torch.histc(xa, bins=bins, min=lo, max=hi).long().tolist()
        edges = torch.linspace(lo, hi, bins + 1).tolist()
    return CompressibilityResult(rows, tuple(bits), group_size, histogram_module, edges, hb, ha,
                                 time.perf_counter() - t0)
