"""How ``rotate_model`` folds complex structures into a network without changing its function.

Llama family (``LLAMA_FAMILY``): RMSNorm scales fused into the linear layers that read them,
one residual structure, per-head structures between V and O, an online rotation of the
down_proj input, and the tied-head choices (``rotate_llama``). Other families: an online
input rotation on every Linear (``rotate_generic``). The ``"optimized"`` construction learns
the residual structure by Cayley steps on the orthogonal group (``_optimize_residual``).
``FoldContext`` keeps the records, structures and invariant checks of one call. The stage
itself (config, result, end-to-end check) is ``uqcit.stages.rotation``.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch
from torch import nn

from uqcit.core.config import StageConfig
from uqcit.runtime.modules import replace_module
from uqcit.runtime.online import OnlineRotation, RotatedGatedMLP, RotatedRMSNorm, attach_input_rotation
from uqcit.tensor.invariants import InvariantCheck, block_checks, structure_checks
from uqcit.tensor.structures import Rotation, UnsupportedOrderError, structure_for

LLAMA_FAMILY = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class ModuleRotation:
    """What happened to one module: the rotations on its input and output side, and how."""

    name: str
    input_rotation: str  # "" none; "residual", "per-head", "online", "online (generic)"
    output_rotation: str  # "" none; "residual", "per-head"
    online: bool  # an online rotation runs on its input at run time
    stored_bits: int  # bits of rotations stored for it (0 when everything is folded)
    norm_fused: str = ""  # the RMSNorm scale fused into it, if any


@dataclasses.dataclass(frozen=True)
class StructureInfo:
    """One complex structure used: where, its order and construction, and what storing it costs."""

    site: str  # "residual", "model.layers.3.self_attn per-head kv0", "model.layers.3.mlp.online_rotation"...
    n: int
    description: str
    folded: bool  # True: folded into weights, nothing stored
    stored_bits: int


# =============================================================================================
# applying rotations without changing the function


def derive_seed(seed: int, *parts: Any) -> int:
    """A stable per-site seed (crc32 of the site name mixed with the config seed)."""
    import zlib

    return (zlib.crc32("/".join(map(str, parts)).encode()) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF


@torch.no_grad()
def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write a float64 result into a parameter, keeping its dtype (and any tie: same storage)."""
    param.data.copy_(value.to(param.dtype))


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


class FoldContext:
    """Mutable bookkeeping of one ``rotate_model`` call (records, structures, checks)."""

    def __init__(self, config: StageConfig, progress: bool):  # a RotationConfig
        self.config = config
        self.progress = progress
        self.records: list[ModuleRotation] = []
        self.structures: list[StructureInfo] = []
        self.checks: list[InvariantCheck] = []
        self.fallbacks: list[str] = []
        self.history: list[tuple[int, float]] = []
        self.tied_head = "not tied"
        self.extra_weights = 0
        self.optimize_seconds = 0.0
        self.check_seconds = 0.0
        self._checked: set[str] = set()

    def structure(self, n: int, site: str, seed_parts: tuple, construction: str | None = None,
                  online: bool = False) -> Rotation:
        cfg = self.config
        rot, note = structure_for(n, construction or cfg.construction, derive_seed(cfg.seed, *seed_parts),
                                  cfg.unsupported, fast=online)
        if note:
            self.fallbacks.append(f"{site}: {note}")
        return rot

    def note(self, site: str, rot: Rotation, folded: bool, check_kind: str | None = None,
             block: torch.Tensor | None = None) -> None:
        self.structures.append(StructureInfo(site, rot.n, rot.describe(), folded, 0 if folded else rot.stored_bits))
        if check_kind is not None and check_kind not in self._checked:
            self._checked.add(check_kind)  # check one structure of each kind (O(n³) each)
            t0 = time.perf_counter()
            g = rot.matrix()
            self.checks.extend(structure_checks(g, site))
            if block is not None:
                a = _f64(block)
                if a.shape[0] != a.shape[1]:
                    a = a.T @ a if a.shape[1] == rot.n else a @ a.T  # Gram matrix in G's space
                self.checks.extend(block_checks(a, g, f"{site} on a {tuple(block.shape)} weight block"))
            self.check_seconds += time.perf_counter() - t0


def rotate_llama(model: nn.Module, ctx: FoldContext) -> None:
    from tqdm.auto import tqdm

    cfg = ctx.config
    base = model.model
    embed, layers, final_norm, head = base.embed_tokens, base.layers, base.norm, model.lm_head
    d = embed.weight.shape[1]
    tied = head.weight.data_ptr() == embed.weight.data_ptr()

    # 1. The residual structure ("optimized": learned on the norm-fused weights, before any change).
    rot: Rotation | None = None
    if cfg.residual:
        rot = ctx.structure(d, "residual", ("residual",),
                            "hadamard" if cfg.construction == "optimized" else None)
        if cfg.construction == "optimized" and rot.kind == "structure":
            t0 = time.perf_counter()
            rot = _optimize_residual(model, rot, ctx)
            ctx.optimize_seconds = time.perf_counter() - t0
        ctx.note("residual", rot, folded=True, check_kind="residual",
                 block=layers[0].self_attn.q_proj.weight[:d, :d] if len(layers) else embed.weight[:d])

    def rin(w: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:  # input side: (W diag g) G
        x = _f64(w) if g is None else _f64(w) * _f64(g)[None, :]
        return x if rot is None else rot.apply(x)

    def rout(w: torch.Tensor) -> torch.Tensor:  # output side: Gᵀ W = (Wᵀ G)ᵀ
        return _f64(w) if rot is None else rot.apply(_f64(w).T).T

    def rbias(b: torch.Tensor | None) -> None:  # a bias added to the residual: b ← b G
        if b is not None and rot is not None:
            _assign(b, rot.apply(_f64(b)))

    res = "residual" if rot is not None else ""
    # 2. Final norm and LM head (an untied head needs E before the embedding is rotated).
    gf = final_norm.weight.detach().clone()
    head_name, norm_name = _name(model, head), _name(model, final_norm)
    if rot is not None:
        if not tied:
            _assign(head.weight, rin(head.weight, gf))
            ctx.records.append(ModuleRotation(head_name, res, "", False, 0, norm_name))
        elif cfg.tied_head == "untie":
            head.weight = nn.Parameter(rin(embed.weight, gf).to(head.weight.dtype))  # E diag(g) G
            model.config.tie_word_embeddings = False
            ctx.tied_head, ctx.extra_weights = "untie", head.weight.numel()
            ctx.records.append(ModuleRotation(head_name, res, "", False, 0, norm_name))
        else:
            online = OnlineRotation(rot)
            eps = getattr(final_norm, "variance_epsilon", getattr(final_norm, "eps", 1e-6))
            replace_module(model, norm_name, RotatedRMSNorm(gf, eps, online))
            ctx.structures.append(StructureInfo(f"{norm_name}.scale_rotation", d, rot.describe(), False,
                                                online.stored_bits))
            ctx.tied_head = "keep"
            ctx.records.append(ModuleRotation(head_name, "residual (tied to the embedding)", "", False, 0))
            ctx.records.append(ModuleRotation(norm_name, "online: scale applied in the unrotated basis",
                                              "", True, online.stored_bits))
        if ctx.tied_head != "keep":
            with torch.no_grad():
                final_norm.weight.fill_(1.0)
        _assign(embed.weight, rin(embed.weight, None))  # E ← E G (a kept tie follows: same storage)
        ctx.records.append(ModuleRotation(_name(model, embed), "", res, False, 0))

    # 3. Every block.
    for li, layer in enumerate(tqdm(layers, desc="rotate", unit="block", disable=not ctx.progress)):
        attn, mlp = layer.self_attn, layer.mlp
        lname = _name(model, layer)
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        g1 = n1.weight.detach().clone() if rot is not None else None
        g2 = n2.weight.detach().clone() if rot is not None else None
        for proj, g, gname in ((attn.q_proj, g1, "input_layernorm"), (attn.k_proj, g1, "input_layernorm"),
                               (attn.v_proj, g1, "input_layernorm"),
                               (mlp.gate_proj, g2, "post_attention_layernorm"),
                               (mlp.up_proj, g2, "post_attention_layernorm")):
            if rot is not None:
                _assign(proj.weight, rin(proj.weight, g))
            heads_out = "per-head" if proj is attn.v_proj and cfg.per_head_vo else ""
            ctx.records.append(ModuleRotation(_name(model, proj), res, heads_out, False, 0,
                                              f"{lname}.{gname}" if rot is not None else ""))
        if rot is not None:
            with torch.no_grad():
                n1.weight.fill_(1.0)
                n2.weight.fill_(1.0)
            _assign(attn.o_proj.weight, rout(attn.o_proj.weight))
            rbias(attn.o_proj.bias)
        if cfg.per_head_vo:
            _rotate_heads(model, attn, li, ctx)
        ctx.records.append(ModuleRotation(_name(model, attn.o_proj), "per-head" if cfg.per_head_vo else "",
                                          res, False, 0))
        # down_proj: residual on the output side, an online structure on the input side.
        down_name = _name(model, mlp.down_proj)
        w_down = rout(mlp.down_proj.weight) if rot is not None else None
        stored = 0
        if cfg.online_down_proj:
            n_mid = mlp.down_proj.weight.shape[1]
            # Always the skew-Hadamard structure, in its cheapest layout: fast to run, n bits to store.
            rot_on = ctx.structure(n_mid, f"{down_name} input", ("online", li), "hadamard", online=True)
            w_down = rot_on.apply(w_down if w_down is not None else _f64(mlp.down_proj.weight))
            online = OnlineRotation(rot_on)
            mlp_name = _name(model, mlp)
            replace_module(model, mlp_name, RotatedGatedMLP(mlp, online))
            ctx.note(f"{mlp_name}.online_rotation", rot_on, folded=False, check_kind="online")
            stored = online.stored_bits
        if w_down is not None:
            _assign(mlp.down_proj.weight, w_down)
        rbias(mlp.down_proj.bias)
        ctx.records.append(ModuleRotation(down_name, "online" if stored else "", res, bool(stored), stored))


def _rotate_heads(model: nn.Module, attn: nn.Module, li: int, ctx: FoldContext) -> None:
    """Per-head G between v_proj (output rows) and o_proj (input columns); GQA-aware."""
    cfg = model.config
    hd = getattr(attn, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_heads = attn.o_proj.weight.shape[1] // hd
    n_kv = attn.v_proj.weight.shape[0] // hd
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads are not a multiple of {n_kv} key/value heads")
    group = n_heads // n_kv
    wv, wo = _f64(attn.v_proj.weight), _f64(attn.o_proj.weight)
    bv = attn.v_proj.bias
    bv64 = None if bv is None else _f64(bv)
    lname = _name(model, attn)
    for j in range(n_kv):
        rot = ctx.structure(hd, f"{lname} head {j}", ("head", li, j))
        rows = slice(j * hd, (j + 1) * hd)
        wv[rows] = rot.apply(wv[rows].T).T  # Gᵀ W_v[head j]: the head's values come out as v G
        if bv64 is not None:
            bv64[rows] = rot.apply(bv64[rows])
        for h in range(j * group, (j + 1) * group):  # query heads reading kv head j (repeat_kv order)
            cols = slice(h * hd, (h + 1) * hd)
            wo[:, cols] = rot.apply(wo[:, cols])  # W_o[:, head h] G: undoes it at o_proj's input
        ctx.note(f"{lname} per-head kv{j}", rot, folded=True, check_kind="per-head",
                 block=attn.o_proj.weight[:hd, :hd])
    _assign(attn.v_proj.weight, wv)
    _assign(attn.o_proj.weight, wo)
    if bv is not None:
        _assign(bv, bv64)


def rotate_generic(model: nn.Module, ctx: FoldContext) -> None:
    """Online input rotation for every Linear / Conv1D that owns its weight (generic families)."""
    from transformers.pytorch_utils import Conv1D

    import collections

    cfg = ctx.config
    if cfg.construction == "optimized":
        ctx.fallbacks.append("optimized applies to the residual stream of Llama-family models; "
                             "generic online rotations use the hadamard structure")
    seen: set[int] = set()
    uses = collections.Counter(p.data_ptr() for _, p in model.named_parameters(remove_duplicate=False))
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, (nn.Linear, Conv1D)):
            continue
        w = mod.weight
        if w.data_ptr() in seen or uses[w.data_ptr()] > 1:
            ctx.fallbacks.append(f"{name}: weight shared with another module; not rotated")
            continue
        seen.add(w.data_ptr())
        n_in = w.shape[0] if isinstance(mod, Conv1D) else w.shape[1]
        try:
            rot = ctx.structure(n_in, name, ("generic", name),
                                "hadamard" if cfg.construction == "optimized" else None, online=True)
        except UnsupportedOrderError:
            if cfg.unsupported == "error":
                raise
            ctx.fallbacks.append(f"{name}: input width {n_in} has no complex structure; not rotated")
            continue
        # Linear [out, in]: W G.  Conv1D stores [in, out] and computes x W: Gᵀ W.
        _assign(w, rot.apply(_f64(w).T).T if isinstance(mod, Conv1D) else rot.apply(_f64(w)))
        online = OnlineRotation(rot)
        attach_input_rotation(mod, online)
        ctx.note(f"{name}.input_rotation", rot, folded=False, check_kind="generic", block=None)
        ctx.records.append(ModuleRotation(name, "online (generic)", "", True, online.stored_bits))


def _name(model: nn.Module, module: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of the model")


# =============================================================================================
# the optimized construction: Cayley steps on the orthogonal group


def _optimize_residual(model: nn.Module, rot0: Rotation, ctx: FoldContext) -> Rotation:
    """G = R G₀ Rᵀ with R learned to minimize the RTN-error proxy of the rotated weights.

    Proxy (uniform-noise model of round-to-nearest): for each quantization group of a rotated
    matrix, ``group_size · range²`` (range = max(hi, 0) − min(lo, 0), as the quantizer widens
    it), summed and divided by the matrix's energy; averaged over matrices. Matrices: the
    embedding, q/k/v (× input-norm scale), gate/up (× post-attention-norm scale) on the input
    side, o_proj and down_proj (without its online rotation) on the output side, and an untied
    head (× final-norm scale). Each step samples ``optimize_matrices`` matrices ×
    ``optimize_rows`` rows; a fixed sample of every matrix scores progress, and the best R seen
    is kept. Riemannian gradient Ω = ∇Rᵀ − R∇ᵀ (skew), normalized to ‖Ω‖_F = 1, then the
    Cayley retraction R ← (I + τ/2 Ω)⁻¹ (I − τ/2 Ω) R with τ = ``lr``.
    """
    from tqdm.auto import tqdm

    cfg = ctx.config
    base = model.model
    mats: list[tuple[str, torch.Tensor]] = [("in", base.embed_tokens.weight.detach())]
    for layer in base.layers:
        g1, g2 = layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()
        a, m = layer.self_attn, layer.mlp
        mats += [("in", p.weight.detach() * g1) for p in (a.q_proj, a.k_proj, a.v_proj)]
        mats += [("in", p.weight.detach() * g2) for p in (m.gate_proj, m.up_proj)]
        mats += [("out", a.o_proj.weight.detach()), ("out", m.down_proj.weight.detach())]
    head, emb = model.lm_head, base.embed_tokens
    if head.weight.data_ptr() != emb.weight.data_ptr():
        mats.append(("in", head.weight.detach() * base.norm.weight.detach()))
    gs = cfg.group_size
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "optimize"))
    fixed = [_sample_rows(kind, w, cfg.optimize_rows, gs, gen) for kind, w in mats]
    n = rot0.n
    g0 = rot0.matrix(torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    r = eye.clone()

    def score(r_: torch.Tensor) -> float:
        with torch.no_grad():
            return float(_proxy(fixed, (r_ @ g0 @ r_.T).to(torch.float32), gs))

    best = (score(r), r)
    ctx.history.append((0, best[0]))
    for step in tqdm(range(1, cfg.optimize_steps + 1), desc="optimize rotation", unit="step",
                     disable=not ctx.progress):
        pick = torch.randperm(len(mats), generator=gen)[: cfg.optimize_matrices].tolist()
        batch = [_sample_rows(mats[i][0], mats[i][1], cfg.optimize_rows, gs, gen) for i in pick]
        rg = r.clone().requires_grad_(True)
        g = (rg @ g0 @ rg.T).to(torch.float32)
        _proxy(batch, g, gs).backward()
        grad = rg.grad
        omega = grad @ r.T - r @ grad.T
        norm = float(omega.norm())
        if norm == 0.0:
            break
        omega = omega / norm
        half = cfg.lr / 2
        r = torch.linalg.solve(eye + half * omega, (eye - half * omega) @ r)
        if step % 10 == 0 or step == cfg.optimize_steps:
            s = score(r)
            ctx.history.append((step, s))
            if s < best[0]:
                best = (s, r)
    r = best[1]
    g = r @ g0 @ r.T
    g = (g - g.T) / 2  # exact skew-symmetry; orthogonality holds to float64 rounding
    return Rotation.from_matrix(g, "optimized")


def _sample_rows(kind: str, w: torch.Tensor, rows: int, gs: int, gen: torch.Generator) -> tuple:
    """Rows of the rotated matrix to score, in whole blocks so quantization groups line up.

    "in": (kind, rows of W [k, cols], energy) — rotated as rows @ G.
    "out": (kind, W, row index [k], energy) — rotated rows are G[:, idx]ᵀ @ W.
    """
    n_rows, cols = w.shape
    block = math.lcm(cols, gs) // cols
    n_blocks = max(1, n_rows // block)
    take = min(n_blocks, max(1, rows // block))
    starts = torch.randperm(n_blocks, generator=gen)[:take] * block
    idx = (starts[:, None] + torch.arange(block)[None, :]).reshape(-1).clamp_(max=n_rows - 1)
    w32 = w.to(torch.float32)
    if kind == "in":
        sel = w32[idx]
        return ("in", sel, float(sel.square().sum()))
    energy = float(w32.square().sum()) * idx.numel() / n_rows
    return ("out", w32, idx, energy)


def _proxy(samples: list[tuple], g: torch.Tensor, gs: int) -> torch.Tensor:
    total = g.new_zeros(())
    for s in samples:
        if s[0] == "in":
            y, energy = s[1] @ g, s[2]
        else:
            y, energy = g[:, s[2]].T @ s[1], s[3]
        flat = y.reshape(-1)
        k = flat.numel() // gs * gs
        grp = flat[:k].view(-1, gs)
        rng = grp.amax(1).clamp(min=0) - grp.amin(1).clamp(max=0)
        total = total + gs * rng.square().sum() / 12 / max(energy, 1e-30)
    return total / len(samples)
