"""Noise-resistance curve and Level-3 dominance (seed 002 §1.1, §4.1.2, §4.1.4) on SmolLM2-135M.

Relative Gaussian noise: every perturbed weight matrix W becomes W + σ·rms(W)·ε, ε ~ N(0, 1)
drawn per element from a fixed seed, so σ is the noise-to-signal ratio of that matrix (σ = 0.1:
noise with a tenth of the weights' RMS). Scopes: all weight modules at once, and one level at
a time (levels from ``analyze_levels`` with its defaults; the tied embedding/LM head counts once,
under Level 1, its owner). σ ∈ {0, 0.05, 0.1, 0.25, 0.5}; σ = 0 is the reference itself.

Level-3 dominance at **equal bits**: one level at a time round-to-nearest in one format
(w3-g128, 3.25 bits/weight for every level), the rest float; KL in total and per perturbed weight.

Quality is scored with ``uqcit.stages.evaluate.evaluate_many`` (KL(ref ‖ model), top-1 agreement,
perplexity), the reference's log-probs computed once per window for each group of candidates.
The full protocol is 32 windows; on a shared 2-core machine this script runs a **reduced
protocol** (``--windows``, recorded in every record as ``windows`` and ``full_protocol``).

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python benchmarks/noise_curve.py --windows 4

Writes benchmarks/results/noise_curve.json (+ .md).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import record, write  # noqa: E402

from uqcit.inputs.corpus import corpus_text, eval_windows  # noqa: E402
from uqcit.inputs.models import load_model  # noqa: E402
from uqcit.stages.evaluate import EvalConfig, evaluate_many  # noqa: E402
from uqcit.stages.levels import analyze_levels  # noqa: E402
from uqcit.tensor.formats import parse_format  # noqa: E402
from uqcit.tensor.quant import dequantize, quantize  # noqa: E402

SIGMAS = (0.05, 0.1, 0.25, 0.5)
SCOPES = ("all", 1, 2, 3, 4, 5)
EQUAL_BITS_FORMAT = "w3-g128"
# The source document's table: "information quality" (%) at each noise level, as a range.
DOCUMENT_TABLE = {"0.0": [98, 98], "0.1": [94, 94], "0.25": [88, 92], "0.5": [35, 44]}
GROUP = 6  # candidates scored per pass over the windows (each a 540 MB float copy)


def owned_modules(levels, scope) -> list:
    """Entries perturbed for ``scope`` ("all" or a level): owners only, so a tied weight counts once."""
    return [m for m in levels.modules if m.tied_to is None and (scope == "all" or m.level == scope)]


@torch.no_grad()
def noisy_copy(model, entries, sigma: float, seed: int):
    """A copy of ``model`` with relative Gaussian noise σ·rms(W) added to each entry's weight."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for m in entries:
        w = out.get_submodule(m.name).weight
        rms = w.float().pow(2).mean().sqrt()
        w.add_(torch.randn(w.shape, generator=gen, dtype=w.dtype) * (sigma * rms))
    return out


@torch.no_grad()
def rtn_copy(model, entries, fmt_name: str):
    """A copy of ``model`` with each entry's weight replaced by its RTN round trip in ``fmt_name``."""
    out = copy.deepcopy(model)
    fmt = parse_format(fmt_name)
    for m in entries:
        w = out.get_submodule(m.name).weight
        w.copy_(dequantize(quantize(w.detach(), fmt)).to(w.dtype))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=4, help="evaluation windows (32 = full protocol)")
    ap.add_argument("--name", default="noise_curve")
    ap.add_argument("--model", default="smollm2-135m", help="tiny-llama for a smoke run")
    ap.add_argument("--window", type=int, default=1024)
    args = ap.parse_args()
    torch.manual_seed(0)
    t_all = time.perf_counter()
    lm = load_model(args.model, progress=False)
    model, tok = lm.model, lm.tokenizer
    levels = analyze_levels(model)
    cfg = EvalConfig(max_windows=args.windows, window=args.window, total_tokens=32 * args.window)
    windows = eval_windows(tok, corpus_text(), max_windows=args.windows, window=args.window,
                           total_tokens=32 * args.window)

    specs = []  # (method, builder, extra)
    for scope in SCOPES:
        entries = owned_modules(levels, scope)
        n_weights = sum(m.numel for m in entries)
        for sigma in SIGMAS:
            tag = "all" if scope == "all" else f"L{scope}"
            specs.append((f"noise-{tag}-s{sigma}", lambda e=entries, s=sigma: noisy_copy(model, e, s, seed=1234),
                          {"study": "noise", "scope": tag, "sigma": sigma, "perturbed_weights": n_weights}))
    for level in (1, 2, 3, 4, 5):
        entries = owned_modules(levels, level)
        n_weights = sum(m.numel for m in entries)
        specs.append((f"rtn-{EQUAL_BITS_FORMAT}-L{level}-only", lambda e=entries: rtn_copy(model, e, EQUAL_BITS_FORMAT),
                      {"study": "equal-bits", "scope": f"L{level}", "format": EQUAL_BITS_FORMAT,
                       "bits_per_weight_of_scope": parse_format(EQUAL_BITS_FORMAT).bits_per_weight(128 * 576),
                       "perturbed_weights": n_weights}))

    common_extra = {"protocol": "reduced" if args.windows < 32 else "full", "document_table": DOCUMENT_TABLE,
                    "noise": "W + sigma * rms(W) * N(0,1) per weight matrix, seed 1234",
                    "levels": {f"L{lv}": c.params for lv, c in levels.level_counts().items()}}
    records = []
    ref_result = None
    for start in range(0, len(specs), GROUP):
        group = specs[start:start + GROUP]
        t0 = time.perf_counter()
        candidates = {name: build() for name, build, _ in group}
        build_s = time.perf_counter() - t0
        res = evaluate_many(candidates, tok, cfg, reference=model, windows=windows, progress=False)
        ref_result = res["reference"]
        for name, _, extra in group:
            ev = res[name]
            kl_per_weight = ev.kl / extra["perturbed_weights"]
            records.append(record(model=args.model, method=name, bpw=None, package_bytes=None, ev=ev,
                                  seconds={"build": build_s / len(group), "evaluate": ev.seconds},
                                  reference_ppl=ref_result.ppl, kl_per_weight=kl_per_weight,
                                  **extra, **common_extra))
            print(f"{name}: ppl {ev.ppl:.3f} KL {ev.kl:.4f} top1 {ev.top1:.2f}", flush=True)
        del candidates
        write(args.name, records)  # partial results survive an interruption
    # sigma = 0 is the reference itself: KL 0 and top-1 100 % by definition, perplexity measured.
    for scope in SCOPES:
        tag = "all" if scope == "all" else f"L{scope}"
        r = record(model=args.model, method=f"noise-{tag}-s0.0", bpw=None, package_bytes=None, ev=ref_result,
                   seconds={}, reference_ppl=ref_result.ppl, study="noise", scope=tag, sigma=0.0,
                   perturbed_weights=sum(m.numel for m in owned_modules(levels, scope)), **common_extra)
        r.update(kl=0.0, top1=100.0, kl_per_weight=0.0)
        records.insert(0, r)
    for r in records:
        r["seconds"]["total_run"] = time.perf_counter() - t_all
    write(args.name, records)


if __name__ == "__main__":
    main()
