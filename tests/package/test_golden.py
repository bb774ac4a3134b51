"""Golden bytes of a tiny package (safetensors' test_simple.py habit): a format change is a decision.

A tiny llama (``tiny_model``, seed 0) quantized with a fixed uniform plan (RTN, 4 bits, groups
of 32) is exported, and the SHA-256 of every file is compared with the digests pinned below.
Any change to what a package holds or how it is written (a key, a tensor name, a dtype, JSON
layout, safetensors header metadata) fails here; if the change is meant, bump
``FORMAT_VERSION`` where readers need to know, and paste the new digests (``python
tests/package/test_golden.py`` prints them).

What is not hashed byte for byte, and why:

- ``uqcit_metadata.json``: hashed without ``created`` (the local time of the export) and with
  ``uqcit_version`` fixed to ``golden`` (a release bump is not a format change). ``created``
  always has the same length, so ``package_bytes`` stays exact.
- ``config.json``: hashed without ``transformers_version``, which transformers writes itself.
- ``tokenizer/``: written by ``tokenizer.save_pretrained``, transformers' format, not ours;
  checked only to be present and to load.
- ``*.safetensors``: hashed with the JSON header's keys sorted. The safetensors library writes
  the header's ``__metadata__`` from a hash map, so its key order changes from one process to
  the next (packages are not byte-reproducible there); every name, dtype, shape, offset,
  metadata value and data byte is hashed.
- ``rel_error``/``sqnr_db`` in ``precision_map.json`` and ``noise_profile.json`` are float32
  sums whose last bits depend on the CPU's vector width; they are hashed rounded to 6
  significant digits (everything else in those files exactly).

The weights themselves are exact: the tiny model's init (torch's seeded normal_) and RTN
(min/max, elementwise rounding) involve no reduction order. Digests hold for the pinned
dependency set (constraints.txt) on x86-64.
"""
import hashlib
import json
import re
import sys
from pathlib import Path

import pytest

from uqcit.core.io import to_json
from uqcit.inputs.tiny import tiny_model
from uqcit.package import PackageMetadata, export_package, load_package, package_bytes, read_metadata
from uqcit.package import export as export_module
from uqcit.stages.levels import analyze_levels
from uqcit.stages.plan import PlanConfig, build_plan
from uqcit.stages.quantize import quantize_model

MEASURED = ("rel_error", "sqnr_db")  # float32 sums: compared to 6 significant digits
VOLATILE = {"uqcit_metadata.json": ("created",), "config.json": ("transformers_version",)}

GOLDEN = {
    "config.json": "5ecf3b998b3d2b16da5380ae07f9f764aea95f13cf91a95f68c0692bafcc5ffe",
    "layers/layer_000/ghz_clusters.json": "6e8c24b665329c7c08b13e6ccc652c808884abf6b5991ed0162488735110c493",
    "layers/layer_000/precision_map.json": "4c3bf523fbb370863a954fd7a1d4966016b69df336c6dac84db395ae9115696c",
    "layers/layer_000/rotation.safetensors": "f2d59e2782a88368ab2d7275891d7f501e4195cd6d2cb26ef61edd1bac152089",
    "layers/layer_000/weights.safetensors": "49c8981a7a4eb3ecddb68937725fb6a989694dd3e518646e9d6178edd4851901",
    "layers/layer_001/ghz_clusters.json": "6e8c24b665329c7c08b13e6ccc652c808884abf6b5991ed0162488735110c493",
    "layers/layer_001/precision_map.json": "7882a461ac3ef3469fa58b6d16e1149b86412dfee59cb390a54e93cb8396a443",
    "layers/layer_001/rotation.safetensors": "f2d59e2782a88368ab2d7275891d7f501e4195cd6d2cb26ef61edd1bac152089",
    "layers/layer_001/weights.safetensors": "829ba74ebd16236be12c58e567ac0d30a88a913856cf4e9b7462b80e000de24d",
    "layers/layer_002/ghz_clusters.json": "6e8c24b665329c7c08b13e6ccc652c808884abf6b5991ed0162488735110c493",
    "layers/layer_002/precision_map.json": "7d3669746712d34850c22aad571636b3d41babc97c4ee3646aa5bd68b7fc4b0c",
    "layers/layer_002/rotation.safetensors": "f2d59e2782a88368ab2d7275891d7f501e4195cd6d2cb26ef61edd1bac152089",
    "layers/layer_002/weights.safetensors": "8d5af4ffb8f5183b333bcf4a302e57f83d97b1e9ca434c2e4ac0c46fd28ccb60",
    "layers/layer_003/ghz_clusters.json": "6e8c24b665329c7c08b13e6ccc652c808884abf6b5991ed0162488735110c493",
    "layers/layer_003/precision_map.json": "0c8048a9bf64079358cf9fad0bbb6319ab6be71cb7f96c60a7f3154ffcee3218",
    "layers/layer_003/rotation.safetensors": "f2d59e2782a88368ab2d7275891d7f501e4195cd6d2cb26ef61edd1bac152089",
    "layers/layer_003/weights.safetensors": "a15ebc52e06c038f81b06b88ff7b10f14542c1fa692edc704c88ee898a86e440",
    "layers/outer/ghz_clusters.json": "6e8c24b665329c7c08b13e6ccc652c808884abf6b5991ed0162488735110c493",
    "layers/outer/precision_map.json": "d743ad6e68f9e3375224e6fbd4c34eca6bbe91bfbdfc076ea59128f031db4f47",
    "layers/outer/rotation.safetensors": "f2d59e2782a88368ab2d7275891d7f501e4195cd6d2cb26ef61edd1bac152089",
    "layers/outer/weights.safetensors": "047b602d3c04b5b0b29cf1d4d27d1e452e56547db6c58ff3451ceee780f92b5b",
    "uqcit_metadata.json": "1d1cda45b6b0c5220f33f44d64dac073c9ee70c74aed5c7c6ee220d25da7d2b8",
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
    return export_package(q, tok, out, source_model="tiny-llama")


def _round_measured(data):
    if isinstance(data, dict):
        return {k: (float(f"{v:.6g}") if k in MEASURED and isinstance(v, float) else _round_measured(v))
                for k, v in data.items()}
    if isinstance(data, list):
        return [_round_measured(v) for v in data]
    return data


def _canonical_safetensors(data: bytes) -> bytes:
    """The file with its JSON header's keys sorted: safetensors writes ``__metadata__`` from a
    hash map, so its key order differs from one process to the next; names, dtypes, shapes,
    offsets, metadata values and every data byte are kept."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    return to_json(header, indent=None).encode() + b"\n" + data[8 + n:]


def digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file but the tokenizer's, canonicalized as the module docstring says."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("tokenizer/"):
            continue
        data = path.read_bytes()
        if rel.endswith(".safetensors"):
            data = _canonical_safetensors(data)
        elif rel in VOLATILE or rel.endswith(("precision_map.json", "noise_profile.json")):
            doc = json.loads(data)
            for key in VOLATILE.get(rel, ()):
                doc.pop(key)
            data = (to_json(_round_measured(doc)) + "\n").encode()
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


@pytest.fixture()
def golden_package(tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "__version__", "golden")
    return export_golden(tmp_path / "pkg")


def test_tiny_package_files_are_the_pinned_bytes(golden_package):
    got = digests(golden_package)
    changed = sorted(rel for rel in set(got) | set(GOLDEN) if got.get(rel) != GOLDEN.get(rel))
    assert not changed, (f"package format changed in {changed}: if meant, bump FORMAT_VERSION where "
                         "readers need it and paste the new digests (python tests/package/test_golden.py)")


def test_golden_package_is_complete_and_its_volatile_parts_are_what_the_docstring_says(golden_package):
    meta = read_metadata(golden_package)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", meta["created"])  # fixed length
    assert meta["uqcit_version"] == "golden" and meta["package_bytes"] == package_bytes(golden_package)
    assert PackageMetadata.from_dict(meta).to_dict() == meta  # the typed record holds every key
    assert (golden_package / "tokenizer").is_dir()
    loaded = load_package(golden_package, progress=False)
    assert loaded.record.method == meta["method"] and loaded.tokenizer("ab")["input_ids"]


if __name__ == "__main__":  # print the digests to paste into GOLDEN
    import tempfile

    export_module.__version__ = "golden"
    with tempfile.TemporaryDirectory() as d:
        for rel, digest in digests(export_golden(Path(d) / "pkg")).items():
            print(f'    "{rel}": "{digest}",')
    sys.exit(0)
