"""RotationView: what a G = i rotation does to the weights — histograms, kurtosis and SQNR per block."""
from __future__ import annotations

import html

import ipywidgets as W

from uqcit.stages.compressibility import CompressibilityResult, compressibility_report
from uqcit.stages.rotation import RotationConfig, rotate_model

from ._base import Job, LabState, View, figure_widget, sync_figure

CONSTRUCTIONS = ("hadamard", "random", "optimized")


class RotationView(View):
    """Rotate a copy of the model (``uqcit.stages.rotation.rotate_model``) and compare its weights.

    The rotation runs in the background (the notebook stays usable); results are cached per
    construction, so switching back is instant. Shown: the rotation's checks (max |Δlogit|,
    invariants), per-block mean kurtosis and pooled SQNR before/after
    (``compressibility_report``), and the weight histogram of a chosen module.
    "Use in recipe" puts the rotation stage in the recipe; the evaluation panel then quantizes
    the rotated model.

    >>> from uqcit.inputs.tiny import tiny_model
    >>> from uqcit.stages.levels import analyze_levels
    >>> model = tiny_model("llama")[0]
    >>> view = RotationView(model, analyze_levels(model), construction="hadamard")
    >>> view.rotate(wait=True)  # what "Rotate" does, here waiting for the background job
    >>> rotation, report = view.results["hadamard"]
    >>> rotation.max_logit_diff < 1e-4  # the rotated float model computes the same function
    True
    """

    def __init__(self, model, levels, *, construction: str = "hadamard", state: LabState | None = None,
                 config: RotationConfig | None = None, bits: tuple[int, ...] = (2, 3, 4), group_size: int = 128):
        super().__init__(state)
        if construction not in CONSTRUCTIONS:
            raise ValueError(f"construction must be one of {CONSTRUCTIONS}, got {construction!r}")
        self.model = model
        self.levels = levels
        self.base_config = config or RotationConfig()
        self.bits, self.group_size = bits, group_size
        self.results: dict[str, tuple] = {}  # construction -> (RotationResult, CompressibilityResult)
        self.job = Job()
        self.construction = W.ToggleButtons(options=CONSTRUCTIONS, value=construction, description="G from")
        self.run_button = W.Button(description="Rotate", icon="refresh", button_style="primary")
        self.apply_button = W.Button(description="Use in recipe", icon="check", disabled=True)
        owned = [e.name for e in levels.quantizable()]
        self.module_picker = W.Dropdown(options=owned, value=owned[min(1, len(owned) - 1)], description="histogram",
                                        layout=W.Layout(width="460px"))
        self.status = W.HTML("<i>Press Rotate: rotating a copy of the model and comparing its weights takes "
                             "a few seconds to a minute (optimized: minutes).</i>")
        empty = CompressibilityResult([], tuple(bits), group_size, "", [], [], [], 0.0)
        self.layers = figure_widget(empty.layer_figure().update_layout(title="rotate to compare", width=900))
        self.histogram = figure_widget(empty.histogram_figure().update_layout(title="", width=560))
        self.checks = W.HTML()
        self.run_button.on_click(self.guarded(lambda _: self.rotate(), "rotate"))
        self.construction.observe(self.guarded(lambda _: self._show_cached(), "construction"), "value")
        self.module_picker.observe(self.guarded(lambda _: self._update_histogram(), "histogram"), "value")
        self.apply_button.on_click(self.guarded(lambda _: self.apply_to_recipe(), "recipe"))
        self.children = [self.error, W.HBox([self.construction, self.run_button, self.apply_button]), self.status,
                         self.layers, W.HBox([self.histogram, W.VBox([self.module_picker, self.checks])])]

    # ---- running
    def rotate(self, *, wait: bool = False) -> None:
        """Rotate with the selected construction in the background (``wait``: block until done)."""
        which = self.construction.value
        if which in self.results:
            self._show_cached()
            return
        config = self.base_config.replace(construction=which)
        self.run_button.disabled = True
        self.status.value = f"<i>rotating ({html.escape(which)}) and measuring compressibility…</i>"

        def work(cancelled):
            rot = rotate_model(self.model, config, progress=False)
            report = compressibility_report(self.model, rot.model, bits=self.bits, group_size=self.group_size,
                                            histogram_module=self.module_picker.value, progress=False)
            return which, rot, report

        self.job.start(work, self._done)
        if wait:
            self.job.join()

    def _done(self, result, exc) -> None:
        self.run_button.disabled = False
        if exc is not None:
            self.status.value = ""
            self.error.show(exc, "rotate")
            return
        which, rot, report = result
        self.results[which] = (rot, report)
        self.error.clear()
        self._show_cached()

    # ---- views
    def _show_cached(self) -> None:
        which = self.construction.value
        if which not in self.results:
            self.apply_button.disabled = True
            self.status.value = f"<i>{html.escape(which)}: not computed yet — press Rotate.</i>"
            return
        rot, report = self.results[which]
        self.apply_button.disabled = False
        fig = report.layer_figure()
        fig.update_layout(width=900)
        sync_figure(self.layers, fig)
        self._update_histogram()
        inv = rot.invariants
        self.status.value = f"<span class='uqcit-rotation'>{html.escape(rot.summary())}</span>"
        self.checks.value = (
            "<table class='uqcit-table'>"
            f"<tr><td>function preserved</td><td>max |Δlogit| {rot.max_logit_diff:.2e} "
            f"(logits up to {rot.max_abs_logit:.1f})</td></tr>"
            f"<tr><td>invariants (G+G⁻¹=0, orthogonality…)</td><td>{'pass' if inv.passed else 'FAIL'}</td></tr>"
            f"<tr><td>rotations stored</td><td>{rot.stored_bits / 8 / 1024:.1f} KiB</td></tr>"
            + "".join(f"<tr><td>{b}-bit SQNR (all modules)</td><td>{report.pooled_sqnr(b, 'before'):.2f} → "
                      f"{report.pooled_sqnr(b, 'after'):.2f} dB</td></tr>" for b in report.bits)
            + "</table>")

    def _update_histogram(self) -> None:
        which = self.construction.value
        if which not in self.results:
            return
        rot, report = self.results[which]
        name = self.module_picker.value
        if report.histogram_module != name:  # one module: cheap
            report = compressibility_report(self.model, rot.model, modules=[name], bits=self.bits,
                                            group_size=self.group_size, histogram_module=name, progress=False)
        fig = report.histogram_figure()
        fig.update_layout(width=560)
        sync_figure(self.histogram, fig)

    def apply_to_recipe(self) -> None:
        """Put the chosen rotation in the recipe and share its rotated model with the other views."""
        which = self.construction.value
        if which not in self.results:
            raise RuntimeError(f"{which} has not been computed: press Rotate first")
        rot, _ = self.results[which]
        self.lab.rotation = rot
        if self.lab.recipe is not None:
            self.lab.recipe = self.lab.recipe.with_stage(rot.config)
