"""HumanEval on SmolLM2-135M: the float reference against a compressed package.

For each problem (``uqcit.validation.humaneval``): mean NLL of the canonical solution given the
prompt, KL(reference || package) on those positions, and pass@1 of a greedy completion (at most
``--max-new-tokens`` tokens, stop sequences of the Codex paper) run with the problem's tests in a
sandboxed subprocess with a timeout. The package is ``--package PATH``, or ``rtn-w4-g128`` built,
exported and loaded back here (the method of ``baselines.json``). ``--limit N`` scores the first N
problems only (a subset, recorded as ``problems``); the full set is 164.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/humaneval.py [--limit N] [--package PATH]

Writes benchmarks/results/humaneval.json.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine  # noqa: E402

from uqcit.core.io import write_json  # noqa: E402
from uqcit.inputs.models import load_model  # noqa: E402
from uqcit.package import export_package, load_package  # noqa: E402
from uqcit.stages.levels import analyze_levels  # noqa: E402
from uqcit.stages.plan import PlanConfig, build_plan  # noqa: E402
from uqcit.stages.quantize import QuantizeConfig, quantize_model  # noqa: E402
from uqcit.validation.humaneval import evaluate_humaneval, load_problems  # noqa: E402

MODEL = "smollm2-135m"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, help="first N problems only (default: all 164)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--package", help="a package folder (default: build rtn-w4-g128 here)")
    args = ap.parse_args()
    lm = load_model(MODEL, progress=False)
    problems = load_problems(args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.package
        if path is None:
            levels = analyze_levels(lm.model)
            q = quantize_model(lm.model, levels, build_plan(levels, PlanConfig(preset="uniform", bits=4)),
                               QuantizeConfig(), progress=False)
            path = export_package(q, lm.tokenizer, Path(tmp) / q.method_name, source_model=MODEL, levels=levels)
            del q
        pkg = load_package(path, progress=False)
        records = []
        for role, name, model in (("reference", "reference-fp32", lm.model),
                                  ("compressed", pkg.metadata["method"], pkg.model)):
            t0 = time.perf_counter()
            res = evaluate_humaneval(model, lm.tokenizer, problems, reference=lm.model if role == "compressed" else None,
                                     name=name, max_new_tokens=args.max_new_tokens)
            print(res.summary(), flush=True)
            records.append({"model": MODEL, "method": name, "role": role, **res.to_dict(),
                            "subset": args.limit is not None, "max_new_tokens": args.max_new_tokens,
                            "bpw": pkg.metadata.get("average_bits_per_param") if role == "compressed" else 32.0,
                            "seconds": {"humaneval": time.perf_counter() - t0}, "torch": torch.__version__,
                            "machine": machine(), "date": _dt.date.today().isoformat()})
            write_json(RESULTS / "humaneval.json", records)


if __name__ == "__main__":
    main()
