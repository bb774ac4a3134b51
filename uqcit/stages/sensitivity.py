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
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from uqcit.core.config import ConfigError, StageConfig, StageSession, register_config, stage_handler
from uqcit.core.io import atomic_write_with
from uqcit.tensor.formats import FLOAT_BITS, QuantFormat, parse_format
from uqcit.stages.levels import select_modules
from uqcit.stages.sensitivity_probe import Probe, measure_joint, measure_module
from uqcit.core.results import Result

FILE_KIND = "uqcit-sensitivity"
FILE_VERSION = 1
DEFAULT_FORMATS = ("w2", "w3", "w4", "w8", "fp16")
_BARE_RE = re.compile(r"^w(\d+)$")


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
    modules: str | None = None  # regex (re.search) on module names; None: every quantizable module
    path: str | None = None  # resumable measurement file (.safetensors); None: keep in memory only
    flush_every: int = 4  # rewrite the file after this many modules (a restart loses at most these)
    replay: bool = True  # replay recorded block outputs instead of recomputing unperturbed blocks
    fp16_joint: bool = True  # fp16: one pass with every selected module in fp16 (see the module doc)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(self.group_size >= 1, "group_size", "must be >= 1")
        for name in ("calib_samples", "batch_size", "flush_every"):
            self.check(getattr(self, name) >= 1, name, "must be >= 1")
        self.check(self.calib_seq_len >= 2, "calib_seq_len", "must be >= 2")
        try:
            resolve_formats(self.formats, self.group_size)  # empty, repeated or misspelt formats fail here
        except ValueError as exc:
            raise ConfigError(f"SensitivityConfig.formats: {exc}") from None


def resolve_formats(names: Sequence[str], group_size: int = 128) -> list[QuantFormat]:
    """Candidate formats from names: ``"w3"`` means ``w3-g{group_size}`` asymmetric, others are parsed.

    >>> [f.name for f in resolve_formats(["w2", "w4-g64-sym", "fp16"], 128)]
    ['w2-g128', 'w4-g64-sym', 'fp16']
    """
    if not names:
        raise ValueError("formats is empty: give at least one candidate format, e.g. ('w2', 'w4')")
    out: list[QuantFormat] = []
    for name in names:
        bare = _BARE_RE.match(name.strip())
        fmt = QuantFormat(bits=int(bare.group(1)), group_size=group_size) if bare else parse_format(name)
        if fmt.name in (f.name for f in out):
            raise ValueError(f"format {name!r} is listed twice (as {fmt.name!r}) in formats {list(names)}")
        out.append(fmt)
    return out


# --------------------------------------------------------------------------- result


@dataclasses.dataclass(repr=False)
class SensitivityResult(Result):
    """Measured KL per module and format: ``table[i, j]`` for ``modules[i]`` in ``formats[j]``.

    ``table`` is float64 ``[modules, formats]`` in nats per token, NaN where not measured yet;
    ``sem`` is the standard error of each cell's mean over the calibration sequences.
    """

    modules: list[str]
    formats: list[str]  # format names (``QuantFormat.name``)
    table: torch.Tensor  # [len(modules), len(formats)] float64 KL, NaN = not measured
    numel: list[int]  # weights of each module
    levels: list[int]  # level 1-5 of each module
    seconds: torch.Tensor  # [len(modules)] float64 wall time of each module's measurement, NaN = not measured
    meta: dict[str, Any]  # settings (model, calibration, formats), floor_kl, total seconds...
    sem: torch.Tensor | None = None  # [len(modules), len(formats)] float64 standard error; None: NaN

    def __post_init__(self) -> None:
        shape = (len(self.modules), len(self.formats))
        if tuple(self.table.shape) != shape:
            raise ValueError(f"table has shape {tuple(self.table.shape)}, expected {shape} (modules x formats)")
        if self.sem is None:
            self.sem = torch.full(shape, math.nan, dtype=torch.float64)
        elif tuple(self.sem.shape) != shape:
            raise ValueError(f"sem has shape {tuple(self.sem.shape)}, expected {shape} (modules x formats)")
        if len(self.numel) != shape[0] or len(self.levels) != shape[0] or self.seconds.numel() != shape[0]:
            raise ValueError("numel, levels and seconds need one entry per module")
        self._row = {m: i for i, m in enumerate(self.modules)}
        self._col = {f: j for j, f in enumerate(self.formats)}

    # ---- queries
    def index(self, module: str, format_name: str) -> tuple[int, int]:
        if module not in self._row:
            raise KeyError(f"no sensitivity row for module {module!r} ({len(self.modules)} modules measured)")
        if format_name not in self._col:
            raise KeyError(f"format {format_name!r} was not a candidate; candidates: {self.formats}")
        return self._row[module], self._col[format_name]

    def kl(self, module: str, format_name: str) -> float:
        """Measured mean KL (nats/token) with ``module`` alone in ``format_name``."""
        i, j = self.index(module, format_name)
        value = float(self.table[i, j])
        if math.isnan(value):
            raise ValueError(f"{module} in {format_name} has not been measured yet (resume the measurement)")
        return value

    def value(self, module: str, format_name: str) -> float | None:
        """Like ``kl``, but None when the module or format is not in the table or not measured."""
        i, j = self._row.get(module), self._col.get(format_name)
        if i is None or j is None:
            return None
        v = float(self.table[i, j])
        return None if math.isnan(v) else v

    def numel_of(self, module: str) -> int:
        i, _ = self.index(module, self.formats[0])
        return self.numel[i]

    def row(self, module: str) -> dict[str, float]:
        i, _ = self.index(module, self.formats[0])
        return {f: float(v) for f, v in zip(self.formats, self.table[i].tolist())}

    @property
    def measured(self) -> torch.Tensor:
        """Bool ``[modules]``: every format of the module measured."""
        return ~torch.isnan(self.table).any(dim=1)

    @property
    def complete(self) -> bool:
        return bool(self.measured.all())

    @property
    def floor_kl(self) -> float | None:
        """KL of the unperturbed model against the stored reference: the resolution of the table."""
        return self.meta.get("floor_kl")

    # ---- storage
    def header(self) -> dict[str, Any]:
        return {"modules": self.modules, "formats": self.formats, "numel": self.numel,
                "levels": self.levels, "meta": self.meta}

    def without_timings(self) -> "SensitivityResult":
        """A copy without wall-clock figures (``seconds`` all NaN = not recorded), for reproducible files."""
        meta = {k: v for k, v in self.meta.items() if not k.startswith("seconds")}
        if isinstance(meta.get("fp16_joint"), dict):
            meta["fp16_joint"] = {k: v for k, v in meta["fp16_joint"].items() if k != "seconds"}
        return dataclasses.replace(self, seconds=torch.full_like(self.seconds, math.nan), meta=meta)

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file (tensors ``kl``, ``kl_sem``, ``seconds``; JSON header), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"kind": FILE_KIND, "version": str(FILE_VERSION), "header": json.dumps(self.header())}
        tensors = {"kl": self.table.contiguous(), "kl_sem": self.sem.contiguous(),
                   "seconds": self.seconds.contiguous()}
        return atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SensitivityResult":
        """Read a file written by ``save``; errors name the file and what is wrong with it."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sensitivity file {str(path)!r} does not exist")
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("kind") != FILE_KIND:
                raise ValueError(f"{path} is not a sensitivity file (kind {metadata.get('kind')!r})")
            if metadata.get("version") != str(FILE_VERSION):
                raise ValueError(f"{path} has sensitivity file version {metadata.get('version')!r}; "
                                 f"this workbench reads version {FILE_VERSION}")
            table, sem, seconds = f.get_tensor("kl"), f.get_tensor("kl_sem"), f.get_tensor("seconds")
        head = json.loads(metadata["header"])
        return cls(modules=list(head["modules"]), formats=list(head["formats"]), table=table,
                   numel=[int(n) for n in head["numel"]], levels=[int(v) for v in head["levels"]],
                   seconds=seconds, meta=dict(head["meta"]), sem=sem)

    # ---- data and views
    def summary(self) -> str:
        done = int(self.measured.sum())
        calib = self.meta.get("settings", {}).get("calibration", {})
        text = (f"{done}/{len(self.modules)} modules × {len(self.formats)} formats measured on "
                f"{calib.get('samples')}×{calib.get('seq_len')} calibration tokens")
        if "seconds_total" in self.meta:
            text += f", {self.meta['seconds_total']:.1f} s of measurement"
        if self.floor_kl is not None:
            text += f"; floor KL {self.floor_kl:.1e}"
        return text

    def to_dict(self) -> dict[str, Any]:
        def cell(v: float) -> float | None:
            return None if math.isnan(v) else v

        return {
            "modules": self.modules, "formats": self.formats, "numel": self.numel, "levels": self.levels,
            "kl": [[cell(v) for v in row] for row in self.table.tolist()],
            "kl_sem": [[cell(v) for v in row] for row in self.sem.tolist()],
            "seconds": [cell(v) for v in self.seconds.tolist()],
            "meta": self.meta,
        }

    def table_rows(self):
        columns = ("module", "level", *self.formats)
        return columns, [(m, lv, *[float(v) for v in self.table[i].tolist()])
                         for i, (m, lv) in enumerate(zip(self.modules, self.levels))]

    def figure(self):
        """Heatmap of log10 KL, modules (rows, model order) × formats; exact zeros left blank."""
        import plotly.graph_objects as go

        z, hover = [], []
        for i, module in enumerate(self.modules):
            zr, hr = [], []
            for j, f in enumerate(self.formats):
                v = float(self.table[i, j])
                zr.append(math.log10(v) if v > 0 else None)
                what = ("not measured" if math.isnan(v) else
                        "exactly 0 (weights unchanged)" if v == 0 else
                        f"KL {v:.3e} ± {float(self.sem[i, j]):.1e}")
                hr.append(f"{module} (L{self.levels[i]})<br>{f}: {what}")
            z.append(zr)
            hover.append(hr)
        fig = go.Figure(go.Heatmap(
            uid="sensitivity-heatmap", x=self.formats, y=self.modules, z=z, hovertext=hover,
            hoverinfo="text", colorscale="Viridis", colorbar=dict(title="log10 KL"),
        ))
        fig.update_yaxes(autorange="reversed", showticklabels=len(self.modules) <= 60, type="category")
        fig.update_layout(title=f"Sensitivity: log10 KL(P_ref ‖ P_q) per module and format — {self.summary()}",
                          height=max(400, min(2400, 12 * len(self.modules))), template="plotly_white")
        return fig

    def layer_figure(self):
        """One line per format: KL of each module (log axis), modules in model order."""
        import plotly.graph_objects as go

        fig = go.Figure()
        x = list(range(len(self.modules)))
        for j, f in enumerate(self.formats):
            y = [v if v > 0 else None for v in self.table[:, j].tolist()]  # NaN stays a gap, 0 too
            fig.add_scatter(uid=f"sensitivity-{f}", name=f, x=x, y=y, mode="lines+markers",
                            hovertext=self.modules, hoverinfo="text+y+name")
        fig.update_layout(title="Sensitivity per module", xaxis_title="module (model order)",
                          yaxis=dict(type="log", title="KL nats/token"), template="plotly_white", height=420)
        return fig


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
    return measure_sensitivity(session.working, session.tokenizer, levels, cfg, progress=session.progress)
