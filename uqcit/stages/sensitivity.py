"""Per-layer sensitivity, measured: the output KL when one module alone is quantized.

For every quantizable module (an entry of ``LevelsResult.quantizable()``) and every candidate
format, the module's weight is replaced by its quantized-then-dequantized copy, the model runs
on calibration text (``uqcit.inputs.corpus.calibration_batch``), and the mean per-token
``KL(P_ref ‖ P_quantized)`` over every calibration position is recorded; then the weight is
put back bit for bit. This is the measurement pass of mixed-precision quantizers; the
allocator (``uqcit.stages.allocate``) optimizes over it.

What makes it affordable, and what each shortcut costs (nothing is approximated):

- **Replaying recorded blocks.** The reference pass records the output of every transformer
  block. Quantizing a module changes nothing computed before its first call, so while it is
  measured the blocks that finished before that call are swapped for stand-ins that return
  their recorded outputs, and only the rest of the model runs (blocks ``b..end``, the final
  norm and the head). On a 30-block model that halves the average cost of the blocks; the
  vocabulary-wide head still runs every time. The swap is checked: replaying every block must
  reproduce the reference output (``floor_kl``, below), else the measurement stops.
- **Exact zeros need no pass.** A format whose dequantized weight equals the weight exactly
  (fp16 of weights that are fp16 values, for instance) leaves the model unchanged, so its KL is
  exactly 0 and no forward pass runs.
- **fp16 measured once** (``fp16_joint``, on by default). Rounding a float32 weight to fp16 moves
  the output by about as little as the measurement can resolve (``floor_kl``), so instead of one
  pass per module, one pass runs with *every* selected module in fp16 at once, and that KL is
  recorded for each module. Under the additive model the allocator uses (non-negative
  per-module contributions summing to the joint KL) it is an upper bound of each module's own
  fp16 KL: conservative, never flattering. ``fp16_joint=False`` measures fp16 per module.
- **Small calibration by default** (4 × 128 tokens): the cost is linear in tokens. Every cell
  also records the standard error of its mean over the calibration sequences (``kl_sem``), so
  the noise of a small sample is measured, not guessed.

The reference distribution is kept in memory as ``fp16(p · 2**15)`` for every position and
vocabulary entry (4 × 128 × 49,152 × 2 bytes = 50 MB for SmolLM2 by default, 201 MB at
8 × 256), because an exact KL needs the whole distribution; the scale keeps probabilities
down to about 2e-9 in normal fp16 range. KL is computed against that stored distribution
renormalized (``P̃``), so the KL of the unperturbed model is not exactly 0 but ``floor_kl``
(fp16 storage plus float32 rounding: about ±3e-8 nats/token on the models tried, sometimes
slightly negative). It is measured and recorded: sensitivities below it are not resolved.
The recorded block outputs take ``n_blocks × tokens × hidden × 4`` bytes (35 MB for SmolLM2
at 4 × 128).

The model is modified during the measurement (one weight, and blocks swapped for stand-ins)
and restored in ``finally`` blocks: do not use it from another thread meanwhile.

Results are stored in a safetensors file (``[modules, formats]`` tables of KL and of its
standard error, NaN where not yet measured, plus JSON header metadata); never pickle. The
measurement is resumable: with a ``path`` the file is rewritten atomically every
``flush_every`` modules (and when the run stops, even by an exception), and a restart with the
same settings skips what the file already holds.

>>> from uqcit.inputs.tiny import tiny_model
>>> from uqcit.stages.levels import analyze_levels
>>> model, tok = tiny_model("llama")
>>> cfg = SensitivityConfig(formats=("w2", "w8"), group_size=32, calib_samples=2, calib_seq_len=32)
>>> res = measure_sensitivity(model, tok, analyze_levels(model), cfg, progress=False)
>>> res.kl("model.layers.0.mlp.down_proj", "w8-g32") < res.kl("model.layers.0.mlp.down_proj", "w2-g32")
True
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from uqcit.core.config import ConfigError, StageConfig, StageSession, register_config, stage_handler
from uqcit.tensor.formats import FLOAT_BITS
from uqcit.stages.levels import select_modules
from uqcit.stages.sensitivity_probe import Probe, measure_joint, measure_module
from uqcit.stages.sensitivity_table import SensitivityResult, resolve_formats  # noqa: F401 (SensitivityResult re-exported)

DEFAULT_FORMATS = ("w2", "w3", "w4", "w8", "fp16")


@register_config
@dataclasses.dataclass(frozen=True)
class SensitivityConfig(StageConfig):
    """What to measure: candidate formats, calibration text, where to keep the measurement."""

    type_tag = "sensitivity"

    formats: tuple[str, ...] = DEFAULT_FORMATS  # bare "wN": N-bit asymmetric at group_size; else a format name
    group_size: int = 128  # the group size bare "wN" formats get (the plan's usual 128)
    calib_samples: int = 4  # sequences: few, the cost is linear in tokens (see the module doc)
    calib_seq_len: int = 128  # tokens per sequence; kl_sem shows what the small sample costs in noise
    batch_size: int = 4  # sequences per forward: bounds the vocabulary-wide logits in memory
    seed: int = 0  # picks the calibration sequences
    modules: str | None = None  # regex (re.search) on module names, or "kind:<kind>"; None: every quantizable module
    path: str | None = None  # resumable measurement file (.safetensors); None: keep in memory only
    flush_every: int = 4  # rewrite the file after this many modules (a restart loses at most these)
    replay: bool = True  # replay recorded block outputs instead of recomputing unperturbed blocks
    fp16_joint: bool = True  # fp16: one pass with every selected module in fp16 (see the module doc)
    # "measured": a forward pass per module and format; "fisher": predicted from the diagonal Fisher
    # (uqcit.stages.sensitivity_fisher: one backward pass per sequence, any number of formats)
    method: str = "measured"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(self.group_size >= 1, "group_size", "must be >= 1")
        for name in ("calib_samples", "batch_size", "flush_every"):
            self.check(getattr(self, name) >= 1, name, "must be >= 1")
        self.check(self.calib_seq_len >= 2, "calib_seq_len", "must be >= 2")
        self.check(self.method in ("measured", "fisher"), "method", "must be 'measured' or 'fisher'")
        try:
            resolve_formats(self.formats, self.group_size)  # empty, repeated or misspelt formats fail here
        except ValueError as exc:
            raise ConfigError(f"SensitivityConfig.formats: {exc}") from None


# --------------------------------------------------------------------------- measurement


def measure_sensitivity(model: nn.Module, tokenizer, levels, config: SensitivityConfig = SensitivityConfig(),
                        *, path: str | os.PathLike | None = None, progress: bool = True,
                        text: str | None = None,
                        callback: Callable[[str, dict[str, float]], None] | None = None) -> SensitivityResult:
    """Measure ``KL(P_ref ‖ P_q)`` for each selected module in each candidate format.

    ``levels`` is the ``LevelsResult`` of ``model``. ``path`` (default ``config.path``) makes the
    measurement resumable: modules already in the file are skipped, provided the file was
    measured with the same settings (model fingerprint, formats, modules, calibration);
    otherwise a ``ValueError`` says which setting differs. ``text`` replaces the default
    calibration corpus. ``callback(module, {format: kl})`` runs after each module (an
    exception it raises stops the run; what was measured is flushed to ``path`` first).
    """
    from tqdm.auto import tqdm

    from uqcit.inputs.corpus import calibration_batch

    fmts = resolve_formats(config.formats, config.group_size)
    entries = select_modules(levels, config.modules)
    named = dict(model.named_modules())
    ids = calibration_batch(tokenizer, n_samples=config.calib_samples, seq_len=config.calib_seq_len,
                            seed=config.seed, text=text)
    settings = _settings(model, named, entries, fmts, config, ids, text)
    shape = (len(entries), len(fmts))
    blank = SensitivityResult(
        modules=[e.name for e in entries], formats=[f.name for f in fmts],
        table=torch.full(shape, math.nan, dtype=torch.float64),
        numel=[e.numel for e in entries], levels=[e.level for e in entries],
        seconds=torch.full((len(entries),), math.nan, dtype=torch.float64),
        meta={"settings": settings})
    path = path if path is not None else config.path
    result = _resume(blank, Path(path)) if path is not None and Path(path).exists() else blank

    todo = [i for i in range(len(entries)) if not bool(result.measured[i])]
    t_start = time.perf_counter()
    if not todo:
        return _stamp(result, t_start)
    was_training = model.training
    model.eval()
    unsaved = 0
    try:
        with torch.no_grad():
            probe = Probe(model, levels, ids, config.batch_size, config.replay)
            result.meta["seconds_reference"] = time.perf_counter() - t_start  # reference pass + floor check
            result.meta.setdefault("floor_kl", probe.floor_kl)
            result.meta["replay"] = probe.replay_blocks is not None
            fp16 = [j for j, f in enumerate(fmts) if f.bits == FLOAT_BITS]
            if config.fp16_joint and fp16 and bool(torch.isnan(result.table[:, fp16[0]]).any()):
                t0 = time.perf_counter()
                kl, sem = measure_joint(probe, [named[e.name] for e in entries], entries, fmts[fp16[0]])
                result.table[:, fp16[0]], result.sem[:, fp16[0]] = kl, sem
                result.meta["fp16_joint"] = {"kl": kl, "sem": sem, "seconds": time.perf_counter() - t0,
                                             "note": "one pass with every selected module in fp16"}
                unsaved += 1
            work = {i: probe.work(entries[i].name) * int(torch.isnan(result.table[i]).sum()) for i in todo}
            bar = tqdm(total=float(sum(work.values())), desc="sensitivity", disable=not progress,
                       bar_format="{l_bar}{bar}| {postfix} [{elapsed}<{remaining}]")
            with bar:
                for k, i in enumerate(todo):
                    entry = entries[i]
                    bar.set_postfix_str(f"module {k + 1}/{len(todo)} {entry.name}")
                    t0 = time.perf_counter()
                    kls, sems = measure_module(probe, named[entry.name], entry, fmts, result.table[i],
                                                result.sem[i])
                    result.table[i] = torch.tensor(kls, dtype=torch.float64)
                    result.sem[i] = torch.tensor(sems, dtype=torch.float64)
                    result.seconds[i] = time.perf_counter() - t0
                    unsaved += 1
                    bar.update(work[i])
                    if path is not None and unsaved >= config.flush_every:
                        _stamp(result, t_start).save(path)
                        unsaved = 0
                    if callback is not None:
                        callback(entry.name, dict(zip(result.formats, kls)))
    finally:
        model.train(was_training)
        if path is not None and unsaved:
            _stamp(result, t_start).save(path)  # keep what was measured, even when interrupted
    return _stamp(result, t_start)


def _stamp(result: SensitivityResult, t_start: float) -> SensitivityResult:
    """Record wall time in the metadata: this run's, and the total over every run of the file."""
    this_run = time.perf_counter() - t_start
    result.meta["seconds_this_run"] = this_run
    result.meta["seconds_total"] = result.meta.get("seconds_previous_runs", 0.0) + this_run
    result.meta["torch"] = torch.__version__
    return result


def _resume(blank: SensitivityResult, path: Path) -> SensitivityResult:
    prior = SensitivityResult.load(path)
    problems = []
    if prior.modules != blank.modules:
        problems.append("modules")
    if prior.formats != blank.formats:
        problems.append(f"formats ({prior.formats} in the file)")
    old, new = prior.meta.get("settings", {}), blank.meta["settings"]
    problems += [f"settings.{k} ({old.get(k)!r} in the file, {new.get(k)!r} now)"
                 for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if problems:
        raise ValueError(f"{path} was measured with other settings: {'; '.join(problems)}. "
                         "Delete it, or give another path, to measure afresh.")
    prior.meta = {**prior.meta, "settings": new, "seconds_previous_runs": prior.meta.get("seconds_total", 0.0)}
    return prior


def _settings(model, named, entries, fmts, config, ids, text) -> dict[str, Any]:
    """What determines the measurement: a file with other settings cannot be resumed."""
    digest = hashlib.sha256()
    for e in entries:
        w = named[e.name].weight.detach()
        # A strided sample of every weight: cheap, and differs between any two real checkpoints.
        flat = w.reshape(-1)
        k = min(4096, flat.numel())
        idx = torch.arange(k, dtype=torch.int64) * (flat.numel() - 1) // max(k - 1, 1)  # exact integers
        digest.update(e.name.encode())
        digest.update(str(tuple(w.shape)).encode())
        digest.update(flat[idx].to(torch.float32).contiguous().numpy().tobytes())
    cfg = getattr(model, "config", None)
    return {
        "model_id": getattr(cfg, "_name_or_path", None) or getattr(cfg, "model_type", None),
        "weights_sha256": digest.hexdigest(),
        "formats": [f.name for f in fmts],
        "modules_pattern": config.modules,
        "fp16_joint": config.fp16_joint,
        "calibration": {
            "samples": config.calib_samples, "seq_len": config.calib_seq_len, "seed": config.seed,
            "text": "lee_background" if text is None else "sha256:" + hashlib.sha256(text.encode()).hexdigest(),
            "tokens_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
        },
        "measure": "mean over calibration positions of KL(P_ref ‖ P_q), nats/token",
    }


# --------------------------------------------------------------------------- pipeline stage

@stage_handler(SensitivityConfig)
def _sensitivity_stage(session: StageSession, cfg: SensitivityConfig) -> SensitivityResult:
    levels = session.require("levels")
    if cfg.method == "fisher":
        from uqcit.stages.sensitivity_fisher import fisher_sensitivity

        res = fisher_sensitivity(session.working, session.tokenizer, levels, cfg.formats, group_size=cfg.group_size,
                                 calib_samples=cfg.calib_samples, calib_seq_len=cfg.calib_seq_len, seed=cfg.seed,
                                 modules=cfg.modules, progress=session.progress)
        if cfg.path is not None:  # a Fisher table is computed afresh in minutes: written whole, never resumed
            res.save(cfg.path)
        return res
    return measure_sensitivity(session.working, session.tokenizer, levels, cfg, progress=session.progress)
