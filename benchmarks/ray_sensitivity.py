"""Per-module sensitivity on Ray tasks against the serial run, on SmolLM2-135M: same table, wall time.

Three runs of the same measurement (``SensitivityConfig`` defaults: 4 x 128 calibration tokens,
formats w2/w3/w4/w8 at groups of 128 and fp16; the modules of ``--modules``), in this order:
serial with 1 torch thread, serial with ``--workers`` threads (the serial run given the same
cores), and ``measure_sensitivity_ray`` with ``--workers`` local Ray tasks of 1 thread each
(Ray's start-up and the model's transfer to the workers included). The Ray table must equal the
1-thread serial table entry by entry (the same arithmetic in the same thread count); the record
says whether it does and gives both wall-time ratios.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/ray_sensitivity.py [--workers 2] [--modules REGEX]

Writes benchmarks/results/ray_sensitivity.json and .md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import machine, write  # noqa: E402
from uqcit.inputs.models import load_model  # noqa: E402
from uqcit.stages.levels import analyze_levels  # noqa: E402
from uqcit.stages.sensitivity import SensitivityConfig, measure_sensitivity  # noqa: E402
from uqcit.stream.distributed import measure_sensitivity_ray  # noqa: E402

MODEL = "smollm2-135m"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--modules", default=r"layers\.[0-7]\.", help="regex of the modules measured")
    args = ap.parse_args()
    loaded = load_model(MODEL, progress=False)
    model, tok = loaded.model, loaded.tokenizer
    levels = analyze_levels(model)
    cfg = SensitivityConfig(modules=args.modules)
    runs, seconds = {}, {}
    for name, threads in (("serial, 1 thread", 1), (f"serial, {args.workers} threads", args.workers)):
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        runs[name] = measure_sensitivity(model, tok, levels, cfg, progress=False)
        seconds[name] = time.perf_counter() - t0
        print(f"{name}: {seconds[name]:.1f} s", flush=True)
    torch.set_num_threads(1)
    name = f"Ray, {args.workers} workers x 1 thread"
    t0 = time.perf_counter()
    runs[name] = measure_sensitivity_ray(model, tok, levels, cfg, workers=args.workers, threads=1, progress=False)
    seconds[name] = time.perf_counter() - t0
    print(f"{name}: {seconds[name]:.1f} s", flush=True)
    serial1, serial_n = list(runs)[:2]
    base = runs[serial1]
    records = []
    for name, res in runs.items():
        same = bool(torch.equal(res.table, base.table))
        records.append({"model": MODEL, "method": name, "modules": len(res.modules), "formats": list(res.formats),
                        "cells": int(res.table.numel()), "seconds": {"wall": seconds[name]},
                        "identical_to_serial_1_thread": same,
                        "max_abs_difference": float((res.table - base.table).abs().nan_to_num(0).max()),
                        "wall_vs_serial_1_thread": seconds[name] / seconds[serial1],
                        "wall_vs_serial_same_cores": seconds[name] / seconds[serial_n],
                        "settings": {"calib_samples": cfg.calib_samples, "calib_seq_len": cfg.calib_seq_len,
                                     "group_size": cfg.group_size, "modules": args.modules},
                        "machine": machine()})
    rows = ["| run | modules x formats | wall s | vs serial 1 thread | vs serial, same cores | table identical |",
            "|---|---:|---:|---:|---:|---|"]
    for r in records:
        rows.append(f"| {r['method']} | {r['modules']} x {len(r['formats'])} | {r['seconds']['wall']:.1f} | "
                    f"{r['wall_vs_serial_1_thread']:.2f} | {r['wall_vs_serial_same_cores']:.2f} | "
                    f"{'yes' if r['identical_to_serial_1_thread'] else 'no (max diff %.2e)' % r['max_abs_difference']} |")
    table = "\n".join(rows + ["", f"SmolLM2-135M, {records[0]['machine']['cores']} cores; Ray's start-up and "
                                  "the model's transfer to its workers are inside its wall time."])
    write("ray_sensitivity", records, table)
    print(table)


if __name__ == "__main__":
    main()
