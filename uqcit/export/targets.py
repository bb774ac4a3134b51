"""The three exports behind one call: ``export_to(package, target, out)``, what ``uqcit export PACKAGE
--to TARGET`` and the lab's export panel both run, so they write the same files and say the same line.

>>> import tempfile
>>> from uqcit.package import export_package
>>> from uqcit.package.examples import tiny_quantized
>>> q, tok = tiny_quantized()
>>> with tempfile.TemporaryDirectory() as d:
...     done = export_to(export_package(q, tok, f"{d}/pkg", source_model="tiny-llama"), "hf", f"{d}/hf")
...     [name for name, _ in done.files()][:2], done.summary.endswith("transformers checkpoint of float32 weights")
(['config.json', 'generation_config.json'], True)
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

from uqcit.package.format import LoadedPackage

# target -> what it is, for a menu or a help text (the keys are ``uqcit export --to``'s choices)
TARGETS = {
    "compressed-tensors": "compressed-tensors folder (transformers, vLLM)",
    "gguf": "GGUF file (llama.cpp)",
    "hf": "dequantized Hugging Face checkpoint (float32)",
}
GGUF_FILE = "model.gguf"  # llama.cpp takes one file: the gguf target writes OUT/model.gguf


@dataclasses.dataclass(frozen=True)
class TargetExport:
    """What ``export_to`` wrote: the target, its folder, one line saying what is in it, and the
    exporter's own result (``CompressedTensorsExport``, ``GgufExport``; None for ``hf``)."""

    target: str
    path: Path  # the folder written (gguf: the folder holding model.gguf)
    summary: str
    detail: Any = None

    def files(self) -> list[tuple[str, int]]:
        """Every file written, relative to ``path``, with its size in bytes."""
        return [(p.relative_to(self.path).as_posix(), p.stat().st_size)
                for p in sorted(self.path.rglob("*")) if p.is_file()]


def export_to(package: str | os.PathLike | LoadedPackage, target: str, out: str | os.PathLike, *,
              widen: bool = False) -> TargetExport:
    """Write ``package`` (a folder or a loaded package) for ``target`` (a key of ``TARGETS``) in the new
    folder ``out``; ``widen`` (compressed-tensors only) stores 2- and 3-bit codes in 4 bits.

    Raises ``ExportError`` (one line, naming the layer and the export that carries it) when the
    package holds what the target cannot express; a failed gguf export leaves no folder behind.
    """
    # The package's names, looked up per call: what ``uqcit.export`` exports is what runs.
    from uqcit.export import export_compressed_tensors, export_dequantized, export_gguf
    from uqcit.export.hf import as_loaded

    if target not in TARGETS:
        raise ValueError(f"export target {target!r}: choose one of {sorted(TARGETS)}")
    if widen and target != "compressed-tensors":
        raise ValueError(f"widen is for the compressed-tensors target, not {target}")
    out = Path(out)
    pkg = as_loaded(package)
    if target == "gguf":
        out.mkdir(parents=True)  # refuses an existing folder, as the other targets do
        try:
            res = export_gguf(pkg, out / GGUF_FILE)
        except BaseException:
            shutil.rmtree(out)  # the folder made here: nothing half-written stays
            raise
        return TargetExport(target, out, f"{res.path}: GGUF, {sum(res.exact.values())} of {len(res.exact)} "
                            "tensors exactly the package's", res)
    if target == "compressed-tensors":
        res = export_compressed_tensors(pkg, out, widen=widen)
        return TargetExport(target, out, f"{out}: compressed-tensors, {len(res.formats)} layers as integer codes, "
                            f"{len(res.dense)} as float", res)
    return TargetExport(target, out, f"{export_dequantized(pkg, out)}: transformers checkpoint of float32 weights")
