"""Prime resonance selection (seed 000 §2) on SmolLM2-135M, next to magnitude and Wanda pruning at
the same kept weights per layer, on the full evaluation protocol.

Candidates: ``prime-tau0.8`` (the seed's rule, 0-based indices, τ quantile of the prime-indexed
entries), ``magnitude-as-prime-tau0.8`` and ``wanda-as-prime-tau0.8`` (each layer keeps exactly
as many weights as prime selection kept there), and with ``--context`` the two baselines at the
usual 50% (``magnitude-keep0.5``, ``wanda-keep0.5``). Every Linear in the blocks is pruned; the tied
embedding/LM head stays dense (the ``prime-tau0.8`` recipe's choice).

Each candidate is exported as a package (bytes measured on disk), loaded back, scored on the
same windows against the float reference (its log-probs computed once per window for all),
and answers three fixed prompts (chat template, greedy, 40 new tokens).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/pruning.py [--windows N]

``--scope all`` prunes every weight matrix instead, the tied embedding/LM head included (the
seed's own setting, where its size claim is made): prime selection and both matched baselines;
``--append`` adds those records to the existing results file.

Writes benchmarks/results/pruning.json (+ .md) and pruning-layers.json (per-layer accounting of
prime selection: kept vs N and vs N/ln N).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, record, write  # noqa: E402

from uqcit.stages.evaluate import EvalConfig, evaluate_many  # noqa: E402
from uqcit.stages.levels import analyze_levels  # noqa: E402
from uqcit.inputs.models import load_model  # noqa: E402
from uqcit.package import export_package, load_package, package_bytes  # noqa: E402
from uqcit.stages.prune import PruneConfig, prune_model  # noqa: E402
from uqcit.recipe import builtin_recipe  # noqa: E402

MODEL = "smollm2-135m"
PROMPTS = ("What is the capital of France?",
           "Explain in one sentence why the sky is blue.",
           "Write a short list of three fruits.")
NEW_TOKENS = 40


def configs(prime: PruneConfig, scope: str, context: bool) -> list[PruneConfig]:
    if scope == "all":  # every weight matrix, the tied embedding/head included: the seed's own setting
        prime = prime.replace(levels=(1, 2, 3, 4, 5), outside_blocks=True)
    out = [prime, prime.replace(method="magnitude", match_prime=True), prime.replace(method="wanda", match_prime=True)]
    if context:  # the baselines at a usual budget: shows they work where the budget is not extreme
        out += [prime.replace(method="magnitude", kept_fraction=0.5), prime.replace(method="wanda", kept_fraction=0.5)]
    return out


def answers(model, tokenizer) -> dict[str, str]:
    """Greedy answers to the fixed prompts (deterministic: no sampling)."""
    out = {}
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        out[prompt] = tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--windows", type=int, default=None, help="fewer windows (not the full protocol)")
    ap.add_argument("--name", default="pruning")
    ap.add_argument("--scope", choices=("blocks", "all"), default="blocks",
                    help="blocks: the Linears of the blocks (the recipe's default); all: every weight matrix")
    ap.add_argument("--context", action="store_true",
                    help="also magnitude-keep0.5 and wanda-keep0.5 (two more model passes)")
    ap.add_argument("--append", action="store_true",
                    help="add this run's candidates to the existing results file (its reference record kept)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    loaded = load_model(MODEL)
    load_s = time.perf_counter() - t0
    ref, tok = loaded.model, loaded.tokenizer
    levels = analyze_levels(ref)
    prime = builtin_recipe("prime-tau0.8").stage("prune")

    candidates, meta = {}, {}
    layers = None
    stats = None  # Wanda's input norms: collected once, shared by both Wanda candidates
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in configs(prime, args.scope, args.context):
            t0 = time.perf_counter()
            if cfg.method == "wanda" and stats is None:
                from uqcit.inputs.calibration import collect_input_stats
                from uqcit.inputs.corpus import calibration_batch
                from uqcit.stages.importance import activation_source
                from uqcit.stages.prune import prune_targets

                t1 = time.perf_counter()
                batch = calibration_batch(tok, n_samples=cfg.calib_samples, seq_len=cfg.calib_seq_len, seed=cfg.seed)
                sources = sorted({activation_source(levels, e.name) for e in prune_targets(levels, cfg)})
                stats = collect_input_stats(ref, batch, sources, hessian=False)
                calib_s = time.perf_counter() - t1
            res = prune_model(ref, levels, cfg, tokenizer=tok, stats=stats if cfg.method == "wanda" else None)
            prune_s = time.perf_counter() - t0
            name = res.method_name
            if cfg.method == "prime":
                layers = {"config": cfg.to_dict(), "layers": [m.to_dict() for m in res.stored]}
                prime_name = name
            t0 = time.perf_counter()
            path = export_package(res, tok, Path(tmp) / name, source_model=MODEL, levels=levels)
            export_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            pkg = load_package(path)
            load_pkg_s = time.perf_counter() - t0
            candidates[name] = pkg.model
            meta[name] = dict(bpw=res.bpw, package_bytes=package_bytes(path), config=cfg.to_dict(),
                              kept=res.kept, pruned_weights=res.weight_count, kept_fraction=res.kept_fraction,
                              accounting=res.accounting(),
                              seconds={"prune": prune_s, **({"calibration (shared by the wanda candidates)": calib_s}
                                                            if cfg.method == "wanda" else {}),
                                       **{f"prune.{k}": v for k, v in res.stage_seconds.items()},
                                       "export": export_s, "load_package": load_pkg_s})
            del res

        t0 = time.perf_counter()
        gens = {"reference-fp32": answers(ref, tok)}
        for name, model in candidates.items():
            gens[name] = answers(model, tok)
        gen_s = time.perf_counter() - t0

        cfg = EvalConfig(max_windows=args.windows)
        t0 = time.perf_counter()
        res = evaluate_many(candidates, tok, cfg, reference=ref)
        eval_s = time.perf_counter() - t0

    ref_bytes = sum(p.numel() * p.element_size() for p in ref.parameters())
    records = [record(model=MODEL, method="reference-fp32", bpw=32.0, package_bytes=ref_bytes, ev=res["reference"],
                      seconds={"load": load_s, "evaluate": res["reference"].seconds, "evaluate_all": eval_s,
                               "generate_all": gen_s},
                      note="package_bytes here: float32 parameter bytes (tied embedding counted once)",
                      generations=gens["reference-fp32"])]
    for name, m in meta.items():
        ev = res[name]
        records.append(record(model=MODEL, method=name, bpw=m["bpw"], package_bytes=m["package_bytes"], ev=ev,
                              seconds=m["seconds"] | {"evaluate": ev.seconds},
                              kept=m["kept"], pruned_weights=m["pruned_weights"], kept_fraction=m["kept_fraction"],
                              accounting=m["accounting"], config=m["config"], generations=gens[name],
                              package_vs_fp32=m["package_bytes"] / ref_bytes,
                              note="bpw: stored bits of the pruned layers (kept values + bitmap/indices) per weight "
                                   "they had; what is not pruned (norms" +
                                   ("" if m["config"]["outside_blocks"] else ", the tied embedding/LM head") +
                                   ") is in package_bytes as dense float32"))
    layers_path = RESULTS / f"{args.name}-layers.json"
    per_method = {prime_name: layers}
    if args.append:
        old = json.loads((RESULTS / f"{args.name}.json").read_text())
        new = {r["method"] for r in records}
        records = [r for r in old if r["method"] not in new or r["method"] == "reference-fp32"] + records[1:]
        per_method = json.loads(layers_path.read_text())["methods"] | per_method
    jp, mp = write(args.name, records)
    lines = [mp.read_text().rstrip(), "", "| method | kept weights | kept % of pruned layers | kept / (N/ln N) |",
             "|---|---:|---:|---:|"]
    for r in records[1:]:
        p = r["accounting"]["pruned_layers"]
        lines.append(f"| {r['method']} | {p['kept']:,} | {100 * p['kept_fraction']:.3f} | {p['kept_over_claim']:.3f} |")
    lines += ["", "Greedy answers (chat template, 40 new tokens):", ""]
    for r in records:
        lines.append(f"**{r['method']}**")
        lines += [f"- *{q}* → {json.dumps(a)}" for q, a in r["generations"].items()]
        lines.append("")
    mp.write_text("\n".join(lines) + "\n")
    layers_path.write_text(json.dumps({"model": MODEL, "methods": per_method}, indent=1) + "\n")
    print(mp.read_text())
    print(f"wrote {jp}")


if __name__ == "__main__":
    main()
