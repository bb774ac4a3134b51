"""Group-wise round-to-nearest quantization with real packed storage, and its exact inverse.

``quantize(w, fmt)`` turns a float tensor into a ``QuantizedTensor``: the packed codes, fp16
scales (and zero points) and, for mixed formats, a 1-bit mask and the salient weights at higher
precision. What it stores is exactly what ``dequantize`` uses, and its size in bits is exactly
``fmt.bits_for(numel)`` (``formats.py`` holds that arithmetic).

Groups are ``fmt.group_size`` *consecutive* elements of the row-major flattened tensor; the last
group may be short, and nothing is stored for its missing elements.

Integer rule for one group of ``b`` bits (``qmax = 2**b - 1``), all arithmetic in float32:

- asymmetric: the range ``[lo, hi]`` is widened to include 0 (GPTQ's convention, so the integer
  zero point always lies in ``[0, qmax]`` and an all-positive group cannot clamp to nonsense);
  ``scale = fp16((hi - lo) / qmax)``, ``zero = round(-lo / scale)``,
  ``code = clamp(round(w / scale) + zero, 0, qmax)``, ``w_hat = (code - zero) * scale``.
- symmetric: ``scale = fp16(absmax / (2**(b-1) - 1))``,
  ``code = clamp(round(w / scale), -(2**(b-1) - 1), 2**(b-1) - 1) + 2**(b-1)`` stored unsigned,
  ``w_hat = (code - 2**(b-1)) * scale``. The clamp is symmetric, so the most negative level
  ``-2**(b-1)`` (code 0) is never produced: 2-bit symmetric uses the three levels -1, 0, 1.

Scales (and zeros) are rounded to fp16 *before* the codes are computed, so the codes are the
best codes for the stored scale. ``round`` is torch's round-half-to-even. Two details make
``quantize(dequantize(q))`` reproduce ``q`` exactly (codes, scales, zeros):

- the group's extremes land on the end codes: the lowest value (or 0) on code 0, and if the
  fp16 rounding of the scale would leave the highest value (symmetric: the largest magnitude)
  short of the top code, the scale steps down one fp16 ulp (the dequantized group then spans
  the full code range again, and re-quantizing it recomputes the same scale bit for bit);
- a constant group (all values equal to ``c``) gets ``scale = fp16(|c|)`` and code +-1, so it
  dequantizes to ``c`` exactly whenever ``c`` is an fp16 value; an all-zero group gets scale 1.

Two kinds of group are not guaranteed to round-trip (both are degenerate, neither loses
accuracy): groups so narrow that their scale floors at the smallest fp16 subnormal (2**-24;
they dequantize within half of it), and non-constant groups whose values all get one code
(e.g. ``[0.99, 1.0]`` at 2 bits: both map to the top code, so the dequantized group is
constant and re-quantizes by the constant-group rule).

Mixed formats pick the ``fmt.high_count(numel)`` weights of largest importance (default
``|w|``; ties go to the lower row-major index), mark them in a packed 1-bit mask, and quantize
the high and low weights separately, each compacted in row-major order.

``quantize`` is ``quant_params`` (choose the mask and grids from ``w``) followed by
``quantize_with`` (encode on them); the two halves are public so that error-feedback rounding
(``uqcit.tensor.gptq``) can fix the grid from the original weights and encode updated ones on it.

>>> import torch
>>> from uqcit.tensor.formats import QuantFormat
>>> w = torch.randn(64, 96)
>>> q = quantize(w, QuantFormat(bits=4, group_size=32))
>>> q.stored_bits == q.fmt.bits_for(w.numel())
True
>>> bool((dequantize(q) - w).abs().max() < 0.5)
True
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import torch

from uqcit.tensor.formats import FLOAT_BITS, QuantFormat
from uqcit.tensor.packing import pack, packed_nbytes, unpack, unpack_at

_FP16_MAX = 65504.0
_FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal): the floor for a scale


class TensorSpec(NamedTuple):
    """Dtype and element count of one stored 1-D tensor."""

    dtype: torch.dtype
    numel: int


def tensor_layout(numel: int, fmt: QuantFormat) -> dict[str, TensorSpec]:
    """Names, dtypes and sizes of every tensor a ``numel``-weight tensor stores in ``fmt``.

    The sizes add up to ``fmt.bits_for(numel)`` bits; ``QuantizedTensor`` checks its tensors
    against this layout, so a stored tensor can never disagree with its bit accounting.
    """
    if fmt.bits == FLOAT_BITS:
        return {"values": TensorSpec(torch.float16, numel)}
    n_high = fmt.high_count(numel)
    layout = _int_layout("", numel - n_high, fmt.bits, fmt.group_size, fmt.symmetric)
    if fmt.mixed:
        layout["mask"] = TensorSpec(torch.uint8, packed_nbytes(numel, 1))
        if fmt.high_bits == FLOAT_BITS:
            layout["high_values"] = TensorSpec(torch.float16, n_high)
        else:
            layout.update(_int_layout("high_", n_high, fmt.high_bits, fmt.group_size, fmt.symmetric))
    return layout


def _int_layout(prefix: str, count: int, bits: int, group_size: int, symmetric: bool) -> dict[str, TensorSpec]:
    groups = math.ceil(count / group_size)
    layout = {
        prefix + "codes": TensorSpec(torch.uint8, packed_nbytes(count, bits)),
        prefix + "scales": TensorSpec(torch.float16, groups),
    }
    if not symmetric:
        layout[prefix + "zeros"] = TensorSpec(torch.float16, groups)
    return layout


@dataclasses.dataclass(eq=False)  # equality of tensor dicts is ambiguous; compare tensors explicitly
class QuantizedTensor:
    """A quantized tensor: its shape, its format and every tensor it stores (all 1-D).

    Tensor names: ``codes`` (packed uint8), ``scales`` (fp16, one per group), ``zeros`` (fp16,
    asymmetric only); mixed formats add ``mask`` (packed 1-bit, row-major) and either
    ``high_values`` (fp16) or ``high_codes``/``high_scales``/``high_zeros`` (int8 groups);
    fp16 pass-through stores only ``values``. See ``tensor_layout``.
    """

    shape: tuple[int, ...]
    fmt: QuantFormat
    tensors: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if any(s < 0 for s in self.shape):
            raise ValueError(f"shape must be non-negative, got {self.shape}")
        layout = tensor_layout(self.numel, self.fmt)
        if set(self.tensors) != set(layout):
            raise ValueError(
                f"format {self.fmt.name} stores tensors {sorted(layout)}, got {sorted(self.tensors)}"
            )
        for name, spec in layout.items():
            t = self.tensors[name]
            if t.dtype != spec.dtype or t.dim() != 1 or t.numel() != spec.numel:
                raise ValueError(
                    f"tensor {name!r} of a {self.shape} {self.fmt.name} tensor must be 1-D {spec.dtype} "
                    f"with {spec.numel} elements, got {t.dtype} of shape {tuple(t.shape)}"
                )

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stored_bits(self) -> int:
        """All bits stored (equals ``fmt.bits_for(numel)`` by construction)."""
        return sum(8 * t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return self.stored_bits // 8

    @property
    def bits_per_weight(self) -> float:
        return self.stored_bits / self.numel

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        """A copy on ``device`` (dtypes never change: they are part of the format)."""
        return QuantizedTensor(self.shape, self.fmt, {k: v.to(device) for k, v in self.tensors.items()})

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors keyed ``prefix + name`` (pass a prefix ending in ``"."`` for dotted keys)."""
        return {prefix + name: t for name, t in self.tensors.items()}

    @classmethod
    def from_state_dict(
        cls, state: dict[str, torch.Tensor], prefix: str, shape: tuple[int, ...], fmt: QuantFormat
    ) -> "QuantizedTensor":
        """Read back what ``state_dict(prefix)`` wrote; other keys in ``state`` are ignored."""
        numel = math.prod(int(s) for s in shape)
        names = tensor_layout(numel, fmt)
        missing = [prefix + n for n in names if prefix + n not in state]
        if missing:
            raise ValueError(f"state lacks {missing}, needed by a {tuple(shape)} {fmt.name} tensor")
        return cls(tuple(shape), fmt, {n: state[prefix + n] for n in names})

    def meta(self) -> dict[str, Any]:
        """JSON-able description: shape and format (the tensors go to safetensors)."""
        return {"shape": list(self.shape), "fmt": self.fmt.to_dict()}

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor(shape={self.shape}, fmt={self.fmt.name}, "
            f"bpw={self.bits_per_weight:.4g}, nbytes={self.nbytes})"
        )


# ---------------------------------------------------------------------------------------------
# quantize


def quantize(w: torch.Tensor, fmt: QuantFormat, importance: torch.Tensor | None = None) -> QuantizedTensor:
    """Quantize ``w`` (any shape, floating point) into ``fmt``; ``w`` is never modified.

    ``importance`` (same shape as ``w``) ranks weights for the high-precision part of a mixed
    format; it defaults to ``|w|`` and is ignored by other formats.
    """
    return _quantize(w, fmt, importance, None)


@dataclasses.dataclass(frozen=True, eq=False)
class IntGrid:
    """The grid of one integer part: an fp16 scale (and zero point) per group of its values."""

    scales: torch.Tensor  # fp16 [groups]
    zeros: torch.Tensor | None  # fp16 [groups]; None for symmetric formats


@dataclasses.dataclass(frozen=True, eq=False)
class QuantParams:
    """What ``quantize`` decides before it writes codes: the mask and each part's grid.

    ``quant_params`` computes them from a tensor, ``quantize_with`` encodes a (possibly
    different) tensor of the same shape on them. Error-feedback rounding (``uqcit.tensor.gptq``)
    fixes the grid from the original weights, moves the weights, and stores them this way.
    """

    shape: tuple[int, ...]
    fmt: QuantFormat
    low: IntGrid | None  # the integer part (all weights, or the low ones of a mixed format); None for fp16
    mask: torch.Tensor | None  # bool [numel], row-major, True = high precision; mixed formats only
    high: IntGrid | None  # the int8 high part of a mixed format; None otherwise (fp16 high values have no grid)


def quant_params(w: torch.Tensor, fmt: QuantFormat, importance: torch.Tensor | None = None) -> QuantParams:
    """The mask and grids ``quantize(w, fmt, importance)`` uses (same rules, same bits)."""
    flat, shape = _flat(w)
    if fmt.bits == FLOAT_BITS:
        return QuantParams(shape, fmt, None, None, None)
    gs, sym = fmt.group_size, fmt.symmetric
    if not fmt.mixed:
        return QuantParams(shape, fmt, _int_grid(flat, fmt.bits, gs, sym), None, None)
    _check_fp16_range(flat, "w")
    mask = _high_mask(flat, shape, fmt, importance)
    low = _int_grid(_select(flat, ~mask), fmt.bits, gs, sym)
    high = None if fmt.high_bits == FLOAT_BITS else _int_grid(_select(flat, mask), fmt.high_bits, gs, sym)
    return QuantParams(shape, fmt, low, mask, high)


def quantize_with(w: torch.Tensor, params: QuantParams) -> QuantizedTensor:
    """Encode ``w`` on fixed ``params`` (from ``quant_params``, usually of another tensor).

    Values outside a group's range clamp to its end codes. ``quantize_with(w, quant_params(w,
    fmt))`` is ``quantize(w, fmt)``, byte for byte.
    """
    if not isinstance(params, QuantParams):
        raise TypeError(f"params must be a QuantParams (from quant_params), got {type(params).__name__}")
    return _quantize(w, params.fmt, None, params)


def _flat(w: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise ValueError(f"w must be a floating-point tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(w.shape)})")
    # Read-only from here on: `flat` may alias `w` when it is already contiguous float32.
    return w.detach().reshape(-1).to(torch.float32), tuple(w.shape)


def _quantize(w: torch.Tensor, fmt: QuantFormat, importance: torch.Tensor | None,
              params: QuantParams | None) -> QuantizedTensor:
    """``quantize`` (``params`` None: grids from ``w``) and ``quantize_with`` (grids given)."""
    flat, shape = _flat(w)
    if params is not None:
        if shape != params.shape:
            raise ValueError(f"w has shape {shape}, the quantization params are for {params.shape}")
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("w contains NaN or infinite values")
    gs, sym = fmt.group_size, fmt.symmetric

    def encode(x: torch.Tensor, bits: int, grid: IntGrid | None, prefix: str) -> dict[str, torch.Tensor]:
        if grid is None:
            grid = _int_grid(x, bits, gs, sym)
        return _encode_int(x, bits, gs, sym, grid, prefix)

    if fmt.bits == FLOAT_BITS:
        _check_fp16_range(flat, "w")
        return QuantizedTensor(shape, fmt, {"values": flat.to(torch.float16)})
    if not fmt.mixed:
        return QuantizedTensor(shape, fmt, encode(flat, fmt.bits, None if params is None else params.low, ""))

    _check_fp16_range(flat, "w")  # before ranking: NaN would scramble the selection
    mask = _high_mask(flat, shape, fmt, importance) if params is None else params.mask
    tensors = encode(_select(flat, ~mask), fmt.bits, None if params is None else params.low, "")
    tensors["mask"] = pack(mask.view(torch.uint8), 1)
    high = _select(flat, mask)
    if fmt.high_bits == FLOAT_BITS:
        tensors["high_values"] = high.to(torch.float16)
    else:
        tensors.update(encode(high, fmt.high_bits, None if params is None else params.high, "high_"))
    return QuantizedTensor(shape, fmt, tensors)


def _high_mask(flat: torch.Tensor, shape: tuple[int, ...], fmt: QuantFormat,
               importance: torch.Tensor | None) -> torch.Tensor:
    """The ``fmt.high_count`` weights of largest importance (default ``|w|``), as a 1-D bool mask."""
    if importance is None:
        importance = flat.abs()
    else:
        if tuple(importance.shape) != shape:
            raise ValueError(f"importance has shape {tuple(importance.shape)}, w has {shape}")
        importance = importance.detach().reshape(-1).to(device=flat.device, dtype=torch.float32)
        if not torch.isfinite(importance.sum()) and bool(torch.isnan(importance).any()):
            raise ValueError("importance contains NaN")
    return top_mask(importance, fmt.high_count(flat.numel()))


def top_mask(importance: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (1-D) of the ``k`` largest entries of 1-D ``importance``; ties go to lower indices."""
    n = importance.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if k == 0 or k == n:
        return torch.full((n,), k == n, dtype=torch.bool, device=importance.device)
    threshold = _kth_smallest(importance, n - k + 1)  # the k-th largest value
    mask = importance >= threshold
    extra = int(torch.count_nonzero(mask)) - k  # entries tied at the threshold beyond the k-th
    if extra > 0:  # drop the tied entries with the highest indices
        ties = torch.nonzero(importance == threshold).squeeze(1)
        mask[ties[ties.numel() - extra :]] = False
    return mask


def _kth_smallest(x: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank``-th smallest (1-based) value of 1-D ``x``, exactly.

    ``torch.kthvalue`` over tens of millions of elements takes most of a second on a laptop,
    so a fixed random sample first brackets the answer and the exact selection then runs on
    the few elements inside the bracket. Falls back to the full selection if the bracket
    misses (which only costs time, never correctness).
    """
    n = x.numel()
    if n <= 1 << 20:
        return torch.kthvalue(x, rank).values
    m = 1 << 16
    gen = torch.Generator().manual_seed(0)
    sample = x[torch.randint(n, (m,), generator=gen).to(x.device)]
    margin = 8 * math.sqrt(m) / 2 + 16  # ~8 binomial standard deviations of a sample quantile
    p = rank / n * m
    lo_rank = max(1, int(p - margin))
    hi_rank = min(m, int(p + margin) + 1)
    lo = torch.kthvalue(sample, lo_rank).values
    hi = torch.kthvalue(sample, hi_rank).values
    below = int(torch.count_nonzero(x < lo))
    window = _select(x, (x >= lo) & (x <= hi))
    if below < rank <= below + window.numel():
        return torch.kthvalue(window, rank - below).values
    return torch.kthvalue(x, rank).values


def _select(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x[mask]`` for 1-D tensors. On CPU numpy's boolean indexing is used: for the dense masks
    of mixed formats (90% of a 28M-element embedding) it is ~4x faster than torch's."""
    if x.device.type == "cpu":
        return torch.from_numpy(x.numpy()[mask.numpy()])
    return x[mask]


def _int_grid(x: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> IntGrid:
    """Group-wise fp16 scales (and zeros) of 1-D float32 ``x`` (rules in the module doc)."""
    if x.numel() == 0:
        empty = torch.empty(0, dtype=torch.float16, device=x.device)
        return IntGrid(empty, None if symmetric else empty.clone())
    lo, hi = _group_minmax(x, group_size)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("w contains NaN or infinite values")
    if float(torch.maximum(-lo, hi).max()) > _FP16_MAX:
        raise ValueError(f"integer formats store fp16 scales: |w| must be <= {_FP16_MAX}")
    if symmetric:
        return IntGrid(_symmetric_params(lo, hi, bits), None)
    return IntGrid(*_asymmetric_params(lo, hi, bits))


def _encode_int(x: torch.Tensor, bits: int, group_size: int, symmetric: bool, grid: IntGrid,
                prefix: str) -> dict[str, torch.Tensor]:
    """Packed codes of 1-D float32 ``x`` on ``grid``, with the grid's scales and zeros."""
    groups = math.ceil(x.numel() / group_size)
    if grid.scales.numel() != groups or (grid.zeros is None) != symmetric or (
            grid.zeros is not None and grid.zeros.numel() != groups):
        raise ValueError(f"a grid of {grid.scales.numel()} groups does not fit {x.numel()} values "
                         f"in groups of {group_size} ({'symmetric' if symmetric else 'asymmetric'})")
    if x.numel() == 0:
        layout = _int_layout(prefix, 0, bits, group_size, symmetric)
        return {k: torch.empty(0, dtype=spec.dtype, device=x.device) for k, spec in layout.items()}
    scale, zero = grid.scales, grid.zeros
    if symmetric:
        # + 2**(b-1) turns the signed level into the unsigned code; clamping the code to
        # [1, qmax] clamps the level to +-(2**(b-1) - 1), symmetric, so code 0 is never used.
        offset = torch.full_like(scale, float(1 << (bits - 1)), dtype=torch.float32)
    else:
        offset = zero.to(torch.float32)
    s32 = scale.to(torch.float32)
    qmax = (1 << bits) - 1
    qmin = 1 if symmetric else 0

    def encode(part: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        q = torch.round(part / s)  # same op, same operands as the top-code checks of the params
        return q.add_(z).clamp_(qmin, qmax).to(torch.uint8)

    codes = _per_group(x, group_size, encode, s32, offset)
    out = {prefix + "codes": pack(codes, bits), prefix + "scales": scale}
    if zero is not None:
        out[prefix + "zeros"] = zero
    return out


def _asymmetric_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scale and zero per group from its float32 min/max (rules in the module doc)."""
    qmax = (1 << bits) - 1
    lo0 = lo.clamp(max=0.0)
    hi0 = hi.clamp(min=0.0)
    scale = _fp16_scale((hi0 - lo0) / qmax)
    zero, top = _zero_and_top(lo0, hi0, scale, qmax)
    short = _short(scale, top, qmax)
    if bool(short.any()):
        scale = torch.where(short, _one_ulp_down(scale), scale)
        zero, _ = _zero_and_top(lo0, hi0, scale, qmax)
    const = lo == hi
    if bool(const.any()):
        # c > 0: scale |c|, zero 0, code 1.  c < 0: scale |c|, zero 1, code 0.  c == 0: scale 1, code 0.
        c = lo
        scale = torch.where(const, _const_scale(c), scale)
        zero = torch.where(const, (c < 0).to(torch.float16), zero)
    return scale, zero


def _zero_and_top(lo0: torch.Tensor, hi0: torch.Tensor, scale: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    s32 = scale.to(torch.float32)
    zero = torch.round(-lo0 / s32).clamp_(0, qmax)
    top = torch.round(hi0 / s32) + zero  # the code the largest value gets, computed as in encode
    return zero.to(torch.float16), top


def _symmetric_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    qpos = (1 << (bits - 1)) - 1
    absmax = torch.maximum(-lo, hi)
    scale = _fp16_scale(absmax / qpos)
    top = torch.round(absmax / scale.to(torch.float32))  # |level| of the absmax value, as in encode
    short = _short(scale, top, qpos)
    if bool(short.any()):
        scale = torch.where(short, _one_ulp_down(scale), scale)
    const = lo == hi
    if bool(const.any()):
        scale = torch.where(const, _const_scale(lo), scale)
    return scale


def _short(scale: torch.Tensor, top: torch.Tensor, qtop: int) -> torch.Tensor:
    """Groups whose largest value fell short of the top code because fp16 rounded the scale up.

    A scale rounded to the nearest fp16 can exceed the exact one: by up to 2**-12 relative for
    normal fp16, far more for subnormal scales (below 2**-14, where fp16 has fewer digits). Then
    the group's extreme lands below the top code, and re-quantizing the dequantized group
    would find a smaller range and a different scale. One fp16 ulp down puts the scale below
    the exact one, so the extreme reaches the top code (or just past it, and is clamped).
    """
    return (top < qtop) & (scale > _FP16_TINY)


def _one_ulp_down(scale: torch.Tensor) -> torch.Tensor:
    """The next smaller fp16 of positive fp16 ``scale`` (positive floats order like their bits)."""
    return (scale.view(torch.int16) - 1).view(torch.float16)


def _const_scale(c: torch.Tensor) -> torch.Tensor:
    """Scale that stores a constant group ``c`` exactly as code +-1 (1 for c == 0)."""
    mag = _fp16_scale(c.abs())
    return torch.where(c == 0, torch.ones_like(mag), mag)


def _fp16_scale(s: torch.Tensor) -> torch.Tensor:
    """Round float32 scales to fp16, never to zero (a zero scale would divide by zero)."""
    return s.to(torch.float16).clamp_(min=_FP16_TINY)


def _check_fp16_range(x: torch.Tensor, name: str) -> None:
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x)
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        raise ValueError(f"{name} contains NaN or infinite values")
    if max(-float(lo), float(hi)) > _FP16_MAX:
        raise ValueError(f"{name} has values beyond the fp16 range (|x| <= {_FP16_MAX})")


def _group_minmax(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max of 1-D ``x`` (last group may be short)."""
    lows, highs = [], []
    for part in _group_parts(x, group_size):
        lo, hi = torch.aminmax(part, dim=1)
        lows.append(lo)
        highs.append(hi)
    return torch.cat(lows), torch.cat(highs)


def _group_parts(x: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    """2-D views of 1-D ``x``: the full groups [G, group_size], then the short last group [1, r]."""
    full = x.numel() // group_size
    parts = []
    if full:
        parts.append(x[: full * group_size].view(full, group_size))
    if x.numel() > full * group_size:
        parts.append(x[full * group_size :].view(1, -1))
    return parts


def _per_group(x: torch.Tensor, group_size: int, fn: Callable[..., torch.Tensor], *params: torch.Tensor) -> torch.Tensor:
    """Apply ``fn(part2d, *params_per_row)`` group-wise and return the flat result.

    ``params`` hold one value per group; each is passed as a column that broadcasts over its
    group. Full groups are handled as one 2-D view, the short last group separately, so no
    padded copy of ``x`` is ever made.
    """
    outs = []
    start = 0
    for part in _group_parts(x, group_size):
        rows = part.shape[0]
        outs.append(fn(part, *(p[start : start + rows].unsqueeze(1) for p in params)).reshape(-1))
        start += rows
    return outs[0] if len(outs) == 1 else torch.cat(outs)


# ---------------------------------------------------------------------------------------------
# dequantize


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor ``q`` stands for, shaped ``q.shape``, computed in float32 and cast to ``dtype``."""
    fmt, t = q.fmt, q.tensors
    if fmt.bits == FLOAT_BITS:
        return t["values"].view(q.shape).to(dtype)
    numel = q.numel
    if not fmt.mixed:
        out = _dequantize_int(t, "", numel, fmt.bits, fmt.group_size, fmt.symmetric)
    else:
        mask = unpack(t["mask"], 1, numel).view(torch.bool)
        n_high = fmt.high_count(numel)
        if fmt.high_bits == FLOAT_BITS:
            high = t["high_values"].to(torch.float32)
        else:
            high = _dequantize_int(t, "high_", n_high, fmt.high_bits, fmt.group_size, fmt.symmetric)
        out = torch.empty(numel, dtype=torch.float32, device=q.device)
        out.masked_scatter_(mask, high)
        out.masked_scatter_(~mask, _dequantize_int(t, "", numel - n_high, fmt.bits, fmt.group_size, fmt.symmetric))
    return out.view(q.shape).to(dtype)


def _dequantize_int(t: dict[str, torch.Tensor], prefix: str, count: int, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    codes = unpack(t[prefix + "codes"], bits, count).to(torch.float32)
    scale = t[prefix + "scales"].to(torch.float32)
    offset = _offsets(t, prefix, bits, symmetric, scale)
    # In place on the fresh float copy of the codes: (code - offset) * scale, group by group.
    start = 0
    for part in _group_parts(codes, group_size):
        rows = slice(start, start + part.shape[0])
        part.sub_(offset[rows].unsqueeze(1)).mul_(scale[rows].unsqueeze(1))
        start = rows.stop
    return codes


def _offsets(t: dict[str, torch.Tensor], prefix: str, bits: int, symmetric: bool, scale: torch.Tensor) -> torch.Tensor:
    """Per-group code offset: the zero point, or 2**(bits-1) for symmetric groups."""
    if symmetric:
        return torch.full_like(scale, float(1 << (bits - 1)))
    return t[prefix + "zeros"].to(torch.float32)


def dequantize_at(q: QuantizedTensor, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``dequantize(q).view(-1)[index]`` without dequantizing the rest (same float ops, same bits).

    ``index`` is an int64 tensor of any shape holding row-major element positions; the result
    has its shape. Used by ``QuantEmbedding`` to dequantize only the rows it looks up.
    """
    fmt, t = q.fmt, q.tensors
    index = index.to(torch.int64)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= q.numel):
        raise IndexError(f"element index out of range [0, {q.numel})")
    if fmt.bits == FLOAT_BITS:
        return t["values"][index].to(dtype)
    numel, gs, sym = q.numel, fmt.group_size, fmt.symmetric
    if not fmt.mixed:
        return _dequantize_int_at(t, "", numel, fmt.bits, gs, sym, index).to(dtype)
    # Locate each element in its compacted part: its rank among the mask's set bits before it.
    is_high, rank = _mask_rank(t["mask"], index)
    n_high = fmt.high_count(numel)
    out = torch.empty(index.shape, dtype=torch.float32, device=index.device)
    hi_rank = rank[is_high]
    if fmt.high_bits == FLOAT_BITS:
        out[is_high] = t["high_values"][hi_rank].to(torch.float32)
    else:
        out[is_high] = _dequantize_int_at(t, "high_", n_high, fmt.high_bits, gs, sym, hi_rank)
    low = ~is_high
    out[low] = _dequantize_int_at(t, "", numel - n_high, fmt.bits, gs, sym, index[low] - rank[low])
    return out.to(dtype)


def _dequantize_int_at(t: dict[str, torch.Tensor], prefix: str, count: int, bits: int, group_size: int,
                       symmetric: bool, index: torch.Tensor) -> torch.Tensor:
    codes = unpack_at(t[prefix + "codes"], bits, count, index).to(torch.float32)
    group = index // group_size
    scale = t[prefix + "scales"].to(torch.float32)
    offset = _offsets(t, prefix, bits, symmetric, scale)
    return codes.sub_(offset[group]).mul_(scale[group])  # the ops of _dequantize_int, element-wise


def _popcount(x: torch.Tensor) -> torch.Tensor:
    """Set bits of each uint8 (SWAR bit tricks: a few cheap uint8 passes, no lookup gather)."""
    x = x - ((x >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return (x + (x >> 4)) & 0x0F


def _mask_rank(mask: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each position in ``index``: is its mask bit set, and how many set bits precede it."""
    per_byte = _popcount(mask)
    before_byte = torch.cumsum(per_byte, 0, dtype=torch.int64) - per_byte  # set bits in earlier bytes
    byte, bit = index >> 3, index & 7
    value = mask[byte]
    is_high = ((value >> bit) & 1).bool()
    below = _popcount(value & ((1 << bit) - 1).to(torch.uint8))  # set bits before it in its byte
    return is_high, before_byte[byte] + below


def codes_of(q: QuantizedTensor) -> dict[str, torch.Tensor]:
    """Unpacked uint8 codes of every packed tensor of ``q`` (``codes``, ``high_codes``, ``mask``)."""
    fmt, numel = q.fmt, q.numel
    if fmt.bits == FLOAT_BITS:
        return {}
    n_high = fmt.high_count(numel)
    out = {"codes": unpack(q.tensors["codes"], fmt.bits, numel - n_high)}
    if fmt.mixed:
        out["mask"] = unpack(q.tensors["mask"], 1, numel)
        if fmt.high_bits != FLOAT_BITS:
            out["high_codes"] = unpack(q.tensors["high_codes"], fmt.high_bits, n_high)
    return out


def quant_error(w: torch.Tensor, q: QuantizedTensor) -> dict[str, float]:
    """Error of ``q`` against the original ``w``.

    Keys: ``rel_fro`` (||w - w_hat||_F / ||w||_F), ``sqnr_db`` (10 log10 of signal over
    error power; inf when exact), ``mse``, ``max_abs``.
    """
    if tuple(w.shape) != q.shape:
        raise ValueError(f"w has shape {tuple(w.shape)}, q has {q.shape}")
    ref = w.detach().to(torch.float32)
    err = dequantize(q).to(ref.device) - ref
    signal = float(ref.square().sum())
    noise = float(err.square().sum())
    return {
        "rel_fro": math.sqrt(noise / signal) if signal > 0 else (0.0 if noise == 0 else math.inf),
        "sqnr_db": 10 * math.log10(signal / noise) if noise > 0 else math.inf,
        "mse": noise / ref.numel(),
        "max_abs": float(err.abs().max()),
    }
