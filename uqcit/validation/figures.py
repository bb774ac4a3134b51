"""The plotly figure behind a claim, from its ``plot`` entry in ``claims.json``.

Kinds: ``bars`` (named expressions over the claim's inputs, with the document's expected range
shaded) and ``lines`` (records of one file: ``x`` against ``y``, one line per ``group``, with the
document's range at each x drawn as error bars beside them).

>>> import types
>>> c = types.SimpleNamespace(id="c", inputs={"a": 1.0, "b": 3.0}, claim="a claim", verdict="holds",
...                           plot={"kind": "bars", "bars": {"A": "a", "B": "b / a"}, "expected": [2, 4]})
>>> [list(t.y) for t in claim_figure(c, {}).data]
[[1.0, 3.0]]
"""
from __future__ import annotations

from typing import Any

from uqcit.core.keys import ConfigError, check_keys
from uqcit.validation.rules import UndefinedFigure, matches, evaluate_expression


def claim_figure(claim, records: dict[str, list[dict[str, Any]]]):
    """The figure of ``claim`` (a ``ClaimResult`` or alike), or None when its inputs are missing."""
    plot = claim.plot
    kinds = {"bars": _bars, "lines": _lines}
    if plot["kind"] not in kinds:
        raise ConfigError(f"claim {claim.id}: plot kind must be one of {sorted(kinds)}, got {plot['kind']!r}")
    return kinds[plot["kind"]](claim, plot, records)


def _bars(claim, plot: dict[str, Any], records):
    import plotly.graph_objects as go

    check_keys(plot, {"kind", "bars", "expected", "y", "log"}, f"claim {claim.id} plot", required=("kind", "bars"))
    labels, ys = [], []
    for label, expr in plot["bars"].items():
        try:
            ys.append(evaluate_expression(expr, claim.inputs))
        except (UndefinedFigure, ConfigError):
            return None  # an input is missing: the claim is not measured yet
        labels.append(label)
    fig = go.Figure(go.Bar(x=labels, y=ys, name="measured", text=[f"{y:.4g}" for y in ys], textposition="outside"))
    if "expected" in plot:
        lo, hi = plot["expected"]
        fig.add_hrect(y0=lo, y1=hi, fillcolor="green", opacity=0.15, line_width=0,
                      annotation_text="document", annotation_position="top left")
        if lo == hi:
            fig.add_hline(y=lo, line_color="green", line_dash="dash")
    fig.update_layout(title=f"{claim.id}: {claim.verdict}", height=330, yaxis_title=plot.get("y", ""),
                      yaxis_type="log" if plot.get("log") else None, margin=dict(t=50, b=40))
    return fig


def _lines(claim, plot: dict[str, Any], records):
    import plotly.graph_objects as go

    check_keys(plot, {"kind", "file", "where", "x", "y", "group", "bands", "xtitle", "ytitle"},
               f"claim {claim.id} plot", required=("kind", "file", "x", "y"))
    rows = [r for r in records.get(plot["file"], []) if matches(r, {"where": plot.get("where", {})})]
    if not rows:
        return None
    groups: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        x, y = r.get(plot["x"]), r.get(plot["y"])
        if x is not None and y is not None:
            groups.setdefault(str(r.get(plot.get("group", ""), "")), []).append((x, y))
    fig = go.Figure()
    for name, pts in sorted(groups.items()):
        pts.sort()
        fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=name)
    if plot.get("bands"):
        xs = [float(k) for k in plot["bands"]]
        lo = [v[0] for v in plot["bands"].values()]
        hi = [v[1] for v in plot["bands"].values()]
        mid = [(a + b) / 2 for a, b in zip(lo, hi)]
        fig.add_scatter(x=xs, y=mid, mode="markers", name="document", marker=dict(symbol="diamond", size=10,
                        color="green"), error_y=dict(type="data", array=[(b - a) / 2 for a, b in zip(lo, hi)]))
    fig.update_layout(title=f"{claim.id}: {claim.verdict}", height=380, xaxis_title=plot.get("xtitle", plot["x"]),
                      yaxis_title=plot.get("ytitle", plot["y"]), margin=dict(t=50, b=40))
    return fig
