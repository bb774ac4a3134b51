"""Predicted sensitivity: the KL of formats nobody measured, from a curve fitted per module.

Measuring one module in one format costs a forward pass over the calibration text; a table of
four formats on SmolLM2 takes about an hour on 2 cores, so allocating over many format
families (bits x group size x grid: ``w3-g36-iz-s6``, ``w4-g64-nl``, ...) by measuring each one
does not fit a pipeline. Here the measured formats of a module fix a curve, and any other
format is placed on it by a number that costs no forward pass: its weight error, weighted by
the module's input energy per channel,

    E(m, f) = sum_ij channel_sq[j] * (W_ij - What_ij)**2       (What: W through f and back)

which is the expected squared output error of module ``m`` if its inputs were uncorrelated
(the diagonal of GPTQ's Hessian; plain squared error for embeddings, whose input is one token).
For small errors the KL is about proportional to the output error energy; over larger ones
the relation bends, so the curve is not a single power: ``log KL`` is interpolated linearly in
``log E`` between the two measured formats around the new one, and extrapolated with the end
segment's slope (kept within ``SLOPE_RANGE``) outside them. Measured points are made monotone
first (more error never predicts less KL). Formats the table measured keep their measurement.

What this costs in accuracy is measured, not assumed: ``leave_one_out`` predicts a measured
column from the others and reports the rank correlation across modules and the typical ratio
error (``benchmarks/family_allocation.py`` records it for SmolLM2's table).

>>> import torch
>>> from uqcit.inputs.tiny import tiny_model
>>> from uqcit.stages.levels import analyze_levels
>>> from uqcit.stages.sensitivity import SensitivityConfig, measure_sensitivity
>>> model, tok = tiny_model("llama")
>>> levels = analyze_levels(model)
>>> sens = measure_sensitivity(model, tok, levels, SensitivityConfig(
...     formats=("w2", "w4", "w8"), group_size=32, calib_samples=2, calib_seq_len=32), progress=False)
>>> errs = format_errors(model, levels, ["w2-g32", "w4-g32", "w8-g32", "w3-g16-sym"], progress=False)
>>> wide = predict_sensitivity(sens, errs, ["w3-g16-sym"])
>>> m = "model.layers.0.mlp.down_proj"
>>> wide.kl(m, "w8-g32") < wide.kl(m, "w3-g16-sym") < wide.kl(m, "w2-g32")
True
>>> wide.meta["predicted"]["formats"]
['w3-g16-sym']
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from uqcit.stages.sensitivity import SensitivityResult, resolve_formats
from uqcit.stages.sensitivity_probe import dequantized

SLOPE_RANGE = (0.5, 3.0)  # d log KL / d log E outside the measured points: between sub- and super-quadratic
FLOOR_FACTOR = 10.0  # measured KLs below this many times the table's floor are noise, not a curve point


def format_errors(model: nn.Module, levels, formats: Sequence[str], *,
                  channel_sq: Mapping[str, torch.Tensor] | None = None,
                  progress: bool = True) -> dict[str, dict[str, float]]:
    """``E(m, f)`` for every quantizable module of ``levels`` and every format name (round to nearest).

    ``channel_sq`` maps a Linear module to its inputs' mean square per channel
    (``uqcit.inputs.calibration.collect_input_stats(..., hessian=False)``); modules without an
    entry, and embeddings, get unweighted squared error. ``"fp16"`` and exact formats give 0.
    """
    from tqdm.auto import tqdm

    fmts = resolve_formats(formats)
    named = dict(model.named_modules())
    out: dict[str, dict[str, float]] = {}
    for e in tqdm(levels.quantizable(), desc="format errors", unit="module", disable=not progress):
        weight = named[e.name].weight.detach()
        matrix = weight.t() if e.kind == "conv1d" else weight  # [out, in], as formats see it
        weight_of_col = None
        if channel_sq is not None and e.name in channel_sq and e.kind != "embedding":
            weight_of_col = channel_sq[e.name].to(torch.float64)
        row: dict[str, float] = {}
        for fmt in fmts:
            w_hat = dequantized(weight, e, fmt)
            diff = ((w_hat.t() if e.kind == "conv1d" else w_hat).to(torch.float64) - matrix.to(torch.float64))
            sq = diff.square()
            row[fmt.name] = float((sq @ weight_of_col).sum() if weight_of_col is not None else sq.sum())
        out[e.name] = row
    return out


def predict_sensitivity(measured: SensitivityResult, errors: Mapping[str, Mapping[str, float]],
                        formats: Sequence[str]) -> SensitivityResult:
    """``measured`` widened by ``formats``: each new cell placed on its module's fitted KL-vs-E curve.

    ``errors`` (from ``format_errors``) must hold every module's error for the measured formats
    that anchor the curve and for the new ones. Predicted cells have no standard error (NaN) and
    are listed in ``meta["predicted"]``; measured cells are copied unchanged.
    """
    names = [f.name for f in resolve_formats(formats)]
    new = [f for f in names if f not in measured.formats]
    floor = abs(measured.floor_kl or 0.0) * FLOOR_FACTOR
    cols = list(measured.formats) + new
    table = torch.full((len(measured.modules), len(cols)), math.nan, dtype=torch.float64)
    table[:, :len(measured.formats)] = measured.table
    anchors = [f for f in measured.formats if f != "fp16"]
    for i, module in enumerate(measured.modules):
        err = errors.get(module)
        if err is None:
            raise KeyError(f"no format errors for module {module!r}: run format_errors over the same levels")
        missing = [f for f in anchors + new if f not in err]
        if missing:
            raise KeyError(f"module {module!r} has no error for formats {missing}")
        points = [(err[f], float(measured.table[i, j])) for j, f in enumerate(measured.formats) if f in anchors]
        curve = _Curve([(e, kl) for e, kl in points if not math.isnan(kl)], floor)
        for k, f in enumerate(new):
            table[i, len(measured.formats) + k] = curve(err[f])
    sem = torch.full_like(table, math.nan)
    sem[:, :len(measured.formats)] = measured.sem
    meta = dict(measured.meta)
    meta["predicted"] = {"formats": new, "anchors": anchors, "floor": floor,
                         "measure": "log KL interpolated in log E(m, f) between the module's measured formats; "
                                    "E = input-energy-weighted squared weight error of round to nearest",
                         "slope_range": list(SLOPE_RANGE)}
    return dataclasses.replace(measured, formats=cols, table=table, sem=sem, meta=meta)


def widen_sensitivity(model: nn.Module, tokenizer, levels, measured: SensitivityResult, formats: Sequence[str], *,
                      progress: bool = True) -> tuple[SensitivityResult, dict[str, dict[str, float]]]:
    """``measured`` widened by ``formats`` for ``model``: the inputs' channel energies collected on the
    calibration text the table was measured on (lee_background, its recorded samples, length and seed),
    then ``format_errors`` and ``predict_sensitivity``. Returns the widened table and the errors.
    """
    from uqcit.inputs.calibration import collect_input_stats
    from uqcit.inputs.corpus import calibration_batch

    calib = measured.meta.get("settings", {}).get("calibration", {})
    batch = calibration_batch(tokenizer, n_samples=calib.get("samples", 4), seq_len=calib.get("seq_len", 128),
                              seed=calib.get("seed", 0))
    linears = [e.name for e in levels.quantizable() if e.kind != "embedding" and e.name in measured.modules]
    stats = collect_input_stats(model, batch, linears, hessian=False, progress=progress)
    anchors = [f for f in measured.formats if f != "fp16"]
    errors = format_errors(model, levels, list(dict.fromkeys(anchors + list(formats))),
                           channel_sq={n: s.channel_sq for n, s in stats.items()}, progress=progress)
    errors = {m: e for m, e in errors.items() if m in measured.modules}
    return predict_sensitivity(measured, errors, formats), errors


def leave_one_out(measured: SensitivityResult, errors: Mapping[str, Mapping[str, float]],
                  format_name: str) -> dict[str, float]:
    """Predict the measured column ``format_name`` from the others; compare with the measurement.

    Returns the Spearman rank correlation over modules, the median and 90th percentile of
    ``|log(predicted / measured)|`` (as a ratio: 1.25 means 25 % off), over modules whose
    measured KL is above the noise floor, and how many modules that is.
    """
    j = measured.formats.index(format_name)
    keep = [f for f in measured.formats if f != format_name]
    cols = [measured.formats.index(f) for f in keep]
    rest = dataclasses.replace(measured, formats=keep, table=measured.table[:, cols], sem=measured.sem[:, cols])
    pred = predict_sensitivity(rest, errors, [format_name]).table[:, -1].numpy()
    true = measured.table[:, j].numpy()
    floor = abs(measured.floor_kl or 0.0) * FLOOR_FACTOR
    ok = (true > floor) & (pred > 0) & np.isfinite(pred)
    ratio = np.abs(np.log(pred[ok] / true[ok]))
    return {"format": format_name, "modules": int(ok.sum()), "spearman": spearman(pred[ok], true[ok]),
            "median_ratio": float(np.exp(np.median(ratio))), "p90_ratio": float(np.exp(np.quantile(ratio, 0.9)))}


class _Curve:
    """Monotone piecewise-linear ``log KL`` over ``log E`` through a module's measured points."""

    def __init__(self, points: list[tuple[float, float]], floor: float) -> None:
        pts = sorted((math.log(e), math.log(kl)) for e, kl in points if e > 0 and kl > max(floor, 0.0))
        self.x = np.array([p[0] for p in pts])
        self.y = np.maximum.accumulate(np.array([p[1] for p in pts])) if pts else np.array([])
        # below every resolved point: the largest unresolved KL is the best honest guess
        self.small = max([kl for _, kl in points if not math.isnan(kl)] + [0.0]) if not pts else None

    def __call__(self, error: float) -> float:
        if error <= 0:
            return 0.0  # the format reproduces the weight exactly
        if self.small is not None:
            return self.small
        x = math.log(error)
        if len(self.x) == 1:
            return math.exp(self.y[0] + (x - self.x[0]))  # one point: KL proportional to E
        if x < self.x[0]:
            return math.exp(self.y[0] + self._slope(0, 1) * (x - self.x[0]))
        if x > self.x[-1]:
            return math.exp(self.y[-1] + self._slope(-2, -1) * (x - self.x[-1]))
        return math.exp(float(np.interp(x, self.x, self.y)))

    def _slope(self, a: int, b: int) -> float:
        dx = self.x[b] - self.x[a]
        s = (self.y[b] - self.y[a]) / dx if dx > 0 else 1.0
        return float(min(max(s, SLOPE_RANGE[0]), SLOPE_RANGE[1]))


def spearman(a, b) -> float:
    """Rank correlation of two equal-length sequences (ties broken by position).

    >>> spearman([1.0, 2.0, 3.0], [10.0, 30.0, 20.0])
    0.5
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2:
        return math.nan
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])
