"""Measured invariants of a complex structure G and of the weight blocks it rotates.

A complex structure must satisfy G + G⁻¹ = 0, GᵀG = I, G² = −I, Gᵀ = −G, det G = 1 and
G = P J Pᵀ; rotating a square weight block A must keep its trace, the spectrum of its symmetric
part and its singular values. ``structure_checks`` / ``block_checks`` measure each in float64
against a tolerance; ``InvariantReport`` collects them for a rotation result.

>>> from uqcit.tensor.structures import Rotation
>>> all(c.passed for c in structure_checks(Rotation.hadamard(24, seed=0).matrix(), "G"))
True
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from uqcit.tensor.structures import complex_structure, symplectic_basis


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
