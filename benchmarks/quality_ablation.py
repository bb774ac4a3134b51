"""What each part of the quality work adds, budget by budget: a ladder read from quality_per_bit's records.

No new measurement: every rung is a record of ``benchmarks/results/quality_per_bit.json`` (full
protocol, peer accounting: block linears quantized, the tied embedding/head at fp16), and the table
puts them in the order the parts were added, each with its change against the rung before. A rung
whose record is missing is listed as not measured, with the command that measures it.

    .venv/bin/python benchmarks/quality_ablation.py

Writes benchmarks/results/quality_ablation.json and .md.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, write  # noqa: E402

# budget -> rungs (what the rung adds, the candidate's record name[, the record it is compared with]);
# without a third entry a rung is compared with the best rung above it.
LADDER = {
    "3.3": [("round to nearest, w3-g64-iz (3-bit zero points)", "rtn-w3-g64-iz"),
            ("GPTQ error feedback (16 x 256 tokens)", "gptq-w3-g64-iz"),
            ("... block by block, on the quantized blocks' outputs (sequential)", "gptq-seq-w3-g64-iz"),
            ("... toward the float model's outputs (GPTAQ's asymmetric calibration), a block's targets at once (before)",
             "gptq-asym-w3-g64-iz-atonce", "gptq-seq-w3-g64-iz"),
            ("... toward the float model's outputs, fitted group by group inside each block", "gptq-asym-w3-g64-iz",
             "gptq-seq-w3-g64-iz"),
            ("sequential GPTQ on 128 x 256 tokens instead of 16 x 256", "gptq-seq-w3-g64-iz-n128", "gptq-seq-w3-g64-iz"),
            ("... toward the float model's outputs, on 128 x 256 tokens, a block's targets at once (before)",
             "gptq-asym-w3-g64-iz-n128-atonce", "gptq-seq-w3-g64-iz-n128"),
            ("... toward the float model's outputs, on 128 x 256 tokens, group by group", "gptq-asym-w3-g64-iz-n128",
             "gptq-seq-w3-g64-iz-n128"),
            ("learned rounding instead (SignRound, 40 steps, 32 x 256 tokens)", "signround-i40-w3-g64-iz"),
            ("+ Hadamard rotation of the residual stream (ablation: not kept)", "rot-hadamard-signround-i40-w3-g64-iz",
             "signround-i40-w3-g64-iz"),
            ("100 steps, 128 x 256 tokens", "signround-i100-w3-g64-iz-n128"),
            ("+ end-to-end scale distillation on self-written text (step 3e-3)",
             "signround-i100-w3-g64-iz-n128-e2e512-lr0.003"),
            ("... with step 6e-3", "signround-i100-w3-g64-iz-n128-e2e512-lr0.006"),
            ("a fitted table of 8 levels per tensor instead, groups of 54 (same bits)", "signround-i100-w3-g54-lut-n128",
             "signround-i100-w3-g64-iz-n128"),
            ("6-bit scale codes in groups of 36 (MLP) and 48 (attention) instead, no e2e (same bits)",
             "signround-i100-w3-g36-iz-s6-attn-w3-g48-iz-s6-n128", "signround-i100-w3-g64-iz-n128"),
            ("calibrated on half self-written text instead of news only (w3-g64-iz)", "signround-i100-w3-g64-iz-calmix-n128",
             "signround-i100-w3-g64-iz-n128"),
            ("a vector codebook (pairs of weights) inside GPTQ instead of the scalar grid (one shot)", "gptq-w3-g64-vq2",
             "gptq-w3-g64-iz"),
            ("... rounded by learned rounding instead of GPTQ (100 steps, 128 x 256 tokens)",
             "signround-i100-w3-g64-vq2-n128", "gptq-w3-g64-vq2"),
            ("allocation over 14 format families (measured 4 x 128 table, widened), learned rounding",
             "signround-i100-alloc-3.3-n128", "signround-i100-w3-g36-iz-s6-attn-w3-g48-iz-s6-n128"),
            ("... the table predicted from the diagonal Fisher instead (built-in recipe, time up to export)",
             "recipe-alloc-signround-3.3-blocks", "signround-i100-alloc-3.3-n128")],
    "4.25": [("round to nearest, w4-g64-sym", "rtn-w4-g64-sym"),
             ("GPTQ error feedback (16 x 256 tokens)", "gptq-w4-g64-sym"),
             ("... block by block on 128 x 256 tokens (sequential)", "gptq-seq-w4-g64-sym-n128", "gptq-w4-g64-sym"),
             ("... toward the float model's outputs, group by group (GPTAQ)", "gptq-asym-w4-g64-sym-n128",
              "gptq-seq-w4-g64-sym-n128"),
             ("learned rounding instead (SignRound, 40 steps, 32 x 256 tokens)", "signround-i40-w4-g64-sym"),
             ("groups of 32 with 6-bit scale codes (w4-g32-sym-s6, same bits)", "signround-i40-w4-g32-sym-s6"),
             ("100 steps, 128 x 256 tokens", "signround-i100-w4-g32-sym-s6-n128"),
             ("+ end-to-end scale distillation (step 3e-3)", "signround-i100-w4-g32-sym-s6-n128-e2e512-lr0.003"),
             ("... with step 1e-3", "signround-i100-w4-g32-sym-s6-n128-e2e512-lr0.001"),
             ("fp16 scales in groups of 64 instead (w4-g64-sym), 100 steps, 128 x 256 tokens",
              "signround-i100-w4-g64-sym-n128", "signround-i100-w4-g32-sym-s6-n128"),
             ("+ end-to-end scale distillation (step 1e-3)", "signround-i100-w4-g64-sym-n128-e2e512",
              "signround-i100-w4-g64-sym-n128"),
             ("a fitted table of 16 levels per tensor instead, groups of 72 (learned rounding on the table)",
              "signround-i100-w4-g72-lut-n128", "signround-i100-w4-g32-sym-s6-n128"),
             ("IQ4_NL's fixed levels instead of a fitted table, groups of 72", "signround-i100-w4-g72-nl-n128",
              "signround-i100-w4-g72-lut-n128"),
             ("fitted tables in groups of 64, layer 17's gate in groups of 128 (<= 4.25 with the tables)",
              "signround-i100-w4-g64-lut-17.mlp.gate_proj@w4-g128-lut-n128", "signround-i100-w4-g72-lut-n128"),
             ("IQ4_NL's levels in groups of 64, layer 17's gate in groups of 128",
              "signround-i100-w4-g64-nl-17.mlp.gate_proj@w4-g128-nl-n128", "signround-i100-w4-g72-nl-n128"),
             ("+ end-to-end distillation of its signed scales", "signround-i100-w4-g64-nl-17.mlp.gate_proj@w4-g128-nl-n128-e2e512",
              "signround-i100-w4-g64-nl-17.mlp.gate_proj@w4-g128-nl-n128"),
             ("allocation over 14 format families (measured 4 x 128 table, widened), learned rounding",
              "signround-i100-alloc-4.25-n128", "signround-i100-w4-g64-nl-17.mlp.gate_proj@w4-g128-nl-n128"),
             ("... the table predicted from the diagonal Fisher instead (the built-in recipe's first version)",
              "recipe-alloc-signround-4.25-blocks-i100", "signround-i100-alloc-4.25-n128"),
             ("... 75 steps, the pinned embedding left out of the table (built-in recipe, time up to export)",
              "recipe-alloc-signround-4.25-blocks", "recipe-alloc-signround-4.25-blocks-i100")],
    "2.5": [("round to nearest, w2-g48-iz", "rtn-w2-g48-iz"),
            ("GPTQ error feedback (16 x 256 tokens)", "gptq-w2-g48-iz"),
            ("... block by block on 128 x 256 tokens (sequential)", "gptq-seq-w2-g48-iz-n128", "gptq-w2-g48-iz"),
            ("... toward the float model's outputs, group by group (GPTAQ)", "gptq-asym-w2-g48-iz-n128",
             "gptq-seq-w2-g48-iz-n128"),
            ("learned rounding instead (SignRound, 40 steps, 32 x 256 tokens)", "signround-i40-w2-g48-iz"),
            ("100 steps, 128 x 256 tokens", "signround-i100-w2-g48-iz-n128"),
            ("groups of 24 with 6-bit scale codes (w2-g24-iz-s6, +0.02 bits)", "signround-i100-w2-g24-iz-s6-n128"),
            ("+ end-to-end scale distillation (step 3e-3)", "signround-i100-w2-g24-iz-s6-n128-e2e512-lr0.003",
             "signround-i100-w2-g24-iz-s6-n128"),
            ("a vector codebook (4 weights per 8-bit code) inside GPTQ instead of the scalar grid (one shot, 2.28 bits)",
             "gptq-w2-g64-vq4", "gptq-w2-g48-iz"),
            ("... rounded by learned rounding instead of GPTQ (100 steps, 128 x 256 tokens)",
             "signround-i100-w2-g64-vq4-n128", "gptq-w2-g64-vq4"),
            ("allocation over 14 format families (measured 4 x 128 table, widened), learned rounding",
             "signround-i100-alloc-2.5-n128", "signround-i100-w2-g24-iz-s6-n128"),
            ("... the table predicted from the diagonal Fisher instead (built-in recipe, time up to export)",
             "recipe-alloc-signround-2.5-blocks", "signround-i100-alloc-2.5-n128")],
}


def main() -> None:
    records = {r["method"]: r for r in json.loads((RESULTS / "quality_per_bit.json").read_text())}
    rows = []
    for budget, ladder in LADDER.items():
        best = None  # the lowest KL of the rungs above
        for step, name, *base in ladder:
            r = records.get(name)
            row = {"budget": budget, "step": step, "method": name, "measured": r is not None}
            if r is not None:
                ref = records[base[0]]["kl"] if base and base[0] in records else None if base else best
                code = (r.get("second_text") or {}).get("kl")
                row.update(bpw_blocks=r.get("bpw_blocks"), kl=r["kl"], ppl=r["ppl"], code_kl=code,
                           windows=r["windows"], seconds=r["seconds"].get("quantize"),
                           compared_with=base[0] if base else "best above",
                           change=None if ref is None else r["kl"] / ref - 1)
                best = r["kl"] if best is None else min(best, r["kl"])
            rows.append(row)
    write("quality_ablation", rows, _markdown(rows))
    print(_markdown(rows))


def _markdown(rows: list[dict]) -> str:
    out = ["| budget | step | bits/weight (blocks) | KL news | vs the rung before | KL code | quantize s |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if not r["measured"]:
            out.append(f"| {r['budget']} | {r['step']} | not measured: `quality_per_bit.py --only {r['method']}` "
                       "| | | | |")
            continue
        change = "" if r["change"] is None else f"{100 * r['change']:+.1f} %"
        code = "" if r["code_kl"] is None else f"{r['code_kl']:.3f}"
        secs = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        out.append(f"| {r['budget']} | {r['step']} | {r['bpw_blocks']:.3f} | {r['kl']:.4f} | {change} | {code} | "
                   f"{secs} |")
    return "\n".join(out + ["", "Full protocol (lee_background, 32 x 1024 tokens), peer accounting; KL code: "
                                "HumanEval prompts and solutions, 8 windows. Each change is against the best rung "
                                "above it, or the rung its step names. Quantize seconds include end-to-end distillation and its "
                                "text generation; machines differ between sessions (the records say which)."])


if __name__ == "__main__":
    main()
