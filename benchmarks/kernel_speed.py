"""The packed CPU kernel, one matrix at a time: decode-sized calls (1 row) per format against float32.

For SmolLM2-135M's two largest shapes (an MLP matrix, 1536 x 576, and the tied LM head, 49152 x 576)
and each format: the milliseconds of one ``PackedKernel`` call on a single input row (what a
decode step does per layer), the best of ``--repeats`` timings of ``--calls`` calls each, next to
``F.linear`` on the float32 weight in the same run (``ratio``: kernel time / float32 time, below 1
is faster), and the largest difference from ``x @ dequantize(q).T``. The weights are random
normal; the kernel's work does not depend on their values. Threads: ``--threads`` (torch and the
kernel alike).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/kernel_speed.py [--threads 2]

Writes benchmarks/results/kernel_speed.json and .md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write  # noqa: E402

from uqcit.runtime import kernel  # noqa: E402
from uqcit.tensor.formats import parse_format  # noqa: E402
from uqcit.tensor.quant import dequantize, quantize  # noqa: E402

SHAPES = {"mlp 1536x576": (1536, 576), "lm head 49152x576": (49152, 576)}
FORMATS = ("w4-g64-sym", "w4-g32", "w4-g32-sym", "w4-g64-nl", "w4-g72-lut", "w3-g64-iz", "w3-g36-iz-s6",
           "w3-g54-lut", "w2-g24-iz-s6", "w8-g32-sym", "w2-g64-vq4", "w3-g64-vq2", "fp16")


def best_ms(fn, calls: int, repeats: int) -> float:
    fn()  # warm: the kernel's prepared arguments, caches
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e3)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--name", default="kernel_speed", help="results/<name>.json and .md")
    args = ap.parse_args()
    if not kernel.available():
        raise SystemExit(f"the packed kernel is unavailable here: {kernel.unavailable_reason()}")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    records = []
    for shape_name, shape in SHAPES.items():
        w = torch.randn(*shape, generator=gen)
        x = torch.randn(1, shape[1], generator=gen)
        float_ms = best_ms(lambda: F.linear(x, w), args.calls, args.repeats)
        for name in FORMATS:
            q = quantize(w, parse_format(name))
            k = kernel.PackedKernel(q)
            ms = best_ms(lambda: k(x), args.calls, args.repeats)
            err = float((k(x) - x @ dequantize(q).T).abs().max())
            records.append({"method": name, "shape": shape_name, "kernel_ms": ms, "float32_ms": float_ms,
                            "ratio": ms / float_ms, "max_abs_diff": err, "threads": args.threads,
                            "bpw": q.fmt.bits_per_weight(w.numel()), "machine": machine(),
                            "torch": torch.__version__})
            print(f"{shape_name:18s} {name:14s} {ms:7.3f} ms  float32 {float_ms:6.3f} ms  ratio {ms / float_ms:5.2f}",
                  flush=True)
    rows = ["| shape | format | bits/weight | kernel ms | float32 F.linear ms | ratio | max abs diff |",
            "|---|---|---:|---:|---:|---:|---:|"]
    rows += [f"| {r['shape']} | {r['method']} | {r['bpw']:.3f} | {r['kernel_ms']:.3f} | {r['float32_ms']:.3f} | "
             f"{r['ratio']:.2f} | {r['max_abs_diff']:.1e} |" for r in records]
    rows += ["", f"One input row (a decode step), best of {args.repeats} x {args.calls} calls, {args.threads} threads; "
                 "ratio = kernel / float32 in the same run."]
    write(args.name, records, "\n".join(rows))


if __name__ == "__main__":
    main()
