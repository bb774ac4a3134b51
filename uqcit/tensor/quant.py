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

Formats with ``scale_bits`` store each integer part's group scales double-quantized (integer
codes under fp16 super-scales; rules in the docstring of ``uqcit.tensor.grid``). Weights on
such a grid whose groups reach their end codes re-quantize to it exactly. The rounding of a scale
to its code can leave a group short of its end codes (its decoded scale rounded up); re-quantizing
that group then finds a narrower range and a smaller code (measured: about 1% of the weights of
``w3-g48-iz-s6`` on Gaussian data move; ``w4-g32-sym-s6`` none).

Mixed formats pick the ``fmt.high_count(numel)`` weights of largest importance (default
``|w|``; ties go to the lower row-major index), mark them in a packed 1-bit mask, and quantize
the high and low weights separately, each compacted in row-major order (``uqcit.tensor.mask``).

``quantize`` is ``quant_params`` (choose the mask and grids from ``w``) followed by
``quantize_with`` (encode on them); the two halves are public so that error-feedback rounding
(``uqcit.tensor.gptq``) can fix the grid from the original weights and encode updated ones on it.
The integer rule above, for one part, is ``uqcit.tensor.grid``; this module assembles formats from it.
Lookup-table formats (``fmt.lut``: absmax scales and a fitted table of levels, rounding to the
nearest level) are ``uqcit.tensor.lut``; ``table_weight`` weights the fit of their table. Vector
codebook formats (``fmt.vq``: one code per ``vq`` consecutive weights into a fitted codebook of points,
absmax scales as lut) are ``uqcit.tensor.vq``; ``table_weight`` weights their codebook's fit likewise.

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
from typing import Any

import torch

from uqcit.tensor.formats import FLOAT_BITS, QuantFormat
from uqcit.tensor.grid import (  # noqa: F401 (IntGrid, TensorSpec: public here too)
    IntGrid,
    TensorSpec,
    check_fp16_range,
    dequantize_int,
    dequantize_int_at,
    encode_int,
    group_offsets,
    group_scales,
    int_grid,
    int_layout,
    searched_grid,
)
from uqcit.tensor.lut import LutGrid, dequantize_lut, dequantize_lut_at, encode_lut, lut_grid, lut_layout, nl_grid
from uqcit.tensor.mask import high_mask, mask_rank, select
from uqcit.tensor.packing import pack, packed_nbytes, unpack
from uqcit.tensor.vq import VqGrid, dequantize_vq, dequantize_vq_at, encode_vq, vq_grid, vq_layout


def tensor_layout(numel: int, fmt: QuantFormat) -> dict[str, TensorSpec]:
    """Names, dtypes and sizes of every tensor a ``numel``-weight tensor stores in ``fmt``.

    The sizes add up to ``fmt.bits_for(numel)`` bits; ``QuantizedTensor`` checks its tensors
    against this layout, so a stored tensor can never disagree with its bit accounting.
    """
    if fmt.bits == FLOAT_BITS:
        return {"values": TensorSpec(torch.float16, numel)}
    if fmt.lut:
        return lut_layout(numel, fmt.bits, fmt.group_size)
    if fmt.vq:
        return vq_layout(numel, fmt.bits, fmt.group_size, fmt.vq)
    n_high = fmt.high_count(numel)
    kw = dict(int_zeros=fmt.int_zeros, scale_bits=fmt.scale_bits)
    layout = int_layout("", numel - n_high, fmt.bits, fmt.group_size, fmt.symmetric, **kw)
    if fmt.mixed:
        layout["mask"] = TensorSpec(torch.uint8, packed_nbytes(numel, 1))
        if fmt.high_bits == FLOAT_BITS:
            layout["high_values"] = TensorSpec(torch.float16, n_high)
        else:
            layout.update(int_layout("high_", n_high, fmt.high_bits, fmt.group_size, fmt.symmetric, **kw))
    return layout


@dataclasses.dataclass(eq=False)  # equality of tensor dicts is ambiguous; compare tensors explicitly
class QuantizedTensor:
    """A quantized tensor: its shape, its format and every tensor it stores (all 1-D).

    Tensor names: ``codes`` (packed uint8), ``scales`` (fp16, one per group; with ``scale_bits``
    instead ``scale_codes``, packed, and ``super_scales``, fp16), ``zeros`` (fp16, or packed with
    ``int_zeros``; asymmetric only); mixed formats add ``mask`` (packed 1-bit, row-major) and either
    ``high_values`` (fp16) or ``high_codes``/``high_scales``/``high_zeros`` (int8 groups);
    lookup-table formats store ``codes``, ``scales`` and ``table`` (fp16, ``2**bits`` levels), vector
    codebook formats the same names (``vq * bits``-bit codes, a flat ``[2**(vq*bits), vq]`` codebook);
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


def quantize(w: torch.Tensor, fmt: QuantFormat, importance: torch.Tensor | None = None, *,
             table_weight: torch.Tensor | None = None) -> QuantizedTensor:
    """Quantize ``w`` (any shape, floating point) into ``fmt``; ``w`` is never modified.

    ``importance`` (same shape as ``w``) ranks weights for the high-precision part of a mixed
    format; it defaults to ``|w|`` and is ignored by other formats. ``table_weight`` (same shape,
    non-negative) weights each weight's squared error in the table fit of a lookup-table format, or
    the codebook fit of a vector codebook format (e.g. the input Hessian diagonal of its column); None
    is plain MSE; other formats ignore it.
    """
    if fmt.lut or fmt.vq:
        return quantize_with(w, quant_params(w, fmt, table_weight=table_weight))
    return _quantize(w, fmt, importance, None)


@dataclasses.dataclass(frozen=True, eq=False)
class QuantParams:
    """What ``quantize`` decides before it writes codes: the mask and each part's grid.

    ``quant_params`` computes them from a tensor, ``quantize_with`` encodes a (possibly
    different) tensor of the same shape on them. Error-feedback rounding (``uqcit.tensor.gptq``)
    fixes the grid from the original weights, moves the weights, and stores them this way.
    """

    shape: tuple[int, ...]
    fmt: QuantFormat
    low: IntGrid | LutGrid | VqGrid | None  # the integer part (all weights, or the low ones of a mixed format), or
    # the scales and table of a lookup-table format, or the scales and codebook of a vq format; None for fp16
    mask: torch.Tensor | None  # bool [numel], row-major, True = high precision; mixed formats only
    high: IntGrid | None  # the int8 high part of a mixed format; None otherwise (fp16 high values have no grid)


def quant_params(w: torch.Tensor, fmt: QuantFormat, importance: torch.Tensor | None = None, *,
                 search: bool = False, search_weight: torch.Tensor | None = None,
                 table_weight: torch.Tensor | None = None) -> QuantParams:
    """The mask and grids ``quantize(w, fmt, importance, table_weight=table_weight)`` uses (same
    rules, same bits).

    ``search=True`` chooses each group's range by clipping search instead (``grid.searched_grid``;
    ``search_weight``, shaped like ``w``, weights the squared errors, e.g. by the input Hessian
    diagonal of each weight's column). Same format, same bits; only the scales and zeros differ.
    Lookup-table and vector codebook formats have no range to search (their levels or points are
    fitted, their scales are the absmax): ``search`` and ``search_weight`` leave them alone;
    ``table_weight`` weights their fit.
    """
    flat, shape = _flat(w)
    if fmt.bits == FLOAT_BITS:
        return QuantParams(shape, fmt, None, None, None)
    if fmt.lut or fmt.vq:
        tw = None if table_weight is None else table_weight.detach().reshape(-1).to(flat)
        if tw is not None and tw.numel() != flat.numel():
            raise ValueError(f"table_weight has {tw.numel()} elements, w {flat.numel()}")
        if fmt.vq:
            return QuantParams(shape, fmt, vq_grid(flat, fmt.bits, fmt.group_size, fmt.vq, tw), None, None)
        grid = nl_grid(flat, fmt.group_size, tw) if fmt.nl else lut_grid(flat, fmt.bits, fmt.group_size, tw)
        return QuantParams(shape, fmt, grid, None, None)
    gs, sym, sb = fmt.group_size, fmt.symmetric, fmt.scale_bits
    sw = None if search_weight is None else search_weight.detach().reshape(-1).to(flat)

    def grid_of(x: torch.Tensor, bits: int, part: torch.Tensor | None) -> IntGrid:
        if not search:
            return int_grid(x, bits, gs, sym, sb)
        return searched_grid(x, bits, gs, sym, weight=None if sw is None else (sw if part is None else sw[part]),
                             scale_bits=sb)

    if not fmt.mixed:
        return QuantParams(shape, fmt, grid_of(flat, fmt.bits, None), None, None)
    check_fp16_range(flat, "w")
    mask = high_mask(flat, shape, fmt, importance)
    low = grid_of(select(flat, ~mask), fmt.bits, ~mask)
    high = None if fmt.high_bits == FLOAT_BITS else grid_of(select(flat, mask), fmt.high_bits, mask)
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
            grid = int_grid(x, bits, gs, sym, fmt.scale_bits)
        return encode_int(x, bits, gs, sym, grid, prefix, int_zeros=fmt.int_zeros, scale_bits=fmt.scale_bits)

    if fmt.bits == FLOAT_BITS:
        check_fp16_range(flat, "w")
        return QuantizedTensor(shape, fmt, {"values": flat.to(torch.float16)})
    if fmt.lut:  # params given: quantize() fits the grid through quant_params first
        return QuantizedTensor(shape, fmt, encode_lut(flat, fmt.bits, gs, params.low))
    if fmt.vq:  # likewise
        return QuantizedTensor(shape, fmt, encode_vq(flat, fmt.bits, gs, fmt.vq, params.low))
    if not fmt.mixed:
        return QuantizedTensor(shape, fmt, encode(flat, fmt.bits, None if params is None else params.low, ""))

    check_fp16_range(flat, "w")  # before ranking: NaN would scramble the selection
    mask = high_mask(flat, shape, fmt, importance) if params is None else params.mask
    tensors = encode(select(flat, ~mask), fmt.bits, None if params is None else params.low, "")
    tensors["mask"] = pack(mask.view(torch.uint8), 1)
    high = select(flat, mask)
    if fmt.high_bits == FLOAT_BITS:
        tensors["high_values"] = high.to(torch.float16)
    else:
        tensors.update(encode(high, fmt.high_bits, None if params is None else params.high, "high_"))
    return QuantizedTensor(shape, fmt, tensors)


# ---------------------------------------------------------------------------------------------
# dequantize


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor ``q`` stands for, shaped ``q.shape``, computed in float32 and cast to ``dtype``."""
    fmt, t = q.fmt, q.tensors
    if fmt.bits == FLOAT_BITS:
        return t["values"].view(q.shape).to(dtype)
    numel = q.numel
    kw = dict(int_zeros=fmt.int_zeros, scale_bits=fmt.scale_bits)
    if fmt.lut:
        out = dequantize_lut(t, numel, fmt.bits, fmt.group_size)
    elif fmt.vq:
        out = dequantize_vq(t, numel, fmt.bits, fmt.group_size, fmt.vq)
    elif not fmt.mixed:
        out = dequantize_int(t, "", numel, fmt.bits, fmt.group_size, fmt.symmetric, **kw)
    else:
        mask = unpack(t["mask"], 1, numel).view(torch.bool)
        n_high = fmt.high_count(numel)
        if fmt.high_bits == FLOAT_BITS:
            high = t["high_values"].to(torch.float32)
        else:
            high = dequantize_int(t, "high_", n_high, fmt.high_bits, fmt.group_size, fmt.symmetric, **kw)
        out = torch.empty(numel, dtype=torch.float32, device=q.device)
        out.masked_scatter_(mask, high)
        out.masked_scatter_(~mask, dequantize_int(t, "", numel - n_high, fmt.bits, fmt.group_size, fmt.symmetric,
                                                  **kw))
    return out.view(q.shape).to(dtype)


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
    kw = dict(int_zeros=fmt.int_zeros, scale_bits=fmt.scale_bits)
    if fmt.lut:
        return dequantize_lut_at(t, numel, fmt.bits, gs, index).to(dtype)
    if fmt.vq:
        return dequantize_vq_at(t, numel, fmt.bits, gs, fmt.vq, index).to(dtype)
    if not fmt.mixed:
        return dequantize_int_at(t, "", numel, fmt.bits, gs, sym, index, **kw).to(dtype)
    # Locate each element in its compacted part: its rank among the mask's set bits before it.
    is_high, rank = mask_rank(t["mask"], index)
    n_high = fmt.high_count(numel)
    out = torch.empty(index.shape, dtype=torch.float32, device=index.device)
    hi_rank = rank[is_high]
    if fmt.high_bits == FLOAT_BITS:
        out[is_high] = t["high_values"][hi_rank].to(torch.float32)
    else:
        out[is_high] = dequantize_int_at(t, "high_", n_high, fmt.high_bits, gs, sym, hi_rank, **kw)
    low = ~is_high
    out[low] = dequantize_int_at(t, "", numel - n_high, fmt.bits, gs, sym, index[low] - rank[low], **kw)
    return out.to(dtype)


def codes_of(q: QuantizedTensor) -> dict[str, torch.Tensor]:
    """Unpacked uint8 codes of every packed tensor of ``q`` (``codes``, ``high_codes``, ``mask``; a vq
    format's ``codes`` are one per vector)."""
    fmt, numel = q.fmt, q.numel
    if fmt.bits == FLOAT_BITS:
        return {}
    if fmt.vq:
        return {"codes": unpack(q.tensors["codes"], fmt.vq * fmt.bits, math.ceil(numel / fmt.vq))}
    n_high = fmt.high_count(numel)
    out = {"codes": unpack(q.tensors["codes"], fmt.bits, numel - n_high)}
    if fmt.mixed:
        out["mask"] = unpack(q.tensors["mask"], 1, numel)
        if fmt.high_bits != FLOAT_BITS:
            out["high_codes"] = unpack(q.tensors["high_codes"], fmt.high_bits, n_high)
    return out


def zero_points(q: QuantizedTensor, prefix: str = "") -> torch.Tensor:
    """Float32 per-group code offsets of ``q``'s integer part ``prefix`` (``""`` or ``"high_"``):
    its zero points however they are stored, or ``2**(bits-1)`` when symmetric, so that
    ``w_hat = (code - offset) * scale``. Exporters read zero points through this.

    >>> import torch
    >>> from uqcit.tensor.formats import parse_format
    >>> zero_points(quantize(torch.arange(8.0) + 1, parse_format("w2-g4-iz"))).tolist()
    [0.0, 0.0]
    """
    fmt = q.fmt
    _refuse_lut(q, "zero points")
    bits = fmt.high_bits if prefix == "high_" else fmt.bits
    return group_offsets(q.tensors, prefix, math.ceil(_part_count(q, prefix) / fmt.group_size), bits,
                         fmt.symmetric, fmt.int_zeros)


def scales_of(q: QuantizedTensor, prefix: str = "") -> torch.Tensor:
    """Float32 per-group scales of ``q``'s integer part ``prefix`` (``""`` or ``"high_"``): the fp16
    scales, or the decoded ones of a ``scale_bits`` format. ``w_hat = (code - offset) * scale``.

    >>> import torch
    >>> from uqcit.tensor.formats import parse_format
    >>> w = torch.tensor([0.0, 1, 2, 3, 0, 5, 10, 15])  # scales 3 and 15: super-scale 15 / (2**4 - 1)
    >>> scales_of(quantize(w, parse_format("w2-g4-sym-s4"))).tolist()
    [3.0, 15.0]
    """
    _refuse_lut(q, "scales")
    return group_scales(q.tensors, prefix, _part_count(q, prefix), q.fmt.group_size, q.fmt.scale_bits)


def _refuse_lut(q: QuantizedTensor, what: str) -> None:
    """Integer-grid readers decline lookup-table and vector codebook tensors: read as ``(code - offset) *
    scale``, their codes would silently decode to the wrong weights."""
    if q.fmt.lut or q.fmt.vq:
        module = "uqcit.tensor.vq: one code per vector" if q.fmt.vq else "uqcit.tensor.lut"
        raise ValueError(f"{q.fmt.name} decodes scale * table[code] ({module}), not (code - offset) * "
                         f"scale: its {what} are not an integer grid's; dequantize() reads it")


def _part_count(q: QuantizedTensor, prefix: str) -> int:
    """Values in ``q``'s integer part ``prefix``: the high-precision weights, or all the others."""
    n_high = q.fmt.high_count(q.numel)
    return n_high if prefix == "high_" else q.numel - n_high


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
