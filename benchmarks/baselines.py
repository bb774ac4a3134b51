"""Full-protocol baselines on SmolLM2-135M: the float reference, uniform RTN at 4/3/2 bits
(groups of 128) and the seed's binary-concentration presets.

Every candidate is exported as a package (its bytes are measured on disk), loaded
back, and scored on the same windows against the reference, whose log-probs are
computed once per window for all candidates.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/baselines.py [--windows N]

Writes benchmarks/results/baselines.json and baselines.md.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import record, write  # noqa: E402

from uqcit.stages.quantize import quantize_model  # noqa: E402
from uqcit.stages.evaluate import EvalConfig, evaluate_many  # noqa: E402
from uqcit.stages.levels import analyze_levels  # noqa: E402
from uqcit.inputs.models import load_model  # noqa: E402
from uqcit.package import export_package, load_package, package_bytes  # noqa: E402
from uqcit.stages.plan import PlanConfig, build_plan  # noqa: E402

MODEL = "smollm2-135m"
PLANS = [PlanConfig(preset="uniform", bits=4), PlanConfig(preset="uniform", bits=3),
         PlanConfig(preset="uniform", bits=2), PlanConfig(preset="binary-concentration")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--windows", type=int, default=None, help="fewer windows (not the full protocol)")
    ap.add_argument("--name", default="baselines")
    args = ap.parse_args()

    t0 = time.perf_counter()
    loaded = load_model(MODEL)
    load_s = time.perf_counter() - t0
    ref, tok = loaded.model, loaded.tokenizer
    t0 = time.perf_counter()
    levels = analyze_levels(ref)
    levels_s = time.perf_counter() - t0

    candidates, meta = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in PLANS:
            plan = build_plan(levels, cfg)
            t0 = time.perf_counter()
            q = quantize_model(ref, levels, plan)
            quant_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            path = export_package(q, tok, Path(tmp) / plan.name, source_model=MODEL, levels=levels)
            export_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            pkg = load_package(path)
            load_pkg_s = time.perf_counter() - t0
            candidates[plan.name] = pkg.model
            meta[plan.name] = dict(bpw=q.bpw, package_bytes=package_bytes(path),
                                   seconds={"quantize": quant_s, "export": export_s,
                                            "load_package": load_pkg_s})
            del q

        cfg = EvalConfig(max_windows=args.windows)
        t0 = time.perf_counter()
        res = evaluate_many(candidates, tok, cfg, reference=ref)
        eval_s = time.perf_counter() - t0

    ref_bytes = sum(p.numel() * p.element_size() for p in ref.parameters())
    records = [record(model=MODEL, method="reference-fp32", bpw=32.0, package_bytes=ref_bytes,
                      ev=res["reference"],
                      seconds={"load": load_s, "levels": levels_s, "evaluate": res["reference"].seconds},
                      note="package_bytes here: float32 parameter bytes (tied embedding counted once)")]
    for name, m in meta.items():
        ev = res[name]
        records.append(record(model=MODEL, method=name, bpw=m["bpw"], package_bytes=m["package_bytes"],
                              ev=ev, seconds=m["seconds"] | {"evaluate": ev.seconds}))
    records[0]["seconds"]["evaluate_all"] = eval_s
    jp, mp = write(args.name, records)
    print(mp.read_text())
    print(f"wrote {jp}")


if __name__ == "__main__":
    main()
