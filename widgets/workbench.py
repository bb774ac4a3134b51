"""Workbench: the whole lab in tabs, from a model name in one line."""
from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Any, Callable

import ipywidgets as W

from uqcit.stages.allocate import AllocateConfig
from uqcit.stages.quantize import QuantizeConfig
from uqcit.stages.evaluate import EvalConfig
from uqcit.stages.levels import LevelsConfig
from uqcit.pipeline import Session
from uqcit.recipe import Recipe
from uqcit.stages.sensitivity import SensitivityConfig, SensitivityResult

from ._base import ErrorBox, LabState
from .budget import BudgetEditor
from .clusters import ClusterExplorer
from .evaluate import EvalPanel
from .export import ExportPanel
from .levels import LevelMap
from .rotation import RotationView

# Without a measured table: every module in 4 formats on 2 × 64 calibration tokens. Enough to make
# the editor work and show the shape of the trade-off; too little text for decisions (kl_sem says
# how noisy), so the dashboard labels it QUICK.
QUICK_SENSITIVITY = SensitivityConfig(formats=("w2", "w3", "w4", "w8", "fp16"), calib_samples=2, calib_seq_len=64)
# The measured SmolLM2 table the dashboard notebook and the browser test use (repo-relative).
DASHBOARD_SENSITIVITY = "benchmarks/results/sensitivity-smollm2-135m.safetensors"
TABS = ("Levels", "Clusters", "Rotation", "Budget", "Evaluate", "Export", "Recipe")


class Workbench(W.VBox):
    """The lab dashboard: level map, clusters, rotation, bit budget, evaluation, export, recipe.

    ``model`` is a model name for ``uqcit.inputs.models.load_model`` (e.g. ``"smollm2-135m"``) or a
    ``Session`` already loaded. ``sensitivity`` is a measured table: a ``.safetensors`` path
    (``SensitivityResult.save``), a ``SensitivityResult``, or None to measure a QUICK table
    (``QUICK_SENSITIVITY``; cached under the workbench's data folder, so only the first
    dashboard of a model pays for it). The header says which one the budget editor uses.

    In a notebook, on the default model with the repository's measured table::

        Workbench("smollm2-135m", sensitivity="benchmarks/results/sensitivity-smollm2-135m.safetensors")

    The same on a tiny model, with a small table measured on the spot:

    >>> from uqcit.pipeline import Session
    >>> from uqcit.stages.sensitivity import SensitivityConfig, measure_sensitivity
    >>> s = Session.from_model("tiny-llama", progress=False)
    >>> levels = s.run_stage(LevelsConfig())
    >>> sens = measure_sensitivity(s.reference, s.tokenizer, levels, SensitivityConfig(
    ...     formats=("w2", "w4"), group_size=32, calib_samples=2, calib_seq_len=32), progress=False)
    >>> wb = Workbench(s, sensitivity=sens)
    >>> list(wb.tabs.titles)
    ['Levels', 'Clusters', 'Rotation', 'Budget', 'Evaluate', 'Export', 'Recipe']
    """

    def __init__(self, model: str | Session = "smollm2-135m", *,
                 sensitivity: str | os.PathLike | SensitivityResult | None = None,
                 target_bpw: float = 3.25, eval_windows: int = 2, export_path: str | None = None,
                 levels: LevelsConfig = LevelsConfig(), selected: str = "Budget", progress: bool = False):
        super().__init__()
        if selected not in TABS:
            raise ValueError(f"selected must be one of {TABS}, got {selected!r}")
        if isinstance(model, Session):
            self.session = model
        elif isinstance(model, str):
            self.session = Session.from_model(model, progress=progress)
        else:
            raise TypeError(f"model must be a model name or a Session, got {type(model).__name__}")
        s = self.session
        self.levels = s.results.get("levels") or s.run_stage(levels)
        self.sensitivity, self.sensitivity_source, sens_cfg = self._sensitivity(sensitivity, progress)
        s.results["sensitivity"] = self.sensitivity
        self.lab = LabState()
        self.lab.recipe = Recipe(
            name=f"workbench-{_slug(s.name)}",
            description="Edited in the UQCIT Workbench dashboard.",
            stages=(self.levels.config, sens_cfg, AllocateConfig(target_bpw=target_bpw), QuantizeConfig(),
                    EvalConfig(max_windows=eval_windows)))

        n_params = sum(p.numel() for p in s.reference.parameters())
        self.header = W.HTML(
            f"<div class='uqcit-header'><h3 style='margin:4px 0'>UQCIT Workbench — {html.escape(s.name)}</h3>"
            f"{html.escape(type(s.reference).__name__)}, {n_params:,} parameters · {html.escape(self.levels.summary())}"
            f"<br>sensitivity: {self._source_html()}</div>")
        self.views: dict[str, Any] = {}
        builders: dict[str, Callable[[], Any]] = {
            "Levels": lambda: LevelMap(self.levels, sensitivity=self.sensitivity,
                                       importance=s.results.get("importance"), state=self.lab),
            "Clusters": lambda: ClusterExplorer(s.reference, self.levels, state=self.lab),
            "Rotation": lambda: RotationView(s.reference, self.levels, state=self.lab),
            "Budget": lambda: BudgetEditor(self.levels, self.sensitivity, target_bpw=target_bpw, reference=s.reference,
                                           source=self._source_html(), state=self.lab),
            "Evaluate": lambda: EvalPanel(s.reference, s.tokenizer, self.levels, windows=eval_windows, state=self.lab),
            "Export": lambda: ExportPanel(s.reference, s.tokenizer, self.levels, state=self.lab, source_model=s.name,
                                          sensitivity=self.sensitivity, clusters=s.results.get("clusters"),
                                          path=export_path or f"runs/{_slug(s.name)}-workbench/package"),
            "Recipe": self._recipe_view,
        }
        # Budget first: the others read the plan it publishes.
        for name in ("Budget", *[t for t in TABS if t != "Budget"]):
            self.views[name] = self._build(name, builders[name])
        self.tabs = W.Tab(children=[self.views[t] for t in TABS], titles=TABS, selected_index=TABS.index(selected))
        self.children = [self.header, self.tabs]

    # ---- the parts, by name
    @property
    def level_map(self) -> LevelMap:
        return self.views["Levels"]

    @property
    def clusters(self) -> ClusterExplorer:
        return self.views["Clusters"]

    @property
    def rotation(self) -> RotationView:
        return self.views["Rotation"]

    @property
    def budget(self) -> BudgetEditor:
        return self.views["Budget"]

    @property
    def evaluation(self) -> EvalPanel:
        return self.views["Evaluate"]

    @property
    def export(self) -> ExportPanel:
        return self.views["Export"]

    @property
    def recipe(self) -> Recipe:
        """The recipe as edited so far."""
        return self.lab.recipe

    # ---- building
    def _build(self, name: str, builder: Callable[[], Any]):
        try:
            return builder()
        except Exception as exc:  # a tab that cannot be built shows why, the others still work
            box = ErrorBox()
            box.show(exc, f"{name} view")
            return W.VBox([box])

    def _sensitivity(self, given, progress: bool) -> tuple[SensitivityResult, str, SensitivityConfig]:
        s = self.session
        if isinstance(given, SensitivityResult):
            return given, "given", _config_of(given, None)
        if isinstance(given, (str, os.PathLike)):
            result = SensitivityResult.load(given)
            return result, "file", _config_of(result, str(given))
        if given is not None:
            raise TypeError(f"sensitivity must be a path, a SensitivityResult or None, got {type(given).__name__}")
        from uqcit.core.paths import home

        path = home() / "sensitivity" / f"{_slug(s.name)}-quick.safetensors"
        try:
            result = s.run_stage(QUICK_SENSITIVITY.replace(path=str(path)))
        except ValueError as exc:
            if "measured with other settings" not in str(exc):
                raise
            result = s.run_stage(QUICK_SENSITIVITY)  # a stale cache of another model: measure in memory
            path = None
        return result, "quick", QUICK_SENSITIVITY.replace(path=str(path) if path else None)

    def _source_html(self) -> str:
        sens = self.sensitivity
        calib = sens.meta.get("settings", {}).get("calibration", {})
        what = (f"{int(sens.measured.sum())}/{len(sens.modules)} modules × {len(sens.formats)} formats "
                f"({', '.join(sens.formats)}) on {calib.get('samples')}×{calib.get('seq_len')} calibration tokens")
        default = SensitivityConfig()
        tokens = (calib.get("samples") or 0) * (calib.get("seq_len") or 0)
        origin = {"quick": "measured just now", "given": "measured table", "file": "measured file"}[self.sensitivity_source]
        if self.sensitivity_source == "quick" or tokens < default.calib_samples * default.calib_seq_len:
            return (f"<span class='uqcit-quick' style='color:#a15c00'><b>QUICK measurement</b> ({origin}) — "
                    f"{html.escape(what)}, fewer than the default {default.calib_samples}×{default.calib_seq_len}: "
                    "noisy, for exploring; measure the full table for decisions</span>")
        return f"<span class='uqcit-measured'><b>{origin}</b> — {html.escape(what)}</span>"

    def _recipe_view(self):
        box = W.HTML()

        def show(change=None) -> None:
            r = self.lab.recipe
            box.value = (f"<b>recipe {html.escape(r.name)}</b>: {' → '.join(st.type_tag for st in r.stages)}"
                         f"<pre class='uqcit-recipe' style='max-height:480px;overflow:auto'>{html.escape(r.to_json())}</pre>")

        self.lab.observe(show, "recipe")
        show()
        return W.VBox([box])

    def save_recipe(self, path: str | os.PathLike) -> Path:
        """Write the edited recipe as JSON (``uqcit compress --recipe PATH`` runs it)."""
        path = Path(path)
        self.lab.recipe.save(path)
        return path


def repo_sensitivity_file() -> Path | None:
    """The SmolLM2 sensitivity table committed in this repository (``DASHBOARD_SENSITIVITY``), when
    the workbench runs from a checkout that has it; None otherwise (then ``Workbench`` measures)."""
    path = Path(__file__).resolve().parents[1] / DASHBOARD_SENSITIVITY
    return path if path.is_file() else None


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def _config_of(result: SensitivityResult, path: str | None) -> SensitivityConfig:
    """The sensitivity stage config a measured table stands for (for the recipe)."""
    settings = result.meta.get("settings", {})
    calib = settings.get("calibration", {})
    return SensitivityConfig(formats=tuple(result.formats), calib_samples=int(calib.get("samples", 4)),
                             calib_seq_len=int(calib.get("seq_len", 128)), seed=int(calib.get("seed", 0)),
                             modules=settings.get("modules_pattern"), path=path,
                             fp16_joint=bool(settings.get("fp16_joint", True)))
