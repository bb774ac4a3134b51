"""Loader fuzzing: mutated copies of tiny packages must load with identical outputs or raise PackageError.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/fuzz_packages.py \
        [--cases 10000] [--minutes 10] [--seed 0]

Seven tiny packages (tiny random models of ``uqcit.inputs.tiny``): rtn w4 (llama), a mixed format with
an fp16 high-precision mask (llama), w3 + int8 high part (mistral, untied head), pruned (llama, tied
embedding and head, sparse), compensated (llama, low-rank + scale), rotated (llama, online rotations)
and GPT-2 (rtn w4). Each case copies one package, applies one seeded mutation and loads it in a
worker subprocess under a per-case alarm:

- structural mutations (metadata JSON values, config.json values, safetensors headers, files
  deleted/added/symlinked/replaced by a FIFO) are loaded with ``verify=False``, so the checks of
  ``uqcit.package.validate`` meet them, then run one forward pass and a two-token greedy
  ``generate`` + tokenizer decode. Outcomes: refused
  (``PackageError``), identical logits, different logits (an ``unverified change``: a change
  the structure cannot reveal, e.g. an ``rms_norm_eps``), or a raw exception. Every case whose
  unverified load ran, and every 4th case, is loaded again the default way (manifest verified):
  a load with different logits there is a ``silent change``.
- data-region flips (one bit inside a weight file's tensor data) are loaded the default way:
  ``flips_detected`` counts the ones the manifest check refused.
- signed cases: a signed copy of the package, mutated, loaded with the public key: every one
  must be refused.

A worker that dies (segfault, OOM kill) is counted in ``hangs`` with its case and restarted after
it. Writes benchmarks/results/fuzz_packages.json and .md. ``tests/package/test_fuzz.py`` runs the
same mutator on a few hundred cases.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("rtn-w4", "mixed-w2+fp16", "mixed-w3+int8", "pruned", "compensated", "rotated", "gpt2")
CASE_SECONDS = 30  # a load and forward of a tiny package takes well under a second
IDS = torch.tensor([[3, 17, 101, 255, 0, 42, 7, 200]])


# ---------------------------------------------------------------------------------------------
# the packages


def build_packages(workdir: Path, kinds=KINDS, *, signed=KINDS) -> dict[str, Path]:
    """Export each tiny package under ``workdir``, and a signed copy ``<kind>-signed`` of those in ``signed``."""
    from uqcit.inputs.tiny import tiny_model
    from uqcit.package import export_package
    from uqcit.package.secure import generate_signing_key, save_public_key
    from uqcit.stages.levels import analyze_levels
    from uqcit.stages.plan import uniform_plan
    from uqcit.stages.quantize import quantize_model
    from uqcit.tensor.formats import QuantFormat

    def quantized(family, fmt, model=None):
        model = model if model is not None else tiny_model(family)[0]
        levels = analyze_levels(model)
        return quantize_model(model, levels, uniform_plan([m.name for m in levels.modules], fmt),
                              progress=False), levels

    tok = tiny_model("llama")[1]
    key = generate_signing_key()
    save_public_key(key, workdir / "public.pem")
    out = {}
    for kind in kinds:
        if kind == "rtn-w4":
            res = quantized("llama", QuantFormat(4, 32))[0]
        elif kind == "mixed-w2+fp16":
            res = quantized("llama", QuantFormat(2, 32, high_bits=16, high_fraction=0.05))[0]
        elif kind == "mixed-w3+int8":
            res = quantized("mistral", QuantFormat(3, 32, symmetric=True, high_bits=8, high_fraction=0.1))[0]
        elif kind == "gpt2":
            res = quantized("gpt2", QuantFormat(4, 32))[0]
        elif kind == "pruned":
            from uqcit.stages.prune import PruneConfig, prune_model

            model = tiny_model("llama")[0]
            res = prune_model(model, analyze_levels(model), PruneConfig(
                method="magnitude", kept_fraction=0.05, outside_blocks=True), progress=False)
        elif kind == "compensated":
            from uqcit.stages.compensate import CompensateConfig, compensate

            model = tiny_model("llama")[0]
            q, levels = quantized("llama", QuantFormat(3, 32), model)
            calib = torch.randint(0, 256, (8, 48), generator=torch.Generator().manual_seed(0))
            res = compensate(q, model, levels, CompensateConfig(rank=4, scale=True, factor_format="w8-g32"),
                             calibration=calib, progress=False)
        elif kind == "rotated":
            from uqcit.stages.rotation import RotationConfig, rotate_model

            res = quantized("llama", QuantFormat(4, 32), rotate_model(tiny_model("llama")[0], RotationConfig(),
                                                                      progress=False).model)[0]
        else:
            raise ValueError(f"unknown package kind {kind!r}; choose from {KINDS}")
        out[kind] = export_package(res, tok, workdir / kind, source_model=f"tiny-{kind}")
        if kind in signed:
            out[f"{kind}-signed"] = export_package(res, tok, workdir / f"{kind}-signed", signing_key=key)
    return out


# ---------------------------------------------------------------------------------------------
# the mutator

WEIRD = [None, True, False, 0, 1, -1, 7, 2**31, 2**62, -(2**40), 0.5, -3.25, 1e308, "", "x", "nope",
         "w4-g32", "fp16", "sparse-float32", "layer_000", "outer", "../../etc", "/etc", "outer/../../x",
         "layer_999", "model.embed_tokens", "lm_head", [], [1], [64, 64], [256, 64], [-1, 64], [0, 0],
         [2**20, 2**20], {}, {"a": 1}, "LlamaForCausalLM", "GPT2LMHeadModel", "BertModel", "AutoModel",
         "embedding", "linear", "masked_linear", "float16", "int64", "bool"]
CONFIG_SPECIAL = [("vocab_size", 2**22), ("intermediate_size", 2**21), ("hidden_act", "nope"),
                  ("num_attention_heads", 3), ("num_key_value_heads", 3), ("model_type", "bert"),
                  ("hidden_size", -64), ("max_position_embeddings", 0), ("n_head", 5), ("n_embd", 0),
                  ("pad_token_id", 300), ("pad_token_id", 5), ("head_dim", 7), ("rope_theta", 0),
                  ("layer_norm_epsilon", -1.0), ("torch_dtype", "int8"), ("dtype", "float64"),
                  ("architectures", ["Nope"]), ("num_hidden_layers", 2), ("n_layer", 9)]
STRUCTURAL = ("metadata", "metadata", "metadata", "config", "header", "header", "files")


def _paths(doc: Any, prefix=()) -> list[tuple]:
    """Every key path in a JSON document (dict keys and list indices)."""
    out = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        out.append(prefix + (k,))
        out.extend(_paths(v, prefix + (k,)))
    return out


def _value_like(rng: random.Random, old: Any, names: list[str]) -> Any:
    """A replacement for ``old``: a nearby number, another name, or a value of the wrong type."""
    choice = rng.random()
    if isinstance(old, bool) or choice < 0.4:
        return rng.choice(WEIRD + [rng.choice(names)] if names else WEIRD)
    if isinstance(old, int):
        return rng.choice([old + 1, old - 1, old * 2, -old, 0, old + 2**20, old // 2])
    if isinstance(old, float):
        return rng.choice([old * 2, -old, 0.0, old + 1e-3, float("inf")])
    if isinstance(old, str):
        return rng.choice(names + [old + "x", old[:-1], old.upper(), old.replace("layers.1", "layers.2")])
    if isinstance(old, list) and old:
        return rng.choice([old[::-1], old[:-1], old + old[-1:], [v * 2 if isinstance(v, int) else v for v in old]])
    return rng.choice(WEIRD)


def _mutate_json(rng: random.Random, doc: Any, names: list[str]) -> str:
    paths = _paths(doc)
    if not paths:
        return "empty"
    path = rng.choice(paths)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    op = rng.random()
    if op < 0.12 and isinstance(parent, dict):
        del parent[key]
        return f"del {'.'.join(map(str, path))[:80]}"
    if op < 0.2 and isinstance(parent, dict):
        new = rng.choice(names + ["extra_key", "layer", "tied_to", "compensation"])
        parent[new] = parent[key] if rng.random() < 0.5 else rng.choice(WEIRD)
        return f"add {new[:60]} at {'.'.join(map(str, path[:-1]))[:60]}"
    if op < 0.3 and isinstance(parent, dict) and len(parent) > 1:  # rename a key: move an entry
        other = rng.choice([k for k in parent if k != key])
        parent[other], parent[key] = parent[key], parent[other]
        return f"swap {key[:40]}<->{other[:40]}"
    parent[key] = _value_like(rng, parent[key], names)
    return f"set {'.'.join(map(str, path))[:80]}={str(parent[key])[:30]}"


def _layer_files(root: Path, name: str) -> list[Path]:
    return sorted((root / "layers").glob(f"*/{name}"))


def _mutate_header(rng: random.Random, f: Path) -> str:
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    if not names:
        header["x.weight"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
        what = "add tensor to empty file"
    else:
        a = rng.choice(names)
        op = rng.randrange(7)
        if op == 0:
            header[a]["dtype"] = rng.choice(["F32", "F16", "BF16", "U8", "I64", "BOOL", "I8", "F64"])
            what = f"dtype {a}"
        elif op == 1:
            header[a]["shape"] = rng.choice([[], [1], [header[a]["shape"][0] * 2 if header[a]["shape"] else 2],
                                             header[a]["shape"] + [1], [0]])
            what = f"shape {a}"
        elif op == 2 and len(names) > 1:  # swap two tensors' names (and data)
            b = rng.choice([k for k in names if k != a])
            header[a], header[b] = header[b], header[a]
            what = f"swap {a}<->{b}"
        elif op == 3:
            header[a + "_x" if rng.random() < 0.5 else a.replace("layers.1", "layers.2")] = header.pop(a)
            what = f"rename {a}"
        elif op == 4:
            del header[a]
            what = f"delete {a}"
        elif op == 5:
            lo, hi = header[a]["data_offsets"]
            header[a]["data_offsets"] = rng.choice([[lo, hi + 1], [lo + 1, hi], [hi, lo], [0, hi - lo]])
            what = f"offsets {a}"
        else:
            header[a.rsplit(".", 1)[0] + ".extra"] = dict(header[a])
            what = f"duplicate {a}"
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    f.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    return f"header {f.parent.name}/{f.name}: {what}"


def _mutate_files(rng: random.Random, root: Path, donor: Path | None) -> str:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    op = rng.randrange(7)
    target = rng.choice(files)
    rel = target.relative_to(root)
    if op == 0:
        target.unlink()
        return f"delete {rel}"
    if op == 1:  # a symlink to a copy outside the package
        outside = root.parent / f"outside-{rng.randrange(10**9)}"
        shutil.copy(target, outside)
        target.unlink()
        target.symlink_to(outside)
        return f"symlink {rel} -> outside"
    if op == 2:  # a layer folder replaced by a symlink to another package's folder
        layers = sorted((root / "layers").iterdir())
        d = rng.choice(layers)
        shutil.rmtree(d)
        d.symlink_to((donor or root) / "layers" / d.name)
        return f"symlink folder layers/{d.name}"
    if op == 3:  # another package's rotation tensors dropped into a layer folder
        src = _layer_files(donor, "rotation.safetensors") if donor else []
        src = [p for p in src if p.stat().st_size > 200]
        if src:
            pick = rng.choice(src)
            shutil.copy(pick, root / "layers" / pick.parent.name / "rotation.safetensors")
            return f"foreign rotation into layers/{pick.parent.name}"
        shutil.copy(target, target.parent / "weights.safetensors.bak")
        return f"copy {rel}.bak"
    if op == 4:  # an unlisted folder with weights
        extra = root / "layers" / rng.choice(["layer_099", "outer2", "evil"])
        extra.mkdir(exist_ok=True)
        shutil.copy(rng.choice(_layer_files(root, "weights.safetensors")), extra / "weights.safetensors")
        return f"add folder {extra.name}"
    if op == 5:
        target.write_bytes(target.read_bytes()[: rng.randrange(max(1, target.stat().st_size))])
        return f"truncate {rel}"
    target.unlink()
    os.mkfifo(target)
    return f"fifo {rel}"


def mutate(root: Path, rng: random.Random, category: str, donor: Path | None = None) -> str:
    """Apply one ``category`` mutation to the package copy at ``root``; returns what was done."""
    from uqcit.package.format import METADATA_FILE

    if category == "metadata":
        doc = json.loads((root / METADATA_FILE).read_text())
        names = list(doc.get("modules", {})) + list(doc.get("float_tensors", {}))
        what = _mutate_json(rng, doc, names)
        (root / METADATA_FILE).write_text(json.dumps(doc))
        return "metadata " + what
    if category == "config":
        doc = json.loads((root / "config.json").read_text())
        if rng.random() < 0.4:
            key, value = rng.choice(CONFIG_SPECIAL)
            doc[key] = value
            what = f"set {key}={value}"
        else:
            what = _mutate_json(rng, doc, list(doc))
        (root / "config.json").write_text(json.dumps(doc))
        return "config " + what
    if category == "header":
        files = _layer_files(root, "weights.safetensors") + _layer_files(root, "rotation.safetensors")
        return _mutate_header(rng, rng.choice(files))
    if category == "files":
        return _mutate_files(rng, root, donor)
    if category == "flip":
        f = rng.choice(_layer_files(root, "weights.safetensors"))
        data = bytearray(f.read_bytes())
        n = int.from_bytes(data[:8], "little")
        if len(data) <= 8 + n:
            return "flip: no data"
        pos = rng.randrange(8 + n, len(data))
        data[pos] ^= 1 << rng.randrange(8)
        f.write_bytes(bytes(data))
        return f"flip {f.parent.name} byte {pos}"
    raise ValueError(f"unknown mutation category {category!r}")


# ---------------------------------------------------------------------------------------------
# running one case


class CaseTimeout(BaseException):
    """Raised by the per-case alarm (a BaseException so that no ``except Exception`` eats it)."""


def _alarm(signum, frame):
    raise CaseTimeout()


def logits_of(pkg, decode: bool = False) -> torch.Tensor:
    """Logits of one forward pass on ``IDS``; ``decode`` also generates two tokens and decodes them."""
    with torch.no_grad():
        out = pkg.model(input_ids=IDS)
        if decode:
            pkg.tokenizer.decode(pkg.model.generate(IDS, max_new_tokens=2, do_sample=False)[0])
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def try_load(path: Path, reference: torch.Tensor, **kw) -> tuple[str, str]:
    """Load ``path``, run one forward and a two-token greedy decode: ``(outcome, detail)``, outcome
    one of refused, same, changed, raw, hang."""
    from uqcit.package import PackageError, load_package

    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        logits = logits_of(load_package(path, progress=False, **kw), decode=True)
    except PackageError as exc:
        return "refused", str(exc).splitlines()[0][:200]
    except CaseTimeout:
        return "hang", f"no answer in {CASE_SECONDS} s"
    except Exception as exc:  # noqa: BLE001 -- the fuzzer's point: count what escapes
        return "raw", f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        signal.alarm(0)
    return ("same" if torch.equal(logits, reference) else "changed"), ""


def run_case(packages: dict[str, Path], references: dict[str, torch.Tensor], scratch: Path, seed: int,
             public_key=None, verify_every: int = 4) -> dict[str, Any]:
    """One seeded case: which package, which mutation, and its outcomes. A structural mutation is
    also loaded the default (manifest-verified) way when its unverified load changed the outputs,
    and every ``verify_every``-th case."""
    rng = random.Random(seed)
    kind = rng.choice(sorted(references))
    roll = rng.random()
    category = "flip" if roll < 0.15 else "signed" if roll < 0.25 else rng.choice(STRUCTURAL)
    if category == "signed" and f"{kind}-signed" not in packages:
        category = rng.choice(STRUCTURAL)
    signed = category == "signed"
    src = packages[f"{kind}-signed" if signed else kind]
    case = scratch / f"case-{seed}"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(src, case / "pkg", symlinks=True)
    donor = packages.get("rotated") if kind != "rotated" else packages.get("rtn-w4")
    what = mutate(case / "pkg", rng, rng.choice(STRUCTURAL) if signed else category, donor)
    rec: dict[str, Any] = {"seed": seed, "kind": kind, "category": category, "mutation": what}
    try:
        if category == "flip":
            rec["default"] = try_load(case / "pkg", references[kind])
        elif signed:
            rec["signed"] = try_load(case / "pkg", references[kind], public_key=public_key)
        else:
            rec["unverified"] = try_load(case / "pkg", references[kind], verify=False)
            if rec["unverified"][0] == "changed" or seed % verify_every == 0:
                rec["default"] = try_load(case / "pkg", references[kind])
    finally:
        shutil.rmtree(case, ignore_errors=True)
    return rec


def references_of(packages: dict[str, Path]) -> dict[str, torch.Tensor]:
    from uqcit.package import load_package

    return {k: logits_of(load_package(p, progress=False)) for k, p in packages.items() if k in KINDS}


# ---------------------------------------------------------------------------------------------
# the benchmark: workers in subprocesses, so a crash or a hang costs one case, not the run


def _worker(workdir: Path, seeds: list[int], out: Path) -> None:
    from uqcit.package.secure import load_public_key

    packages = {p.name: p for p in workdir.iterdir() if p.is_dir() and p.name in KINDS + tuple(
        f"{k}-signed" for k in KINDS)}
    refs = references_of(packages)
    pub = load_public_key(workdir / "public.pem")
    scratch = Path(tempfile.mkdtemp(prefix="fuzz-", dir=workdir))
    with open(out, "a") as f:
        for seed in seeds:
            f.write(json.dumps(run_case(packages, refs, scratch, seed, pub)) + "\n")
            f.flush()


def summarize(records: list[dict[str, Any]], seconds: float, *, planned: int) -> dict[str, Any]:
    def count(field, outcome):
        return sum(1 for r in records if field in r and r[field][0] == outcome)

    raw = sum(1 for r in records for f in ("unverified", "default", "signed") if f in r and r[f][0] == "raw")
    hangs = sum(1 for r in records for f in ("unverified", "default", "signed")
                if f in r and r[f][0] in ("hang", "death"))
    flips = [r for r in records if r["category"] == "flip"]
    signed = [r for r in records if r["category"] == "signed"]
    return {
        "benchmark": "fuzz_packages", "cases": len(records), "planned_cases": planned,
        "kinds": list(KINDS), "raw_exceptions": raw, "hangs": hangs,
        "silent_changes": sum(1 for r in records if r["category"] not in ("flip", "signed")
                              and "default" in r and r["default"][0] == "changed"),
        "unverified_refused": count("unverified", "refused"), "unverified_same": count("unverified", "same"),
        "unverified_changed": count("unverified", "changed"),
        "flips": len(flips), "flips_detected": sum(1 for r in flips if r["default"][0] == "refused"),
        "signed_cases": len(signed), "signed_refused": sum(1 for r in signed if r["signed"][0] == "refused"),
        "seconds": round(seconds, 1), "torch": torch.__version__,
        "machine": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "date": _dt.date.today().isoformat(),
        "examples": {o: [r["mutation"] + " -> " + r[f][1] for r in records for f in ("unverified", "default", "signed")
                         if f in r and r[f][0] == o][:10] for o in ("raw", "hang", "death", "changed")},
    }


def run(cases: int, minutes: float, seed: int, workers: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="uqcit-fuzz-") as d:
        workdir = Path(d)
        build_packages(workdir)
        records: list[dict[str, Any]] = []
        todo = list(range(seed, seed + cases))
        deadline = t0 + 60 * minutes
        chunk = 100
        while todo and time.perf_counter() < deadline:
            batches = [todo[i * chunk:(i + 1) * chunk] for i in range(workers)]
            batches = [b for b in batches if b]
            todo = todo[sum(len(b) for b in batches):]
            procs = []
            for i, batch in enumerate(batches):
                out = workdir / f"out-{batch[0]}.jsonl"
                procs.append((batch, out, subprocess.Popen(
                    [sys.executable, __file__, "--worker", str(workdir), str(out), ",".join(map(str, batch))])))
            for batch, out, proc in procs:
                proc.wait()
                done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
                records.extend(done)
                if proc.returncode != 0 and len(done) < len(batch):  # it died on the next case
                    dead = batch[len(done)]
                    records.append({"seed": dead, "kind": "?", "category": "death", "mutation": f"seed {dead}",
                                    "unverified": ["death", f"worker exit {proc.returncode}"]})
                    todo = batch[len(done) + 1:] + todo
        return summarize(records, time.perf_counter() - t0, planned=cases)


def markdown(r: dict[str, Any]) -> str:
    rows = ["| cases | raw exceptions | hangs/deaths | silent changes | unverified: refused / same / changed | "
            "flips detected | signed refused | seconds |", "|---:|---:|---:|---:|---|---:|---:|---:|",
            f"| {r['cases']} | {r['raw_exceptions']} | {r['hangs']} | {r['silent_changes']} | "
            f"{r['unverified_refused']} / {r['unverified_same']} / {r['unverified_changed']} | "
            f"{r['flips_detected']} / {r['flips']} | {r['signed_refused']} / {r['signed_cases']} | {r['seconds']} |"]
    titles = {"raw": "raw exceptions", "hang": "hangs", "death": "worker deaths",
              "changed": "loaded with verify=False and computed differently (the default manifest check "
                         "refused each; a silent change is one it let through)"}
    rows += ["", f"{r['cases']} of {r['planned_cases']} planned cases ran in the time given; kinds: "
             f"{', '.join(r['kinds'])}."]
    for outcome, examples in r["examples"].items():
        if examples:
            rows += ["", f"Examples, {titles[outcome]}:"] + [f"- `{e.rstrip(' ->')}`" for e in examples]
    return "\n".join(rows)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(Path(sys.argv[2]), [int(s) for s in sys.argv[4].split(",")], Path(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--minutes", type=float, default=600.0, help="stop starting new cases after this long")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    result = run(args.cases, args.minutes, args.seed, args.workers)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fuzz_packages.json").write_text(json.dumps([result], indent=2) + "\n")
    (RESULTS / "fuzz_packages.md").write_text(markdown(result) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
