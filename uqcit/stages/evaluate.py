"""The evaluation protocol: perplexity, KL(ref ‖ model) and top-1 agreement on fixed windows.

Protocol (docs/evaluation.md): lee_background.cor tokenized whole without special tokens,
the first 32,768 tokens in non-overlapping windows of 1,024. Every candidate is
scored on the same windows; the reference's log-probabilities are computed once
per window per run, shared by all candidates, and dropped before the next
window, so no full set of logits is ever held in memory.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from uqcit.core.config import StageConfig, StageSession, register_config, stage_handler
from uqcit.core.results import Result

FULL_WINDOWS = 32  # 32,768 tokens / 1,024


@register_config
@dataclasses.dataclass(frozen=True)
class EvalConfig(StageConfig):
    """Which text and how much of it; defaults are the full protocol."""

    type_tag = "eval"

    corpus: str = "lee_background"  # a corpus name, "humaneval", or a path (uqcit.inputs.corpus.text_for)
    total_tokens: int = 32768  # protocol: first 32,768 tokens
    window: int = 1024  # protocol: non-overlapping 1,024-token windows
    max_windows: int | None = None  # quick mode: only the first k windows (says so in results)
    chunk: int = 256  # positions per KL chunk: bounds the memory of vocab-wide softmaxes

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(self.window >= 1, "window", "must be >= 1")
        self.check(self.total_tokens >= self.window and self.total_tokens % self.window == 0, "total_tokens",
                   f"must be a positive multiple of window ({self.window})")
        self.check(self.max_windows is None or self.max_windows >= 1, "max_windows", "must be >= 1 (None: all)")
        self.check(self.chunk >= 1, "chunk", "must be >= 1")

    @property
    def n_windows(self) -> int:
        full = self.total_tokens // self.window
        return full if self.max_windows is None else min(full, self.max_windows)

    @property
    def is_full_protocol(self) -> bool:
        return (self.corpus == "lee_background" and self.total_tokens == 32768
                and self.window == 1024 and self.n_windows == FULL_WINDOWS)


def quick_eval_config(max_windows: int = 2) -> EvalConfig:
    """A short evaluation for notebooks and tests; its results say it is not the full protocol."""
    return EvalConfig(max_windows=max_windows)


@dataclasses.dataclass(repr=False)
class EvalResult(Result):
    """Perplexity, KL and top-1 agreement of one model on the protocol windows."""

    model: str
    ppl: float
    kl: float | None  # None for the reference itself / when no reference is given
    top1: float | None  # percent of positions where argmax agrees with the reference
    windows: int
    tokens: int  # predicted positions
    full_protocol: bool
    seconds: float
    window_nll: list[float]
    window_kl: list[float]
    window_top1: list[float]

    def summary(self) -> str:
        scope = ("full protocol" if self.full_protocol else
                 f"QUICK evaluation on {self.windows} window(s), not the full protocol")
        parts = [f"{self.model}: ppl {self.ppl:.3f}"]
        if self.kl is not None:
            parts.append(f"KL {self.kl:.4f}")
            parts.append(f"top-1 {self.top1:.2f}%")
        return ", ".join(parts) + f" ({scope}, {self.tokens:,} tokens)"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table_rows(self):
        return (("window", "ppl", "KL", "top-1 %"),
                [(i, math.exp(n), k, t) for i, (n, k, t) in
                 enumerate(zip(self.window_nll, self.window_kl or [None] * self.windows,
                               self.window_top1 or [None] * self.windows))])

    def figure(self):
        """Per-window perplexity (and KL when measured against a reference)."""
        from plotly.subplots import make_subplots

        x = list(range(self.windows))
        has_ref = bool(self.window_kl)
        fig = make_subplots(rows=1, cols=2 if has_ref else 1,
                            subplot_titles=("perplexity per window",) + (("KL per window",) if has_ref else ()))
        fig.add_scatter(x=x, y=[math.exp(v) for v in self.window_nll], mode="lines+markers",
                        name="ppl", uid=f"eval-ppl-{self.model}", row=1, col=1)
        if has_ref:
            fig.add_scatter(x=x, y=self.window_kl, mode="lines+markers", name="KL",
                            uid=f"eval-kl-{self.model}", row=1, col=2)
        fig.update_layout(title=self.summary(), height=340, showlegend=False)
        return fig


class _Acc:
    """Running sums for one candidate."""

    def __init__(self) -> None:
        self.nll: list[float] = []
        self.kl: list[float] = []
        self.top1: list[float] = []
        self.seconds = 0.0


def _is_causal_lm(model: torch.nn.Module) -> bool:
    return hasattr(model, "generation_config") or type(model).__name__.endswith("ForCausalLM")


@torch.inference_mode()
def _window_logprobs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids.unsqueeze(0), use_cache=False)
    return out.logits[0, :-1].float()  # [window-1, vocab]: predictions of tokens 1..window-1


def evaluate_many(
    candidates: Mapping[str, torch.nn.Module],
    tokenizer,
    config: EvalConfig = EvalConfig(),
    reference: torch.nn.Module | None = None,
    *,
    windows: torch.Tensor | None = None,
    progress: bool = True,
) -> dict[str, EvalResult]:
    """Score every candidate (and the reference, if given, under ``"reference"``) on the same windows.

    >>> from uqcit.inputs.tiny import tiny_model
    >>> m, tok = tiny_model("llama")
    >>> r = evaluate_many({"m": m}, tok, EvalConfig(max_windows=1, window=64, total_tokens=64),
    ...                   reference=m, progress=False)
    >>> round(r["m"].kl, 6), r["m"].top1
    (0.0, 100.0)
    """
    from tqdm.auto import tqdm

    from uqcit.inputs import corpus as data

    models = dict(candidates)
    if reference is not None:
        if "reference" in models:
            raise ValueError("a candidate may not be named 'reference' when a reference is given")
    for name, model in list(models.items()) + ([("reference", reference)] if reference is not None else []):
        if not _is_causal_lm(model):
            raise ValueError(
                f"{name}: {type(model).__name__} is not a causal language model; the evaluation "
                "protocol (perplexity, KL, top-1 of next-token predictions) needs one")
    if windows is None:
        text = data.text_for(config.corpus)
        windows = data.eval_windows(tokenizer, text, total_tokens=config.total_tokens,
                                    window=config.window, max_windows=config.max_windows)
    n = windows.shape[0]
    accs = {name: _Acc() for name in models}
    ref_acc = _Acc() if reference is not None else None
    steps = n * (len(models) + (reference is not None))
    bar = tqdm(total=steps, desc="evaluate", unit="pass", disable=not progress)
    try:
        for w in range(n):
            ids = windows[w]
            targets = ids[1:]
            ref_logp = None
            if reference is not None:
                t0 = time.perf_counter()
                ref_logp = F.log_softmax(_window_logprobs(reference, ids), dim=-1)
                ref_acc.nll.append(F.nll_loss(ref_logp, targets).item())
                ref_acc.seconds += time.perf_counter() - t0
                bar.update(1)
            for name, model in models.items():
                t0 = time.perf_counter()
                logp = F.log_softmax(_window_logprobs(model, ids), dim=-1)
                acc = accs[name]
                acc.nll.append(F.nll_loss(logp, targets).item())
                if ref_logp is not None:
                    kl, agree = _kl_top1(ref_logp, logp, config.chunk)
                    acc.kl.append(kl)
                    acc.top1.append(agree)
                del logp
                acc.seconds += time.perf_counter() - t0
                bar.update(1)
            del ref_logp
    finally:
        bar.close()
    full = config.is_full_protocol and n == FULL_WINDOWS
    per_window = windows.shape[1] - 1
    results = {name: _finish(name, acc, n, per_window, full) for name, acc in accs.items()}
    if ref_acc is not None:
        results["reference"] = _finish("reference", ref_acc, n, per_window, full)
    return results


def evaluate(model: torch.nn.Module, tokenizer, config: EvalConfig = EvalConfig(),
             reference: torch.nn.Module | None = None, *, name: str = "model",
             progress: bool = True) -> EvalResult:
    """Score one model; with a reference, also KL(ref ‖ model) and top-1 agreement."""
    return evaluate_many({name: model}, tokenizer, config, reference, progress=progress)[name]


def _kl_top1(ref_logp: torch.Tensor, logp: torch.Tensor, chunk: int) -> tuple[float, float]:
    """Mean per-position KL(P_ref ‖ P) and top-1 agreement (%), in position chunks."""
    kl_sum = 0.0
    agree = 0
    for s in range(0, ref_logp.shape[0], chunk):
        r = ref_logp[s:s + chunk]
        c = logp[s:s + chunk]
        kl_sum += (r.exp() * (r - c)).sum().item()
        agree += (r.argmax(-1) == c.argmax(-1)).sum().item()
    count = ref_logp.shape[0]
    return kl_sum / count, 100.0 * agree / count


def _finish(name: str, acc: _Acc, n: int, per_window: int, full: bool) -> EvalResult:
    mean_nll = sum(acc.nll) / n  # equal-length windows: mean of means = mean over tokens
    has_ref = bool(acc.kl)
    return EvalResult(
        model=name,
        ppl=math.exp(mean_nll),
        kl=sum(acc.kl) / n if has_ref else None,
        top1=sum(acc.top1) / n if has_ref else None,
        windows=n,
        tokens=n * per_window,
        full_protocol=full,
        seconds=acc.seconds,
        window_nll=acc.nll,
        window_kl=acc.kl,
        window_top1=acc.top1,
    )


# --------------------------------------------------------------------------- pipeline stage

@stage_handler(EvalConfig)
def _eval_stage(session: StageSession, cfg: EvalConfig) -> EvalResult:
    model = session.compressed
    if model is None:
        raise RuntimeError("stage 'eval' needs a compressed model; run a 'quantize' stage first")
    res = evaluate_many({"compressed": model}, session.tokenizer, cfg, reference=session.reference,
                        progress=session.progress)  # scored against the original float model
    return res["compressed"]
