"""Print a job's result beside the recorded baselines: the seed preset, uniform round-to-nearest
and the best learned-rounding packages, all on the same protocol (from benchmarks/results/).

The quick start runs it after ``uqcit compress --json``:

    .venv/bin/python benchmarks/beside.py runs/default/report.json

A row whose record is missing is left out; the job's own row is always printed. Figures from the
records were measured on the build machine; the job's own on this one.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# (record file, method, what it is)
BASELINES = [
    ("baselines.json", "preset-binary-concentration", "seed preset (002 §2.2.2.2 patterns), round to nearest"),
    ("baselines.json", "rtn-w4-g128", "uniform 4-bit, round to nearest"),
    ("baselines.json", "rtn-w3-g128", "uniform 3-bit, round to nearest"),
    ("quality_per_bit.json", "signround-i100-w3-g96-iz-emb-w3-g64-iz-fb-n128", "recipe signround-3.25 (learned rounding)"),
    ("quality_per_bit.json", "recipe-alloc-signround-3.25", "recipe alloc-signround-3.25 (allocation, learned rounding)"),
    ("quality_per_bit.json", "signround-i100-w4-g32-sym-s6-emb-w4-g96-iz-fb-n128",
     "recipe signround-4.25 (learned rounding, 100 steps, 12 min)"),
]


def rows(report: dict) -> list[tuple[str, str, float | None, float | None, float | None, float | None]]:
    """(what, method, bits/weight, KL, perplexity, seconds) of the job, then of each recorded baseline.

    >>> report = {"method": "m", "bpw": 4.0, "seconds": {"quantize": 2.0, "evaluate": 3.0},
    ...           "compressed": {"kl": 0.5, "ppl": 30.0, "full_protocol": True}}
    >>> rows(report)[0]
    ('this run', 'm', 4.0, 0.5, 30.0, 5.0)
    """
    job = report["compressed"]
    out = [("this run", report["method"], report["bpw"], job["kl"], job["ppl"], sum(report["seconds"].values()))]
    for file, method, what in BASELINES:
        path = RESULTS / file
        if not path.exists():
            continue
        for r in json.loads(path.read_text()):
            if r["method"] == method and r.get("full_protocol"):
                # Records time their steps differently (some evaluate several candidates at once):
                # only the job's own wall time is comparable here.
                out.append((what, method, r["bpw"], r["kl"], r["ppl"], None))
                break
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: beside.py REPORT.json (written by uqcit compress --json)", file=sys.stderr)
        return 2
    report = json.loads(Path(argv[0]).read_text())
    if not report["compressed"].get("full_protocol"):
        print("note: this run was not evaluated on the full protocol; the rows below were")
    fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    print("| what | method | bits/weight (whole model) | KL | perplexity | seconds |")
    print("|---|---|---:|---:|---:|---:|")
    for what, method, bpw, kl, ppl, secs in rows(report):
        print(f"| {what} | {method} | {fmt(bpw, '.3f')} | {fmt(kl, '.4f')} | {fmt(ppl, '.2f')} | {fmt(secs, '.0f')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
