"""Generation samples side by side (002 §4): six fixed prompts (two facts, two prose, two code),
48 greedy tokens from the float SmolLM2-135M and from compressed models built here, with the
fraction of generated tokens equal to the reference's and the first position where they part.

Compressed models: round-to-nearest w4-g128 and w3-g128 of the 210 block linears (the tied
embedding/LM head stays float: the peer accounting, ``bpw_blocks``), the seed's binary-
concentration preset (every module, as ``baselines.py`` builds it), and prime selection
(``prime-tau0.8``: the block linears; ``prime-tau0.8-L12345-outer``: every matrix, the claim
000-meaningful-outputs is made of). Each is the stage's in-memory result, not a package read
back: ``baselines.py``/``pruning.py`` score the packages; greedy text needs only the model.

The texts are evidence to read; agreement on 6 x 48 tokens is no quality measure (the
perplexity/KL/top-1 records are). The claims report shows them under 000-meaningful-outputs.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/generation_samples.py [--new-tokens N] [--only a,b]

Writes benchmarks/results/generation_samples.json (one record per model, merged by method) and .md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine  # noqa: E402

from uqcit.core.io import atomic_write, write_json  # noqa: E402
from uqcit.inputs.models import load_model  # noqa: E402
from uqcit.recipe import builtin_recipe  # noqa: E402
from uqcit.stages.levels import analyze_levels  # noqa: E402
from uqcit.stages.plan import BitPlan, PlanConfig, build_plan  # noqa: E402
from uqcit.stages.prune import prune_model  # noqa: E402
from uqcit.stages.quantize import quantize_model  # noqa: E402
from uqcit.tensor.formats import parse_format  # noqa: E402
from uqcit.validation.samples import Prompt, generation_samples  # noqa: E402

MODEL = "smollm2-135m"
NAME = "generation_samples"
PROMPTS = (
    Prompt("fact", "What is the capital of France?"),
    Prompt("fact", "Which planet is the largest in the solar system?"),
    Prompt("prose", "Write two sentences about a walk in the rain."),
    Prompt("prose", "The old lighthouse keeper climbed the stairs every evening, and", chat=False),
    Prompt("code", "Write a Python function that returns the sum of a list of numbers."),
    Prompt("code", 'def is_prime(n):\n    """Return True if n is a prime number."""\n', chat=False),
)
CANDIDATES = ("rtn-w4-g128", "rtn-w3-g128", "preset-binary-concentration", "prime-tau0.8",
              "prime-tau0.8-L12345-outer")


def build(name: str, ref, levels, tok) -> tuple[torch.nn.Module, dict]:
    """The compressed model ``name`` and what its record states about it."""
    if name.startswith("rtn-"):  # the block linears only (peer accounting)
        blocks = {m.name for m in levels.quantizable() if m.kind != "embedding"}
        fmt = parse_format(name.removeprefix("rtn-"))
        q = quantize_model(ref, levels, BitPlan(exact={n: fmt for n in blocks}, name=name), progress=False)
        mods = [m for m in q.stored if m.name in blocks]
        bpw_blocks = sum(m.stored_bits for m in mods) / sum(m.numel for m in mods)
        return q.model, {"bpw": q.bpw, "bpw_blocks": bpw_blocks, "accounting": "peer"}
    if name == "preset-binary-concentration":
        q = quantize_model(ref, levels, build_plan(levels, PlanConfig(preset="binary-concentration")), progress=False)
        return q.model, {"bpw": q.bpw, "accounting": "whole-model"}
    prune = builtin_recipe("prime-tau0.8").stage("prune")
    if name.endswith("-L12345-outer"):  # every weight matrix, as pruning.py --scope all
        prune = prune.replace(levels=(1, 2, 3, 4, 5), outside_blocks=True)
    res = prune_model(ref, levels, prune, tokenizer=tok, progress=False)
    if res.method_name != name:
        raise RuntimeError(f"built {res.method_name}, expected {name}")
    return res.model, {"bpw": res.bpw, "kept_fraction": res.kept_fraction}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--only", default=None, help="comma-separated candidates to (re)run (the reference always runs)")
    ap.add_argument("--name", default=NAME)
    args = ap.parse_args()

    loaded = load_model(MODEL, progress=False)
    ref, tok = loaded.model, loaded.tokenizer
    levels = analyze_levels(ref)
    todo = [c for c in CANDIDATES if args.only is None or c in args.only.split(",")]
    models, meta = {"reference-fp32": ref}, {"reference-fp32": {"bpw": 32.0}}
    for name in todo:
        t0 = time.perf_counter()
        models[name], meta[name] = build(name, ref, levels, tok)
        meta[name]["seconds_build"] = time.perf_counter() - t0
        print(f"built {name} in {meta[name]['seconds_build']:.0f} s", flush=True)
    res = generation_samples(models, tok, PROMPTS, new_tokens=args.new_tokens, reference="reference-fp32")

    new = []
    for name in models:
        samples = res.samples(name)
        build_s = meta[name].pop("seconds_build", None)
        new.append({"model": MODEL, "method": name, **meta[name], "package_bytes": None,
                    "study": "generation-samples", "reference": res.reference, "new_tokens": res.new_tokens,
                    "decoding": "greedy", "samples": samples, "agreement_mean": res.mean_agreement(name),
                    "identical": sum(s["first_divergence"] is None for s in samples),
                    "seconds": {"generate": res.seconds[name], **({"build": build_s} if build_s else {})},
                    "torch": torch.__version__, "machine": machine(), "date": _dt.date.today().isoformat()})
    path = RESULTS / f"{args.name}.json"
    old = json.loads(path.read_text()) if path.exists() else []
    fresh = {r["method"] for r in new}
    records = [r for r in old if r["method"] not in fresh] + new
    records.sort(key=lambda r: (r["method"] != "reference-fp32", CANDIDATES.index(r["method"])
                                if r["method"] in CANDIDATES else len(CANDIDATES)))
    write_json(path, records)
    md = markdown(records)
    atomic_write(RESULTS / f"{args.name}.md", md.encode())
    print(md)


def markdown(records: list[dict]) -> str:
    """One table per prompt: each model's text, its agreement and first divergence."""
    f = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| method | bits/weight | bits/weight (blocks) | mean agreement | prompts identical |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {f(r['bpw'])} | {f(r.get('bpw_blocks'))} | {r['agreement_mean']:.3f} | "
              f"{r['identical']}/{len(r['samples'])} |" for r in records]
    lines += ["", f"Greedy, {records[0]['new_tokens']} new tokens; agreement: generated tokens equal to "
              f"{records[0]['reference']}'s, position by position.", ""]
    for i, s in enumerate(records[0]["samples"]):
        lines += [f"### {i + 1}. {s['kind']}: {json.dumps(s['prompt'])}" + ("" if s["chat"] else " (continued)"), "",
                  "| method | agreement | first divergence | text |", "|---|---:|---:|---|"]
        for r in records:
            x = r["samples"][i]
            text = json.dumps(x["text"], ensure_ascii=False)[1:-1].replace("|", "\\|")
            lines.append(f"| {r['method']} | {x['agreement']:.2f} | "
                         f"{'—' if x['first_divergence'] is None else x['first_divergence']} | {text} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
