"""LevelMap: the layer × role map of Levels 1-5; click a cell to select its module everywhere."""
from __future__ import annotations

import html
import math
from typing import Any

import ipywidgets as W

from ._base import LabState, View, figure_widget

_BLOCKS, _OUTSIDE = "levels-blocks", "levels-outside"


class LevelMap(View):
    """Blocks × roles coloured by level (``LevelsResult.figure()``), with a details panel.

    Hover shows the module, its shape, role and the rule that matched (and its importance
    scores when an ``ImportanceResult`` is given); a click selects the module in the shared
    ``LabState`` so the cluster explorer and the budget editor follow.

    >>> from uqcit.inputs.tiny import tiny_model
    >>> from uqcit.stages.levels import analyze_levels
    >>> view = LevelMap(analyze_levels(tiny_model("llama")[0]))
    >>> view.select("model.layers.0.self_attn.o_proj")  # what a click on its cell does
    >>> view.lab.module  # now selected for every view sharing this LabState
    'model.layers.0.self_attn.o_proj'
    """

    def __init__(self, levels, *, importance=None, sensitivity=None, state: LabState | None = None):
        super().__init__(state)
        self.levels = levels
        self.importance = importance
        self.sensitivity = sensitivity
        self.figure = figure_widget(self._core_figure())
        for trace in self.figure.data:
            trace.on_click(self.guarded(self._on_click, "select module"))
        self.details = W.HTML(layout=W.Layout(min_width="320px"))
        counts = levels.level_counts()
        self.counts = W.HTML(
            "<b>Levels</b>: " + " · ".join(f"L{lv}: {c.modules} modules, {c.params:,} params"
                                           + (f" (+{c.tied} tied)" if c.tied else "") for lv, c in counts.items()))
        self.lab.observe(self.guarded(lambda change: self._show(change["new"]), "details"), "module")
        self.lab.observe(self.guarded(lambda change: self._show(self.lab.module), "details"), "allocation")
        self.children = [self.error, W.HTML(f"<b>{html.escape(levels.summary())}</b>"), self.counts,
                         W.HBox([self.figure, self.details])]
        self._show(self.lab.module)

    # ---- figure
    def _core_figure(self):
        fig = self.levels.figure()
        if self.importance is not None:  # append each cell's importance scores to its hover text
            for trace in fig.data:
                trace.hovertext = [[self._with_importance(cell) for cell in row] for row in trace.hovertext]
        fig.update_layout(width=620)
        return fig

    def _with_importance(self, cell: str) -> str:
        name = cell.split("<br>", 1)[0]
        try:
            layer = self.importance.layer(name)
        except KeyError:
            return cell
        scores = ", ".join(f"{k} {v:.3g}" for k, v in layer.scores.items() if not math.isnan(v))
        return f"{cell}<br>importance: {scores}" if scores else cell

    def module_at(self, trace: int | str, x: Any, y: Any) -> str | None:
        """The module drawn at ``(x, y)`` of a trace (by index, or by the core figure's uid
        ``"levels-blocks"``/``"levels-outside"``); the first module when a cell holds several."""
        index = self.figure._uqcit_uids.index(trace) if isinstance(trace, str) else trace
        t = self.figure.data[index]
        xs, ys = list(t.x), list(t.y)
        if x not in xs or y not in ys:
            return None
        cell = t.hovertext[ys.index(y)][xs.index(x)]
        return cell.split("<br>", 1)[0] if cell else None

    def _on_click(self, trace, points, selector=None) -> None:
        if not points.xs:
            return
        index = [t.uid for t in self.figure.data].index(trace.uid)
        name = self.module_at(index, points.xs[0], points.ys[0])
        if name is not None:
            self.select(name)

    def select(self, name: str) -> None:
        """Select a module by name (what a click does)."""
        self.levels.entry(name)  # KeyError names an unknown module
        self.lab.module = name

    # ---- details
    def _show(self, name: str | None) -> None:
        if name is None:
            self.details.value = "<i>Click a cell to select its module.</i>"
            return
        m = self.levels.entry(name)
        rows = [("module", m.name), ("kind", m.kind), ("shape", f"{m.shape[0]}×{m.shape[1]}"),
                ("parameters", f"{m.numel:,}"), ("block", m.block), ("role", m.role),
                ("level", f"L{m.level}" + (f" (late block; role level {m.role_level})" if m.late else "")),
                ("rule", m.rule), ("tied to", m.tied_to or "—")]
        if self.importance is not None:
            try:
                layer = self.importance.layer(name)
                rows += [(f"importance: {k}", f"{v:.4g}") for k, v in layer.scores.items()]
            except KeyError:
                pass
        owner = m.tied_to or m.name
        if self.sensitivity is not None and owner in self.sensitivity.modules:
            rows += [(f"KL in {f}", "not measured" if v != v else f"{v:.3e}")
                     for f, v in self.sensitivity.row(owner).items()]
        alloc = self.lab.allocation
        if alloc is not None and owner in alloc.choices:
            rows.append(("current plan", alloc.choices[owner]))
        body = "".join(f"<tr><td><b>{html.escape(str(k))}</b></td><td>{html.escape(str(v))}</td></tr>"
                       for k, v in rows)
        self.details.value = f"<table class='uqcit-table uqcit-module'>{body}</table>"
