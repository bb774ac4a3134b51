"""What every view shares: the lab state, an error box, in-place figure updates, background jobs.

Views hold no compression logic: they call the core (``uqcit.*``) and edit recipes. A view
is an ``ipywidgets.VBox`` so it displays itself; the error box and the ``guarded`` wrapper
make every UI callback show its exception inside the view instead of leaving a dead control.
"""
from __future__ import annotations

import functools
import html
import threading
import traceback
from typing import Any, Callable

import ipywidgets as W
import traitlets

from uqcit.core.results import html_table
from uqcit.recipe import Recipe


class LabState(traitlets.HasTraits):
    """State the views share: the selected module, the recipe being edited, the current plan.

    Views observe it (``state.observe(fn, "module")``); a click in the level map selects a
    module for the other views, the budget editor publishes its current allocation, the
    evaluation and export panels read it.
    """

    module = traitlets.Unicode(None, allow_none=True)  # selected module name
    recipe = traitlets.Instance(Recipe, allow_none=True)  # the recipe the views edit
    allocation = traitlets.Any(None)  # the budget editor's current AllocationResult
    rotation = traitlets.Any(None)  # the RotationResult chosen in the rotation view, if any
    quantized = traitlets.Any(None)  # last (plan name, QuantizeResult) built by the eval panel
    packages = traitlets.List()  # paths exported from this session


class ErrorBox(W.HTML):
    """A red message inside a view; empty when all is well."""

    def show(self, exc: BaseException, context: str = "") -> None:
        where = f"{context}: " if context else ""
        last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
        at = f" <small>(at {html.escape(last[0].filename.rsplit('/', 1)[-1])}:{last[0].lineno})</small>" if last else ""
        self.value = (f"<div class='uqcit-error' style='color:#b00020;border:1px solid #b00020;padding:4px 8px;"
                      f"border-radius:4px;margin:4px 0'><b>{html.escape(where)}{html.escape(type(exc).__name__)}"
                      f"</b>: {html.escape(str(exc))}{at}</div>")

    def clear(self) -> None:
        self.value = ""

    @property
    def text(self) -> str:
        """The message shown, without markup ('' when none)."""
        import re

        return html.unescape(re.sub(r"<[^>]+>", "", self.value))


class View(W.VBox):
    """Base of every view: an error box on top, ``guarded`` callbacks, a shared ``LabState``."""

    def __init__(self, state: LabState | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.lab = state if state is not None else LabState()
        self.error = ErrorBox()

    def guarded(self, fn: Callable[..., Any], context: str = "") -> Callable[..., Any]:
        """Wrap a UI callback: its exception is shown in this view, never lost."""
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:  # a UI callback: the user sees the error in the widget
                self.error.show(exc, context)
                return None
            self.error.clear()
            return result
        return wrapper


def figure_widget(fig) -> Any:
    """A plotly ``FigureWidget`` holding ``fig``; later updates go through ``sync_figure``.

    The widget gives its traces fresh uids (the frontend tracks traces by them), so the core
    figure's uids are remembered here and ``sync_figure`` matches traces by them. Its state is
    the figure as it is now (``_figure_widget_class``), not as it was built.
    """
    widget = _figure_widget_class()(fig)
    widget._uqcit_uids = [t.uid for t in fig.data]
    return widget


@functools.cache
def _figure_widget_class() -> type:
    """``FigureWidget`` whose widget state (what a view opened later draws) is the current figure.

    plotly sends an in-place update only to the views open at that moment, and its state keeps the
    figure as built (refreshed only when the widget itself is displayed, not as a child of a box).
    Voilà opens its page's views after the notebook has run, so its page showed every figure as
    first built: the budget chart before the notebook's pins, an empty evaluation scatter. Serving
    the current figure when the state is asked for costs nothing per update (no extra message).
    """
    import plotly.graph_objects as go

    class FigureWidget(go.FigureWidget):
        def get_state(self, key=None, drop_defaults=False):
            state = super().get_state(key, drop_defaults)
            if not (hasattr(self, "_data") and hasattr(self, "_layout_obj")):
                return state  # asked while plotly is still building the figure
            wanted = self.keys if key is None else [key] if isinstance(key, str) else list(key)
            # the two traits plotly itself refreshes on display (BaseFigureWidget._repr_mimebundle_)
            for name, value in (("_widget_data", self._data), ("_widget_layout", self._layout_obj._props)):
                if name in wanted:
                    state[name] = self.trait_metadata(name, "to_json", self._trait_to_json)(value, self)
            return state

    return FigureWidget


def sync_figure(widget, fig, layout_keys: tuple[str, ...] = ("title", "shapes", "annotations")) -> None:
    """Copy ``fig``'s traces (matched by their ``uid`` in the core figure) and some layout keys
    into ``widget``, in place and in one batched message: the widget keeps its identity and the
    browser redraws once. A trace of ``fig`` that the widget was not built with is an error
    (views build their widget from the same core figure, so the traces line up).
    """
    slots = {uid: i for i, uid in enumerate(widget._uqcit_uids)}
    with widget.batch_update():
        for new in fig.data:
            if new.uid not in slots:
                raise ValueError(f"figure trace {new.uid!r} has no counterpart in the widget "
                                 f"(widget built with: {widget._uqcit_uids})")
            data = new.to_plotly_json()
            data.pop("type", None)
            data.pop("uid", None)  # the widget's own uid identifies the trace in the browser
            widget.data[slots[new.uid]].update(data, overwrite=True)
        for key in layout_keys:
            widget.layout[key] = fig.layout[key]


class Job:
    """Run one function in a background thread, with a cancel flag and a done callback.

    The function gets the ``threading.Event`` to poll (``job.cancelled``); ``on_done(result,
    exc)`` runs in the worker thread when it finishes (ipywidgets sends updates from any thread).
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self.cancelled = threading.Event()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, fn: Callable[[threading.Event], Any],
              on_done: Callable[[Any, BaseException | None], None]) -> None:
        if self.running:
            raise RuntimeError("a job is already running here; wait for it or cancel it")
        self.cancelled = threading.Event()
        cancelled = self.cancelled

        def work() -> None:
            try:
                result = fn(cancelled)
            except BaseException as exc:  # handed to on_done, which shows it in the view
                on_done(None, exc)
            else:
                on_done(result, None)

        self._thread = threading.Thread(target=work, name="uqcit-widget-job", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self.cancelled.set()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the job (tests and notebooks that need the result before going on)."""
        if self._thread is not None:
            self._thread.join(timeout)


class Cancelled(Exception):
    """Raised inside a job when the user pressed Cancel."""


def html_rows(columns: tuple[str, ...], rows: list[tuple[Any, ...]], cls: str = "") -> str:
    """A small HTML table for views (the core's ``html_table`` with a class for the browser test)."""
    table = html_table(columns, rows, max_rows=400)
    return table.replace("<table>", f"<table class='uqcit-table {cls}' style='border-collapse:collapse'>", 1)

