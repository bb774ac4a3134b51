"""The G=i rotation engine (seed 002 §2.2.3): orthogonal complex structures that make weights
easier to quantize, folded into the network so that it computes the same function.

**The matrix that rotates the weights is G**, a real *complex structure*: G orthogonal with
Gᵀ = −G, hence G⁻¹ = Gᵀ = −G, G + G⁻¹ = 0 and G² = −I (the real form of multiplying by i).
Every such G is ``P J Pᵀ`` for some orthogonal P, with J the 90° rotation in the planes
(0,1), (2,3), ...; ``complex_structure(P)`` builds G from P and ``symplectic_basis(G)``
recovers a P from G (``uqcit.tensor.structures``). Three constructions (``RotationConfig.construction``):

- ``"hadamard"``: the randomized skew-Hadamard structure G = D·(C_m ⊗ H_b)·D/√((m−1)b) of
  ``structures.Rotation.hadamard``: entries 0 or ±1/√((m−1)b), as flat as a Hadamard matrix
  (which is what spreads an outlier channel over all channels), stored as n sign bits. Folded
  rotations use the flattest layout (largest m), online ones the cheapest to apply with m ≥ 8.
- ``"random"``: G = P J Pᵀ with P = QR of a seeded Gaussian. Where it is not folded it is
  stored as a dense float32 matrix.
- ``"optimized"``: G = R G₀ Rᵀ starting from the hadamard G₀, R learned by Riemannian
  gradient steps on the orthogonal group with the Cayley retraction (conjugation keeps G a
  complex structure exactly). What is minimized (weights only, no activations): the
  uniform-noise model of round-to-nearest error, Σ over quantization groups of
  ``group_size · range²`` (the RTN MSE of a group is ≈ Δ²/12 with Δ = range/(2^b−1), so one
  proxy serves every bit width), divided by the weights' energy, over rows sampled from every
  matrix the residual rotation touches. Only the residual structure is optimized; per-head
  structures use the hadamard construction.

The online rotation of the down_proj input always uses the hadamard structure, whatever the
construction: cheap to run, n bits to store. A width with no structure (odd
widths always) raises ``UnsupportedOrderError`` listing the nearest supported widths;
``RotationConfig(unsupported="random")`` falls back to a dense random structure instead, and
the result records every fallback.

How it is applied without changing the function (Llama family: llama, mistral, qwen2):
fusing each RMSNorm's scale into the linear layers that read it, then rotating the residual
stream by one G (embedding rows E ← E G; inputs of q/k/v/gate/up/lm_head W ← W G; outputs of
o_proj/down_proj W ← Gᵀ W, bias b ← b G), a per-head G between V and O (v_proj output rows and
o_proj input columns, the kv head shared by a GQA group), and an online rotation of the
down_proj input (its W ← W G_online, its input x ← x G_online at run time: ``RotatedGatedMLP``).
A tied LM head keeps its tie: the final norm becomes ``RotatedRMSNorm``, which applies its
scale in the unrotated basis (x ← ((x Gᵀ) ⊙ g) G, an online op on one d-vector per token);
``tied_head="untie"`` instead folds the scale into a separate head matrix (costs vocab×d
weights). Other families get an online input rotation on every Linear (a forward pre-hook;
see ``uqcit.runtime.online.apply_online_rotations``), with the construction's structure (random: dense, stored).
The folding and the optimizer are ``uqcit.stages.rotation_fold``.
The compressibility report before/after is ``uqcit.stages.compressibility.compressibility_report``.

>>> from uqcit.inputs.tiny import tiny_model
>>> model, _ = tiny_model("llama")
>>> res = rotate_model(model, RotationConfig(), progress=False)
>>> res.max_logit_diff < 1e-4, res.invariants.passed
(True, True)
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any, Literal

import torch
from torch import nn

from uqcit.core.config import StageConfig, StageSession, register_config, stage_handler
from uqcit.inputs.corpus import calibration_batch
from uqcit.stages.levels import analyze_levels
from uqcit.core.results import Result
from uqcit.runtime.modules import model_logits
from uqcit.runtime.online import (
    OnlineRotation,
    RotatedRMSNorm,
    _set_online_enabled,
    rotation_tensors_for_layer_dir,
)
from uqcit.stages.rotation_fold import (
    LLAMA_FAMILY,
    FoldContext,
    ModuleRotation,
    StructureInfo,
    derive_seed,
    rotate_generic,
    rotate_llama,
)
from uqcit.tensor.invariants import InvariantCheck, InvariantReport


# =============================================================================================
# config and result


@register_config
@dataclasses.dataclass(frozen=True)
class RotationConfig(StageConfig):
    """Which complex structure rotates the model, and where (see the module docstring)."""

    type_tag = "rotation"

    # hadamard: the flattest structure (spreads outliers most evenly), stored as n sign bits
    construction: Literal["hadamard", "random", "optimized", "none"] = "hadamard"
    seed: int = 0  # seeds the signs / Gaussians: same seed, same rotation
    residual: bool = True  # rotate the residual stream: fully folded, no run-time cost
    per_head_vo: bool = True  # per-head rotation between v_proj and o_proj: fully folded
    online_down_proj: bool = True  # rotate the down_proj input at run time: O(n(m+b)), n sign bits
    # keep: the embedding/head tie survives (final-norm scale applied online); untie: vocab×d weights more
    tied_head: Literal["keep", "untie"] = "keep"
    unsupported: Literal["error", "random"] = "error"  # a width with no structure: fail, or dense random
    optimize_steps: int = 100  # Cayley steps of "optimized"; ~1 s each for a 135M model on a CPU
    lr: float = 1.0  # Cayley step τ on the normalized gradient (‖Ω‖_F = 1); 3 oscillated on SmolLM2
    optimize_rows: int = 32  # rows sampled per matrix per step: a step stays around a second
    optimize_matrices: int = 32  # matrices sampled per step (the residual touches ~7 per block)
    group_size: int = 128  # quantization group of the optimizer's proxy: match the plan's
    check_samples: int = 2  # sequences of the end-to-end logit check when none are passed
    check_seq_len: int = 64  # tokens per check sequence: enough to compare logits, cheap to time

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(self.optimize_steps >= 0, "optimize_steps", "must be >= 0")
        self.check(self.lr > 0, "lr", "must be > 0")
        for name in ("optimize_rows", "optimize_matrices", "group_size", "check_samples", "check_seq_len"):
            self.check(getattr(self, name) >= 1, name, "must be >= 1")

    @property
    def method_name(self) -> str:
        return "" if self.construction == "none" else f"rot-{self.construction}"


@dataclasses.dataclass(repr=False)  # keep Result's short __repr__
class RotationResult(Result):
    """The rotated model and what rotating it did, cost and preserved."""

    model: nn.Module
    config: RotationConfig
    model_type: str | None
    family: str  # "llama" (folded residual stream) or "generic" (online per Linear)
    modules: list[ModuleRotation]
    structures: list[StructureInfo]
    invariants: InvariantReport
    max_logit_diff: float  # max |logits(rotated) − logits(original)| on the check sequences
    max_abs_logit: float  # max |logits(original)|, for scale
    check_tokens: int
    tied_head: str  # "keep" / "untie" / "not tied"
    extra_weights: int  # weights added by rotating (untied head), 0 otherwise
    fallbacks: list[str]
    optimize_history: list[tuple[int, float]]  # (step, proxy loss on the fixed evaluation rows)
    seconds: dict[str, float]
    forward_seconds: dict[str, float]  # original / rotated / rotated_online_off / online_ops (see _logit_check)

    @property
    def stored_bits(self) -> int:
        """Bits of every rotation that is not folded away (what rotation.safetensors holds)."""
        return sum(s.stored_bits for s in self.structures if not s.folded)

    @property
    def online_overhead(self) -> float | None:
        """Time of the online rotations alone over the forward time of the model without them
        (None when nothing runs online): the run-time cost rotating adds to a forward pass."""
        f = self.forward_seconds
        if "online_ops" not in f:
            return None
        return f["online_ops"] / f["rotated_online_off"]

    def rotation_tensors_for_layer_dir(self) -> dict[str, dict[str, torch.Tensor]]:
        """The online rotations' tensors by package layer folder (see the module function)."""
        return rotation_tensors_for_layer_dir(self.model)

    def summary(self) -> str:
        online = sum(m.online for m in self.modules)
        return (f"{self.config.construction} rotation of a {self.model_type} model ({self.family}): "
                f"{len(self.modules)} modules rotated, {online} with an online rotation, "
                f"{self.stored_bits / 8 / 1024:.1f} KiB of rotations stored"
                + (f", online ops {100 * self.online_overhead:.1f}% of a forward" if self.online_overhead else "")
                + f"; max |Δlogit| "
                f"{self.max_logit_diff:.2e}; invariants {'pass' if self.invariants.passed else 'FAIL'}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(), "model_type": self.model_type, "family": self.family,
            "stored_bits": self.stored_bits, "max_logit_diff": self.max_logit_diff,
            "max_abs_logit": self.max_abs_logit, "check_tokens": self.check_tokens,
            "tied_head": self.tied_head, "extra_weights": self.extra_weights,
            "fallbacks": list(self.fallbacks), "optimize_history": [list(h) for h in self.optimize_history],
            "seconds": dict(self.seconds), "forward_seconds": dict(self.forward_seconds),
            "online_overhead": self.online_overhead,
            "invariants": self.invariants.to_dict(),
            "structures": [dataclasses.asdict(s) for s in self.structures],
            "modules": [dataclasses.asdict(m) for m in self.modules],
        }

    def table_rows(self):
        return (("module", "input side", "output side", "norm fused", "online", "stored bits"),
                [(m.name, m.input_rotation, m.output_rotation, m.norm_fused, m.online, m.stored_bits)
                 for m in self.modules])

    def figure(self):
        """Each invariant's worst value against its tolerance (log scale)."""
        import plotly.graph_objects as go

        by_name: dict[str, InvariantCheck] = {}
        for c in self.invariants.checks:
            prev = by_name.get(c.name)
            if prev is None or c.value / c.tolerance > prev.value / prev.tolerance:
                by_name[c.name] = c
        names = list(by_name)
        fig = go.Figure()
        fig.add_bar(x=names, y=[max(by_name[n].value, 1e-18) for n in names], name="measured (worst)",
                    uid="rot-invariant-value", hovertext=[by_name[n].where for n in names])
        fig.add_scatter(x=names, y=[by_name[n].tolerance for n in names], mode="markers", name="tolerance",
                        marker_symbol="line-ew-open", marker_size=24, uid="rot-invariant-tol")
        fig.update_yaxes(type="log", title="value")
        fig.update_layout(title=f"G = i invariants ({self.config.construction}); end-to-end max |Δlogit| "
                                f"{self.max_logit_diff:.1e}", height=380)
        return fig


# =============================================================================================
# applying rotations without changing the function


def rotate_model(model: nn.Module, config: RotationConfig = RotationConfig(), *,
                 check_ids: torch.Tensor | None = None, progress: bool = True) -> RotationResult:
    """Rotate a copy of ``model`` by complex structures G so that, before quantization, it
    computes the same function, and measure that it does (the caller's model is untouched).

    ``check_ids`` ([batch, seq] token ids, e.g. ``uqcit.inputs.corpus.calibration_batch``) drive the end-to-end
    logit check; by default ``config.check_samples`` seeded random sequences.

    >>> from uqcit.inputs.tiny import tiny_model
    >>> res = rotate_model(tiny_model("qwen2")[0], RotationConfig(construction="random"), progress=False)
    >>> res.max_logit_diff < 1e-4
    True
    """
    t_all = time.perf_counter()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    out = copy.deepcopy(model)
    out.eval()
    seconds["copy"] = time.perf_counter() - t0
    model_type = getattr(getattr(out, "config", None), "model_type", None)
    ctx = FoldContext(config, progress)
    t0 = time.perf_counter()
    if config.construction == "none":
        family = "none"
    elif model_type in LLAMA_FAMILY:
        family = "llama"
        rotate_llama(out, ctx)
    else:
        family = "generic"
        rotate_generic(out, ctx)
    seconds["rotate"] = time.perf_counter() - t0 - ctx.optimize_seconds - ctx.check_seconds
    if ctx.optimize_seconds:
        seconds["optimize"] = ctx.optimize_seconds
    seconds["invariants"] = ctx.check_seconds
    invariants = InvariantReport(tuple(ctx.checks))

    t0 = time.perf_counter()
    ids = check_ids if check_ids is not None else _random_ids(out, config)
    diff, scale, fwd = _logit_check(model, out, ids)
    seconds["logit_check"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_all
    return RotationResult(
        model=out, config=config, model_type=model_type, family=family, modules=ctx.records,
        structures=ctx.structures, invariants=invariants, max_logit_diff=diff, max_abs_logit=scale,
        check_tokens=int(ids.numel()), tied_head=ctx.tied_head, extra_weights=ctx.extra_weights,
        fallbacks=ctx.fallbacks, optimize_history=ctx.history, seconds=seconds, forward_seconds=fwd)


# =============================================================================================
# the end-to-end check


def _random_ids(model: nn.Module, config: RotationConfig) -> torch.Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(derive_seed(config.seed, "check"))
    return torch.randint(0, vocab, (config.check_samples, config.check_seq_len), generator=gen)


@torch.inference_mode()
def _logit_check(original: nn.Module, rotated: nn.Module, ids: torch.Tensor,
                 reps: int = 3) -> tuple[float, float, dict[str, float]]:
    """Max |Δlogit| and forward times: original, rotated, rotated with its online rotations
    switched off, and the online rotations alone (each applied to ``ids.numel()`` rows of its
    width). Runs are interleaved and the minimum of ``reps`` kept, so that a busy machine
    disturbs the three model timings alike."""
    ref = model_logits(original, ids)
    rot = model_logits(rotated, ids)
    online = [m for m in rotated.modules() if isinstance(m, OnlineRotation)]
    online += [m.scale_rotation for m in rotated.modules() if isinstance(m, RotatedRMSNorm)]  # runs twice
    best = {"original": math.inf, "rotated": math.inf}
    if online:
        best["rotated_online_off"] = best["online_ops"] = math.inf
    for _ in range(reps):
        for key, model in (("original", original), ("rotated", rotated)):
            t0 = time.perf_counter()
            model_logits(model, ids)
            best[key] = min(best[key], time.perf_counter() - t0)
        if online:
            _set_online_enabled(rotated, False)
            try:
                t0 = time.perf_counter()
                model_logits(rotated, ids)
                best["rotated_online_off"] = min(best["rotated_online_off"], time.perf_counter() - t0)
            finally:
                _set_online_enabled(rotated, True)
            xs = [torch.randn(ids.numel(), m.n) for m in online]
            t0 = time.perf_counter()
            for m, x in zip(online, xs):
                m(x)
            best["online_ops"] = min(best["online_ops"], time.perf_counter() - t0)
    return float((rot - ref).abs().max()), float(ref.abs().max()), best


# --------------------------------------------------------------------------- pipeline stage

@stage_handler(RotationConfig)
def _rotation_stage(session: StageSession, cfg: RotationConfig) -> RotationResult:
    ids = calibration_batch(session.tokenizer, n_samples=cfg.check_samples, seq_len=cfg.check_seq_len,
                            seed=cfg.seed)
    result = rotate_model(session.reference, cfg, check_ids=ids, progress=session.progress)  # always the original
    adopt_rotation(session, result)
    return result


def adopt_rotation(session: StageSession, result: RotationResult) -> None:
    """Make ``session``'s later stages (levels, sensitivity, quantize...) work on ``result``'s rotated
    model; its ``reference`` stays the original. A levels analysis already run is redone on it."""
    session.results["rotation"] = result
    session.rotated = result.model
    if "levels" in session.results:  # names are unchanged, but an untied head changes tied_to
        session.results["levels"] = analyze_levels(session.rotated, session.results["levels"].config)
