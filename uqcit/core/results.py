"""The shared shape of every stage result: data first, views second.

A result is a dataclass holding measured numbers (and sometimes tensors). It
serializes with ``to_dict()``/``to_json()``, draws itself with a pure
``figure()`` returning a plotly figure, and shows in notebooks through
``_repr_html_`` (with a short ``__repr__`` as the plain-text fallback).
"""
from __future__ import annotations

import html
import json
import math
from typing import Any, Iterable, Sequence

from uqcit.core.io import json_default


class Result:
    """Mixin for stage results. Subclasses implement ``to_dict``, ``figure`` and ``summary``."""

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - always overridden
        raise NotImplementedError

    def to_json(self, indent: int = 2) -> str:
        # Keys keep to_dict's order (a reader sees the fields in the order the result declares them).
        return json.dumps(self.to_dict(), indent=indent, default=json_default)

    def summary(self) -> str:
        """One line saying what this result measured."""
        return type(self).__name__

    def figure(self):  # pragma: no cover - always overridden
        raise NotImplementedError

    def table_rows(self) -> tuple[Sequence[str], list[Sequence[Any]]]:
        """Columns and rows for the HTML view; empty by default."""
        return (), []

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.summary()}>"

    def _repr_html_(self) -> str:
        columns, rows = self.table_rows()
        body = f"<p><b>{html.escape(type(self).__name__)}</b>: {html.escape(self.summary())}</p>"
        if columns:
            body += html_table(columns, rows)
        return body


def html_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], max_rows: int = 60) -> str:
    """A plain HTML table; long tables show their first and last rows."""
    rows = list(rows)
    if len(rows) > max_rows:
        half = max_rows // 2
        skipped = len(rows) - 2 * half
        rows = rows[:half] + [[f"… {skipped} more rows …"] + [""] * (len(columns) - 1)] + rows[-half:]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    lines = [
        "<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in row) + "</tr>" for row in rows
    ]
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def fmt(value: Any) -> str:
    """Format numbers for tables: 4 significant digits, integers with separators."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)

