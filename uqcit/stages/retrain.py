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

   - ``"scales"``: the fp16 group scales of ``QuantLinear`` modules. Codes and zero points stay
     fixed. Each group's scale is trained as ``s0 · exp(g)`` (``g`` starts at 0, so one learning
     rate suits every layer); the forward pass always uses the fp16-rounded scale (gradients
     pass straight through the rounding), and at the end the rounded values are written back
     into the fp16 buffers. The stored bits are therefore unchanged and the model trained on is
     exactly the model stored. Modules whose storage is shared (an LM head tied to a quantized
     embedding), fp16 pass-through and mixed formats are left alone and listed in ``skipped``.
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
import hashlib
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from uqcit.core.config import StageConfig, register_config
from uqcit.stages.quantize import QuantizeResult
from uqcit.tensor.formats import FLOAT_BITS, parse_format
from uqcit.tensor.quant import quantize
from uqcit.core.results import Result
from uqcit.runtime.modules import Compensation, QuantEmbedding, QuantLinear, replace_module
from uqcit.inputs.selftext import DEFAULT_PROMPTS, SelfText, banned_tokens, self_generate  # noqa: F401 (public here too)

FILE_KIND = "uqcit-retrain-checkpoint"
FILE_VERSION = 1

Mode = Literal["scales", "masked", "lora"]
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
        positive = {"n_sequences": self.n_sequences, "heldout_sequences": self.heldout_sequences,
                    "gen_batch": self.gen_batch, "batch_size": self.batch_size, "epochs": self.epochs,
                    "steps_per_window": self.steps_per_window, "lora_rank": self.lora_rank}
        bad = {k: v for k, v in positive.items() if v < 1}
        if bad:
            raise ValueError(f"retrain settings must be >= 1: {bad}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (a prompt token and one to predict), got {self.seq_len}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no limit), got {self.top_k}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.gate_epsilon < 0:
            raise ValueError(f"gate_epsilon must be >= 0, got {self.gate_epsilon}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0: off), got {self.max_grad_norm}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else _MODE_LR[self.mode]

    @property
    def prompt_texts(self) -> tuple[str, ...]:
        return self.prompts or DEFAULT_PROMPTS


# --------------------------------------------------------------------------- trainable modules


class ScaleTrainableLinear(nn.Module):
    """A ``QuantLinear`` during scale training: fixed codes and zeros, trainable group scales.

    The weight is ``unit · fp16(s0 · exp(g))`` per group, where ``unit = code − zero`` (held as a
    float copy ``[groups, group_size]`` for speed) and ``g`` (``log_scale``, init 0) is trained;
    the fp16 rounding is in the forward pass (gradients pass straight through it), so the forward
    equals the stored module's. ``finish()`` writes the rounded scales back and returns the
    ``QuantLinear``.
    """

    def __init__(self, qlin: QuantLinear):
        super().__init__()
        fmt = qlin.fmt
        if fmt.bits == FLOAT_BITS or fmt.mixed:
            raise ValueError(f"scale training needs a plain integer format, got {fmt.name}")
        self.base = qlin
        numel, gs = math.prod(qlin.shape), fmt.group_size
        groups = math.ceil(numel / gs)
        s0 = qlin.scales.detach().float()
        with torch.no_grad():
            flat = qlin.dequantized(torch.float32).reshape(-1)
            padded = torch.zeros(groups * gs, device=flat.device)
            padded[:numel] = flat
            # code − zero is an integer: dividing out the fp16 scale recovers it exactly.
            self.register_buffer("unit", (padded.view(groups, gs) / s0.unsqueeze(1)).round(), persistent=False)
        self.register_buffer("s0", s0, persistent=False)
        self.log_scale = nn.Parameter(torch.zeros(groups, device=s0.device))
        self.numel = numel

    def scale(self) -> torch.Tensor:
        s = self.s0 * self.log_scale.exp()
        return s + (s.to(torch.float16).float() - s).detach()  # forward: fp16 value; backward: identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.unit * self.scale().unsqueeze(1)).reshape(-1)[: self.numel].view(self.base.shape)
        bias = None if self.base.bias is None else self.base.bias.to(x.dtype)
        return F.linear(x, w.to(x.dtype), bias)

    @torch.no_grad()
    def finish(self) -> QuantLinear:
        self.base.scales.copy_(self.scale().to(torch.float16))
        self.base.clear_cache()
        return self.base


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) · x Aᵀ Bᵀ``: a low-rank adapter on a frozen linear module.

    ``A`` [r, in] starts random (seeded), ``B`` [out, r] at zero, so the adapter starts as the
    identity change. The forward uses fp16-rounded factors (gradients pass straight through), so
    the adapter stored in fp16 by ``finish()`` computes exactly what was trained.
    """

    def __init__(self, base: nn.Module, in_features: int, out_features: int, rank: int, alpha: float,
                 generator: torch.Generator):
        super().__init__()
        self.base = base
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scaling = alpha / rank
        a = torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))

    @property
    def stored_bits(self) -> int:
        return 16 * self.rank * (self.in_features + self.out_features)

    def _factor(self, p: torch.Tensor) -> torch.Tensor:
        if p.dtype == torch.float16:
            return p
        return p + (p.to(torch.float16).float() - p).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self._factor(self.lora_A).to(x.dtype), self._factor(self.lora_B).to(x.dtype)
        return self.base(x) + F.linear(F.linear(x, a), b) * self.scaling

    @torch.no_grad()
    def finish(self) -> "LoRALinear":
        """Store the factors in fp16 (frozen)."""
        self.lora_A = nn.Parameter(self.lora_A.to(torch.float16), requires_grad=False)
        self.lora_B = nn.Parameter(self.lora_B.to(torch.float16), requires_grad=False)
        return self

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, stored_bits={self.stored_bits:,}"


def _has_mask(module: nn.Module) -> bool:
    w, m = getattr(module, "weight", None), module._buffers.get("mask") if hasattr(module, "_buffers") else None
    return (isinstance(w, nn.Parameter) and isinstance(m, torch.Tensor) and m.dtype == torch.bool
            and m.shape == w.shape)


def _linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a linear-like module, or None."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    if isinstance(module, (nn.Linear, QuantLinear)) or _has_mask(module):
        i, o = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if i is None and _has_mask(module) and module.weight.dim() == 2:
            o, i = module.weight.shape
        return (int(i), int(o)) if i is not None else None
    return None


def _output_names(model: nn.Module) -> set[str]:
    """Names of the LM head module(s): adapters are not put there by default."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n for n, m in model.named_modules() if head is not None and m is head}


@dataclasses.dataclass(frozen=True)
class Trainable:
    """What one module trains: its name, how many trainable values, and stored bits it adds."""

    name: str
    kind: str  # "scales", "masked" or "lora"
    values: int  # trainable numbers
    extra_bits: int  # bits added to what is stored (lora adapters)


def prepare_trainable(model: nn.Module, config: RetrainConfig) -> tuple[list[Trainable], list[tuple[str, str]]]:
    """Freeze ``model`` and make trainable what ``config.mode`` allows (wrapping modules in place).

    Returns the trainable modules and the skipped candidates with the reason. Raises when nothing
    is trainable, naming what the mode looks for.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    pattern = re.compile(config.modules) if config.modules else None
    chosen: list[Trainable] = []
    skipped: list[tuple[str, str]] = []
    named = list(model.named_modules())
    if config.mode == "scales":
        owners: dict[int, list[str]] = {}
        for name, m in named:
            if isinstance(m, (QuantLinear, QuantEmbedding)) and "scales" in m._buffers:
                owners.setdefault(m.scales.data_ptr(), []).append(name)
        for name, m in named:
            if not isinstance(m, QuantLinear) or (pattern and not pattern.search(name)):
                continue
            if m.fmt.bits == FLOAT_BITS or m.fmt.mixed:
                skipped.append((name, f"format {m.fmt.name}: only plain integer formats train scales"))
            elif len(owners.get(m.scales.data_ptr(), [])) > 1:
                skipped.append((name, f"scales shared with {[o for o in owners[m.scales.data_ptr()] if o != name]}"))
            else:
                wrapper = ScaleTrainableLinear(m)
                replace_module(model, name, wrapper)
                chosen.append(Trainable(name, "scales", wrapper.log_scale.numel(), 0))
        what = "QuantLinear modules with plain integer formats (quantize the model first)"
    elif config.mode == "masked":
        for name, m in named:
            if _has_mask(m) and not (pattern and not pattern.search(name)):
                with torch.no_grad():
                    m.weight.mul_(m.mask)
                m.weight.requires_grad_(True)
                chosen.append(Trainable(name, "masked", int(m.mask.sum()), 0))
        what = "modules with a weight parameter and a bool 'mask' buffer of its shape (prune the model first)"
    else:
        heads = _output_names(model)
        generator = torch.Generator().manual_seed(config.seed)
        for name, m in named:
            dims = _linear_dims(m)
            if dims is None or (pattern and not pattern.search(name)):
                continue
            if pattern is None and name in heads:
                skipped.append((name, "LM head (name it in 'modules' to adapt it)"))
                continue
            wrapper = LoRALinear(m, dims[0], dims[1], config.lora_rank, config.lora_alpha, generator)
            replace_module(model, name, wrapper)
            chosen.append(Trainable(name, "lora", config.lora_rank * (dims[0] + dims[1]), wrapper.stored_bits))
        what = "linear modules (nn.Linear, QuantLinear, Conv1D or masked)"
    if not chosen:
        scope = f" matching {config.modules!r}" if config.modules else ""
        raise ValueError(f"mode {config.mode!r} found nothing to train{scope}: it trains {what}")
    return chosen, skipped


def finish_trainable(model: nn.Module) -> None:
    """Put the stored form back: scales into their ``QuantLinear``, adapters into fp16."""
    for name, m in list(model.named_modules()):
        if isinstance(m, ScaleTrainableLinear):
            replace_module(model, name, m.finish())
        elif isinstance(m, LoRALinear):
            m.finish()
    for p in model.parameters():
        p.requires_grad_(False)


def fold_lora(model: nn.Module) -> dict[str, int]:
    """Replace every ``LoRALinear`` on a ``QuantLinear`` by that layer with the adapter as its
    low-rank ``Compensation`` (stored in packages). Returns the bits added per module name.

    Raises, naming the module, for an adapter on anything but a quantized layer, or on a layer that
    already has a compensation (the two corrections would have to be merged, which loses the
    exactness of each).
    """
    fp16 = parse_format("fp16")
    added: dict[str, int] = {}
    for name, m in list(model.named_modules()):
        if not isinstance(m, LoRALinear):
            continue
        base = m.base
        if not isinstance(base, QuantLinear):
            raise ValueError(f"{name}: a LoRA adapter on {type(base).__name__} cannot be stored in a package; "
                             "only adapters on quantized layers (QuantLinear) can")
        if getattr(base, "compensation", None) is not None:
            raise ValueError(f"{name}: the layer already has a compensation and an adapter is stored as one; "
                             "the two cannot be merged exactly: use mode 'scales' for this model")
        with torch.no_grad():
            a = m.lora_B.to(torch.float16).float() * m.scaling  # exact for a power-of-two alpha / r
            b = m.lora_A.to(torch.float16).float()
        comp = Compensation(a=quantize(a, fp16), b=quantize(b, fp16))
        base.set_compensation(comp)
        replace_module(model, name, base)
        added[name] = comp.stored_bits
    return added


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
        it, ready for ``package.export_package``.

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
    state = _load_checkpoint(config, original) if config.checkpoint else None
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
        _restore(params, optimizer, state)
        log, best, s0 = state["log"], state["best"], state["s0"]
        times = {k: times[k] + state["seconds"].get(k, 0.0) for k in times}

    bar = tqdm(total=n_windows, initial=len(log), desc=f"retrain ({config.mode})", unit="window",
               disable=not progress)
    try:
        for w in range(len(log), n_windows):
            t0 = time.perf_counter()
            snapshot = ({n: p.detach().clone() for n, p in params.items()},
                        copy.deepcopy(optimizer.state_dict())) if config.gate else None
            losses = []
            for idx in batches[w * config.steps_per_window:(w + 1) * config.steps_per_window]:
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
                _save_checkpoint(config, original, data, params, optimizer, log, best, s0, times)
    finally:
        bar.close()
    finish_trainable(student)
    return RetrainResult(student, config, trainables, skipped, data, s0, log,
                         {k: round(v, 3) for k, v in times.items()})


def _batch_order(config: RetrainConfig, n: int) -> list[torch.Tensor]:
    """Training batches (index tensors), a seeded shuffle per epoch."""
    generator = torch.Generator().manual_seed(config.seed + 2)
    out = []
    for _ in range(config.epochs):
        perm = torch.randperm(n, generator=generator)
        out += list(perm.split(config.batch_size))
    return out


def _masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": m.mask for name, m in model.named_modules() if _has_mask(m)
            and m.weight.requires_grad}


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # [b, seq-1, vocab]


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


# --------------------------------------------------------------------------- checkpoints


def _fingerprint(config: RetrainConfig, original: nn.Module) -> str:
    settings = {k: v for k, v in config.to_dict().items() if k != "checkpoint"}
    name = getattr(getattr(original, "config", None), "name_or_path", "") or type(original).__name__
    ident = [name, sum(p.numel() for p in original.parameters())]
    return hashlib.sha256(json.dumps([settings, ident], sort_keys=True).encode()).hexdigest()[:16]


def _save_checkpoint(config, original, data: SelfText, params, optimizer, log, best, s0, times) -> Path:
    from safetensors.torch import save_file

    path = Path(config.checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"data.ids": data.ids.contiguous(), "data.prompt_lengths": data.prompt_lengths,
               "data.prompt_index": data.prompt_index}
    tensors.update({f"param.{n}": p.detach().contiguous() for n, p in params.items()})
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for key, value in st.items():
            tensors[f"opt.{idx}.{key}"] = torch.as_tensor(value).contiguous()
    header = {"fingerprint": _fingerprint(config, original), "config": config.to_dict(),
              "param_groups": opt["param_groups"], "log": [dataclasses.asdict(r) for r in log],
              "best": best, "s0": s0, "seconds": times, "prompts": list(data.prompts),
              "generate_seconds": data.seconds}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"kind": FILE_KIND, "version": str(FILE_VERSION),
                                          "header": json.dumps(header)})
        os.replace(tmp, path)  # readers see the old checkpoint or the new one, never half of one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _load_checkpoint(config: RetrainConfig, original: nn.Module) -> dict[str, Any] | None:
    from safetensors import safe_open

    path = Path(config.checkpoint)
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("kind") != FILE_KIND or meta.get("version") != str(FILE_VERSION):
            raise ValueError(f"{path} is not a retrain checkpoint of version {FILE_VERSION} "
                             f"(kind {meta.get('kind')!r}, version {meta.get('version')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    head = json.loads(meta["header"])
    if head["fingerprint"] != _fingerprint(config, original):
        raise ValueError(f"checkpoint {path} was written with other settings or another model; delete it "
                         "or give another checkpoint path to start afresh")
    data = SelfText(tensors["data.ids"], tensors["data.prompt_lengths"], tensors["data.prompt_index"],
                    tuple(head["prompts"]), head["generate_seconds"])
    return {"data": data, "tensors": tensors, "param_groups": head["param_groups"], "best": head["best"],
            "s0": head["s0"], "seconds": head["seconds"], "log": [WindowRecord(**r) for r in head["log"]]}


def _restore(params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    tensors = state["tensors"]
    missing = [n for n in params if f"param.{n}" not in tensors]
    if missing:
        raise ValueError(f"checkpoint lacks trainable tensors {missing[:3]}...; delete it to start afresh")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
