"""The ablations of seed 002 §4.3 that no other benchmark measures, on SmolLM2-135M at equal
bits: every candidate spends (as near as the formats allow) the stored bits/weight of the seed's
binary-concentration preset, every module quantized as the preset does (the embedding too).

- ``seed-patterns``: the preset itself (levels 1/5 "46-54", 2/4 "30-70", 3 "10-90").
- ``uniform`` (ablation 1, remove binary concentration): one integer width everywhere, no
  high-precision part: int4 with the group size that spends the preset's bits.
- ``levels-uniform`` (ablation 3, remove Level-3 preservation): one pattern on every level,
  int8/int4 as the preset's other levels, with the high fraction that spends the preset's bits.
- ``sweep`` (ablation 5): each pattern of 10-90, 20-80, 30-70, 46-54, 50-50 on every level, its
  high part as the seed defines it (10-90: fp16, the others int8), its low part the widest
  (4, 3, then 2 bits) and its group size (8-512) the one that spends the preset's bits (within
  0.1); ranked by KL with the preset (``rank_by_kl``, 1 = best, written once all six are measured).

Ablation 2 (rotation) is ``rotation.py``'s, ablation 4 (compensation) ``compensation.py``'s.
Every candidate is exported as a package, loaded back and scored against the float reference on
the same windows, ``--batch`` candidates per pass over the reference (default: all in one pass);
records merge into the JSON after each pass, so a restart measures only what is missing.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/ablations.py [--windows N] [--only a,b] [--batch K]

Writes benchmarks/results/ablations.json and .md (``--name`` changes the name).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, package_candidate, score_and_merge, write  # noqa: E402

from uqcit.inputs.models import load_model  # noqa: E402
from uqcit.stages.evaluate import EvalConfig  # noqa: E402
from uqcit.stages.levels import analyze_levels  # noqa: E402
from uqcit.stages.plan import BitPlan, PlanConfig, build_plan, pattern_format, uniform_plan  # noqa: E402
from uqcit.stages.quantize import quantize_model  # noqa: E402
from uqcit.tensor.formats import QuantFormat  # noqa: E402

MODEL = "smollm2-135m"
PRESET = "preset-binary-concentration"
SWEEP = ("10-90", "20-80", "30-70", "46-54", "50-50")
SEED_PATTERNS = ("10-90", "30-70", "46-54")  # the preset's, per level


@dataclasses.dataclass(frozen=True)
class Candidate:
    method: str
    role: str  # seed-patterns, uniform, levels-uniform, sweep
    plan: BitPlan
    pattern: str | None = None  # the binary pattern on every level (levels-uniform, sweep)


def closest(formats, bpw_of, target: float) -> QuantFormat:
    """The format of ``formats`` whose plan spends the bits/weight nearest ``target``."""
    return min(formats, key=lambda f: abs(bpw_of(f) - target))


def candidates(levels) -> list[Candidate]:
    """The preset and its equal-bits alternatives (module docstring)."""
    names = [m.name for m in levels.modules]
    preset = build_plan(levels, PlanConfig(preset="binary-concentration"))
    target = preset.summarize(levels).avg_bpw
    bpw_of = lambda f: uniform_plan(names, f).summarize(levels).avg_bpw  # noqa: E731
    out = [Candidate(PRESET, "seed-patterns", preset)]
    uniform = closest([QuantFormat(bits=4, group_size=g) for g in range(4, 129)], bpw_of, target)
    out.append(Candidate(f"rtn-{uniform.name}", "uniform", uniform_plan(names, uniform)))
    one = closest([pattern_format(f"{h}-{100 - h}") for h in range(1, 100)], bpw_of, target)
    h = round(100 * one.high_fraction)
    out.append(Candidate(f"binary-{h}-{100 - h}-all-levels", "levels-uniform", uniform_plan(names, one),
                         f"{h}-{100 - h}"))
    for pattern in SWEEP:
        fmt = equal_bits(pattern, bpw_of, target)
        out.append(Candidate(f"sweep-{pattern}-{fmt.name}", "sweep", uniform_plan(names, fmt), pattern))
    return out


def equal_bits(pattern: str, bpw_of, target: float, tolerance: float = 0.1) -> QuantFormat:
    """``pattern`` (its high fraction and high precision as ``pattern_format`` defines them) with
    the widest low part (4, 3, then 2 bits) and the group size (8-512) that spend ``target``
    bits/weight within ``tolerance``: the pattern's identity kept, its low part paying for it."""
    seed = pattern_format(pattern)
    for low in (4, 3, 2):
        fmt = closest([dataclasses.replace(seed, bits=low, group_size=g) for g in range(8, 513)], bpw_of, target)
        if abs(bpw_of(fmt) - target) <= tolerance:
            return fmt
    raise ValueError(f"pattern {pattern} cannot spend {target:.3f} bits/weight within {tolerance}")


def rank_sweep(records: list[dict]) -> list[dict]:
    """``rank_by_kl`` (1 = lowest KL) on the preset and the sweep once all six are measured, else absent."""
    sweep = [r for r in records if r.get("sweep")]
    complete = {r["pattern"] for r in sweep if r["role"] == "sweep"} == set(SWEEP) and \
        any(r["role"] == "seed-patterns" for r in sweep)
    for r in sweep:
        r.pop("rank_by_kl", None)
        if complete:
            r["rank_by_kl"] = 1 + sum(o["kl"] < r["kl"] for o in sweep)
            r["sweep_size"] = len(sweep)
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=None, help="fewer windows (not the full protocol)")
    ap.add_argument("--name", default="ablations")
    ap.add_argument("--only", default=None, help="comma-separated method names to (re)run")
    ap.add_argument("--batch", type=int, default=0, help="candidates per evaluation pass (0: all in one pass)")
    ap.add_argument("--list", action="store_true", help="print the candidates and their planned bits, then stop")
    args = ap.parse_args()

    loaded = load_model(MODEL, progress=False)
    ref, tok = loaded.model, loaded.tokenizer
    levels = analyze_levels(ref)
    cands = candidates(levels)
    target = cands[0].plan.summarize(levels).avg_bpw
    if args.list:
        for c in cands:
            print(f"{c.method}: {c.plan.summarize(levels).avg_bpw:.4f} bits/weight planned (preset {target:.4f})")
        return
    out_json = RESULTS / f"{args.name}.json"
    done = {r["method"] for r in json.loads(out_json.read_text())} if out_json.exists() else set()
    only = set(args.only.split(",")) if args.only else None
    unknown = (only or set()) - {c.method for c in cands}
    if unknown:
        raise SystemExit(f"--only names no candidate: {sorted(unknown)}; run with --list to see them")
    todo = [c for c in cands if (c.method in only if only else c.method not in done)]
    print("to measure:", [c.method for c in todo], flush=True)
    eval_cfg = EvalConfig(max_windows=args.windows)
    batch = args.batch or max(len(todo), 1)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(0, len(todo), batch):
            pending = []
            for c in todo[i:i + batch]:
                t0 = time.perf_counter()
                q = quantize_model(ref, levels, dataclasses.replace(c.plan, name=c.method), progress=False)
                quant_s = time.perf_counter() - t0
                cand = package_candidate(q, tok, levels, Path(tmp), model=MODEL, seconds={"quantize": quant_s},
                                         role=c.role, pattern=c.pattern, plan=c.plan.to_dict(),
                                         sweep=c.role in ("sweep", "seed-patterns"),
                                         seed_pattern=c.role == "seed-patterns", target_bpw=target,
                                         bpw_vs_preset=q.bpw - target)
                cand["method"] = c.method
                print(f"{c.method}: {q.bpw:.4f} bits/weight (preset plan {target:.4f})", flush=True)
                del q
                pending.append(cand)
            score_and_merge(args.name, pending, tok, ref, eval_cfg, model=MODEL)
            del pending
            write(args.name, rank_sweep(json.loads(out_json.read_text())))
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
