"""Self-retraining (seed 000 §3): the compressed model learns from text the original model wrote.

1. **Self-generated text** (``self_generate``, in ``uqcit.inputs.selftext``). The original (uncompressed) model samples
   continuations of short, diverse prompts (``DEFAULT_PROMPTS``, or the user's). No external
   data set is read; the evaluation corpus is never seen. Sampling uses its own seeded
   ``torch.Generator``, so the same seed gives the same text. End-of-sequence tokens are not
   sampled, so every sequence has ``seq_len`` tokens of text.
2. **Distillation.** The compressed model is trained to match the original's next-token
   distribution at every position of that text: the loss is the mean per-token
   ``KL(P_original ‖ P_compressed)`` (the quantity the evaluation protocol reports). Only what
   the compression leaves trainable is updated (``RetrainConfig.mode``):

   - ``"scales"``: the fp16 group scales of ``QuantLinear`` modules, integer or lookup-table
     formats (``-lut``, ``-nl``), and the fp16 levels of fitted tables (``-lut``). Codes and zero
     points stay fixed (levels that cross are stored sorted, their codes renumbered to match).
     Each group's scale is trained as ``s0 · exp(g)`` (``g`` starts at 0, so one learning
     rate suits every layer; the sign of ``s0`` is kept); the forward pass always uses the
     fp16-rounded values (gradients pass straight through the rounding), and at the end the
     rounded values are written back into the fp16 buffers. The stored bits are therefore
     unchanged and the model trained on is exactly the model stored. Modules whose storage is
     shared (an LM head tied to a quantized embedding), fp16 pass-through and mixed formats are
     left alone and listed in ``skipped``.
   - ``"masked"``: the kept weights of pruned modules: any module with a ``weight`` parameter
     and a bool ``mask`` buffer of its shape (True = kept), e.g. ``uqcit.stages.prune.MaskedLinear``.
     Gradients of pruned entries are zeroed before each step and the weight is multiplied by the
     mask after it, so pruned entries stay exactly zero.
   - ``"lora"``: low-rank adapters ``x → base(x) + (α/r)·x Aᵀ Bᵀ`` on chosen linear modules
     (``nn.Linear``, ``QuantLinear``, ``Conv1D`` or a masked module); ``B`` starts at zero, so
     training starts from the compressed model. The adapters are kept, stored in fp16 (the
     forward uses fp16-rounded factors) and counted in ``extra_bits``.
3. **The stability gate** (§3.3). Training runs in update windows of ``steps_per_window``
   optimizer steps. After each window a held-out self-generated batch (never trained on)
   measures ``S(t)``: the distillation loss (``gate_metric="kl"``) or the NLL of the sampled
   tokens (``"nll"``). The window is kept only if ``S(t) ≤ S_thresh``, where
   ``S_thresh = best kept S × (1 + gate_epsilon)`` (``S(0)`` is the compressed model before any
   update), or the fixed ``gate_threshold``; otherwise the trainable tensors *and* the optimizer
   state are restored to their values before the window. With ``gate=False`` every window is
   kept, and ``S(t)`` is still measured and logged, which shows what the gate prevents.

Checkpoints (``RetrainConfig.checkpoint``) are safetensors files written atomically after every
window: the generated token ids, the kept trainable tensors, the optimizer state and the log.
Starting again with the same settings resumes after the last window written.

>>> from uqcit.inputs.tiny import tiny_model
>>> from uqcit.stages.levels import analyze_levels
>>> from uqcit.stages.plan import PlanConfig, build_plan
>>> from uqcit.stages.quantize import quantize_model
>>> model, tok = tiny_model("llama")
>>> levels = analyze_levels(model)
>>> q = quantize_model(model, levels, build_plan(levels, PlanConfig(preset="uniform", bits=3, group_size=32)),
...                    progress=False)
>>> cfg = RetrainConfig(n_sequences=8, heldout_sequences=4, seq_len=64, batch_size=4, steps_per_window=1)
>>> res = retrain(q.model, model, tok, cfg, progress=False)
>>> res.kept + res.rejected == res.windows
True
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from uqcit.core.config import StageConfig, StageSession, register_config, stage_handler
from uqcit.stages.quantize import QuantizeResult
from uqcit.core.record import ExportRecord
from uqcit.core.results import Result
from uqcit.runtime.modules import model_logits
from uqcit.runtime.trainable import (  # noqa: F401 (public here too)
    LoRALinear, Mode, ScaleTrainableLinear, Trainable, finish_trainable, fold_lora, has_mask, make_trainable,
)
from uqcit.inputs.selftext import DEFAULT_PROMPTS, SelfText, banned_tokens, self_generate  # noqa: F401 (public here too)
from uqcit.stages.retrain_checkpoint import load_checkpoint, restore, save_checkpoint

_MODE_LR = {"scales": 1e-3, "masked": 2e-5, "lora": 5e-4}  # common starting points, see RetrainConfig.lr


@register_config
@dataclasses.dataclass(frozen=True)
class RetrainConfig(StageConfig):
    """Self-retraining: what the original model writes, what is trained, and the gate."""

    type_tag = "retrain"

    mode: Mode = "scales"  # what is trainable: quantization scales, masked kept weights, or LoRA adapters
    # self-generated text
    n_sequences: int = 256  # training sequences the original model writes
    heldout_sequences: int = 16  # more sequences, never trained on: the gate's S(t) batch
    seq_len: int = 128  # tokens per sequence, prompt included
    prompts: tuple[str, ...] = ()  # empty: DEFAULT_PROMPTS; sequences cycle through them
    temperature: float = 1.0  # 1: the model's own distribution
    top_k: int = 50  # sample among the k likeliest tokens (0: all), to keep rare-token noise out
    gen_batch: int = 16  # sequences sampled together (all continue the same prompt)
    # training
    batch_size: int = 8  # sequences per optimizer step
    epochs: int = 1  # passes over the training sequences
    steps_per_window: int = 4  # optimizer steps between two gate checks
    lr: float | None = None  # Adam step size; None: 1e-3 scales (log-scale), 2e-5 masked weights, 5e-4 lora
    lr_decay: Literal["constant", "linear"] = "constant"  # linear: the step falls to 0 over the training steps
    max_grad_norm: float = 1.0  # clip the global gradient norm (0: off)
    modules: str | None = None  # regex (re.search) on module names to train; None: every eligible module
    lora_rank: int = 8  # lora: adapter rank r
    lora_alpha: float = 16.0  # lora: the adapter output is scaled by alpha / r
    # the stability gate
    gate: bool = True  # False: keep every window (S(t) is still measured)
    gate_metric: Literal["kl", "nll"] = "kl"  # S(t): held-out KL to the original, or NLL of its tokens
    gate_epsilon: float = 0.0  # S_thresh = best kept S × (1 + epsilon)
    gate_threshold: float | None = None  # a fixed S_thresh instead of the best-so-far rule
    checkpoint: str | None = None  # safetensors checkpoint written after every window; resumes
    seed: int = 0  # sampling, held-out split, data order and adapter initialization

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_sequences", "heldout_sequences", "gen_batch", "batch_size", "epochs", "steps_per_window",
                     "lora_rank"):
            self.check(getattr(self, name) >= 1, name, "must be >= 1")
        self.check(self.seq_len >= 2, "seq_len", "must be >= 2 (a prompt token and one to predict)")
        self.check(self.temperature > 0, "temperature", "must be > 0")
        self.check(self.top_k >= 0, "top_k", "must be >= 0 (0: no limit)")
        self.check(self.lr is None or self.lr > 0, "lr", "must be > 0 (None: the mode's default)")
        self.check(self.gate_epsilon >= 0, "gate_epsilon", "must be >= 0")
        self.check(self.lr_decay in ("constant", "linear"), "lr_decay", "must be 'constant' or 'linear'")
        self.check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0: off)")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else _MODE_LR[self.mode]

    @property
    def prompt_texts(self) -> tuple[str, ...]:
        return self.prompts or DEFAULT_PROMPTS


# --------------------------------------------------------------------------- trainable modules


def prepare_trainable(model: nn.Module, config: RetrainConfig) -> tuple[list[Trainable], list[tuple[str, str]]]:
    """Freeze ``model`` and make trainable what ``config.mode`` allows (wrapping modules in place).

    Returns the trainable modules and the skipped candidates with the reason. Raises when nothing
    is trainable, naming what the mode looks for (``uqcit.runtime.trainable.make_trainable``).
    """
    return make_trainable(model, config.mode, modules=config.modules, lora_rank=config.lora_rank,
                          lora_alpha=config.lora_alpha, seed=config.seed)


# --------------------------------------------------------------------------- the loop


@dataclasses.dataclass(frozen=True)
class WindowRecord:
    """One update window: its training loss, the gate's measurement and decision."""

    window: int
    steps: int  # optimizer steps taken so far, kept or not
    train_loss: float  # mean distillation KL over the window's batches
    s: float  # S(t) on the held-out batch after the window
    threshold: float  # S_thresh it was compared with
    kept: bool
    seconds: float


@dataclasses.dataclass(repr=False)
class RetrainResult(Result):
    """The retrained model, what was trained, and the log of kept and rejected windows."""

    model: nn.Module
    config: RetrainConfig
    trainables: list[Trainable]
    skipped: list[tuple[str, str]]
    data: SelfText
    s0: float  # S before any update
    log: list[WindowRecord]
    seconds: dict[str, float]  # generate, teacher, train

    @property
    def windows(self) -> int:
        return len(self.log)

    @property
    def kept(self) -> int:
        return sum(r.kept for r in self.log)

    @property
    def rejected(self) -> int:
        return sum(not r.kept for r in self.log)

    @property
    def final_s(self) -> float:
        """S of the returned model: the last kept window's (S(0) when none was kept)."""
        kept = [r.s for r in self.log if r.kept]
        return kept[-1] if kept else self.s0

    @property
    def extra_bits(self) -> int:
        return sum(t.extra_bits for t in self.trainables)

    @property
    def trainable_values(self) -> int:
        return sum(t.values for t in self.trainables)

    @property
    def train_tokens(self) -> int:
        return int(self.config.n_sequences * self.data.ids.shape[1])

    def apply_to(self, compressed):
        """``compressed`` (the ``QuantizeResult``/``PruneResult`` retrained) with the retrained model in
        it, ready for ``uqcit.package.export_package``.

        LoRA adapters on quantized layers are stored as those layers' low-rank ``Compensation``
        (fp16 factors ``a = (α/r)·B``, ``b = A``: the same computation), and their bits are added to
        the modules' stored bits, so ``bpw`` counts them. Adapters elsewhere cannot be stored.
        """
        if self.config.mode != "lora":
            return dataclasses.replace(compressed, model=self.model)
        if not isinstance(compressed, QuantizeResult):
            raise ValueError(f"LoRA adapters export only onto a QuantizeResult (quantized layers), not "
                             f"{type(compressed).__name__}; use mode 'scales' or 'masked' for this model")
        model = copy.deepcopy(self.model)
        extra = fold_lora(model)
        unknown = set(extra) - {m.name for m in compressed.modules}
        if unknown:
            raise ValueError(f"adapted modules {sorted(unknown)} are not modules of the {type(compressed).__name__}")
        modules = [dataclasses.replace(m, stored_bits=m.stored_bits + extra[m.name]) if m.name in extra else m
                   for m in compressed.modules]
        return dataclasses.replace(compressed, model=model, modules=modules)

    def export_record(self, compressed) -> ExportRecord:
        """The package record of ``compressed`` (the result retrained) with the retrained model in it
        (``apply_to``, then that result's ``export_record``)."""
        return self.apply_to(compressed).export_record()

    def summary(self) -> str:
        gate = "gate on" if self.config.gate else "gate OFF"
        return (f"retrain-{self.config.mode}: {self.trainable_values:,} values in {len(self.trainables)} modules, "
                f"{self.windows} windows ({gate}: {self.kept} kept, {self.rejected} rejected), "
                f"S {self.s0:.4f} → {self.final_s:.4f} ({self.config.gate_metric}), "
                f"{self.data.generated_tokens:,} self-generated tokens, {sum(self.seconds.values()):.0f} s")

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "trainables": [dataclasses.asdict(t) for t in self.trainables],
                "skipped": [list(s) for s in self.skipped], "data": self.data.to_dict(), "s0": self.s0,
                "final_s": self.final_s, "kept": self.kept, "rejected": self.rejected,
                "extra_bits": self.extra_bits, "log": [dataclasses.asdict(r) for r in self.log],
                "seconds": self.seconds}

    def table_rows(self):
        return (("window", "steps", "train KL", "S(t)", "S_thresh", "kept"),
                [(r.window, r.steps, r.train_loss, r.s, r.threshold, r.kept) for r in self.log])

    def figure(self):
        """S(t) after every window, kept (green) and rejected (red), with the threshold."""
        import plotly.graph_objects as go

        steps = [0] + [r.steps for r in self.log]
        fig = go.Figure()
        fig.add_scatter(x=steps, y=[self.s0] + [r.s for r in self.log], mode="lines", name="S(t)",
                        line_color="#999", uid="retrain-s")
        fig.add_scatter(x=[r.steps for r in self.log], y=[r.threshold for r in self.log], mode="lines",
                        name="S_thresh", line=dict(dash="dot", color="#4c78a8"), uid="retrain-thresh",
                        line_shape="hv")
        for kept, color, label in ((True, "#54a24b", "kept"), (False, "#e45756", "rejected (rolled back)")):
            rs = [r for r in self.log if r.kept == kept]
            fig.add_scatter(x=[r.steps for r in rs], y=[r.s for r in rs], mode="markers", name=label,
                            marker=dict(color=color, size=9, symbol="circle" if kept else "x"),
                            uid=f"retrain-{'kept' if kept else 'rejected'}")
        fig.update_layout(title=f"Stability gate: held-out S(t) ({self.config.gate_metric}) per update window"
                                + ("" if self.config.gate else " — gate disabled"),
                          xaxis_title="optimizer steps", yaxis_title=f"S(t) = held-out {self.config.gate_metric}",
                          height=380)
        return fig


def retrain(compressed: nn.Module, original: nn.Module, tokenizer, config: RetrainConfig = RetrainConfig(),
            *, data: SelfText | None = None, progress: bool = True) -> RetrainResult:
    """Retrain a copy of ``compressed`` on text ``original`` writes itself, behind the stability gate.

    ``compressed`` and ``original`` are not modified. ``data`` reuses earlier self-generated text
    (e.g. to compare two settings on the same text); it must hold ``n_sequences +
    heldout_sequences`` sequences. See the module docstring for the modes and the gate.
    """
    from tqdm.auto import tqdm

    times = {"generate": 0.0, "gate": 0.0, "train": 0.0}
    state = load_checkpoint(config, original) if config.checkpoint else None
    total = config.n_sequences + config.heldout_sequences
    if state is not None:
        data = state["data"]
    elif data is None:
        data = self_generate(original, tokenizer, n_sequences=total, seq_len=config.seq_len,
                             prompts=config.prompt_texts, temperature=config.temperature, top_k=config.top_k,
                             batch=config.gen_batch, seed=config.seed, progress=progress)
        times["generate"] = data.seconds
    if data.ids.shape[0] != total:
        raise ValueError(f"data has {data.ids.shape[0]} sequences; n_sequences + heldout_sequences = {total}")
    split = torch.randperm(total, generator=torch.Generator().manual_seed(config.seed + 1))
    train_ids, held_ids = data.ids[split[: config.n_sequences]], data.ids[split[config.n_sequences:]]

    student = copy.deepcopy(compressed)
    student.eval()  # no dropout: the gradient is of the model as it runs
    trainables, skipped = prepare_trainable(student, config)
    params = {n: p for n, p in student.named_parameters() if p.requires_grad}
    masks = _masks(student) if config.mode == "masked" else {}
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.learning_rate, weight_decay=0.0)
    original.eval()

    t0 = time.perf_counter()
    held_ref = _reference_logprobs(original, held_ids) if config.gate_metric == "kl" else None
    s0 = _gate_value(student, held_ids, held_ref)
    times["gate"] += time.perf_counter() - t0

    batches = _batch_order(config, train_ids.shape[0])
    n_windows = math.ceil(len(batches) / config.steps_per_window)
    log: list[WindowRecord] = []
    best = s0
    if state is not None:
        restore(params, optimizer, state)
        log = [WindowRecord(**r) for r in state["log"]]
        best, s0 = state["best"], state["s0"]
        times = {k: times[k] + state["seconds"].get(k, 0.0) for k in times}

    bar = tqdm(total=n_windows, initial=len(log), desc=f"retrain ({config.mode})", unit="window",
               disable=not progress)
    try:
        for w in range(len(log), n_windows):
            t0 = time.perf_counter()
            snapshot = ({n: p.detach().clone() for n, p in params.items()},
                        copy.deepcopy(optimizer.state_dict())) if config.gate else None
            losses = []
            for k, idx in enumerate(batches[w * config.steps_per_window:(w + 1) * config.steps_per_window]):
                step = w * config.steps_per_window + k  # steps taken so far, kept or rolled back
                for group in optimizer.param_groups:
                    group["lr"] = step_size(config, step, len(batches))
                losses.append(_train_step(student, original, train_ids[idx], params, masks, optimizer, config))
            t1 = time.perf_counter()
            s = _gate_value(student, held_ids, held_ref)
            times["gate"] += time.perf_counter() - t1
            threshold = config.gate_threshold if config.gate_threshold is not None else best * (1 + config.gate_epsilon)
            kept = (not config.gate) or s <= threshold
            if kept:
                best = min(best, s)
            else:  # roll back the window: trainable tensors and optimizer state
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(snapshot[0][n])
                optimizer.load_state_dict(snapshot[1])
            del snapshot
            steps = min((w + 1) * config.steps_per_window, len(batches))
            log.append(WindowRecord(w + 1, steps, sum(losses) / len(losses), s, threshold, kept,
                                    time.perf_counter() - t0))
            times["train"] += t1 - t0
            bar.update(1)
            bar.set_postfix(S=f"{s:.4f}", kept=sum(r.kept for r in log))
            if config.checkpoint:
                save_checkpoint(config, original, data, params, optimizer, log, best, s0, times)
    finally:
        bar.close()
    finish_trainable(student)
    return RetrainResult(student, config, trainables, skipped, data, s0, log,
                         {k: round(v, 3) for k, v in times.items()})


def step_size(config: RetrainConfig, step: int, total: int) -> float:
    """Adam's step size at optimizer step ``step`` (from 0) of ``total``: the configured one, or with
    ``lr_decay="linear"`` that one times ``1 - step / total`` (AutoRound's schedule).

    >>> step_size(RetrainConfig(lr=0.004, lr_decay="linear"), 48, 64)
    0.001
    """
    if config.lr_decay == "linear":
        return config.learning_rate * (1.0 - step / total)
    return config.learning_rate


def _batch_order(config: RetrainConfig, n: int) -> list[torch.Tensor]:
    """Training batches (index tensors), a seeded shuffle per epoch."""
    generator = torch.Generator().manual_seed(config.seed + 2)
    out = []
    for _ in range(config.epochs):
        perm = torch.randperm(n, generator=generator)
        out += list(perm.split(config.batch_size))
    return out


def _masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": m.mask for name, m in model.named_modules() if has_mask(m)
            and m.weight.requires_grad}


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model_logits(model, ids)[:, :-1]  # [b, seq-1, vocab]: the logits that predict a next token


@torch.no_grad()
def _reference_logprobs(original: nn.Module, ids: torch.Tensor, batch: int = 4) -> torch.Tensor:
    return torch.cat([F.log_softmax(_logits(original, ids[i:i + batch]), -1) for i in range(0, len(ids), batch)])


def distill_kl(logits: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Mean per-token ``KL(P_ref ‖ P)`` from student logits and reference log-probabilities."""
    logp = F.log_softmax(logits, -1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()


def _train_step(student, original, ids, params, masks, optimizer, config) -> float:
    with torch.no_grad():
        ref_logp = F.log_softmax(_logits(original, ids), -1)
    loss = distill_kl(_logits(student, ids), ref_logp)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for name, mask in masks.items():
        params[name].grad.mul_(mask)  # pruned entries get no gradient, so Adam never moves them
    if config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
    optimizer.step()
    if masks:
        with torch.no_grad():
            for name, mask in masks.items():
                params[name].mul_(mask)  # exact zeros where pruned, whatever the optimizer did
    return float(loss.detach())


@torch.no_grad()
def _gate_value(student: nn.Module, held: torch.Tensor, held_ref: torch.Tensor | None, batch: int = 4) -> float:
    """S(t) on the held-out batch: mean KL to the reference, or NLL of the sampled tokens."""
    total = 0.0
    for i in range(0, len(held), batch):
        logits = _logits(student, held[i:i + batch])
        if held_ref is None:
            value = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), held[i:i + batch, 1:].reshape(-1))
        else:
            value = distill_kl(logits, held_ref[i:i + batch])
        total += float(value) * logits.shape[0]
    return total / len(held)


# --------------------------------------------------------------------------- pipeline stage

@stage_handler(RetrainConfig)
def _retrain_stage(session: StageSession, cfg: RetrainConfig) -> RetrainResult:
    model = session.compressed
    if model is None:
        raise RuntimeError("stage 'retrain' needs a compressed model; run a 'quantize' or 'prune' stage first")
    return retrain(model, session.reference, session.tokenizer, cfg, progress=session.progress)  # the original teaches
