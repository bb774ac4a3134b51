"""Second architecture: levels, sensitivity, allocation and noise curve on all-MiniLM-L6-v2.

The SmolLM2 studies (noise_curve.py, the sensitivity/allocation pipeline) repeated on a float32
BERT encoder. Quality is minilm_cosine.py's: mean cosine between the float and the modified
model's sentence embeddings (mean-pooled last hidden state) on the first 256 sentences of
lee_background (``--sentences``), scored with its ``sentences``/``embed``/``cosines``.

1. **Levels**: ``analyze_levels`` (defaults: ruleset by model_type, late_fraction 0.1): modules,
   weights and roles per level, and the rules that matched (BERT names, not Llama's).
2. **Sensitivity**: 1 - mean cosine with one module alone RTN-quantized (the rest float), per
   module and format. ``uqcit.stages.sensitivity.measure_sensitivity`` cannot score this: it
   measures KL of next-token logits (``model_logits``, with causal block replay), and an
   encoder has no logits and no hook for another quality function. So the loop is here, with
   the same round trip and restore (``sensitivity_probe.dequantized``/``swapped``), and its
   table is a ``SensitivityResult`` whose cells are 1 - cos instead of KL. w2-g128 is measured
   besides w3/w4: with only w3 and w4 the 3.25 budget admits nothing but uniform w3.
   Spearman correlations of level with sensitivity (per module, and per level per weight).
3. **Allocation**: ``uqcit.stages.allocate.allocate`` on that table at 3.25 stored bits/weight
   (``QuantFormat.bits_for``, every module counted), quantized with RTN and GPTQ
   (minilm_cosine's configs), next to uniform w3-g128 (3.25). A control pins the largest module
   (the word embeddings, half the weights) and those that cannot move the embeddings (pooler) to
   w3-g128, so the plan can only trade bits among the encoder's modules.
4. **Noise curve**: noise_curve.py's ``noisy_copy`` (W + sigma * rms(W) * N(0, 1), seed 1234;
   rms, as noise_curve defines it, equals std to 0.1 % on these zero-mean weights) at sigma in
   {0, 0.05, 0.1, 0.25, 0.5} on all weight modules, on the nn.Linear ones, and one level at a
   time; and its ``rtn_copy`` one level at a time in w3-g128 (equal bits). Scored by mean
   cosine and the fraction of sentences with cosine >= 0.9; per weight, does Level 3 resist best?

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python benchmarks/minilm_analysis.py

(``--sentences 16`` for a smoke run.) Writes benchmarks/results/minilm_analysis.json and .md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import math
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write  # noqa: E402
from minilm_cosine import METHODS, N_SENTENCES, cosines, embed, sentences  # noqa: E402
from noise_curve import SIGMAS, noisy_copy, owned_modules, rtn_copy  # noqa: E402

from uqcit.inputs.corpus import calibration_batch  # noqa: E402
from uqcit.inputs.models import load_model  # noqa: E402
from uqcit.stages.allocate import AllocateConfig, allocate  # noqa: E402
from uqcit.stages.levels import LEVEL_NAMES, analyze_levels  # noqa: E402
from uqcit.stages.plan import uniform_plan  # noqa: E402
from uqcit.stages.quantize import quantize_model  # noqa: E402
from uqcit.stages.sensitivity import SensitivityResult  # noqa: E402
from uqcit.stages.sensitivity_probe import dequantized, swapped  # noqa: E402
from uqcit.tensor.formats import parse_format  # noqa: E402

MODEL = "minilm-l6"
SENS_FORMATS = ("w2-g128", "w3-g128", "w4-g128")
UNIFORM = "w3-g128"
TARGET_BPW = 3.25
NOISE_SEED = 1234  # noise_curve.py's
COS_OK = 0.9  # "fraction of sentences with cosine >= 0.9"
UNUSED = 1e-6  # a module whose every format moves 1 - cos less than this does not reach the embeddings
LEVELS = (1, 2, 3, 4, 5)


class Scorer:
    """minilm_cosine's quality of a model against the float one, on fixed sentences."""

    def __init__(self, ref, tok, texts: list[str]):
        self.tok, self.texts = tok, texts
        self.ref_emb = embed(ref, tok, texts)

    def __call__(self, model) -> dict[str, float]:
        cos = cosines(model, self.tok, self.texts, self.ref_emb)
        return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                "frac_cos_ge_0.9": float((cos >= COS_OK).float().mean())}


def levels_record(levels) -> dict:
    """Per level: modules, weights, roles (late-block ones marked), names; the rules that matched."""
    counts, per_level = levels.level_counts(), {}
    for lv, entries in levels.by_level().items():
        roles = Counter(m.role + (" (late)" if m.late else "") for m in entries)
        per_level[f"L{lv}"] = {"name": LEVEL_NAMES[lv], "modules": counts[lv].modules,
                               "weights": counts[lv].params, "roles": dict(roles),
                               "module_names": [m.name for m in entries]}
    rules = {}
    for m in levels.modules:
        r = rules.setdefault(m.rule, {"role": m.role, "level": m.role_level, "modules": 0})
        r["modules"] += 1
    late = sorted({m.block for m in levels.modules if m.late})
    return {"study": "levels", "per_level": per_level, "ruleset": levels.ruleset.name,
            "model_type": levels.model_type, "rules_matched": rules, "n_blocks": levels.n_blocks,
            "late_fraction": levels.config.late_fraction, "late_blocks": late,
            "unhandled": list(levels.unhandled), "summary": levels.summary(),
            "note": (f"model_type {levels.model_type!r} selects the {levels.ruleset.name!r} ruleset: BERT names "
                     "(attention.self.query/key/value -> L2, attention.output.dense -> L3, intermediate.dense / "
                     "output.dense -> L4, pooler.dense -> L5 head) instead of Llama's q/k/v/o_proj and "
                     f"gate/up/down_proj; blocks {late} are late (late_fraction {levels.config.late_fraction}) "
                     "so all their modules are L5 whatever their role; no LM head, no tied weights.")}


@torch.no_grad()
def measure_table(model, levels, score, formats) -> SensitivityResult:
    """1 - mean cosine with each quantizable module alone RTN round-tripped in each format."""
    entries, named = levels.quantizable(), dict(model.named_modules())
    fmts = [parse_format(f) for f in formats]
    table = torch.full((len(entries), len(fmts)), math.nan, dtype=torch.float64)
    seconds = torch.full((len(entries),), math.nan, dtype=torch.float64)
    for i, e in enumerate(entries):
        t0 = time.perf_counter()
        with swapped([named[e.name]], [e]) as (saved, put):  # the weight is put back on exit
            for j, fmt in enumerate(fmts):
                put(0, dequantized(saved[0], e, fmt))
                table[i, j] = 1.0 - score(model)["cosine_mean"]
        seconds[i] = time.perf_counter() - t0
        print(f"sens {e.name} (L{e.level}): " + "  ".join(f"{f} {v:.2e}" for f, v in zip(formats, table[i].tolist())),
              flush=True)
    return SensitivityResult(modules=[e.name for e in entries], formats=[f.name for f in fmts], table=table,
                             numel=[e.numel for e in entries], levels=[e.level for e in entries],
                             seconds=seconds, meta={"measure": "1 - mean cosine, one module RTN, the rest float"})


def sensitivity_record(sens: SensitivityResult, levels, floor: float) -> dict:
    """Per module rows, per level totals per weight, and the rank correlations with level."""
    from scipy.stats import spearmanr

    roles = {m.name: m.role for m in levels.modules}
    rows = [{"module": m, "level": lv, "role": roles[m], "weights": n,
             **{f"1-cos {f}": float(v) for f, v in zip(sens.formats, sens.table[i].tolist())}}
            for i, (m, lv, n) in enumerate(zip(sens.modules, sens.levels, sens.numel))]
    per_level, spearman = {}, {}
    for j, f in enumerate(sens.formats):
        col = sens.table[:, j]
        per_weight = (col / torch.tensor(sens.numel, dtype=torch.float64)).tolist()
        lv_sum = {lv: sum(float(col[i]) for i in range(len(col)) if sens.levels[i] == lv) for lv in LEVELS}
        lv_w = {lv: sum(n for n, l2 in zip(sens.numel, sens.levels) if l2 == lv) for lv in LEVELS}
        per_level[f] = {f"L{lv}": {"sum_1-cos": lv_sum[lv], "weights": lv_w[lv],
                                   "1-cos_per_weight": lv_sum[lv] / lv_w[lv] if lv_w[lv] else None}
                        for lv in LEVELS}
        lv_pw = [lv_sum[lv] / lv_w[lv] for lv in LEVELS if lv_w[lv]]
        spearman[f] = {
            "modules_level_vs_1-cos": float(spearmanr(sens.levels, col.tolist()).statistic),
            "modules_level_vs_1-cos_per_weight": float(spearmanr(sens.levels, per_weight).statistic),
            "levels_level_vs_1-cos_per_weight": float(spearmanr([lv for lv in LEVELS if lv_w[lv]], lv_pw).statistic),
            "level_order_most_to_least_sensitive_per_weight":
                [f"L{lv}" for lv in sorted((lv for lv in LEVELS if lv_w[lv]), key=lambda lv: -lv_sum[lv] / lv_w[lv])],
        }
    unused = [m for m, row in zip(sens.modules, sens.table.tolist()) if max(abs(v) for v in row) < UNUSED]
    return {"study": "sensitivity", "formats": sens.formats, "measure": sens.meta["measure"],
            "floor_1-cos": floor, "modules": rows, "per_level": per_level, "spearman": spearman,
            "unused_modules": unused, "seconds": {"measure": float(sens.seconds.sum())}}


def predicted(sens: SensitivityResult, plan) -> float | None:
    """Sum of the solo 1 - cos of each module in the plan's format (the allocator's additive model)."""
    values = [sens.value(m, plan.format_for(m).name) for m in sens.modules]
    return None if None in values else sum(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sentences", type=int, default=N_SENTENCES, help="evaluation sentences (256: full run)")
    ap.add_argument("--formats", nargs="+", default=list(SENS_FORMATS), help="sensitivity candidates (RTN)")
    ap.add_argument("--target-bpw", type=float, default=TARGET_BPW)
    ap.add_argument("--name", default="minilm_analysis")
    args = ap.parse_args()
    t_all = time.perf_counter()
    lm = load_model(MODEL)
    ref, tok = lm.model, lm.tokenizer
    ref.eval()
    texts = sentences(args.sentences)
    score = Scorer(ref, tok, texts)
    levels = analyze_levels(ref)
    base = {"model": MODEL, "sentences": len(texts), "torch": torch.__version__, "machine": machine(),
            "date": _dt.date.today().isoformat()}
    records = [{**base, "method": "levels", "bpw": None, **levels_record(levels)}]
    print(levels.summary(), flush=True)

    # 2. Sensitivity, then the unperturbed model rescored: the floor, and proof every weight was restored.
    sens = measure_table(ref, levels, score, args.formats)
    again = score(ref)
    floor = 1.0 - again["cosine_mean"]
    if not abs(floor) < 1e-6:
        raise RuntimeError(f"the float model no longer reproduces its embeddings (1 - cos {floor:.2e})")
    srec = sensitivity_record(sens, levels, floor)
    records.append({**base, "method": "sensitivity", "bpw": None, **srec})
    write(args.name, records, markdown(records))

    # 3. Allocation from the table at the target, next to uniform w3-g128.
    names = [m.name for m in levels.quantizable()]
    alloc = allocate(levels, sens, AllocateConfig(target_bpw=args.target_bpw))
    plans = {"uniform": uniform_plan(names, parse_format(UNIFORM)), "allocated": alloc.plan}
    # Control: the largest module (the word embeddings, half the weights) and those that cannot reach
    # the embeddings kept at the uniform format, so the plan must trade among the encoder's modules.
    largest = max(levels.quantizable(), key=lambda m: m.numel).name
    pins = {m: UNIFORM for m in [largest, *srec["unused_modules"]]}
    pinned = allocate(levels, sens, AllocateConfig(target_bpw=args.target_bpw, pins=pins))
    plans[f"allocated, {UNIFORM} pinned: " + ", ".join(pins)] = dataclasses.replace(
        pinned.plan, name=f"{pinned.plan.name}-pinned")
    calib = calibration_batch(tok, n_samples=32, seq_len=128, seed=0)
    for kind, plan in plans.items():
        fmts = Counter(plan.format_for(m).name for m in names)
        for method in ("rtn", "gptq"):
            t0 = time.perf_counter()
            q = quantize_model(ref, levels, plan, METHODS[method], calibration=calib, progress=False)
            seconds = time.perf_counter() - t0
            s = score(q.model)
            bits_by_level = {f"L{lv}": sum(m.stored_bits for m in q.stored if m.level == lv)
                             / max(1, sum(m.numel for m in q.stored if m.level == lv)) for lv in LEVELS}
            records.append({**base, "method": q.method_name, "bpw": q.bpw, "study": "allocation", "plan": kind,
                            "rounding": method, "stored_bits": q.stored_bits, "weight_count": q.weight_count,
                            "bpw_note": "stored bits (QuantizedTensor.stored_bits = QuantFormat.bits_for) / weights, "
                                        f"all {len(names)} weight modules, fp16 scale+zero per group counted",
                            **s, "predicted_sum_1-cos_rtn": predicted(sens, plan), "format_counts": dict(fmts),
                            "bpw_by_level": bits_by_level, "seconds": {"quantize": seconds},
                            "choices": {m: plan.format_for(m).name for m in names} if kind != "uniform" else None})
            print(f"{q.method_name}: bpw {q.bpw:.4f} cos {s['cosine_mean']:.5f} (min {s['cosine_min']:.4f}) "
                  f"{seconds:.0f} s", flush=True)
            del q
    write(args.name, records, markdown(records))

    # 4. Noise curve: all weight modules, the nn.Linear ones, one level at a time; then RTN one level at a time.
    owned = owned_modules(levels, "all")
    scopes = {"all": owned, "linear": [m for m in owned if m.kind == "linear"],
              **{f"L{lv}": owned_modules(levels, lv) for lv in LEVELS}}
    for tag, entries in scopes.items():
        n = sum(m.numel for m in entries)
        common = {**base, "bpw": None, "study": "noise", "scope": tag, "perturbed_weights": n,
                  "noise": f"W + sigma * rms(W) * N(0,1) per weight matrix, seed {NOISE_SEED}"}
        records.append({**common, "method": f"noise-{tag}-s0.0", "sigma": 0.0, **again,
                        "note": "sigma 0 is the float model itself, rescored"})
        for sigma in SIGMAS:
            model = noisy_copy(ref, entries, sigma, seed=NOISE_SEED)
            s = score(model)
            del model
            records.append({**common, "method": f"noise-{tag}-s{sigma}", "sigma": sigma, **s,
                            "1-cos_per_weight": (1.0 - s["cosine_mean"]) / n})
            print(f"noise-{tag}-s{sigma}: cos {s['cosine_mean']:.5f} >=0.9 {s['frac_cos_ge_0.9']:.3f}", flush=True)
    for lv in LEVELS:
        entries = owned_modules(levels, lv)
        n = sum(m.numel for m in entries)
        s = score(rtn_copy(ref, entries, UNIFORM))
        records.append({**base, "method": f"rtn-{UNIFORM}-L{lv}-only", "bpw": None, "study": "equal-bits",
                        "scope": f"L{lv}", "format": UNIFORM, "perturbed_weights": n, **s,
                        "bits_per_weight_of_scope": sum(parse_format(UNIFORM).bits_for(m.numel) for m in entries) / n,
                        "1-cos_per_weight": (1.0 - s["cosine_mean"]) / n})
        print(f"rtn-{UNIFORM}-L{lv}-only: cos {s['cosine_mean']:.5f}", flush=True)
    records.append({**base, "method": "level3-resistance", "bpw": None, "study": "noise-summary",
                    **level3_verdict(records)})
    total = time.perf_counter() - t_all
    for r in records:
        r.setdefault("seconds", {})
        r["seconds"]["total_run"] = total
    write(args.name, records, markdown(records))
    print(f"done in {total:.0f} s", flush=True)


def level3_verdict(records: list[dict]) -> dict:
    """noise_curve's comparison: per sigma (and at equal bits), is L3's 1 - cos lowest, in total and per weight?"""
    out = {}
    groups = {f"sigma {r['sigma']}": "noise" for r in records if r.get("study") == "noise" and r["sigma"] > 0}
    groups[f"rtn {UNIFORM}"] = "equal-bits"
    for key, study in groups.items():
        rows = {r["scope"]: r for r in records if r.get("study") == study and r["scope"].startswith("L")
                and (study == "equal-bits" or f"sigma {r['sigma']}" == key)}
        total = {lv: 1.0 - r["cosine_mean"] for lv, r in rows.items()}
        per_weight = {lv: r["1-cos_per_weight"] for lv, r in rows.items()}
        out[key] = {"1-cos": total, "1-cos_per_weight": per_weight,
                    "L3_lowest_total": min(total, key=total.get) == "L3",
                    "L3_lowest_per_weight": min(per_weight, key=per_weight.get) == "L3",
                    "per_weight_order_most_resistant_first": sorted(per_weight, key=per_weight.get)}
    return {"comparison": out}


def markdown(records: list[dict]) -> str:
    """The record file's tables: levels, sensitivity, allocation, noise, equal bits, L3 verdict."""
    by = lambda study: [r for r in records if r.get("study") == study]  # noqa: E731
    out = []
    for r in by("levels"):
        out += [f"## Levels ({r['ruleset']} rules, late blocks {r['late_blocks']})", "",
                "| level | modules | weights | roles |", "|---|---:|---:|---|"]
        out += [f"| {lv} {d['name']} | {d['modules']} | {d['weights']:,} | "
                + ", ".join(f"{k} ×{v}" for k, v in d["roles"].items()) + " |" for lv, d in r["per_level"].items()]
        out += ["", r["note"], ""]
    for r in by("sensitivity"):
        fm = r["formats"]
        out += [f"## Sensitivity: 1 - mean cosine, one module RTN (floor {r['floor_1-cos']:.1e})", "",
                "| module | level | weights | " + " | ".join(fm) + " |", "|---|---:|---:|" + "---:|" * len(fm)]
        out += [f"| {m['module']} | L{m['level']} | {m['weights']:,} | "
                + " | ".join(f"{m['1-cos ' + f]:.2e}" for f in fm) + " |" for m in r["modules"]]
        out += ["", "| level | " + " | ".join(f"{f} 1-cos/weight" for f in fm) + " |", "|---|" + "---:|" * len(fm)]
        out += [f"| {lv} | " + " | ".join(f"{(r['per_level'][f][lv]['1-cos_per_weight'] or 0):.2e}" for f in fm) + " |"
                for lv in r["per_level"][fm[0]]]
        out += ["", "| format | Spearman level~1-cos (modules) | ... per weight (modules) | ... per weight (levels) "
                "| levels, most sensitive per weight first |", "|---|---:|---:|---:|---|"]
        out += [f"| {f} | {s['modules_level_vs_1-cos']:.3f} | {s['modules_level_vs_1-cos_per_weight']:.3f} | "
                f"{s['levels_level_vs_1-cos_per_weight']:.3f} | "
                + " > ".join(s["level_order_most_to_least_sensitive_per_weight"]) + " |"
                for f, s in r["spearman"].items()]
        out += ["", f"Modules that do not reach the embeddings: {r['unused_modules']}", ""]
    if by("allocation"):
        out += ["## Allocation (stored bits/weight, all weight modules)", "",
                "| method | plan | bits/weight | mean cosine | min cosine | cos >= 0.9 | predicted Σ 1-cos "
                "| formats |",
                "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in by("allocation"):
            pred = "—" if r["predicted_sum_1-cos_rtn"] is None else f"{r['predicted_sum_1-cos_rtn']:.4f}"
            out.append(f"| {r['method']} | {r['plan']} | {r['bpw']:.4f} | {r['cosine_mean']:.5f} | "
                       f"{r['cosine_min']:.4f} | {r['frac_cos_ge_0.9']:.3f} | {pred} | "
                       + ", ".join(f"{k} ×{v}" for k, v in sorted(r["format_counts"].items())) + " |")
        out.append("")
    if by("noise"):
        sig = sorted({r["sigma"] for r in by("noise")})
        out += ["## Noise curve: mean cosine (fraction of sentences with cosine >= 0.9)", "",
                "| scope | weights | " + " | ".join(f"σ={s}" for s in sig) + " |", "|---|---:|" + "---:|" * len(sig)]
        for scope in dict.fromkeys(r["scope"] for r in by("noise")):
            rows = {r["sigma"]: r for r in by("noise") if r["scope"] == scope}
            out.append(f"| {scope} | {rows[sig[0]]['perturbed_weights']:,} | "
                       + " | ".join(f"{rows[s]['cosine_mean']:.4f} ({rows[s]['frac_cos_ge_0.9']:.2f})" for s in sig)
                       + " |")
        out.append("")
    if by("equal-bits"):
        out += [f"## One level at a time in {UNIFORM} (RTN), the rest float", "",
                "| scope | weights | mean cosine | 1-cos per weight |", "|---|---:|---:|---:|"]
        out += [f"| {r['scope']} | {r['perturbed_weights']:,} | {r['cosine_mean']:.5f} | {r['1-cos_per_weight']:.2e} |"
                for r in by("equal-bits")]
        out.append("")
    for r in by("noise-summary"):
        out += ["## Does Level 3 resist best?", "", "| perturbation | L3 lowest 1-cos | L3 lowest per weight "
                "| levels, most resistant per weight first |", "|---|---|---|---|"]
        out += [f"| {k} | {v['L3_lowest_total']} | {v['L3_lowest_per_weight']} | "
                f"{' < '.join(v['per_weight_order_most_resistant_first'])} |" for k, v in r["comparison"].items()]
    return "\n".join(out)


if __name__ == "__main__":
    main()
