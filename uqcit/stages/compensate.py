"""TensionForge compensation (seed 002 §2.2.5): measure and correct quantization noise per layer.

For each selected ``QuantLinear`` (default: the Level-3 layers, attention output projections),
with ``E = W − Ŵ`` its weight error and ``H = E[x xᵀ]``, ``μ = E[x]`` the statistics of its
inputs in the float model on calibration text:

- **noise estimates**: relative weight noise ``‖E‖ / ‖W‖`` and relative output noise
  ``sqrt(tr(E H Eᵀ) / tr(W H Wᵀ))`` (the RMS of the output error over the RMS of the output,
  on the calibration inputs), before and after compensation;
- **low-rank error correction**: the rank-``r`` factors ``A [out, r]``, ``B [r, in]`` minimizing
  ``E‖(E − AB) x‖²``: the SVD of ``E L`` with ``L Lᵀ = H + λI`` (whitening by the input second
  moment), ``A = U_r Σ_r^½``, then ``B`` refit by least squares after ``A`` is stored (optimal
  for the stored ``A`` in that norm); factors stored fp16 or in an integer format, their bits
  counted. Ranks per layer are given, or chosen greedily for a bit budget by the output-noise
  power each singular direction removes per bit;
- **output bias / scale correction**: per output channel, the affine fit ``y ≈ α ŷ + β`` of the
  float output ``y = Wx`` by the compensated one (``α = cov(y, ŷ) / var(ŷ)``,
  ``β = E[y] − α E[ŷ]``; bias only: ``α = 1``, ``β = (W − Ŵ') μ``), from ``H`` and ``μ``.

At run time the layer computes ``α (Ŵx + A(Bx)) + β + bias`` (``uqcit.runtime.modules.Compensation``).

``res.model`` is the compensated copy; ``res.noise_profile()`` goes to ``validation/noise_profile.json``.

>>> from uqcit.inputs.tiny import tiny_model
>>> from uqcit.stages.levels import analyze_levels
>>> from uqcit.stages.plan import PlanConfig, build_plan
>>> from uqcit.stages.quantize import quantize_model
>>> model, tok = tiny_model("llama")
>>> levels = analyze_levels(model)
>>> q = quantize_model(model, levels, build_plan(levels, PlanConfig(preset="uniform", bits=3, group_size=32)),
...                    progress=False)
>>> res = compensate(q, model, levels, CompensateConfig(rank=4, calib_samples=2, calib_seq_len=32),
...                  tokenizer=tok, progress=False)
>>> [m.name for m in res.compensated]  # the Level-3 layers (the last block is Level 5)
['model.layers.0.self_attn.o_proj', 'model.layers.1.self_attn.o_proj', 'model.layers.2.self_attn.o_proj']
>>> all(m.output_noise_after < m.output_noise for m in res.compensated), res.bpw > q.bpw
(True, True)
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any

import torch

from uqcit.inputs.calibration import InputStatsCollector
from uqcit.inputs.corpus import stage_calibration
from uqcit.core.config import ConfigError, StageConfig, StageSession, register_config, stage_handler
from uqcit.tensor.formats import FLOAT_BITS, parse_format
from uqcit.stages.levels import select_modules
from uqcit.stages.plan import LEVEL_COLORS
from uqcit.tensor.quant import dequantize, quantize
from uqcit.core.record import ExportRecord, module_records
from uqcit.core.results import Result
from uqcit.runtime.modules import Compensation, QuantLinear, linear_weight


@register_config
@dataclasses.dataclass(frozen=True)
class CompensateConfig(StageConfig):
    """Which layers get which correction, and how it is stored."""

    type_tag = "compensate"

    modules: str | None = None  # regex over module names; None: the Level-3 layers (the seed's choice)
    lowrank: bool = True  # low-rank error correction A(Bx)
    rank: int = 16  # rank per layer when rank_budget is None
    rank_budget: float | None = None  # all extra bits/weight over the compensated layers (shift/scale included); ranks chosen greedily
    factor_format: str = "fp16"  # storage of A and B: "fp16" or an integer format such as "w8-g64"
    bias: bool = True  # output shift β from calibration means (cheap: 16 bits per output)
    scale: bool = False  # also a per-output scale α (another 16 bits per output)
    damp: float = 0.01  # λ = damp · mean diag(H): keeps the whitening invertible
    calib_samples: int = 16  # calibration sequences (never overlapping the evaluation text)
    calib_seq_len: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(self.rank >= 0, "rank", "must be >= 0")
        self.check(self.rank_budget is None or self.rank_budget >= 0, "rank_budget", "must be >= 0 bits/weight")
        self.check(self.damp >= 0, "damp", "must be >= 0")
        self.check(self.calib_samples >= 1, "calib_samples", "must be >= 1")
        self.check(self.calib_seq_len >= 1, "calib_seq_len", "must be >= 1")
        try:
            fmt = parse_format(self.factor_format)
        except ValueError as exc:  # the parser's message lists the accepted spellings
            raise ConfigError(f"CompensateConfig.factor_format: {exc}") from None
        self.check(not fmt.mixed, "factor_format", "must be fp16 or a plain integer format")
        if not (self.lowrank or self.bias or self.scale):
            raise ConfigError("CompensateConfig: nothing to do: enable lowrank, bias or scale")

    @property
    def method_prefix(self) -> str:
        """What this config applies, for method names: e.g. ``comp-lowrank-r16-bias``."""
        parts = []
        if self.lowrank:
            r = f"b{self.rank_budget:g}" if self.rank_budget is not None else f"r{self.rank}"
            fmt = "" if self.factor_format == "fp16" else f"-{self.factor_format}"
            parts.append(f"lowrank-{r}{fmt}")
        if self.scale:
            parts.append("scale")
        elif self.bias:
            parts.append("bias")
        return "comp-" + "-".join(parts)


@dataclasses.dataclass(frozen=True)
class ModuleCompensation:
    """What compensating one layer cost and changed (noise measured on the calibration inputs)."""

    name: str
    level: int
    numel: int
    rank: int
    extra_bits: int  # all bits the compensation stores for this layer
    weight_noise: float  # ‖W − Ŵ‖ / ‖W‖
    output_noise: float  # sqrt(tr(E H Eᵀ) / tr(W H Wᵀ)) before compensation
    output_noise_after: float  # the same for the compensated layer (includes shift/scale)

    @property
    def extra_bpw(self) -> float:
        return self.extra_bits / self.numel


@dataclasses.dataclass(repr=False)
class CompensateResult(Result):
    """The compensated model and per-layer noise/bits; exports like a ``QuantizeResult``."""

    model: torch.nn.Module
    quantized: Any  # the QuantizeResult it started from
    config: CompensateConfig
    compensated: list[ModuleCompensation]
    noise: dict[str, dict[str, float]]  # every quantized Linear: weight_noise, output_noise (before)
    seconds: float
    calib_tokens: int

    # --- the figures a QuantizeResult has, compensation included
    @property
    def plan(self):
        return self.quantized.plan

    @property
    def modules(self):
        extra = {m.name: m.extra_bits for m in self.compensated}
        return [dataclasses.replace(m, stored_bits=m.stored_bits + extra.get(m.name, 0))
                if m.name in extra else m for m in self.quantized.modules]

    @property
    def stored(self):
        return [m for m in self.modules if m.tied_to is None]

    @property
    def weight_count(self) -> int:
        return self.quantized.weight_count

    @property
    def extra_bits(self) -> int:
        return sum(m.extra_bits for m in self.compensated)

    @property
    def stored_bits(self) -> int:
        return self.quantized.stored_bits + self.extra_bits

    @property
    def bpw(self) -> float:
        return self.stored_bits / max(self.weight_count, 1)

    @property
    def method_name(self) -> str:
        return f"{self.config.method_prefix}-{self.quantized.method_name}"

    def noise_profile(self) -> dict[str, Any]:
        """The ``validation/noise_profile.json`` content: per-layer noise before/after, bits."""
        comp = {m.name: m for m in self.compensated}
        modules = {}
        for name, n in self.noise.items():
            entry = dict(n)
            if name in comp:
                m = comp[name]
                entry.update(compensated=True, rank=m.rank, extra_bits=m.extra_bits,
                             output_noise_after=m.output_noise_after)
            modules[name] = entry
        return {"measure": {"weight_noise": "||W - W_hat||_F / ||W||_F",
                            "output_noise": "sqrt(tr(E H E^T) / tr(W H W^T)), E = W - W_hat, H = mean x x^T "
                                            "of the float model's inputs on calibration text",
                            "output_noise_after": "the same for the compensated layer"},
                "calibration_tokens": self.calib_tokens, "method": self.method_name,
                "compensation": self.config.to_dict(), "extra_bits": self.extra_bits,
                "modules": modules}

    def export_record(self) -> ExportRecord:
        """What ``uqcit.package.export_package`` writes: the quantized figures plus the compensation's
        bits, and the output noise before/after as the noise profile."""
        return ExportRecord(model=self.model, method=self.method_name, bpw=self.bpw,
                            stored_bits=self.stored_bits, weight_count=self.weight_count,
                            modules=module_records(self.modules), plan=self.plan.to_dict(),
                            noise_profile=self.noise_profile())

    def summary(self) -> str:
        if not self.compensated:
            return f"{self.method_name}: no layer compensated"
        before = _rms([m.output_noise for m in self.compensated])
        after = _rms([m.output_noise_after for m in self.compensated])
        return (f"{self.method_name}: {len(self.compensated)} layers, output noise {before:.4f} → {after:.4f} "
                f"(RMS over layers), +{self.extra_bits / max(self.weight_count, 1):.4f} bits/weight "
                f"→ {self.bpw:.3f} bits/weight, {self.seconds:.1f} s")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method_name, "config": self.config.to_dict(), "bpw": self.bpw,
                "extra_bits": self.extra_bits, "seconds": self.seconds, "calib_tokens": self.calib_tokens,
                "compensated": [dataclasses.asdict(m) for m in self.compensated], "noise": self.noise}

    def table_rows(self):
        return (("module", "level", "rank", "extra bits/weight", "weight noise", "output noise", "after"),
                [(m.name, m.level, m.rank, m.extra_bpw, m.weight_noise, m.output_noise, m.output_noise_after)
                 for m in self.compensated])

    def figure(self):
        """Output noise of each compensated layer before and after."""
        import plotly.graph_objects as go

        names = [m.name for m in self.compensated]
        fig = go.Figure()
        fig.add_bar(x=names, y=[m.output_noise for m in self.compensated], name="quantized",
                    marker_color="#bbbbbb", uid="comp-before")
        fig.add_bar(x=names, y=[m.output_noise_after for m in self.compensated], name="compensated",
                    marker_color=LEVEL_COLORS.get(3), uid="comp-after",
                    hovertext=[f"rank {m.rank}, +{m.extra_bpw:.3f} bits/weight" for m in self.compensated])
        fig.update_layout(title=f"Relative output noise on calibration inputs — {self.method_name}",
                          barmode="group", xaxis_showticklabels=False, yaxis_title="relative output noise",
                          height=380)
        return fig


def _rms(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values)) if values else float("nan")


# --------------------------------------------------------------------------- pure functions


def output_noise(error: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """``sqrt(tr(E H Eᵀ) / tr(W H Wᵀ))``: output error RMS over output RMS for inputs with ``H = E[x xᵀ]``."""
    num = float(((error @ hessian) * error).sum())
    den = float(((weight @ hessian) * weight).sum())
    return math.sqrt(max(num, 0.0) / den) if den > 0 else float("nan")


def whitened_svd(error: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, L`` with ``E L = U diag(S) Vᵀ`` and ``L Lᵀ = H + λI`` (``λ = damp · mean diag H``).

    ``S²`` are the output-error powers ``E‖·x‖²`` that each direction carries; the best rank-r
    correction removes the first r of them.
    """
    h = hessian.to(torch.float64)
    lam = damp * float(h.diagonal().mean()) if h.numel() else 0.0
    h = h + lam * torch.eye(h.shape[0], dtype=h.dtype)
    try:
        chol = torch.linalg.cholesky(h)
    except RuntimeError:  # a degenerate H (dead inputs): a little more damping
        chol = torch.linalg.cholesky(h + max(lam, 1e-6) * 10 * torch.eye(h.shape[0], dtype=h.dtype))
    u, s, _ = torch.linalg.svd(error.to(torch.float64) @ chol, full_matrices=False)
    return u, s, chol


def lowrank_factors(error: torch.Tensor, u: torch.Tensor, s: torch.Tensor, rank: int,
                    factor_format: str = "fp16"):
    """Stored factors ``(A, B)`` (``QuantizedTensor``s) of rank ``rank`` for ``error`` ``[out, in]``.

    ``A = U_r Σ_r^½`` is stored first; ``B = argmin ‖(E − Â B) x‖`` over inputs with an
    invertible second moment is ``Â⁺ E``, computed from the stored ``Â`` and then stored.
    """
    fmt = parse_format(factor_format)
    a = (u[:, :rank] * s[:rank].sqrt()).to(torch.float32)
    qa = quantize(a, fmt)
    a_hat = dequantize(qa).to(torch.float64)
    b = torch.linalg.lstsq(a_hat, error.to(torch.float64)).solution.to(torch.float32)
    qb = quantize(b, fmt)
    return qa, qb


def affine_correction(weight: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor, mean: torch.Tensor,
                      scale: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per-output ``(α, β)`` fitting ``Wx ≈ α Ŵx + β`` over inputs with moments ``H``, ``μ``.

    Without ``scale``: ``α`` is None (1) and ``β = (W − Ŵ) μ``. Returned in float32.
    """
    w, wh = weight.to(torch.float64), w_hat.to(torch.float64)
    h, mu = hessian.to(torch.float64), mean.to(torch.float64)
    ey, eyh = w @ mu, wh @ mu
    if not scale:
        return None, (ey - eyh).to(torch.float32)
    cov_in = h - torch.outer(mu, mu)
    whc = wh @ cov_in
    var = (whc * wh).sum(1)
    cov = (whc * w).sum(1)
    alpha = torch.where(var > 1e-12 * var.max().clamp(min=1e-30), cov / var.clamp(min=1e-30), torch.ones_like(var))
    return alpha.to(torch.float32), (ey - alpha * eyh).to(torch.float32)


def corrected_output_noise(weight: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor, mean: torch.Tensor,
                           alpha: torch.Tensor | None, beta: torch.Tensor | None) -> float:
    """Relative output noise of ``α Ŵx + β`` against ``Wx`` (``E[(dᵀx − β)²]`` per output, ``d = W − αŴ``)."""
    w, h, mu = weight.to(torch.float64), hessian.to(torch.float64), mean.to(torch.float64)
    wh = w_hat.to(torch.float64)
    d = w - (wh if alpha is None else alpha.to(torch.float64)[:, None] * wh)
    err = ((d @ h) * d).sum(1)
    if beta is not None:
        b = beta.to(torch.float64)
        err = err - 2 * b * (d @ mu) + b * b
    den = float(((w @ h) * w).sum())
    return math.sqrt(max(float(err.sum()), 0.0) / den) if den > 0 else float("nan")


def budget_ranks(spectra: dict[str, torch.Tensor], signal: dict[str, float], costs: dict[str, int],
                 budget_bits: float) -> dict[str, int]:
    """Ranks per layer for ``budget_bits``: greedy by relative output-noise power removed per bit.

    ``spectra[name]`` are the whitened singular values of the layer's error (descending),
    ``signal[name]`` its output power ``tr(W H Wᵀ)``, ``costs[name]`` the bits one rank stores.
    Gains per layer decrease with the rank, so taking directions in order of gain per bit
    never skips a cheaper better one of the same layer.
    """
    cands = []
    for name, s in spectra.items():
        gains = (s.to(torch.float64) ** 2 / max(signal[name], 1e-30)).tolist()
        cands += [(g / costs[name], name) for g in gains]
    cands.sort(key=lambda c: -c[0])
    ranks = {name: 0 for name in spectra}
    spent = 0.0
    for _, name in cands:
        if spent + costs[name] > budget_bits:
            continue  # a cheaper layer may still fit
        ranks[name] += 1
        spent += costs[name]
    return ranks


# --------------------------------------------------------------------------- the stage


class _MeanCollector:
    """Forward pre-hooks accumulating the token mean of each named module's input (beside
    ``InputStatsCollector``, which keeps only second moments)."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        self._sums = {n: None for n in names}
        self._count = {n: 0 for n in names}
        self._handles = []
        named = dict(model.named_modules())
        for n in names:
            self._handles.append(named[n].register_forward_pre_hook(self._hook(n)))

    def _hook(self, name: str):
        def hook(_module, args):
            x = args[0].detach()
            flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
            s = flat.sum(0)
            self._sums[name] = s if self._sums[name] is None else self._sums[name] + s
            self._count[name] += flat.shape[0]
        return hook

    def close(self) -> dict[str, torch.Tensor]:
        for h in self._handles:
            h.remove()
        return {n: (self._sums[n] / max(self._count[n], 1)).to(torch.float32) for n in self._sums}


def default_modules(levels) -> list[str]:
    """The seed's compensation points: Level-3 layers (attention output / cross-attention)."""
    return [e.name for e in levels.quantizable() if e.level == 3 and e.kind != "embedding"]


@dataclasses.dataclass(eq=False)
class CompensationStats:
    """The "accumulate" half of ``compensate``: input second moments and means per Linear."""

    stats: dict[str, Any]  # name -> calibration.InputStats (with hessian)
    means: dict[str, torch.Tensor]  # name -> float32 [in]
    tokens: int


def collect_compensation_stats(reference: torch.nn.Module, names: list[str], calibration: torch.Tensor, *,
                               progress: bool = True) -> CompensationStats:
    """Input ``E[xxᵀ]`` and ``E[x]`` of the Linear layers ``names`` of the float ``reference`` on
    ``calibration`` (``LongTensor [n, seq]``), in one pass; reusable across ``compensate`` calls."""
    from tqdm.auto import tqdm

    device = next(reference.parameters()).device
    with InputStatsCollector(reference, names, hessian=True) as col, torch.no_grad():
        means = _MeanCollector(reference, names)
        try:
            for s in tqdm(range(0, calibration.shape[0], 4), desc="calibration inputs", unit="batch",
                          disable=not progress):
                reference(input_ids=calibration[s:s + 4].to(device), use_cache=False)
                col.end_batch()
        finally:
            mu = means.close()
    return CompensationStats(col.stats(), mu, int(calibration.numel()))


def quantized_linears(quantized) -> list[str]:
    """Names of the stored (untied) ``QuantLinear`` layers of a ``QuantizeResult``."""
    named = dict(quantized.model.named_modules())
    return [m.name for m in quantized.modules if m.tied_to is None and isinstance(named.get(m.name), QuantLinear)]


def compensate(quantized, reference: torch.nn.Module, levels, config: CompensateConfig = CompensateConfig(), *,
               tokenizer=None, calibration: torch.Tensor | None = None, stats: CompensationStats | None = None,
               progress: bool = True) -> CompensateResult:
    """Noise estimates for every quantized Linear of ``quantized`` (a ``QuantizeResult``) and
    compensation of the selected ones, on a copy of ``quantized.model``.

    ``reference`` is the float model ``quantized`` came from (its weights and its inputs on
    calibration text define the target). Calibration text: ``calibration`` (``LongTensor
    [n, seq]``) or ``tokenizer`` for ``uqcit.inputs.corpus.calibration_batch`` (never the evaluation text);
    or ``stats`` from ``collect_compensation_stats`` over all ``quantized_linears(quantized)``,
    to compare several configs without re-collecting.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    qmodel = quantized.model
    qnamed = dict(qmodel.named_modules())
    rnamed = dict(reference.named_modules())
    linears = [n for n in quantized_linears(quantized) if n in rnamed]
    if config.modules is None:
        chosen = [n for n in default_modules(levels) if n in linears]
    else:
        chosen = [e.name for e in select_modules(levels, config.modules) if e.name in linears]
    if not chosen:
        raise ValueError(f"no quantized Linear layer to compensate (modules={config.modules!r}); "
                         f"quantized Linear layers: {linears[:3]}…")

    if stats is None:
        calibration = stage_calibration(config, tokenizer, calibration, what="compensate",
                                        alternative=" or stats=collect_compensation_stats(...)")
        # Statistics of every quantized Linear's input in the float model: H for the noise
        # profile of all of them, means for the compensated ones.
        stats = collect_compensation_stats(reference, linears, calibration, progress=progress)
    missing = [n for n in linears if n not in stats.stats or n not in stats.means]
    if missing:
        raise ValueError(f"stats lack {len(missing)} quantized Linear layer(s), e.g. {missing[:3]}; collect them "
                         "with collect_compensation_stats(reference, quantized_linears(quantized), ...)")
    mu, tokens = stats.means, stats.tokens
    stats = stats.stats

    weights, errors, noise = {}, {}, {}
    for name in linears:
        w = linear_weight(rnamed[name])[0].detach().to(torch.float32).cpu()
        w_hat = dequantize(qnamed[name].qtensor)
        e = w - w_hat
        h = stats[name].hessian.cpu()
        noise[name] = {"weight_noise": float(e.norm() / w.norm()) if float(w.norm()) > 0 else float("nan"),
                       "output_noise": output_noise(e, w, h)}
        if name in chosen:
            weights[name], errors[name] = (w, w_hat), e

    spectra, factors_u, signal, costs = {}, {}, {}, {}
    fmt = parse_format(config.factor_format)
    if config.lowrank:
        for name in tqdm(chosen, desc="whitened SVD", unit="layer", disable=not progress):
            h = stats[name].hessian.cpu()
            u, s, _ = whitened_svd(errors[name], h, config.damp)
            spectra[name], factors_u[name] = s, u
            w = weights[name][0]
            signal[name] = float(((w.to(torch.float64) @ h.to(torch.float64)) * w.to(torch.float64)).sum())
            out_f, in_f = w.shape
            costs[name] = math.ceil(fmt.bits_per_weight(out_f * 64) * (out_f + in_f))  # one rank of A and B
        if config.rank_budget is not None:
            total = sum(weights[n][0].numel() for n in chosen)
            affine = 16 * (int(config.bias or config.scale) + int(config.scale)) * sum(weights[n][0].shape[0] for n in chosen)
            ranks = budget_ranks(spectra, signal, costs, config.rank_budget * total - affine)
        else:
            ranks = {n: min(config.rank, spectra[n].numel()) for n in chosen}
    else:
        ranks = {n: 0 for n in chosen}

    model = copy.deepcopy(qmodel)
    named = dict(model.named_modules())
    records = []
    level_of = {e.name: e.level for e in levels.modules}
    for name in tqdm(chosen, desc="compensate", unit="layer", disable=not progress):
        w, w_hat = weights[name]
        h = stats[name].hessian.cpu()
        qa = qb = None
        w_comp = w_hat
        if ranks[name] > 0:
            qa, qb = lowrank_factors(errors[name], factors_u[name], spectra[name], ranks[name], config.factor_format)
            w_comp = w_hat + dequantize(qa) @ dequantize(qb)
        alpha = beta = None
        if config.bias or config.scale:
            alpha, beta = affine_correction(w, w_comp, h, mu[name].cpu(), config.scale)
            beta = beta.to(torch.float16).to(torch.float32)  # measure what is stored
            if alpha is not None:
                alpha = alpha.to(torch.float16).to(torch.float32)
        comp = Compensation(qa, qb, None if alpha is None else alpha.to(torch.float16),
                            None if beta is None else beta.to(torch.float16))
        named[name].set_compensation(comp)
        after = corrected_output_noise(w, w_comp, h, mu[name].cpu(), alpha, beta)
        records.append(ModuleCompensation(name, level_of.get(name, 0), w.numel(), comp.rank, comp.stored_bits,
                                          noise[name]["weight_noise"], noise[name]["output_noise"], after))
    return CompensateResult(model, quantized, config, records, noise, time.perf_counter() - t_start, tokens)


# --------------------------------------------------------------------------- pipeline stage

@stage_handler(CompensateConfig)
def _compensate_stage(session: StageSession, cfg: CompensateConfig) -> CompensateResult:
    quantized = session.require("quantize")
    return compensate(quantized, session.working, session.require("levels"), cfg,
                      tokenizer=session.tokenizer, progress=session.progress)
