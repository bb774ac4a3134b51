"""EvalPanel: quick evaluations of the current plan in the background, a table and a scatter of runs."""
from __future__ import annotations

import html
import math
import time
from typing import Any

import ipywidgets as W

from uqcit.stages.quantize import QuantizeConfig, quantize_model
from uqcit.stages.evaluate import EvalConfig, EvalResult, evaluate_many

from ._base import Cancelled, Job, LabState, View, figure_widget, html_rows


class EvalPanel(View):
    """Quantize the reference with the current plan and score it, window by window, in a thread.

    The plan is the budget editor's current allocation (``LabState.allocation``); when a
    rotation was put in the recipe (``LabState.rotation``), the rotated model is quantized.
    Scores are the evaluation protocol's (``uqcit.stages.evaluate.evaluate_many``: perplexity,
    KL(ref ‖ model), top-1 agreement against the float reference on the same windows), on the
    first ``windows`` windows only — a quick evaluation, and every row says so. The notebook
    stays usable meanwhile; Cancel stops the run between windows (quantizing itself is one
    step and finishes first).

    >>> from uqcit.inputs.tiny import tiny_model
    >>> from uqcit.stages.levels import analyze_levels
    >>> from uqcit.stages.sensitivity import SensitivityConfig, measure_sensitivity
    >>> from uqcit.widgets import BudgetEditor
    >>> model, tok = tiny_model("llama")
    >>> levels = analyze_levels(model)
    >>> sens = measure_sensitivity(model, tok, levels, SensitivityConfig(
    ...     formats=("w2", "w4"), group_size=32, calib_samples=2, calib_seq_len=32), progress=False)
    >>> editor = BudgetEditor(levels, sens, target_bpw=4.0)  # publishes the plan to evaluate
    >>> panel = EvalPanel(model, tok, levels, state=editor.lab, windows=1)
    >>> panel.run(wait=True)  # what "Evaluate current plan" does, here waiting for the result
    >>> len(panel.runs), panel.runs[0]["windows"]
    (1, 1)
    """

    def __init__(self, reference, tokenizer, levels, *, windows: int = 2, state: LabState | None = None,
                 quantize: QuantizeConfig = QuantizeConfig(), eval_config: EvalConfig | None = None):
        super().__init__(state)
        self.reference = reference
        self.tokenizer = tokenizer
        self.levels = levels
        self.quantize_config = quantize
        self.eval_config = eval_config or EvalConfig(max_windows=windows)
        self.job = Job()
        self.runs: list[dict[str, Any]] = []
        self.reference_result: EvalResult | None = None
        n = self.eval_config.n_windows
        self.run_button = W.Button(description="Evaluate current plan", icon="play", button_style="primary",
                                   layout=W.Layout(width="220px"))
        self.cancel_button = W.Button(description="Cancel", icon="stop", disabled=True)
        self.progress = W.IntProgress(value=0, min=0, max=n + 1, description="idle", bar_style="",
                                      layout=W.Layout(width="460px"))
        scope = ("full protocol" if self.eval_config.is_full_protocol else
                 f"QUICK: {n} window(s) × {self.eval_config.window} tokens of {self.eval_config.corpus}, "
                 "not the full protocol")
        self.scope = W.HTML(f"<i>{html.escape(scope)}</i>")
        self.status = W.HTML()
        self.table = W.HTML("<i>no runs yet</i>")
        import plotly.graph_objects as go

        fig = go.Figure(go.Scatter(uid="eval-runs", x=[], y=[], mode="markers+text", text=[], textposition="top center",
                                   hovertext=[], hoverinfo="text", marker=dict(size=11, color="#4C78A8")))
        fig.update_layout(title="quality vs size of the runs (quick evaluation)", xaxis_title="bits/weight (stored)",
                          yaxis=dict(title="KL(ref ‖ model), nats/token", type="log"), height=380, width=620,
                          template="plotly_white")
        self.scatter = figure_widget(fig)
        self.run_button.on_click(self.guarded(lambda _: self.run(), "evaluate"))
        self.cancel_button.on_click(self.guarded(lambda _: self.cancel(), "cancel"))
        self.children = [self.error, W.HBox([self.run_button, self.cancel_button, self.progress]), self.scope,
                         self.status, self.table, self.scatter]

    # ---- running
    def run(self, *, wait: bool = False) -> None:
        """Start a quick evaluation of the current plan (``wait``: block until it ends)."""
        alloc = self.lab.allocation
        if alloc is None:
            raise RuntimeError("no plan to evaluate: set a budget in the budget editor first")
        rotation = self.lab.rotation
        model = rotation.model if rotation is not None else self.reference
        n_pins = sum(r.pinned for r in alloc.rows)
        prefix = f"{rotation.config.method_name}-" if rotation is not None and rotation.config.method_name else ""
        suffix = f"-{n_pins}pins" if n_pins else ""
        name = f"{prefix}{alloc.plan.name}{suffix}"
        plan, cfg, qcfg = alloc.plan, self.eval_config, self.quantize_config
        self.progress.value, self.progress.max = 0, cfg.n_windows + 1
        self.progress.description, self.progress.bar_style = "quantize", "info"
        self.status.value = f"<i>running {html.escape(name)}…</i>"
        self.run_button.disabled, self.cancel_button.disabled = True, False

        def work(cancelled):
            from uqcit.inputs import corpus as data

            t0 = time.perf_counter()
            q = quantize_model(model, self.levels, plan, qcfg, tokenizer=self.tokenizer, progress=False)
            run_name = f"{prefix}{q.method_name}{suffix}"  # the core's method name, e.g. alloc-gptq-3.25
            self.progress.value, self.progress.description = 1, "evaluate"
            if cancelled.is_set():
                raise Cancelled()
            text = data.text_for(cfg.corpus)
            windows = data.eval_windows(self.tokenizer, text, total_tokens=cfg.total_tokens, window=cfg.window,
                                        max_windows=cfg.max_windows)
            parts = []
            for w in range(windows.shape[0]):  # one window per call: Cancel is honoured between windows
                parts.append(evaluate_many({"run": q.model}, self.tokenizer, cfg, reference=self.reference,
                                           windows=windows[w:w + 1], progress=False))
                self.progress.value = w + 2
                if cancelled.is_set() and w + 1 < windows.shape[0]:
                    raise Cancelled()
            ref = _merge("reference", [p["reference"] for p in parts], cfg)
            run = _merge(run_name, [p["run"] for p in parts], cfg)
            return run_name, q, ref, run, time.perf_counter() - t0

        self.job.start(work, self._done)
        if wait:
            self.job.join()

    def cancel(self) -> None:
        """Stop the running evaluation at the next window."""
        self.job.cancel()
        self.progress.description = "cancelling"

    def _done(self, result, exc) -> None:
        self.run_button.disabled, self.cancel_button.disabled = False, True
        if isinstance(exc, Cancelled):
            self.progress.description, self.progress.bar_style = "cancelled", "warning"
            self.status.value = "<span class='uqcit-cancelled'>cancelled: no run recorded</span>"
            return
        if exc is not None:
            self.progress.description, self.progress.bar_style = "failed", "danger"
            self.status.value = ""
            self.error.show(exc, "evaluate")
            return
        name, q, ref, run, seconds = result
        self.error.clear()
        self.reference_result = ref
        self.lab.quantized = (q.plan.name, q)
        self.runs.append({"name": name, "bpw": q.bpw, "mb": q.stored_bits / 8 / 1e6, "ppl": run.ppl, "kl": run.kl,
                          "top1": run.top1, "windows": run.windows, "seconds": seconds, "result": run})
        self.progress.description, self.progress.bar_style = "done", "success"
        self.status.value = (f"<span class='uqcit-done'>{html.escape(run.summary())}; reference perplexity "
                             f"{ref.ppl:.3f} on the same windows; {seconds:.1f} s</span>")
        self._refresh()

    def _refresh(self) -> None:
        rows = [(r["name"], round(r["bpw"], 4), round(r["mb"], 2), round(r["ppl"], 3), round(r["kl"], 4),
                 round(r["top1"], 2), r["windows"]) for r in self.runs]
        self.table.value = html_rows(("run", "bits/weight", "quantized MB", "ppl", "KL", "top-1 %", "windows"),
                                     rows, "uqcit-runs")
        with self.scatter.batch_update():
            t = self.scatter.data[0]
            t.x = [r["bpw"] for r in self.runs]
            t.y = [max(r["kl"], 1e-6) for r in self.runs]
            t.text = [str(i + 1) for i in range(len(self.runs))]
            t.hovertext = [f"{r['name']}<br>{r['bpw']:.3f} bits/weight<br>ppl {r['ppl']:.3f}, KL {r['kl']:.4f}, "
                           f"top-1 {r['top1']:.1f}%" for r in self.runs]


def _merge(name: str, parts: list[EvalResult], cfg: EvalConfig) -> EvalResult:
    """One result from per-window results (equal-length windows: means of means are token means)."""
    nll = [v for p in parts for v in p.window_nll]
    kl = [v for p in parts for v in p.window_kl]
    top1 = [v for p in parts for v in p.window_top1]
    n = len(nll)
    return EvalResult(model=name, ppl=math.exp(sum(nll) / n), kl=sum(kl) / n if kl else None,
                      top1=sum(top1) / n if top1 else None, windows=n, tokens=sum(p.tokens for p in parts),
                      full_protocol=cfg.is_full_protocol and n == cfg.n_windows and cfg.max_windows is None,
                      seconds=sum(p.seconds for p in parts), window_nll=nll, window_kl=kl, window_top1=top1)
