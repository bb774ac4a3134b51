"""Per-module bit plans: which storage format each weight gets.

A ``BitPlan`` resolves a module name to a ``QuantFormat`` (or ``None``: keep the
module in float) by exact name first, then ``re:`` patterns in order, then a
default. Plans are immutable; ``with_format`` returns an edited copy. The seed's
binary-concentration presets (002 §2.2.2.2) are built from a levels analysis.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Literal, Mapping

from uqcit.core.config import ConfigError, StageConfig, StageSession, register_config, stage_handler
from uqcit.core.keys import check_keys
from uqcit.core.names import LEVEL_COLORS as NAMED_LEVEL_COLORS
from uqcit.tensor.formats import FLOAT_BITS, INT_BITS, QuantFormat, parse_format
from uqcit.core.results import Result

# Seed 002 §2.2.2.2: level -> pattern name, and each pattern as (high bits, high fraction, low bits).
SEED_LEVEL_PATTERNS: dict[int, str] = {1: "46-54", 2: "30-70", 3: "10-90", 4: "30-70", 5: "46-54"}
SEED_PATTERNS: dict[str, tuple[int, float, int]] = {
    "10-90": (16, 0.10, 2),  # top 10% fp16, other 90% int2
    "30-70": (8, 0.30, 4),  # top 30% int8, other 70% int4
    "46-54": (8, 0.46, 4),  # 46% int8, 54% int4
}
# The level colours of uqcit.core.names, written in lower case as the plan, quantize, prune,
# compensate and allocate figures have always stored them (notebook outputs hold these strings).
LEVEL_COLORS = {level: color.lower() for level, color in NAMED_LEVEL_COLORS.items()}


def pattern_format(pattern: str, group_size: int = 128, symmetric: bool = False) -> QuantFormat:
    """The storage format of a named binary-concentration pattern such as ``"10-90"``.

    Any ``"H-L"`` pattern not in the seed table is read as H% at int8, the rest int4.
    """
    if pattern in SEED_PATTERNS:
        high_bits, frac, low_bits = SEED_PATTERNS[pattern]
    else:
        m = re.fullmatch(r"(\d+)-(\d+)", pattern)
        if not m or int(m.group(1)) + int(m.group(2)) != 100:
            raise ValueError(
                f"binary pattern {pattern!r} is not 'H-L' with H+L=100 (e.g. '20-80'); "
                f"seed patterns: {sorted(SEED_PATTERNS)}"
            )
        high_bits, frac, low_bits = 8, int(m.group(1)) / 100, 4
    return QuantFormat(bits=low_bits, group_size=group_size, symmetric=symmetric,
                       high_bits=high_bits, high_fraction=frac)


@dataclasses.dataclass(frozen=True)
class BitPlan:
    """Module name -> storage format: exact names, then ``re:`` patterns, then ``default``.

    >>> plan = BitPlan(default=QuantFormat(bits=4))
    >>> plan = plan.with_format("model.layers.0.mlp.down_proj", QuantFormat(bits=8))
    >>> plan.format_for("model.layers.0.mlp.down_proj").bits, plan.format_for("x").bits
    (8, 4)
    """

    default: QuantFormat | None = None  # None: modules not named stay in float
    exact: Mapping[str, QuantFormat | None] = dataclasses.field(default_factory=dict)
    patterns: tuple[tuple[str, QuantFormat | None], ...] = ()  # ("re:<regex>", fmt), first match wins
    name: str = "custom"

    def __post_init__(self) -> None:
        for key, _ in self.patterns:
            if not key.startswith("re:"):
                raise ValueError(f"plan pattern {key!r} must start with 're:'")
            re.compile(key[3:])

    def format_for(self, module: str) -> QuantFormat | None:
        if module in self.exact:
            return self.exact[module]
        for key, fmt in self.patterns:
            if re.fullmatch(key[3:], module):
                return fmt
        return self.default

    def with_format(self, module: str, fmt: QuantFormat | None) -> "BitPlan":
        """A copy where ``module`` (exact name, or ``re:`` pattern) gets ``fmt``."""
        if module.startswith("re:"):
            rest = tuple(p for p in self.patterns if p[0] != module)
            return dataclasses.replace(self, patterns=((module, fmt),) + rest)
        exact = dict(self.exact)
        exact[module] = fmt
        return dataclasses.replace(self, exact=exact)

    def to_dict(self) -> dict[str, Any]:
        enc = lambda f: None if f is None else f.name  # noqa: E731
        return {
            "name": self.name,
            "default": enc(self.default),
            "exact": {k: enc(v) for k, v in self.exact.items()},
            "patterns": [[k, enc(v)] for k, v in self.patterns],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BitPlan":
        check_keys(data, {"name", "default", "exact", "patterns"}, "BitPlan", required=())
        dec = lambda s: None if s is None else parse_format(s)  # noqa: E731
        return cls(
            name=data.get("name", "custom"),
            default=dec(data.get("default")),
            exact={k: dec(v) for k, v in data.get("exact", {}).items()},
            patterns=tuple((k, dec(v)) for k, v in data.get("patterns", [])),
        )

    def summarize(self, levels) -> "PlanSummary":
        """Average bits and predicted bytes of this plan over the modules of a levels analysis."""
        rows = []
        for m in levels.modules:
            if m.tied_to is not None:
                continue  # stored once, with the module it is tied to
            fmt = self.format_for(m.name)
            rows.append(PlanRow(m.name, m.level, m.numel, None if fmt is None else fmt.name,
                                FLOAT_BITS * m.numel if fmt is None else fmt.bits_for(m.numel)))
        return PlanSummary(self.name, rows)


@dataclasses.dataclass(frozen=True)
class PlanRow:
    module: str
    level: int
    numel: int
    format: str | None  # None: kept in float (counted as fp16 storage)
    bits: int

    @property
    def bpw(self) -> float:
        return self.bits / self.numel


@dataclasses.dataclass(repr=False)
class PlanSummary(Result):
    """What a plan costs, predicted from exact format arithmetic before quantizing anything."""

    plan_name: str
    rows: list[PlanRow]

    @property
    def total_bits(self) -> int:
        return sum(r.bits for r in self.rows)

    @property
    def weight_count(self) -> int:
        return sum(r.numel for r in self.rows)

    @property
    def avg_bpw(self) -> float:
        return self.total_bits / max(self.weight_count, 1)

    @property
    def predicted_bytes(self) -> int:
        return sum(-(-r.bits // 8) for r in self.rows)

    def level_bpw(self) -> dict[int, dict[str, float]]:
        out: dict[int, dict[str, float]] = {}
        for r in self.rows:
            d = out.setdefault(r.level, {"weights": 0, "bits": 0})
            d["weights"] += r.numel
            d["bits"] += r.bits
        return {
            lvl: {"percent": 100 * d["weights"] / max(self.weight_count, 1),
                  "avg_bits": d["bits"] / d["weights"]}
            for lvl, d in sorted(out.items())
        }

    def summary(self) -> str:
        return (f"plan {self.plan_name}: {len(self.rows)} modules, {self.weight_count:,} weights, "
                f"{self.avg_bpw:.3f} bits/weight, {self.predicted_bytes / 2**20:.2f} MiB predicted")

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan_name,
            "avg_bpw": self.avg_bpw,
            "predicted_bytes": self.predicted_bytes,
            "weight_count": self.weight_count,
            "levels": {str(k): v for k, v in self.level_bpw().items()},
            "modules": [dataclasses.asdict(r) for r in self.rows],
        }

    def table_rows(self):
        return (("module", "level", "weights", "format", "bits/weight"),
                [(r.module, r.level, r.numel, r.format or "float", r.bpw) for r in self.rows])

    def figure(self):
        """Per-module bits/weight, coloured by level."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for lvl in sorted({r.level for r in self.rows}):
            rows = [r for r in self.rows if r.level == lvl]
            fig.add_bar(x=[r.module for r in rows], y=[r.bpw for r in rows], name=f"L{lvl}",
                        marker_color=LEVEL_COLORS.get(lvl), uid=f"plan-L{lvl}",
                        hovertext=[f"{r.module}<br>{r.format or 'float'}<br>{r.numel:,} weights"
                                   for r in rows], hoverinfo="text+y")
        fig.update_layout(title=f"Bit plan {self.plan_name}: {self.avg_bpw:.3f} bits/weight",
                          xaxis_title="module", yaxis_title="bits/weight", barmode="overlay",
                          xaxis_showticklabels=False, height=380)
        return fig


@register_config
@dataclasses.dataclass(frozen=True)
class PlanConfig(StageConfig):
    """How to build the bit plan from the levels analysis."""

    type_tag = "plan"

    preset: Literal["binary-concentration", "uniform"] = "binary-concentration"  # the seed's presets
    bits: int = 4  # uniform preset only
    group_size: int = 128  # 128 is the common trade-off between scale overhead and error
    symmetric: bool = False  # asymmetric fits skewed groups better for 16 extra bits per group
    int_zeros: bool = False  # uniform preset, asymmetric: zero points packed as integers (bits, not 16, per group)
    level_patterns: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {str(k): v for k, v in SEED_LEVEL_PATTERNS.items()})
    # module name, "re:<regex>" or "kind:<kind>" (e.g. "kind:embedding") -> format or "float"
    overrides: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(self.bits in INT_BITS + (FLOAT_BITS,), "bits", f"must be one of {INT_BITS + (FLOAT_BITS,)}")
        self.check(self.group_size >= 1, "group_size", "must be >= 1")
        self.check(not (self.int_zeros and self.symmetric), "int_zeros", "needs symmetric=False (symmetric formats store no zero point)")
        for level, pattern in self.level_patterns.items():
            try:
                pattern_format(pattern, self.group_size, self.symmetric)
            except ValueError as exc:
                raise ConfigError(f"PlanConfig.level_patterns[{level!r}]: {exc}") from None
        for key, value in self.overrides.items():
            if value != "float":
                try:
                    parse_format(value)
                except ValueError as exc:
                    raise ConfigError(f"PlanConfig.overrides: override {key!r}: {exc}") from None

    @property
    def method_name(self) -> str:
        if self.preset == "uniform":
            return f"rtn-w{self.bits}-g{self.group_size}" + ("-sym" if self.symmetric else "") + (
                "-iz" if self.int_zeros else "")
        return "preset-binary-concentration"


def build_plan(levels, config: PlanConfig = PlanConfig()) -> BitPlan:
    """The bit plan a ``PlanConfig`` asks for, over the modules of a levels analysis."""
    exact: dict[str, QuantFormat | None] = {}
    if config.preset == "uniform":
        fmt = QuantFormat(bits=config.bits, group_size=config.group_size, symmetric=config.symmetric,
                          int_zeros=config.int_zeros and config.bits != FLOAT_BITS)
        for m in levels.modules:
            exact[m.name] = fmt
    else:
        for m in levels.modules:
            pattern = config.level_patterns.get(str(m.level))
            if pattern is None:
                raise ValueError(f"level_patterns has no entry for level {m.level} (module {m.name})")
            exact[m.name] = pattern_format(pattern, config.group_size, config.symmetric)
    # Overrides are expanded to exact names here, so a pattern override beats the preset.
    for key, value in config.overrides.items():
        fmt = None if value == "float" else parse_format(value)
        if key.startswith("re:"):
            hits = [m.name for m in levels.modules if re.fullmatch(key[3:], m.name)]
            if not hits:
                raise ValueError(f"plan override {key!r} matches no module of the model")
        elif key.startswith("kind:"):  # e.g. "kind:embedding": whatever the model calls it
            hits = [m.name for m in levels.modules if m.kind == key[5:]]
            if not hits:
                kinds = sorted({m.kind for m in levels.modules})
                raise ValueError(f"plan override {key!r} matches no module of the model; kinds: {kinds}")
        elif key in exact:
            hits = [key]
        else:
            raise ValueError(f"plan override {key!r} names no weight-bearing module of the model")
        for h in hits:
            exact[h] = fmt
    return BitPlan(default=None, exact=exact, name=config.method_name)


def uniform_plan(modules: Iterable[str], fmt: QuantFormat, name: str | None = None) -> BitPlan:
    """Every named module in ``fmt``."""
    return BitPlan(default=None, exact={m: fmt for m in modules}, name=name or f"rtn-{fmt.name}")


# --------------------------------------------------------------------------- pipeline stage

@stage_handler(PlanConfig)
def _plan_stage(session: StageSession, cfg: PlanConfig) -> PlanSummary:
    levels = session.require("levels")
    session.plan = build_plan(levels, cfg)  # a following "quantize" stage uses it
    return session.plan.summarize(levels)
