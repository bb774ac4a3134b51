"""What self-retraining trains: modules that wrap a compressed layer with trainable tensors.

``ScaleTrainableLinear`` trains the fp16 group scales of a ``QuantLinear`` in an integer or
lookup-table format (codes and zeros fixed; a fitted table, ``-lut``, trains its levels too);
``LoRALinear`` adds a low-rank adapter to a frozen linear module; a pruned module (a ``weight``
and a bool ``mask`` buffer, ``has_mask``) trains its kept weights in place.
``make_trainable`` wraps what a mode allows, ``finish_trainable`` puts the stored form back, and
``fold_lora`` stores adapters on quantized layers as their low-rank ``Compensation``. The loop
that trains them is ``uqcit.stages.retrain``.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from uqcit.runtime.modules import Compensation, QuantEmbedding, QuantLinear, replace_module
from uqcit.tensor.formats import FLOAT_BITS, parse_format
from uqcit.tensor.grid import FP16_TINY, quantize_scales
from uqcit.tensor.packing import pack, unpack
from uqcit.tensor.quant import quantize, scales_of
from uqcit.tensor.vq import table_index

Mode = Literal["scales", "masked", "lora"]


class ScaleTrainableLinear(nn.Module):
    """A ``QuantLinear`` during scale training: fixed codes and zeros, trainable group scales.

    The weight is ``unit · stored(s0 · exp(g))`` per group, where ``unit`` is what a code decodes
    to before scaling (held as a float copy ``[groups, group_size]`` for speed): ``code − zero``
    for integer formats, ``table[code]`` for lookup-table formats (``-lut``, ``-nl``), the weight's
    coordinate of its vector's point for vector codebooks (``-vq{d}``). ``g``
    (``log_scale``, init 0) is trained and ``stored`` rounds a scale to what the format stores:
    fp16, or for double-quantized scales (``-s<k>`` formats) the nearest k-bit code (at least 1,
    as ``quantize`` stores them) times the group's fixed fp16 super-scale. The factor ``exp(g)``
    keeps each scale's sign, so IQ4_NL's signed scales (``-nl``) train like the others. The
    rounding is in the forward pass (gradients pass straight through it), so the forward equals
    the stored module's. ``finish()`` writes the stored scales back and returns the ``QuantLinear``.

    With ``train_table`` (the default) a fitted table (``-lut``, or the coordinates of a ``-vq{d}``
    codebook; IQ4_NL's is fixed by the format) is trained too: ``table`` starts at the stored levels,
    the forward uses them fp16-rounded (straight through), and ``unit = table[code]`` is looked up
    from the codes in every forward. ``finish()`` stores the fp16 levels ascending, as every table is
    stored: when training has crossed two levels it sorts them and renumbers the codes to match,
    which leaves every weight exactly as trained (clamping them back into order would not). A
    codebook has no order: it is stored as trained.

    >>> from uqcit.tensor.formats import parse_format
    >>> lin = QuantLinear(quantize(torch.randn(8, 64), parse_format("w4-g32-sym-s6")))
    >>> x = torch.randn(2, 64)
    >>> t = ScaleTrainableLinear(lin)
    >>> torch.allclose(t(x), lin(x), atol=1e-5)
    True
    >>> with torch.no_grad():
    ...     _ = t.log_scale.add_(0.2)
    >>> torch.allclose(t(x), t.finish()(x), atol=1e-5)
    True
    >>> lut = QuantLinear(quantize(torch.randn(8, 64), parse_format("w3-g32-lut")))
    >>> t = ScaleTrainableLinear(lut)
    >>> t.table.numel(), torch.allclose(t(x), lut(x), atol=1e-5)
    (8, True)
    """

    def __init__(self, qlin: QuantLinear, *, train_table: bool = True):
        super().__init__()
        fmt = qlin.fmt
        if fmt.bits == FLOAT_BITS or fmt.mixed:
            raise ValueError(f"scale training needs a plain integer or lookup-table format, got {fmt.name}")
        self.base = qlin
        numel, gs = math.prod(qlin.shape), fmt.group_size
        groups = math.ceil(numel / gs)
        self.numel = numel
        if fmt.lut or fmt.vq:
            s0 = qlin.scales.detach().to(torch.float32)  # signed for -nl
            # int32: indexes a table as int64 would, at half the memory; the padding decodes level 0, cut off.
            # A codebook is indexed flat: code * d + the weight's coordinate.
            codes = torch.zeros(groups * gs, dtype=torch.int32, device=s0.device)
            codes[:numel] = (table_index(qlin.codes, numel, fmt.bits, fmt.vq) if fmt.vq
                             else unpack(qlin.codes, fmt.bits, numel)).to(torch.int32)
            codes = codes.view(groups, gs)
            table = qlin.table.detach().to(torch.float32)
            if train_table and not fmt.nl:
                self.register_buffer("codes", codes, persistent=False)
                self.table = nn.Parameter(table.clone())
            else:
                # table[code] from the codes, not w / scale: the quotient of two roundings need not be the level
                self.register_buffer("unit", table[codes], persistent=False)
        else:
            s0 = scales_of(qlin.qtensor).detach()
            with torch.no_grad():
                flat = qlin.dequantized(torch.float32).reshape(-1)
                padded = torch.zeros(groups * gs, device=flat.device)
                padded[:numel] = flat
                # code − zero is an integer: dividing out the stored scale recovers it exactly (a zero
                # scale holds only zeros).
                safe = torch.where(s0 > 0, s0, torch.ones_like(s0))
                self.register_buffer("unit", (padded.view(groups, gs) / safe.unsqueeze(1)).round(), persistent=False)
        if "table" not in self._parameters:
            self.register_parameter("table", None)
        self.register_buffer("s0", s0, persistent=False)
        self.log_scale = nn.Parameter(torch.zeros(groups, device=s0.device))

    def _stored(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The scales ``s`` as the format stores them (float32) and, for ``-s<k>`` formats, their codes
        under the layer's fixed super-scales."""
        fmt = self.base.fmt
        if fmt.scale_bits is None:
            stored = s.to(torch.float16).float()
            # a table's or codebook's scales are never 0 (as quantize stores them): the smallest fp16, same sign
            if fmt.lut or fmt.vq:
                stored = torch.where(stored == 0, torch.sign(self.s0) * FP16_TINY, stored)
            return stored, None
        codes, decoded = quantize_scales(s, self.base.super_scales, fmt.group_size, fmt.scale_bits)
        return decoded, codes

    def scale(self) -> torch.Tensor:
        s = self.s0 * self.log_scale.exp()
        return s + (self._stored(s.detach())[0] - s).detach()  # forward: the stored value; backward: identity

    def units(self) -> torch.Tensor:
        """What each weight's code decodes to before scaling, ``[groups, group_size]``."""
        if self.table is None:
            return self.unit
        t = self.table
        return (t + (t.to(torch.float16).float() - t).detach())[self.codes]  # fp16 levels forward, straight through

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.units() * self.scale().unsqueeze(1)).reshape(-1)[: self.numel].view(self.base.shape)
        bias = None if self.base.bias is None else self.base.bias.to(x.dtype)
        return F.linear(x, w.to(x.dtype), bias)

    @torch.no_grad()
    def finish(self) -> QuantLinear:
        decoded, codes = self._stored(self.s0 * self.log_scale.exp())
        if codes is None:
            self.base.scales.copy_(decoded.to(torch.float16))
        else:
            self.base.scale_codes.copy_(pack(codes, self.base.fmt.scale_bits))
        if self.table is not None and self.base.fmt.vq:  # a codebook has no order
            self.base.table.copy_(self.table.to(torch.float16))
        elif self.table is not None:
            levels = self.table.to(torch.float16)
            order = torch.sort(levels.float(), stable=True).indices
            if not torch.equal(order, torch.arange(order.numel(), device=order.device)):
                # renumber: the code pointing at old level order[i] becomes i, so table[code] is unchanged
                renumber = torch.empty_like(order)
                renumber[order] = torch.arange(order.numel(), device=order.device)
                codes = renumber[self.codes.reshape(-1)[: self.numel].long()]
                self.base.codes.copy_(pack(codes.to(torch.uint8), self.base.fmt.bits))
            self.base.table.copy_(levels[order])
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


def has_mask(module: nn.Module) -> bool:
    """Whether ``module`` is a pruned module: a ``weight`` parameter and a bool ``mask`` buffer of its shape."""
    w, m = getattr(module, "weight", None), module._buffers.get("mask") if hasattr(module, "_buffers") else None
    return (isinstance(w, nn.Parameter) and isinstance(m, torch.Tensor) and m.dtype == torch.bool
            and m.shape == w.shape)


def _linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a linear-like module, or None."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    if isinstance(module, (nn.Linear, QuantLinear)) or has_mask(module):
        i, o = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if i is None and has_mask(module) and module.weight.dim() == 2:
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


def make_trainable(model: nn.Module, mode: Mode, *, modules: str | None = None, lora_rank: int = 8,
                   lora_alpha: float = 16.0, seed: int = 0,
                   train_table: bool = True) -> tuple[list[Trainable], list[tuple[str, str]]]:
    """Freeze ``model`` and make trainable what ``mode`` allows (wrapping modules in place).

    ``modules`` is a regex (``re.search``) on module names, None for every eligible module;
    ``lora_rank``, ``lora_alpha`` and ``seed`` (the adapters' initialization) apply to ``"lora"``,
    ``train_table`` (fitted lookup tables train their levels too, ``ScaleTrainableLinear``) to ``"scales"``.
    Returns the trainable modules and the skipped candidates with the reason. Raises when nothing
    is trainable, naming what the mode looks for.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    pattern = re.compile(modules) if modules else None
    chosen: list[Trainable] = []
    skipped: list[tuple[str, str]] = []
    named = list(model.named_modules())
    if mode == "scales":
        owners: dict[int, list[str]] = {}
        for name, m in named:
            if isinstance(m, (QuantLinear, QuantEmbedding)) and "codes" in m._buffers:
                owners.setdefault(m.codes.data_ptr(), []).append(name)
        for name, m in named:
            if not isinstance(m, QuantLinear) or (pattern and not pattern.search(name)):
                continue
            if m.fmt.bits == FLOAT_BITS or m.fmt.mixed:
                skipped.append((name, f"format {m.fmt.name}: only plain integer and lookup-table formats train scales"))
            elif len(owners.get(m.codes.data_ptr(), [])) > 1:
                skipped.append((name, f"scales shared with {[o for o in owners[m.codes.data_ptr()] if o != name]}"))
            else:
                wrapper = ScaleTrainableLinear(m, train_table=train_table)
                replace_module(model, name, wrapper)
                values = sum(p.numel() for p in wrapper.parameters() if p.requires_grad)  # scales, table levels
                chosen.append(Trainable(name, "scales", values, 0))
        what = "QuantLinear modules with plain integer or lookup-table formats (quantize the model first)"
    elif mode == "masked":
        for name, m in named:
            if has_mask(m) and not (pattern and not pattern.search(name)):
                with torch.no_grad():
                    m.weight.mul_(m.mask)
                m.weight.requires_grad_(True)
                chosen.append(Trainable(name, "masked", int(m.mask.sum()), 0))
        what = "modules with a weight parameter and a bool 'mask' buffer of its shape (prune the model first)"
    else:
        heads = _output_names(model)
        generator = torch.Generator().manual_seed(seed)
        for name, m in named:
            dims = _linear_dims(m)
            if dims is None or (pattern and not pattern.search(name)):
                continue
            if pattern is None and name in heads:
                skipped.append((name, "LM head (name it in 'modules' to adapt it)"))
                continue
            wrapper = LoRALinear(m, dims[0], dims[1], lora_rank, lora_alpha, generator)
            replace_module(model, name, wrapper)
            chosen.append(Trainable(name, "lora", lora_rank * (dims[0] + dims[1]), wrapper.stored_bits))
        what = "linear modules (nn.Linear, QuantLinear, Conv1D or masked)"
    if not chosen:
        scope = f" matching {modules!r}" if modules else ""
        raise ValueError(f"mode {mode!r} found nothing to train{scope}: it trains {what}")
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
