"""Error-feedback rounding (GPTQ, Frantar et al. 2022), written from the paper's algorithm.

Round-to-nearest minimizes ``‖W − Ŵ‖`` weight by weight. GPTQ minimizes the layer's output
error on calibration inputs, ``‖XWᵀ − XŴᵀ‖² = tr((W − Ŵ) H (W − Ŵ)ᵀ)`` with ``H = XᵀX``: it
quantizes one input column at a time and spreads that column's rounding error over the
columns not yet quantized, weighted by the inverse Hessian (the Optimal Brain Surgeon update).
The paper's three practical steps are all here:

- one shared column order for every row, so ``H⁻¹`` is computed once per layer: the rows of
  the upper Cholesky factor ``U`` of ``H⁻¹`` are exactly the OBS updates of successive columns;
- lazy batch updates: inside a block of ``block_size`` columns the error is propagated column
  by column; the rest of the matrix is updated once per block with one matrix product;
- dampening (``damp`` × mean diagonal added to ``H``) and, optionally, act-order (columns in
  order of decreasing ``diag(H)``: the columns with the largest inputs are quantized first,
  while most columns can still absorb their error).

Dead input columns (an input that is always zero on the calibration text, ``H[j, j] = 0``) get
``H[j, j] = 1``; their weights are rounded to nearest and propagate nothing, rather than being
zeroed as in the reference code: the calibration text merely never excited them.

The grid is *static*: scales, zeros and (mixed formats) the high-precision mask are chosen
once from the original ``W`` by ``quant.quant_params``, exactly as ``quant.quantize`` chooses
them, and every weight is rounded onto its own group's grid (fp16 high weights: to fp16). The
updated weights are then encoded on that grid with ``quant.quantize_with``, so the result is
an ordinary ``QuantizedTensor`` in the same packed layout, with ``fmt.bits_for(numel)`` bits,
that ``dequantize`` and ``QuantLinear`` use unchanged. (Static groups are also what makes
act-order compatible with consecutive row-major groups.) With double-quantized scales
(``fmt.scale_bits``) the grid holds the decoded scales (scale code times super-scale), so the
error feedback rounds onto the grid that is stored. Lookup-table formats (``fmt.lut``) fix their
absmax scales and fit their table once, on the original ``W`` with each weight's squared error
weighted by the Hessian diagonal of its column (``quant.quant_params(table_weight=...)``); the
loop then rounds each column to the nearest level times its group's scale (``lut.nearest``, as
``quantize_with`` encodes it). Vector codebook formats (``fmt.vq = d``) fit their codebook the same
way; their vectors are ``d`` consecutive columns of a row, so the loop takes ``d`` columns at a time:
it rounds each row's vector jointly to the nearest point (``vq.round_vectors``, as ``quantize_with``
encodes it), then feeds the error back column by column as usual, the later columns of the vector
already rounded (their error includes the update from the earlier ones). Act-order then orders whole
vectors (by the sum of their columns' ``diag(H)``, ``vq.vector_order``), and blocks hold whole
vectors (``block_size`` rounded down to a multiple of ``d``); the input width must be a multiple of ``d``.

>>> import torch
>>> from uqcit.tensor.formats import QuantFormat
>>> x = torch.randn(512, 64) @ torch.randn(64, 64)  # correlated inputs
>>> w = torch.randn(32, 64)
>>> q = gptq_quantize(w, x.T @ x / 512, QuantFormat(bits=3, group_size=64))
>>> q.stored_bits == q.fmt.bits_for(w.numel())
True
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import torch

from uqcit.tensor.formats import FLOAT_BITS, QuantFormat
from uqcit.tensor.grid import IntGrid
from uqcit.tensor.lut import nearest
from uqcit.tensor.quant import QuantizedTensor, quant_params, quantize, quantize_with
from uqcit.tensor.vq import round_vectors, vector_order

_DAMP_RETRIES = 3  # a Hessian that is still singular after damp × 10³ is a bug upstream, not noise


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, fmt: QuantFormat, *, damp: float = 0.01,
                  act_order: bool = True, block_size: int = 128,
                  importance: torch.Tensor | None = None, grid_search: bool = False) -> QuantizedTensor:
    """Quantize ``w`` ``[out, in]`` into ``fmt`` by error-feedback rounding against ``hessian``.

    ``hessian`` is ``[in, in]``, proportional to ``XᵀX`` of the layer's calibration inputs
    (``uqcit.inputs.calibration.collect_input_stats`` gives its token mean; the scale does not
    matter). ``importance`` picks the high-precision weights of a mixed format, as in
    ``quantize``. ``grid_search`` chooses the static grid by clipping search weighted by the
    Hessian diagonal (``quant.quant_params(search=True)``) instead of each group's min/max.
    Lookup-table and vector codebook formats always fit their table weighted by the Hessian diagonal
    (``grid_search`` changes nothing for them); with a vq format ``act_order`` orders whole vectors,
    and ``w``'s width must be a multiple of the vector length (module docstring). ``w`` and
    ``hessian`` are never modified. fp16 formats are stored directly.
    """
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        raise ValueError(f"w must be a 2-D floating-point [out, in] matrix, got "
                         f"{getattr(w, 'dtype', type(w).__name__)} of shape {tuple(getattr(w, 'shape', ()))}")
    n = w.shape[1]
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (n, n):
        raise ValueError(f"hessian must be [{n}, {n}] for w of shape {tuple(w.shape)}, "
                         f"got {tuple(getattr(hessian, 'shape', ()))}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian contains NaN or infinite values")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if fmt.bits == FLOAT_BITS:
        return quantize(w, fmt)
    step = fmt.vq or 1  # columns rounded together: a vector's
    if n % step:
        raise ValueError(f"GPTQ on {fmt.name} rounds vectors of {step} consecutive columns, but w has {n} columns; "
                         "use method 'rtn' for this weight")
    block_size = max(step, block_size - block_size % step)

    weight = w.detach().to(torch.float32)
    # The static grid, from the original weights.
    diag = hessian.diagonal().to(weight).clamp(min=0).expand_as(weight)
    params = quant_params(weight, fmt, importance, search=grid_search, search_weight=diag if grid_search else None,
                          table_weight=diag if fmt.lut or fmt.vq else None)
    grid = _ElementGrid.of(params)

    h = hessian.detach().to(device=weight.device, dtype=torch.float32).clone()
    dead = torch.nonzero(h.diagonal() == 0).squeeze(1)
    h[dead, dead] = 1.0
    # Work on a copy of Wᵀ [in, out] (updated in place): a column of W is then a contiguous row.
    wt = weight.t().clone(memory_format=torch.contiguous_format)
    perm = None
    if act_order:
        perm = (vector_order(h.diagonal(), step) if fmt.vq else
                torch.argsort(h.diagonal(), descending=True, stable=True))
        h = h[perm][:, perm]
        wt = wt[perm]
        grid = grid.rows(perm)
    u = _inverse_cholesky_upper(h, damp)
    qt = _error_feedback(wt, u, grid, block_size)
    if perm is not None:
        qt = qt[torch.argsort(perm)]
    return quantize_with(qt.t(), params)


def asymmetric_target(w: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, *,
                      damp: float = 0.01) -> torch.Tensor:
    """The weights whose GPTQ rounding on the quantized model's inputs matches the float model's
    outputs (asymmetric calibration, after GPTAQ, Li et al., ICML 2025): ``W' = W + W (C − H̃) H̃_λ⁻¹``.

    Sequential GPTQ rounds ``W`` against ``H̃ ∝ X̃ᵀX̃``, the inputs ``X̃`` that reach the layer
    once the blocks before it are quantized: it minimizes ``‖X̃Wᵀ − X̃Ŵᵀ‖``, the error of ``Ŵ``
    relative to ``W`` run on ``X̃``. What the float model computes is ``XWᵀ``, on its own inputs
    ``X``. With ``C ∝ XᵀX̃`` (``cross`` ``[in, in]``, the token mean of ``x x̃ᵀ`` on the same
    scale as ``hessian``) and ``H̃_λ = H̃ + λI``, λ = damp · mean diag(H̃) as in ``gptq_quantize``,
    over ``N`` tokens::

        ‖XWᵀ − X̃Ŵᵀ‖²/N + λ‖Ŵ − W‖² = tr((W' − Ŵ) H̃_λ (W' − Ŵ)ᵀ) + const

    (expand both sides: ``W' H̃_λ = W C + λW``). So ``gptq_quantize(W', H̃)`` minimizes the float
    model's output error from the quantized inputs; its damping keeps the meaning it has in plain
    GPTQ, a pull toward ``W``. (Damping ``λ‖Ŵ‖²`` instead, the ridge fit ``W C H̃_λ⁻¹``, would
    shrink the weights along every direction the calibration inputs barely excite.) Undamped,
    ``W' = W C H̃⁻¹`` is the least-squares fit of the float outputs from the quantized inputs; with
    ``X̃ = X`` (``cross == hessian``) it is ``W`` exactly, at any damping. GPTAQ folds the same
    correction into GPTQ's column loop; here it is one solve before it, and GPTQ takes its static
    grid from ``W'``, the weights it rounds. Input columns dead on ``X̃`` (``H̃[j, j] = 0``, so
    column ``j`` of ``C`` is zero too) keep ``W``'s weights. ``w`` is ``[out, in]``; the result
    is float32; nothing is modified.

    >>> x = torch.randn(512, 64) @ torch.randn(64, 64)  # the float model's inputs
    >>> x_q = x + 0.1 * torch.randn(512, 64)  # what reaches the layer with earlier blocks quantized
    >>> w = torch.randn(32, 64)
    >>> target = asymmetric_target(w, x_q.T @ x_q / 512, x.T @ x_q / 512, damp=0.0)
    >>> fit = torch.linalg.lstsq(x_q, x @ w.T).solution.T  # the least-squares fit, computed directly
    >>> bool((target - fit).norm() < 1e-3 * fit.norm())  # float32 Hessians: not to the last digit
    True
    """
    weight = w.detach().to(torch.float32)
    n = weight.shape[-1]
    if weight.dim() != 2 or tuple(hessian.shape) != (n, n) or tuple(cross.shape) != (n, n):
        raise ValueError(f"asymmetric_target: w [out, in] with hessian and cross [in, in], got {tuple(w.shape)}, "
                         f"{tuple(hessian.shape)}, {tuple(cross.shape)}")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    # float64: H̃_λ's condition number reaches ~100·in, too much for a float32 solve's last digits
    h = hessian.detach().to(device=weight.device, dtype=torch.float64)
    delta = cross.detach().to(device=weight.device, dtype=torch.float64) - h  # C − H̃ ∝ (X − X̃)ᵀX̃
    h = h.clone()
    dead = torch.nonzero(h.diagonal() == 0).squeeze(1)
    h[dead, dead] = 1.0  # as gptq_quantize, so that λ is the one its error feedback uses
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise ValueError(f"asymmetric_target: the Hessian is not positive definite with damp={damp:g}; "
                         "raise damp (are the calibration inputs all zero or non-finite?)")
    # (W ΔC H̃_λ⁻¹)ᵀ = H̃_λ⁻¹ (W ΔC)ᵀ, H̃_λ being symmetric
    correction = torch.cholesky_solve((weight.to(torch.float64) @ delta).t(), lower).t()
    return (weight.to(torch.float64) + correction).to(torch.float32)


def hessian_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error on the calibration inputs: ``‖X(W − Ŵ)ᵀ‖ / ‖XWᵀ‖`` from ``H ∝ XᵀX``."""
    w = w.detach().to(torch.float32)
    h = hessian.to(device=w.device, dtype=torch.float32)
    e = w_hat.detach().to(device=w.device, dtype=torch.float32) - w
    num = float(((e @ h) * e).sum())
    den = float(((w @ h) * w).sum())
    if den <= 0:
        return 0.0 if num <= 0 else math.inf
    return math.sqrt(max(num, 0.0) / den)


# ------------------------------------------------------------------------------ internals


@dataclasses.dataclass(frozen=True)
class _ElementGrid:
    """Each weight's own grid, laid out like ``Wᵀ`` ``[in, out]`` (rows are columns of W).

    ``code = clamp(round(w / scale) + offset, qmin, qmax)``, ``ŵ = (code − offset) · scale``:
    the operations of ``grid.encode_int``, so the codes chosen here are the codes stored. With a
    ``table`` (lookup-table formats) ``code = nearest(w / scale)``, ``ŵ = table[code] · scale``,
    the operations of ``lut.encode_lut`` and ``lut.dequantize_lut``; a ``codebook`` (vq formats:
    ``[points, step]``) rounds ``step`` rows at a time (``round_rows``, ``vq.round_vectors``).
    """

    scale: torch.Tensor  # float32; 1 where fp16
    offset: torch.Tensor | float  # float32: zero point, or 2**(bits-1) when symmetric (unused with a table)
    qmin: torch.Tensor | float
    qmax: torch.Tensor | float
    fp16: torch.Tensor | None  # bool, True where the weight is stored as fp16 (mixed +w16)
    table: torch.Tensor | None = None  # fp16 levels, ascending (lookup-table formats); None for integer grids
    codebook: torch.Tensor | None = None  # fp16 [points, step] (vq formats); None otherwise
    step: int = 1  # rows rounded together: the vector length of a vq format

    @classmethod
    def of(cls, params) -> "_ElementGrid":
        fmt = params.fmt
        out_f, in_f = params.shape
        numel = out_f * in_f
        device = params.low.scales.device

        def per_element(grid: IntGrid, bits: int, rank: torch.Tensor):
            group = rank // fmt.group_size
            scales = grid.scales.to(torch.float32)
            if scales.numel() == 0:  # an empty part: nothing indexes it, keep gathers in range
                scales = torch.ones(1, device=device)
                group = torch.zeros_like(group)
            if fmt.symmetric:
                offset = torch.full_like(scales, float(1 << (bits - 1)))
            else:
                offset = grid.zeros.to(torch.float32) if grid.zeros.numel() else torch.zeros_like(scales)
            qmin = 1.0 if fmt.symmetric else 0.0
            return scales[group], offset[group], qmin, float((1 << bits) - 1)

        def as_t(x):  # flat row-major [out*in] -> [in, out]
            return x.view(out_f, in_f).t().contiguous() if isinstance(x, torch.Tensor) else x

        if fmt.lut or fmt.vq:
            scales = params.low.scales.to(torch.float32)[torch.arange(numel, device=device) // fmt.group_size]
            if fmt.vq:
                return cls(as_t(scales), 0.0, 0.0, 0.0, None, codebook=params.low.table, step=fmt.vq)
            return cls(as_t(scales), 0.0, 0.0, 0.0, None, params.low.table)

        if not fmt.mixed:
            s, o, lo, hi = per_element(params.low, fmt.bits, torch.arange(numel, device=device))
            return cls(as_t(s), as_t(o), lo, hi, None)
        mask = params.mask
        # Position of each weight inside its compacted part (row-major order, as stored).
        low_rank = (torch.cumsum(~mask, 0) - 1).clamp_(min=0)
        high_rank = (torch.cumsum(mask, 0) - 1).clamp_(min=0)
        s, o, lo, hi = per_element(params.low, fmt.bits, low_rank)
        lo_t = torch.full((numel,), lo, device=device)
        hi_t = torch.full((numel,), hi, device=device)
        fp16 = None
        if fmt.high_bits == FLOAT_BITS:
            s = torch.where(mask, torch.ones_like(s), s)
            o = torch.where(mask, torch.zeros_like(o), o)
            fp16 = mask
        else:
            hs, ho, hlo, hhi = per_element(params.high, fmt.high_bits, high_rank)
            s, o = torch.where(mask, hs, s), torch.where(mask, ho, o)
            lo_t = torch.where(mask, torch.full_like(lo_t, hlo), lo_t)
            hi_t = torch.where(mask, torch.full_like(hi_t, hhi), hi_t)
        return cls(as_t(s), as_t(o), as_t(lo_t), as_t(hi_t), None if fp16 is None else as_t(fp16))

    def rows(self, index: torch.Tensor) -> "_ElementGrid":
        """The grid with its rows (W's columns) taken in ``index`` order."""
        pick = lambda x: x[index] if isinstance(x, torch.Tensor) else x  # noqa: E731
        return _ElementGrid(pick(self.scale), pick(self.offset), pick(self.qmin), pick(self.qmax), pick(self.fp16),
                            self.table, self.codebook, self.step)

    def round_rows(self, i: int, w: torch.Tensor) -> torch.Tensor:
        """Rows ``i .. i + step`` of Wᵀ (``w``, ``[step, out]``) rounded onto their grid together."""
        if self.codebook is not None:
            return round_vectors(w, self.scale[i:i + self.step], self.codebook)
        return self.round_row(i, w[0]).unsqueeze(0)

    def round_row(self, i: int, w: torch.Tensor) -> torch.Tensor:
        """``w`` (row ``i`` of Wᵀ, i.e. one column of W) rounded onto its grid."""
        if self.table is not None:
            s = self.scale[i]
            return self.table.to(torch.float32)[nearest(w / s, self.table)].mul_(s)
        s, o = self.scale[i], self.offset[i]
        lo = self.qmin[i] if isinstance(self.qmin, torch.Tensor) else self.qmin
        hi = self.qmax[i] if isinstance(self.qmax, torch.Tensor) else self.qmax
        q = torch.round(w / s).add_(o).clamp_(lo, hi)
        w_hat = q.sub_(o).mul_(s)
        if self.fp16 is not None:
            w_hat = torch.where(self.fp16[i], w.to(torch.float16).to(torch.float32), w_hat)
        return w_hat


def _inverse_cholesky_upper(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``UᵀU = (H + λI)⁻¹``), λ = damp · mean diag(H).

    Computed as ``J L⁻¹ J`` where ``L`` is the lower Cholesky factor of ``J (H + λI) J`` and
    ``J`` reverses the index order: one factorization and one triangular inverse instead of the
    reference's three factorizations (the same matrix; a Cholesky factor is unique). If
    ``H + λI`` is not numerically positive definite, λ grows tenfold (with a warning), at
    most ``_DAMP_RETRIES`` times.
    """
    mean_diag = float(h.diagonal().mean())
    eye = torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    flipped = h.flip(0, 1)
    d = damp
    for attempt in range(_DAMP_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(flipped + (d * mean_diag) * eye)
        if int(info) == 0:
            inv = torch.linalg.solve_triangular(lower, eye, upper=False)
            if bool(torch.isfinite(inv).all()):
                return inv.flip(0, 1)
        if attempt == _DAMP_RETRIES:
            break
        new = max(d * 10, 1e-6)
        warnings.warn(f"GPTQ: the Hessian is not positive definite with damp={d:g}; retrying with "
                      f"damp={new:g}", RuntimeWarning, stacklevel=3)
        d = new
    raise ValueError(f"GPTQ: the Hessian stays singular even with damp={d:g} "
                     "(are the calibration inputs all zero or non-finite?)")


def _error_feedback(wt: torch.Tensor, u: torch.Tensor, grid: _ElementGrid, block_size: int) -> torch.Tensor:
    """The GPTQ column loop on ``Wᵀ`` ``[in, out]`` (modified in place); returns ``Ŵᵀ``."""
    n, step = wt.shape[0], grid.step  # block_size is a multiple of step (whole vectors in a block)
    qt = torch.empty_like(wt)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1 = wt[i1:i2]  # a view: the in-block updates land in wt
        u1 = u[i1:i2, i1:i2]
        err = torch.empty_like(w1)
        for i0 in range(0, i2 - i1, step):
            w_hat = grid.round_rows(i1 + i0, w1[i0:i0 + step])  # a vector's columns rounded together
            qt[i1 + i0:i1 + i0 + step] = w_hat
            for i in range(i0, i0 + step):  # the error fed back column by column, the vector's later columns too
                e = (w1[i] - w_hat[i - i0]).div_(u1[i, i])
                err[i] = e
                if i + 1 < i2 - i1:
                    # OBS update of the block's remaining columns by this column's error.
                    w1[i + 1:].addr_(u1[i, i + 1:], e, alpha=-1.0)
        if i2 < n:
            # Lazy batch update: the whole block's errors reach the later columns at once.
            wt[i2:].addmm_(u[i1:i2, i2:].t(), err, alpha=-1.0)
    return qt

