"""Fine-tuning data and speed (seed 000 §5.3: "after compression, fine-tuning needs a tenth of
the data and converges 5x faster"), measured on SmolLM2-135M: the same fine-tuning run on the
float model and on a compressed one, steps and tokens to the same improvement, wall time per step.

**The task.** Next-token training on real text neither model is evaluated on: lee_background
after the evaluation span (token 32,768 on, where calibration text comes from), cut into
consecutive ``--seq-len`` sequences in order, one pass, so tokens seen = distinct tokens used =
the "data". The last ``--heldout`` sequences of that span are never trained on; their mean
next-token NLL is the loss measured every ``--eval-every`` steps. Text the model writes itself
(``uqcit.inputs.selftext``) is not used: the float model's NLL on its own samples cannot fall
in expectation (its gradient there has mean zero), so only the compressed model would have
anything to learn, and distillation from the float model is no task for the float model itself.

**Fair to both.** The same trainable parts on both: LoRA adapters of rank ``--rank`` on the
same block linears (``uqcit.runtime.trainable``; the only kind of training both a float and a
quantized layer allow), the same seeded initialization, optimizer, learning rate, batches and
order. The two runs alternate step by step in one process, so both meet the same machine load
and their wall times per step compare.

**Readings** (all in the ``compressed-vs-float`` record):

- ``steps_ratio`` / ``tokens_ratio`` (the claim's figure): steps (tokens) the float model needs
  for a held-out NLL drop of ``target_drop`` = ``--target`` x the float model's best drop in the
  budget, divided by what the compressed model needs for the same drop. A compressed model
  that never gets there gives the budget as its steps, so the ratio is an upper bound
  (``compressed_reached`` false).
- ``level_*``: the same, to one held-out NLL level (the float model's start minus
  ``target_drop``): the compressed model starts worse, so this asks for equal quality.
- ``converge_*``: steps to ``--converge`` of each model's own best drop (its own plateau).
- ``time_ratio``: float seconds to ``target_drop`` / compressed seconds to it.

The compressed model's drop includes repairing its own compression damage (any training on
real text does that), which favours the claim in the first reading; ``damage_nll`` (its start
minus the float's start) says how much there is to repair.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/finetune_speed.py [--steps N] [--compressed w4-g128]

Default settings: about 10 minutes on one free core (a step of 2 x 128 tokens is a forward and a
backward pass of each model; 13 held-out measurements of 4 x 128 tokens each).
Writes benchmarks/results/finetune_speed.json and .md.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine  # noqa: E402

from uqcit.core.io import atomic_write, write_json  # noqa: E402
from uqcit.inputs.corpus import EVAL_TOKENS, corpus_tokens  # noqa: E402
from uqcit.inputs.models import load_model  # noqa: E402
from uqcit.runtime.modules import model_logits  # noqa: E402
from uqcit.runtime.trainable import make_trainable  # noqa: E402
from uqcit.stages.levels import analyze_levels  # noqa: E402
from uqcit.stages.plan import BitPlan  # noqa: E402
from uqcit.stages.quantize import quantize_model  # noqa: E402
from uqcit.tensor.formats import parse_format  # noqa: E402

MODEL = "smollm2-135m"
BLOCK_LINEARS = r"\.(q|k|v|o|gate|up|down)_proj$"  # the 210 block linears, adapted on both models


def text_split(tok, seq_len: int, train: int, heldout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``train`` then (from the end of the span) ``heldout`` sequences of lee_background after the evaluation span."""
    span = corpus_tokens(tok)[EVAL_TOKENS:]
    n = span.numel() // seq_len
    if train + heldout > n:
        raise SystemExit(f"the text after the evaluation span holds {n} sequences of {seq_len} tokens; "
                         f"{train} training + {heldout} held out do not fit (fewer --steps or --batch)")
    seqs = span[: n * seq_len].view(n, seq_len)
    return seqs[:train], seqs[n - heldout:]


def nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of ``ids`` [b, seq] under ``model`` (differentiable)."""
    logits = model_logits(model, ids)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@torch.no_grad()
def heldout_nll(model, held: torch.Tensor, batch: int = 4) -> float:
    parts = [held[i:i + batch] for i in range(0, len(held), batch)]
    return sum(float(nll(model, part)) * len(part) for part in parts) / len(held)


class Run:
    """One model's fine-tuning: LoRA on the block linears, AdamW, and its log."""

    def __init__(self, model, args) -> None:
        self.model = copy.deepcopy(model)
        self.model.eval()  # no dropout: both runs compute what they will run
        self.trainables, _ = make_trainable(self.model, "lora", modules=BLOCK_LINEARS, lora_rank=args.rank,
                                            lora_alpha=2.0 * args.rank, seed=0)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        self.train_loss: list[float] = []
        self.step_seconds: list[float] = []
        self.evals: list[tuple[int, float]] = []  # (step, held-out NLL)

    def step(self, ids: torch.Tensor) -> None:
        t0 = time.perf_counter()
        loss = nll(self.model, ids)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.step_seconds.append(time.perf_counter() - t0)
        self.train_loss.append(float(loss.detach()))


def first_step(evals: list[tuple[int, float]], ok) -> int | None:
    """The first evaluated step whose held-out NLL passes ``ok``, None if none does."""
    return next((s for s, v in evals if ok(v)), None)


def compare(f: Run, c: Run, args, tokens_per_step: int) -> dict:
    """The readings of the module docstring, from the two logs."""
    f0, c0 = f.evals[0][1], c.evals[0][1]
    best_f = f0 - min(v for _, v in f.evals)
    best_c = c0 - min(v for _, v in c.evals)
    target = args.target * best_f
    out = {"target_drop": target, "float_best_drop": best_f, "compressed_best_drop": best_c,
           "float_start_nll": f0, "compressed_start_nll": c0, "damage_nll": c0 - f0, "budget_steps": args.steps}
    if best_f <= 0:
        out["error"] = "the float model's held-out NLL never fell: no target; use more steps or a larger lr"
        return out
    budget = args.steps

    def ratio(name: str, sf: int | None, sc: int | None) -> None:
        out[f"{name}_float_steps"], out[f"{name}_compressed_steps"] = sf, sc
        out[f"{name}_compressed_reached"] = sc is not None
        sf_, sc_ = (sf if sf is not None else budget), (sc if sc is not None else budget)
        out[f"{name}_steps_ratio"] = sf_ / max(sc_, 1)  # step 0 reached: counts as one step

    sf = first_step(f.evals, lambda v: f0 - v >= target)
    sc = first_step(c.evals, lambda v: c0 - v >= target)
    ratio("drop", sf, sc)
    out["steps_ratio"] = out["drop_steps_ratio"]
    out["tokens_ratio"] = out["steps_ratio"]  # one pass: tokens = steps x batch x seq_len for both
    out["compressed_reached"] = out["drop_compressed_reached"]
    out["float_tokens_to_target"] = None if sf is None else sf * tokens_per_step
    out["compressed_tokens_to_target"] = None if sc is None else sc * tokens_per_step
    # wall time to the target; one that never got there: its whole budget (the ratio is then a bound)
    out["time_ratio"] = sum(f.step_seconds[:sf or budget]) / max(sum(c.step_seconds[:sc or budget]), 1e-9)
    ratio("level", first_step(f.evals, lambda v: v <= f0 - target), first_step(c.evals, lambda v: v <= f0 - target))
    ratio("converge", first_step(f.evals, lambda v: f0 - v >= args.converge * best_f),
          first_step(c.evals, lambda v: c0 - v >= args.converge * best_c) if best_c > 0 else None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compressed", default="w4-g128", help="format of the block linears (peer accounting)")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--heldout", type=int, default=4, help="held-out sequences (never trained on)")
    ap.add_argument("--eval-every", type=int, default=2,
                    help="steps between held-out measurements (the largest ratio it can resolve is steps / this)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--target", type=float, default=0.5, help="target drop, a fraction of the float model's best")
    ap.add_argument("--converge", type=float, default=0.8, help="convergence: this fraction of a model's own best drop")
    ap.add_argument("--name", default="finetune_speed")
    args = ap.parse_args()

    t0 = time.perf_counter()
    loaded = load_model(MODEL, progress=False)
    ref, tok = loaded.model, loaded.tokenizer
    levels = analyze_levels(ref)
    blocks = {m.name for m in levels.quantizable() if m.kind != "embedding"}
    fmt = parse_format(args.compressed)
    q = quantize_model(ref, levels, BitPlan(exact={n: fmt for n in blocks}, name=f"rtn-{fmt.name}"), progress=False)
    mods = [m for m in q.stored if m.name in blocks]
    bpw_blocks = sum(m.stored_bits for m in mods) / sum(m.numel for m in mods)
    setup_s = time.perf_counter() - t0

    train, held = text_split(tok, args.seq_len, args.steps * args.batch, args.heldout)
    runs = {"reference-fp32": Run(ref, args), q.method_name: Run(q.model, args)}
    del q
    for r in runs.values():
        r.evals.append((0, heldout_nll(r.model, held)))
    for step in range(1, args.steps + 1):
        ids = train[(step - 1) * args.batch: step * args.batch]
        for r in runs.values():  # alternating: both runs see the same machine load
            r.step(ids)
        if step % args.eval_every == 0 or step == args.steps:
            for r in runs.values():
                r.evals.append((step, heldout_nll(r.model, held)))
        print(f"step {step}: " + "  ".join(f"{n} train {r.train_loss[-1]:.4f} held {r.evals[-1][1]:.4f}"
                                          for n, r in runs.items()), flush=True)

    (fname, f), (cname, c) = runs.items()
    tokens_per_step = args.batch * args.seq_len
    defaults = vars(ap.parse_args([]))
    changed = [f"{k} {v}" for k, v in vars(args).items() if k != "name" and v != defaults[k]]
    common = {"model": MODEL, "study": "finetune-speed", "task": "next-token LoRA fine-tuning on lee_background "
              "after the evaluation span", "settings": vars(args), "full_protocol": not changed,
              **({"reduced": ", ".join(changed)} if changed else {}), "tokens_per_step": tokens_per_step,
              "heldout_tokens": held.numel(), "torch": torch.__version__, "machine": machine(),
              "date": _dt.date.today().isoformat()}
    records = []
    for name, r in runs.items():
        records.append({**common, "method": f"finetune-lora-r{args.rank}-{name}", "base": name,
                        "bpw_blocks": 32.0 if r is f else bpw_blocks,
                        "trainable_values": sum(t.values for t in r.trainables),
                        "curve": [{"step": s, "tokens": s * tokens_per_step, "heldout_nll": v} for s, v in r.evals],
                        "train_loss": r.train_loss, "seconds_per_step": sum(r.step_seconds) / len(r.step_seconds),
                        "seconds": {"train": sum(r.step_seconds), "setup": setup_s}})
    cmp = compare(f, c, args, tokens_per_step)
    records.append({**common, "method": "compressed-vs-float", "float": fname, "compressed": cname,
                    "step_time_ratio": records[1]["seconds_per_step"] / records[0]["seconds_per_step"], **cmp})
    write_json(RESULTS / f"{args.name}.json", records)
    md = markdown(records)
    atomic_write(RESULTS / f"{args.name}.md", md.encode())
    print(md)


def markdown(records: list[dict]) -> str:
    runs, cmp = records[:-1], records[-1]
    g = lambda v: "—" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| step | tokens | " + " | ".join(f"held-out NLL, {r['base']}" for r in runs) + " |",
             "|---:|---:|" + "---:|" * len(runs)]
    for i, p in enumerate(runs[0]["curve"]):
        lines.append(f"| {p['step']} | {p['tokens']:,} | " + " | ".join(f"{r['curve'][i]['heldout_nll']:.4f}"
                                                                     for r in runs) + " |")
    lines += ["", "| reading | float steps | compressed steps | float / compressed |", "|---|---:|---:|---:|"]
    for name, what in (("drop", f"same drop ({g(cmp.get('target_drop'))} nats)"), ("level", "same held-out NLL"),
                       ("converge", "own plateau")):
        lines.append(f"| {what} | {g(cmp.get(f'{name}_float_steps'))} | {g(cmp.get(f'{name}_compressed_steps'))} | "
                     f"{g(cmp.get(f'{name}_steps_ratio'))} |")
    lines += ["", "Seconds per step: " + ", ".join(f"{r['base']} {r['seconds_per_step']:.2f}" for r in runs)
              + f"; compressed start is {g(cmp['damage_nll'])} nats worse than the float model."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
