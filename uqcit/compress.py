"""Apply a bit plan: quantize each planned module and swap in a module that runs from its codes.

The caller's model is never modified: ``quantize_model`` works on a deep copy.
Tied weights (an LM head tied to the embedding) are quantized once and the two
modules share the same packed tensors, so they are stored and counted once.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Literal

import torch

from .config import StageConfig, register_config
from .formats import QuantFormat
from .plan import LEVEL_COLORS, BitPlan
from .quant import QuantizedTensor, quant_error, quantize
from .results import Result
from .runtime import QuantEmbedding, QuantLinear, linear_weight, replace_module


@register_config
@dataclasses.dataclass(frozen=True)
class QuantizeConfig(StageConfig):
    """How planned modules are quantized."""

    type_tag = "quantize"

    method: Literal["rtn"] = "rtn"  # round-to-nearest; error-feedback rounding comes with the allocator
    importance: Literal["magnitude"] = "magnitude"  # which weights a mixed format keeps high


@dataclasses.dataclass(frozen=True)
class ModuleQuant:
    """What quantizing one module stored and cost."""

    name: str
    level: int
    kind: str
    shape: tuple[int, int]
    numel: int
    format: str
    stored_bits: int
    rel_error: float  # ‖W − Ŵ‖ / ‖W‖
    sqnr_db: float
    seconds: float
    tied_to: str | None = None

    @property
    def bpw(self) -> float:
        return self.stored_bits / self.numel


@dataclasses.dataclass
class QuantizeResult(Result):
    """The compressed model and, per module, the bits it stores and the error it made."""

    model: torch.nn.Module
    modules: list[ModuleQuant]
    plan: BitPlan
    seconds: float

    @property
    def stored(self) -> list[ModuleQuant]:
        """Modules whose bits are stored (tied duplicates excluded)."""
        return [m for m in self.modules if m.tied_to is None]

    @property
    def weight_count(self) -> int:
        return sum(m.numel for m in self.stored)

    @property
    def stored_bits(self) -> int:
        return sum(m.stored_bits for m in self.stored)

    @property
    def bpw(self) -> float:
        return self.stored_bits / max(self.weight_count, 1)

    def summary(self) -> str:
        return (f"{self.plan.name}: {len(self.stored)} modules quantized, {self.bpw:.3f} bits/weight "
                f"stored, {self.stored_bits / 8 / 2**20:.2f} MiB of codes, {self.seconds:.1f} s")

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(),
            "bpw": self.bpw,
            "stored_bits": self.stored_bits,
            "weight_count": self.weight_count,
            "seconds": self.seconds,
            "modules": [dataclasses.asdict(m) for m in self.modules],
        }

    def table_rows(self):
        return (("module", "level", "format", "bits/weight", "rel. error", "SQNR dB"),
                [(m.name, m.level, m.format, m.bpw, m.rel_error, m.sqnr_db) for m in self.stored])

    def figure(self):
        """Relative quantization error per module, coloured by level."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for lvl in sorted({m.level for m in self.stored}):
            ms = [m for m in self.stored if m.level == lvl]
            fig.add_bar(x=[m.name for m in ms], y=[m.rel_error for m in ms], name=f"L{lvl}",
                        marker_color=LEVEL_COLORS.get(lvl), uid=f"quant-L{lvl}",
                        hovertext=[f"{m.name}<br>{m.format}<br>{m.bpw:.3f} bits/weight" for m in ms],
                        hoverinfo="text+y")
        fig.update_layout(title=f"Relative weight error ‖W−Ŵ‖/‖W‖ — {self.bpw:.3f} bits/weight",
                          xaxis_showticklabels=False, yaxis_title="relative error", height=380)
        return fig


def quantize_model(model: torch.nn.Module, levels, plan: BitPlan,
                   config: QuantizeConfig = QuantizeConfig(), *, progress: bool = True) -> QuantizeResult:
    """Quantize a copy of ``model`` per ``plan``; modules the plan leaves at ``None`` stay float.

    ``levels`` is the ``LevelsResult`` of ``model`` (it names the weight-bearing modules).
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    out = copy.deepcopy(model)
    out.eval()
    named = dict(out.named_modules())
    records: list[ModuleQuant] = []
    qtensors: dict[str, QuantizedTensor] = {}
    entries = [m for m in levels.modules if m.tied_to is None]
    for entry in tqdm(entries, desc="quantize", unit="module", disable=not progress):
        fmt = plan.format_for(entry.name)
        if fmt is None:
            continue
        module = named[entry.name]
        t0 = time.perf_counter()
        q, new = _quantize_module(module, fmt)
        replace_module(out, entry.name, new)
        qtensors[entry.name] = q
        err = quant_error(_matrix(module), q)
        records.append(ModuleQuant(entry.name, entry.level, entry.kind, tuple(q.shape), q.numel,
                                   fmt.name, q.stored_bits, err["rel_fro"],
                                   err["sqnr_db"], time.perf_counter() - t0))
    for entry in levels.modules:
        if entry.tied_to is None or entry.tied_to not in qtensors:
            continue
        module = named[entry.name]
        q = qtensors[entry.tied_to]
        bias = getattr(module, "bias", None)
        replace_module(out, entry.name, QuantLinear(q, None if bias is None else bias.detach().clone()))
        records.append(ModuleQuant(entry.name, entry.level, entry.kind, tuple(q.shape), q.numel,
                                   q.fmt.name, 0, 0.0, float("inf"), 0.0, tied_to=entry.tied_to))
    return QuantizeResult(out, records, plan, time.perf_counter() - t_start)


def _matrix(module: torch.nn.Module) -> torch.Tensor:
    if isinstance(module, torch.nn.Embedding):
        return module.weight.detach()
    return linear_weight(module)[0]


def _quantize_module(module: torch.nn.Module, fmt: QuantFormat) -> tuple[QuantizedTensor, torch.nn.Module]:
    if isinstance(module, torch.nn.Embedding):
        q = quantize(module.weight.detach(), fmt)
        return q, QuantEmbedding(q, padding_idx=module.padding_idx)
    weight, bias = linear_weight(module)
    q = quantize(weight, fmt)
    return q, QuantLinear(q, None if bias is None else bias.detach().clone())
