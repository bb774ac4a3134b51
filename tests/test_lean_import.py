import subprocess
import sys


def test_core_imports_no_ipywidgets_or_jupyter():
    code = (
        "import sys, uqcit, uqcit.pipeline, uqcit.package, uqcit.cli, uqcit.stages.evaluate, uqcit.stages.plan;"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('ipywidgets','jupyter','jupyterlab',"
        "'ipykernel','notebook','anywidget')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_widgets_package_importable():
    import uqcit.widgets  # noqa: F401
