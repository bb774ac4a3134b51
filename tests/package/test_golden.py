"""Golden bytes of a tiny package (safetensors' test_simple.py habit): a format change is a decision.

A tiny llama (``tiny_model``, seed 0) quantized with a fixed uniform plan (RTN, 4 bits, groups
of 32) is exported, and the SHA-256 of every file is compared with the digests pinned below.
Any change to what a package holds or how it is written (a key, a tensor name, a dtype, JSON
layout, safetensors header metadata) fails here; if the change is meant, bump
``FORMAT_VERSION`` where readers need to know, and paste the new digests (``python
tests/package/test_golden.py`` prints them).

The package is exported with ``reproducible=True`` (``created`` is the epoch; see
``uqcit.package.canonical``), so its own files are hashed as raw bytes: safetensors files
(headers written sorted and padded, by ``canonical.save_safetensors``), the metadata (with
``uqcit_version`` fixed to ``golden``: a release bump is not a format change), validation
and layer JSON. What is not hashed byte for byte, and why:

- ``config.json``: hashed without ``transformers_version``, which transformers writes itself.
- ``tokenizer/`` and its copies at the package root (so ``AutoTokenizer.from_pretrained(package)``
  works): written by ``tokenizer.save_pretrained``, transformers' format, not ours; checked only
  to be present, identical and to load.
- ``modeling_uqcit.py`` (transformers' entry point, ``uqcit.package.remote``) is hashed raw like the
  package's own files: a change to the shipped loader is a decision too.
- ``uqcit_manifest.json``: it holds the SHA-256 of the tokenizer files and of the measured
  floats below; checked to list every file and to verify instead.
- ``rel_error``/``sqnr_db`` in ``precision_map.json`` and ``noise_profile.json`` are float32
  sums whose last bits depend on the CPU's vector width; they are hashed rounded to 6
  significant digits (everything else in those files exactly).

The weights themselves are exact: the tiny model's init (torch's seeded normal_) and RTN
(min/max, elementwise rounding) involve no reduction order. Digests hold for the pinned
dependency set (constraints.txt) on x86-64.
"""
import hashlib
import json
import sys
from pathlib import Path

import pytest

from uqcit.core.io import to_json
from uqcit.inputs.tiny import tiny_model
from uqcit.package import PackageMetadata, export_package, load_package, package_bytes, read_metadata
from uqcit.package import export as export_module
from uqcit.package.secure.signing import MANIFEST_FILE, verify_manifest
from uqcit.stages.levels import analyze_levels
from uqcit.stages.plan import PlanConfig, build_plan
from uqcit.stages.quantize import quantize_model

MEASURED = ("rel_error", "sqnr_db")  # float32 sums: compared to 6 significant digits
VOLATILE = {"config.json": ("transformers_version",)}

GOLDEN = {
    "README.md": "3793505d778be94787c7ee650bfde40d67137bfc9943db51d911d7a0a07d8a29",
    "config.json": "5ea1462335df0a44ae7cfca68c13ce5afd0fe456ec6032f9debe165270b66d96",
    "layers/layer_000/ghz_clusters.json": "6e8c24b665329c7c08b13e6ccc652c808884abf6b5991ed0162488735110c493",
    "layers/layer_000/precision_map.json": "4c3bf523fbb370863a954fd7a1d4966016b69df336c6dac84db395ae9115696c",
    "layers/layer_000/rotation.safetensors": "db1bf9579dbcc8bd60bc4a5ee7776428bb19e735a35d4a7ef0aa6c3eab3c8e6e",
    "layers/layer_000/weights.safetensors": "e4144df779eaf26ef5f3cb320b6ee739cecf9663ee7224791ce74387ec7b8049",
    "layers/layer_001/ghz_clusters.json": "6e8c24b665329c7c08b13e6ccc652c808884abf6b5991ed0162488735110c493",
    "layers/layer_001/precision_map.json": "7882a461ac3ef3469fa58b6d16e1149b86412dfee59cb390a54e93cb8396a443",
    "layers/layer_001/rotation.safetensors": "db1bf9579dbcc8bd60bc4a5ee7776428bb19e735a35d4a7ef0aa6c3eab3c8e6e",
    "layers/layer_001/weights.safetensors": "ff2e138ff4df8292027e81cfb2664d4774eff5030d73175291d7a61b83325110",
    "layers/layer_002/ghz_clusters.json": "6e8c24b665329c7c08b13e6ccc652c808884abf6b5991ed0162488735110c493",
    "layers/layer_002/precision_map.json": "7d3669746712d34850c22aad571636b3d41babc97c4ee3646aa5bd68b7fc4b0c",
    "layers/layer_002/rotation.safetensors": "db1bf9579dbcc8bd60bc4a5ee7776428bb19e735a35d4a7ef0aa6c3eab3c8e6e",
    "layers/layer_002/weights.safetensors": "372c2afa001dbc75ab4a52eda59d40255511b5296864e5d8a5be3deeea3831d8",
    "layers/layer_003/ghz_clusters.json": "6e8c24b665329c7c08b13e6ccc652c808884abf6b5991ed0162488735110c493",
    "layers/layer_003/precision_map.json": "0c8048a9bf64079358cf9fad0bbb6319ab6be71cb7f96c60a7f3154ffcee3218",
    "layers/layer_003/rotation.safetensors": "db1bf9579dbcc8bd60bc4a5ee7776428bb19e735a35d4a7ef0aa6c3eab3c8e6e",
    "layers/layer_003/weights.safetensors": "dc68ede8ca633b8fcf27d83fdf0046175164add6ecbf33e25265ac4f453f30c5",
    "layers/outer/ghz_clusters.json": "6e8c24b665329c7c08b13e6ccc652c808884abf6b5991ed0162488735110c493",
    "layers/outer/precision_map.json": "d743ad6e68f9e3375224e6fbd4c34eca6bbe91bfbdfc076ea59128f031db4f47",
    "layers/outer/rotation.safetensors": "db1bf9579dbcc8bd60bc4a5ee7776428bb19e735a35d4a7ef0aa6c3eab3c8e6e",
    "layers/outer/weights.safetensors": "1ec9bea83342f018b22e5a6d2553c481611fbfed4183c9f3e694d9f46d50aa27",
    "modeling_uqcit.py": "6ac86abbe7108469c5f440d7d0e9c6d8bcc94e6cf7d4ba4b8ceacd8348a4ce98",
    "uqcit_metadata.json": "9db63c831042625e2fdff8b07d97f78e518a39276b7b980aa9d7c0354c873c6d",
    "validation/benchmarks.json": "a175c432f9e0c9d759315c0e0b025c7bbcf86d960c1f8c5aec81b013ad02c702",
    "validation/noise_profile.json": "3f7552563458be9f8fdb5d1d571d733af559c01be4206ae07ccd3e4e01d830cb",
    "validation/perplexity.json": "a175c432f9e0c9d759315c0e0b025c7bbcf86d960c1f8c5aec81b013ad02c702",
}


def export_golden(out: Path) -> Path:
    """The pinned package: tiny llama, seed 0, uniform RTN w4 g32, no recipe."""
    model, tok = tiny_model("llama", seed=0)
    levels = analyze_levels(model)
    plan = build_plan(levels, PlanConfig(preset="uniform", bits=4, group_size=32))
    q = quantize_model(model, levels, plan, progress=False)
    return export_package(q, tok, out, source_model="tiny-llama", reproducible=True)


def _round_measured(data):
    if isinstance(data, dict):
        return {k: (float(f"{v:.6g}") if k in MEASURED and isinstance(v, float) else _round_measured(v))
                for k, v in data.items()}
    if isinstance(data, list):
        return [_round_measured(v) for v in data]
    return data


def digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file but the tokenizer's (and its root copies) and the manifest, raw but for the
    module docstring's list."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("tokenizer/") or (root / "tokenizer" / rel).is_file() or rel == MANIFEST_FILE:
            continue
        data = path.read_bytes()
        if rel in VOLATILE or rel.endswith(("precision_map.json", "noise_profile.json")):
            doc = json.loads(data)
            for key in VOLATILE.get(rel, ()):
                doc.pop(key)
            data = (to_json(_round_measured(doc)) + "\n").encode()
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


@pytest.fixture()
def golden_package(tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "__version__", "golden")
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    return export_golden(tmp_path / "pkg")


def test_tiny_package_files_are_the_pinned_bytes(golden_package):
    got = digests(golden_package)
    changed = sorted(rel for rel in set(got) | set(GOLDEN) if got.get(rel) != GOLDEN.get(rel))
    assert not changed, (f"package format changed in {changed}: if meant, bump FORMAT_VERSION where "
                         "readers need it and paste the new digests (python tests/package/test_golden.py)")


def test_golden_package_is_complete_and_its_volatile_parts_are_what_the_docstring_says(golden_package):
    meta = read_metadata(golden_package)
    assert meta["created"] == "1970-01-01T00:00:00+0000"  # reproducible=True, no SOURCE_DATE_EPOCH
    assert meta["uqcit_version"] == "golden" and meta["package_bytes"] == package_bytes(golden_package)
    assert PackageMetadata.from_dict(meta).to_dict() == meta  # the typed record holds every key
    assert (golden_package / "tokenizer").is_dir()
    listed = verify_manifest(golden_package)  # every file, the tokenizer's included
    assert set(listed) == {p.relative_to(golden_package).as_posix() for p in golden_package.rglob("*")
                           if p.is_file()} - {MANIFEST_FILE}
    loaded = load_package(golden_package, progress=False)
    assert loaded.record.method == meta["method"] and loaded.tokenizer("ab")["input_ids"]
    copies = [p.name for p in (golden_package / "tokenizer").iterdir()]
    assert copies and all((golden_package / n).read_bytes() == (golden_package / "tokenizer" / n).read_bytes()
                          for n in copies)
    from transformers import AutoTokenizer  # the package folder itself is a tokenizer folder

    assert AutoTokenizer.from_pretrained(str(golden_package))("ab")["input_ids"] == loaded.tokenizer("ab")["input_ids"]
    assert f"compressed: {meta['method']}" in (golden_package / "README.md").read_text()


if __name__ == "__main__":  # print the digests to paste into GOLDEN
    import tempfile

    export_module.__version__ = "golden"
    with tempfile.TemporaryDirectory() as d:
        for rel, digest in digests(export_golden(Path(d) / "pkg")).items():
            print(f'    "{rel}": "{digest}",')
    sys.exit(0)
