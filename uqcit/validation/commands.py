"""``uqcit report``: the claims report from the benchmark records (``uqcit.cli`` adds it).

Prints where the two files went and one line per verdict count.
"""
from __future__ import annotations

from pathlib import Path

DEFAULT_OUT = "runs/report"


def default_results() -> Path:
    """``benchmarks/results`` of the current folder, else of the checkout this package runs from."""
    here = Path.cwd() / "benchmarks" / "results"
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def add_parsers(sub) -> None:
    """Add ``report`` to the ``uqcit`` command's subparsers."""
    r = sub.add_parser("report", help="build the claims report (HTML + JSON) from the benchmark records",
                       description="Every claim of the source documents with its measured figure, verdict, "
                       "figure and reproducing command, from the records in benchmarks/results.")
    r.add_argument("--out", default=DEFAULT_OUT, help=f"folder for claims_report.html and .json (default {DEFAULT_OUT})")
    r.add_argument("--results", help="folder of benchmark records (default: benchmarks/results)")
    r.add_argument("--claims", help="a claims file instead of the built-in list (same format as "
                   "uqcit/validation/claims.json)")
    r.set_defaults(fn=cmd_report)


def cmd_report(args) -> int:
    from uqcit.validation.report import build_report

    results = Path(args.results) if args.results else default_results()
    report = build_report(results, args.claims)
    html_path, json_path = report.write(args.out)
    print(f"uqcit: report {html_path} and {json_path}")
    print(report.summary())
    return 0
