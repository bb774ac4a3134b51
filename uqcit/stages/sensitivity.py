"""Per-layer sensitivity, measured: the output KL when one module alone is quantized.

For every quantizable module (an entry of ``LevelsResult.quantizable()``) and every candidate
format, the module's weight is replaced by its quantized-then-dequantized copy, the model runs
on calibration text (``data.calibration_batch``), and the mean per-token
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

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from uqcit.core.config import StageConfig, register_config
from uqcit.tensor.formats import FLOAT_BITS, QuantFormat, parse_format
from uqcit.stages.levels import select_modules
from uqcit.core.results import Result

FILE_KIND = "uqcit-sensitivity"
FILE_VERSION = 1
DEFAULT_FORMATS = ("w2", "w3", "w4", "w8", "fp16")
# Reference probabilities are stored as fp16(p * 2**15): p = 1 stays below fp16's max (65504) and
# p down to ~1.9e-9 keeps full fp16 precision (2**-14 / 2**15), instead of underflowing near 6e-8.
_PROB_SCALE = 2.0**15
# Replaying every block must reproduce the reference output; a larger KL means the model does
# something between blocks that recorded outputs cannot stand in for (in-place edits, state).
_FLOOR_LIMIT = 1e-4
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

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file (tensors ``kl``, ``kl_sem``, ``seconds``; JSON header), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"kind": FILE_KIND, "version": str(FILE_VERSION), "header": json.dumps(self.header())}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file({"kl": self.table.contiguous(), "kl_sem": self.sem.contiguous(),
                       "seconds": self.seconds.contiguous()}, tmp, metadata=metadata)
            os.replace(tmp, path)  # readers see the old file or the new one, never half of one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

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

    if config.calib_samples < 1 or config.calib_seq_len < 2 or config.batch_size < 1 or config.flush_every < 1:
        raise ValueError(f"calib_samples, batch_size and flush_every must be >= 1 and calib_seq_len >= 2; "
                         f"got {config.calib_samples}, {config.batch_size}, {config.flush_every}, "
                         f"{config.calib_seq_len}")
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
            probe = _Probe(model, levels, ids, config.batch_size, config.replay)
            result.meta["seconds_reference"] = time.perf_counter() - t_start  # reference pass + floor check
            result.meta.setdefault("floor_kl", probe.floor_kl)
            result.meta["replay"] = probe.replay_blocks is not None
            fp16 = [j for j, f in enumerate(fmts) if f.bits == FLOAT_BITS]
            if config.fp16_joint and fp16 and bool(torch.isnan(result.table[:, fp16[0]]).any()):
                t0 = time.perf_counter()
                kl, sem = _measure_joint(probe, [named[e.name] for e in entries], entries, fmts[fp16[0]])
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
                    kls, sems = _measure_module(probe, named[entry.name], entry, fmts, result.table[i],
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


def _measure_module(probe: "_Probe", module: nn.Module, entry, fmts: list[QuantFormat],
                    done: torch.Tensor, done_sem: torch.Tensor) -> tuple[list[float], list[float]]:
    """KL and its standard error for each format not yet measured (NaN in ``done``).

    The weight is restored bit for bit afterwards, whatever happens.
    """
    kls = [float(v) for v in done.tolist()]
    sems = [float(v) for v in done_sem.tolist()]
    with _swapped([module], [entry]) as (saved, put):
        for j, fmt in enumerate(fmts):
            if not math.isnan(kls[j]):
                continue
            w_hat = _dequantized(saved[0], entry, fmt)
            if torch.equal(w_hat, saved[0]):
                kls[j], sems[j] = 0.0, 0.0  # the model is unchanged: its output, and the KL, exactly 0
                continue
            put(0, w_hat)
            kls[j], sems[j] = probe.kl(entry.name)
    return kls, sems


def _measure_joint(probe: "_Probe", modules: list[nn.Module], entries: list, fmt: QuantFormat) -> tuple[float, float]:
    """KL with every module in ``fmt`` at once (one pass from the first of them)."""
    with _swapped(modules, entries) as (saved, put):
        for k, entry in enumerate(entries):
            put(k, _dequantized(saved[k], entry, fmt))
        return probe.kl_from(min(probe.start.get(e.name, 0) for e in entries))


def _dequantized(weight: torch.Tensor, entry, fmt: QuantFormat) -> torch.Tensor:
    """``weight`` through ``fmt`` and back, in the weight's own layout and dtype."""
    from uqcit.tensor.quant import dequantize, quantize

    transposed = entry.kind == "conv1d"  # GPT-2 Conv1D stores [in, out]; formats see [out, in]
    matrix = weight.t() if transposed else weight
    w_hat = dequantize(quantize(matrix, fmt), dtype=weight.dtype)
    return w_hat.t() if transposed else w_hat


@contextlib.contextmanager
def _swapped(modules: list[nn.Module], entries: list) -> Iterator[tuple[list[torch.Tensor], Callable]]:
    """Yield saved copies of the modules' weights and ``put(k, w)``; restore every weight on exit."""
    saved = [m.weight.detach().clone() for m in modules]
    try:
        def put(k: int, w: torch.Tensor) -> None:
            with torch.no_grad():
                modules[k].weight.copy_(w)
        yield saved, put
    finally:
        with torch.no_grad():
            for m, w in zip(modules, saved):
                m.weight.copy_(w)


class _Replay(nn.Module):
    """Stands in for a block: returns its recorded output for the current micro-batch."""

    def __init__(self, block: nn.Module, outputs: list[Any], cursor: list[int]):
        super().__init__()
        object.__setattr__(self, "_block", block)  # plain attribute: not a registered child
        self._outputs = outputs
        self._cursor = cursor

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._outputs[self._cursor[0]]

    def __getattr__(self, name: str) -> Any:
        # The model may read attributes of its blocks (an attention type, say): forward them.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


class _Probe:
    """The reference pass and its records; ``kl(name)`` measures the model as it is now."""

    def __init__(self, model: nn.Module, levels, ids: torch.Tensor, batch_size: int, replay: bool):
        self.model = model
        self.batches = list(ids.split(batch_size))
        self.cursor = [0]
        found = _block_container(model, levels) if replay else None
        self.replay_blocks: nn.ModuleList | None = found[1] if found else None
        self.container_name = found[0] if found else None
        n_blocks = len(self.replay_blocks) if self.replay_blocks is not None else 0
        self.block_outputs: list[list[Any]] = [[] for _ in range(n_blocks)]
        self.ref: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (h fp16, s, A) per micro-batch
        self.start: dict[str, int] = {}  # module -> blocks finished before its first call
        self._reference_pass(levels)
        self.floor_kl = self.kl_from(n_blocks)[0]  # everything replayed: must reproduce the reference
        if self.replay_blocks is not None and not self.floor_kl < _FLOOR_LIMIT:
            raise RuntimeError(
                f"replaying the recorded outputs of {self.container_name} does not reproduce the model "
                f"(KL {self.floor_kl:.2e}); measure with SensitivityConfig(replay=False)")
        # Work estimate for the progress bar: weights run when measuring from each start block.
        self._pos = {m.name: (m.block if m.block is not None else (-1 if self.start.get(m.name, 0) == 0
                                                                  else n_blocks)) for m in levels.modules}
        self._numel = {m.name: m.numel for m in levels.modules if m.kind != "embedding"}

    def work(self, name: str) -> float:
        start = self.start.get(name, 0)
        return sum(n for m, n in self._numel.items() if self._pos[m] >= start) / 1e6 or 1.0

    def _reference_pass(self, levels) -> None:
        named = dict(self.model.named_modules())
        events: list[tuple[str, Any]] = []
        handles = []
        try:
            for m in levels.modules:
                handles.append(named[m.name].register_forward_pre_hook(
                    lambda mod, args, name=m.name: events.append(("call", name))))
            for i, block in enumerate(self.replay_blocks or []):
                handles.append(block.register_forward_hook(self._recorder(i, events)))
            for mb, x in enumerate(self.batches):
                self.cursor[0] = mb
                events.clear()
                z = self._logits(x)
                if mb == 0:
                    finished = 0
                    for kind, what in events:
                        if kind == "done":
                            finished += 1
                        elif what not in self.start:
                            self.start[what] = finished
                self.ref.append(_reference_stats(z))
                del z
        finally:
            for h in handles:
                h.remove()

    def _recorder(self, i: int, events: list) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.block_outputs[i].append(output)
            events.append(("done", i))
        return hook

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=x, use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits.float()

    def kl(self, name: str) -> tuple[float, float]:
        """Mean KL of the model as it is now against the reference (and its standard error
        over sequences), recomputing only from the first block ``name`` can affect."""
        return self.kl_from(self.start.get(name, 0))

    def kl_from(self, start: int) -> tuple[float, float]:
        """Mean KL and standard error, replaying the first ``start`` blocks from the records."""
        per_seq = []
        with self._replaying(start):
            for mb, x in enumerate(self.batches):
                self.cursor[0] = mb
                per_seq.append(_kl_per_sequence(self._logits(x), *self.ref[mb]))
        kl = torch.cat(per_seq) / self.batches[0].shape[1]  # [sequences] mean KL of each
        sem = float(kl.std() / math.sqrt(kl.numel())) if kl.numel() > 1 else math.nan
        return float(kl.mean()), sem

    @contextlib.contextmanager
    def _replaying(self, start: int) -> Iterator[None]:
        blocks = self.replay_blocks
        if blocks is None or start == 0:
            yield
            return
        originals = [blocks[i] for i in range(start)]
        try:
            for i, block in enumerate(originals):
                blocks[i] = _Replay(block, self.block_outputs[i], self.cursor)
            yield
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block


def _block_container(model: nn.Module, levels) -> tuple[str, nn.ModuleList] | None:
    """The one ``ModuleList`` of blocks (None when blocks sit in several stacks, or none)."""
    stacks: set[str] = set()
    for m in levels.modules:
        match = re.search(levels.ruleset.block_pattern, m.name)
        if match:
            stacks.add(m.name[: match.start(1)].rstrip("."))
    if len(stacks) != 1:
        return None
    name = stacks.pop()
    try:
        container = model.get_submodule(name)
    except AttributeError:
        return None
    return (name, container) if isinstance(container, nn.ModuleList) else None


def _reference_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From reference logits [b, T, V]: stored probabilities h (fp16), their sums s and Σ p̃ log p̃.

    The reference distribution is p̃ = h / s with h = fp16(softmax(z) · 2**15).
    """
    h = torch.softmax(z, dim=-1).mul_(_PROB_SCALE).to(torch.float16)
    hf = h.to(torch.float32)
    s = hf.sum(dim=-1, dtype=torch.float64)  # [b, T]
    pt = hf.div_(s.unsqueeze(-1).to(torch.float32))
    neg_entropy = torch.xlogy(pt, pt).sum(dim=-1, dtype=torch.float64)
    return h, s, neg_entropy


def _kl_per_sequence(z: torch.Tensor, h: torch.Tensor, s: torch.Tensor, neg_entropy: torch.Tensor) -> torch.Tensor:
    """Per sequence, Σ over its positions of KL(p̃ ‖ softmax(z)) = Σ p̃ log p̃ − Σ p̃ z + logsumexp(z).

    z is shifted by its per-position max first, so the terms summed are small where p̃ is
    large and the cancellation in the difference stays near float32 resolution.
    """
    z = z - z.amax(dim=-1, keepdim=True)
    lse = torch.logsumexp(z, dim=-1).to(torch.float64)
    dot = torch.linalg.vecdot(z, h.to(torch.float32)).to(torch.float64) / s
    return (neg_entropy - dot + lse).sum(dim=-1)
