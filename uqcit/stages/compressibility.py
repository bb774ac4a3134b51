"""Compressibility of weights before and after a rotation: distribution shape and RTN error.

Per module: Pearson kurtosis, max/std ratio, and the MSE and SQNR of ``uqcit.tensor.quant.quantize``
at each bit width (asymmetric groups of the plan's size), with the gap to the Gaussian
rate-distortion bound (6.02 dB per bit: gap = 6.02·bits − SQNR, code bits only).

>>> from uqcit.inputs.tiny import tiny_model
>>> from uqcit.stages.rotation import rotate_model
>>> m = tiny_model("llama")[0]
>>> rep = compressibility_report(m, rotate_model(m, progress=False).model, group_size=32, progress=False)
>>> len(rep.rows)
29
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Iterable

import torch
from torch import nn

from uqcit.core.names import block_of
from uqcit.core.results import Result

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
    from uqcit.runtime.modules import linear_weight

    if isinstance(module, nn.Embedding):
        return module.weight.detach()
    return linear_weight(module)[0]


def _weight_stats(w: torch.Tensor, bits: tuple[int, ...], group_size: int) -> WeightStats:
    from uqcit.tensor.formats import QuantFormat
    from uqcit.tensor.quant import quant_error, quantize

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
    tied head is counted once, at the embedding). Quantization is ``uqcit.tensor.quant.quantize`` at
    each width with asymmetric groups of ``group_size`` (use the plan's); the gap to the
    Gaussian bound counts code bits only (the fp16 scale/zero overhead is not in ``bits``).
    """
    from tqdm.auto import tqdm
    from transformers.pytorch_utils import Conv1D

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
