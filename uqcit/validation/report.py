"""The claims report: every claim of the two source documents, the measured figure, a verdict
and the command that reproduces it, built from the benchmark records.

``claims.json`` (beside this module) lists the claims: each names its source and section, says
the claim in the workbench's words, picks numbers from record files (``rules.select``), computes
its figure from them and applies a verdict rule (``rules.apply_rule``). A claim whose records
are missing is "not measured yet", with the command that would measure it.

>>> import tempfile, pathlib
>>> with tempfile.TemporaryDirectory() as d:
...     _ = (pathlib.Path(d) / "baselines.json").write_text(
...         '[{"method": "reference-fp32", "ppl": 20.0, "bpw": 32}, '
...         '{"method": "preset-binary-concentration", "ppl": 20.4, "bpw": 6.5, "full_protocol": true}]')
...     report = build_report(d)
>>> report.claim("002-ppl-at-6.4-bits").verdict
'holds'
>>> report.claim("002-noise-curve").verdict
'not measured yet'
"""
from __future__ import annotations

import dataclasses
import html
import json
from importlib import resources
from pathlib import Path
from typing import Any

from uqcit.core.io import atomic_write, write_json
from uqcit.core.keys import ConfigError, check_keys
from uqcit.core.results import Result, html_table
from uqcit.validation.rules import (NOT_MEASURABLE, NOT_MEASURED, VERDICTS, MissingRecord, UndefinedFigure,
                                    apply_rule, evaluate_expression, select)

CLAIM_KEYS = {"id", "source", "section", "claim", "inputs", "figure", "also", "rule", "plot", "samples", "command",
              "note"}
SAMPLES_KEYS = {"file", "methods"}  # a claim's "samples": generation samples shown side by side
COLOURS = {"holds": "#2e7d32", "partly": "#ef6c00", "does not hold": "#c62828",
           "not measurable here": "#616161", "not measured yet": "#1565c0"}


def load_claims(path: str | Path | None = None) -> dict[str, Any]:
    """The claims file: ``path``, or the one shipped beside this module."""
    text = (Path(path).read_text() if path is not None
            else resources.files("uqcit.validation").joinpath("claims.json").read_text())
    data = json.loads(text)
    check_keys(data, {"version", "sources", "claims"}, "claims file")
    for c in data["claims"]:
        check_keys(c, CLAIM_KEYS, f"claim {c.get('id', '?')!r}", required=("id", "source", "section", "claim", "rule"))
        if "samples" in c:
            check_keys(c["samples"], SAMPLES_KEYS, f"claim {c['id']!r} samples", required=("file",))
    ids = [c["id"] for c in data["claims"]]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"claims file: duplicate claim ids {sorted({i for i in ids if ids.count(i) > 1})}")
    return data


def load_records(results: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Every ``*.json`` record file in ``results``: file name -> list of records (a dict file: one record)."""
    folder = Path(results)
    if not folder.is_dir():
        raise FileNotFoundError(f"no benchmark results folder {str(folder)!r}; pass --results DIR "
                                "(the repository's benchmarks/results)")
    out = {}
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        out[path.name] = data if isinstance(data, list) else [data]
    return out


@dataclasses.dataclass
class ClaimResult:
    """One claim with its measured figure and verdict."""

    id: str
    source: str
    section: str
    claim: str
    verdict: str
    reason: str
    figure: float | None
    figure_label: str | None
    unit: str | None
    inputs: dict[str, float]
    also: dict[str, float | None]
    records: list[str]  # record files used
    protocol: str | None  # "full", or what was reduced
    command: str | None
    note: str | None
    plot: dict[str, Any] | None
    samples: dict[str, Any] | None = None  # {"file": records with "samples", "methods": [...] shown}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def evaluate_claim(claim: dict[str, Any], records: dict[str, list[dict[str, Any]]]) -> ClaimResult:
    """The figure and verdict of one claim (an entry of ``claims.json``) from ``records``."""
    fig = claim.get("figure", {})
    base = dict(id=claim["id"], source=claim["source"], section=claim["section"], claim=claim["claim"],
                figure_label=fig.get("label"), unit=fig.get("unit"), command=claim.get("command"),
                note=claim.get("note"), plot=claim.get("plot"), samples=claim.get("samples"))
    if claim["rule"]["kind"] == "not_measurable":
        verdict, reason = apply_rule(claim["rule"], None)
        return ClaimResult(**base, verdict=verdict, reason=reason, figure=None, inputs={}, also={},
                           records=[], protocol=None)
    values, used = {}, []
    try:
        for name, sel in claim.get("inputs", {}).items():
            values[name], rows = select(sel, records)
            used += [(sel.get("file") or ",".join(sel.get("files", [])), r) for r in rows]
    except MissingRecord as exc:
        return ClaimResult(**base, verdict=NOT_MEASURED, reason=f"{exc}; run the command to measure it",
                           figure=None, inputs=values, also={}, records=[], protocol=None)
    also = {}
    for label, expr in claim.get("also", {}).items():
        try:
            also[label] = evaluate_expression(expr, values)
        except UndefinedFigure:
            also[label] = None
    try:
        figure = evaluate_expression(fig["expression"], values)
    except UndefinedFigure as exc:
        return ClaimResult(**base, verdict=NOT_MEASURABLE, reason=f"the figure is undefined here ({exc})",
                           figure=None, inputs=values, also=also, records=_files(used), protocol=_protocol(used))
    verdict, reason = apply_rule(claim["rule"], figure)
    return ClaimResult(**base, verdict=verdict, reason=reason, figure=figure, inputs=values, also=also,
                       records=_files(used), protocol=_protocol(used))


def _files(used: list[tuple[str, dict]]) -> list[str]:
    return sorted({f for f, _ in used})


def _protocol(used: list[tuple[str, dict]]) -> str | None:
    """'full' when every evaluation record used is the full protocol, else which were reduced (a record's
    ``reduced`` says how, else its windows)."""
    reduced = sorted({f"{f}: {r.get('reduced') or str(r.get('windows')) + ' windows'}" for f, r in used
                      if r.get("full_protocol") is False})
    evaluated = [r for _, r in used if "full_protocol" in r]
    if not evaluated:
        return None
    return "full" if not reduced else "reduced protocol (" + "; ".join(reduced) + ")"


@dataclasses.dataclass(repr=False)
class ClaimsReport(Result):
    """Every claim's result, with the sources' titles and where the records came from."""

    claims: list[ClaimResult]
    sources: dict[str, str]
    results_dir: str
    records: dict[str, list[dict[str, Any]]]  # file name -> records, what the figures plot

    def claim(self, claim_id: str) -> ClaimResult:
        for c in self.claims:
            if c.id == claim_id:
                return c
        raise KeyError(f"no claim {claim_id!r}; known: {[c.id for c in self.claims]}")

    def counts(self) -> dict[str, int]:
        """How many claims got each verdict."""
        return {v: sum(1 for c in self.claims if c.verdict == v) for v in VERDICTS}

    def summary(self) -> str:
        counts = ", ".join(f"{n} {v}" for v, n in self.counts().items() if n)
        return f"{len(self.claims)} claims: {counts}"

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "counts": self.counts(), "sources": self.sources,
                "results_dir": self.results_dir, "record_files": sorted(self.records),
                "claims": [c.to_dict() for c in self.claims]}

    def table_rows(self):
        return (("id", "verdict", "figure", "unit", "records"),
                [(c.id, c.verdict, c.figure, c.unit, ", ".join(c.records)) for c in self.claims])

    def figure(self):
        """Verdicts per source document, as stacked bars."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for v in VERDICTS:
            xs = sorted(self.sources)
            fig.add_bar(x=[f"seed {s}" for s in xs], y=[sum(1 for c in self.claims if c.source == s and c.verdict == v)
                                                        for s in xs], name=v, marker_color=COLOURS[v])
        fig.update_layout(barmode="stack", title=self.summary(), height=320, yaxis_title="claims")
        return fig

    def to_html(self) -> str:
        """The whole report as one self-contained HTML page (plotly.js inlined once)."""
        from uqcit.validation.figures import claim_figure
        from uqcit.validation.samples import samples_html

        # The overview comes first on the page, so it carries plotly.js (inlined: the page opens offline).
        overview = self.figure().to_html(full_html=False, include_plotlyjs=True, div_id="fig-overview")
        parts = []
        for c in self.claims:
            fig = claim_figure(c, self.records) if c.plot else None
            fig_html = ""
            if fig is not None:
                fig_html = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{c.id}")
            if c.samples:  # the texts themselves, escaped: evidence a reader judges
                fig_html += samples_html(self.records.get(c.samples["file"], []), c.samples.get("methods"))
            parts.append(_claim_html(c, fig_html))
        head = (f"<h1>UQCIT claims report</h1><p class='summary'>{html.escape(self.summary())}</p>"
                f"<p>Records: {html.escape(self.results_dir)} ({len(self.records)} files). Sources: "
                + "; ".join(f"<b>{html.escape(k)}</b>: {html.escape(v)}" for k, v in sorted(self.sources.items()))
                + "</p>")
        table = _verdict_table(self.claims)
        return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>UQCIT claims report</title>"
                f"<style>{_CSS}</style></head><body>{head}{overview}{table}{''.join(parts)}</body></html>")

    def write(self, out: str | Path) -> tuple[Path, Path]:
        """Write ``claims_report.html`` and ``claims_report.json`` into ``out`` (created)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        jp = write_json(out / "claims_report.json", self.to_dict())
        hp = atomic_write(out / "claims_report.html", self.to_html().encode())
        return hp, jp


def build_report(results: str | Path, claims: str | Path | None = None) -> ClaimsReport:
    """Evaluate every claim of ``claims`` (default: the shipped list) on the records in ``results``."""
    data = load_claims(claims)
    records = load_records(results)
    return ClaimsReport(claims=[evaluate_claim(c, records) for c in data["claims"]], sources=data["sources"],
                        results_dir=str(results), records=records)


def _fmt(x: float | None, unit: str | None = None) -> str:
    if x is None:
        return "—"
    text = f"{x:.4g}"
    return f"{text} {unit}" if unit and unit not in ("fraction", "x") else (text + ("x" if unit == "x" else ""))


def _verdict_table(claims: list[ClaimResult]) -> str:
    rows = [(c.id, f"{c.source} {c.section}", c.verdict, _fmt(c.figure, c.unit), c.protocol or "") for c in claims]
    table = html_table(("claim", "source", "verdict", "figure", "protocol"), rows, max_rows=len(rows))
    return f"<div class='verdicts'>{table}</div>"


def _claim_html(c: ClaimResult, fig_html: str) -> str:
    e = html.escape
    also = "".join(f"<li>{e(k)}: {_fmt(v)}</li>" for k, v in c.also.items())
    cmd = (f"<pre class='cmd'>{e(c.command)}</pre>" if c.command else "<p class='cmd'>no command: "
           "nothing in this workbench can measure it</p>")
    return (f"<section class='claim' id='{e(c.id)}' data-verdict='{e(c.verdict)}'>"
            f"<h2>{e(c.id)} <span class='verdict' style='background:{COLOURS[c.verdict]}'>{e(c.verdict)}</span></h2>"
            f"<p class='src'>seed {e(c.source)} {e(c.section)}</p><p class='text'>{e(c.claim)}</p>"
            + (f"<p><b>{e(c.figure_label or '')}</b>: {_fmt(c.figure, c.unit)}</p>" if c.figure_label else "")
            + f"<p class='reason'>{e(c.reason)}</p>"
            + (f"<ul>{also}</ul>" if also else "")
            + (f"<p class='protocol'>protocol: {e(c.protocol)}</p>" if c.protocol else "")
            + (f"<p class='note'>{e(c.note)}</p>" if c.note else "")
            + (f"<p class='records'>records: {e(', '.join(c.records))}</p>" if c.records else "")
            + cmd + fig_html + "</section>")


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
        ".verdict{color:white;padding:2px 8px;border-radius:4px;font-size:0.8em}"
        "section.claim{border-top:1px solid #ccc;margin-top:1.5em}.src,.records,.protocol{color:#555;font-size:0.9em}"
        "pre.cmd{background:#f4f4f4;padding:6px}table{border-collapse:collapse}td,th{padding:2px 8px}"
        ".samples td{vertical-align:top;white-space:pre-wrap;font-size:0.9em}")
