"""TensionForge compensation on SmolLM2-135M, full protocol: KL/perplexity with and without
each compensation at ~3.25 bits/weight (RTN w3-g128) and ~2.5 bits/weight (RTN w2-g64), with
the bits each costs.

Candidates per base: none; output shift + scale correction on Level-3 layers; low-rank rank 16
(fp16 factors) + shift on Level-3 layers; and low-rank with a budget of 0.25 extra bits/weight
over *all* Linear layers (ranks chosen greedily) + shift. "Recovery" is the fraction of the
base's KL that compensation removes: 1 - KL(comp) / KL(base).

Every candidate is exported as a package, loaded back and scored on the same windows against
the float reference (log-probs computed once per window).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/compensation.py [--windows N]

Writes benchmarks/results/compensation.json and compensation.md.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import record, write  # noqa: E402

from uqcit.stages.compensate import (  # noqa: E402
    CompensateConfig,
    collect_compensation_stats,
    compensate,
    quantized_linears,
)
from uqcit.stages.quantize import quantize_model  # noqa: E402
from uqcit.inputs.corpus import calibration_batch  # noqa: E402
from uqcit.stages.evaluate import EvalConfig, evaluate_many  # noqa: E402
from uqcit.stages.levels import analyze_levels  # noqa: E402
from uqcit.inputs.models import load_model  # noqa: E402
from uqcit.package import export_package, load_package, package_bytes  # noqa: E402
from uqcit.stages.plan import PlanConfig, build_plan  # noqa: E402

MODEL = "smollm2-135m"
BASES = [PlanConfig(preset="uniform", bits=3, group_size=128), PlanConfig(preset="uniform", bits=2, group_size=64)]
# (The output shift alone, without the scale, was dropped from the full-protocol run: on 2 cores
# every candidate costs ~3.5 minutes of evaluation, and shift + scale is the seed's (a).)
COMPS = [
    CompensateConfig(lowrank=False, bias=True, scale=True),
    CompensateConfig(rank=16, bias=True),
    CompensateConfig(modules=r"\.(q|k|v|o|gate|up|down)_proj$", rank_budget=0.25, bias=True),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--windows", type=int, default=None, help="fewer windows (not the full protocol)")
    ap.add_argument("--name", default="compensation")
    args = ap.parse_args()

    loaded = load_model(MODEL, progress=False)
    ref, tok = loaded.model, loaded.tokenizer
    levels = analyze_levels(ref)
    calib = calibration_batch(tok, n_samples=16, seq_len=256, seed=0)  # the configs' defaults, drawn once

    records = []
    stats = None
    with tempfile.TemporaryDirectory() as tmp:
        for pcfg in BASES:  # evaluated and written base by base, so a long run leaves partial results
            candidates, meta = {}, {}
            plan = build_plan(levels, pcfg)
            t0 = time.perf_counter()
            q = quantize_model(ref, levels, plan, progress=False)
            quant_s = time.perf_counter() - t0
            if stats is None:  # one calibration pass serves every candidate (same layers, same text)
                t0 = time.perf_counter()
                stats = collect_compensation_stats(ref, quantized_linears(q), calib, progress=False)
                stats_s = time.perf_counter() - t0
            results = [(q, {"quantize": quant_s}, None)]
            for ccfg in COMPS:
                t0 = time.perf_counter()
                c = compensate(q, ref, levels, ccfg, stats=stats, progress=False)
                results.append((c, {"quantize": quant_s, "calibration_stats": stats_s,
                                    "compensate": time.perf_counter() - t0}, c))
            for res, seconds, comp in results:
                name = res.method_name
                validation = {"noise_profile": comp.noise_profile()} if comp is not None else None
                path = export_package(res, tok, Path(tmp) / name, source_model=MODEL, levels=levels,
                                      validation=validation)
                candidates[name] = load_package(path, progress=False).model
                extra = {}
                if comp is not None:
                    extra = {"extra_bits": comp.extra_bits, "extra_bpw": comp.extra_bits / comp.weight_count,
                             "compensated_layers": len(comp.compensated),
                             "ranks": sorted({m.rank for m in comp.compensated}),
                             "output_noise_rms_before": _rms([m.output_noise for m in comp.compensated]),
                             "output_noise_rms_after": _rms([m.output_noise_after for m in comp.compensated]),
                             "base": q.method_name, "config": comp.config.to_dict()}
                meta[name] = dict(bpw=res.bpw, package_bytes=package_bytes(path), seconds=seconds, extra=extra)
                print(f"prepared {name}: {res.bpw:.4f} bits/weight", flush=True)
            del results, q

            t0 = time.perf_counter()
            res = evaluate_many(candidates, tok, EvalConfig(max_windows=args.windows), reference=ref, progress=False)
            eval_s = time.perf_counter() - t0
            for name, m in meta.items():
                ev = res[name]
                extra = dict(m["extra"])
                if "base" in extra:
                    extra["kl_recovery"] = 1 - ev.kl / res[extra["base"]].kl
                    extra["ppl_base"] = res[extra["base"]].ppl
                records.append(record(model=MODEL, method=name, bpw=m["bpw"], package_bytes=m["package_bytes"],
                                      ev=ev, seconds=m["seconds"] | {"evaluate": ev.seconds}, **extra))
            if not any(r["method"] == "reference-fp32" for r in records):
                records.append(record(model=MODEL, method="reference-fp32", bpw=32.0, package_bytes=None,
                                      ev=res["reference"], seconds={"evaluate_all": eval_s}))
            jp, mp = write(args.name, records)
            print(mp.read_text(), flush=True)
            del candidates
    for r in records:
        if "kl_recovery" in r:
            print(f"{r['method']}: +{r['extra_bpw']:.4f} bits/weight, KL recovery {100 * r['kl_recovery']:.2f}%")
    print(f"wrote {jp}")


def _rms(values):
    return (sum(v * v for v in values) / len(values)) ** 0.5 if values else None


if __name__ == "__main__":
    main()
