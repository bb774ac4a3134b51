import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UI = ("ipywidgets", "jupyter", "jupyterlab", "ipykernel", "notebook", "anywidget", "voila")


def _core_modules():
    """Every module under uqcit/ (widgets/ is the lab layer and lives apart): found, not listed,
    so a new stage or room is covered the day it appears."""
    names = []
    for path in sorted((ROOT / "uqcit").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def test_core_imports_no_ipywidgets_or_jupyter():
    modules = _core_modules()
    assert {"uqcit", "uqcit.pipeline", "uqcit.cli", "uqcit.package", "uqcit.stages.plan"} <= set(modules)
    code = (
        f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        f"bad=[m for m in sys.modules if m.split('.')[0] in {UI!r}]\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_widgets_package_importable():
    import uqcit.widgets  # noqa: F401
