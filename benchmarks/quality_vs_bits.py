"""Quality vs bits on SmolLM2-135M: uniform RTN, the seed presets, the allocator with RTN and with
error-feedback (GPTQ) rounding, and GHZ clusters — all under the full evaluation protocol.

Stages, each timed (the "pipeline" record is the issue's full pipeline: levels, sensitivity of
every quantizable module in every candidate format, allocation, GPTQ calibration + rounding,
export):

1. the sensitivity table, measured into ``results/sensitivity-smollm2-135m.safetensors``
   (resumable: a restart skips what the file holds; ``--sensitivity-only`` stops after it);
2. for every candidate: quantize, export a package, load it back from disk, evaluate it against
   the float reference on the same windows. Results are rewritten after every candidate, so a
   stopped run keeps what it measured.

Budgets: 2.5 (uniform: w2-g64), 3.25 (w3-g128) and 4.25 (w4-g128) bits/weight, every stored bit
counted. The allocator gets the same budgets and must spend no more.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/quality_vs_bits.py [--windows N]

Writes benchmarks/results/quality_vs_bits.json and .md.
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

from uqcit.allocate import AllocateConfig, allocate  # noqa: E402
from uqcit.clusters import ClustersConfig, detect_clusters  # noqa: E402
from uqcit.compress import QuantizeConfig, quantize_model  # noqa: E402
from uqcit.evaluate import EvalConfig  # noqa: E402
from uqcit.levels import analyze_levels  # noqa: E402
from uqcit.models import load_model  # noqa: E402
from uqcit.plan import PlanConfig, build_plan  # noqa: E402
from uqcit.sensitivity import SensitivityConfig, measure_sensitivity  # noqa: E402

MODEL = "smollm2-135m"
SENSITIVITY_FILE = RESULTS / "sensitivity-smollm2-135m.safetensors"
BUDGETS = (2.5, 3.25, 4.25)
UNIFORM = {2.5: PlanConfig(preset="uniform", bits=2, group_size=64),
           3.25: PlanConfig(preset="uniform", bits=3), 4.25: PlanConfig(preset="uniform", bits=4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--windows", type=int, default=None, help="fewer windows (not the full protocol)")
    ap.add_argument("--name", default="quality_vs_bits")
    ap.add_argument("--sensitivity-only", action="store_true", help="stop after the sensitivity table")
    ap.add_argument("--only", default=None, help="comma-separated method names to (re)run")
    args = ap.parse_args()

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    loaded = load_model(MODEL)
    seconds["load"] = time.perf_counter() - t0
    ref, tok = loaded.model, loaded.tokenizer
    t0 = time.perf_counter()
    levels = analyze_levels(ref)
    seconds["levels"] = time.perf_counter() - t0

    sens = measure_sensitivity(ref, tok, levels, SensitivityConfig(), path=SENSITIVITY_FILE)
    # Summed over every run that filled the file (it is resumable), not this run's wall time.
    seconds["sensitivity"] = float(sens.meta["seconds_total"])
    print(f"sensitivity: {len(sens.modules)} modules x {len(sens.formats)} formats, "
          f"{seconds['sensitivity']:.0f} s of measurement", flush=True)
    if args.sensitivity_only:
        return

    clusters = None
    candidates = []  # (method, plan, QuantizeConfig, clusters, extra)
    for b in BUDGETS:
        candidates.append((None, build_plan(levels, UNIFORM[b]), QuantizeConfig(), None, {"budget": b}))
    for b in BUDGETS:
        t0 = time.perf_counter()
        alloc = allocate(levels, sens, AllocateConfig(target_bpw=b))
        alloc_s = time.perf_counter() - t0
        extra = {"budget": b, "predicted_kl": alloc.predicted_kl, "allocate_seconds": alloc_s,
                 "formats_chosen": _format_counts(alloc)}
        candidates.append((None, alloc.plan, QuantizeConfig(), None, extra))
        candidates.append((None, alloc.plan, QuantizeConfig(method="gptq"), None, dict(extra)))
    preset = build_plan(levels, PlanConfig(preset="binary-concentration"))
    candidates.append((None, preset, QuantizeConfig(), None, {}))
    t0 = time.perf_counter()
    clusters = detect_clusters(ref, levels, ClustersConfig(), tok, progress=True)
    seconds["clusters"] = time.perf_counter() - t0
    candidates.append((None, preset, QuantizeConfig(), clusters,
                       {"clusters": clusters.n_clusters, "rows_in_clusters": clusters.rows_in_clusters,
                        "cluster_seconds": seconds["clusters"]}))

    out_json = RESULTS / f"{args.name}.json"
    records = json.loads(out_json.read_text()) if out_json.exists() and args.only else []
    only = set(args.only.split(",")) if args.only else None
    eval_cfg = EvalConfig(max_windows=args.windows)
    with tempfile.TemporaryDirectory() as tmp:
        for _, plan, qcfg, clus, extra in candidates:
            t0 = time.perf_counter()
            q = quantize_model(ref, levels, plan, qcfg, tokenizer=tok, clusters=clus)
            quant_s = time.perf_counter() - t0
            method = q.method_name
            if only is not None and method not in only:
                continue
            rec = score_quantized(q, tok, ref, levels, Path(tmp), eval_cfg, model=MODEL,
                                  seconds={"quantize": quant_s}, **extra)
            if method.startswith("alloc-gptq-3.25"):
                pipe = {k: seconds[k] for k in ("levels", "sensitivity")}
                pipe |= {"allocate": extra["allocate_seconds"], "gptq_calibration": q.stage_seconds.get("calibration", 0.0),
                         "gptq_quantize": q.stage_seconds.get("quantize", 0.0), "quantize_total": quant_s,
                         "export": rec["seconds"]["export"]}
                pipe["total"] = sum(pipe[k] for k in ("levels", "sensitivity", "allocate", "quantize_total", "export"))
                rec["pipeline_seconds"] = pipe
            records = [r for r in records if r["method"] != method] + [rec]
            write(args.name, records)
            print(f"{method}: bpw {q.bpw:.3f}  ppl {rec['ppl']:.3f}  KL {rec['kl']:.4f}  "
                  f"top1 {rec['top1']:.2f}", flush=True)
            del q
    print((RESULTS / f"{args.name}.md").read_text())


def _format_counts(alloc) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in alloc.rows:
        counts[row.format] = counts.get(row.format, 0) + 1
    return counts


if __name__ == "__main__":
    main()
