"""Allocation over format families on SmolLM2-135M: a predicted sensitivity table and the plans it gives.

The measured table (``results/sensitivity-smollm2-135m.safetensors``: every module at w2/w3/w4/w8 in
groups of 128, 4 x 128 calibration tokens, about an hour on 2 cores) is widened to the format
families the quality benchmark uses (small groups with 6-bit scale codes, IQ4_NL and fitted tables,
symmetric 4-8 bits) by ``uqcit.stages.sensitivity_fit``: each new cell is placed on its module's
measured KL curve by its input-weighted weight error, which costs no forward pass.

1. How good is the prediction? Each measured g128 column is predicted from the other three
   (leave one out): rank correlation over modules and the typical ratio error.
2. The allocator (``uqcit.stages.allocate``) on the widened table at 2.5, 3.3 and 4.25 bits/weight
   over the 210 block linears, the tied embedding/LM head kept at fp16 (the peers' accounting):
   the plan's format mix, its exact bits and its predicted KL. The plans are written to
   ``results/family-plan-<budget>.json`` for ``quality_per_bit.py`` (candidates ``alloc-...``), which
   rounds them by learned rounding and scores them at the full protocol.
3. The same at 3.25 bits/weight over every weight (whole-model accounting), the tied embedding/LM head
   choosing its format too: ``results/family-plan-whole-3.25.json``.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/family_allocation.py

Writes benchmarks/results/family_allocation.json and .md (about 3 minutes).
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine  # noqa: E402

from uqcit.core.io import atomic_write, write_json  # noqa: E402
from uqcit.inputs.models import load_model  # noqa: E402
from uqcit.stages.allocate import FLOAT, AllocateConfig, allocate  # noqa: E402
from uqcit.stages.levels import analyze_levels  # noqa: E402
from uqcit.stages.sensitivity import SensitivityResult  # noqa: E402
from uqcit.stages.sensitivity_fisher import fisher_sensitivity  # noqa: E402
from uqcit.stages.sensitivity_fit import FLOOR_FACTOR, spearman, leave_one_out, widen_sensitivity  # noqa: E402
from uqcit.recipe import builtin_recipe  # noqa: E402

import numpy as np  # noqa: E402

MODEL = "smollm2-135m"
TABLE = RESULTS / "sensitivity-smollm2-135m.safetensors"
# Families the block linears may take: every format here tiles SmolLM2's weights (learned rounding
# needs whole groups), and each is one the quality benchmark measured uniformly at some budget.
FAMILIES = ["w2-g24-iz-s6", "w2-g32-iz-s6", "w2-g48-iz", "w3-g36-iz-s6", "w3-g48-iz-s6", "w3-g64-iz",
            "w3-g54-lut", "w4-g32-sym-s6", "w4-g64-nl", "w4-g128-nl", "w4-g64-sym", "w5-g32-sym-s6",
            "w6-g64-sym-s6", "w8-g64-sym"]
BUDGETS = (2.5, 3.3, 4.25)  # bits/weight over the block linears
# Whole-model accounting: the tied embedding/LM head is a module like the others (rounded by error feedback
# against the head's inputs, which takes any format), with these formats offered besides the families.
WHOLE_BUDGETS = (3.25,)
EMBEDDING_FAMILIES = ["w3-g64-iz-s6", "w4-g96-iz", "w4-g128-iz"]


def plan_path(budget: float, whole: bool = False) -> Path:
    """Where the plan for ``budget`` (bits/weight over the block linears, or over every weight) is written."""
    return RESULTS / f"family-plan-{'whole-' if whole else ''}{budget:g}.json"


def main() -> None:
    t0 = time.perf_counter()
    loaded = load_model(MODEL)
    model, tok = loaded.model, loaded.tokenizer
    levels = analyze_levels(model)
    measured = SensitivityResult.load(TABLE)
    calib = measured.meta["settings"]["calibration"]
    wide, errors = widen_sensitivity(model, tok, levels, measured, list(dict.fromkeys(FAMILIES + EMBEDDING_FAMILIES)))
    loo = [leave_one_out(measured, errors, f) for f in measured.formats if f != "fp16"]
    wide.save(RESULTS / "sensitivity-families-smollm2-135m.safetensors")

    blocks = [e for e in levels.quantizable() if e.kind != "embedding"]
    emb = [e for e in levels.quantizable() if e.kind == "embedding"]
    n_blocks, n_emb = sum(e.numel for e in blocks), sum(e.numel for e in emb)
    plans = []
    for budget in BUDGETS:
        # the embedding pinned at fp16 counts 16 bits/weight in the allocator's average: the target over
        # every quantizable weight that leaves exactly ``budget`` for the blocks
        target = (budget * n_blocks + 16 * n_emb) / (n_blocks + n_emb)
        res = allocate(levels, wide, AllocateConfig(target_bpw=target, formats=tuple(FAMILIES),
                                                     pins={e.name: FLOAT for e in emb}))
        rows = [r for r in res.rows if not r.pinned]
        bpw_blocks = sum(r.bits for r in rows) / n_blocks
        mix = dict(Counter(r.format for r in rows).most_common())
        plan = {r.module: r.format for r in rows}
        write_json(plan_path(budget), {"budget": budget, "bpw_blocks": bpw_blocks, "plan": plan})
        plans.append({"budget": budget, "bpw_blocks": bpw_blocks, "predicted_kl": res.predicted_kl,
                      "mix": mix, "by_level": _by_level(rows), "file": plan_path(budget).name})
        print(f"budget {budget}: {bpw_blocks:.4f} bits/weight over the blocks, predicted KL "
              f"{res.predicted_kl:.4f}, {mix}", flush=True)

    emb_names = {e.name for e in emb}
    for budget in WHOLE_BUDGETS:  # every weight counted; the tied matrix chooses too (error feedback rounds it)
        res = allocate(levels, wide, AllocateConfig(target_bpw=budget, formats=tuple(dict.fromkeys(
            FAMILIES + EMBEDDING_FAMILIES))))
        rows = res.rows
        mix = dict(Counter(r.format for r in rows).most_common())
        plan = {r.module: r.format for r in rows}
        write_json(plan_path(budget, whole=True), {"budget": budget, "bpw": res.achieved_bpw, "plan": plan})
        plans.append({"budget": budget, "accounting": "whole-model", "bpw": res.achieved_bpw,
                      "bpw_blocks": sum(r.bits for r in rows if r.module not in emb_names) / n_blocks,
                      "predicted_kl": res.predicted_kl, "embedding": [plan[n] for n in sorted(emb_names)],
                      "mix": mix, "by_level": _by_level(rows),
                      "file": plan_path(budget, whole=True).name})
        print(f"whole-model {budget}: {res.achieved_bpw:.4f} bits/weight, embedding "
              f"{[plan[n] for n in sorted(emb_names)]}, predicted KL {res.predicted_kl:.4f}", flush=True)

    out = {"model": MODEL, "table": TABLE.name, "calibration": calib, "families": FAMILIES,
           "leave_one_out": loo, "plans": plans, "fisher": _fisher_check(model, tok, levels, measured, wide),
           "seconds": time.perf_counter() - t0, "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    write_json(RESULTS / "family_allocation.json", out)
    atomic_write(RESULTS / "family_allocation.md", (_markdown(out) + "\n").encode())
    print(_markdown(out))


def _fisher_check(model, tok, levels, measured: SensitivityResult, wide: SensitivityResult) -> dict:
    """The table the ``alloc-signround-*`` recipes use (diagonal Fisher, 16 x 128 tokens) against the measured one.

    Each measured g128 column against the Fisher prediction of the same cells; then, per budget, the plan
    each table gives, both plans priced under both tables (the widened measured table is the referee
    that the measured plan was optimal for).
    """
    cfg = builtin_recipe("alloc-signround-3.3-blocks").stage("sensitivity")
    anchors = [f for f in measured.formats if f != "fp16"]
    t0 = time.perf_counter()
    fisher = fisher_sensitivity(model, tok, levels, list(dict.fromkeys(FAMILIES + EMBEDDING_FAMILIES + anchors)),
                                calib_samples=cfg.calib_samples, calib_seq_len=cfg.calib_seq_len, seed=cfg.seed)
    seconds = time.perf_counter() - t0
    floor = abs(measured.floor_kl or 0.0) * FLOOR_FACTOR
    columns = []
    for f in anchors:
        pred = np.array([fisher.kl(m, f) for m in measured.modules])
        true = measured.table[:, measured.formats.index(f)].numpy()
        ok = (true > floor) & (pred > 0)
        ratio = np.log(pred[ok] / true[ok])
        columns.append({"format": f, "modules": int(ok.sum()), "spearman": spearman(pred[ok], true[ok]),
                        "median_ratio": float(np.exp(np.median(np.abs(ratio)))),
                        "p90_ratio": float(np.exp(np.quantile(np.abs(ratio), 0.9))),
                        "bias": float(np.exp(np.median(ratio)))})
    emb = [e for e in levels.quantizable() if e.kind == "embedding"]
    plans = []
    for budget in BUDGETS:
        cfg_b = AllocateConfig(target_bpw=budget, formats=tuple(FAMILIES), pins={e.name: FLOAT for e in emb},
                               budget_over="free")
        by_fisher, by_measured = allocate(levels, fisher, cfg_b), allocate(levels, wide, cfg_b)

        def price(table, res):
            return sum(table.kl(r.module, r.format) for r in res.rows if not r.pinned)

        plans.append({"budget": budget, "bpw_blocks": by_fisher.achieved_bpw,
                      "same_format": sum(by_fisher.choices[k] == by_measured.choices[k] for k in by_fisher.choices
                                         if k not in {e.name for e in emb}),
                      "fisher_plan": {"fisher": price(fisher, by_fisher), "measured": price(wide, by_fisher)},
                      "measured_plan": {"fisher": price(fisher, by_measured), "measured": price(wide, by_measured)}})
    return {"calibration": {"samples": cfg.calib_samples, "seq_len": cfg.calib_seq_len, "seed": cfg.seed},
            "seconds": seconds, "seconds_fisher": fisher.meta["seconds_fisher"], "formats": len(fisher.formats),
            "columns": columns, "plans": plans}


def _by_level(rows) -> dict[str, float]:
    """Mean stored bits/weight per level (the seed's levels) in the plan."""
    acc: dict[int, list[int]] = {}
    for r in rows:
        a = acc.setdefault(r.level, [0, 0])
        a[0] += r.bits
        a[1] += r.numel
    return {str(k): v[0] / v[1] for k, v in sorted(acc.items())}


def _markdown(out: dict) -> str:
    lines = ["Leave one out (a measured column predicted from the other three):", "",
             "| format | modules | Spearman | median ratio | 90th pct ratio |", "|---|---:|---:|---:|---:|"]
    for r in out["leave_one_out"]:
        lines.append(f"| {r['format']} | {r['modules']} | {r['spearman']:.3f} | {r['median_ratio']:.2f} | "
                     f"{r['p90_ratio']:.2f} |")
    lines += ["", "| budget | bits/weight (blocks) | predicted KL | formats chosen | bits/weight by level |",
              "|---:|---:|---:|---|---|"]
    for p in out["plans"]:
        mix = ", ".join(f"{k} x{v}" for k, v in p["mix"].items())
        lv = ", ".join(f"L{k} {v:.2f}" for k, v in p["by_level"].items())
        budget = f"{p['budget']} (whole model: {p['bpw']:.4f})" if p.get("accounting") == "whole-model" else p["budget"]
        lines.append(f"| {budget} | {p['bpw_blocks']:.4f} | {p['predicted_kl']:.4f} | {mix} | {lv} |")
    f = out.get("fisher")
    if f:
        lines += ["", f"The diagonal Fisher table of the `alloc-signround-*` recipes ({f['calibration']['samples']} x "
                  f"{f['calibration']['seq_len']} tokens, {f['formats']} formats x every module in "
                  f"{f['seconds']:.0f} s, {f['seconds_fisher']:.0f} s of it the backward passes) against the "
                  "measured table, cell by cell (bias: median predicted / measured):", "",
                  "| format | modules | Spearman | median ratio | 90th pct ratio | bias |", "|---|---:|---:|---:|---:|---:|"]
        for r in f["columns"]:
            lines.append(f"| {r['format']} | {r['modules']} | {r['spearman']:.3f} | {r['median_ratio']:.2f} | "
                         f"{r['p90_ratio']:.2f} | {r['bias']:.2f} |")
        lines += ["", "Plans from each table, priced under both (sum of per-module KLs; the measured table is the widened one):",
                  "", "| budget | same format (of 210) | Fisher plan: Fisher / measured | measured plan: Fisher / measured |",
                  "|---:|---:|---|---|"]
        for p in f["plans"]:
            lines.append(f"| {p['budget']} | {p['same_format']} | {p['fisher_plan']['fisher']:.4f} / "
                         f"{p['fisher_plan']['measured']:.4f} | {p['measured_plan']['fisher']:.4f} / "
                         f"{p['measured_plan']['measured']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
