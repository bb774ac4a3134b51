"""Binary-concentration check (seed 002 §4.1, test 1): the precision distribution read back from
an exported package, per level, against the plan it was built from and the document's patterns.

The package side is read from what is stored, not from the plan: the package is loaded (its
manifest and headers checked), each quantized module's 1-bit mask is counted (popcount) for the
weights kept at high precision, and the rest are at the low format's bits; float modules count
at 32 bits. The plan side is what the plan's formats ask for over the same modules.

>>> from uqcit.inputs.tiny import tiny_model
>>> from uqcit.stages.levels import analyze_levels
>>> from uqcit.stages.plan import PlanConfig, build_plan
>>> levels = analyze_levels(tiny_model("llama")[0])
>>> {k: round(v, 3) for k, v in plan_distribution(levels, build_plan(levels, PlanConfig(group_size=32)))[3].items()}
{'fp16': 0.1, 'int2': 0.9}
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from uqcit.core.results import Result
from uqcit.stages.plan import SEED_LEVEL_PATTERNS, SEED_PATTERNS, pattern_format
from uqcit.tensor.formats import FLOAT_BITS, QuantFormat

Distribution = dict[int, dict[str, float]]  # level -> precision label -> fraction of the level's weights


def _label(bits: int) -> str:
    return {FLOAT_BITS: "fp16", 32: "float32"}.get(bits, f"int{bits}")


def _add(counts: dict[int, dict[str, int]], level: int, bits: int, n: int) -> None:
    if n:
        row = counts.setdefault(level, {})
        row[_label(bits)] = row.get(_label(bits), 0) + n


def _fractions(counts: dict[int, dict[str, int]]) -> Distribution:
    out = {}
    for level, row in sorted(counts.items()):
        total = sum(row.values())
        out[level] = {k: v / total for k, v in sorted(row.items())}
    return out


def _format_counts(counts, level: int, fmt: QuantFormat | None, numel: int, n_high: int | None = None) -> None:
    if fmt is None:
        _add(counts, level, 32, numel)
        return
    high = fmt.high_count(numel) if n_high is None else n_high
    _add(counts, level, fmt.high_bits, high) if fmt.mixed else None
    _add(counts, level, fmt.bits, numel - high)


def plan_distribution(levels, plan) -> Distribution:
    """What ``plan`` asks for, per level (tied modules counted once, with their owner)."""
    counts: dict[int, dict[str, int]] = {}
    for m in levels.modules:
        if m.tied_to is None:
            _format_counts(counts, m.level, plan.format_for(m.name), m.numel)
    return _fractions(counts)


def _popcount(mask: torch.Tensor) -> int:
    bits = torch.stack([(mask >> i) & 1 for i in range(8)])
    return int(bits.sum())


def package_distribution(path, levels, *, verify: bool = True) -> Distribution:
    """What the package at ``path`` stores, per level of ``levels`` (the source model's analysis),
    read from its loaded modules: mask popcounts of quantized ones, float modules at 32 bits."""
    from uqcit.package import load_package
    from uqcit.runtime.modules import QuantEmbedding, QuantLinear

    pkg = load_package(path, progress=False, verify=verify)
    index: Mapping[str, Any] = pkg.metadata["modules"]
    counts: dict[int, dict[str, int]] = {}
    for m in levels.modules:
        if m.tied_to is not None:
            continue
        module = pkg.model.get_submodule(m.name)
        level = index.get(m.name, {}).get("level", m.level)  # the level the package recorded, if any
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            q = module.qtensor
            n_high = _popcount(q.tensors["mask"]) if q.fmt.mixed else 0
            _format_counts(counts, level, q.fmt, q.numel, n_high)
        else:  # left in float by the plan
            _add(counts, level, 32, module.weight.numel())
    return _fractions(counts)


def document_distribution(levels: list[int]) -> Distribution:
    """The seed's patterns per level (10-90 at Level 3, 30-70 at 2 and 4, 46-54 at 1 and 5)."""
    out = {}
    for level in levels:
        fmt = pattern_format(SEED_LEVEL_PATTERNS[level])
        frac = SEED_PATTERNS[SEED_LEVEL_PATTERNS[level]][1]
        out[level] = {_label(fmt.high_bits): frac, _label(fmt.bits): 1 - frac}
    return out


def max_abs_diff(a: Distribution, b: Distribution) -> float:
    """Largest difference of any level's fraction at any precision (absent counts as 0)."""
    diffs = [abs(a.get(lv, {}).get(k, 0.0) - b.get(lv, {}).get(k, 0.0))
             for lv in set(a) | set(b) for k in set(a.get(lv, {})) | set(b.get(lv, {}))]
    return max(diffs, default=0.0)


@dataclasses.dataclass(repr=False)
class ConcentrationResult(Result):
    """Per-level precision fractions: in the package, in its plan, in the document."""

    package: Distribution
    plan: Distribution
    document: Distribution

    @property
    def vs_plan(self) -> float:
        return max_abs_diff(self.package, self.plan)

    @property
    def vs_document(self) -> float:
        return max_abs_diff(self.package, self.document)

    def summary(self) -> str:
        return (f"binary concentration: package vs plan max |diff| {self.vs_plan:.2e}, "
                f"vs the document's patterns {self.vs_document:.3f}")

    def to_dict(self) -> dict[str, Any]:
        key = lambda d: {f"L{lv}": row for lv, row in d.items()}  # noqa: E731
        return {"package": key(self.package), "plan": key(self.plan), "document": key(self.document),
                "max_abs_diff_vs_plan": self.vs_plan, "max_abs_diff_vs_document": self.vs_document}

    def table_rows(self):
        rows = [(f"L{lv}", k, v, self.plan.get(lv, {}).get(k, 0.0), self.document.get(lv, {}).get(k, 0.0))
                for lv, row in self.package.items() for k, v in row.items()]
        return ("level", "precision", "package", "plan", "document"), rows

    def figure(self):
        """Stacked bars per level: package, plan and document side by side."""
        import plotly.graph_objects as go

        labels = sorted({k for d in (self.package, self.plan, self.document) for r in d.values() for k in r})
        x = [[f"L{lv}" for lv in self.package for _ in range(3)],
             [s for _ in self.package for s in ("package", "plan", "document")]]
        fig = go.Figure()
        for k in labels:
            fig.add_bar(x=x, y=[d.get(lv, {}).get(k, 0.0) for lv in self.package
                                for d in (self.package, self.plan, self.document)], name=k)
        fig.update_layout(barmode="stack", title=self.summary(), height=340, yaxis_title="fraction of weights")
        return fig


def check_concentration(path, levels, plan, *, verify: bool = True) -> ConcentrationResult:
    """Read the package at ``path`` back and compare it with ``plan`` (over ``levels``) and the document."""
    package = package_distribution(path, levels, verify=verify)
    return ConcentrationResult(package=package, plan=plan_distribution(levels, plan),
                               document=document_distribution(sorted(package)))
