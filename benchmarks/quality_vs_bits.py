"""Quality vs bits on SmolLM2-135M: uniform RTN, the seed presets, the allocator with RTN and with
error-feedback (GPTQ) rounding, and GHZ clusters — all under the full evaluation protocol.

Stages, each timed (the "pipeline" record is the issue's full pipeline: levels, sensitivity of
every quantizable module in every candidate format, allocation, GPTQ calibration + rounding,
export):

1. the sensitivity table, measured into ``results/sensitivity-smollm2-135m.safetensors``
   (resumable: a restart skips what the file holds; ``--sensitivity-only`` stops after it);
2. for every candidate: quantize, export a package, load it back from disk; then evaluate the
   candidates against the float reference on the same windows, ``--batch`` at a time (the
   reference's log-probs computed once per batch). Results are merged into the JSON after every
   batch, so a stopped run keeps what it measured, and a restart measures only what is missing.

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

from common import RESULTS, merge, package_candidate, score_and_merge  # noqa: E402

from uqcit.stages.allocate import AllocateConfig, allocate  # noqa: E402
from uqcit.stages.clusters import ClustersConfig, detect_clusters  # noqa: E402
from uqcit.stages.quantize import QuantizeConfig, quantize_model  # noqa: E402
from uqcit.stages.evaluate import EvalConfig  # noqa: E402
from uqcit.stages.levels import analyze_levels  # noqa: E402
from uqcit.inputs.models import load_model  # noqa: E402
from uqcit.stages.plan import PlanConfig, build_plan  # noqa: E402
from uqcit.stages.sensitivity import SensitivityConfig, measure_sensitivity  # noqa: E402

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
    ap.add_argument("--batch", type=int, default=4, help="candidates evaluated together (one reference pass)")
    ap.add_argument("--reuse-baselines", action="store_true",
                    help="copy rtn-w4-g128 and the preset from baselines.json instead of re-measuring")
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

    # (method name, plan, QuantizeConfig, clusters, extra), cheapest first within each group.
    candidates = [(f"rtn{build_plan(levels, UNIFORM[b]).name[3:]}", build_plan(levels, UNIFORM[b]),
                   QuantizeConfig(), None, {"budget": b}) for b in BUDGETS]
    for method in ("rtn", "gptq"):
        for b in BUDGETS:
            t0 = time.perf_counter()
            alloc = allocate(levels, sens, AllocateConfig(target_bpw=b))
            extra = {"budget": b, "predicted_kl": alloc.predicted_kl,
                     "allocate_seconds": time.perf_counter() - t0, "formats_chosen": alloc.format_counts()}
            candidates.append((f"alloc-{method}-{b:g}", alloc.plan, QuantizeConfig(method=method), None, extra))
    preset = build_plan(levels, PlanConfig(preset="binary-concentration"))
    candidates.append(("preset-binary-concentration", preset, QuantizeConfig(), None, {}))
    candidates.append(("clusters-preset-binary-concentration", preset, QuantizeConfig(), "clusters", {}))

    done = {r["method"] for r in json.loads((RESULTS / f"{args.name}.json").read_text())} \
        if (RESULTS / f"{args.name}.json").exists() else set()
    if args.reuse_baselines:
        # Same code, same protocol, deterministic (rtn-w3-g128 measured here matched baselines.json
        # to every digit): copy those rows instead of spending 32 more passes on each.
        base = json.loads((RESULTS / "baselines.json").read_text())
        reused = [dict(r, source="baselines.json") for r in base if r["method"] in
                  {"rtn-w4-g128", "preset-binary-concentration"} and r["method"] not in done]
        if reused:
            merge(args.name, reused)
            done |= {r["method"] for r in reused}
    only = set(args.only.split(",")) if args.only else None
    todo = [c for c in candidates if (c[0] in only if only else c[0] not in done)]
    print("to measure:", [c[0] for c in todo], flush=True)

    eval_cfg = EvalConfig(max_windows=args.windows)
    clusters = None
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(0, len(todo), args.batch):
            batch = []
            for method, plan, qcfg, clus, extra in todo[i:i + args.batch]:
                if clus == "clusters" and clusters is None:
                    t0 = time.perf_counter()
                    clusters = detect_clusters(ref, levels, ClustersConfig(), tok, progress=False)
                    seconds["clusters"] = time.perf_counter() - t0
                if clus == "clusters":
                    extra = {"clusters": clusters.n_clusters, "rows_in_clusters": clusters.rows_in_clusters,
                             "cluster_seconds": seconds["clusters"], **extra}
                t0 = time.perf_counter()
                q = quantize_model(ref, levels, plan, qcfg, tokenizer=tok,
                                   clusters=clusters if clus == "clusters" else None)
                quant_s = time.perf_counter() - t0
                assert q.method_name == method, (q.method_name, method)
                cand = package_candidate(q, tok, levels, Path(tmp), model=MODEL, seconds={"quantize": quant_s},
                                         **extra)
                if method == "alloc-gptq-3.25":
                    pipe = {"levels": seconds["levels"], "sensitivity": seconds["sensitivity"],
                            "allocate": extra["allocate_seconds"],
                            "gptq_calibration": q.stage_seconds.get("calibration", 0.0),
                            "gptq_quantize": q.stage_seconds.get("quantize", 0.0),
                            "export": cand["seconds"]["export"]}
                    pipe["total"] = sum(v for k, v in pipe.items())
                    cand["extra"]["pipeline_seconds"] = pipe
                batch.append(cand)
                del q
            score_and_merge(args.name, batch, tok, ref, eval_cfg, model=MODEL)
            del batch
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
