"""ClusterExplorer: a module's |corr| heatmap with its GHZ clusters, re-cut live by a threshold slider."""
from __future__ import annotations

import html
import time

import ipywidgets as W
import torch

from uqcit.stages.clusters import ClustersConfig, ClustersResult, ModuleClusters, _image, find_clusters, row_correlation
from uqcit.runtime.modules import linear_weight

from ._base import LabState, View, figure_widget, sync_figure


class ClusterExplorer(View):
    """Correlation clusters of one module's weight rows (``uqcit.stages.clusters``), explored live.

    The row correlation of a module is computed once and cached; moving the threshold only
    re-runs ``find_clusters`` on it (connected components, milliseconds) and updates the
    heatmap, its cluster outlines and the size histogram in place. "Use in recipe" writes the
    threshold into the recipe's ``clusters`` stage.

    >>> from uqcit.inputs.tiny import tiny_model
    >>> from uqcit.stages.levels import analyze_levels
    >>> model = tiny_model("llama")[0]
    >>> explorer = ClusterExplorer(model, analyze_levels(model), module="model.layers.0.self_attn.q_proj")
    >>> explorer.threshold.value = 0.2  # moving the slider re-clusters at once
    >>> explorer.result.config.threshold, explorer.result.modules[0].name
    (0.2, 'model.layers.0.self_attn.q_proj')
    """

    def __init__(self, model, levels, *, module: str | None = None, threshold: float = 0.7,
                 max_rows: int = ClustersConfig.max_rows, state: LabState | None = None):
        super().__init__(state)
        self.model = model
        self.levels = levels
        self.max_rows = max_rows
        self._named = dict(model.named_modules())
        self._corr: dict[str, torch.Tensor] = {}
        names = [e.name for e in levels.quantizable() if e.kind != "embedding" and e.shape[0] <= max_rows]
        if not names:
            raise ValueError(f"no linear module with at most {max_rows} rows to explore")
        if module is not None and module not in names:
            raise ValueError(f"module {module!r} is not a linear module with at most {max_rows} rows; "
                             f"e.g. {names[0]!r}")
        self.module_picker = W.Dropdown(options=names, value=module or names[0], description="module",
                                        layout=W.Layout(width="460px"))
        self.threshold = W.FloatSlider(value=threshold, min=0.05, max=0.99, step=0.01, description="|corr| >",
                                       continuous_update=True, readout_format=".2f")
        self.apply_button = W.Button(description="Use in recipe", icon="check",
                                     tooltip="write this threshold into the recipe's clusters stage")
        self.summary = W.HTML()
        self.result: ClustersResult = self._recluster()
        self.heatmap = figure_widget(self._heatmap_figure())
        self.sizes = figure_widget(self._size_figure())
        self.module_picker.observe(self.guarded(self._on_change, "module"), "value")
        self.threshold.observe(self.guarded(self._on_change, "threshold"), "value")
        self.apply_button.on_click(self.guarded(lambda _: self.apply_to_recipe(), "recipe"))
        self.lab.observe(self.guarded(self._on_selected, "selection"), "module")
        self.children = [self.error, W.HBox([self.module_picker, self.threshold, self.apply_button]), self.summary,
                         W.HBox([self.heatmap, self.sizes])]
        self._update_summary()

    # ---- compute (all of it in the core: row_correlation, find_clusters)
    def correlation(self, name: str) -> torch.Tensor:
        """``[rows, rows]`` Pearson correlation of the module's weight rows, cached per module."""
        if name not in self._corr:
            self._corr[name] = row_correlation(linear_weight(self._named[name])[0])
        return self._corr[name]

    def _recluster(self) -> ClustersResult:
        t0 = time.perf_counter()
        name, thr = self.module_picker.value, float(self.threshold.value)
        corr = self.correlation(name)
        clusters = find_clusters(corr, thr)
        off = corr.abs().fill_diagonal_(0.0)
        e = self.levels.entry(name)
        mc = ModuleClusters(name, e.level, e.block, e.shape[0], clusters, float(off.max()))
        cfg = ClustersConfig(threshold=thr, source="weights", modules=name, max_rows=self.max_rows)
        return ClustersResult(config=cfg, modules=[mc], skipped={}, seconds=time.perf_counter() - t0,
                              _images={name: _image(off, clusters)})

    # ---- views
    def _heatmap_figure(self):
        fig = self.result.figure(self.module_picker.value)
        fig.data[0].uid = "clusters-heatmap"  # one trace, whatever module it shows
        fig.update_layout(width=560, height=520)
        return fig

    def _size_figure(self):
        fig = self.result.size_figure()
        fig.update_layout(title=f"cluster sizes at |corr| > {self.threshold.value:.2f}", width=420, height=360)
        return fig

    def _on_change(self, change=None) -> None:
        self.result = self._recluster()
        sync_figure(self.heatmap, self._heatmap_figure())
        sync_figure(self.sizes, self._size_figure())
        self._update_summary()

    def _on_selected(self, change) -> None:
        name = change["new"]
        e = self.levels.entry(name) if name else None
        if e is not None and e.tied_to is None and name in self.module_picker.options:
            self.module_picker.value = name

    def _update_summary(self) -> None:
        m = self.result.modules[0]
        self.summary.value = (f"<span class='uqcit-clusters'><b>{len(m.clusters)}</b> clusters, "
                              f"{m.rows_in_clusters:,} of {m.rows:,} rows in clusters, largest "
                              f"{max(m.sizes, default=0)}; max off-diagonal |corr| {m.max_offdiag:.3f} "
                              f"({html.escape(m.name)}, weight rows)</span>")

    @property
    def clusters(self) -> list[list[int]]:
        """Clusters of the shown module at the current threshold."""
        return self.result.modules[0].clusters

    def apply_to_recipe(self) -> None:
        """Write the threshold into the recipe's ``clusters`` stage (added when missing)."""
        if self.lab.recipe is None:
            raise RuntimeError("no recipe to edit: this view has no shared recipe (Workbench sets one)")
        old = self.lab.recipe.stage("clusters")
        cfg = (old or ClustersConfig()).replace(threshold=float(self.threshold.value))
        self.lab.recipe = self.lab.recipe.with_stage(cfg)
