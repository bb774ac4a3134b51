"""The package's model card, ``README.md``: what it holds, how it was made, what was measured, how to load it.

``model_card`` builds the card from the package's own files only (``uqcit_metadata.json`` and
``validation/``), so it says nothing the package does not record, and the same package gives the
same bytes. ``export_package`` writes it when it seals a package (after the validation figures,
before the manifest), and ``write_validation`` rewrites it with the new figures.

>>> import tempfile
>>> from uqcit.package import export_package
>>> from uqcit.package.examples import tiny_quantized
>>> q, tok = tiny_quantized()
>>> with tempfile.TemporaryDirectory() as d:
...     card = (export_package(q, tok, f"{d}/pkg", source_model="tiny-llama") / CARD_FILE).read_text()
>>> card.splitlines()[6]
'# tiny-llama, compressed: rtn-w4-g32'
"""
from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any, Mapping

from uqcit.core.io import atomic_write
from uqcit.package.format import PackageMetadata, read_json

CARD_FILE = "README.md"


def write_card(root: str | os.PathLike) -> Path:
    """Write ``root/README.md`` from the package's metadata and validation files (atomically)."""
    root = Path(root)
    return atomic_write(root / CARD_FILE, model_card(root).encode())


def model_card(root: str | os.PathLike) -> str:
    """The model card of the package at ``root`` (Markdown with Hugging Face front matter)."""
    root = Path(root)
    meta = PackageMetadata.read(root)
    base = [f"base_model: {meta.source_model}"] if _hub_id(meta.source_model) else []
    formats = collections.Counter(e["format"] for e in meta.modules.values() if not e.get("tied_to"))
    lines = [
        "---", "library_name: uqcit", *base, "tags: [uqcit, quantized]", "---", "",
        "<!-- Written by UQCIT Workbench from uqcit_metadata.json and validation/: the figures are the package's own. -->",
        f"# {meta.source_model}, compressed: {meta.method}", "",
        f"A compressed package of `{meta.source_model}` written by UQCIT Workbench {meta.uqcit_version} "
        f"(package format {meta.format_version}).", "",
        "| | |", "|---|---|",
        f"| source model | `{meta.source_model}` ({meta.model_class}) |",
        f"| method | `{meta.method}` |",
        f"| bits per weight | {meta.average_bits_per_param:.3f} over {meta.quantized_weight_count:,} compressed "
        "weights (codes, scales, zero points, masks: every stored bit) |",
        f"| compressed weights | {meta.quantized_stored_bytes:,} bytes |",
        f"| formats | {', '.join(f'`{f}` ({n} modules)' for f, n in sorted(formats.items(), key=lambda x: (-x[1], x[0])))} |",
    ]
    lines += [f"| {lvl.replace('_', ' ')} | {pct:.1f}% of weights at {bits:.3f} bits/weight |"
              for lvl, pct, bits in meta.levels()]
    if meta.recipe:
        stages = " → ".join(str(s.get("type")) for s in meta.recipe.get("stages", []))
        lines.append(f"| recipe | `{meta.recipe.get('name')}`: {stages} |")
    if meta.signed_by:
        lines.append(f"| signed | Ed25519, key `{meta.signed_by[:16]}` (`uqcit verify PACKAGE --public-key KEY`) |")
    if meta.protection:
        lines.append(f"| protection | {' + '.join(meta.protected)}: loading needs the secret |")
    lines += ["", "## Measured", "", *_figures(root), "", *_usage(meta, _auto_class(root), asymmetric=any(
        "-g" in f and "-sym" not in f for f in formats))]
    return "\n".join(lines) + "\n"


def _hub_id(name: str) -> bool:
    """Whether ``name`` looks like a Hugging Face model id (``org/name``), not a local alias or path."""
    parts = name.split("/")
    return len(parts) == 2 and all(p and p.replace("-", "").replace("_", "").replace(".", "").isalnum() for p in parts)


def _figures(root: Path) -> list[str]:
    ppl = _numbers(root, "perplexity", ("reference_ppl", "package_ppl"))
    bench = _numbers(root, "benchmarks", ("kl", "top1"))
    if ppl is None and bench is None:
        return ["No figures were stored with this package (`uqcit compress` measures and stores them; "
                "`uqcit eval PACKAGE` measures perplexity, KL and top-1 agreement against the source model)."]
    out = ["| figure | value |", "|---|---|"]
    if ppl is not None:
        scope = "full protocol" if ppl.get("full_protocol") else f"quick: {ppl.get('windows')} window(s)"
        out.append(f"| perplexity, reference → package | {ppl['reference_ppl']:.3f} → {ppl['package_ppl']:.3f} "
                   f"({scope}) |")
    if bench is not None:
        out.append(f"| KL(reference ‖ package) per token | {bench['kl']:.4f} |")
        out.append(f"| top-1 agreement with the reference | {bench['top1']:.2f}% |")
    return out + ["", "Protocol and raw values: `validation/perplexity.json`, `validation/benchmarks.json`."]


def _numbers(root: Path, name: str, keys: tuple[str, ...]) -> Mapping[str, Any] | None:
    """``validation/<name>.json`` when it holds every one of ``keys`` as a number, else None."""
    path = root / "validation" / f"{name}.json"
    data = read_json(path) if path.is_file() else None
    if not isinstance(data, dict):
        return None
    ok = all(isinstance(data.get(k), (int, float)) and not isinstance(data.get(k), bool) for k in keys)
    return data if ok else None


def _auto_class(root: Path) -> str | None:
    """The auto class ``config.json``'s ``auto_map`` sends to ``modeling_uqcit.py``, if any."""
    path = root / "config.json"
    auto = read_json(path).get("auto_map") if path.is_file() else None
    return next(iter(auto), None) if isinstance(auto, dict) else None


def _usage(meta: PackageMetadata, auto: str | None, asymmetric: bool) -> list[str]:
    secret = ", secret=Secret.from_file(\"SECRET\")" if meta.protection else ""
    imports = ["from uqcit.package.secure import Secret"] if meta.protection else []
    remote = [
        "With transformers' own entry point (`trust_remote_code=True` runs this package's `modeling_uqcit.py`, "
        "which hands over to `load_package` above: the same model and logits; it needs UQCIT installed, "
        "`pip install uqcit-workbench`, and the file is covered by the manifest, `uqcit verify PACKAGE`):", "",
        "```python", f"from transformers import {auto}", *imports, "",
        f"model = {auto}.from_pretrained(\"PACKAGE\", trust_remote_code=True{secret})", "```", "",
    ] if auto else []
    return [
        "## Load it", "",
        "With UQCIT (the quantized layers run from their packed codes; the manifest is verified first):", "",
        "```python", "from uqcit.package import load_package", *imports, "",
        f"pkg = load_package(\"PACKAGE\"{secret})", "pkg.model.generate(**pkg.tokenizer(\"Hello\", return_tensors=\"pt\"))",
        "```", "", *remote,
        "The tokenizer loads from this folder with transformers alone: "
        "`AutoTokenizer.from_pretrained(\"PACKAGE\")`.", "",
        "With transformers (the integer codes as a compressed-tensors checkpoint; needs `pip install "
        "compressed-tensors`):", "",
        "```sh", "uqcit export PACKAGE --to compressed-tensors --out model-ct", "```", "",
        "```python", "from transformers import AutoModelForCausalLM", "",
        "model = AutoModelForCausalLM.from_pretrained(\"model-ct\")", "```", "",
        *(["This package has asymmetric layers (zero points). vLLM loads them as written; transformers "
           "5.23 with compressed-tensors 0.20 loads them only dequantized, and only when the checkpoint has "
           "one format: `from_pretrained(\"model-ct\", quantization_config=CompressedTensorsConfig("
           "dequantize=True))`. The float export (`--to hf`) always loads.", ""] if asymmetric else []),
        "With llama.cpp (Llama-family models; 2-5-bit groups of multiples of 32, and symmetric 6- and 8-bit ones, keep their codes):", "",
        "```sh", "uqcit export PACKAGE --to gguf --out model-gguf",
        "llama-cli -m model-gguf/model.gguf -p \"Hello\"", "```", "",
        "As float weights for any other runtime: `uqcit export PACKAGE --to hf --out model-hf`.",
    ]
