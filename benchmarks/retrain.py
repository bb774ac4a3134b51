"""Self-retraining on SmolLM2-135M: RTN w3-g128, then its fp16 scales retrained on text the
original model wrote itself, with the stability gate on and (same text, same settings) off.

Every model is exported as a package, loaded back from disk and scored on the full protocol
(lee_background, which the retraining never sees) against the float reference, all on the same
windows in one pass. Records carry the self-generated token count, the kept/rejected windows,
S(t) before/after and the wall time of each part (generation, training, gate, evaluation).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/retrain.py [--windows N] [--lr X]

Writes benchmarks/results/retrain.json and retrain.md (``--name`` changes the name).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import record, write  # noqa: E402

from uqcit.stages.quantize import quantize_model  # noqa: E402
from uqcit.stages.evaluate import EvalConfig, evaluate_many  # noqa: E402
from uqcit.stages.levels import analyze_levels  # noqa: E402
from uqcit.inputs.models import load_model  # noqa: E402
from uqcit.package import export_package, load_package, package_bytes  # noqa: E402
from uqcit.stages.plan import PlanConfig, build_plan  # noqa: E402
from uqcit.stages.retrain import RetrainConfig, retrain, self_generate  # noqa: E402

MODEL = "smollm2-135m"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--windows", type=int, default=None, help="fewer evaluation windows (not the full protocol)")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--sequences", type=int, default=128, help="self-generated training sequences")
    ap.add_argument("--heldout", type=int, default=16, help="self-generated held-out sequences (the gate's batch)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps-per-window", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=None, help="default: RetrainConfig's for mode 'scales'")
    ap.add_argument("--name", default="retrain")
    args = ap.parse_args()

    t0 = time.perf_counter()
    loaded = load_model(MODEL)
    ref, tok = loaded.model, loaded.tokenizer
    levels = analyze_levels(ref)
    load_s = time.perf_counter() - t0
    plan = build_plan(levels, PlanConfig(preset="uniform", bits=args.bits))
    t0 = time.perf_counter()
    q = quantize_model(ref, levels, plan)
    quant_s = time.perf_counter() - t0

    cfg = RetrainConfig(mode="scales", n_sequences=args.sequences, heldout_sequences=args.heldout,
                        seq_len=args.seq_len, batch_size=args.batch, steps_per_window=args.steps_per_window,
                        epochs=args.epochs, lr=args.lr)
    # One self-generated text for both runs, so the gate is the only difference between them.
    text = self_generate(ref, tok, n_sequences=cfg.n_sequences + cfg.heldout_sequences, seq_len=cfg.seq_len,
                         prompts=cfg.prompt_texts, temperature=cfg.temperature, top_k=cfg.top_k,
                         batch=cfg.gen_batch, seed=cfg.seed)
    runs = {"gate": retrain(q.model, ref, tok, cfg, data=text),
            "nogate": retrain(q.model, ref, tok, cfg.replace(gate=False), data=text)}

    base = q.method_name
    names = {"gate": f"retrain-scales-{base}", "nogate": f"retrain-scales-nogate-{base}"}
    candidates, meta = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, quantized in [("base", q)] + [(k, dataclasses.replace(q, model=r.model)) for k, r in runs.items()]:
            method = base if key == "base" else names[key]
            t0 = time.perf_counter()
            path = export_package(quantized, tok, Path(tmp) / method, source_model=MODEL, levels=levels)
            export_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            candidates[method] = load_package(path).model
            meta[method] = dict(key=key, package_bytes=package_bytes(path),
                                seconds={"export": export_s, "load_package": time.perf_counter() - t0})
        t0 = time.perf_counter()
        res = evaluate_many(candidates, tok, EvalConfig(max_windows=args.windows), reference=ref)
        eval_s = time.perf_counter() - t0

    records = []
    for method, m in meta.items():
        ev, key = res[method], m["key"]
        seconds = {"load_model": load_s, "quantize": quant_s, **m["seconds"], "evaluate": ev.seconds}
        extra = {"reference_ppl": res["reference"].ppl}
        if key != "base":
            r = runs[key]
            seconds = {"generate": text.seconds, "train": r.seconds["train"], "gate": r.seconds["gate"],
                       **seconds}
            extra.update(
                retrain=r.config.to_dict(), self_generated_tokens=text.generated_tokens,
                train_tokens=r.train_tokens, heldout_tokens=cfg.heldout_sequences * cfg.seq_len,
                steps=r.log[-1].steps if r.log else 0, windows_kept=r.kept, windows_rejected=r.rejected,
                s0=r.s0, s_final=r.final_s, gate_metric=cfg.gate_metric, trainable_values=r.trainable_values,
                skipped=[n for n, _ in r.skipped], log=[dataclasses.asdict(w) for w in r.log])
        records.append(record(model=MODEL, method=method, bpw=q.bpw, package_bytes=m["package_bytes"], ev=ev,
                              seconds=seconds, **extra))
    records[0]["seconds"]["evaluate_all"] = eval_s
    jp, mp = write(args.name, records)
    lines = [mp.read_text(), "", "| run | self-generated tokens | steps | windows kept | rejected | S(0) | S final |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in records[1:]:
        lines.append(f"| {r['method']} | {r['self_generated_tokens']:,} | {r['steps']} | {r['windows_kept']} | "
                     f"{r['windows_rejected']} | {r['s0']:.4f} | {r['s_final']:.4f} |")
    mp.write_text("\n".join(lines) + "\n")
    print(mp.read_text())
    print(f"wrote {jp}")


if __name__ == "__main__":
    main()
