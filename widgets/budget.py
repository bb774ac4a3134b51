"""BudgetEditor: the per-module bit plan as an editable chart; the allocator re-solves on every edit."""
from __future__ import annotations

import dataclasses
import html
from typing import Any

import ipywidgets as W

from uqcit.stages.allocate import FLOAT, AllocateConfig, AllocationResult, allocate
from uqcit.tensor.formats import parse_format
from uqcit.stages.levels import LEVEL_NAMES, LEVELS

from ._base import LabState, View, figure_widget, html_rows, sync_figure

AUTO = "auto (solver)"


@dataclasses.dataclass(frozen=True)
class _Edit:
    """One state of the editor, kept for undo."""

    target_bpw: float
    pins: tuple[tuple[str, str], ...]
    formats: tuple[str, ...]


class BudgetEditor(View):
    """Target bits/weight, candidate formats and pins in; the allocator's plan and totals out.

    Every edit (the target slider, a pin on a module or on a whole level, the candidate
    formats) re-runs ``uqcit.stages.allocate.allocate`` on the measured sensitivity — a knapsack over
    a table, well under a second — and updates the chart and the totals in place: average
    stored bits/weight, predicted package size and predicted KL (the sum of measured per-module
    KLs: the allocator's additive model, not a measurement of the plan). Undo steps back
    through edits; "Apply to recipe" writes the ``allocate`` stage into the shared recipe.

    >>> from uqcit.inputs.tiny import tiny_model
    >>> from uqcit.stages.levels import analyze_levels
    >>> from uqcit.stages.sensitivity import SensitivityConfig, measure_sensitivity
    >>> model, tok = tiny_model("llama")
    >>> levels = analyze_levels(model)
    >>> sens = measure_sensitivity(model, tok, levels, SensitivityConfig(
    ...     formats=("w2", "w4", "w8"), group_size=32, calib_samples=2, calib_seq_len=32), progress=False)
    >>> editor = BudgetEditor(levels, sens, target_bpw=4.0)  # or SensitivityResult.load(path)
    >>> editor.target.value = 5.0  # dragging the slider re-runs the allocator
    >>> editor.allocation.target_bpw, editor.allocation.achieved_bpw <= 5.0
    (5.0, True)
    """

    def __init__(self, levels, sensitivity, *, target_bpw: float = 3.25, formats: tuple[str, ...] | None = None,
                 pins: dict[str, str] | None = None, reference=None, source: str = "",
                 resolution_bpw: float = AllocateConfig.resolution_bpw, fallback: str | None = None,
                 state: LabState | None = None):
        super().__init__(state)
        self.levels = levels
        self.sensitivity = sensitivity
        self.resolution_bpw = resolution_bpw
        self._owners = levels.quantizable()
        self._weights = sum(e.numel for e in self._owners)
        self._float_bytes = _other_param_bytes(reference, self._owners) if reference is not None else None
        measured = list(sensitivity.formats)
        formats = tuple(formats) if formats is not None else tuple(measured)
        # A table still being measured: its unmeasured modules are pinned to a fallback format
        # (shown, and left out of the predicted KL), so the rest can be allocated already.
        self.fallback = fallback or next((f for f in measured if f.startswith("w4")), measured[0])
        done = {m for m, ok in zip(sensitivity.modules, sensitivity.measured.tolist()) if ok}
        self.unmeasured = {e.name: self.fallback for e in self._owners if e.name not in done}
        self.history: list[_Edit] = []
        self._edit = _Edit(float(target_bpw), tuple(sorted((pins or {}).items())), formats)
        self._quiet = False  # set while undo moves the controls, so that is not a new edit
        self.allocation: AllocationResult | None = None

        lo, hi = self._bounds(formats)
        self.target = W.FloatSlider(value=target_bpw, min=lo, max=hi, step=0.05, description="target bpw",
                                    continuous_update=False, readout_format=".2f", layout=W.Layout(width="460px"))
        self.target.add_class("uqcit-target")  # the browser test finds the slider by it
        self.candidates = W.SelectMultiple(options=measured, value=formats, description="candidates",
                                           rows=min(6, len(measured)), layout=W.Layout(width="300px"))
        names = [e.name for e in self._owners]
        self.module_picker = W.Dropdown(options=names, description="module", layout=W.Layout(width="420px"))
        self.module_format = W.Dropdown(options=[AUTO, *measured, FLOAT], description="format")
        self.pin_button = W.Button(description="Pin module", icon="thumb-tack")
        self.level_picker = W.Dropdown(options=[(f"L{lv} {LEVEL_NAMES[lv]}", lv) for lv in LEVELS
                                                if any(e.level == lv for e in self._owners)], description="level")
        self.level_format = W.Dropdown(options=[AUTO, *measured, FLOAT], description="format")
        self.pin_level_button = W.Button(description="Pin level", icon="thumb-tack")
        self.clear_button = W.Button(description="Clear pins", icon="eraser")
        self.undo_button = W.Button(description="Undo", icon="undo", disabled=True)
        self.apply_button = W.Button(description="Apply to recipe", icon="check", button_style="success")
        self.source = W.HTML(f"<span class='uqcit-source'>{source}</span>" if source else "")
        self.totals_html = W.HTML()
        self.pins_html = W.HTML()
        self.levels_html = W.HTML()
        self.recipe_html = W.HTML()

        self._solve()
        self.figure = figure_widget(self._figure())
        for trace in self.figure.data:
            trace.on_click(self.guarded(self._on_click, "select module"))

        self.target.observe(self.guarded(self._on_target, "target bpw"), "value")
        self.candidates.observe(self.guarded(self._on_candidates, "candidates"), "value")
        self.pin_button.on_click(self.guarded(lambda _: self.pin(self.module_picker.value, self.module_format.value),
                                              "pin module"))
        self.pin_level_button.on_click(self.guarded(
            lambda _: self.pin_level(self.level_picker.value, self.level_format.value), "pin level"))
        self.clear_button.on_click(self.guarded(lambda _: self.clear_pins(), "clear pins"))
        self.undo_button.on_click(self.guarded(lambda _: self.undo(), "undo"))
        self.apply_button.on_click(self.guarded(lambda _: self.apply_to_recipe(), "apply"))
        self.module_picker.observe(self.guarded(self._on_module, "module"), "value")
        self.lab.observe(self.guarded(self._on_selected, "selection"), "module")

        controls = W.VBox([
            W.HBox([self.target, self.undo_button, self.apply_button]),
            W.HBox([self.module_picker, self.module_format, self.pin_button]),
            W.HBox([self.level_picker, self.level_format, self.pin_level_button, self.clear_button]),
        ])
        self.children = [self.error, self.source, W.HBox([controls, self.candidates]), self.totals_html,
                         self.figure, W.HBox([self.levels_html, self.pins_html]), self.recipe_html]
        self._refresh_text()
        self._on_module(None)

    # ---- edits (public: the same calls the controls make)
    @property
    def pins(self) -> dict[str, str]:
        return dict(self._edit.pins)

    @property
    def target_bpw(self) -> float:
        return self._edit.target_bpw

    def set_target(self, bpw: float) -> None:
        """Move the target (what the slider does) and re-solve."""
        if not self.target.min <= bpw <= self.target.max:
            raise ValueError(f"target {bpw} is outside the slider's range [{self.target.min}, {self.target.max}]")
        self.target.value = bpw  # the observer makes the edit (an error shows in the editor)

    def pin(self, module: str, fmt: str) -> None:
        """Pin ``module`` to ``fmt`` (a measured format, ``"float"``, or AUTO to unpin) and re-solve."""
        pins = self.pins
        if fmt == AUTO:
            pins.pop(module, None)
        else:
            pins[module] = fmt
        self._apply(dataclasses.replace(self._edit, pins=tuple(sorted(pins.items()))))

    def unpin(self, module: str) -> None:
        self.pin(module, AUTO)

    def pin_level(self, level: int, fmt: str) -> None:
        """Pin every module of a level (by exact name) to ``fmt``, or unpin them all with AUTO."""
        names = [e.name for e in self._owners if e.level == level]
        if not names:
            raise ValueError(f"no quantizable module at level {level}")
        pins = self.pins
        for n in names:
            if fmt == AUTO:
                pins.pop(n, None)
            else:
                pins[n] = fmt
        self._apply(dataclasses.replace(self._edit, pins=tuple(sorted(pins.items()))))

    def clear_pins(self) -> None:
        self._apply(dataclasses.replace(self._edit, pins=()))

    def undo(self) -> None:
        """Go back to the state before the last edit."""
        if not self.history:
            raise RuntimeError("nothing to undo")
        previous = self.history.pop()
        self._apply(previous, record=False)

    def apply_to_recipe(self) -> None:
        """Write the current ``AllocateConfig`` into the shared recipe (inserted in order when missing)."""
        if self.lab.recipe is None:
            raise RuntimeError("no recipe to edit: this editor has no shared recipe (Workbench sets one)")
        self.lab.recipe = self.lab.recipe.with_stage(self.config)
        self.recipe_html.value = (f"<span class='uqcit-applied'>Applied to recipe <b>{html.escape(self.lab.recipe.name)}"
                                  f"</b>: allocate stage = target {self.target_bpw:g} bpw, {len(self.pins)} pin(s), "
                                  f"candidates {', '.join(self._edit.formats)}.</span>")

    @property
    def config(self) -> AllocateConfig:
        """The allocator config the editor's state stands for."""
        e = self._edit
        formats = None if tuple(e.formats) == tuple(self.sensitivity.formats) else e.formats
        return AllocateConfig(target_bpw=e.target_bpw, pins={**self.unmeasured, **dict(e.pins)}, formats=formats,
                              resolution_bpw=self.resolution_bpw)

    @property
    def totals(self) -> dict[str, Any]:
        """What the totals line shows, as numbers (from the current ``AllocationResult``)."""
        a = self.allocation
        out = {"target_bpw": a.target_bpw, "bpw": a.achieved_bpw, "predicted_kl": a.predicted_kl,
               "weight_bytes": a.predicted_bytes, "unmeasured_pins": len(a.unmeasured),
               "formats": a.format_counts(), "pins": len(self.pins)}
        if self._float_bytes is not None:
            out["float_bytes"] = self._float_bytes
            out["package_bytes"] = a.predicted_bytes + self._float_bytes
        return out

    # ---- internals
    def _apply(self, edit: _Edit, record: bool = True) -> None:
        previous = self._edit
        self._edit = edit
        try:
            self._solve()
        except Exception:
            self._edit = previous  # the plan on screen stays the last one that solved
            self._move_controls(previous)
            raise
        if record:
            self.history.append(previous)
        self._move_controls(edit)
        sync_figure(self.figure, self._figure())
        self._refresh_text()

    def _solve(self) -> None:
        self.allocation = allocate(self.levels, self.sensitivity, self.config)
        self.lab.allocation = self.allocation

    def _move_controls(self, edit: _Edit) -> None:
        self._quiet = True
        try:
            self.target.value = edit.target_bpw
            self.candidates.value = tuple(edit.formats)
        finally:
            self._quiet = False
        self.undo_button.disabled = not self.history

    def _on_target(self, change) -> None:
        if not self._quiet:
            self._apply(dataclasses.replace(self._edit, target_bpw=float(change["new"])))

    def _on_candidates(self, change) -> None:
        if self._quiet:
            return
        formats = tuple(change["new"])
        if not formats:
            self._move_controls(self._edit)
            raise ValueError("select at least one candidate format")
        lo, hi = self._bounds(formats)
        self._apply(dataclasses.replace(self._edit, formats=formats))
        self.target.min, self.target.max = min(lo, self.target.min), max(hi, self.target.max)

    def _on_click(self, trace, points, selector=None) -> None:
        if points.xs:
            self.lab.module = self.allocation.rows[int(points.xs[0])].module

    def _on_selected(self, change) -> None:
        name = change["new"]
        if name is None:
            return
        owner = self.levels.entry(name).tied_to or name
        if owner in self.module_picker.options:
            self.module_picker.value = owner

    def _on_module(self, change) -> None:
        self.module_format.value = self.pins.get(self.module_picker.value, AUTO)

    def _bounds(self, formats) -> tuple[float, float]:
        """Slider range: the cheapest and the dearest all-candidate plan, in steps of 0.05."""
        import math

        bits = [parse_format(f).bits_for for f in formats]
        fixed = parse_format(self.fallback).bits_for
        lo = sum(fixed(e.numel) if e.name in self.unmeasured else min(b(e.numel) for b in bits)
                 for e in self._owners) / self._weights
        hi = sum(fixed(e.numel) if e.name in self.unmeasured else max(b(e.numel) for b in bits)
                 for e in self._owners) / self._weights
        return math.ceil(lo * 20) / 20, max(math.floor(hi * 20) / 20, math.ceil(lo * 20) / 20 + 0.05)

    def _figure(self):
        fig = self.allocation.figure()
        # One slot per module: in overlay mode plotly sizes each trace's bars by that trace's own
        # spacing, so a level with one module per block (L3) drew bars a block wide over its neighbours.
        gap = fig.layout.bargap if fig.layout.bargap is not None else 0.2  # plotly's default gap
        fig.update_traces(width=1 - gap, selector=dict(type="bar"))
        fig.update_layout(height=380, width=1000, clickmode="event")
        return fig

    def _refresh_text(self) -> None:
        t = self.totals
        size = (f"package ≈ <b>{t['package_bytes'] / 1e6:.1f} MB</b> (quantized weights {t['weight_bytes'] / 1e6:.1f} MB "
                f"+ float norms/biases {t['float_bytes'] / 1e6:.2f} MB; tokenizer and JSON not counted)"
                if "package_bytes" in t else f"quantized weights <b>{t['weight_bytes'] / 1e6:.1f} MB</b>")
        warn = (f"<br><span class='uqcit-unmeasured' style='color:#b00020'>{t['unmeasured_pins']} module(s) have no "
                f"measurement in their format ({len(self.unmeasured)} not measured yet, pinned to "
                f"{html.escape(self.fallback)}): their KL is not in the prediction.</span>"
                if t["unmeasured_pins"] else "")
        self.totals_html.value = (
            f"<div class='uqcit-totals'>avg <b><span class='uqcit-bpw'>{t['bpw']:.4f}</span> bits/weight</b> "
            f"(target {t['target_bpw']:.2f}) · {size} · predicted KL <b>{t['predicted_kl']:.4g}</b> nats/token "
            f"(sum of measured per-module KLs) · "
            + ", ".join(f"{n}× {html.escape(f)}" for f, n in sorted(t["formats"].items())) + warn + "</div>")
        self.pins_html.value = ("<b>pins</b>: none" if not self.pins else
                                "<b>pins</b>" + html_rows(("module", "format"), sorted(self.pins.items()), "uqcit-pins"))
        rows = []
        for lv in LEVELS:
            mine = [r for r in self.allocation.rows if r.level == lv]
            if mine:
                n = sum(r.numel for r in mine)
                counts: dict[str, int] = {}
                for r in mine:
                    counts[r.format] = counts.get(r.format, 0) + 1
                rows.append((f"L{lv}", len(mine), n, round(sum(r.bits for r in mine) / n, 3),
                             ", ".join(f"{c}× {f}" for f, c in sorted(counts.items()))))
        self.levels_html.value = "<b>per level</b>" + html_rows(("level", "modules", "weights", "bits/weight",
                                                                  "formats"), rows, "uqcit-levels")


def _other_param_bytes(model, owners) -> int:
    """Bytes of the parameters a package stores as they are (norms, biases): all but the quantized weights."""
    owned = {e.name for e in owners}
    total = 0
    for name, p in model.named_parameters():  # tied parameters are listed once
        owner, _, leaf = name.rpartition(".")
        if leaf == "weight" and owner in owned:
            continue
        total += p.numel() * p.element_size()
    return total

