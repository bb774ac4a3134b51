"""Learned rounding for one weight tensor: a differentiable integer grid (SignRound).

Round-to-nearest picks each code alone; error feedback (``gptq``) picks codes one column at a
time against a linear model of the layer. SignRound (Cheng et al. 2023, "Optimize weight
rounding via signed gradient descent") instead *learns* the rounding: every weight gets an
offset ``v`` in ``[-0.5, 0.5]`` added before rounding, and every group two clipping factors
(``alpha`` for its maximum, ``beta`` for its minimum, in ``[clip_min, 1]``), all trained
against the float block's outputs with signed gradient steps. The rounding is passed through
with a straight-through estimator.

``LearnedWeight`` holds those parameters for one ``[out, in]`` weight in a plain integer
format. Its ``forward()`` is the fake-quantized weight, computed with the very operations the
packed format decodes (fp16 scales and zero points, ``(code - offset) * scale`` in float32),
so ``quantized()`` stores exactly the weight the training saw. With ``scale_bits`` the group
scale is itself rounded onto its scale-code grid (``uqcit.tensor.grid``: code times the fp16
super-scale of its super-block, the super-scale taken from the current scales and held constant
for the gradient), again with a straight-through estimator.

Symmetric formats here use the full code range ``[0, 2**b - 1]`` around ``2**(b-1)`` (levels
``-2**(b-1) .. 2**(b-1) - 1``, as in the usual signed integer grids): learned clipping makes
the extra negative level useful; ``quant.quantize`` never emits code 0 for symmetric formats
(its clamp is symmetric so that re-quantization is exact), but every decoder reads it.

>>> import torch
>>> from uqcit.tensor.formats import QuantFormat
>>> from uqcit.tensor.quant import dequantize
>>> w = torch.randn(8, 64)
>>> lw = LearnedWeight(w, QuantFormat(bits=4, group_size=32))
>>> q = lw.quantized()
>>> q.stored_bits == q.fmt.bits_for(w.numel()), torch.equal(dequantize(q), lw.forward().detach())
(True, True)
>>> q = LearnedWeight(w, QuantFormat(bits=3, group_size=32, int_zeros=True)).quantized()
>>> q.stored_bits == q.fmt.bits_for(w.numel())
True
>>> lw = LearnedWeight(w, QuantFormat(bits=4, group_size=32, symmetric=True, scale_bits=6))
>>> q = lw.quantized()  # scale codes under fp16 super-scales, still exactly forward()
>>> q.stored_bits == q.fmt.bits_for(w.numel()), torch.equal(dequantize(q), lw.forward().detach())
(True, True)

Lookup-table formats (``w{b}-g{G}-lut``, ``w4-g{G}-nl``) learn their rounding in ``LearnedTable``:
the table's levels are numbered ``0 .. 2**b - 1``, a weight's position between its two neighbouring
levels is read as a fractional level number (linear between them), and the offset ``v`` is added to
that number before it is rounded, so ``v = 0`` is the nearest level and ``v`` moves a weight to the
next level up or down exactly as on an integer grid. Each group learns one clipping factor of its
scale; the table stays the one fitted at the start. ``learned_weight`` picks the class.

>>> lt = learned_weight(w, QuantFormat(bits=4, group_size=32, symmetric=True, lut=True, nl=True))
>>> q = lt.quantized()
>>> q.stored_bits == q.fmt.bits_for(w.numel()), torch.equal(dequantize(q), lt.forward().detach())
(True, True)

Vector codebooks (``w{b}-g{G}-vq{d}``) learn theirs in ``LearnedVQ``: a vector's code has no "next
level up or down", so the offset ``v`` moves the normalized weights themselves (within half a level
step of the format's bits, ``1 / 2**b`` of the absmax scale) and each vector is then sent to its
nearest codebook point, the encoder's rule; the gradient passes the choice straight through to the
moved weights. Each group learns one clipping factor of its scale; the codebook stays the one fitted
at the start (k-means, ``uqcit.tensor.vq``).

>>> lv = learned_weight(w, QuantFormat(bits=2, group_size=32, vq=2))
>>> q = lv.quantized()
>>> q.stored_bits == q.fmt.bits_for(w.numel()), torch.equal(dequantize(q), lv.forward().detach())
(True, True)
"""
from __future__ import annotations

import torch

from uqcit.tensor.formats import FLOAT_BITS, QuantFormat
from uqcit.tensor.grid import FP16_TINY, group_super_scales, super_index
from uqcit.tensor.lut import TABLE_NAME
from uqcit.tensor.packing import pack
from uqcit.tensor.quant import QuantizedTensor, quant_params
from uqcit.tensor.vq import nearest_k


def supports(fmt: QuantFormat, shape: tuple[int, ...]) -> bool:
    """Whether a weight of ``shape`` in ``fmt`` can learn its rounding: plain integer or lookup-table
    formats whose groups tile the tensor exactly (mixed and fp16 formats keep their own rounding)."""
    numel = 1
    for s in shape:
        numel *= s
    return fmt.bits != FLOAT_BITS and not fmt.mixed and numel % fmt.group_size == 0


def learned_weight(w: torch.Tensor, fmt: QuantFormat) -> "LearnedWeight | LearnedTable | LearnedVQ":
    """The trainable rounding of ``w`` in ``fmt``: ``LearnedTable`` for lookup tables, ``LearnedVQ`` for
    vector codebooks, else ``LearnedWeight`` (each refuses a format it cannot learn)."""
    return LearnedVQ(w, fmt) if fmt.vq else LearnedTable(w, fmt) if fmt.lut else LearnedWeight(w, fmt)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to fp16 (never below the smallest fp16) forward, identity backward."""
    return x + (x.detach().to(torch.float16).clamp_(min=FP16_TINY).to(torch.float32) - x).detach()


class LearnedWeight(torch.nn.Module):
    """Rounding offsets and clipping factors of one weight ``w`` ``[out, in]`` in ``fmt``.

    ``w`` is kept frozen (a float32 copy); ``v``, ``alpha`` and ``beta`` are the trainable
    parameters. At initialization (``v = 0``, ``alpha = beta = 1``) the weight is the
    round-to-nearest weight on the min/max grid (full-range for symmetric formats).
    """

    def __init__(self, w: torch.Tensor, fmt: QuantFormat):
        super().__init__()
        if not supports(fmt, tuple(w.shape)) or fmt.lut or fmt.vq:
            raise ValueError(f"learned rounding needs a plain integer format whose groups tile the "
                             f"tensor; {fmt.name} on shape {tuple(w.shape)} does not (lookup tables: "
                             f"LearnedTable, vector codebooks: LearnedVQ, or learned_weight for any)")
        self.fmt = fmt
        self.shape = tuple(w.shape)
        self.register_buffer("w", w.detach().to(torch.float32).reshape(-1, fmt.group_size).clone())
        groups = self.w.shape[0]
        self.v = torch.nn.Parameter(torch.zeros_like(self.w))
        self.alpha = torch.nn.Parameter(torch.ones(groups, 1))
        self.beta = torch.nn.Parameter(torch.ones(groups, 1))
        self.qmax = float((1 << fmt.bits) - 1)
        lo = self.w.amin(dim=1, keepdim=True).clamp(max=0.0)
        hi = self.w.amax(dim=1, keepdim=True).clamp(min=0.0)
        self.register_buffer("lo", lo)
        self.register_buffer("hi", hi)

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group float32 scale (an fp16 value, or a scale code times its super-scale) and code
        offset (an integer), differentiable."""
        scale = self._stored_scale(self._raw_scale())
        if self.fmt.symmetric:
            return scale, torch.full_like(scale, float(1 << (self.fmt.bits - 1)))
        offset = _round_ste(-self.lo * self.beta / scale).clamp(0.0, self.qmax)
        return scale, offset

    def _raw_scale(self) -> torch.Tensor:
        """Float32 scale ``[groups, 1]`` of the clipped range, before the format rounds it."""
        if self.fmt.symmetric:
            return torch.maximum(-self.lo * self.beta, self.hi * self.alpha) / ((self.qmax - 1) / 2)
        return (self.hi * self.alpha - self.lo * self.beta) / self.qmax

    def _stored_scale(self, raw: torch.Tensor) -> torch.Tensor:
        """``raw`` ``[groups, 1]`` rounded to what the format stores: fp16, or with ``scale_bits`` a
        code in ``[1, 2**scale_bits - 1]`` times its super-scale (``quantized`` stores the codes)."""
        if self.fmt.scale_bits is None:
            return _fp16_ste(raw.clamp(min=FP16_TINY))
        sup = self._super_scales(raw).to(torch.float32)[super_index(raw.shape[0], self.fmt.group_size, raw.device)]
        top = float((1 << self.fmt.scale_bits) - 1)
        return _round_ste(raw / sup.unsqueeze(1)).clamp(1.0, top) * sup.unsqueeze(1)  # exact: code * fp16

    def _super_scales(self, raw: torch.Tensor) -> torch.Tensor:
        """fp16 super-scales of the current group scales ``raw`` (no gradient: a statistic of them)."""
        return group_super_scales(raw.detach().reshape(-1), self.w.numel(), self.fmt.group_size, self.fmt.scale_bits)

    def codes(self, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return (_round_ste(self.w / scale + self.v) + offset).clamp(0.0, self.qmax)

    def forward(self) -> torch.Tensor:
        """The fake-quantized weight ``[out, in]``: exactly what ``quantized()`` decodes to."""
        scale, offset = self.grid()
        return ((self.codes(scale, offset) - offset) * scale).reshape(self.shape)

    @torch.no_grad()
    def clamp_(self, clip_min: float) -> None:
        """Keep the parameters in their ranges after a step."""
        self.v.clamp_(-0.5, 0.5)
        self.alpha.clamp_(clip_min, 1.0)
        self.beta.clamp_(clip_min, 1.0)

    @torch.no_grad()
    def quantized(self) -> QuantizedTensor:
        """The packed tensor of the current parameters (``fmt.bits_for(numel)`` bits)."""
        scale, offset = self.grid()
        codes = self.codes(scale, offset).reshape(-1).to(torch.uint8)
        tensors = {"codes": pack(codes, self.fmt.bits)}
        if self.fmt.scale_bits is None:
            tensors["scales"] = scale.reshape(-1).to(torch.float16)
        else:  # the codes and super-scales that _stored_scale decoded
            raw = self._raw_scale()
            sup = self._super_scales(raw)
            groups = super_index(raw.shape[0], self.fmt.group_size, raw.device)
            tensors["scale_codes"] = pack((scale.reshape(-1) / sup.to(torch.float32)[groups]).round().to(torch.uint8),
                                          self.fmt.scale_bits)
            tensors["super_scales"] = sup
        if not self.fmt.symmetric:
            zeros = offset.reshape(-1).to(torch.uint8)  # integers in [0, 2**bits - 1]
            tensors["zeros"] = pack(zeros, self.fmt.bits) if self.fmt.int_zeros else zeros.to(torch.float16)
        return QuantizedTensor(self.shape, self.fmt, tensors)


class LearnedTable(torch.nn.Module):
    """Rounding offsets and per-group clipping of one weight ``w`` ``[out, in]`` in a lookup-table
    ``fmt`` (module docstring). Starts at ``quant.quantize``'s grid and codes: its scales (absmax,
    or IQ4_NL's searched signed scales) and its table, which stays fixed."""

    NEEDS = "a lookup-table format"  # what the constructor accepts, for its error

    @staticmethod
    def accepts(fmt: QuantFormat) -> bool:
        return bool(fmt.lut)

    def __init__(self, w: torch.Tensor, fmt: QuantFormat):
        super().__init__()
        if not self.accepts(fmt) or not supports(fmt, tuple(w.shape)):
            raise ValueError(f"{type(self).__name__} needs {self.NEEDS} whose groups tile the tensor; "
                             f"{fmt.name} on shape {tuple(w.shape)} is not one")
        self.fmt = fmt
        self.shape = tuple(w.shape)
        grid = quant_params(w.detach().to(torch.float32), fmt).low
        self.register_buffer("w", w.detach().to(torch.float32).reshape(-1, fmt.group_size).clone())
        self.register_buffer("table", grid.table.clone())
        self.register_buffer("scale0", grid.scales.to(torch.float32).unsqueeze(1))
        self.v = torch.nn.Parameter(torch.zeros_like(self.w))
        self.alpha = torch.nn.Parameter(torch.ones(self.w.shape[0], 1))

    def scale(self) -> torch.Tensor:
        """Per-group float32 scale ``[groups, 1]``: an fp16 value of the sign of the start, differentiable."""
        raw = self.scale0 * self.alpha
        stored = raw.detach().to(torch.float16).to(torch.float32)
        stored = torch.where(stored == 0, torch.sign(self.scale0) * FP16_TINY, stored)  # never a zero scale
        return raw + (stored - raw).detach()

    def codes(self, scale: torch.Tensor) -> torch.Tensor:
        """Level numbers (integers forward): the fractional level number of ``w / scale`` plus ``v``, rounded."""
        t = self.table.to(torch.float32)
        last = t.numel() - 1
        u = self.w / scale
        seg = (torch.searchsorted(t, u.detach().contiguous()) - 1).clamp_(0, last - 1)
        lo, gap = t[seg], t[seg + 1] - t[seg]
        position = seg + (u - lo) / gap  # linear between the two neighbouring levels
        return _round_ste(position + self.v).clamp(0.0, float(last))

    def forward(self) -> torch.Tensor:
        """The fake-quantized weight ``[out, in]``: ``scale * table[code]``, as ``quantized()`` decodes."""
        scale = self.scale()
        code = self.codes(scale)
        t = self.table.to(torch.float32)
        index = code.detach().to(torch.int64)
        slope = t[(index + 1).clamp(max=t.numel() - 1)] - t[index]  # the gradient of the level number
        level = t[index] + (code - code.detach()) * slope
        return (level * scale).reshape(self.shape)

    @torch.no_grad()
    def clamp_(self, clip_min: float) -> None:
        """Keep the parameters in their ranges after a step."""
        self.v.clamp_(-0.5, 0.5)
        self.alpha.clamp_(clip_min, 1.0)

    @torch.no_grad()
    def quantized(self) -> QuantizedTensor:
        """The packed tensor of the current parameters (``fmt.bits_for(numel)`` bits)."""
        scale = self.scale()
        codes = self.codes(scale).reshape(-1).to(torch.uint8)
        return QuantizedTensor(self.shape, self.fmt, {"codes": pack(codes, self.fmt.bits),
                                                      "scales": scale.reshape(-1).to(torch.float16),
                                                      "table": self.table.clone()})


class LearnedVQ(LearnedTable):
    """Offsets of the normalized weights and per-group clipping of one weight ``w`` ``[out, in]`` in a
    vector-codebook ``fmt`` (module docstring). Starts at ``quant.quantize``'s absmax scales, codebook
    and codes (float ties aside); the codebook stays fixed. The parameters and the scale are
    ``LearnedTable``'s; the codes are nearest points instead of level numbers.

    The nearest point is searched among each vector's ``CANDIDATES`` nearest points, found by a full
    search at the start and again every ``REFRESH`` steps (``clamp_`` counts them): a step moves a
    vector by at most ``lr`` of a scale, so its nearest point stays among its near ones, and the full
    search over 256 points for every step would cost more than the block's forward pass.
    ``forward`` and ``quantized`` use the same rule, so the package stores what the training saw.
    """

    CANDIDATES = 8
    REFRESH = 10
    NEEDS = "a vector-codebook format"

    @staticmethod
    def accepts(fmt: QuantFormat) -> bool:
        return bool(fmt.vq)

    def __init__(self, w: torch.Tensor, fmt: QuantFormat):
        super().__init__(w, fmt)
        self.table = self.table.to(torch.float32)  # fp16 values: stored back exactly
        self.reach = 1.0 / (1 << fmt.bits)  # half a level step of a b-bit grid on [-1, 1]
        self.steps = 0
        self.register_buffer("near", self._nearest_points(self._u(self.scale()).detach()))

    def _u(self, scale: torch.Tensor) -> torch.Tensor:
        return self.w / scale + self.v

    def _nearest_points(self, u: torch.Tensor) -> torch.Tensor:
        """Each vector's ``CANDIDATES`` nearest points (int64 ``[vectors, k]``)."""
        return nearest_k(u.reshape(-1, self.fmt.vq), self.table, self.CANDIDATES)

    def codes(self, u: torch.Tensor) -> torch.Tensor:
        """The nearest candidate point of each vector of ``d`` consecutive normalized weights (int64)."""
        vecs = u.detach().reshape(-1, 1, self.fmt.vq)
        dist = (vecs - self.table[self.near]).square_().sum(-1)
        return self.near.gather(1, dist.argmin(1, keepdim=True)).squeeze(1)

    def forward(self) -> torch.Tensor:
        """The fake-quantized weight ``[out, in]``: ``scale * codebook[code]``, as ``quantized()`` decodes."""
        scale = self.scale()
        u = self._u(scale)
        point = self.table[self.codes(u)].reshape(u.shape)
        return ((point + (u - u.detach())) * scale).reshape(self.shape)  # straight through to u

    @torch.no_grad()
    def clamp_(self, clip_min: float) -> None:
        """Keep the parameters in their ranges after a step; every ``REFRESH`` steps, search the candidates anew."""
        self.v.clamp_(-self.reach, self.reach)
        self.alpha.clamp_(clip_min, 1.0)
        self.steps += 1
        if self.steps % self.REFRESH == 0:
            self.near = self._nearest_points(self._u(self.scale()))

    @torch.no_grad()
    def quantized(self) -> QuantizedTensor:
        """The packed tensor of the current parameters (``fmt.bits_for(numel)`` bits)."""
        scale = self.scale()
        codes = self.codes(self._u(scale)).to(torch.uint8)
        return QuantizedTensor(self.shape, self.fmt, {"codes": pack(codes, self.fmt.vq * self.fmt.bits),
                                                      "scales": scale.reshape(-1).to(torch.float16),
                                                      TABLE_NAME: self.table.to(torch.float16).reshape(-1)})
