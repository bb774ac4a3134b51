"""Binary-concentration check (seed 002 §4.1, test 1) on SmolLM2-135M: the precision distribution
read back from exported packages, per level, against their plans and the document's patterns.

Two packages: the seed's preset (``preset-binary-concentration``: 10-90 at Level 3, 30-70 at
Levels 2 and 4, 46-54 at Levels 1 and 5) and an allocated plan (``alloc-rtn-3.25`` from the
measured sensitivity table ``results/sensitivity-smollm2-135m.safetensors``), both RTN. Each is
exported, loaded back (manifest checked) and counted from its stored masks
(``uqcit.validation.concentration``). No evaluation: this checks storage, not quality.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/concentration.py

Writes benchmarks/results/concentration.json.
"""
from __future__ import annotations

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
from uqcit.package import export_package  # noqa: E402
from uqcit.stages.allocate import AllocateConfig, allocate  # noqa: E402
from uqcit.stages.levels import analyze_levels  # noqa: E402
from uqcit.stages.plan import PlanConfig, build_plan  # noqa: E402
from uqcit.stages.quantize import QuantizeConfig, quantize_model  # noqa: E402
from uqcit.stages.sensitivity import SensitivityResult  # noqa: E402
from uqcit.validation.concentration import check_concentration  # noqa: E402

MODEL = "smollm2-135m"


def main() -> None:
    lm = load_model(MODEL, progress=False)
    levels = analyze_levels(lm.model)
    sens = SensitivityResult.load(RESULTS / "sensitivity-smollm2-135m.safetensors")
    plans = {"preset-binary-concentration": build_plan(levels, PlanConfig(preset="binary-concentration")),
             "alloc-rtn-3.25": allocate(levels, sens, AllocateConfig(target_bpw=3.25)).plan}
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for method, plan in plans.items():
            t0 = time.perf_counter()
            q = quantize_model(lm.model, levels, plan, QuantizeConfig(), progress=False)
            path = export_package(q, lm.tokenizer, Path(tmp) / method, source_model=MODEL, levels=levels)
            built = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = check_concentration(path, levels, plan)
            records.append({"model": MODEL, "method": method, "bpw": q.bpw, **res.to_dict(),
                            "seconds": {"quantize_export": built, "check": time.perf_counter() - t0},
                            "torch": torch.__version__, "machine": machine(),
                            "date": _dt.date.today().isoformat()})
            print(f"{method}: {res.summary()}", flush=True)
            del q
    write_json(RESULTS / "concentration.json", records)


if __name__ == "__main__":
    main()
