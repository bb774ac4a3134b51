"""ExportPanel: write the current plan as a package (``uqcit.package``), optionally also for another
runtime (``uqcit.export.targets``), and show what was written."""
from __future__ import annotations

import html
import importlib.util
import os
import time
from pathlib import Path

import ipywidgets as W

from uqcit.export import ExportError
from uqcit.export.targets import TARGETS, export_to
from uqcit.package import package_bytes, read_metadata
from uqcit.pipeline import Session, export_session
from uqcit.stages.quantize import QuantizeConfig
from uqcit.stages.rotation import adopt_rotation

from ._base import Job, LabState, View, html_rows


def signing_available() -> bool:
    """Whether package signing (``uqcit.package.secure``) is part of this install."""
    return importlib.util.find_spec("uqcit.package.secure") is not None


class ExportPanel(View):
    """Export the budget editor's current plan with the shared recipe embedded, in the background.

    The export goes through the CLI's own step (``uqcit.pipeline.export_session``) on a session
    holding what the lab chose: the levels, the sensitivity, ``clusters`` when given, the
    rotation put in the recipe (its rotated model is quantized, and the package records it) and
    the plan. The model the evaluation panel quantized for the same plan is reused when there is
    no rotation or clusters; else the session's quantize stage runs. The panel then lists the
    package's folders and files with their sizes and the measured bits/weight from its metadata.

    The target menu adds, once the package is written, an export of it for another runtime:
    a compressed-tensors folder (vLLM, transformers), a GGUF file (llama.cpp) or a dequantized
    Hugging Face checkpoint, by ``uqcit.export.targets.export_to`` (what ``uqcit export --to`` runs),
    into the target folder box (empty: ``PACKAGE-TARGET`` beside the package), which must not exist.
    A plan the target cannot carry gets the exporter's one-line reason in the panel; the package
    stays. The files written are listed with their sizes.

    >>> import tempfile
    >>> from uqcit.inputs.tiny import tiny_model
    >>> from uqcit.stages.levels import analyze_levels
    >>> from uqcit.stages.sensitivity import SensitivityConfig, measure_sensitivity
    >>> from uqcit.widgets import BudgetEditor
    >>> model, tok = tiny_model("llama")
    >>> levels = analyze_levels(model)
    >>> sens = measure_sensitivity(model, tok, levels, SensitivityConfig(
    ...     formats=("w2", "w4"), group_size=32, calib_samples=2, calib_seq_len=32), progress=False)
    >>> editor = BudgetEditor(levels, sens, target_bpw=4.0)  # publishes the plan to export
    >>> with tempfile.TemporaryDirectory() as d:
    ...     panel = ExportPanel(model, tok, levels, path=f"{d}/package", state=editor.lab)
    ...     panel.target.value = "hf"  # also a dequantized transformers checkpoint, beside the package
    ...     panel.export(wait=True)  # what "Export package" does, here waiting for the files
    ...     panel.last_path.name, panel.last_target.path.name, len(editor.lab.packages)
    ('package', 'package-hf', 1)
    """

    def __init__(self, reference, tokenizer, levels, *, path: str = "runs/workbench/package",
                 source_model: str = "unknown", sensitivity=None, clusters=None, state: LabState | None = None,
                 quantize: QuantizeConfig = QuantizeConfig()):
        super().__init__(state)
        self.reference = reference
        self.tokenizer = tokenizer
        self.levels = levels
        self.source_model = source_model
        self.sensitivity = sensitivity
        self.clusters = clusters
        self.quantize_config = quantize
        self.job = Job()
        self.path = W.Text(value=str(path), description="path", layout=W.Layout(width="520px"))
        can_sign = signing_available()
        self.sign = W.Checkbox(value=False, description="sign (Ed25519)", disabled=not can_sign, indent=False,
                               tooltip="sign every file of the package" if can_sign else
                               "signing needs uqcit.package.secure, not in this install")
        self.key_path = W.Text(value="", description="key", placeholder="private key .key (empty: make a new one)",
                               layout=W.Layout(width="520px"))
        choices = [("UQCIT package only", None), *((f"package + {label}", key) for key, label in TARGETS.items())]
        self.target = W.Dropdown(options=choices, value=None, description="target", layout=W.Layout(width="520px"))
        self.target_path = W.Text(value="", description="target to", layout=W.Layout(width="520px"),
                                  placeholder="folder to write (empty: PACKAGE-TARGET beside the package)")
        self.widen = W.Checkbox(value=False, description="widen 2/3-bit codes to 4 bits", indent=False,
                                disabled=True, tooltip="compressed-tensors: carries 3-bit plans, runs in vLLM")
        self.target.observe(lambda change: setattr(self.widen, "disabled", change["new"] != "compressed-tensors"),
                            "value")
        self.export_button = W.Button(description="Export package", icon="download", button_style="primary")
        self.status = W.HTML("" if can_sign else
                             "<i>Signing is not available: <code>uqcit.package.secure</code> is not in this install.</i>")
        self.signature = W.HTML()
        self.written = W.HTML()
        self.target_status = W.HTML()
        self.target_written = W.HTML()
        self.last_path: Path | None = None
        self.last_target = None  # the TargetExport of the last export with a target, if it was written
        self.export_button.on_click(self.guarded(lambda _: self.export(), "export"))
        self.children = [self.error, W.HBox([self.path, self.export_button]), W.HBox([self.sign, self.key_path]),
                         self.target, W.HBox([self.target_path, self.widen]), self.status, self.signature,
                         self.written, self.target_status, self.target_written]

    def export(self, *, wait: bool = False) -> None:
        """Export the current plan to the path in the text box (``wait``: block until written)."""
        alloc = self.lab.allocation
        if alloc is None:
            raise RuntimeError("no plan to export: set a budget in the budget editor first")
        if not self.path.value.strip():
            raise ValueError("give a path for the package")
        target = Path(self.path.value).expanduser()
        other = self._target_folder(target)
        key, key_note = self._signing_key(target) if self.sign.value else (None, "")
        session = self._session(alloc.plan)
        cached = self.lab.quantized
        reuse = (cached is not None and cached[1].plan == alloc.plan and self.lab.rotation is None
                 and self.clusters is None)  # the evaluation panel quantized this very plan
        self.export_button.disabled = True
        self.status.value = f"<i>exporting to {html.escape(str(target))}…</i>"
        self.target_status.value = self.target_written.value = ""
        self.last_target = None
        runtime, widen = self.target.value, self.widen.value and self.target.value == "compressed-tensors"

        def work(cancelled):
            t0 = time.perf_counter()
            if reuse:
                session.results["quantize"] = cached[1]
            else:
                session.run_stage(self.quantize_config)
            export_session(session, target, recipe=self.lab.recipe, model_name=self.source_model, signing_key=key)
            verified = None
            if key is not None:
                from uqcit.package.secure import verify_package

                verified = verify_package(target, key.public_key())
            seconds = time.perf_counter() - t0
            written = None
            if runtime is not None:
                try:
                    written = export_to(target, runtime, other, widen=widen)
                except ExportError as exc:  # the plan holds what the target cannot express: the package stays
                    written = " ".join(str(exc).split())
            return target, seconds, verified, key_note, (runtime, written)

        self.job.start(work, self._done)
        if wait:
            self.job.join()

    def _session(self, plan) -> Session:
        """A session holding what the lab chose, for the pipeline's quantize stage and export step."""
        session = Session(name=self.source_model, reference=self.reference, tokenizer=self.tokenizer,
                          progress=False, results={"levels": self.levels}, plan=plan)
        for tag, result in (("sensitivity", self.sensitivity), ("clusters", self.clusters)):
            if result is not None:
                session.results[tag] = result
        if self.lab.rotation is not None:
            adopt_rotation(session, self.lab.rotation)
        return session

    def _done(self, result, exc) -> None:
        self.export_button.disabled = False
        if exc is not None:
            self.status.value = ""
            self.error.show(exc, "export")
            return
        path, seconds, verified, key_note, (runtime, written) = result
        self.signature.value = ("" if verified is None else
                                f"<span class='uqcit-signed'>{html.escape(key_note)}; {html.escape(verified.summary())}"
                                "</span>")
        self.error.clear()
        self.last_path = path
        self.lab.packages = [*self.lab.packages, str(path)]
        meta = read_metadata(path)
        self.status.value = (f"<span class='uqcit-exported'>wrote <code>{html.escape(str(path))}</code>: "
                             f"{meta.get('method')}, {meta.get('average_bits_per_param', float('nan')):.3f} "
                             f"bits/weight, {package_bytes(path) / 1e6:.1f} MB in {seconds:.1f} s</span>")
        self.written.value = html_rows(("entry", "files", "bytes"), self.listing(path), "uqcit-written")
        self._show_target(runtime, written)

    def _target_folder(self, package: Path) -> Path | None:
        """Where the target export goes (None: no target); refused now if it exists or is the package."""
        if self.target.value is None:
            return None
        text = self.target_path.value.strip()
        folder = Path(text).expanduser() if text else package.with_name(f"{package.name}-{self.target.value}")
        if folder.resolve() == package.resolve():
            raise ValueError(f"target folder {folder} is the package's own path; give the target another folder")
        if os.path.lexists(folder):
            raise FileExistsError(f"target folder {folder} already exists; remove it or give another in 'target to'")
        return folder

    def _show_target(self, runtime: str | None, written) -> None:
        """The target export's line and files, or (``written`` a message) why the target could not carry the plan."""
        if runtime is None:
            return
        if isinstance(written, str):
            self.target_status.value = (f"<span class='uqcit-target-refused'>not written as "
                                        f"{html.escape(TARGETS[runtime])}: {html.escape(written)} "
                                        "(the package above is kept)</span>")
            return
        self.last_target = written
        total = sum(size for _, size in written.files())
        self.target_status.value = (f"<span class='uqcit-target-written'>{html.escape(written.summary)}; "
                                    f"{total / 1e6:.1f} MB</span>")
        self.target_written.value = html_rows(("entry", "files", "bytes"), self.listing(written.path),
                                              "uqcit-target-files")

    def _signing_key(self, target: Path):
        """The key in the key box, or a new key pair written beside the package (never inside it)."""
        from uqcit.package.secure import fingerprint, keygen, load_signing_key

        if self.key_path.value.strip():
            key = load_signing_key(Path(self.key_path.value).expanduser())
            return key, f"signed with {self.key_path.value} (key {fingerprint(key)[:16]})"
        keys_dir = target.parent / f"{target.name}-keys"
        priv, pub = keygen(keys_dir, "uqcit")
        key = load_signing_key(priv)
        self.key_path.value = str(priv)
        return key, f"new key pair {priv} / {pub} (key {fingerprint(key)[:16]}); keep the .key private"

    @staticmethod
    def listing(path: Path) -> list[tuple[str, int, int]]:
        """Top-level files, and each folder with its file count and bytes (``layers/`` per layer kind)."""
        rows = []
        for entry in sorted(path.iterdir()):
            if entry.is_file():
                rows.append((entry.name, 1, entry.stat().st_size))
            elif entry.name == "layers":
                layers = sorted(p for p in entry.iterdir() if p.is_dir())
                files = [f for p in layers for f in p.iterdir() if f.is_file()]
                names = sorted({f.name for f in files})
                rows.append((f"layers/ ({len(layers)} folders: {', '.join(names)})", len(files),
                             sum(f.stat().st_size for f in files)))
            else:
                files = [f for f in entry.rglob("*") if f.is_file()]
                rows.append((f"{entry.name}/ ({', '.join(sorted(f.name for f in files)[:6])}"
                             + (", …" if len(files) > 6 else "") + ")", len(files),
                             sum(f.stat().st_size for f in files)))
        return rows
