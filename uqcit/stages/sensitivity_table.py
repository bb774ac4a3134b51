"""The sensitivity table: KL per module and format, its file and its views.

``SensitivityResult`` is what ``uqcit.stages.sensitivity`` measures and
``uqcit.stages.sensitivity_fisher`` predicts, and what the allocator reads. It is stored in a
safetensors file (``[modules, formats]`` tables of KL and of its standard error, NaN where not
yet measured, plus JSON header metadata); never pickle.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from uqcit.core.io import atomic_write_with
from uqcit.core.results import Result
from uqcit.tensor.formats import QuantFormat, parse_format

FILE_KIND = "uqcit-sensitivity"
FILE_VERSION = 1
_BARE_RE = re.compile(r"^w(\d+)$")


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
        how = "predicted from the diagonal Fisher" if self.meta.get("method") == "fisher" else "measured"
        text = (f"{done}/{len(self.modules)} modules × {len(self.formats)} formats {how} on "
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
