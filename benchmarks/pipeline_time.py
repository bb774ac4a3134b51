"""Wall time of the full pipeline on SmolLM2-135M, stage by stage, and the quality it delivers.

Runs the built-in recipe ``alloc-gptq-3.25`` through ``uqcit.pipeline.run_job`` exactly as the
CLI does: load, layer levels, the sensitivity of every quantizable module in every candidate
format (measured from scratch, nothing reused), allocation at 3.25 bits/weight, error-feedback
(GPTQ) calibration and rounding, export, load back, full-protocol evaluation. The issue's
pipeline is everything up to and including export; loading back and evaluating are recorded
apart. Run it on an otherwise idle machine: the load average before and after is recorded.

The recipe measures sensitivity on 2 × 64 calibration tokens (the library default is 4 × 128;
the cost is linear in tokens, and 4 × 128 would take about 23 minutes on 2 cores: 6.5 s per module
measured at block 15, × 211 modules). What the smaller sample costs is measured here, not assumed: rank
correlation of its table with the 4 × 128 table of ``quality_vs_bits.py``, how many modules the
allocator puts in another format with it, and the KL of the package against ``alloc-gptq-3.25``
of ``quality_vs_bits.json`` (same allocator and quantizer, 4 × 128 table).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/pipeline_time.py

Writes benchmarks/results/pipeline.json and .md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, merge, record  # noqa: E402

from uqcit.stages.allocate import AllocateConfig, allocate  # noqa: E402
from uqcit.stages.evaluate import EvalConfig  # noqa: E402
from uqcit.pipeline import Session, run_job  # noqa: E402
from uqcit.recipe import builtin_recipe  # noqa: E402
from uqcit.stages.sensitivity import SensitivityResult  # noqa: E402
from uqcit.stages.sensitivity_fit import spearman  # noqa: E402

MODEL = "smollm2-135m"
RECIPE = "alloc-gptq-3.25"
FULL_TABLE = RESULTS / "sensitivity-smollm2-135m.safetensors"
PIPELINE_STAGES = ("levels", "sensitivity", "allocate", "quantize", "export")


def compare_tables(small: SensitivityResult, full: SensitivityResult, levels, budget: float) -> dict:
    """Rank agreement of two sensitivity tables and of the plans the allocator makes from them."""
    rows = [full.modules.index(m) for m in small.modules]
    out = {"spearman": {}}
    for j, f in enumerate(small.formats):
        if f.startswith("fp16"):
            continue  # measured jointly: one value for every module
        out["spearman"][f] = spearman(small.table[:, j].numpy(), full.table[rows, full.formats.index(f)].numpy())
    a = allocate(levels, small, AllocateConfig(target_bpw=budget)).plan
    b = allocate(levels, full, AllocateConfig(target_bpw=budget)).plan
    out["plan_modules_same_format"] = sum(a.format_for(m) == b.format_for(m) for m in small.modules)
    out["plan_modules"] = len(small.modules)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=MODEL, help="another model: a smoke run, printed and not recorded")
    ap.add_argument("--windows", type=int, default=None, help="fewer windows (not the full protocol)")
    args = ap.parse_args()
    recipe = builtin_recipe(RECIPE)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    session = Session.from_model(args.model, progress=True)
    with tempfile.TemporaryDirectory() as tmp:
        report = run_job(args.model, recipe, Path(tmp) / RECIPE, session=session, progress=True,
                         eval_config=EvalConfig(max_windows=args.windows) if args.windows else None)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()

    q = session.results["quantize"]
    sens = session.results["sensitivity"]
    pipe = {k: session.seconds[k] for k in ("load", *PIPELINE_STAGES) if k in session.seconds}
    pipe.update({f"quantize.{k}": v for k, v in q.stage_seconds.items()})
    pipe["pipeline_total"] = sum(session.seconds[k] for k in PIPELINE_STAGES if k in session.seconds)
    pipe["load_package"] = session.seconds["load_package"]
    pipe["evaluate"] = session.seconds["evaluate"]
    pipe["wall"] = wall
    extra = {"recipe": RECIPE, "load_average_before": load_before, "load_average_after": load_after,
             "sensitivity": {"modules": len(sens.modules), "formats": sens.formats,
                             "calibration_tokens": sens.meta["settings"]["calibration"]["samples"]
                             * sens.meta["settings"]["calibration"]["seq_len"],
                             "floor_kl": sens.floor_kl, "seconds_reference": sens.meta.get("seconds_reference")},
             "predicted_kl": session.results["allocate"].predicted_kl,
             "reference_ppl": report.reference.ppl}
    if FULL_TABLE.exists() and args.model == MODEL:
        extra["vs_4x128_table"] = compare_tables(sens, SensitivityResult.load(FULL_TABLE),
                                                 session.results["levels"], 3.25)
    rec = record(model=args.model, method=f"pipeline-{report.method}", bpw=report.bpw,
                 package_bytes=report.package_bytes, ev=report.compressed, seconds=pipe, **extra)
    if args.model == MODEL and not args.windows:  # a smoke run is printed, never recorded
        merge("pipeline", [rec])
    print({k: round(v, 1) for k, v in pipe.items()})
    print(report.summary())
    print(extra.get("vs_4x128_table"))


if __name__ == "__main__":
    main()
