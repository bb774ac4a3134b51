"""Quality per bit on SmolLM2-135M at the three budgets of docs/evaluation.md, full protocol,
in both accountings: ``bpw_blocks`` (bits over the 210 block linears only, the peers' way,
with the tied embedding/LM head kept at fp16) and ``bpw`` (every weight of the model, the
tied 28.3 M embedding included, as stored).

Each candidate is a recipe: an optional rotation, a plan (one format for the block linears;
the embedding at fp16 for the peer accounting, or quantized for the whole-model one) and a
rounding method. Every candidate is exported as a package, loaded back from disk and scored
against the unrotated float model on the same windows. Results merge into the JSON after each
candidate, so a restart measures only what is missing.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/quality_per_bit.py [--only a,b] [--windows N]

Each package is also scored on a second held-out text of another kind (HumanEval's prompts and
canonical solutions, ``--second-windows`` windows, ``second_text`` in the record).

Writes benchmarks/results/quality_per_bit.json and .md. The peers' figures quoted beside
them in the README were measured with the same protocol on the same machine (docs/evaluation.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, package_candidate, score_and_merge  # noqa: E402
from family_allocation import plan_path  # noqa: E402

from uqcit.inputs.corpus import calibration_batch  # noqa: E402
from uqcit.inputs.models import load_model  # noqa: E402
from uqcit.stages.evaluate import EvalConfig, evaluate_many  # noqa: E402
from uqcit.stages.levels import analyze_levels  # noqa: E402
from uqcit.stages.plan import BitPlan  # noqa: E402
from uqcit.stages.quantize import QuantizeConfig, quantize_model  # noqa: E402
from uqcit.stages.retrain import RetrainConfig, SelfText, retrain, self_generate  # noqa: E402
from uqcit.stages.rotation import RotationConfig, rotate_model  # noqa: E402
from uqcit.tensor.formats import parse_format  # noqa: E402

MODEL = "smollm2-135m"


@dataclasses.dataclass(frozen=True)
class Candidate:
    budget: float  # the bits/weight class it competes in (peer accounting: bpw_blocks)
    blocks: str  # format of every block linear, or "alloc-<budget>": family_allocation.py's plan for that budget
    embedding: str  # "fp16" (peer accounting), a format, or "alloc": the whole-model plan's (whole-model accounting)
    method: str = "signround"
    rotation: str = "hadamard"  # "none" or a RotationConfig construction
    iters: int = 40
    lr: float = 0.0  # signed-gradient step; 0: 1 / iters
    calib_samples: int = 32  # x 256 tokens
    micro_batch: int = 4  # sequences per signed-gradient step
    head_feedback: bool = True  # a quantized tied embedding: error feedback against the head's inputs
    calib_source: str = "corpus"  # "corpus" (lee_background after the evaluation span), "self" or "mix"
    e2e: int = 0  # > 0: then this many self-generated sequences of end-to-end scale distillation (retrain)
    e2e_lr: float = 0.0  # its Adam step on the log-scales; 0: RetrainConfig's default
    e2e_decay: str = "constant"  # RetrainConfig.lr_decay: "linear" lets the step fall to 0 over the pass
    coarse: tuple[str, str] = ()  # (block linear, format): that one module in another format, e.g. to pay for tables
    attention: str = ""  # another format for the attention projections (self_attn.*) than for the MLPs
    sequential: bool = False  # gptq: block by block on the quantized blocks' outputs
    asymmetric: bool = False  # gptq, sequential: toward the float model's outputs (GPTAQ)
    recipe: str = ""  # a built-in recipe run as the CLI runs it, up to its quantize stage (the fields above unused)

    @property
    def name(self) -> str:
        if self.recipe:
            return f"recipe-{self.recipe}"
        rot = "" if self.rotation == "none" else f"rot-{self.rotation}-"
        emb = "" if self.embedding == "fp16" else f"-emb-{self.embedding}" + ("-fb" if self.head_feedback else "")
        iters = f"-i{self.iters}" if self.method == "signround" else ""
        iters += f"-lr{self.lr:g}" if self.lr and self.method == "signround" else ""
        calib = "" if self.calib_source == "corpus" else f"-cal{self.calib_source}"
        usual = {"signround": 32, "gptq": 16}.get(self.method)  # the calibration size a name leaves unsaid
        calib += "" if usual in (None, self.calib_samples) else f"-n{self.calib_samples}"
        e2e = f"-e2e{self.e2e}" if self.e2e else ""
        e2e += f"-lr{self.e2e_lr:g}" if self.e2e and self.e2e_lr else ""
        e2e += "-lin" if self.e2e and self.e2e_decay == "linear" else ""
        blocks = self.blocks + (f"-{self.coarse[0].removeprefix('model.layers.')}@{self.coarse[1]}" if self.coarse else "")
        blocks += f"-attn-{self.attention}" if self.attention else ""
        seq = ("-asym" if self.asymmetric else "-seq") if self.sequential else ""
        return f"{rot}{self.method}{seq}{iters}-{blocks}{emb}{calib}{e2e}"


CANDIDATES = [
    # Peer accounting: block linears only, the tied embedding/head at fp16.
    Candidate(3.30, "w3-g64-iz", "fp16", rotation="none"),
    Candidate(4.25, "w4-g64-sym", "fp16", rotation="none"),
    Candidate(2.5, "w2-g48-iz", "fp16", rotation="none"),
    # Whole-model accounting: the tied embedding/head quantized too, with error feedback against
    # the head's inputs; every bit counted.
    Candidate(3.25, "w3-g96-iz", "w3-g64-iz", rotation="none"),
    Candidate(4.25, "w4-g64-sym", "w4-g128-iz", rotation="none"),
    Candidate(2.5, "w2-g64-iz", "w3-g128-iz", rotation="none"),
    # Double-quantized scales (6-bit group scales under an fp16 scale per 256 weights): groups of
    # 32 for the bits groups of 64 cost with fp16 scales.
    Candidate(4.25, "w4-g32-sym-s6", "fp16", rotation="none"),
    Candidate(4.25, "w4-g32-sym-s6", "w4-g96-iz", rotation="none"),
    # More steps and calibration text: 100 steps on 128 x 256 tokens (8 blocks at w4-g64-sym, 16
    # windows: KL 0.0354 vs 0.0436 with 40 steps on 32 sequences).
    Candidate(4.25, "w4-g32-sym-s6", "fp16", rotation="none", iters=100, calib_samples=128),
    Candidate(3.30, "w3-g64-iz", "fp16", rotation="none", iters=100, calib_samples=128),
    Candidate(2.5, "w2-g48-iz", "fp16", rotation="none", iters=100, calib_samples=128),
    Candidate(4.25, "w4-g32-sym-s6", "w4-g96-iz", rotation="none", iters=100, calib_samples=128),
    Candidate(3.25, "w3-g96-iz", "w3-g64-iz", rotation="none", iters=100, calib_samples=128),
    Candidate(2.5, "w2-g64-iz", "w3-g128-iz", rotation="none", iters=100, calib_samples=128),
    # Groups of 24 with 6-bit scale codes and 2-bit zero points (2.396 bits/weight) in place of
    # groups of 48 with fp16 scales (2.375).
    Candidate(2.5, "w2-g24-iz-s6", "fp16", rotation="none", iters=100, calib_samples=128),
    Candidate(2.5, "w2-g32-iz-s6", "w3-g128-iz", rotation="none", iters=100, calib_samples=128),
    # Ablation: the first recipe after a Hadamard rotation of the residual stream (on SmolLM2 the
    # rotation roughly doubles learned rounding's block output error; docs/evaluation.md).
    Candidate(3.30, "w3-g64-iz", "fp16"),
    # The same format rounded to nearest and by GPTQ (the calibration-generalization comparison).
    Candidate(3.30, "w3-g64-iz", "fp16", method="rtn", rotation="none"),
    Candidate(3.30, "w3-g64-iz", "fp16", method="gptq", rotation="none", calib_samples=16),
    # ... and at the other budgets: the first rungs of the ablation ladder (benchmarks/quality_ablation.py).
    Candidate(4.25, "w4-g64-sym", "fp16", method="rtn", rotation="none"),
    Candidate(4.25, "w4-g64-sym", "fp16", method="gptq", rotation="none", calib_samples=16),
    Candidate(2.5, "w2-g48-iz", "fp16", method="rtn", rotation="none"),
    Candidate(2.5, "w2-g48-iz", "fp16", method="gptq", rotation="none", calib_samples=16),
    # Learned rounding, then the fp16 group scales distilled end to end (KL to the float model) on
    # 512 sequences the float model wrote itself (stage retrain): the model before distillation is
    # recorded in the same run. Formats with fp16 scales only (6-bit scale codes do not train).
    Candidate(4.25, "w4-g64-sym", "fp16", rotation="none", iters=100, calib_samples=128, e2e=512),
    # The same with a 3x larger step (screened on the w4-g64-sym package, 16 windows: held-out KL on
    # the self-written text 0.156 at 1e-3, 0.147 at 3e-3), on the best block formats of each budget;
    # 6-bit scale codes train as codes under their fixed super-scales.
    Candidate(3.30, "w3-g64-iz", "fp16", rotation="none", iters=100, calib_samples=128, e2e=512, e2e_lr=0.003),
    Candidate(4.25, "w4-g32-sym-s6", "fp16", rotation="none", iters=100, calib_samples=128, e2e=512, e2e_lr=0.003),
    Candidate(2.5, "w2-g24-iz-s6", "fp16", rotation="none", iters=100, calib_samples=128, e2e=512, e2e_lr=0.003),
    # At 3.3 the gate kept all 16 windows at 3e-3 and the held-out KL was still falling: a 2x step.
    # At 4.25 with 6-bit scale codes 3e-3 overshot (8 of 16 windows rejected): a 3x smaller step.
    Candidate(3.30, "w3-g64-iz", "fp16", rotation="none", iters=100, calib_samples=128, e2e=512, e2e_lr=0.006),
    Candidate(4.25, "w4-g32-sym-s6", "fp16", rotation="none", iters=100, calib_samples=128, e2e=512, e2e_lr=0.001),
    # 6e-3 constant overshot (news KL 0.3114, worse than none); the same peak falling linearly to 0.
    Candidate(3.30, "w3-g64-iz", "fp16", rotation="none", iters=100, calib_samples=128, e2e=512, e2e_lr=0.006,
              e2e_decay="linear"),
    # Calibration source: half lee_background, half text the float model wrote itself (does the
    # code-text KL follow the calibration text?).
    Candidate(3.30, "w3-g64-iz", "fp16", rotation="none", iters=100, calib_samples=128, calib_source="mix"),
    # Learned rounding on non-uniform grids (LearnedTable): a fitted table and IQ4_NL's, in groups of
    # 72 (4.2227 bits/weight with the table; groups of 64 would pass 4.25 by the table's 256 bits).
    Candidate(4.25, "w4-g72-lut", "fp16", rotation="none", iters=100, calib_samples=128),
    Candidate(4.25, "w4-g72-nl", "fp16", rotation="none", iters=100, calib_samples=128),
    # Groups of 64 cost 4.25 bits/weight before the tables (210 x 256 bits, +0.0005): the least sensitive
    # MLP matrix of the 4 x 128 table at w4-g128 (layer 17's gate) in groups of 128 pays for them.
    Candidate(4.25, "w4-g64-lut", "fp16", rotation="none", iters=100, calib_samples=128,
              coarse=("model.layers.17.mlp.gate_proj", "w4-g128-lut")),
    Candidate(4.25, "w4-g64-nl", "fp16", rotation="none", iters=100, calib_samples=128,
              coarse=("model.layers.17.mlp.gate_proj", "w4-g128-nl")),
    # End-to-end distillation on a table format: the 4.25 recipe above, its signed IQ4_NL scales distilled
    # (the step left at RetrainConfig's default, as on w4-g64-sym).
    Candidate(4.25, "w4-g64-nl", "fp16", rotation="none", iters=100, calib_samples=128,
              coarse=("model.layers.17.mlp.gate_proj", "w4-g128-nl"), e2e=512),
    # The same blocks with the tied embedding/LM head quantized (whole-model accounting): the candidate
    # for a built-in 4.25 recipe on IQ4_NL blocks.
    Candidate(4.25, "w4-g64-nl", "w4-g96-iz", rotation="none", iters=100, calib_samples=128,
              coarse=("model.layers.17.mlp.gate_proj", "w4-g128-nl")),
    # The 3.3 bar's small groups with 6-bit scale codes, for a whole-model 3.25 recipe: groups of 48 in every
    # block linear (3.25) and the embedding/head in groups of 64 with 6-bit scale codes (3.203).
    Candidate(3.25, "w3-g48-iz-s6", "w3-g64-iz-s6", rotation="none", iters=100, calib_samples=128),
    # Allocation over format families (family_allocation.py: the measured 4 x 128 table widened by
    # predicted cells), rounded by learned rounding like the uniform candidates of each budget.
    Candidate(3.30, "alloc-3.3", "fp16", rotation="none", iters=100, calib_samples=128),
    Candidate(2.5, "alloc-2.5", "fp16", rotation="none", iters=100, calib_samples=128),
    Candidate(4.25, "alloc-4.25", "fp16", rotation="none", iters=100, calib_samples=128),
    Candidate(3.25, "alloc-3.25", "alloc", rotation="none", iters=100, calib_samples=128),
    # Vector codebooks (GPTVQ-style, uqcit.tensor.vq): 4 or 2 consecutive weights share one code into a
    # per-tensor codebook, rounded inside GPTQ's error feedback; against the scalar rungs above.
    Candidate(2.5, "w2-g64-vq4", "fp16", method="rtn", rotation="none"),
    Candidate(2.5, "w2-g64-vq4", "fp16", method="gptq", rotation="none", calib_samples=16),
    Candidate(3.30, "w3-g64-vq2", "fp16", method="gptq", rotation="none", calib_samples=16),
    Candidate(4.25, "w4-g72-vq2", "fp16", method="gptq", rotation="none", calib_samples=16),
    # 3 bits on a fitted table of 8 levels: absmax scales in groups of 54 cost what w3-g64-iz's fp16 scale
    # and 3-bit zero point cost (3.2965 vs 3.2969 bits/weight); no e2e, so it fits the 15-minute bar.
    Candidate(3.30, "w3-g54-lut", "fp16", rotation="none", iters=100, calib_samples=128),
    # Measured 0.3111, no better than w3-g64-iz (0.3084): at 3 bits the zero point is worth more than the
    # table. Smaller groups paid for by 6-bit scale codes instead, as at 4.25 and 2.5.
    # (Groups of 40 do not tile SmolLM2's weights, so learned rounding would skip every module.) Groups of
    # 36 with 6-bit scale codes in the MLPs (3.3125) and of 48 in attention (3.25): 3.2969 over the blocks.
    Candidate(3.30, "w3-g36-iz-s6", "fp16", rotation="none", iters=100, calib_samples=128,
              attention="w3-g48-iz-s6"),
    # Error feedback block by block (sequential GPTQ), and toward the float model's outputs (GPTAQ's
    # asymmetric calibration). The target is a least-squares fit of the float outputs from the quantized
    # inputs over 576-1536 input channels: 16 x 256 tokens may fit the calibration text's noise, so 8x
    # the tokens too, and then at the other two budgets on the ladder's one-shot formats.
    *[Candidate(budget, blocks, "fp16", method="gptq", rotation="none", calib_samples=n, sequential=True,
                asymmetric=asymmetric)
      for budget, blocks, n in ((3.30, "w3-g64-iz", 16), (3.30, "w3-g64-iz", 128), (4.25, "w4-g64-sym", 128),
                                (2.5, "w2-g48-iz", 128))
      for asymmetric in (False, True)],
    # Learned rounding onto the vector codebooks (LearnedVQ), against GPTQ on the same formats above.
    Candidate(2.5, "w2-g64-vq4", "fp16", rotation="none", iters=100, calib_samples=128),
    Candidate(3.30, "w3-g64-vq2", "fp16", rotation="none", iters=100, calib_samples=128),
    # The built-in allocation recipes, timed as they run from the CLI: the sensitivity table predicted from the
    # diagonal Fisher (no forward pass per cell), the knapsack over the format families, learned rounding.
    Candidate(3.30, "recipe", "fp16", recipe="alloc-signround-3.3-blocks"),
    Candidate(4.25, "recipe", "fp16", recipe="alloc-signround-4.25-blocks"),
    Candidate(2.5, "recipe", "fp16", recipe="alloc-signround-2.5-blocks"),
    Candidate(3.25, "recipe", "recipe", recipe="alloc-signround-3.25"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--windows", type=int, default=None, help="fewer windows (not the full protocol)")
    ap.add_argument("--name", default="quality_per_bit")
    ap.add_argument("--only", default=None, help="comma-separated candidate names to (re)run")
    ap.add_argument("--second-windows", type=int, default=8,
                    help="windows of the second held-out text (HumanEval's code; 0: skip)")
    ap.add_argument("--keep", default=None, help="keep the packages in this folder")
    ap.add_argument("--together", action="store_true",
                    help="evaluate all candidates at the end, in one pass over the reference")
    args = ap.parse_args()

    loaded = load_model(MODEL)
    ref, tok = loaded.model, loaded.tokenizer
    out_json = RESULTS / f"{args.name}.json"
    done = {r["method"] for r in json.loads(out_json.read_text())} if out_json.exists() else set()
    only = set(args.only.split(",")) if args.only else None
    todo = [c for c in CANDIDATES if (c.name in only if only else c.name not in done)]
    print("to measure:", [c.name for c in todo], flush=True)
    eval_cfg = EvalConfig(max_windows=args.windows)
    check_ids = calibration_batch(tok, n_samples=2, seq_len=128, seed=0)

    second_cfg = EvalConfig(corpus="humaneval", total_tokens=31 * 1024, max_windows=args.second_windows)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.keep or tmp)
        pending: list[dict] = []
        selftext: dict[int, SelfText] = {}
        for c in todo:
            if c.recipe:
                pending.append(_recipe_package(c, ref, tok, workdir))
                if not args.together or c is todo[-1]:
                    _score(args, pending, tok, ref, eval_cfg, second_cfg)
                    pending = []
                continue
            t0 = time.perf_counter()
            model, prefix = ref, ""
            if c.rotation != "none":
                rot = rotate_model(ref, RotationConfig(construction=c.rotation), check_ids=check_ids)
                model, prefix = rot.model, rot.config.method_name
            rotate_s = time.perf_counter() - t0
            levels = analyze_levels(model)
            blocks = {m.name for m in levels.quantizable() if m.kind != "embedding"}
            exact = {m.name: parse_format(c.embedding if m.name not in blocks else
                                          c.attention if c.attention and ".self_attn." in m.name else c.blocks)
                     for m in levels.quantizable()} if not c.blocks.startswith("alloc-") else _allocated(c, levels)
            if c.coarse:
                if c.coarse[0] not in blocks:
                    raise SystemExit(f"{c.name}: {c.coarse[0]} is not a block linear of {MODEL}")
                exact[c.coarse[0]] = parse_format(c.coarse[1])
            plan = BitPlan(default=None, exact=exact, name=c.name)
            t0 = time.perf_counter()
            q = quantize_model(model, levels, plan, QuantizeConfig(
                method=c.method, iters=c.iters, lr=c.lr, calib_samples=c.calib_samples, micro_batch=c.micro_batch,
                head_feedback=c.head_feedback, calib_source=c.calib_source, sequential=c.sequential,
                asymmetric=c.asymmetric),
                tokenizer=tok, rotation=prefix)
            quant_s = time.perf_counter() - t0
            e2e_log = None
            before = dataclasses.replace(c, e2e=0)
            if c.e2e and before.name not in done and before.name not in {p["method"] for p in pending}:
                # the model before distillation is the candidate without e2e: measured in the same run
                pending.append(_packaged(before, q, tok, levels, workdir, blocks, rotate_s, quant_s))
            if c.e2e:  # end to end: the fp16 scales distilled against the float model on its own text
                cfg = RetrainConfig(n_sequences=c.e2e, lr=c.e2e_lr or None, lr_decay=c.e2e_decay)
                if c.e2e not in selftext:  # the same seeded text for every candidate: generated once
                    selftext[c.e2e] = self_generate(ref, tok, n_sequences=cfg.n_sequences + cfg.heldout_sequences,
                                                    seq_len=cfg.seq_len, prompts=cfg.prompt_texts,
                                                    temperature=cfg.temperature, top_k=cfg.top_k,
                                                    batch=cfg.gen_batch, seed=cfg.seed)
                t1 = time.perf_counter()
                res = retrain(q.model, ref, tok, cfg, data=selftext[c.e2e], progress=True)
                q = res.apply_to(q)
                # the generation is counted for every candidate, as if each ran alone
                e2e_log = {"seconds": time.perf_counter() - t1 + res.data.seconds, "generate": res.data.seconds,
                           "lr": cfg.learning_rate, "lr_decay": cfg.lr_decay, "kept": res.kept, "rejected": res.rejected,
                           "s0": res.s0, "final_s": res.final_s, "trainable_values": res.trainable_values}
                quant_s += e2e_log["seconds"]
            pending.append(_packaged(c, q, tok, levels, workdir, blocks, rotate_s, quant_s, e2e=e2e_log))
            del q
            if not args.together or c is todo[-1]:
                # --together: one reference pass for all candidates (it is half of each evaluation)
                _score(args, pending, tok, ref, eval_cfg, second_cfg)
                pending = []
    print((RESULTS / f"{args.name}.md").read_text())


def _score(args, pending: list[dict], tok, ref, eval_cfg, second_cfg) -> None:
    """Score packaged candidates on news (full protocol) and on code, and merge their records."""
    if args.second_windows and pending:  # the packages on code: does calibration on news generalize?
        ev = evaluate_many({p["method"]: p["model"] for p in pending}, tok, second_cfg, reference=ref)
        for p in pending:
            e = ev[p["method"]]
            p["extra"]["second_text"] = {"corpus": "humaneval", "windows": e.windows, "kl": e.kl,
                                         "ppl": e.ppl, "top1": e.top1, "reference_ppl": ev["reference"].ppl}
    if pending:
        score_and_merge(args.name, pending, tok, ref, eval_cfg, model=MODEL)


def _recipe_package(c: Candidate, ref, tok, workdir: Path) -> dict:
    """Built-in recipe ``c.recipe`` run as ``uqcit compress`` runs it, up to quantization, then packaged."""
    from uqcit.pipeline import Session
    from uqcit.recipe import builtin_recipe

    recipe = builtin_recipe(c.recipe)
    session = Session(name=MODEL, reference=ref, tokenizer=tok, progress=True)
    session.run(recipe, skip=("eval",))
    q, levels = session.results["quantize"], session.results["levels"]
    blocks = {m.name for m in levels.quantizable() if m.kind != "embedding"}
    stage_s = dict(session.seconds)
    alloc = session.results.get("allocate")
    return _packaged(c, q, tok, levels, workdir, blocks, 0.0, sum(stage_s.values()), stages=stage_s,
                     plan=None if alloc is None else {"mix": alloc.format_counts(), "achieved_bpw": alloc.achieved_bpw,
                                                      "predicted_kl": alloc.predicted_kl})


def _allocated(c: Candidate, levels) -> dict:
    """The plan ``family_allocation.py`` wrote for ``c.blocks`` (``alloc-<budget>``), the embedding as ``c`` says."""
    whole = c.embedding == "alloc"  # the plan chose the tied matrix's format too
    path = plan_path(float(c.blocks.removeprefix("alloc-")), whole=whole)
    if not path.is_file():
        raise SystemExit(f"{c.name}: {path} is missing; run benchmarks/family_allocation.py first")
    plan = json.loads(path.read_text())["plan"]
    exact = {}
    for m in levels.quantizable():
        exact[m.name] = parse_format(plan[m.name] if m.kind != "embedding" or whole else c.embedding)
    return exact


def _packaged(c: Candidate, q, tok, levels, workdir: Path, blocks: set[str], rotate_s: float, quant_s: float,
              e2e: dict | None = None, **extra) -> dict:
    """``q`` exported and loaded back as candidate ``c``, with the peer accounting's bits/weight."""
    block_mods = [m for m in q.stored if m.name in blocks]
    bpw_blocks = (sum(m.stored_bits for m in block_mods) + q.rotation_bits) / sum(m.numel for m in block_mods)
    print(f"{c.name}: quantized in {quant_s:.0f} s, bpw_blocks {bpw_blocks:.4f}, bpw {q.bpw:.4f}", flush=True)
    cand = package_candidate(q, tok, levels, workdir / c.name, model=MODEL,
                             seconds={"rotate": rotate_s, "quantize": quant_s},
                             budget=c.budget, bpw_blocks=bpw_blocks, recipe=dataclasses.asdict(c),
                             accounting="peer" if c.embedding == "fp16" else "whole-model",
                             rounding=[dataclasses.asdict(r) for r in q.rounding], e2e=e2e, **extra)
    cand["method"] = c.name
    return cand


if __name__ == "__main__":
    main()
