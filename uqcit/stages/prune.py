"""Pruning (seed 000 §2): prime resonance selection, and the magnitude and Wanda baselines.

**Prime resonance selection** (000 §2.1) keeps ``W[i, j]`` only where both the row index ``i``
and the column index ``j`` are prime and ``|W[i, j]|`` exceeds the τ quantile:

    W'[i, j] = W[i, j]  if i ∈ P and j ∈ P and |W[i, j]| > q_τ,   else 0

Indexing convention (``PruneConfig.index_base``): with ``0`` (default, Python's) the tested
number is the index itself, so the first kept row is row 2; with ``1`` (the seed's math
notation, rows counted from 1) the tested number is ``i + 1``, so row 1 (the second row) is
the first candidate. ``q_τ`` is the lower empirical τ-quantile (the ``ceil(τ·n)``-th smallest
value) of ``|W|`` over the prime-indexed entries (``quantile_over="prime"``, default) or over
the whole matrix (``"matrix"``); τ = 0.8 is the seed's "top 20%". Ties at the threshold are
dropped (strictly greater).

The seed claims ``|W'| ≈ N / ln N`` (000 §2.2). It does not follow from the rule: primes up to
``n`` have density about ``1 / ln n``, so a ``m × n`` matrix keeps about
``(1 − τ) · π(m) · π(n) ≈ (1 − τ) · N / (ln m · ln n)`` weights — ``PruneResult`` counts both
exactly, per layer and in total, so the gap is visible rather than argued.

**Baselines**, at a kept fraction given directly or matched per layer to prime selection
(``match_prime=True``): ``magnitude`` keeps each layer's largest ``|W|``; ``wanda`` (Sun et al.
2023) keeps, in each output row, the largest ``|W_ij| · ‖x_j‖`` with ``‖x_j‖`` the RMS of input
channel ``j`` on calibration text (``calibration.collect_input_stats``).

Every pruned Linear (or GPT-2 ``Conv1D``) becomes a ``MaskedLinear``: a dense float ``weight``
parameter, exactly zero where pruned, and a bool ``mask`` buffer (True = kept), so training
under a fixed mask (``uqcit.stages.retrain``) can update the kept weights. A pruned embedding becomes a
``MaskedEmbedding`` of the same shape; an LM head tied to it becomes a ``MaskedLinear`` sharing its
``weight`` and ``mask``. By default only the Linears inside the blocks are pruned (levels 2-5);
``outside_blocks=True`` adds an untied LM head, and level 1 in ``levels`` the embeddings. Packages
store pruned layers sparse (``sparse_encode``): the kept values plus a bitmap or an index list,
whichever takes fewer bytes.

>>> from uqcit.inputs.tiny import tiny_model
>>> from uqcit.stages.levels import analyze_levels
>>> model, tok = tiny_model("llama")
>>> res = prune_model(model, analyze_levels(model), PruneConfig(method="prime"), progress=False)
>>> res.method_name, 0 < res.kept_fraction < 0.02
('prime-tau0.8', True)
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any, ClassVar, Literal, Mapping

import torch
from torch import nn

from uqcit.inputs.calibration import InputStats
from uqcit.inputs.corpus import stage_calibration
from uqcit.core.config import StageConfig, StageSession, register_config, stage_handler
from uqcit.stages.importance import activation_source
from uqcit.stages.plan import LEVEL_COLORS
from uqcit.core.record import ExportRecord, module_records, weight_noise_profile
from uqcit.core.results import Result
from uqcit.runtime.modules import linear_weight, replace_module, weight_matrix
from uqcit.runtime.masked import MaskedEmbedding, MaskedLinear  # noqa: F401 (public here too)
from uqcit.tensor.sparse import (  # noqa: F401 (public here too)
    VALUE_DTYPES, index_dtype, sparse_decode, sparse_encode, sparse_storage)

PRUNE_METHODS = ("prime", "magnitude", "wanda")


@register_config
@dataclasses.dataclass(frozen=True)
class PruneConfig(StageConfig):
    """Which weights to keep, in which layers, and how the kept values are stored."""

    type_tag: ClassVar[str] = "prune"

    method: Literal["prime", "magnitude", "wanda"] = "prime"
    tau: float = 0.8  # prime: keep |W| above the τ quantile; 0.8 is the seed's "top 20%"
    quantile_over: Literal["prime", "matrix"] = "prime"  # prime: quantile of the prime-indexed entries; matrix: of all
    index_base: int = 0  # 0: index i itself must be prime (Python); 1: i + 1 must be (the seed's 1-based notation)
    kept_fraction: float = 0.5  # magnitude/wanda: share of each pruned layer's weights kept (Wanda's usual 50%)
    match_prime: bool = False  # magnitude/wanda: keep per layer exactly as many weights as prime selection would
    levels: tuple[int, ...] = (2, 3, 4, 5)  # levels pruned; add 1 (embeddings) with outside_blocks to prune those
    modules: str | None = None  # regex (re.search) narrowing the pruned modules; None: all of those levels
    outside_blocks: bool = False  # also prune modules outside the blocks: embeddings, an untied LM head
    value_dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # kept values as stored (and run)
    calib_samples: int = 32  # wanda: calibration sequences; a forward pass only (no Hessian), ~8k tokens
    calib_seq_len: int = 256
    seed: int = 0  # wanda: calibration offsets

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(sorted(set(self.levels))))  # one spelling per scope
        super().__post_init__()  # method, quantile_over, value_dtype: one of their Literal values
        self.check(0.0 <= self.tau < 1.0, "tau", "must be in [0, 1) (0.8 keeps the top 20%)")
        self.check(self.index_base in (0, 1), "index_base", "must be 0 or 1")
        self.check(0.0 < self.kept_fraction <= 1.0, "kept_fraction", "must be in (0, 1]")
        self.check(bool(self.levels) and all(lv in (1, 2, 3, 4, 5) for lv in self.levels), "levels",
                   "must be a non-empty subset of 1..5")
        self.check(self.calib_samples >= 1, "calib_samples", "must be >= 1")
        self.check(self.calib_seq_len >= 1, "calib_seq_len", "must be >= 1")

    @property
    def method_name(self) -> str:
        """What was applied, e.g. ``prime-tau0.8``, ``wanda-as-prime-tau0.8``, ``magnitude-keep0.5``;
        ``-L12345-outer`` when other levels than the blocks' Linears (2-5) are pruned."""
        prime = f"prime-tau{self.tau:g}"
        if self.quantile_over != "prime":
            prime += f"-q{self.quantile_over}"
        if self.index_base != 0:
            prime += f"-base{self.index_base}"
        if self.method == "prime":
            name = prime
        elif self.match_prime:
            name = f"{self.method}-as-{prime}"
        else:
            name = f"{self.method}-keep{self.kept_fraction:g}"
        if self.levels != (2, 3, 4, 5) or self.outside_blocks:  # not the default scope: say which levels
            name += "-L" + "".join(str(lv) for lv in self.levels) + ("-outer" if self.outside_blocks else "")
        if self.modules is not None:
            name += "-subset"
        return name if self.value_dtype == "float32" else f"{name}-{self.value_dtype}"


# --------------------------------------------------------------------------- pure selection functions


def prime_indices(n: int, index_base: int = 0) -> torch.Tensor:
    """Bool ``[n]``: which of the indices ``0..n-1`` count as prime under ``index_base``.

    >>> prime_indices(8).nonzero().flatten().tolist(), prime_indices(8, 1).nonzero().flatten().tolist()
    ([2, 3, 5, 7], [1, 2, 4, 6])
    """
    if n < 0 or index_base not in (0, 1):
        raise ValueError(f"need n >= 0 and index_base 0 or 1, got {n}, {index_base}")
    top = n + index_base  # largest tested number + 1
    is_prime = torch.ones(max(top, 2), dtype=torch.bool)
    is_prime[:2] = False
    for p in range(2, math.isqrt(max(top - 1, 0)) + 1):
        if is_prime[p]:
            is_prime[p * p::p] = False
    return is_prime[index_base:index_base + n].clone()


def quantile_threshold(values: torch.Tensor, tau: float) -> float:
    """The lower empirical τ-quantile of ``values``: its ``ceil(τ·n)``-th smallest element.

    ``values > threshold`` then keeps the top ``1 − τ`` share (fewer with ties); ``-inf`` when
    ``ceil(τ·n) = 0`` (keep all), ``+inf`` for no values.
    """
    n = values.numel()
    if n == 0:
        return math.inf
    k = math.ceil(round(tau * n, 9))  # round: 0.8 * 100 is 80.00000000000001 in floats
    if k <= 0:
        return -math.inf
    return float(values.reshape(-1).float().kthvalue(k).values)


def prime_mask(weight: torch.Tensor, tau: float = 0.8, *, quantile_over: str = "prime",
               index_base: int = 0) -> tuple[torch.Tensor, float]:
    """Prime resonance selection of ``weight`` ``[out, in]``: the bool mask and the threshold used."""
    a = weight.detach().abs()
    grid = prime_indices(a.shape[0], index_base)[:, None] & prime_indices(a.shape[1], index_base)[None, :]
    grid = grid.to(a.device)
    if quantile_over == "prime":
        threshold = quantile_threshold(a[grid], tau)
    elif quantile_over == "matrix":
        threshold = quantile_threshold(a, tau)
    else:
        raise ValueError(f"quantile_over must be 'prime' or 'matrix', got {quantile_over!r}")
    return grid & (a > threshold), threshold


def topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries of ``score`` (whole tensor)."""
    k = _check_k(score, k)
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        mask[score.reshape(-1).topk(k, sorted=False).indices] = True
    return mask.view(score.shape)


def row_topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask keeping ``k`` entries of ``score`` ``[out, in]``, spread evenly over the rows.

    Every row keeps its ``k // out`` largest (Wanda's per-output comparison group); the
    ``k mod out`` left over go to the rows whose next-largest score is highest, so exactly ``k``
    are kept and a budget matched to another method is met to the weight.
    """
    k = _check_k(score, k)
    rows, cols = score.shape
    q, r = divmod(k, rows)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=score.device)
    if q == cols:
        return mask.fill_(True)
    order = score.argsort(dim=1, descending=True, stable=True)  # stable: deterministic on ties
    if q:
        mask.scatter_(1, order[:, :q], True)
    if r:
        nxt = score.gather(1, order[:, q:q + 1]).squeeze(1)
        extra = nxt.topk(r, sorted=False).indices
        mask[extra, order[extra, q]] = True
    return mask


def _check_k(score: torch.Tensor, k: int) -> int:
    if not 0 <= k <= score.numel():
        raise ValueError(f"k must be in [0, {score.numel()}], got {k}")
    return int(k)


# --------------------------------------------------------------------------- the result


@dataclasses.dataclass(frozen=True)
class ModulePrune:
    """What pruning one module kept, stored and cost."""

    name: str
    level: int
    kind: str
    shape: tuple[int, int]
    numel: int
    kept: int
    candidates: int  # prime: prime-indexed entries (rows × cols below); others: numel
    prime_rows: int  # rows with a prime index under the config's index_base (counted for every method)
    prime_cols: int
    threshold: float | None  # prime: the τ-quantile of |W| used; None for the baselines
    storage: str  # "bitmap" or "indices"
    stored_bits: int  # values + bitmap/indices
    rel_error: float  # ‖W − W'‖ / ‖W‖
    sqnr_db: float
    seconds: float
    tied_to: str | None = None

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.numel

    @property
    def claim(self) -> float:
        """The seed's ``N / ln N`` for this matrix."""
        return self.numel / math.log(self.numel) if self.numel > 1 else float(self.numel)

    @property
    def bpw(self) -> float:
        return self.stored_bits / self.numel

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"kept_fraction": self.kept_fraction, "claim_n_over_ln_n": self.claim,
                                           "kept_over_claim": self.kept / self.claim, "bpw": self.bpw}


@dataclasses.dataclass(repr=False)
class PruneResult(Result):
    """The pruned model, and per module what was kept against ``N`` and the seed's ``N / ln N``.

    ``model_params`` is every weight-bearing parameter of the model (tied ones once), so the
    whole-model totals say how many weights remain stored (kept + left dense).
    """

    model: torch.nn.Module
    modules: list[ModulePrune]
    config: PruneConfig
    model_params: int
    seconds: float
    stage_seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def method_name(self) -> str:
        return self.config.method_name

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def stored(self) -> list[ModulePrune]:
        """Modules whose weights are stored (tied duplicates excluded)."""
        return [m for m in self.modules if m.tied_to is None]

    @property
    def weight_count(self) -> int:
        """Weights of the pruned layers (before pruning): the ``N`` of the per-layer accounting."""
        return sum(m.numel for m in self.stored)

    @property
    def kept(self) -> int:
        return sum(m.kept for m in self.stored)

    @property
    def kept_fraction(self) -> float:
        return self.kept / max(self.weight_count, 1)

    @property
    def stored_bits(self) -> int:
        return sum(m.stored_bits for m in self.stored)

    @property
    def bpw(self) -> float:
        """Stored bits of the pruned layers (values + bitmaps/indices) per weight they had."""
        return self.stored_bits / max(self.weight_count, 1)

    def masks(self) -> dict[str, torch.Tensor]:
        """Each pruned module's mask (bool ``[out, in]``), e.g. to match another method's budget."""
        named = dict(self.model.named_modules())
        return {m.name: named[m.name].mask for m in self.stored}

    def accounting(self) -> dict[str, Any]:
        """Kept weights vs ``N`` and vs ``N / ln N``: over the pruned layers and over the whole model."""
        n, k = self.weight_count, self.kept
        dense = self.model_params - n
        total = self.model_params
        return {
            "pruned_layers": {"modules": len(self.stored), "N": n, "kept": k, "kept_fraction": k / max(n, 1),
                              "claim_n_over_ln_n": _claim(n), "kept_over_claim": k / _claim(n)},
            "whole_model": {"N": total, "stored_weights": k + dense, "left_dense": dense,
                            "stored_fraction": (k + dense) / max(total, 1),
                            "claim_n_over_ln_n": _claim(total),
                            "stored_over_claim": (k + dense) / _claim(total)},
        }

    def export_record(self) -> ExportRecord:
        """What ``uqcit.package.export_package`` writes: sparse layers, their figures and the accounting."""
        modules = module_records(self.modules)
        return ExportRecord(model=self.model, method=self.method_name, bpw=self.bpw,
                            stored_bits=self.stored_bits, weight_count=self.weight_count, modules=modules,
                            noise_profile=weight_noise_profile(modules),
                            pruning={"config": self.config.to_dict(), "accounting": self.accounting()},
                            sparse_value_dtype=self.config.value_dtype)

    def summary(self) -> str:
        acc = self.accounting()
        p, w = acc["pruned_layers"], acc["whole_model"]
        return (f"{self.method_name}: {len(self.stored)} layers pruned, kept {p['kept']:,} of {p['N']:,} "
                f"weights ({100 * p['kept_fraction']:.3f}%; N/ln N would be {p['claim_n_over_ln_n']:,.0f}, "
                f"{p['kept_over_claim']:.3f}× of it); whole model stores {w['stored_weights']:,} of {w['N']:,} "
                f"({100 * w['stored_fraction']:.2f}%); {self.bpw:.4f} bits/weight in the pruned layers, "
                f"{self.seconds:.1f} s")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method_name, "config": self.config.to_dict(), "bpw": self.bpw,
                "stored_bits": self.stored_bits, "weight_count": self.weight_count, "kept": self.kept,
                "kept_fraction": self.kept_fraction, "model_params": self.model_params,
                "accounting": self.accounting(), "seconds": self.seconds, "stage_seconds": self.stage_seconds,
                "modules": [m.to_dict() for m in self.modules]}

    def table_rows(self):
        return (("module", "level", "shape", "N", "kept", "kept %", "N/ln N", "kept/(N/ln N)", "storage",
                 "bits/weight", "rel. error"),
                [(m.name, m.level, f"{m.shape[0]}×{m.shape[1]}", m.numel, m.kept, 100 * m.kept_fraction,
                  m.claim, m.kept / m.claim, m.storage, m.bpw, m.rel_error) for m in self.stored])

    def figure(self):
        """Kept fraction vs matrix size per layer (log-log), against the seed's ``1 / ln N``."""
        import plotly.graph_objects as go

        fig = go.Figure()
        stored = self.stored
        for lvl in sorted({m.level for m in stored}):
            ms = [m for m in stored if m.level == lvl]
            fig.add_scatter(x=[m.numel for m in ms], y=[m.kept_fraction for m in ms], mode="markers",
                            name=f"L{lvl} layers", uid=f"prune-L{lvl}", marker_color=LEVEL_COLORS.get(lvl),
                            hovertext=[f"{m.name}<br>{m.shape[0]}×{m.shape[1]}<br>kept {m.kept:,}" for m in ms],
                            hoverinfo="text+y")
        acc = self.accounting()["pruned_layers"]
        fig.add_scatter(x=[acc["N"]], y=[acc["kept_fraction"]], mode="markers", name="all pruned layers",
                        uid="prune-total", marker=dict(symbol="star", size=14, color="black"))
        sizes = [m.numel for m in stored] + [acc["N"]]
        lo, hi = math.log10(max(min(sizes), 2)), math.log10(max(sizes))
        xs = [10 ** (lo + (hi - lo) * t / 40) for t in range(41)]
        fig.add_scatter(x=xs, y=[1 / math.log(x) for x in xs], mode="lines", name="seed claim: 1 / ln N",
                        uid="prune-claim", line=dict(dash="dash", color="grey"))
        fig.update_layout(title=f"Kept fraction vs matrix size — {self.method_name}",
                          xaxis=dict(type="log", title="weights in the matrix N"),
                          yaxis=dict(type="log", title="kept fraction |W'| / N"), height=420,
                          template="plotly_white")
        return fig


def _claim(n: int) -> float:
    return n / math.log(n) if n > 1 else float(n)


# --------------------------------------------------------------------------- the stage


def prune_targets(levels, config: PruneConfig) -> list:
    """The ``levels`` entries ``config`` prunes: owned weights of the chosen levels, inside blocks
    unless ``outside_blocks``, narrowed by the ``modules`` regex."""
    from uqcit.stages.levels import select_modules

    entries = select_modules(levels, config.modules)
    out = [e for e in entries if e.level in config.levels and (e.block is not None or config.outside_blocks)]
    if not out:
        raise ValueError(f"PruneConfig(levels={list(config.levels)}, modules={config.modules!r}, "
                         f"outside_blocks={config.outside_blocks}) selects no layer of this model; levels 2-5 "
                         "hold the attention and FFN projections, level 1 the embeddings (outside the blocks)")
    return out


def prune_model(model: torch.nn.Module, levels, config: PruneConfig = PruneConfig(), *, tokenizer=None,
                calibration: torch.Tensor | None = None, stats: Mapping[str, InputStats] | None = None,
                progress: bool = True) -> PruneResult:
    """Prune a copy of ``model`` per ``config``; the caller's model is not modified.

    ``levels`` is the ``LevelsResult`` of ``model``. ``method="wanda"`` needs calibration text:
    ``calibration`` (``LongTensor [n, seq]``) or a ``tokenizer`` to draw ``uqcit.inputs.corpus.calibration_batch``
    (which never overlaps the evaluation windows); ``stats`` reuses input statistics already
    collected (``calibration.collect_input_stats`` of the pruned modules). Every pruned layer of the result's model is a
    ``MaskedLinear``; its kept values are already rounded to ``config.value_dtype``, so the model
    computes exactly what its package stores.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    targets = prune_targets(levels, config)
    out = copy.deepcopy(model)
    out.eval()
    named = dict(out.named_modules())
    seconds: dict[str, float] = {}

    # Wanda scores a weight by the inputs of the module it feeds: an embedding tied to a Linear head
    # by the head's inputs, an untied one by its tokens' frequencies (importance.activation_source).
    sources = {e.name: activation_source(levels, e.name) for e in targets}
    stats = dict(stats or {})
    missing = sorted({s for s in sources.values() if s not in stats})
    if config.method == "wanda" and missing:
        from uqcit.inputs.calibration import collect_input_stats

        t0 = time.perf_counter()
        batch = stage_calibration(config, tokenizer, calibration,
                                  what="prune with method='wanda' (for its input norms)")
        stats.update(collect_input_stats(out, batch, missing, hessian=False, progress=progress))
        seconds["calibration"] = time.perf_counter() - t0

    records: list[ModulePrune] = []
    pruned: dict[str, MaskedLinear | MaskedEmbedding] = {}
    t_prune = time.perf_counter()
    for entry in tqdm(targets, desc=f"prune ({config.method})", unit="module", disable=not progress):
        t0 = time.perf_counter()
        module = named[entry.name]
        weight = weight_matrix(module).to(torch.float32)
        mask, threshold = _select(weight, config, stats.get(sources[entry.name]))
        kept_w = weight.to(VALUE_DTYPES[config.value_dtype]).to(module.weight.dtype)  # what the package stores
        if isinstance(module, nn.Embedding):
            new = MaskedEmbedding(kept_w, mask, module.padding_idx)
        else:
            new = MaskedLinear(kept_w, mask, linear_weight(module)[1])
        replace_module(out, entry.name, new)
        pruned[entry.name] = new
        kept = int(mask.sum())
        layout, bits = sparse_storage(mask.numel(), kept, config.value_dtype)
        err = (weight - new.weight.detach().float()).norm()
        norm = weight.norm()
        rows = int(prime_indices(weight.shape[0], config.index_base).sum())
        cols = int(prime_indices(weight.shape[1], config.index_base).sum())
        records.append(ModulePrune(
            name=entry.name, level=entry.level, kind=entry.kind, shape=tuple(weight.shape),
            numel=weight.numel(), kept=kept, candidates=rows * cols if config.method == "prime" else weight.numel(),
            prime_rows=rows, prime_cols=cols, threshold=threshold, storage=layout, stored_bits=bits,
            rel_error=float(err / norm) if norm > 0 else 0.0,
            sqnr_db=float(20 * torch.log10(norm / err)) if err > 0 else math.inf,
            seconds=time.perf_counter() - t0))
    seconds["prune"] = time.perf_counter() - t_prune

    for entry in levels.modules:  # modules sharing a pruned weight share its weight and mask
        if entry.tied_to not in pruned:
            continue
        owner, module = pruned[entry.tied_to], named[entry.name]
        if isinstance(owner, MaskedEmbedding) and not isinstance(module, nn.Embedding):
            new = MaskedLinear.tied_to(owner, linear_weight(module)[1])  # an LM head tied to the embedding
        elif isinstance(module, nn.Embedding) == isinstance(owner, MaskedEmbedding):
            new = owner
        else:
            raise ValueError(f"{entry.name} ({type(module).__name__}) shares its weight with pruned "
                             f"{entry.tied_to} ({type(owner).__name__}); this pairing is not supported")
        replace_module(out, entry.name, new)
        rec = next(r for r in records if r.name == entry.tied_to)
        records.append(dataclasses.replace(rec, name=entry.name, level=entry.level, kind=entry.kind, stored_bits=0,
                                           seconds=0.0, tied_to=entry.tied_to))
    return PruneResult(out, records, config, levels.total_params, time.perf_counter() - t_start, seconds)


def _select(weight: torch.Tensor, config: PruneConfig, stats) -> tuple[torch.Tensor, float | None]:
    """The mask of one ``[out, in]`` weight (and the prime threshold, where there is one)."""
    if config.method == "prime":
        return prime_mask(weight, config.tau, quantile_over=config.quantile_over, index_base=config.index_base)
    if config.match_prime:
        k = int(prime_mask(weight, config.tau, quantile_over=config.quantile_over,
                           index_base=config.index_base)[0].sum())
    else:
        k = round(config.kept_fraction * weight.numel())
    if config.method == "magnitude":
        return topk_mask(weight.abs(), k), None
    from uqcit.inputs.calibration import channel_importance

    return row_topk_mask(channel_importance(stats, weight), k), None


# --------------------------------------------------------------------------- pipeline stage

@stage_handler(PruneConfig)
def _prune_stage(session: StageSession, cfg: PruneConfig) -> PruneResult:
    levels = session.require("levels")
    return prune_model(session.working, levels, cfg, tokenizer=session.tokenizer, progress=session.progress)
