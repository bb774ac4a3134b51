"""Layer analysis, Levels 1-5 (seed 002 §2.2.1): every weight-bearing module classified by role.

The seed maps transformer parts to "levels": 1 embeddings and positions, 2 Q/K/V
projections, 3 attention output projections and cross-attention, 4 FFN
projections, 5 the LM head and late blocks. Here that mapping is data: a
``RuleSet`` is an ordered tuple of ``LevelRule`` (regex on the module's dotted
name -> level and role), first match wins, with built-in sets for the llama-like
family, GPT-2, BERT and a generic fallback. Blocks in the last ``late_fraction``
of each stack become Level 5 whatever their role; both are recorded so a user
sees why. Weight-bearing means ``nn.Linear``, ``nn.Embedding`` and transformers'
``Conv1D``; a module no rule matches is an error that names it, never a guess.

>>> from uqcit.inputs.tiny import tiny_model
>>> model, _ = tiny_model("llama")
>>> result = analyze_levels(model)
>>> result.level_of("model.layers.0.self_attn.o_proj")
3
>>> result.entry("lm_head").tied_to
'model.embed_tokens'
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, ClassVar, Literal

from uqcit.core.config import StageConfig, StageSession, register_config, stage_handler
from uqcit.core.keys import check_keys
from uqcit.core.names import DEFAULT_BLOCK_PATTERN, LEVEL_COLORS, LEVELS, block_of, stack_of  # noqa: F401 (public here too)
from uqcit.core.results import Result
from uqcit.stages.level_rules import (  # noqa: F401 (public here too)
    BERT_RULES,
    GENERIC_RULES,
    GPT2_RULES,
    LLAMA_RULES,
    MODEL_TYPE_RULESETS,
    RULESETS,
    LevelRule,
    RuleSet,
    register_ruleset,
    ruleset_for,
)

LEVEL_NAMES = {
    1: "embeddings",
    2: "Q/K/V",
    3: "attention output",
    4: "FFN",
    5: "head / late blocks",
}

ModuleKind = Literal["linear", "embedding", "conv1d"]


class UnclassifiedModulesError(ValueError):
    """Weight-bearing modules that no rule of the ruleset matches; ``.modules`` lists them all."""

    def __init__(self, message: str, modules: tuple[str, ...]):
        super().__init__(message)
        self.modules = modules


# --------------------------------------------------------------------------- config


@register_config
@dataclasses.dataclass(frozen=True)
class LevelsConfig(StageConfig):
    """Configuration of the layer-level analysis."""

    type_tag: ClassVar[str] = "levels"

    ruleset: str | None = None  # None: pick by model_type, so one recipe fits every family
    late_fraction: float = 0.1  # last 10% of blocks (3 of SmolLM2's 30) are "late-stage"; 0 disables

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(0.0 <= self.late_fraction <= 1.0, "late_fraction", "must be in [0, 1]")


def n_late_blocks(n_blocks: int, late_fraction: float) -> int:
    """How many trailing blocks are Level 5: ceil(fraction * n), so any positive fraction marks one.

    >>> n_late_blocks(30, 0.1), n_late_blocks(4, 0.1), n_late_blocks(30, 0.0)
    (3, 1, 0)
    """
    # Rounding first keeps 0.1 * 30 = 3.0000000000000004 at 3 blocks.
    return min(n_blocks, math.ceil(round(late_fraction * n_blocks, 9)))


# --------------------------------------------------------------------------- result


@dataclasses.dataclass(frozen=True)
class ModuleLevel:
    """One weight-bearing module and why it got its level."""

    name: str  # dotted module name
    kind: ModuleKind
    shape: tuple[int, int]  # (out, in) as a Linear-convention matrix; Embedding: (num_embeddings, dim)
    numel: int
    block: int | None  # index inside its stack, None outside blocks (embeddings, head)
    role: str  # from the rule: "q", "attn_out", "down", "lm_head"...
    level: int  # final level: role_level, or 5 in a late block
    role_level: int  # the level the role alone gives
    late: bool  # in the last late_fraction of its stack's blocks
    rule: str  # pattern of the rule that matched
    tied_to: str | None = None  # module that owns this weight tensor (e.g. lm_head -> embed_tokens)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["shape"] = list(self.shape)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModuleLevel":
        names = {f.name for f in dataclasses.fields(cls)}
        check_keys(data, names, "ModuleLevel")
        return cls(**{**data, "shape": tuple(data["shape"])})


@dataclasses.dataclass(frozen=True)
class LevelCount:
    """Modules and parameters at one level; a shared (tied) weight counts once, at its owner."""

    modules: int  # modules owning their weight
    params: int  # parameters of those weights
    tied: int  # modules whose weight another module owns (counted in neither number above)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(repr=False)  # keep Result's short __repr__
class LevelsResult(Result):
    """Level per weight-bearing module of a model, with the rules that decided it."""

    modules: list[ModuleLevel]
    n_blocks: int  # blocks found across all stacks
    model_type: str | None
    ruleset: RuleSet
    config: LevelsConfig
    unhandled: tuple[str, ...] = ()  # >=2-D parameters outside Linear/Embedding/Conv1D (fused MoE experts...)
    _index: dict[str, ModuleLevel] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index = {m.name: m for m in self.modules}

    # ---- queries
    def entry(self, name: str) -> ModuleLevel:
        """The entry of module ``name``; KeyError names the miss."""
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"no weight-bearing module named {name!r} in this analysis") from None

    def level_of(self, name: str) -> int:
        return self.entry(name).level

    def by_level(self) -> dict[int, list[ModuleLevel]]:
        """Entries grouped by level, every level present (possibly empty), model order kept."""
        out: dict[int, list[ModuleLevel]] = {lv: [] for lv in LEVELS}
        for m in self.modules:
            out[m.level].append(m)
        return out

    def quantizable(self) -> list[ModuleLevel]:
        """Entries that own their weight: what a quantizer stores (tied copies left out)."""
        return [m for m in self.modules if m.tied_to is None]

    def level_counts(self) -> dict[int, LevelCount]:
        counts = {}
        for lv, entries in self.by_level().items():
            owned = [m for m in entries if m.tied_to is None]
            counts[lv] = LevelCount(
                modules=len(owned), params=sum(m.numel for m in owned), tied=len(entries) - len(owned)
            )
        return counts

    @property
    def total_params(self) -> int:
        return sum(m.numel for m in self.quantizable())

    # ---- data
    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "n_blocks": self.n_blocks,
            "config": self.config.to_dict(),
            "ruleset": self.ruleset.to_dict(),
            "unhandled": list(self.unhandled),
            "level_counts": {str(lv): c.to_dict() for lv, c in self.level_counts().items()},  # derived
            "modules": [m.to_dict() for m in self.modules],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LevelsResult":
        keys = {"model_type", "n_blocks", "config", "ruleset", "unhandled", "level_counts", "modules"}
        check_keys(data, keys, "LevelsResult", required=keys - {"level_counts"})
        return cls(
            modules=[ModuleLevel.from_dict(m) for m in data["modules"]],
            n_blocks=int(data["n_blocks"]),
            model_type=data["model_type"],
            ruleset=RuleSet.from_dict(data["ruleset"]),
            config=LevelsConfig.from_dict(data["config"]),
            unhandled=tuple(data["unhandled"]),
        )

    @classmethod
    def from_json(cls, text: str) -> "LevelsResult":
        return cls.from_dict(json.loads(text))

    # ---- views
    def summary(self) -> str:
        counts = self.level_counts()
        per_level = ", ".join(f"L{lv} {c.modules}" for lv, c in counts.items())
        n_tied = sum(c.tied for c in counts.values())
        text = (
            f"{len(self.quantizable())} weight modules ({self.total_params:,} params) in {self.n_blocks} blocks, "
            f"model_type {self.model_type}, ruleset {self.ruleset.name!r}, "
            f"late_fraction {self.config.late_fraction}: {per_level}"
        )
        if n_tied:
            text += f"; {n_tied} tied"
        if self.unhandled:
            text += f"; {len(self.unhandled)} >=2-D parameters outside Linear/Embedding/Conv1D not classified"
        return text

    def table_rows(self) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
        columns = ("module", "kind", "shape", "params", "block", "role", "level", "rule", "tied_to")
        rows = [
            (m.name, m.kind, f"{m.shape[0]}×{m.shape[1]}", m.numel, m.block, m.role,
             f"L{m.level}" + (" (late)" if m.late else ""), m.rule, m.tied_to)
            for m in self.modules
        ]
        return columns, rows

    def figure(self):
        """Level map: blocks (rows) x roles (columns), plus one row for modules outside blocks."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        outside = [m for m in self.modules if m.block is None]
        inside = [m for m in self.modules if m.block is not None]
        # Rows: one per (stack, block); columns: roles in order of first appearance.
        row_keys: list[tuple[str, int]] = []
        roles: list[str] = []
        cells: dict[tuple[tuple[str, int], str], list[ModuleLevel]] = {}
        for m in inside:
            key = (stack_of(m.name, self.ruleset.block_pattern), m.block)
            if key not in row_keys:
                row_keys.append(key)
            if m.role not in roles:
                roles.append(m.role)
            cells.setdefault((key, m.role), []).append(m)
        stacks = list(dict.fromkeys(k[0] for k in row_keys))
        row_keys.sort(key=lambda k: (stacks.index(k[0]), k[1]))
        row_labels = [f"block {i}" if len(stacks) == 1 else f"{s}{i}" for s, i in row_keys]

        z, hover = [], []
        for key in row_keys:
            z_row, h_row = [], []
            for role in roles:
                group = cells.get((key, role), [])
                z_row.append(max((m.level for m in group), default=None))
                h_row.append("<br>".join(_hover(m) for m in group[:4])
                             + (f"<br>… {len(group) - 4} more" if len(group) > 4 else ""))
            z.append(z_row)
            hover.append(h_row)

        fig = make_subplots(
            rows=2, cols=1, row_heights=[1, max(len(row_keys), 1)], vertical_spacing=0.12,
            subplot_titles=("outside blocks", "blocks × role"),
        )
        fig.add_trace(go.Heatmap(
            uid="levels-outside", name="outside blocks",
            x=[m.name for m in outside], y=["outside"], z=[[m.level for m in outside]],
            hovertext=[[_hover(m) for m in outside]], hoverinfo="text",
            coloraxis="coloraxis", xgap=2, ygap=2,
        ), row=1, col=1)
        fig.add_trace(go.Heatmap(
            uid="levels-blocks", name="blocks",
            x=roles, y=row_labels, z=z, hovertext=hover, hoverinfo="text",
            coloraxis="coloraxis", xgap=2, ygap=2,
        ), row=2, col=1)
        fig.update_yaxes(type="category", autorange="reversed")  # block 0 on top
        fig.update_xaxes(type="category")
        fig.update_layout(
            title=f"Levels 1-5: {self.model_type} ({self.ruleset.name} rules, "
                  f"late_fraction {self.config.late_fraction})",
            coloraxis=dict(
                colorscale=_level_colorscale(), cmin=0.5, cmax=5.5,
                colorbar=dict(title="level", tickvals=list(LEVELS),
                              ticktext=[f"L{lv} {LEVEL_NAMES[lv]}" for lv in LEVELS]),
            ),
            height=260 + 22 * len(row_keys),
            template="plotly_white",
        )
        return fig

    def level_figure(self):
        """Bar chart of parameters per level (a tied weight counted once, at its owner)."""
        import plotly.graph_objects as go

        counts = self.level_counts()
        fig = go.Figure(go.Bar(
            uid="levels-params",
            x=[f"L{lv} {LEVEL_NAMES[lv]}" for lv in LEVELS],
            y=[counts[lv].params for lv in LEVELS],
            text=[f"{counts[lv].modules} modules" + (f" (+{counts[lv].tied} tied)" if counts[lv].tied else "")
                  for lv in LEVELS],
            marker_color=[LEVEL_COLORS[lv] for lv in LEVELS],
        ))
        fig.update_layout(title=f"Parameters per level: {self.model_type}", yaxis_title="parameters",
                          template="plotly_white")
        return fig


def _hover(m: ModuleLevel) -> str:
    why = f"L{m.level} (late block; role level {m.role_level})" if m.late else f"L{m.level}"
    tied = f"<br>tied to {m.tied_to}" if m.tied_to else ""
    return f"{m.name}<br>{m.shape[0]}×{m.shape[1]} {m.kind}<br>role {m.role}: {why}<br>rule {m.rule}{tied}"


def _level_colorscale() -> list[tuple[float, str]]:
    """Stepwise scale: each level a flat band over [lv - 0.5, lv + 0.5] of cmin..cmax = 0.5..5.5."""
    scale = []
    for i, lv in enumerate(LEVELS):
        scale += [(i / len(LEVELS), LEVEL_COLORS[lv]), ((i + 1) / len(LEVELS), LEVEL_COLORS[lv])]
    return scale


# --------------------------------------------------------------------------- analysis


def analyze_levels(model, config: LevelsConfig = LevelsConfig(), ruleset: RuleSet | None = None) -> LevelsResult:
    """Classify every ``nn.Linear``, ``nn.Embedding`` and ``Conv1D`` of ``model`` into Levels 1-5.

    The ruleset is ``ruleset`` if given, else ``config.ruleset`` by name, else the one
    registered for ``model.config.model_type`` (generic for unknown types).
    Raises ``UnclassifiedModulesError`` if any weight-bearing module matches no rule.

    >>> from uqcit.inputs.tiny import tiny_model
    >>> analyze_levels(tiny_model("gpt2")[0]).level_of("transformer.h.0.mlp.c_proj")
    4
    """
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    rules = _resolve_ruleset(config, ruleset, model_type)

    found: list[tuple[str, ModuleKind, Any, tuple[int, int]]] = []  # name, kind, weight, (out, in)
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):  # GPT-2 stores (in, out)
            found.append((name, "conv1d", module.weight, (module.weight.shape[1], module.weight.shape[0])))
        elif isinstance(module, nn.Linear):
            found.append((name, "linear", module.weight, tuple(module.weight.shape)))
        elif isinstance(module, nn.Embedding):
            found.append((name, "embedding", module.weight, tuple(module.weight.shape)))

    embeddings = {name for name, kind, *_ in found if kind == "embedding"}
    matched = {name: rules.match(name) for name, *_ in found}
    missing = tuple(name for name, rule in matched.items() if rule is None)
    if missing:
        raise UnclassifiedModulesError(_unclassified_message(missing, rules, model_type), missing)

    # Block index and stack of each module; late blocks are counted per stack.
    where_of: dict[str, tuple[str, int] | None] = {}  # name -> (stack, block index)
    stack_size: dict[str, int] = {}
    for name, *_ in found:
        index = block_of(name, rules.block_pattern)
        if index is None:
            where_of[name] = None
        else:
            stack = stack_of(name, rules.block_pattern)
            where_of[name] = (stack, index)
            stack_size[stack] = max(stack_size.get(stack, 0), index + 1)
    first_late = {s: n - n_late_blocks(n, config.late_fraction) for s, n in stack_size.items()}

    # A weight shared by several modules is owned by the embedding holding it (its
    # natural home, whatever the module order), else by the first module holding it.
    owners: dict[Any, str] = {}
    for name, kind, weight, _ in found:
        key = _weight_key(weight)
        if key not in owners or (kind == "embedding" and owners[key] not in embeddings):
            owners[key] = name
    entries = []
    for name, kind, weight, shape in found:
        owner = owners[_weight_key(weight)]
        tied_to = None if owner == name else owner
        rule = matched[name]
        where = where_of[name]
        late = where is not None and where[1] >= first_late[where[0]]
        entries.append(ModuleLevel(
            name=name, kind=kind, shape=(int(shape[0]), int(shape[1])), numel=weight.numel(),
            block=None if where is None else where[1], role=rule.role,
            level=5 if late else rule.level, role_level=rule.level, late=late,
            rule=rule.pattern, tied_to=tied_to,
        ))

    covered = {id(w) for _, _, w, _ in found}
    unhandled = tuple(n for n, p in model.named_parameters() if p.ndim >= 2 and id(p) not in covered)
    return LevelsResult(
        modules=entries, n_blocks=sum(stack_size.values()), model_type=model_type,
        ruleset=rules, config=config, unhandled=unhandled,
    )


def _resolve_ruleset(config: LevelsConfig, ruleset: RuleSet | None, model_type: str | None) -> RuleSet:
    if ruleset is not None:
        if config.ruleset is not None and config.ruleset != ruleset.name:
            raise ValueError(
                f"config names ruleset {config.ruleset!r} but ruleset {ruleset.name!r} was passed; "
                "pass one, or give them the same name"
            )
        return ruleset
    if config.ruleset is not None:
        if config.ruleset not in RULESETS:
            raise ValueError(
                f"unknown ruleset {config.ruleset!r}; registered: {sorted(RULESETS)} "
                "(add yours with register_ruleset, or pass ruleset=RuleSet(...))"
            )
        return RULESETS[config.ruleset]
    return ruleset_for(model_type)


def _weight_key(weight) -> Any:
    """Identity of a weight's storage: tied modules share the Parameter or at least its data."""
    if weight.device.type == "meta" or weight.data_ptr() == 0:
        return ("id", id(weight))  # meta tensors all report data_ptr 0
    return ("ptr", weight.device.type, weight.data_ptr(), tuple(weight.shape), weight.dtype)


def _unclassified_message(missing: tuple[str, ...], rules: RuleSet, model_type: str | None) -> str:
    shown = ", ".join(missing[:10]) + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
    leaf = re.escape(missing[0].rsplit(".", 1)[-1])
    return (
        f"{len(missing)} weight-bearing module(s) match no rule of ruleset {rules.name!r} "
        f"(model_type {model_type!r}): {shown}. "
        "Pass a ruleset that covers them, e.g. "
        f"analyze_levels(model, ruleset=RULESETS[{rules.name!r}].with_rules("
        f"LevelRule(r'(?:^|\\.){leaf}$', level=4, role='up'), name='mine')) "
        "— levels: 1 embeddings/positions, 2 Q/K/V, 3 attention output/cross-attention, "
        "4 FFN, 5 LM head/late blocks."
    )


def select_modules(levels, pattern: str | None) -> list:
    """The quantizable entries of ``levels`` whose name matches ``pattern`` (all when None).

    ``pattern`` is a regex searched in each name, or ``kind:<kind>`` for every module of one kind
    (``linear``, ``conv1d``, ``embedding``), as allocation pins name a kind.

    >>> from uqcit.inputs.tiny import tiny_model
    >>> levels = analyze_levels(tiny_model("gpt2")[0])
    >>> [e.name for e in select_modules(levels, "kind:embedding")]
    ['transformer.wte', 'transformer.wpe']
    """
    entries = levels.quantizable()
    if pattern is not None and pattern.startswith("kind:"):
        kinds = sorted({e.kind for e in entries})
        entries = [e for e in entries if e.kind == pattern[5:]]
        if not entries:
            raise ValueError(f"modules {pattern!r}: no quantizable module of that kind (kinds: {', '.join(kinds)})")
    elif pattern is not None:
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"modules pattern {pattern!r} is not a valid regex: {exc}") from None
        entries = [e for e in entries if rx.search(e.name)]
        if not entries:
            raise ValueError(f"modules pattern {pattern!r} matches no quantizable module "
                             f"(e.g. {levels.quantizable()[0].name!r})")
    return entries


# --------------------------------------------------------------------------- pipeline stage

@stage_handler(LevelsConfig)
def _levels_stage(session: StageSession, cfg: LevelsConfig) -> LevelsResult:
    return analyze_levels(session.working, cfg)
