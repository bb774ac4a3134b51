"""Importance scores per weight and per layer (seed 002 §2.2.2.3).

Per-weight scores, for a weight ``W`` in ``[out, in]`` convention:

- ``magnitude``: ``|W|``;
- ``fisher``: the diagonal empirical Fisher ``mean_b (∂L_b/∂W)²`` on calibration text
  (``uqcit.inputs.fisher.accumulate_fisher``): the curvature of the loss along each weight, so a
  perturbation ``δ`` costs about ``½ F δ²``;
- ``activation``: ``|W_ij| · ‖x_j‖`` (Wanda), ``‖x_j‖`` the RMS of input channel ``j`` on
  calibration text. An embedding tied to a Linear LM head is scored with the head's dense
  inputs; an untied embedding with the frequency of each token (its one-hot input's norm).

Per layer, each per-weight score is aggregated by its ``mean`` (default: comparable across
layers of different size) or ``sum``. Two more per-layer scores:

- ``output_information``: the KL divergence of the model's output when that layer alone is
  quantized, read from a sensitivity measurement (any object with ``.modules``, ``.formats``
  and ``.kl(module, format_name)``), at one format (default: the lowest-bit one measured);
- ``combined``: the weighted average of the other per-layer scores after normalizing each
  across layers: ``rank`` (default) maps a score to its percentile rank in [0, 1] (ties
  averaged), which is blind to the decades Fisher values span; ``sum`` divides by the sum
  over layers. Weights are ``ImportanceConfig.weights``; a layer missing a score (e.g. not
  measured) is averaged over the scores it has.

>>> from uqcit.inputs.tiny import tiny_model
>>> from uqcit.stages.levels import analyze_levels
>>> model, tok = tiny_model("llama")
>>> cfg = ImportanceConfig(calib_samples=2, calib_seq_len=32)
>>> res = score_importance(model, analyze_levels(model), cfg, tokenizer=tok, progress=False)
>>> sorted(res.scores)
['activation', 'combined', 'fisher', 'magnitude']
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, ClassVar, Literal, Mapping

import torch

from uqcit.inputs.calibration import (
    InputStats,
    InputStatsCollector,
    channel_importance,
    collect_input_stats,
)
from uqcit.inputs.fisher import accumulate_fisher
from uqcit.core.config import ConfigError, StageConfig, StageSession, register_config, stage_handler
from uqcit.core.names import LEVEL_COLORS
from uqcit.inputs.corpus import stage_calibration
from uqcit.tensor.formats import parse_format
from uqcit.core.results import Result
from uqcit.runtime.modules import weight_matrix

WEIGHT_SCORES = ("magnitude", "fisher", "activation")  # defined per weight
LAYER_SCORES = WEIGHT_SCORES + ("output_information",)  # defined per layer (combined comes on top)
ScoreName = Literal["magnitude", "fisher", "activation", "output_information"]

# Per-level distributions are histograms of log10(score) on fixed bins, so they add up across
# layers exactly without keeping any per-weight tensor; values outside clamp to the end bins.
HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_BINS = -16.0, 4.0, 80


@register_config
@dataclasses.dataclass(frozen=True)
class ImportanceConfig(StageConfig):
    """Which importance scores to compute, and how to combine them."""

    type_tag: ClassVar[str] = "importance"

    scores: tuple[ScoreName, ...] = ("magnitude", "fisher", "activation")  # output_information needs a sensitivity measurement
    weights: Mapping[str, float] = dataclasses.field(  # weight of each score in `combined`
        default_factory=lambda: {s: 1.0 for s in LAYER_SCORES})
    normalize: Literal["rank", "sum"] = "rank"  # rank: robust to Fisher's heavy tails
    aggregate: Literal["mean", "sum"] = "mean"  # per-layer = mean per weight, comparable across sizes
    sensitivity_format: str | None = None  # output_information at this format; None: lowest-bit measured
    calib_samples: int = 16  # 16 x 256 tokens: a Fisher pass (forward + backward) stays under a minute on 2 cores
    calib_seq_len: int = 256
    seed: int = 0  # calibration offsets; same seed, same scores

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(len(self.scores) > 0, "scores", "is empty; choose from " + ", ".join(LAYER_SCORES))
        self.check(len(set(self.scores)) == len(self.scores), "scores", "has duplicates")
        bad = sorted(set(self.scores) - set(LAYER_SCORES))
        self.check(not bad, "scores", f"has unknown score(s) {bad}; choose from {list(LAYER_SCORES)}")
        bad = sorted(set(self.weights) - set(LAYER_SCORES))
        self.check(not bad, "weights", f"names unknown score(s) {bad}; allowed: {list(LAYER_SCORES)}")
        neg = {k: v for k, v in self.weights.items() if not v >= 0}
        self.check(not neg, "weights", f"must be >= 0 ({neg} are not)")
        self.check(self.calib_samples >= 1, "calib_samples", "must be >= 1")
        self.check(self.calib_seq_len >= 2, "calib_seq_len", "must be >= 2")
        if self.sensitivity_format is not None:
            try:
                parse_format(self.sensitivity_format)  # fail early on a typo
            except ValueError as exc:
                raise ConfigError(f"ImportanceConfig.sensitivity_format: {exc}") from None


@dataclasses.dataclass(frozen=True)
class LayerImportance:
    """Per-layer scores of one weight-bearing module (NaN where a score is not available)."""

    name: str
    level: int
    kind: str
    numel: int
    scores: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "level": self.level, "kind": self.kind, "numel": self.numel,
                "scores": {k: _json_float(v) for k, v in self.scores.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerImportance":
        return cls(data["name"], int(data["level"]), data["kind"], int(data["numel"]),
                   {k: (math.nan if v is None else float(v)) for k, v in data["scores"].items()})


@dataclasses.dataclass(repr=False)
class ImportanceResult(Result):
    """Per-layer importance scores and per-level distributions of the per-weight scores.

    ``histograms[score][level]`` counts the level's weights in ``HIST_BINS`` bins of
    ``log10(score)`` from ``HIST_LOG10_MIN`` to ``HIST_LOG10_MAX``; ``zeros[score][level]``
    counts weights scoring exactly 0. Per-weight tensors are not kept (135M floats per score
    for SmolLM2); ``weight_importance`` recomputes them for one module.
    """

    layers: list[LayerImportance]
    scores: tuple[str, ...]  # computed, in config order, then "combined"
    config: ImportanceConfig
    histograms: dict[str, dict[int, list[int]]]
    zeros: dict[str, dict[int, int]]
    calibration_tokens: int  # 0 when no calibration pass ran
    sensitivity_format: str | None  # the format output_information was read at
    seconds: dict[str, float]

    def layer(self, name: str) -> LayerImportance:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KeyError(f"no layer named {name!r} in this importance result")

    def ranking(self, score: str = "combined") -> list[str]:
        """Layer names from most to least important by ``score`` (layers without it last)."""
        self._check_score(score)
        return [lay.name for lay in sorted(self.layers, key=lambda x: _sort_key(x.scores.get(score)))]

    def _check_score(self, score: str) -> None:
        if score not in self.scores:
            raise ValueError(f"score {score!r} was not computed; available: {list(self.scores)}")

    # ---- data
    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "scores": list(self.scores),
            "calibration_tokens": self.calibration_tokens,
            "sensitivity_format": self.sensitivity_format,
            "seconds": self.seconds,
            "histogram_bins": {"log10_min": HIST_LOG10_MIN, "log10_max": HIST_LOG10_MAX, "bins": HIST_BINS},
            "histograms": {s: {str(lv): c for lv, c in h.items()} for s, h in self.histograms.items()},
            "zeros": {s: {str(lv): c for lv, c in z.items()} for s, z in self.zeros.items()},
            "layers": [lay.to_dict() for lay in self.layers],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ImportanceResult":
        return cls(
            layers=[LayerImportance.from_dict(x) for x in data["layers"]],
            scores=tuple(data["scores"]),
            config=ImportanceConfig.from_dict(data["config"]),
            histograms={s: {int(lv): list(c) for lv, c in h.items()} for s, h in data["histograms"].items()},
            zeros={s: {int(lv): int(c) for lv, c in z.items()} for s, z in data["zeros"].items()},
            calibration_tokens=int(data["calibration_tokens"]),
            sensitivity_format=data["sensitivity_format"],
            seconds={k: float(v) for k, v in data["seconds"].items()},
        )

    # ---- views
    def summary(self) -> str:
        top = self.ranking("combined")[:3] if "combined" in self.scores else []
        calib = (f"{self.calibration_tokens:,} calibration tokens" if self.calibration_tokens
                 else "no calibration pass")
        return (f"{len(self.layers)} layers scored by {', '.join(s for s in self.scores)} "
                f"({self.config.aggregate} per weight, combined by {self.config.normalize}; {calib})"
                + (f"; most important: {', '.join(top)}" if top else ""))

    def table_rows(self):
        cols = ("module", "level", "weights") + self.scores
        return cols, [(lay.name, lay.level, lay.numel) + tuple(lay.scores.get(s, math.nan) for s in self.scores)
                      for lay in self.layers]

    def figure(self, score: str | None = None, distribution: str | None = None):
        """Per-layer bars of ``score`` coloured by level (top), and the per-level distribution of
        the per-weight score ``distribution`` (bottom). Defaults: ``combined`` (else the first
        score) and the first per-weight score computed."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        score = score or ("combined" if "combined" in self.scores else self.scores[0])
        self._check_score(score)
        dist = distribution or next((s for s in self.scores if s in self.histograms), None)
        if dist is not None and dist not in self.histograms:
            raise ValueError(f"no per-weight distribution for {dist!r}; available: {sorted(self.histograms)}")
        fig = make_subplots(rows=2, cols=1, vertical_spacing=0.16, subplot_titles=(
            f"{score} per layer ({'normalized' if score == 'combined' else self.config.aggregate})",
            f"per-weight {dist} by level" if dist else "no per-weight score computed"))
        for lvl in sorted({lay.level for lay in self.layers}):
            rows = [lay for lay in self.layers if lay.level == lvl]
            fig.add_trace(go.Bar(
                x=[lay.name for lay in rows], y=[_finite_or_none(lay.scores.get(score)) for lay in rows],
                name=f"L{lvl}", legendgroup=f"L{lvl}", marker_color=LEVEL_COLORS.get(lvl),
                uid=f"importance-bars-L{lvl}",
                hovertext=[f"{lay.name}<br>L{lvl}, {lay.numel:,} weights" for lay in rows], hoverinfo="text+y"),
                row=1, col=1)
        if dist is not None:
            width = (HIST_LOG10_MAX - HIST_LOG10_MIN) / HIST_BINS
            centers = [HIST_LOG10_MIN + (i + 0.5) * width for i in range(HIST_BINS)]
            for lvl, counts in sorted(self.histograms[dist].items()):
                total = sum(counts) + self.zeros[dist].get(lvl, 0)
                if not total:
                    continue
                fig.add_trace(go.Scatter(
                    x=centers, y=[c / total / width for c in counts], mode="lines", name=f"L{lvl}",
                    legendgroup=f"L{lvl}", showlegend=False, line_color=LEVEL_COLORS.get(lvl),
                    uid=f"importance-dist-L{lvl}"), row=2, col=1)
        fig.update_xaxes(showticklabels=False, row=1, col=1)
        fig.update_yaxes(type="log" if score != "combined" else "linear", row=1, col=1)
        fig.update_xaxes(title_text=f"log10 {dist}", row=2, col=1)
        fig.update_yaxes(title_text="density", row=2, col=1)
        fig.update_layout(title=f"Importance — {len(self.layers)} layers", height=620, barmode="overlay")
        return fig


def weight_importance(score: str, weight: torch.Tensor, *, stats: InputStats | None = None,
                      fisher: torch.Tensor | None = None) -> torch.Tensor:
    """Per-weight ``score`` of one module's ``weight`` (``[out, in]``; embeddings ``[num, dim]``).

    ``activation`` needs ``stats`` (from ``collect_input_stats``), ``fisher`` the module's entry
    of ``accumulate_fisher``. Returns float32, shaped like ``weight``.
    """
    if score == "magnitude":
        return weight.detach().to(torch.float32).abs()
    if score == "activation":
        if stats is None:
            raise ValueError("the 'activation' score needs input statistics (stats=...)")
        return channel_importance(stats, weight)
    if score == "fisher":
        if fisher is None:
            raise ValueError("the 'fisher' score needs the module's Fisher tensor (fisher=...)")
        if tuple(fisher.shape) != tuple(weight.shape):
            raise ValueError(f"fisher has shape {tuple(fisher.shape)}, weight has {tuple(weight.shape)}")
        return fisher.detach().to(torch.float32)
    raise ValueError(f"unknown per-weight score {score!r}; choose from {list(WEIGHT_SCORES)} "
                     "(output_information and combined are per layer only)")


def activation_source(levels, name: str) -> str:
    """The module whose inputs score ``name``'s weight for ``activation``: the Linear LM head
    tied to an embedding (dense inputs beat token counts from a few thousand tokens), else itself."""
    entry = levels.entry(name)
    if entry.kind == "embedding":
        head = next((m.name for m in levels.modules if m.tied_to == name and m.kind != "embedding"), None)
        if head is not None:
            return head
    return name


def score_importance(model: torch.nn.Module, levels, config: ImportanceConfig = ImportanceConfig(), *,
                     tokenizer=None, calibration: torch.Tensor | None = None, sensitivity=None,
                     stats: Mapping[str, InputStats] | None = None,
                     fisher: Mapping[str, torch.Tensor] | None = None,
                     progress: bool = True) -> ImportanceResult:
    """Score every weight-bearing module of ``model`` (``levels`` from ``analyze_levels``).

    Calibration text is ``calibration`` (``LongTensor [n, seq]``) or, when it is None,
    ``uqcit.inputs.corpus.calibration_batch(tokenizer, ...)`` per the config. ``stats`` / ``fisher`` reuse
    statistics already collected. ``sensitivity`` is required for ``output_information``.
    The model is not modified.
    """
    t_all = time.perf_counter()
    seconds: dict[str, float] = {}
    entries = levels.quantizable()
    names = [e.name for e in entries]
    wanted = tuple(config.scores)
    per_weight = [s for s in wanted if s in WEIGHT_SCORES]
    sens_format = None
    if "output_information" in wanted:
        if sensitivity is None:
            raise ValueError("score 'output_information' needs a sensitivity measurement: run the "
                             "sensitivity stage first, or drop it from ImportanceConfig.scores")
        sens_format = _pick_format(sensitivity, config.sensitivity_format)

    sources = {n: activation_source(levels, n) for n in names}
    need_stats = "activation" in wanted and stats is None
    need_fisher = "fisher" in wanted and fisher is None
    batch = None
    if need_stats or need_fisher:
        batch = stage_calibration(config, tokenizer, calibration, what="scoring importance")
    if need_fisher:
        t0 = time.perf_counter()
        if need_stats:  # the Fisher pass's forwards give the activation norms for free
            with InputStatsCollector(model, sorted(set(sources.values())), hessian=False) as col:
                fisher = accumulate_fisher(model, batch, modules=names, progress=progress)
            stats = col.stats()
        else:
            fisher = accumulate_fisher(model, batch, modules=names, progress=progress)
        seconds["fisher"] = time.perf_counter() - t0
    elif need_stats:
        t0 = time.perf_counter()
        stats = collect_input_stats(model, batch, sorted(set(sources.values())), hessian=False,
                                    progress=progress)
        seconds["activation_stats"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    named = dict(model.named_modules())
    hist = {s: {} for s in per_weight}
    zeros = {s: {} for s in per_weight}
    layers = []
    for entry in entries:
        weight = weight_matrix(named[entry.name])
        values: dict[str, float] = {}
        for s in per_weight:
            st = stats.get(sources[entry.name]) if (s == "activation" and stats is not None) else None
            if s == "activation" and st is None:
                raise ValueError(f"stats has no entry for {sources[entry.name]!r} (scoring {entry.name!r})")
            if s == "fisher" and entry.name not in fisher:
                raise ValueError(f"fisher has no entry for {entry.name!r}")
            t = weight_importance(s, weight, stats=st, fisher=fisher.get(entry.name) if s == "fisher" else None)
            values[s] = float(t.mean() if config.aggregate == "mean" else t.sum(dtype=torch.float64))
            counts, n_zero = _log_histogram(t)
            prev = hist[s].get(entry.level)
            hist[s][entry.level] = counts if prev is None else [a + b for a, b in zip(prev, counts)]
            zeros[s][entry.level] = zeros[s].get(entry.level, 0) + n_zero
        if "output_information" in wanted:
            values["output_information"] = _sensitivity_kl(sensitivity, entry.name, sens_format)
        layers.append(LayerImportance(entry.name, entry.level, entry.kind, entry.numel, values))
    layers = _with_combined(layers, wanted, config)
    seconds["scoring"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_all
    return ImportanceResult(
        layers=layers, scores=wanted + ("combined",), config=config,
        histograms={s: dict(sorted(h.items())) for s, h in hist.items()},
        zeros={s: dict(sorted(z.items())) for s, z in zeros.items()},
        calibration_tokens=0 if batch is None else int(batch.numel()),
        sensitivity_format=sens_format, seconds=seconds)


def combine(layers: list[LayerImportance], scores: tuple[str, ...], weights: Mapping[str, float],
            normalize: str = "rank") -> list[float]:
    """The ``combined`` score of each layer (see the module doc), in ``layers`` order."""
    if normalize not in ("rank", "sum"):
        raise ValueError(f"normalize must be 'rank' or 'sum', got {normalize!r}")
    normed: dict[str, list[float]] = {}
    for s in scores:
        vals = [lay.scores.get(s, math.nan) for lay in layers]
        normed[s] = _ranks(vals) if normalize == "rank" else _shares(vals)
    out = []
    for i in range(len(layers)):
        num = den = 0.0
        for s in scores:
            w = float(weights.get(s, 0.0))
            v = normed[s][i]
            if w > 0 and math.isfinite(v):
                num += w * v
                den += w
        out.append(num / den if den > 0 else math.nan)
    return out


# ------------------------------------------------------------------------------ internals


def _with_combined(layers: list[LayerImportance], scores: tuple[str, ...],
                   config: ImportanceConfig) -> list[LayerImportance]:
    combined = combine(layers, scores, config.weights, config.normalize)
    return [dataclasses.replace(lay, scores={**lay.scores, "combined": c}) for lay, c in zip(layers, combined)]


def _ranks(values: list[float]) -> list[float]:
    """Percentile rank in [0, 1] of each finite value (ties averaged); NaN stays NaN."""
    from scipy.stats import rankdata

    idx = [i for i, v in enumerate(values) if math.isfinite(v)]
    out = [math.nan] * len(values)
    if not idx:
        return out
    ranks = rankdata([values[i] for i in idx], method="average")
    span = max(len(idx) - 1, 1)
    for i, r in zip(idx, ranks):
        out[i] = (float(r) - 1.0) / span if len(idx) > 1 else 1.0
    return out


def _shares(values: list[float]) -> list[float]:
    """Each finite value over the sum of all finite values (negatives, e.g. KL noise, count as 0)."""
    clean = [max(v, 0.0) if math.isfinite(v) else math.nan for v in values]
    total = sum(v for v in clean if math.isfinite(v))
    return [v / total if (math.isfinite(v) and total > 0) else (0.0 if math.isfinite(v) else math.nan)
            for v in clean]


def _log_histogram(t: torch.Tensor) -> tuple[list[int], int]:
    flat = t.reshape(-1)
    positive = flat[flat > 0]
    n_zero = flat.numel() - positive.numel()
    if positive.numel() == 0:
        return [0] * HIST_BINS, n_zero
    logs = positive.log10().clamp_(HIST_LOG10_MIN, HIST_LOG10_MAX - 1e-6)
    counts = torch.histc(logs, bins=HIST_BINS, min=HIST_LOG10_MIN, max=HIST_LOG10_MAX)
    return [int(c) for c in counts.round().tolist()], n_zero


def _pick_format(sensitivity, requested: str | None) -> str:
    names = [f if isinstance(f, str) else f.name for f in sensitivity.formats]
    if not names:
        raise ValueError("the sensitivity measurement has no formats")
    if requested is not None:
        if requested not in names:
            raise ValueError(f"sensitivity_format {requested!r} was not measured; measured: {names}")
        return requested
    # The lowest-bit format: its KL separates layers most clearly (8-bit KLs are mostly noise).
    return min(names, key=lambda n: (parse_format(n).bits_per_weight(1 << 20), n))


def _sensitivity_kl(sensitivity, name: str, fmt: str) -> float:
    measured = {m if isinstance(m, str) else m.name for m in sensitivity.modules}
    if name not in measured:
        return math.nan
    try:
        return float(sensitivity.kl(name, fmt))
    except (KeyError, ValueError):  # a measurement still in progress: this layer has no value yet
        return math.nan


def _sort_key(v: float | None) -> tuple[int, float]:
    return (0, -v) if v is not None and math.isfinite(v) else (1, 0.0)


def _finite_or_none(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _json_float(v: float) -> float | None:
    return v if math.isfinite(v) else None


# --------------------------------------------------------------------------- pipeline stage

@stage_handler(ImportanceConfig)
def _importance_stage(session: StageSession, cfg: ImportanceConfig) -> ImportanceResult:
    levels = session.require("levels")
    return score_importance(session.working, levels, cfg, tokenizer=session.tokenizer,
                            sensitivity=session.results.get("sensitivity"), progress=session.progress)
