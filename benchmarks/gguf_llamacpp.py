"""Packages run outside the workbench, on SmolLM2-135M: llama.cpp (GGUF) and transformers
(compressed-tensors), KL against the float reference and decode speed.

For each workbench plan (RTN, the block linears in 4-bit groups of 32 as Q4_0, Q4_1 and IQ4_NL
blocks, the tied embedding/head in 8-bit groups of 32, so every tensor has a llama.cpp type that
holds its codes bit for bit), and for each kept package given with ``--packages`` (e.g. a learned-
rounding package of ``benchmarks/quality_per_bit.py --keep``): the package scored by the workbench
(``load_package``, torch), the same package exported by ``uqcit.export.gguf`` and scored by llama.cpp
(``llama-cpp-python``, ``logits_all=True``), and, where compressed-tensors holds it (symmetric
integer plans), exported by ``uqcit.export.compressed_tensors`` and scored by transformers'
own loader. Beside them, in the same run and on the same windows: the float reference written as
an F32 GGUF and run by llama.cpp (llama.cpp's own numerical floor: it rounds activations to 8 bits
in its quantized matmuls), and llama.cpp's own quantizer, ``llama_model_quantize``, from that F32
file to Q4_0, Q4_1 and IQ4_NL (its peers at the same bits; it stores SmolLM2's tied embedding as
Q8_0, the types of the workbench plans). Every model is scored by
``uqcit.stages.evaluate.evaluate_many`` against the reference's torch logits, on the protocol's
windows (``--windows N``: the first N, not the full protocol; the record says which).

Decode speed, same process, same thread count for torch and llama.cpp: greedy decoding of
``--new-tokens`` tokens at batch 1 from a short prompt, best of ``--repeats``, for the float32 torch
model, every workbench package (packed kernel) and every GGUF file in llama.cpp.

Needs the ``gguf-run`` extra, built from source (the prebuilt wheels need a newer glibc, and
``GGML_NATIVE=ON`` builds AMX code that segfaults on these machines); about 10 minutes on 2 cores:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF" .venv/bin/pip install -e ".[gguf-run]"
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/gguf_llamacpp.py [--windows N] [--threads 2] \
        [--packages DIR ...] [--name NAME]

Writes benchmarks/results/gguf_llamacpp.json and .md (``--name``: NAME.json and .md).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import machine, record, write  # noqa: E402

from uqcit.export.gguf import export_gguf  # noqa: E402
from uqcit.inputs.models import load_model  # noqa: E402
from uqcit.package import LoadedPackage, export_package, load_package, package_bytes  # noqa: E402
from uqcit.stages.evaluate import EvalConfig, evaluate_many  # noqa: E402
from uqcit.stages.levels import analyze_levels  # noqa: E402
from uqcit.stages.plan import BitPlan  # noqa: E402
from uqcit.stages.quantize import QuantizeConfig, quantize_model  # noqa: E402
from uqcit.tensor.formats import parse_format  # noqa: E402

MODEL = "smollm2-135m"
# workbench plan name -> (block linears, embedding); the GGUF types they export to
PLANS = {"rtn-w4-g32-sym-emb-w8-g32-sym": ("w4-g32-sym", "w8-g32-sym"),  # Q4_0 + Q8_0
         "rtn-w4-g32-emb-w8-g32-sym": ("w4-g32", "w8-g32-sym"),  # Q4_1 + Q8_0
         "rtn-w4-g32-nl-emb-w8-g32-sym": ("w4-g32-nl", "w8-g32-sym")}  # IQ4_NL + Q8_0
PEERS = ("Q4_0", "Q4_1", "IQ4_NL")  # llama_model_quantize of the F32 reference


class LlamaCppForCausalLM(torch.nn.Module):
    """A GGUF file run by llama.cpp, seen by the evaluation protocol as a causal LM: ``forward(input_ids)``
    evaluates the window from an empty cache and returns the logits of every position (``logits_all``)."""

    def __init__(self, path: Path, n_ctx: int, threads: int):
        super().__init__()
        from llama_cpp import Llama

        self.path = path
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                         n_threads=threads, n_threads_batch=threads, verbose=bool(os.environ.get("UQCIT_LLAMA_VERBOSE")))

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        tokens = input_ids[0].tolist()
        self.llm.reset()  # every window from an empty KV cache, as the torch models see it
        self.llm.eval(tokens)
        logits = np.array(self.llm.scores[:len(tokens)], dtype=np.float32)  # [T, vocab]
        return SimpleNamespace(logits=torch.from_numpy(logits)[None])


def quantize_gguf(src: Path, out: Path, qtype: str, threads: int) -> Path:
    """llama.cpp's own quantizer (``llama_model_quantize``) from ``src`` to ``qtype``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {qtype}) returned {rc}")
    return out


def gguf_summary(path: Path) -> dict:
    """Tensor types, and bits per weight over the 2-D weights (the quantized ones), of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    types: dict[str, int] = {}
    bits = weights = 0
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        if len(t.shape) == 2:
            bits += 8 * int(t.n_bytes)
            weights += int(t.n_elements)
    return {"gguf_types": types, "gguf_bpw": bits / weights, "gguf_bytes": path.stat().st_size}


def llama_decode_seconds(path: Path, prompt: list[int], new_tokens: int, threads: int) -> float:
    """Seconds llama.cpp takes to decode ``new_tokens`` greedy tokens after ``prompt`` (batch 1)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(prompt) + new_tokens + 8, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    t0 = time.perf_counter()
    llm.eval(prompt)
    for _ in range(new_tokens):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    seconds = time.perf_counter() - t0
    del llm
    return seconds


def compressed_tensors_model(pkg: LoadedPackage, out: Path) -> torch.nn.Module | None:
    """``pkg`` exported as compressed-tensors and loaded by transformers' own loader, or None where
    the export refuses the plan or this transformers cannot load it (asymmetric: README, known limit)."""
    from transformers import AutoModelForCausalLM

    from uqcit.export.compressed_tensors import export_compressed_tensors
    from uqcit.export.hf import ExportError

    try:
        export_compressed_tensors(pkg, out)
        return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    except (ExportError, ValueError, RuntimeError) as err:
        print(f"compressed-tensors: {pkg.path.name}: {str(err).splitlines()[0][:200]}", flush=True)
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=None, help="the first N windows (not the full protocol)")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp and torch threads")
    ap.add_argument("--packages", nargs="*", default=[], help="kept package folders to add, as DIR or NAME=DIR")
    ap.add_argument("--new-tokens", type=int, default=128, help="decode speed: greedy tokens per run")
    ap.add_argument("--repeats", type=int, default=3, help="decode speed: best of this many runs")
    ap.add_argument("--name", default="gguf_llamacpp", help="results/<name>.json and .md")
    args = ap.parse_args()
    import llama_cpp

    from runtime import PROMPT, decode_seconds

    torch.set_num_threads(args.threads)
    loaded = load_model(MODEL, progress=False)
    ref, tok = loaded.model, loaded.tokenizer
    eval_cfg = EvalConfig(max_windows=args.windows)
    levels = analyze_levels(ref)
    candidates: dict[str, torch.nn.Module] = {}
    info: dict[str, dict] = {}
    ggufs: dict[str, Path] = {}  # candidate name -> its GGUF, for decode speed
    with tempfile.TemporaryDirectory(prefix="uqcit-gguf-") as tmp:
        tmp = Path(tmp)
        packages: dict[str, tuple[LoadedPackage, dict, float]] = {}
        for name, (blocks, embedding) in PLANS.items():
            t0 = time.perf_counter()
            exact = {m.name: parse_format(embedding if m.kind == "embedding" else blocks) for m in levels.quantizable()}
            q = quantize_model(ref, levels, BitPlan(exact=exact, name=name), QuantizeConfig(method="rtn"),
                               progress=False)
            path = export_package(q, tok, tmp / name, source_model=MODEL, levels=levels)
            packages[name] = (load_package(path, progress=False), {"blocks": blocks, "embedding": embedding},
                              time.perf_counter() - t0)
            del q
        for spec in args.packages:
            name, _, folder = spec.rpartition("=")
            name = name or Path(folder).name
            packages[name] = (load_package(folder, progress=False), {"package": name}, 0.0)
        for name, (pkg, plan, prepare) in packages.items():
            t0 = time.perf_counter()
            out = export_gguf(pkg, tmp / f"{name}.gguf", tokenizer_pre="smollm")
            export_s = time.perf_counter() - t0
            common = {"plan": plan, "bpw": float(pkg.metadata["average_bits_per_param"]),
                      "package_bytes": package_bytes(pkg.path)}
            candidates[f"{name} (workbench)"] = pkg.model
            info[f"{name} (workbench)"] = {**common, "runtime": "workbench (torch, packed)",
                                           "seconds": {"quantize+export+load": prepare}}
            candidates[f"{name} (llama.cpp)"] = LlamaCppForCausalLM(out.path, eval_cfg.window, args.threads)
            info[f"{name} (llama.cpp)"] = {**common, **gguf_summary(out.path), "runtime": "llama.cpp",
                                           "exact": all(out.exact.values()), "seconds": {"export_gguf": export_s}}
            ggufs[f"{name} (llama.cpp)"] = out.path
            ct = compressed_tensors_model(pkg, tmp / f"{name}-ct")
            if ct is not None:
                candidates[f"{name} (transformers, compressed-tensors)"] = ct
                info[f"{name} (transformers, compressed-tensors)"] = {**common, "runtime": "transformers "
                                                                      "(compressed-tensors)", "seconds": {}}
        reference = LoadedPackage(ref, tok, {"source_model": MODEL}, Path(MODEL), 0.0)
        f32 = export_gguf(reference, tmp / "reference-f32.gguf", tokenizer_pre="smollm", float_type="F32").path
        candidates["reference F32 (llama.cpp)"] = LlamaCppForCausalLM(f32, eval_cfg.window, args.threads)
        info["reference F32 (llama.cpp)"] = {"bpw": None, "package_bytes": None, **gguf_summary(f32),
                                             "runtime": "llama.cpp", "seconds": {}}
        ggufs["reference F32 (llama.cpp)"] = f32
        for qtype in PEERS:
            t0 = time.perf_counter()
            path = quantize_gguf(f32, tmp / f"reference-{qtype}.gguf", qtype, args.threads)
            summary = gguf_summary(path)
            name = f"llama_model_quantize {qtype} (llama.cpp)"
            candidates[name] = LlamaCppForCausalLM(path, eval_cfg.window, args.threads)
            info[name] = {"bpw": summary["gguf_bpw"], "package_bytes": None, **summary, "runtime": "llama.cpp",
                          "seconds": {"llama_model_quantize": time.perf_counter() - t0}}
            ggufs[name] = path
        results = evaluate_many(candidates, tok, eval_cfg, reference=ref, progress=False)
        for c in candidates.values():  # the scoring instances hold a window-sized context each
            if isinstance(c, LlamaCppForCausalLM):
                del c.llm
        # Decode speed, alternating the runtimes within each repeat so drift hits all alike.
        prompt = tok(PROMPT, return_tensors="pt").input_ids
        torch_models = {"float32 (torch)": ref, **{n: candidates[n] for n in info if n.endswith("(workbench)")}}
        speed: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, model in torch_models.items():
                sec = decode_seconds(model, prompt, args.new_tokens)
                speed[name] = min(speed.get(name, float("inf")), sec)
            for name, path in ggufs.items():
                sec = llama_decode_seconds(path, prompt[0].tolist(), args.new_tokens, args.threads)
                speed[name] = min(speed.get(name, float("inf")), sec)
    tps = {n: args.new_tokens / s for n, s in speed.items()}
    print(json.dumps({n: round(v, 1) for n, v in tps.items()}, indent=1), flush=True)
    records = []
    for name, ev in results.items():
        if name == "reference":
            continue
        extra = {k: v for k, v in info[name].items() if k not in ("bpw", "package_bytes", "seconds")}
        if name in tps:
            extra["decode_tokens_per_s"] = tps[name]
            extra["decode_vs_float32_torch"] = tps[name] / tps["float32 (torch)"]
        records.append(record(model=MODEL, method=name, bpw=info[name]["bpw"],
                              package_bytes=info[name]["package_bytes"], ev=ev,
                              seconds={**info[name]["seconds"], "evaluate": ev.seconds},
                              reference_ppl=results["reference"].ppl, llama_cpp_python=llama_cpp.__version__,
                              threads=args.threads, new_tokens=args.new_tokens, **extra))
    records.append({"model": MODEL, "method": "float32 (torch)", "runtime": "torch", "bpw": 32.0,
                    "decode_tokens_per_s": tps["float32 (torch)"], "threads": args.threads,
                    "new_tokens": args.new_tokens, "machine": machine()})
    # Its own table: the float32 torch row is speed only, which common.markdown does not show.
    write(args.name, records, _markdown(records))
    print(_markdown(records))


def _markdown(records: list[dict]) -> str:
    rows = ["| model | runtime | bits/weight | GGUF types | perplexity | KL(ref ‖ model) | top-1 % | decode tok/s | "
            "windows |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    scored = [r for r in records if "kl" in r]
    for r in records:
        bpw = "—" if r["bpw"] is None else f"{r['bpw']:.3f}"
        types = ", ".join(f"{k}×{v}" for k, v in sorted(r.get("gguf_types", {}).items())) or "—"
        tps = f"{r['decode_tokens_per_s']:.1f}" if "decode_tokens_per_s" in r else "—"
        if "kl" not in r:  # the float32 torch model: speed only
            rows.append(f"| {r['method']} | {r['runtime']} | {bpw} | — | — | — | — | {tps} | — |")
            continue
        rows.append(f"| {r['method']} | {r['runtime']} | {bpw} | {types} | {r['ppl']:.3f} | {r['kl']:.5f} | "
                    f"{r['top1']:.2f} | {tps} | {r['windows']} |")
    first = scored[0]
    scope = "full protocol" if first["full_protocol"] else f"the first {first['windows']} window(s), not the full protocol"
    return "\n".join(rows + ["", f"Reference perplexity {first['reference_ppl']:.3f}; {scope}; llama.cpp and torch "
                                 f"{first['threads']} thread(s), llama-cpp-python {first['llama_cpp_python']}. "
                                 "bits/weight: the workbench's stored bits over its compressed weights; for "
                                 "llama.cpp's files, bits over the 2-D tensors of the GGUF. Decode: greedy "
                                 f"{first.get('new_tokens', '—')} tokens at batch 1, best of the repeats, "
                                 "every runtime in the same process."])


if __name__ == "__main__":
    main()
