"""Apply a bit plan: quantize each planned module and swap in a module that runs from its codes.

The caller's model is never modified: ``quantize_model`` works on a deep copy.
Tied weights (an LM head tied to the embedding) are quantized once and the two
modules share the same packed tensors, so they are stored and counted once.

Two rounding methods: ``rtn`` (round to nearest) and ``gptq`` (error-feedback rounding,
``uqcit.tensor.gptq``, against each Linear's input Hessian on calibration text). By default GPTQ is
one-shot: every Hessian comes from the float model in a single calibration pass. With
``sequential=True`` (the paper's way) the block stack runs one block at a time and each
block's Hessians are collected on the outputs of the blocks before it, already quantized
(``uqcit.inputs.replay.BlockReplay``); modules outside the stack (an untied LM head), and all modules
of models with several stacks, still get one-shot Hessians, and block inputs start from the
float embeddings. ``asymmetric=True`` (with ``sequential``) carries the float model's block
inputs too and rounds each block linear toward the float model's outputs rather than toward its
own float weights on the quantized inputs (``gptq.asymmetric_target``, after GPTAQ), group by
group inside each block in the order the block calls its linears (``BlockReplay.input_groups``). Embeddings
have no input Hessian and are always rounded to nearest (so is an LM head tied to one).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Literal

import torch

from uqcit.core.config import StageConfig, StageSession, register_config, stage_handler
from uqcit.core.names import block_of
from uqcit.inputs.calibration import InputStats, channel_importance, collect_input_stats
from uqcit.inputs.replay import BlockReplay
from uqcit.inputs.corpus import stage_calibration
from uqcit.inputs.selftext import self_generate
from uqcit.stages.clusters import apply_clusters_to_importance
from uqcit.tensor.formats import FLOAT_BITS, QuantFormat  # noqa: F401 (the doctests use it)
from uqcit.tensor.gptq import asymmetric_target, gptq_quantize, hessian_error
from uqcit.stages.signround import learnable_blocks, signround_blocks
from uqcit.stages.importance import activation_source
from uqcit.stages.plan import LEVEL_COLORS, BitPlan
from uqcit.tensor.quant import QuantizedTensor, dequantize, quant_error, quant_params, quantize, quantize_with
from uqcit.core.record import ExportRecord, module_records, weight_noise_profile
from uqcit.core.results import Result
from uqcit.runtime.modules import (
    QuantEmbedding, QuantLinear, block_stack, linear_weight, replace_module, weight_matrix,
)


@register_config
@dataclasses.dataclass(frozen=True)
class QuantizeConfig(StageConfig):
    """How planned modules are quantized."""

    type_tag = "quantize"

    # gptq: error-feedback rounding on calibration inputs; signround: rounding and clipping
    # learned block by block against the float block's outputs (uqcit.stages.signround)
    method: Literal["rtn", "gptq", "signround"] = "rtn"
    importance: Literal["magnitude", "activation"] = "magnitude"  # mixed formats keep the top |W| or |W|·‖x‖ high
    damp: float = 0.01  # gptq: λ = damp · mean diag(H), the paper's value
    act_order: bool = True  # gptq: columns with the largest inputs first; clearly better at 2-3 bits
    block_size: int = 128  # gptq: lazy-batch width; only speed depends on it
    # gptq: Hessians from the outputs of the blocks already quantized (the paper's way). Off by
    # default: on SmolLM2-135M (w3-g128, 16x256 tokens) it gave KL 0.956 vs 0.965 one-shot for
    # 2-3x the calibration time.
    sequential: bool = False
    # gptq, sequential: round toward the float model's outputs XWᵀ from the quantized inputs X̃
    # (GPTAQ's asymmetric calibration, uqcit.tensor.gptq.asymmetric_target), not toward X̃Wᵀ.
    asymmetric: bool = False
    calib_samples: int = 16  # calibration sequences (gptq, activation importance); 16x256 keeps GPTQ ~2 min on 2 cores
    calib_seq_len: int = 256  # tokens per calibration sequence (32x512 measured only ~4% lower KL)
    seed: int = 0  # calibration offsets and signround's micro-batch draws: same seed, same model
    # rtn and gptq: each group's range shrunk by the factor minimizing its squared error (gptq:
    # weighted by the input Hessian diagonal) instead of min/max. Same bits.
    clip_search: bool = False
    iters: int = 100  # signround: signed-gradient steps per block
    lr: float = 0.0  # signround: first step size (decays linearly to 0); 0 means 1/iters
    clip_min: float = 0.5  # signround: smallest learned clipping factor of a group's range
    micro_batch: int = 8  # signround: calibration sequences per step
    # gptq and signround: an embedding tied to the LM head is rounded with error feedback against
    # the head's inputs (the final hidden states; with signround or sequential gptq those of the
    # model with its blocks quantized, with one-shot gptq the float model's): the head's logits,
    # not the lookup, carry most of a tied matrix's error. Off: round to nearest.
    head_feedback: bool = False
    # Where calibration text comes from: lee_background after the evaluation span ("corpus"),
    # text the float model samples itself from short prompts ("self": no domain of its own), or
    # half of each ("mix"). A given ``calibration`` batch overrides it.
    calib_source: Literal["corpus", "self", "mix"] = "corpus"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(self.damp >= 0, "damp", "must be >= 0")
        self.check(not self.asymmetric or (self.method == "gptq" and self.sequential), "asymmetric",
                   "needs method='gptq' with sequential=True: set both, or asymmetric=False")
        self.check(self.block_size >= 1, "block_size", "must be >= 1")
        self.check(self.calib_samples >= 1, "calib_samples", "must be >= 1")
        self.check(self.calib_seq_len >= 1, "calib_seq_len", "must be >= 1")
        self.check(self.iters >= 0, "iters", "must be >= 0")
        self.check(self.lr >= 0, "lr", "must be >= 0 (0: 1/iters)")
        self.check(0 < self.clip_min <= 1, "clip_min", "must be in (0, 1]")
        self.check(self.micro_batch >= 1, "micro_batch", "must be >= 1")
        self.check(self.calib_source in ("corpus", "self", "mix"), "calib_source",
                   "must be 'corpus', 'self' or 'mix'")


@dataclasses.dataclass(frozen=True)
class ModuleQuant:
    """What quantizing one module stored and cost."""

    name: str
    level: int
    kind: str
    shape: tuple[int, int]
    numel: int
    format: str
    stored_bits: int
    rel_error: float  # ‖W − Ŵ‖ / ‖W‖
    sqnr_db: float
    seconds: float
    tied_to: str | None = None
    method: str = "rtn"  # how this module was rounded: "rtn" or "gptq"
    out_error: float | None = None  # ‖X(W − Ŵ)ᵀ‖ / ‖XWᵀ‖ on calibration inputs (gptq; asymmetric: W' for W)

    @property
    def bpw(self) -> float:
        return self.stored_bits / self.numel


@dataclasses.dataclass(repr=False)
class QuantizeResult(Result):
    """The compressed model and, per module, the bits it stores and the error it made."""

    model: torch.nn.Module
    modules: list[ModuleQuant]
    plan: BitPlan
    seconds: float
    method: str = "rtn"  # QuantizeConfig.method
    stage_seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # calibration, quantize
    sequential: bool = False  # gptq ran block by block (else one-shot, from the float model)
    asymmetric: bool = False  # ... toward the float model's outputs (QuantizeConfig.asymmetric)
    clustered: int = 0  # mixed-format modules whose high-precision selection followed GHZ clusters
    rotation: str = ""  # the rotation the model went through first, e.g. "rot-hadamard" ("" none)
    rotation_bits: int = 0  # bits of the online rotations the model runs (rotation.safetensors)
    rounding: list = dataclasses.field(default_factory=list)  # signround: a BlockRounding per block

    @property
    def method_name(self) -> str:
        """The plan's name with the rounding method in it, e.g. ``gptq-w3-g128`` for ``rtn-w3-g128``."""
        name = self.plan.name
        if name.startswith("alloc-"):  # method names of docs/evaluation.md: alloc-rtn-3.25 / alloc-gptq-3.25
            name = f"alloc-{self.method}-{name[len('alloc-'):]}"
        elif self.method != "rtn":
            name = self.method + name[3:] if name.startswith("rtn-") else f"{name}-{self.method}"
        name = f"clusters-{name}" if self.clustered else name
        return f"{self.rotation}-{name}" if self.rotation else name

    @property
    def stored(self) -> list[ModuleQuant]:
        """Modules whose bits are stored (tied duplicates excluded)."""
        return [m for m in self.modules if m.tied_to is None]

    @property
    def weight_count(self) -> int:
        return sum(m.numel for m in self.stored)

    @property
    def stored_bits(self) -> int:
        return sum(m.stored_bits for m in self.stored)

    @property
    def bpw(self) -> float:
        """Stored bits per weight: codes, scales, masks... plus the online rotations (docs/evaluation.md)."""
        return (self.stored_bits + self.rotation_bits) / max(self.weight_count, 1)

    def export_record(self) -> ExportRecord:
        """What ``uqcit.package.export_package`` writes for this model: figures, plan, weight noise."""
        modules = module_records(self.modules)
        return ExportRecord(model=self.model, method=self.method_name, bpw=self.bpw,
                            stored_bits=self.stored_bits, weight_count=self.weight_count, modules=modules,
                            plan=self.plan.to_dict(), noise_profile=weight_noise_profile(modules))

    def summary(self) -> str:
        return (f"{self.method_name}: {len(self.stored)} modules quantized ({self.method}), {self.bpw:.3f} "
                f"bits/weight stored, {self.stored_bits / 8 / 2**20:.2f} MiB of codes, {self.seconds:.1f} s")

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(),
            "bpw": self.bpw,
            "stored_bits": self.stored_bits,
            "rotation": self.rotation,
            "rotation_bits": self.rotation_bits,
            "weight_count": self.weight_count,
            "seconds": self.seconds,
            "method": self.method,
            "stage_seconds": self.stage_seconds,
            "sequential": self.sequential,
            "asymmetric": self.asymmetric,
            "modules": [dataclasses.asdict(m) for m in self.modules],
            "rounding": [dataclasses.asdict(r) for r in self.rounding],
        }

    def table_rows(self):
        return (("module", "level", "format", "bits/weight", "rel. error", "SQNR dB"),
                [(m.name, m.level, m.format, m.bpw, m.rel_error, m.sqnr_db) for m in self.stored])

    def figure(self):
        """Relative quantization error per module, coloured by level."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for lvl in sorted({m.level for m in self.stored}):
            ms = [m for m in self.stored if m.level == lvl]
            fig.add_bar(x=[m.name for m in ms], y=[m.rel_error for m in ms], name=f"L{lvl}",
                        marker_color=LEVEL_COLORS.get(lvl), uid=f"quant-L{lvl}",
                        hovertext=[f"{m.name}<br>{m.format}<br>{m.bpw:.3f} bits/weight" for m in ms],
                        hoverinfo="text+y")
        fig.update_layout(title=f"Relative weight error ‖W−Ŵ‖/‖W‖ — {self.bpw:.3f} bits/weight",
                          xaxis_showticklabels=False, yaxis_title="relative error", height=380)
        return fig


def quantize_model(model: torch.nn.Module, levels, plan: BitPlan,
                   config: QuantizeConfig = QuantizeConfig(), *, tokenizer=None,
                   calibration: torch.Tensor | None = None, clusters=None, rotation: str = "",
                   progress: bool = True) -> QuantizeResult:
    """Quantize a copy of ``model`` per ``plan``; modules the plan leaves at ``None`` stay float.

    ``levels`` is the ``LevelsResult`` of ``model`` (it names the weight-bearing modules).
    ``method="gptq"`` and ``importance="activation"`` (with mixed formats in the plan) need
    calibration text: ``calibration`` (``LongTensor [n, seq]``) or a ``tokenizer`` to draw
    ``uqcit.inputs.corpus.calibration_batch`` with the config's samples, length and seed.

    ``clusters`` (a ``ClustersResult``) makes the rows of each GHZ cluster share their
    precision in mixed formats: the high-precision selection takes a cluster's column for all
    its rows at once (``clusters.apply_clusters_to_importance``). Bits stay those of the format;
    whole-module formats already give every row one precision, so only mixed formats change.

    ``rotation`` names the rotation ``model`` went through (``RotationConfig.method_name``) for
    the method name; the bits of online rotations found in the model are counted either way.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    out = copy.deepcopy(model)
    out.eval()
    named = dict(out.named_modules())
    entries = [m for m in levels.modules if m.tied_to is None and plan.format_for(m.name) is not None]
    plan_names = {e.name for e in entries}
    done: dict[str, ModuleQuant] = {}
    qtensors: dict[str, QuantizedTensor] = {}
    seconds = {"calibration": 0.0, "quantize": 0.0}

    gptq_names = {e.name for e in entries if config.method == "gptq" and e.kind != "embedding"
                  and plan.format_for(e.name).bits != FLOAT_BITS}
    act_sources = {e.name: activation_source(levels, e.name) for e in entries
                   if config.importance == "activation" and plan.format_for(e.name).mixed}
    stack_name, block_index = _block_stack(out, levels, gptq_names) if config.sequential else (None, {})
    cluster_rows = {} if clusters is None else {
        m.name: m.clusters for m in clusters.modules
        if m.clusters and m.name in plan_names and plan.format_for(m.name).mixed}

    def quantize_one(entry, hessian: torch.Tensor | None, learned: QuantizedTensor | None = None,
                     cross: torch.Tensor | None = None) -> None:
        t0 = time.perf_counter()
        fmt, module = plan.format_for(entry.name), named[entry.name]
        weight = weight_matrix(module)
        if learned is not None:  # rounding learned by signround_blocks
            finish(entry, module, weight, learned, "signround", None, t0)
            return
        importance = None
        if entry.name in act_sources:
            importance = channel_importance(stats[act_sources[entry.name]], weight)
        if entry.name in cluster_rows:
            base = weight.abs() if importance is None else importance
            importance = apply_clusters_to_importance(base, cluster_rows[entry.name])
        q, method, out_error = round_weight(weight, fmt, config, hessian=hessian, importance=importance,
                                            cross=cross)
        finish(entry, module, weight, q, method, out_error, t0)

    def finish(entry, module, weight, q: QuantizedTensor, method: str, out_error, t0: float) -> None:
        replace_module(out, entry.name, runtime_module(module, q))
        qtensors[entry.name] = q
        err = quant_error(weight, q)
        done[entry.name] = ModuleQuant(entry.name, entry.level, entry.kind, tuple(q.shape), q.numel,
                                       q.fmt.name, q.stored_bits, err["rel_fro"], err["sqnr_db"],
                                       time.perf_counter() - t0, method=method, out_error=out_error)
        seconds["quantize"] += time.perf_counter() - t0

    batches: list[torch.Tensor] = []

    def calibration_ids(what: str) -> torch.Tensor:
        """The one calibration batch of this run (self-generated text is sampled once)."""
        if not batches:
            batches.append(_calibration(model, tokenizer, calibration, config, what, progress))
        return batches[0]

    # Calibration statistics from the float copy: activation norms, and the Hessians of the GPTQ
    # modules (one-shot), or of those outside the block stack (sequential; the rest come below).
    stats: dict[str, InputStats] = {}
    replay = None
    if gptq_names or act_sources:
        t0 = time.perf_counter()
        batch = calibration_ids(f"quantize with method={config.method!r}, importance={config.importance!r}")
        want = {n: False for n in act_sources.values()}
        want.update({n: True for n in gptq_names if n not in block_index})
        if stack_name is None:
            stats = collect_input_stats(out, batch, sorted(want), hessian=bool(gptq_names), progress=progress)
        else:
            replay = BlockReplay(out, out.get_submodule(stack_name), batch, capture=want,
                                 floats=config.asymmetric, progress=progress)
            stats = dict(replay.captured)
        seconds["calibration"] += time.perf_counter() - t0

    by_name = {e.name: e for e in entries}
    if replay is not None:
        # Sequential GPTQ: each block's Hessians come from the outputs of the blocks before it,
        # already quantized, so every layer compensates the error that reaches it. Asymmetric
        # targets are fitted group by group inside the block too (q/k/v, then o on the rounded
        # q/k/v, ...): fitted all at once, o and down would undo again the input error that q/k/v
        # and gate/up already undo (on SmolLM2 that overcorrection made it 4-5x worse; docs/mechanisms.md).
        last = max(block_index.values())
        for b in tqdm(range(last + 1), desc="gptq blocks", unit="block", disable=not progress):
            names = [e.name for e in entries if block_index.get(e.name) == b]
            if not names:
                groups = []
            elif config.asymmetric:
                groups = replay.input_groups(b, names)
            else:
                groups = [names]
            originals: dict[str, torch.nn.Module] = {}  # the float modules of the block's rounded groups
            for g, group in enumerate(groups):
                t0 = time.perf_counter()
                block_stats = replay.collect(b, group, floats_from=originals, last=g == len(groups) - 1)
                seconds["calibration"] += time.perf_counter() - t0
                for n in group:
                    st = block_stats.pop(n)
                    originals[n] = out.get_submodule(n)
                    quantize_one(by_name[n], st.hessian, cross=st.cross)
            if b < last:
                t0 = time.perf_counter()
                replay.advance(b)
                seconds["calibration"] += time.perf_counter() - t0
        del replay  # the stored block inputs
    rounding = []
    learned_blocks = learnable_blocks(out, levels, plan) if config.method == "signround" else None
    if learned_blocks:
        # Learned rounding: the block stack's planned linears, block by block (uqcit.stages.signround).
        t0 = time.perf_counter()
        batch = calibration_ids("quantize with method='signround'")
        stack, blocks = learned_blocks
        learned, rounding = signround_blocks(out, stack, blocks, batch, iters=config.iters, lr=config.lr,
                                             clip_min=config.clip_min, micro_batch=config.micro_batch,
                                             seed=config.seed, progress=progress)
        seconds["signround"] = time.perf_counter() - t0
        for n, q in learned.items():
            quantize_one(by_name[n], None, q)
    head_stats = {}
    head_of = feedback_heads(levels, plan, config)
    if head_of:
        t0 = time.perf_counter()
        batch = calibration_ids("quantize with head_feedback=True")
        # On signround's micro-batches when it ran: the streamed job reads these inputs off its
        # stream of block inputs, grouped so, and the Hessian's sums then add up alike.
        grouping = {"micro_batch": config.micro_batch} if learned_blocks else {}
        head_stats = collect_input_stats(out, batch, sorted(set(head_of.values())), progress=progress, **grouping)
        seconds["calibration"] += time.perf_counter() - t0
    rest = [e for e in entries if e.name not in done]
    for entry in tqdm(rest, desc="quantize", unit="module", disable=not progress or not rest):
        hessian = None
        if entry.name in head_of:
            hessian = head_stats[head_of[entry.name]].hessian
        elif entry.name in gptq_names:
            hessian = stats[entry.name].hessian
            if entry.name not in act_sources.values():
                del stats[entry.name]  # its Hessian is no longer needed
        quantize_one(entry, hessian)

    records = [done[e.name] for e in entries]
    for entry in levels.modules:
        if entry.tied_to is None or entry.tied_to not in qtensors:
            continue
        module = named[entry.name]
        q = qtensors[entry.tied_to]
        bias = getattr(module, "bias", None)
        replace_module(out, entry.name, QuantLinear(q, None if bias is None else bias.detach().clone()))
        records.append(ModuleQuant(entry.name, entry.level, entry.kind, tuple(q.shape), q.numel,
                                   q.fmt.name, 0, 0.0, float("inf"), 0.0, tied_to=entry.tied_to))
    if not (gptq_names or act_sources):
        del seconds["calibration"]
    return QuantizeResult(out, records, plan, time.perf_counter() - t_start, method=config.method,
                          stage_seconds=seconds, sequential=stack_name is not None,
                          asymmetric=config.asymmetric and stack_name is not None,
                          clustered=len(cluster_rows), rotation=rotation,
                          rotation_bits=_online_rotation_bits(out), rounding=rounding)


def _calibration(model, tokenizer, calibration, config: QuantizeConfig, what: str,
                 progress: bool) -> torch.Tensor:
    """The calibration batch ``config.calib_source`` asks for (``calibration`` when given)."""
    if calibration is not None or config.calib_source == "corpus":
        return stage_calibration(config, tokenizer, calibration, what=what)
    if tokenizer is None:
        raise ValueError(f"{what} with calib_source={config.calib_source!r} needs the tokenizer: "
                         "pass tokenizer=...")
    n_self = config.calib_samples if config.calib_source == "self" else (config.calib_samples + 1) // 2
    # Two sequences per prompt: calibration text should cover many prompts, not many samples of one.
    text = self_generate(model, tokenizer, n_sequences=n_self, seq_len=config.calib_seq_len,
                         batch=2, seed=config.seed, progress=progress).ids
    if n_self == config.calib_samples:
        return text
    corpus = stage_calibration(dataclasses.replace(config, calib_samples=config.calib_samples - n_self),
                               tokenizer, None, what=what)
    return torch.cat([corpus, text])


def feedback_heads(levels, plan, config: QuantizeConfig) -> dict[str, str]:
    """The planned integer-format embeddings ``config`` rounds against the inputs of the LM head
    tied to them (``head_feedback`` with ``gptq`` or ``signround``): embedding name -> head name.
    Those inputs are the final norm's outputs on the model with the modules rounded before the
    embedding (``quantize_model``; the streamed job reads them off its stream)."""
    if not config.head_feedback or config.method == "rtn":
        return {}
    heads = {}
    for m in levels.modules:
        fmt = plan.format_for(m.tied_to) if m.tied_to is not None else None
        if fmt is not None and fmt.bits != FLOAT_BITS and m.kind != "embedding":
            heads[m.tied_to] = m.name
    return heads


def _online_rotation_bits(model: torch.nn.Module) -> int:
    """Bits of the online rotations ``model`` runs: what the package's rotation files store."""
    from uqcit.runtime.online import rotation_tensors_for_layer_dir

    return sum(8 * t.numel() * t.element_size()
               for layer in rotation_tensors_for_layer_dir(model).values() for t in layer.values())


def _block_stack(model: torch.nn.Module, levels, names: set[str]) -> tuple[str | None, dict[str, int]]:
    """The block stack (dotted name of its ``ModuleList``) holding the GPTQ modules inside blocks,
    and each such module's block index. ``(None, {})`` when they span several stacks (e.g. an
    encoder and a decoder): those models get one-shot GPTQ."""
    pattern = levels.ruleset.block_pattern
    found = block_stack(model, names, pattern)
    if found is None:
        return None, {}
    return found[0], {n: block_of(n, pattern) for n in names if block_of(n, pattern) is not None}


def round_weight(weight: torch.Tensor, fmt, config: QuantizeConfig, *, hessian: torch.Tensor | None = None,
                 importance: torch.Tensor | None = None,
                 cross: torch.Tensor | None = None) -> tuple[QuantizedTensor, str, float | None]:
    """One weight rounded as ``quantize_model`` rounds it: GPTQ when an input Hessian is given,
    else to nearest (on a searched grid with ``config.clip_search``). Returns the tensor, the
    method (``"gptq"`` or ``"rtn"``) and, for GPTQ, the output error on the Hessian. With
    ``cross`` (the float inputs times these, ``InputStats.cross``) GPTQ rounds the asymmetric
    target ``W'`` instead of ``weight`` and the error is measured against ``W'``.

    >>> q, method, err = round_weight(torch.randn(8, 64), QuantFormat(bits=4, group_size=32), QuantizeConfig())
    >>> method, err, q.stored_bits == q.fmt.bits_for(8 * 64)
    ('rtn', None, True)
    """
    if hessian is not None:
        if cross is not None:
            weight = asymmetric_target(weight, hessian, cross, damp=config.damp)
        q = gptq_quantize(weight, hessian, fmt, damp=config.damp, act_order=config.act_order,
                          block_size=config.block_size, importance=importance, grid_search=config.clip_search)
        return q, "gptq", hessian_error(weight, dequantize(q), hessian)
    if config.clip_search and fmt.bits != FLOAT_BITS:
        return quantize_with(weight, quant_params(weight, fmt, importance, search=True)), "rtn", None
    return quantize(weight, fmt, importance), "rtn", None


def runtime_module(module: torch.nn.Module, q: QuantizedTensor) -> torch.nn.Module:
    """The module that runs from ``q`` in place of ``module``."""
    if isinstance(module, torch.nn.Embedding):
        return QuantEmbedding(q, padding_idx=module.padding_idx)
    bias = linear_weight(module)[1]
    return QuantLinear(q, None if bias is None else bias.clone())


# --------------------------------------------------------------------------- pipeline stage

@stage_handler(QuantizeConfig)
def _quantize_stage(session: StageSession, cfg: QuantizeConfig) -> QuantizeResult:
    levels = session.require("levels")
    if session.plan is None:
        raise RuntimeError("stage 'quantize' needs a bit plan; run a 'plan' stage first")
    rotation = session.results.get("rotation")
    return quantize_model(session.working, levels, session.plan, cfg, tokenizer=session.tokenizer,
                          clusters=session.results.get("clusters"),
                          rotation=rotation.config.method_name if rotation is not None else "",
                          progress=session.progress)
