"""Streaming bars (issue 18): a model twice the memory limit compresses; SmolLM2 streamed == in memory.

1. Writes a synthetic Llama-family checkpoint with random weights, one safetensors shard per block
   (never the whole model in memory), whose float32 bytes are at least twice ``--limit-mb``.
2. In a child process whose address space is capped at ``--limit-mb`` (``RLIMIT_AS``: it counts
   every mapping, shared libraries included, so it is stricter than resident memory; the margin
   is reported), loads it whole the in-memory way (expected to fail) and compresses it streamed
   (``uqcit.stream.compress_streamed``, ``--recipe``), then loads the package and runs it, still
   under the cap. Peak RSS (``ru_maxrss``) and peak address space (``VmPeak``) are reported
   beside the model's float bytes.
3. SmolLM2-135M: the same recipes streamed and in memory; every package file compared byte for
   byte; seconds per block and peak RSS of each.

Writes ``results/streaming.json`` and ``results/streaming.md``. One thread (``OMP_NUM_THREADS=1``,
``torch.set_num_threads(1)``); run it niced:

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python benchmarks/streaming.py
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def synthetic_config(hidden: int, blocks: int, vocab: int):
    from transformers import LlamaConfig

    # TinyLlama-1.1B's block shape (GQA 32/4 heads, FFN 2.75x) at a chosen depth; untied head.
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                       num_hidden_layers=blocks, num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 512),
                       max_position_embeddings=2048, tie_word_embeddings=False)


def write_synthetic(folder: Path, hidden: int, blocks: int, vocab: int) -> int:
    """Random weights (normal, std 0.02; norms 1), one shard per block: returns the float32 bytes."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from uqcit.inputs.tiny import byte_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    config = synthetic_config(hidden, blocks, vocab)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    groups: dict[str, list[str]] = {}
    for k in shapes:
        parts = k.split(".")
        groups.setdefault(f"block-{int(parts[2]):03d}" if parts[1] == "layers" else "outer", []).append(k)
    weight_map, total = {}, 0
    for group, keys in sorted(groups.items()):
        shard = f"model-{group}.safetensors"
        tensors = {k: (torch.ones(shapes[k]) if k.endswith("norm.weight") else
                       torch.randn(shapes[k], generator=gen) * 0.02) for k in keys}
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update({k: shard for k in keys})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return total


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "MKL_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            # glibc: a fixed mmap threshold, so freed block-sized buffers go back to the system instead of
            # fragmenting the heap (RLIMIT_AS counts the heap's high-water mark); one malloc arena
            "MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_ARENA_MAX": "1"}


def run_child(mode: str, args: list[str], limit_bytes: int | None) -> dict:
    """Run this script in ``mode`` in a child, under ``RLIMIT_AS = limit_bytes``; its JSON line back."""
    def cap():
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    proc = subprocess.run([sys.executable, __file__, "--child", mode, *args], capture_output=True, text=True,
                          env=child_env(), preexec_fn=cap, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    out = json.loads(lines[-1]) if lines else {}
    out["returncode"] = proc.returncode
    if proc.returncode != 0:
        out["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
    return out


def _vm_peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmPeak:"):
            return int(line.split()[1]) * 1024
    return 0


def child(mode: str, args: list[str]) -> None:
    """The measured work, in a fresh process (its peak RSS is its own)."""
    torch.set_num_threads(1)
    out: dict = {}
    t0 = time.perf_counter()
    if mode == "baseline":  # the imports of a streamed job, nothing run: what the cap must leave room for
        import uqcit.stream.job  # noqa: F401
        import uqcit.package.load  # noqa: F401
    elif mode == "load":  # the in-memory way: the whole float model
        from uqcit.inputs.models import load_model

        lm = load_model(args[0], progress=False)
        out["parameters"] = lm.n_parameters
    elif mode == "stream":
        from uqcit.recipe import Recipe, builtin_recipe
        from uqcit.stream import compress_streamed

        recipe = builtin_recipe(args[2]) if not args[2].endswith(".json") else Recipe.from_json(Path(args[2]).read_text())
        report = compress_streamed(args[0], recipe, args[1], model_name=args[3], progress=False)
        out["report"] = report.to_dict()
    elif mode == "memory":
        from uqcit.pipeline import Session, export_session
        from uqcit.recipe import Recipe, builtin_recipe

        recipe = builtin_recipe(args[2]) if not args[2].endswith(".json") else Recipe.from_json(Path(args[2]).read_text())
        session = Session.from_model(args[0], progress=False)
        session.run(recipe, skip=("eval",))
        export_session(session, args[1], recipe=recipe, model_name=args[3])
        out["seconds"] = {k: round(v, 2) for k, v in session.seconds.items()}
    elif mode == "run-package":  # load the package and run it on a few tokens
        from uqcit.package import load_package

        pkg = load_package(args[0], progress=False)
        with torch.no_grad():
            logits = pkg.model(input_ids=torch.arange(16).unsqueeze(0), use_cache=False).logits
        out["logits_finite"] = bool(torch.isfinite(logits).all())
        out["logits_shape"] = list(logits.shape)
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["vm_peak_bytes"] = _vm_peak()
    print(json.dumps(out))


def same_files(a: Path, b: Path) -> list[str]:
    """Files that differ (or exist on one side only) between two packages."""
    fa = {p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()}
    fb = {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()}
    return sorted((fa ^ fb) | {f for f in fa & fb if (a / f).read_bytes() != (b / f).read_bytes()})


def base_record(model: str, method: str, report: dict, **extra) -> dict:
    return {"model": model, "method": method, "bpw": report.get("bpw"), "package_bytes": report.get("package_bytes"),
            "ppl": None, "kl": None, "top1": None, "windows": 0, "full_protocol": False,
            "seconds": report.get("seconds", {}), "torch": torch.__version__, "machine": machine(),
            "date": _dt.date.today().isoformat(), **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--blocks", type=int, default=15)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--limit-mb", type=int, default=1300, help="RLIMIT_AS of the streamed job (MiB); the job's "
                    "imports alone map about 600 MiB")
    ap.add_argument("--recipe", default="rtn-w4-g128")
    ap.add_argument("--smollm2-recipes", default="rtn-w4-g128", help="comma-separated; '' skips SmolLM2")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1:])
    torch.set_num_threads(1)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="uqcit-streaming-"))
    records = []

    src = work / "synthetic"
    t0 = time.perf_counter()
    float_bytes = (write_synthetic(src, args.hidden, args.blocks, args.vocab)
                   if not (src / "config.json").is_file() else
                   json.loads((src / "model.safetensors.index.json").read_text())["metadata"]["total_size"])
    write_s = time.perf_counter() - t0
    limit = args.limit_mb * 2**20
    assert float_bytes >= 2 * limit, f"float32 bytes {float_bytes} < 2 x limit {limit}: raise --blocks"
    name = f"synthetic-llama-h{args.hidden}-b{args.blocks}"
    baseline = run_child("baseline", [], None)  # the interpreter with the job's imports
    in_memory = run_child("load", [str(src)], limit)
    streamed = run_child("stream", [str(src), str(work / "pkg-synthetic"), args.recipe, name], limit)
    runs = run_child("run-package", [str(work / "pkg-synthetic")], limit)
    # Without the cap too when that fails (the loader's own limit, reported, not the streamed job's).
    runs_free = run_child("run-package", [str(work / "pkg-synthetic")], None) if runs["returncode"] else runs
    rep = streamed.get("report", {})
    records.append(base_record(name, rep.get("method", args.recipe), rep, kind="memory-bar",
                               float_bytes=float_bytes, limit_kind="RLIMIT_AS", limit_bytes=limit,
                               float_over_limit=round(float_bytes / limit, 3),
                               in_memory_load_under_limit="ok" if in_memory["returncode"] == 0 else in_memory.get("error"),
                               streamed_returncode=streamed["returncode"], streamed_error=streamed.get("error"),
                               peak_rss_bytes=streamed.get("peak_rss_bytes"), vm_peak_bytes=streamed.get("vm_peak_bytes"),
                               block_seconds=rep.get("block_seconds"), blocks=rep.get("blocks"),
                               package_runs_under_limit=runs.get("logits_finite", False), package_run=runs,
                               package_runs_without_limit=runs_free.get("logits_finite"), package_run_free=runs_free,
                               write_checkpoint_s=round(write_s, 1), imports_vm_peak_bytes=baseline.get("vm_peak_bytes"), imports_peak_rss_bytes=baseline.get("peak_rss_bytes")))

    for recipe in [r for r in args.smollm2_recipes.split(",") if r]:
        from uqcit.stream.commands import source_folder

        folder = source_folder("smollm2-135m")
        s_out, m_out = work / f"smol-stream-{Path(recipe).stem}", work / f"smol-memory-{Path(recipe).stem}"
        streamed = run_child("stream", [str(folder), str(s_out), recipe, "smollm2-135m"], None)
        memory = run_child("memory", [str(folder), str(m_out), recipe, "smollm2-135m"], None)
        rep = streamed.get("report", {})
        differ = same_files(s_out, m_out) if streamed["returncode"] == 0 and memory["returncode"] == 0 else None
        records.append(base_record("smollm2-135m", rep.get("method", recipe), rep, kind="streamed-vs-memory",
                                   identical_files=differ == [], differing_files=differ,
                                   files=sum(1 for p in s_out.rglob("*") if p.is_file()) if s_out.exists() else 0,
                                   float_bytes=rep.get("float_bytes"), block_seconds=rep.get("block_seconds"),
                                   peak_rss_bytes=streamed.get("peak_rss_bytes"),
                                   memory_peak_rss_bytes=memory.get("peak_rss_bytes"),
                                   memory_seconds=memory.get("seconds"), memory_wall_s=memory.get("wall_s"),
                                   streamed_wall_s=streamed.get("wall_s"),
                                   errors=[x.get("error") for x in (streamed, memory) if x.get("error")]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "streaming.json").write_text(json.dumps(records, indent=2) + "\n")
    (RESULTS / "streaming.md").write_text(markdown(records) + "\n")
    print(markdown(records))


def markdown(records: list[dict]) -> str:
    mib = lambda v: "—" if v is None else f"{v / 2**20:,.0f}"  # noqa: E731
    rows = ["| model | method | float32 MiB | limit | peak RSS MiB | peak address space MiB | package MiB | "
            "s/block (median) | result |", "|---|---|---:|---|---:|---:|---:|---:|---|"]
    for r in records:
        bs = sorted(r.get("block_seconds") or [0])
        if r["kind"] == "memory-bar":
            limit = f"RLIMIT_AS {mib(r['limit_bytes'])} MiB ({r['float_over_limit']}x)"
            result = (f"in-memory load: {r['in_memory_load_under_limit']}; streamed rc {r['streamed_returncode']}; "
                      f"package loads and runs under the limit: {r['package_runs_under_limit']}, without: "
                      f"{r['package_runs_without_limit']}")
            vm = mib(r.get("vm_peak_bytes"))
        else:
            limit = "none"
            result = (f"{'identical' if r['identical_files'] else 'DIFFER: ' + str(r['differing_files'])} "
                      f"({r['files']} files); in-memory peak RSS {mib(r['memory_peak_rss_bytes'])} MiB")
            vm = "—"
        rows.append(f"| {r['model']} | {r['method']} | {mib(r.get('float_bytes'))} | {limit} | "
                    f"{mib(r.get('peak_rss_bytes'))} | {vm} | {mib(r.get('package_bytes'))} | "
                    f"{bs[len(bs) // 2]:.2f} | {result} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
