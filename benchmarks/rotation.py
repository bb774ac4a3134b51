"""The G=i rotation on SmolLM2-135M: KL and perplexity with and without each construction of P
(hadamard, random, optimized), at ~3.25 (w3-g128) and ~2.5 (w2-g64) bits/weight, with
round-to-nearest and with error-feedback (GPTQ) rounding — full evaluation protocol.

Every candidate is rotated (a function-preserving copy of the float model: its max |Δlogit|
against the original is recorded), quantized, exported, loaded back from disk and scored
against the *unrotated* float model, ``--batch`` candidates at a time on the same windows.
Bits per weight include the online rotations the package stores. Results are merged into the
JSON after every batch; a restart measures only what is missing.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/rotation.py [--windows N] [--only a,b]

Writes benchmarks/results/rotation.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, merge, package_candidate, score_and_merge  # noqa: E402

from uqcit.stages.quantize import QuantizeConfig, quantize_model  # noqa: E402
from uqcit.inputs.corpus import calibration_batch  # noqa: E402
from uqcit.stages.evaluate import EvalConfig  # noqa: E402
from uqcit.stages.levels import analyze_levels  # noqa: E402
from uqcit.inputs.models import load_model  # noqa: E402
from uqcit.stages.plan import PlanConfig, build_plan  # noqa: E402
from uqcit.stages.rotation import RotationConfig, rotate_model  # noqa: E402

MODEL = "smollm2-135m"
BUDGETS = {3.25: PlanConfig(preset="uniform", bits=3), 2.5: PlanConfig(preset="uniform", bits=2, group_size=64)}
# (construction, quantizer, budget) in the order measured: earlier quick runs showed rotation helping
# error feedback and hurting plain RTN, so GPTQ with each construction comes first.
ORDER = [("none", "gptq", 3.25), ("hadamard", "gptq", 3.25), ("random", "gptq", 3.25), ("optimized", "gptq", 3.25),
         ("none", "gptq", 2.5), ("hadamard", "gptq", 2.5), ("hadamard", "rtn", 3.25), ("hadamard", "rtn", 2.5),
         ("random", "gptq", 2.5), ("optimized", "gptq", 2.5), ("random", "rtn", 3.25), ("optimized", "rtn", 3.25),
         ("random", "rtn", 2.5), ("optimized", "rtn", 2.5), ("none", "rtn", 3.25), ("none", "rtn", 2.5)]
# Unrotated RTN rows are already measured by the same code under the same protocol elsewhere.
REUSE = {"rtn-w3-g128": "baselines.json", "rtn-w2-g64": "quality_vs_bits.json"}


def method_name(construction: str, quantizer: str, budget: float) -> str:
    plan = "w3-g128" if budget == 3.25 else "w2-g64"
    return f"{'' if construction == 'none' else f'rot-{construction}-'}{quantizer}-{plan}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--windows", type=int, default=None, help="fewer windows (not the full protocol)")
    ap.add_argument("--name", default="rotation")
    ap.add_argument("--batch", type=int, default=4, help="candidates evaluated together (one reference pass)")
    ap.add_argument("--only", default=None, help="comma-separated method names to (re)run")
    args = ap.parse_args()

    loaded = load_model(MODEL)
    ref, tok = loaded.model, loaded.tokenizer
    check_ids = calibration_batch(tok, n_samples=2, seq_len=128, seed=0)
    out_json = RESULTS / f"{args.name}.json"
    done = {r["method"] for r in json.loads(out_json.read_text())} if out_json.exists() else set()
    reused = []
    for method, source in REUSE.items():
        if method not in done and (RESULTS / source).exists():
            reused += [dict(r, source=source, rotation="none", quantizer="rtn",
                            budget=3.25 if "w3" in method else 2.5)
                       for r in json.loads((RESULTS / source).read_text()) if r["method"] == method]
    if reused:
        merge(args.name, reused)
        done |= {r["method"] for r in reused}
    only = set(args.only.split(",")) if args.only else None
    todo = [c for c in ORDER if (method_name(*c) in only if only else method_name(*c) not in done)]
    print("to measure:", [method_name(*c) for c in todo], flush=True)

    eval_cfg = EvalConfig(max_windows=args.windows)
    rotations: dict[str, tuple] = {}

    def rotated(construction: str):
        if construction not in rotations:
            if construction == "none":
                rotations[construction] = (ref, None, {"rotation": "none"}, 0.0)
            else:
                t0 = time.perf_counter()
                rot = rotate_model(ref, RotationConfig(construction=construction), check_ids=check_ids)
                info = {"rotation": construction, "max_logit_diff": rot.max_logit_diff,
                        "invariants_passed": rot.invariants.passed, "rotation_stored_bits": rot.stored_bits,
                        "online_overhead": rot.online_overhead, "rotation_seconds": rot.seconds}
                rotations[construction] = (rot.model, rot, info, time.perf_counter() - t0)
        return rotations[construction]

    with tempfile.TemporaryDirectory() as tmp:
        for i in range(0, len(todo), args.batch):
            batch = []
            for construction, quantizer, budget in todo[i:i + args.batch]:
                model, rot, info, rotate_s = rotated(construction)
                levels = analyze_levels(model)
                prefix = "" if rot is None else rot.config.method_name
                t0 = time.perf_counter()
                q = quantize_model(model, levels, build_plan(levels, BUDGETS[budget]), QuantizeConfig(method=quantizer),
                                   tokenizer=tok, rotation=prefix)
                quant_s = time.perf_counter() - t0
                assert q.method_name == method_name(construction, quantizer, budget), q.method_name
                batch.append(package_candidate(q, tok, levels, Path(tmp), model=MODEL,
                                               seconds={"rotate": rotate_s, "quantize": quant_s},
                                               budget=budget, quantizer=quantizer, **info))
                del q
            score_and_merge(args.name, batch, tok, ref, eval_cfg, model=MODEL)  # against the unrotated float model
            del batch
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
