"""The G=i rotation on SmolLM2-135M: KL and perplexity with and without each construction of P
(hadamard, random, optimized), at ~3.25 (w3-g128) and ~2.5 (w2-g64) bits/weight, with
round-to-nearest and with error-feedback (GPTQ) rounding — full evaluation protocol.

Every candidate is rotated (a function-preserving copy of the float model: its max |Δlogit|
against the original is recorded), quantized, exported, loaded back from disk and scored
against the *unrotated* float model. Bits per weight include the online rotations the package
stores. Results are rewritten after every candidate.

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

from common import RESULTS, score_quantized, write  # noqa: E402

from uqcit.compress import QuantizeConfig, quantize_model  # noqa: E402
from uqcit.data import calibration_batch  # noqa: E402
from uqcit.evaluate import EvalConfig  # noqa: E402
from uqcit.levels import analyze_levels  # noqa: E402
from uqcit.models import load_model  # noqa: E402
from uqcit.plan import PlanConfig, build_plan  # noqa: E402
from uqcit.rotation import RotationConfig, rotate_model  # noqa: E402

MODEL = "smollm2-135m"
BUDGETS = {3.25: PlanConfig(preset="uniform", bits=3), 2.5: PlanConfig(preset="uniform", bits=2, group_size=64)}
# GPTQ first: earlier quick runs showed rotation helping error feedback and hurting plain RTN.
METHODS = ("gptq", "rtn")
CONSTRUCTIONS = ("none", "hadamard", "random", "optimized")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--windows", type=int, default=None, help="fewer windows (not the full protocol)")
    ap.add_argument("--name", default="rotation")
    ap.add_argument("--only", default=None, help="comma-separated method names to (re)run")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None

    loaded = load_model(MODEL)
    ref, tok = loaded.model, loaded.tokenizer
    check_ids = calibration_batch(tok, n_samples=2, seq_len=128, seed=0)
    out_json = RESULTS / f"{args.name}.json"
    records = json.loads(out_json.read_text()) if out_json.exists() and only else []
    eval_cfg = EvalConfig(max_windows=args.windows)

    with tempfile.TemporaryDirectory() as tmp:
        for construction in CONSTRUCTIONS:
            t0 = time.perf_counter()
            if construction == "none":
                model, rot, rot_info = ref, None, {"rotation": "none"}
            else:
                # The optimizer's proxy uses the plan's group size; both budgets here use its default 128
                # except w2-g64, which shares the rotation (one rotation per construction, as a user would).
                rot = rotate_model(ref, RotationConfig(construction=construction), check_ids=check_ids)
                model = rot.model
                rot_info = {"rotation": construction, "max_logit_diff": rot.max_logit_diff,
                            "invariants_passed": rot.invariants.passed, "rotation_stored_bits": rot.stored_bits,
                            "online_overhead": rot.online_overhead, "rotation_seconds": rot.seconds}
            rotate_s = time.perf_counter() - t0
            levels = analyze_levels(model)
            prefix = "" if rot is None else rot.config.method_name
            for method in METHODS:
                for budget, plan_cfg in BUDGETS.items():
                    plan = build_plan(levels, plan_cfg)
                    name = f"{prefix + '-' if prefix else ''}{method}{plan.name[3:]}"
                    if only is not None and name not in only:
                        continue
                    t0 = time.perf_counter()
                    q = quantize_model(model, levels, plan, QuantizeConfig(method=method), tokenizer=tok,
                                       rotation=prefix)
                    quant_s = time.perf_counter() - t0
                    assert q.method_name == name, (q.method_name, name)
                    rec = score_quantized(q, tok, ref, levels, Path(tmp), eval_cfg, model=MODEL,
                                          seconds={"rotate": rotate_s, "quantize": quant_s},
                                          budget=budget, quantizer=method, **rot_info)
                    records = [r for r in records if r["method"] != name] + [rec]
                    write(args.name, records)
                    print(f"{name}: bpw {rec['bpw']:.4f}  ppl {rec['ppl']:.3f}  KL {rec['kl']:.4f}  "
                          f"top1 {rec['top1']:.2f}", flush=True)
                    del q
            del model, rot
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
