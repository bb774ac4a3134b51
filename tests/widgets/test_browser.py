"""The dashboard in a real browser: JupyterLab and Voilà, driven by Playwright with the system chromium.

Each test starts its own server on 127.0.0.1 with a free port, in temporary folders (a copy of
``notebooks/08_dashboard.ipynb``, Jupyter/IPython/XDG dirs), runs the dashboard notebook on the
real SmolLM2-135M, checks in the DOM that widgets and plotly figures rendered (in Voilà, that the
figures show what the notebook's cells changed before the page opened), presses ArrowRight on the
target-bits slider and waits for the totals to change, saves a screenshot under the test's
temporary folder, and stops the server by its PID.

They are never skipped silently: without chromium or playwright they fail and say how to
install them (``scripts/test.sh`` does); ``UQCIT_SKIP_BROWSER=1`` skips them on purpose, and
the report says so. Each takes about a minute on 2 cores (about 80 s with another job running).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "08_dashboard.ipynb"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
RUN_TIMEOUT_MS = 420_000  # the notebook loads SmolLM2 and builds the dashboard: ~30 s idle, minutes when contended

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(os.environ.get("UQCIT_SKIP_BROWSER")),
                       reason="UQCIT_SKIP_BROWSER is set: the browser tests were skipped on purpose"),
]


def _chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        pytest.fail("chromium is not installed: `bash scripts/test.sh` installs the Debian package "
                    "(apt-get install chromium); set UQCIT_SKIP_BROWSER=1 to skip the browser tests on purpose")
    return path


def _sync_playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: it is in the test extra (pip install -e '.[test]' with "
                    "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1); set UQCIT_SKIP_BROWSER=1 to skip on purpose")
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    for var, sub in (("JUPYTER_CONFIG_DIR", "jupyter-config"), ("JUPYTER_RUNTIME_DIR", "jupyter-runtime"),
                     ("JUPYTER_DATA_DIR", "jupyter-data"),
                     ("IPYTHONDIR", "ipython"), ("XDG_CONFIG_HOME", "xdg-config"), ("XDG_CACHE_HOME", "xdg-cache")):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(tmp / sub)
    env.update(OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


class _Server:
    """A Jupyter (or Voilà) server process we started, stopped by PID."""

    def __init__(self, args: list[str], port: int, url_path: str, tmp: Path):
        self.port = port
        self.log = open(tmp / "server.log", "wb")
        self.proc = subprocess.Popen(args, cwd=tmp / "work", env=_env(tmp), stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}{url_path}"
        self.tmp = tmp

    def wait_ready(self, path: str, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"server did not answer on port {self.port} within {timeout} s: {self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        return (self.tmp / "server.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and its kernels
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def workdir(tmp_path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(NOTEBOOK, work / NOTEBOOK.name)  # the server may autosave: never into the repository
    return tmp_path


def _browser(p, tmp: Path):
    return p.chromium.launch_persistent_context(str(tmp / "chromium-profile"), executable_path=_chromium(),
                                                headless=True, args=CHROMIUM_ARGS,
                                                viewport={"width": 1500, "height": 1100})


def _dismiss_news(page) -> None:
    """JupyterLab 4 asks whether to fetch news in a toast over the notebook: answer No if it is there."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.locator(".jp-toast-button", has_text="No").first.click(timeout=10_000, force=True)
    except PlaywrightTimeout:
        pass  # no toast (or already gone): nothing covers the page


def _totals(page) -> str:
    return page.locator(".uqcit-bpw").first.inner_text()


def _move_slider_and_check(page, shot: Path) -> tuple[str, str]:
    """ArrowRight on the target-bpw slider; the totals must change. Returns (before, after)."""
    before = _totals(page)
    handle = page.locator(".uqcit-target .noUi-handle").first  # the Budget tab's target-bpw slider
    handle.scroll_into_view_if_needed()
    handle.focus()
    for _ in range(4):  # 4 steps of 0.05 bits/weight
        handle.press("ArrowRight")
    page.wait_for_function("b => { const e = document.querySelector('.uqcit-bpw'); return e && e.textContent !== b; }",
                           arg=before, timeout=120_000)
    # Each key press re-solves: wait until the totals show the slider's last value, not a step on the way.
    target = page.locator(".uqcit-target .widget-readout").first.inner_text().strip()
    page.wait_for_function("t => { const e = document.querySelector('.uqcit-totals'); "
                           "return e && e.textContent.includes('(target ' + t + ')'); }",
                           arg=f"{float(target):.2f}", timeout=120_000)
    after = _totals(page)
    page.locator(".uqcit-totals").first.scroll_into_view_if_needed()
    page.screenshot(path=str(shot), full_page=False)
    return before, after


def _figure_traces(page, title_part: str) -> list | None:
    """Name, x, y and outline widths of each trace of the plotly figure whose title holds ``title_part``."""
    return page.evaluate("""t => {
        const d = [...document.querySelectorAll('.js-plotly-plot')]
            .find(d => d.layout && JSON.stringify(d.layout.title || '').includes(t));
        return d ? d.data.map(tr => [tr.name, tr.x, tr.y, ((tr.marker || {}).line || {}).width]) : null; }""",
                         title_part)


def _outlined(traces: list) -> int:
    """How many budget bars are outlined (pinned modules)."""
    return sum(1 for _, _, _, widths in traces for w in (widths or []) if w)


def _check_figures_show_the_notebook(page) -> None:
    """The figures show what the notebook's cells did before Voilà opened the page (plotly's widget
    state used to keep each figure as first built): the budget chart after ``pin_level(3, ...)``,
    the evaluation scatter with its run."""
    budget = _figure_traces(page, "predicted KL")
    assert budget is not None, "no budget chart on the page"
    level3 = [widths for name, _, _, widths in budget if name == "L3"]
    assert level3 and level3[0] and all(level3[0]), "the budget chart does not show the notebook's pin of Level 3"
    assert _outlined(budget) == len(level3[0])  # nothing else pinned
    scatter = _figure_traces(page, "quality vs size")
    assert scatter is not None and len(scatter[0][1]) == 1, "the evaluation scatter lacks the notebook's run"


def _rendered(page) -> None:
    page.wait_for_selector(".uqcit-header", timeout=RUN_TIMEOUT_MS)
    # The last cell's output: every cell has run, so nothing but the slider changes the totals now.
    page.wait_for_selector("text=reference ppl on the same window", timeout=RUN_TIMEOUT_MS)
    page.wait_for_selector(".uqcit-target .noUi-handle", timeout=120_000)
    page.wait_for_selector(".uqcit-totals", timeout=120_000)
    # Figures of the tabs not shown are in the DOM but hidden: wait for one that is on screen.
    page.locator(".js-plotly-plot svg.main-svg:visible").first.wait_for(timeout=120_000)
    assert page.locator(".js-plotly-plot").count() >= 1
    assert page.locator(".widget-tab, .jupyter-widget-tab, .lm-TabBar").count() >= 1
    assert page.locator(".uqcit-error").count() == 0, page.locator(".uqcit-error").first.inner_text()


def test_dashboard_in_jupyterlab(workdir):
    """JupyterLab: run the dashboard notebook from the page, use the slider, screenshot."""
    sync_playwright = _sync_playwright()
    port = _free_port()
    server = _Server([sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
                      "--IdentityProvider.token=", "--ServerApp.password=", "--ServerApp.ip=127.0.0.1",
                      *(["--allow-root"] if os.geteuid() == 0 else []),
                      f"--ServerApp.root_dir={workdir / 'work'}", "--ServerApp.open_browser=False",
                      "--LabApp.expose_app_in_browser=True", "--ServerApp.disable_check_xsrf=True"],
                     port, f"/lab/tree/{NOTEBOOK.name}", workdir)
    try:
        server.wait_ready("/lab")
        with sync_playwright() as p:
            ctx = _browser(p, workdir)
            page = ctx.new_page()
            page.goto(server.url)
            page.wait_for_selector(".jp-Notebook", timeout=120_000)
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget "
                                   "&& window.jupyterapp.shell.currentWidget.sessionContext "
                                   "&& window.jupyterapp.shell.currentWidget.sessionContext.session "
                                   "&& window.jupyterapp.shell.currentWidget.sessionContext.session.kernel",
                                   timeout=120_000)
            _dismiss_news(page)
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            _rendered(page)
            before, after = _move_slider_and_check(page, workdir / "dashboard-jupyterlab.png")
            assert before != after
            assert float(after) > float(before)  # a larger budget: more bits/weight
            page.evaluate("() => window.jupyterapp.serviceManager.sessions.shutdownAll()")
            ctx.close()
    except Exception:
        print(server.tail())
        raise
    finally:
        server.stop()
    assert (workdir / "dashboard-jupyterlab.png").stat().st_size > 10_000


def test_dashboard_in_voila(workdir):
    """Voilà serves the notebook as a page (no code shown); the same checks."""
    sync_playwright = _sync_playwright()
    port = _free_port()
    server = _Server([sys.executable, "-m", "voila", NOTEBOOK.name, "--no-browser", f"--port={port}",
                      "--Voila.ip=127.0.0.1", "--VoilaConfiguration.http_keep_alive_timeout=5"],
                     port, "/", workdir)
    try:
        _wait_port(server)
        with sync_playwright() as p:
            ctx = _browser(p, workdir)
            page = ctx.new_page()
            page.goto(server.url, timeout=RUN_TIMEOUT_MS)
            _rendered(page)
            # Voilà hides the code (markdown cells render inside .jp-InputArea, code cells show none).
            assert page.locator(".jp-CodeCell .jp-InputArea:visible, .jp-CodeMirrorEditor:visible").count() == 0
            assert "Workbench(" not in page.locator("body").inner_text()
            _check_figures_show_the_notebook(page)
            before, after = _move_slider_and_check(page, workdir / "dashboard-voila.png")
            assert float(after) > float(before)
            ctx.close()
    except Exception:
        print(server.tail())
        raise
    finally:
        server.stop()
    assert (workdir / "dashboard-voila.png").stat().st_size > 10_000


def _wait_port(server: _Server, timeout: float = 120) -> None:
    """Voilà executes the notebook on the first page request, so only wait for the port to listen."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if server.proc.poll() is not None:
            raise RuntimeError(f"voila exited with {server.proc.returncode}: {server.tail()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", server.port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"voila did not listen on port {server.port} within {timeout} s: {server.tail()}")
