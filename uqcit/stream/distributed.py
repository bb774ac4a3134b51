"""Per-module sensitivity on Ray: the modules split into tasks, merged into the one table.

Measuring a module's sensitivity never depends on another module's (each is quantized alone and
put back bit for bit), so the rows of the table are independent work. ``measure_sensitivity_ray``
runs ``measure_sensitivity`` itself in Ray tasks, each on a share of the modules, and merges the
rows into the table (and resumable file) the serial run writes: same settings, same cells.
The one joint cell, fp16 measured with every module in fp16 at once (``fp16_joint``), is one
more task over all modules, as in the serial run. Ray is started locally with ``workers`` CPUs
unless it is running already or an ``address`` names a cluster (``ray.init(address=...)``).
Each task runs ``threads`` torch threads (the serial run's count gives its bits exactly).

>>> from uqcit.inputs.tiny import tiny_model
>>> from uqcit.stages.levels import analyze_levels
>>> model, tok = tiny_model("llama")
>>> cfg = SensitivityConfig(formats=("w2", "w8"), group_size=32, calib_samples=2, calib_seq_len=16,
...                         modules=r"layers\\.0\\.mlp")
>>> res = measure_sensitivity_ray(model, tok, analyze_levels(model), cfg, workers=2, progress=False)  # doctest: +SKIP
>>> res.complete  # doctest: +SKIP
True
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from pathlib import Path

import torch

from uqcit.stages.levels import select_modules
from uqcit.stages.sensitivity import (  # the serial run's own settings and resume: files stay interchangeable
    SensitivityConfig, SensitivityResult, _resume, _settings, _stamp, measure_sensitivity, resolve_formats)
from uqcit.tensor.formats import FLOAT_BITS


def measure_sensitivity_ray(model: torch.nn.Module, tokenizer, levels, config: SensitivityConfig = SensitivityConfig(),
                            *, workers: int = 2, address: str | None = None, threads: int = 1,
                            path: str | os.PathLike | None = None, progress: bool = True) -> SensitivityResult:
    """``measure_sensitivity`` with its modules measured by ``workers`` Ray tasks (see the module doc).

    ``path`` (default ``config.path``): the serial run's resumable file; rows it holds are not
    measured again, and the merged table is written there. Raises ``ImportError`` naming the
    extra to install when Ray is missing.
    """
    try:
        import ray
    except ImportError as exc:
        raise ImportError("measure_sensitivity_ray needs Ray: pip install 'uqcit-workbench[distributed]'") from exc
    from uqcit.inputs.corpus import calibration_batch

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    t_start = time.perf_counter()
    fmts = resolve_formats(config.formats, config.group_size)
    entries = select_modules(levels, config.modules)
    ids = calibration_batch(tokenizer, n_samples=config.calib_samples, seq_len=config.calib_seq_len, seed=config.seed)
    shape = (len(entries), len(fmts))
    blank = SensitivityResult(
        modules=[e.name for e in entries], formats=[f.name for f in fmts],
        table=torch.full(shape, math.nan, dtype=torch.float64), numel=[e.numel for e in entries],
        levels=[e.level for e in entries], seconds=torch.full((len(entries),), math.nan, dtype=torch.float64),
        meta={"settings": _settings(model, dict(model.named_modules()), entries, fmts, config, ids, None)})
    path = path if path is not None else config.path
    result = _resume(blank, Path(path)) if path is not None and Path(path).exists() else blank
    todo = [e.name for i, e in enumerate(entries) if not bool(result.measured[i])]
    if not todo:
        return _stamp(result, t_start)

    fp16 = [j for j, f in enumerate(fmts) if f.bits == FLOAT_BITS]
    joint = config.fp16_joint and bool(fp16) and bool(torch.isnan(result.table[:, fp16[0]]).any())
    per_module = tuple(spec for j, spec in enumerate(config.formats) if not (config.fp16_joint and j in fp16))
    jobs = []  # (config of the task, the columns its table fills)
    if joint:  # one pass with every selected module in fp16, as the serial run makes it
        jobs.append((dataclasses.replace(config, formats=(config.formats[fp16[0]],), path=None), fp16[:1]))
    if per_module:
        cols = [j for j in range(len(fmts)) if not (config.fp16_joint and j in fp16)]
        for share in _shares(todo, workers):
            pattern = "^(?:" + "|".join(re.escape(n) for n in share) + ")$"
            jobs.append((dataclasses.replace(config, formats=per_module, modules=pattern, path=None), cols))
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=progress, configure_logging=False)
    try:
        task = ray.remote(num_cpus=1)(_measure_share)
        refs = [ray.put(x) for x in (model, tokenizer, levels)]
        parts = ray.get([task.remote(*refs, cfg, threads) for cfg, _ in jobs])
    finally:
        if started:
            ray.shutdown()
    for k, ((_, cols), part) in enumerate(zip(jobs, parts)):
        for r, name in enumerate(part.modules):
            i = result.modules.index(name)
            result.table[i, cols], result.sem[i, cols] = part.table[r], part.sem[r]
            if not (joint and k == 0):  # the joint pass has no per-module time
                result.seconds[i] = part.seconds[r]
        result.meta.setdefault("floor_kl", part.meta.get("floor_kl"))
        result.meta["replay"] = part.meta.get("replay")
    result.meta["ray"] = {"workers": workers, "tasks": len(jobs), "address": address, "threads": threads}
    result = _stamp(result, t_start)
    if path is not None:
        result.save(path)
    return result


def _shares(names: list[str], k: int) -> list[list[str]]:
    """``names`` in ``k`` contiguous, near-equal shares (none empty)."""
    k = min(k, len(names))
    size, extra = divmod(len(names), k)
    out, start = [], 0
    for s in range(k):
        end = start + size + (1 if s < extra else 0)
        out.append(names[start:end])
        start = end
    return out


def _measure_share(model, tokenizer, levels, config: SensitivityConfig, threads: int) -> SensitivityResult:
    """One Ray task: the serial measurement of ``config``'s modules and formats."""
    torch.set_num_threads(threads)
    return measure_sensitivity(model, tokenizer, levels, config, progress=False)
