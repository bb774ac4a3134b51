"""The README's claims about the CLI and the built-in recipes match the code."""
from __future__ import annotations

import re
from pathlib import Path

from uqcit.recipe import builtin_recipes

README = Path(__file__).resolve().parents[1] / "README.md"


def _expand(name: str) -> list[str]:
    """``rtn-w2/3/4-g128`` -> ``rtn-w2-g128``, ``rtn-w3-g128``, ``rtn-w4-g128`` (the README's shorthand)."""
    match = re.fullmatch(r"(.*?)(\d+(?:/\d+)+)(.*)", name)
    if match is None:
        return [name]
    head, alternatives, tail = match.groups()
    return [f"{head}{a}{tail}" for a in alternatives.split("/")]


def test_the_recipe_list_names_every_built_in_recipe():
    (row,) = [line for line in README.read_text().splitlines() if line.startswith("| recipes |")]
    named = {expanded for name in re.findall(r"`([^`]+)`", row) for expanded in _expand(name)}
    listed = named - {"uqcit.recipe", "uqcit recipes"}
    assert listed == set(builtin_recipes()), (sorted(set(builtin_recipes()) - listed), sorted(listed - set(builtin_recipes())))


def test_inspect_is_described_as_text():
    # `uqcit inspect` prints text (cmd_inspect); figures are the notebooks' and widgets' business.
    (line,) = [line for line in README.read_text().splitlines() if line.startswith("uqcit inspect ")]
    comment = line.partition("#")[2]
    assert "text" in comment and "figure" not in comment, line


def test_the_quick_start_prints_its_run_beside_the_recorded_baselines(tmp_path):
    import json
    import subprocess
    import sys

    root = README.parent
    assert "benchmarks/beside.py" in (root / "scripts" / "quickstart.sh").read_text()
    report = {"method": "gptq-w4-g64-sym", "bpw": 4.23, "seconds": {"quantize": 100.0, "evaluate": 400.0},
              "compressed": {"kl": 0.27, "ppl": 35.4, "full_protocol": True}}
    (tmp_path / "r.json").write_text(json.dumps(report))
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "beside.py"), str(tmp_path / "r.json")],
                         capture_output=True, text=True, check=True).stdout
    assert "| this run | gptq-w4-g64-sym | 4.230 | 0.2700 | 35.40 | 500 |" in out
    assert "| seed preset" in out and "| uniform 4-bit" in out  # from benchmarks/results/baselines.json
