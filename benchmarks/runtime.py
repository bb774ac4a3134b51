"""Packed runtime on SmolLM2-135M: resident memory and CPU decode speed vs float32.

- Memory: a fresh process loads the float32 model, another loads the packed package
  (``load_package``); each loads once to warm up (modeling code, tokenizer, kernel library),
  drops it, and reports its resident set size (RSS) after a second load (every tensor read once,
  so memory-mapped weights count) minus its RSS before it, after ``gc`` and ``malloc_trim`` so
  memory freed while loading is not counted. Also the bytes of the model's tensors (what stays
  resident by construction). Target: packed RSS ≤ 1.2 × (package weight bytes + float parts).
- Speed: greedy ``model.generate`` of 128 new tokens, batch 1, from a short prompt, for the
  float32 model and the packed one in the same process, alternating, best of ``--repeats``.
  The packed model's pure-torch path (dequantize every weight on every call) is timed on
  fewer tokens for comparison. Where the packed model is slower, the time inside the linear
  layers vs the rest of decoding is measured with forward hooks.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/runtime.py [--formats w4-g128 w3-g128]

Writes benchmarks/results/runtime.json and runtime.md.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import RESULTS, machine  # noqa: E402

MODEL = "smollm2-135m"
PROMPT = "The history of the city begins"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def tensor_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def child(kind: str, path: str | None) -> None:
    """Measure one load in this fresh process (after a warm-up load); prints JSON."""
    import transformers  # noqa: F401  (imported before the baseline is taken)

    from uqcit.inputs.models import load_model
    from uqcit.package import load_package

    def load():
        return load_model(MODEL, progress=False).model if kind == "float" else load_package(path, progress=False).model

    # A first load pulls in the modeling code, tokenizer, kernel library...: not the model's memory.
    warm = load()
    del warm
    _trim()
    before = rss_bytes()
    model = load()
    with torch.no_grad():  # fault in every page: a memory-mapped weight is resident only once read
        for t in list(model.parameters()) + list(model.buffers()):
            t.sum()
    _trim()
    after = rss_bytes()
    print(json.dumps({"rss_delta": after - before, "tensor_bytes": tensor_bytes(model)}))


def measure_memory(kind: str, path: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind] + ([path] if path else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def decode_seconds(model, ids, new_tokens: int) -> float:
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        seconds = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new_tokens
    return seconds


def linear_share(model, ids, new_tokens: int) -> dict:
    """Seconds of one decode inside Linear/QuantLinear forwards vs the whole generate call."""
    from uqcit.runtime.modules import QuantLinear

    spent = [0.0]
    starts = {}

    def pre(mod, _args):
        starts[id(mod)] = time.perf_counter()

    def post(mod, _args, _out):
        spent[0] += time.perf_counter() - starts.pop(id(mod))

    handles = []
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, QuantLinear)):
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        total = decode_seconds(model, ids, new_tokens)
    finally:
        for h in handles:
            h.remove()
    return {"total_s": total, "linear_s": spent[0], "linear_fraction": spent[0] / total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--formats", nargs="+", default=["w4-g128", "w3-g128", "w2-g64"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--torch-path-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--name", default="runtime")
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1] if len(args.child) > 1 else None)
        return

    from uqcit.runtime import kernel as packed
    from uqcit.stages.quantize import quantize_model
    from uqcit.tensor.formats import parse_format
    from uqcit.stages.levels import analyze_levels
    from uqcit.inputs.models import load_model
    from uqcit.package import export_package, load_package, package_bytes, read_metadata
    from uqcit.stages.plan import PlanConfig, build_plan
    from uqcit.runtime.modules import QuantLinear

    loaded = load_model(MODEL, progress=False)
    ref, tok = loaded.model, loaded.tokenizer
    levels = analyze_levels(ref)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    float_mem = measure_memory("float", None)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.formats:
            fmt = parse_format(name)
            plan = build_plan(levels, PlanConfig(preset="uniform", bits=fmt.bits, group_size=fmt.group_size))
            q = quantize_model(ref, levels, plan, progress=False)
            path = export_package(q, tok, Path(tmp) / plan.name, source_model=MODEL, levels=levels)
            del q
            meta = read_metadata(path)
            weight_bytes = meta["quantized_stored_bytes"]
            pkg = load_package(path, progress=False).model
            float_parts = sum(t.numel() * t.element_size() for t in pkg.parameters())  # norms, biases
            mem = measure_memory("packed", str(path))
            target = 1.2 * (weight_bytes + float_parts)

            times = {"float32": [], "packed": []}
            for _ in range(args.repeats):  # alternate so drifting machine load hits both
                times["float32"].append(decode_seconds(ref, ids, args.new_tokens))
                times["packed"].append(decode_seconds(pkg, ids, args.new_tokens))
            best = {k: min(v) for k, v in times.items()}
            tps = {k: args.new_tokens / v for k, v in best.items()}
            for m in pkg.modules():  # the pure-torch path, on fewer tokens
                if isinstance(m, QuantLinear):
                    m.packed_kernel = False
            torch_s = decode_seconds(pkg, ids, args.torch_path_tokens)
            for m in pkg.modules():
                if isinstance(m, QuantLinear):
                    m.packed_kernel = True
            rec = {
                "model": MODEL, "method": plan.name, "bpw": meta["average_bits_per_param"],
                "package_bytes": package_bytes(path), "ppl": None, "kl": None, "top1": None, "windows": 0,
                "package_weight_bytes": weight_bytes, "float_parts_bytes": float_parts,
                "packed_rss_delta": mem["rss_delta"], "packed_tensor_bytes": mem["tensor_bytes"],
                "float32_rss_delta": float_mem["rss_delta"], "float32_tensor_bytes": float_mem["tensor_bytes"],
                "memory_target_bytes": target, "memory_ratio_to_package": mem["rss_delta"] / (weight_bytes + float_parts),
                "memory_target_met": mem["rss_delta"] <= target,
                "new_tokens": args.new_tokens, "decode_seconds": times,
                "tokens_per_s": tps, "speed_ratio_packed_vs_float32": tps["packed"] / tps["float32"],
                "torch_path_tokens_per_s": args.torch_path_tokens / torch_s,
                "kernel": packed.available(), "kernel_note": packed.unavailable_reason(),
                "seconds": {"decode_float32_best": best["float32"], "decode_packed_best": best["packed"]},
                "torch": torch.__version__, "machine": machine(),
                "date": time.strftime("%Y-%m-%d"),
                "load_average_start": open("/proc/loadavg").read().split()[:3],
            }
            if rec["speed_ratio_packed_vs_float32"] < 1.0:
                rec["profile"] = {"float32": linear_share(ref, ids, 32), "packed": linear_share(pkg, ids, 32)}
            records.append(rec)
            print(json.dumps({k: rec[k] for k in ("method", "memory_ratio_to_package", "tokens_per_s",
                                                  "speed_ratio_packed_vs_float32", "torch_path_tokens_per_s")}),
                  flush=True)
            del pkg
            _trim()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(records, indent=2) + "\n")
    rows = ["| method | bits/weight | weight MB | packed RSS MB (ratio) | float32 RSS MB | tokens/s float32 | "
            "tokens/s packed | ratio | torch-path tokens/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        rows.append(f"| {r['method']} | {r['bpw']:.3f} | {r['package_weight_bytes'] / 1e6:.1f} | "
                    f"{r['packed_rss_delta'] / 1e6:.1f} ({r['memory_ratio_to_package']:.2f}) | "
                    f"{r['float32_rss_delta'] / 1e6:.1f} | {r['tokens_per_s']['float32']:.2f} | "
                    f"{r['tokens_per_s']['packed']:.2f} | {r['speed_ratio_packed_vs_float32']:.2f} | "
                    f"{r['torch_path_tokens_per_s']:.2f} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
