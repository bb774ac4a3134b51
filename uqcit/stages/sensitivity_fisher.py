"""Sensitivity from the Fisher information: every module in every format, from one backward pass per sequence.

``measure_sensitivity`` runs a forward pass per module and format; on SmolLM2 the 4 x 128 table of
four formats takes most of an hour on 2 cores, too slow for a recipe that allocates over a dozen
format families. This module predicts the same table instead, from a second-order expansion of
the KL around the float model:

    KL(P_ref ‖ P_w+δ) ≈ ½ δᵀ F δ ≈ ½ Σ_i F_ii δ_i²        (F: the Fisher information of the model's
                                                            output distribution, per token)

The first-order term is zero because the reference is the minimum of the KL. ``F_ii`` is
estimated the standard way, with labels the model samples itself. Run each calibration sequence
forward, draw every position's next token from the model's own softmax, and take the gradient
``g`` of the summed log-likelihood of those draws. Then ``E[g_i²] = Σ_t F_ii(t)``. The cross
terms between positions vanish in expectation, because each draw's score has mean zero given the
text it conditions on. So the squared per-sequence gradient, summed over sequences and divided
by the number of positions, estimates the per-token diagonal without any per-token backward.
A module's KL in a format is then ``½ Σ F_ii (Ŵ_ii - W_ii)²`` with ``Ŵ`` the weight through the
format and back (round to nearest). That costs one dequantization per cell and no forward pass,
so any number of formats is affordable.

What it misses: interactions inside a matrix (off-diagonal ``F``), and the curvature of the KL
beyond second order at large errors. What they cost is measured, not assumed:
``benchmarks/family_allocation.py`` compares this table with SmolLM2's measured 4 x 128 one,
column by column. On 16 x 128 tokens the ranks agree to Spearman 0.94-0.98 and the typical cell
is 12-14 % off (``family_allocation.md``). That is closer than the fitted-curve prediction of
``sensitivity_fit``, and the measured 2-bit column is matched too. Time on 2 cores: 18 s of
backward passes, then about 90 s for the 14 formats of the allocation recipes (mostly IQ4_NL's
scale search).

Memory: one float32 copy of every selected weight for ``F`` and one for the gradient.

>>> from uqcit.inputs.tiny import tiny_model
>>> from uqcit.stages.levels import analyze_levels
>>> model, tok = tiny_model("llama")
>>> res = fisher_sensitivity(model, tok, analyze_levels(model), ["w2-g32", "w8-g32"],
...                          calib_samples=2, calib_seq_len=32, progress=False)
>>> m = "model.layers.0.mlp.down_proj"
>>> 0 < res.kl(m, "w8-g32") < res.kl(m, "w2-g32")
True
>>> res.meta["method"]
'fisher'
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import torch
from torch import nn

from uqcit.stages.levels import select_modules
from uqcit.stages.sensitivity_table import SensitivityResult, resolve_formats
from uqcit.stages.sensitivity_probe import dequantized

MEASURE = "½ Σ F_ii δ_i²: diagonal Fisher (labels sampled from the model) times the squared rounding error"


def fisher_diagonal(model: nn.Module, ids: torch.Tensor, weights: dict[str, torch.Tensor], *, seed: int = 0,
                    progress: bool = True) -> dict[str, torch.Tensor]:
    """The per-token diagonal Fisher of ``model``'s output distribution for each tensor of ``weights``.

    ``ids`` is ``[sequences, tokens]``; one forward and one backward pass per sequence. The model's
    other parameters are left as they were (``requires_grad`` restored).

    >>> from uqcit.inputs.tiny import tiny_model
    >>> model, _ = tiny_model("llama")
    >>> w = model.model.layers[0].mlp.down_proj.weight
    >>> f = fisher_diagonal(model, torch.randint(0, 100, (2, 16)), {"down": w}, progress=False)
    >>> f["down"].shape == w.shape and bool((f["down"] >= 0).all())
    True
    """
    from tqdm.auto import tqdm

    from uqcit.runtime.modules import model_logits

    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"ids must be [sequences, tokens] with at least one of each; got shape {tuple(ids.shape)}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no language-model head, so it has no output distribution to "
                         "take the Fisher of: measure its sensitivity instead (SensitivityConfig(method='measured'))")
    params = list(model.parameters())
    was_grad = [p.requires_grad for p in params]
    was_training = model.training
    targets = list(weights.values())
    fisher = [torch.zeros_like(w, dtype=torch.float32) for w in targets]
    gen = torch.Generator().manual_seed(seed)
    try:
        for p in params:
            p.requires_grad_(False)
        for w in targets:
            w.requires_grad_(True)
        model.eval()
        with torch.enable_grad():
            for s in tqdm(range(ids.shape[0]), desc="fisher", unit="seq", disable=not progress):
                logits = model_logits(model, ids[s:s + 1]).float()[0]
                with torch.no_grad():
                    drawn = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[:, 0]
                loss = nn.functional.cross_entropy(logits, drawn, reduction="sum")
                for acc, g in zip(fisher, torch.autograd.grad(loss, targets)):
                    acc.add_(g.float().square())
    finally:
        for p, flag in zip(params, was_grad):
            p.requires_grad_(flag)
        model.train(was_training)
    return {name: (acc / ids.numel()).cpu() for name, acc in zip(weights, fisher)}


def fisher_sensitivity(model: nn.Module, tokenizer, levels, formats: Sequence[str], *, group_size: int = 128,
                       calib_samples: int = 16, calib_seq_len: int = 128, seed: int = 0, modules: str | None = None,
                       text: str | None = None, progress: bool = True) -> SensitivityResult:
    """A ``SensitivityResult`` predicted by the diagonal Fisher for every selected module and format.

    Arguments as ``SensitivityConfig``'s (``calib_samples`` x ``calib_seq_len`` tokens of
    lee_background after the evaluation span, or of ``text``). Cells have no standard error (NaN);
    ``meta["method"]`` is ``"fisher"``.
    """
    from tqdm.auto import tqdm

    from uqcit.inputs.corpus import calibration_batch

    fmts = resolve_formats(formats, group_size)
    entries = select_modules(levels, modules)
    named = dict(model.named_modules())
    ids = calibration_batch(tokenizer, n_samples=calib_samples, seq_len=calib_seq_len, seed=seed, text=text)
    t0 = time.perf_counter()
    weights = {e.name: named[e.name].weight for e in entries}
    fisher = fisher_diagonal(model, ids, weights, seed=seed, progress=progress)
    fisher_s = time.perf_counter() - t0
    table = torch.full((len(entries), len(fmts)), math.nan, dtype=torch.float64)
    seconds = torch.zeros(len(entries), dtype=torch.float64)
    for i, e in enumerate(tqdm(entries, desc="fisher table", unit="module", disable=not progress)):
        t1 = time.perf_counter()
        w = weights[e.name].detach().cpu()
        for j, fmt in enumerate(fmts):
            delta = dequantized(w, e, fmt).to(torch.float32) - w.to(torch.float32)
            table[i, j] = 0.5 * float((fisher[e.name] * delta.square()).sum(dtype=torch.float64))
        seconds[i] = time.perf_counter() - t1
    cfg = getattr(model, "config", None)
    meta = {"method": "fisher", "measure": MEASURE, "seconds_fisher": fisher_s,
            "seconds_total": time.perf_counter() - t0, "floor_kl": 0.0,
            "settings": {"model_id": getattr(cfg, "_name_or_path", None) or getattr(cfg, "model_type", None),
                         "formats": [f.name for f in fmts], "modules_pattern": modules,
                         "calibration": {"samples": calib_samples, "seq_len": calib_seq_len, "seed": seed,
                                         "text": "lee_background" if text is None else "custom"}}}
    return SensitivityResult(modules=[e.name for e in entries], formats=[f.name for f in fmts], table=table,
                             numel=[e.numel for e in entries], levels=[e.level for e in entries],
                             seconds=seconds, meta=meta)
