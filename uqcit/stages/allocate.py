"""Bit allocation: per-module formats that minimize measured sensitivity under a bit budget.

Given a target average of bits per weight, every stored bit counted (``QuantFormat.bits_for``:
codes, scales, zeros, masks, high-precision values; a tied weight once, at its owner), choose
one format per module from the measured candidates so that the sum of the measured KLs
(``uqcit.stages.sensitivity``) is smallest. Summing per-module KLs is the usual additive approximation
of mixed-precision allocators: the predicted KL is that sum, not a measurement of the whole plan.

The solver is a multiple-choice knapsack solved by dynamic programming over a bit grid:

- bits above each module's cheapest candidate are counted in units of ``u`` bits, **rounded
  up**, so any plan the grid accepts really fits the budget: the achieved average never
  exceeds the target;
- ``u = ceil(resolution_bpw × weights / free modules)``, so the rounding costs at most
  ``resolution_bpw`` (0.005 by default) of budget in total: the plan's predicted KL is no
  worse than the exact optimum at ``target - resolution_bpw``. The grid does not depend on the
  target, so a larger budget never predicts a larger KL;
- candidates that cost more bits than another candidate of the same module without a lower
  KL are dropped first (they can never help).

Where the candidates allow it, the achieved average lands within ``resolution_bpw`` plus the
finest format step of the target (tested against 0.02 bpw); it stays lower only when no
upgrade that fits would lower the predicted KL.

Mixed formats (e.g. ``"w2-g128+w16@0.1"``: a top 10% of weights in fp16) are candidates like any
other, so the high-precision fraction inside a layer is chosen by the same solver, as long as
it was measured. ``pins`` fix modules to a format (measured or not) and the rest is re-solved;
with ``budget_over="free"`` the target averages over the modules left free only (the peers'
accounting: ``pins={"kind:embedding": "fp16"}`` and the budget spent on the block linears).

>>> from uqcit.inputs.tiny import tiny_model
>>> from uqcit.stages.levels import analyze_levels
>>> from uqcit.stages.sensitivity import SensitivityConfig, measure_sensitivity
>>> model, tok = tiny_model("llama")
>>> levels = analyze_levels(model)
>>> sens = measure_sensitivity(model, tok, levels, SensitivityConfig(
...     formats=("w2", "w4", "w8"), group_size=32, calib_samples=2, calib_seq_len=32), progress=False)
>>> res = allocate(levels, sens, AllocateConfig(target_bpw=4.0))
>>> res.achieved_bpw <= 4.0, res.plan.name
(True, 'alloc-4')
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Mapping

import numpy as np

from uqcit.core.config import ConfigError, StageConfig, StageSession, register_config, stage_handler
from uqcit.tensor.formats import FLOAT_BITS, QuantFormat, parse_format
from uqcit.stages.plan import LEVEL_COLORS, BitPlan
from uqcit.core.results import Result

FLOAT = "float"  # a pin that keeps a module unquantized (stored as fp16, as PlanSummary counts it)
_MAX_CELLS = 150_000_000  # DP grid cells (modules × budget units) before the grid is coarsened


@register_config
@dataclasses.dataclass(frozen=True)
class AllocateConfig(StageConfig):
    """Target bits and constraints of the allocation."""

    type_tag = "allocate"

    target_bpw: float = 3.25  # average stored bits per weight over the quantizable modules, all overhead counted
    # module, "re:<pattern>" or "kind:<kind>" (e.g. "kind:embedding") -> format name or "float"
    pins: Mapping[str, str] = dataclasses.field(default_factory=dict)
    formats: tuple[str, ...] | None = None  # candidates allowed (measured names); None: every measured format
    resolution_bpw: float = 0.005  # budget the bit grid may lose to rounding, in bits/weight (<< 0.02)
    # formats nobody measured, offered too: each module's KL placed on its measured KL-vs-error curve
    # (uqcit.stages.sensitivity_fit), e.g. ("w3-g48-iz-s6", "w4-g64-nl"); the stage widens the table
    predict: tuple[str, ...] = ()
    # what target_bpw averages over: "all" quantizable weights, pins included, or only the "free" ones
    # (the peers' accounting: the tied embedding/head pinned at fp16 and the budget spent on the blocks)
    budget_over: str = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(self.target_bpw > 0, "target_bpw", "must be positive")
        self.check(self.resolution_bpw > 0, "resolution_bpw", "must be positive")
        self.check(self.budget_over in ("all", "free"), "budget_over", "must be 'all' or 'free'")
        self.check(self.formats is None or len(self.formats) > 0, "formats",
                   "is empty: allow at least one measured format (None: all)")
        for name in self.predict:
            try:
                parse_format(name)
            except ValueError as exc:
                raise ConfigError(f"AllocateConfig.predict: {exc}") from None
        for key, value in self.pins.items():
            if value != FLOAT:
                try:
                    parse_format(value)
                except ValueError as exc:
                    raise ConfigError(f"AllocateConfig.pins: pin {key!r}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class AllocationRow:
    """One module's choice."""

    module: str
    level: int
    block: int | None
    numel: int
    format: str  # format name, or "float"
    bits: int  # exact stored bits
    kl: float | None  # measured KL of this choice (None: a pin nobody measured)
    pinned: bool

    @property
    def bpw(self) -> float:
        return self.bits / self.numel


@dataclasses.dataclass(repr=False)
class AllocationResult(Result):
    """The allocator's plan and what it predicts: bits (exact) and KL (sum of measured)."""

    plan: BitPlan
    rows: list[AllocationRow]
    target_bpw: float
    resolution_bpw: float  # the grid's actual rounding allowance (coarser than asked only for huge grids)
    formats: list[str]  # candidates the solver could choose from
    seconds: float
    budget_over: str = "all"  # "free": target_bpw and achieved_bpw count the modules that were not pinned

    @property
    def counted(self) -> list[AllocationRow]:
        """The rows the budget averages over."""
        return [r for r in self.rows if not (self.budget_over == "free" and r.pinned)]

    @property
    def weight_count(self) -> int:
        return sum(r.numel for r in self.rows)

    @property
    def total_bits(self) -> int:
        return sum(r.bits for r in self.rows)

    @property
    def achieved_bpw(self) -> float:
        """Stored bits per weight over the modules the budget counts (``budget_over``)."""
        rows = self.counted
        return sum(r.bits for r in rows) / max(sum(r.numel for r in rows), 1)

    @property
    def predicted_kl(self) -> float:
        """Sum of the measured KLs of the chosen formats (unmeasured pins count 0; see ``unmeasured``)."""
        return sum(r.kl for r in self.rows if r.kl is not None)

    @property
    def unmeasured(self) -> list[str]:
        """Pinned modules whose pinned format has no measurement (left out of ``predicted_kl``)."""
        return [r.module for r in self.rows if r.kl is None]

    @property
    def predicted_bytes(self) -> int:
        """Bytes of the stored quantized weights (each module rounded up to whole bytes)."""
        return sum(-(-r.bits // 8) for r in self.rows)

    @property
    def choices(self) -> dict[str, str]:
        return {r.module: r.format for r in self.rows}

    def format_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.format] = out.get(r.format, 0) + 1
        return out

    def summary(self) -> str:
        text = (f"{self.plan.name}: {self.achieved_bpw:.4f} bits/weight (target {self.target_bpw:g}), "
                f"predicted KL {self.predicted_kl:.4g} (sum of measured), "
                f"{self.predicted_bytes / 2**20:.2f} MiB; "
                + ", ".join(f"{n}× {f}" for f, n in sorted(self.format_counts().items())))
        if self.unmeasured:
            text += f"; {len(self.unmeasured)} pinned module(s) without a measurement"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(), "target_bpw": self.target_bpw, "achieved_bpw": self.achieved_bpw,
            "total_bits": self.total_bits, "weight_count": self.weight_count,
            "predicted_kl": self.predicted_kl, "predicted_bytes": self.predicted_bytes,
            "resolution_bpw": self.resolution_bpw, "formats": self.formats, "seconds": self.seconds,
            "budget_over": self.budget_over,
            "unmeasured_pins": self.unmeasured,
            "modules": [dataclasses.asdict(r) for r in self.rows],
        }

    def table_rows(self):
        return (("module", "level", "format", "bits/weight", "KL", "pinned"),
                [(r.module, r.level, r.format, r.bpw, r.kl, r.pinned) for r in self.rows])

    def figure(self):
        """Bits/weight per module (model order), coloured by level; pins outlined."""
        import plotly.graph_objects as go

        fig = go.Figure()
        index = {r.module: i for i, r in enumerate(self.rows)}
        for lvl in sorted({r.level for r in self.rows}):
            rows = [r for r in self.rows if r.level == lvl]
            fig.add_bar(
                uid=f"alloc-L{lvl}", name=f"L{lvl}", x=[index[r.module] for r in rows], y=[r.bpw for r in rows],
                marker=dict(color=LEVEL_COLORS.get(lvl),
                            line=dict(color="black", width=[2 if r.pinned else 0 for r in rows])),
                hovertext=[f"{r.module}<br>{r.format}{' (pinned)' if r.pinned else ''}<br>{r.bpw:.3f} bits/weight"
                           f"<br>KL {'not measured' if r.kl is None else f'{r.kl:.3e}'}" for r in rows],
                hoverinfo="text")
        fig.add_hline(y=self.target_bpw, line_dash="dash", annotation_text=f"target {self.target_bpw:g}")
        fig.update_layout(
            title=(f"{self.plan.name}: {self.achieved_bpw:.3f} bits/weight, predicted KL {self.predicted_kl:.3g} "
                   f"nats/token (sum of measured), {self.predicted_bytes / 2**20:.2f} MiB"),
            xaxis_title="module (model order)", yaxis_title="bits/weight", barmode="overlay",
            bargap=0.1, height=400, template="plotly_white")
        return fig


def allocate(levels, sensitivity, config: AllocateConfig = AllocateConfig()) -> AllocationResult:
    """Choose a format per quantizable module: least summed measured KL within ``target_bpw``.

    ``levels`` names the modules (tied copies follow their owner); ``sensitivity`` is a
    ``SensitivityResult`` covering every module that is not pinned. Raises ``ValueError`` when
    the target is below the cheapest plan the candidates and pins allow, or when a free module
    has no measurement.
    """
    t0 = time.perf_counter()
    owners = levels.quantizable()
    if not owners:
        raise ValueError("levels has no quantizable module")
    allowed = _allowed_formats(sensitivity, config.formats)
    pins = _expand_pins(levels, config.pins)

    fixed_rows: dict[str, AllocationRow] = {}
    free: list[tuple[Any, list[tuple[str, int, float]]]] = []  # (entry, [(format, bits, kl)])
    for e in owners:
        if e.name in pins:
            fmt = pins[e.name]
            bits = FLOAT_BITS * e.numel if fmt is None else fmt.bits_for(e.numel)
            name = FLOAT if fmt is None else fmt.name
            kl = sensitivity.value(e.name, name)
            fixed_rows[e.name] = AllocationRow(e.name, e.level, e.block, e.numel, name, bits, kl, True)
            continue
        if e.name not in sensitivity.modules:
            raise ValueError(f"module {e.name!r} has no sensitivity measurement: measure it, or pin it "
                             "(AllocateConfig(pins={...}))")
        if e.numel != sensitivity.numel_of(e.name):
            raise ValueError(f"module {e.name!r} has {e.numel} weights but was measured with "
                             f"{sensitivity.numel_of(e.name)}: a measurement of another model?")
        cands = [(f, parse_format(f).bits_for(e.numel), sensitivity.value(e.name, f)) for f in allowed]
        cands = [c for c in cands if c[2] is not None]
        if not cands:
            raise ValueError(f"module {e.name!r} has no measured candidate among {allowed}; resume the "
                             "sensitivity measurement, or pin the module")
        free.append((e, cands))

    if config.budget_over == "free":  # the pins are outside the budget
        weights = sum(e.numel for e, _ in free)
        fixed_bits = 0
        if not free:
            raise ValueError("budget_over='free' but every module is pinned: nothing to allocate")
    else:
        weights = sum(e.numel for e in owners)
        fixed_bits = sum(r.bits for r in fixed_rows.values())
    budget = math.floor(config.target_bpw * weights)
    cheapest = fixed_bits + sum(min(b for _, b, _ in c) for _, c in free)
    if cheapest > budget:
        raise ValueError(f"target_bpw {config.target_bpw:g} is below the cheapest plan these candidates "
                         f"and pins allow: {cheapest / weights:.4f} bits/weight")
    choice, resolution = _solve([c for _, c in free], budget - fixed_bits, weights, config.resolution_bpw)
    rows = []
    free_rows = {e.name: AllocationRow(e.name, e.level, e.block, e.numel, *cands[k], False)
                 for (e, cands), k in zip(free, choice)}
    for e in owners:
        rows.append(fixed_rows.get(e.name) or free_rows[e.name])

    exact: dict[str, QuantFormat | None] = {}
    for r in rows:
        exact[r.module] = None if r.format == FLOAT else parse_format(r.format)
    for m in levels.modules:  # tied copies follow the weight they share
        if m.tied_to is not None and m.tied_to in exact:
            exact[m.name] = exact[m.tied_to]
    plan = BitPlan(default=None, exact=exact, name=f"alloc-{config.target_bpw:g}")
    return AllocationResult(plan=plan, rows=rows, target_bpw=config.target_bpw, resolution_bpw=resolution,
                            formats=allowed, seconds=time.perf_counter() - t0, budget_over=config.budget_over)


def _allowed_formats(sensitivity, formats: tuple[str, ...] | None) -> list[str]:
    if formats is None:
        return list(sensitivity.formats)
    unknown = [f for f in formats if f not in sensitivity.formats]
    if unknown:
        raise ValueError(f"formats {unknown} were not measured; measured formats: {sensitivity.formats}")
    return list(formats)


def _expand_pins(levels, pins: dict[str, str]) -> dict[str, QuantFormat | None]:
    """Pins by exact module name, then ``re:`` patterns (fullmatch), as ``build_plan`` reads overrides."""
    out: dict[str, QuantFormat | None] = {}
    owned = {e.name for e in levels.quantizable()}
    tied = {m.name: m.tied_to for m in levels.modules if m.tied_to is not None}
    for key, value in pins.items():
        try:
            fmt = None if value == FLOAT else parse_format(value)
        except ValueError as exc:
            raise ValueError(f"pin {key!r}: {exc}") from None
        if key.startswith("re:"):
            hits = [n for n in owned if re.fullmatch(key[3:], n)]
            if not hits:
                raise ValueError(f"pin {key!r} matches no quantizable module")
        elif key.startswith("kind:"):  # e.g. "kind:embedding", as plan overrides name a kind
            hits = [e.name for e in levels.quantizable() if e.kind == key[5:]]
            if not hits:
                raise ValueError(f"pin {key!r}: no quantizable module of kind {key[5:]!r}")
        elif key in tied:
            raise ValueError(f"pin {key!r}: its weight is tied to {tied[key]!r}; pin that module instead")
        elif key in owned:
            hits = [key]
        else:
            raise ValueError(f"pin {key!r} names no quantizable module of the model")
        for h in hits:
            out[h] = fmt
    return out


def _solve(candidates: list[list[tuple[str, int, float]]], budget: int, weights: int,
           resolution_bpw: float) -> tuple[list[int], float]:
    """Multiple-choice knapsack: one candidate per module, Σ bits ≤ budget, least Σ kl.

    Returns the chosen index per module and the resolution (bpw) the grid actually had.
    """
    n = len(candidates)
    if n == 0:
        return [], 0.0
    base = [min(b for _, b, _ in c) for c in candidates]
    spare = budget - sum(base)  # >= 0: the caller checked that the cheapest plan fits
    # Keep only candidates on each module's Pareto front: more bits must buy a lower KL.
    fronts: list[list[int]] = []
    for c in candidates:
        order = sorted(range(len(c)), key=lambda k: (c[k][1], c[k][2]))
        keep, best = [], math.inf
        for k in order:
            if c[k][2] < best:
                keep.append(k)
                best = c[k][2]
        fronts.append(keep)
    unit = max(1, math.ceil(resolution_bpw * weights / n))
    cost = [[math.ceil((candidates[i][k][1] - base[i]) / unit) for k in fronts[i]] for i in range(n)]
    states = min(spare // unit, sum(max(c) for c in cost))
    if (states + 1) * n > _MAX_CELLS:  # an enormous spare budget: coarsen the grid, and say so
        unit = math.ceil(spare * n / _MAX_CELLS) + 1
        cost = [[math.ceil((candidates[i][k][1] - base[i]) / unit) for k in fronts[i]] for i in range(n)]
        states = min(spare // unit, sum(max(c) for c in cost))
    states = int(states)

    # dp[s]: least Σ kl of the modules so far using at most s units; pick[i, s]: the choice made.
    dp = np.zeros(states + 1, dtype=np.float64)
    pick = np.zeros((n, states + 1), dtype=np.int16)
    for i in range(n):
        options = np.full((len(cost[i]), states + 1), np.inf)
        for slot, (k, c) in enumerate(zip(fronts[i], cost[i])):
            if c <= states:
                np.add(dp[: states + 1 - c], candidates[i][k][2], out=options[slot, c:])
        arg = options.argmin(axis=0)  # first minimum: ties keep the cheaper candidate
        dp = options[arg, np.arange(states + 1)]
        pick[i] = arg
    s = states
    choice = [0] * n
    for i in range(n - 1, -1, -1):
        slot = int(pick[i, s])
        choice[i] = fronts[i][slot]
        s -= cost[i][slot]
    return choice, n * unit / weights


# --------------------------------------------------------------------------- pipeline stage

@stage_handler(AllocateConfig)
def _allocate_stage(session: StageSession, cfg: AllocateConfig) -> AllocationResult:
    levels = session.require("levels")
    sensitivity = session.require("sensitivity")
    if cfg.predict:  # the measured table widened by the predicted formats (no forward pass per cell)
        from uqcit.stages.sensitivity_fit import widen_sensitivity

        sensitivity, _ = widen_sensitivity(session.working, session.tokenizer, levels, sensitivity, cfg.predict,
                                           progress=session.progress)
    result = allocate(levels, sensitivity, cfg)
    session.plan = result.plan  # a following "quantize" stage uses it
    return result
