"""The loader against hostile packages: a seeded mutator over tiny packages, and the issue's cases.

Every mutated package either loads and computes exactly what the original computes, or is
refused with a ``PackageError`` naming the file; nothing else escapes (the mutator and its
scale run live in ``benchmarks/fuzz_packages.py``; this runs a bounded sample of it).
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from uqcit.package import PackageError, load_package

_SPEC = importlib.util.spec_from_file_location(
    "fuzz_packages", Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz_packages.py")
fuzz = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fuzz)

KINDS = ("rtn-w4", "mixed-w2+fp16", "pruned", "compensated", "gpt2")
CASES = 120  # about 20 s on one busy core (the benchmark runs 10,000)


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    from uqcit.package.secure import load_public_key

    work = tmp_path_factory.mktemp("fuzz")
    pkgs = fuzz.build_packages(work, KINDS, signed=("rtn-w4",))
    return pkgs, fuzz.references_of(pkgs), load_public_key(work / "public.pem"), work


def _copy(packages, kind, tmp_path) -> Path:
    return Path(shutil.copytree(packages[0][kind], tmp_path / kind))


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def test_mutated_packages_load_identically_or_are_refused(packages, tmp_path):
    pkgs, refs, public, _ = packages
    records = [fuzz.run_case(pkgs, refs, tmp_path, seed, public, verify_every=10) for seed in range(CASES)]
    summary = fuzz.summarize(records, 0.0, planned=CASES)
    assert summary["raw_exceptions"] == 0 and summary["hangs"] == 0, summary["examples"]
    assert summary["silent_changes"] == 0, summary["examples"]["changed"]
    assert summary["flips_detected"] == summary["flips"] > 0
    assert summary["signed_refused"] == summary["signed_cases"] > 0
    assert summary["unverified_refused"] > CASES // 3  # the checks, not the manifest, refused these


def test_layer_strings_are_never_joined_into_paths(packages, tmp_path):
    pkg = _copy(packages, "rtn-w4", tmp_path)
    for bad in ("/etc", "outer/../../other-package/layers/layer_000", "layer_001"):
        _edit_json(pkg / "uqcit_metadata.json",
                   lambda d, bad=bad: d["modules"]["model.layers.0.mlp.up_proj"].update(layer=bad))
        with pytest.raises(PackageError, match=r"uqcit_metadata.json: modules.model.layers.0.mlp.up_proj.layer"):
            load_package(pkg, progress=False, verify=False)


def test_tied_to_only_where_the_architecture_ties(packages, tmp_path):
    pkg = _copy(packages, "rtn-w4", tmp_path)
    _edit_json(pkg / "uqcit_metadata.json",
               lambda d: d["modules"]["model.layers.1.mlp.up_proj"].update(tied_to="model.layers.0.mlp.up_proj"))
    with pytest.raises(PackageError, match="tied_to.*does not tie"):
        load_package(pkg, progress=False, verify=False)


def test_deleted_compensation_entry_is_refused(packages, tmp_path):
    pkg = _copy(packages, "compensated", tmp_path)
    meta = json.loads((pkg / "uqcit_metadata.json").read_text())
    name = next(n for n, e in meta["modules"].items() if e.get("compensation"))
    _edit_json(pkg / "uqcit_metadata.json", lambda d: d["modules"][name].pop("compensation"))
    with pytest.raises(PackageError, match="weights.safetensors: holds tensor.*compensation"):
        load_package(pkg, progress=False, verify=False)


def test_unlisted_rotation_is_never_applied(packages, tmp_path):
    pkg = _copy(packages, "rtn-w4", tmp_path)
    rot = {"model.layers.0.mlp.online_rotation.signs": torch.zeros(16, dtype=torch.uint8),
           "model.layers.0.mlp.online_rotation.layout": torch.tensor([2, 64])}
    save_file(rot, str(pkg / "layers" / "layer_000" / "rotation.safetensors"))
    with pytest.raises(PackageError, match="layer_000/rotation.safetensors: holds online rotations"):
        load_package(pkg, progress=False, verify=False)
    # listed in another layer's folder only: the unlisted file is ignored, outputs unchanged
    shutil.copy(pkg / "layers" / "layer_001" / "rotation.safetensors", pkg / "layers" / "layer_000")
    _edit_json(pkg / "uqcit_metadata.json", lambda d: d.update(online_rotations={}))
    save_file(rot, str(pkg / "layers" / "outer" / "rotation.safetensors"))
    assert torch.equal(fuzz.logits_of(load_package(pkg, progress=False, verify=False)), packages[1]["rtn-w4"])


def test_symlinks_and_fifos_are_refused(packages, tmp_path):
    pkg = _copy(packages, "rtn-w4", tmp_path)
    w = pkg / "layers" / "layer_002" / "weights.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(w, outside)
    w.symlink_to(outside)
    with pytest.raises(PackageError, match="layer_002/weights.safetensors: symbolic links"):
        load_package(pkg, progress=False)
    w.unlink()
    import os

    os.mkfifo(w)  # opening it would block forever
    with pytest.raises(PackageError, match="not a regular file"):
        load_package(pkg, progress=False)


@pytest.mark.parametrize("key,value,match", [
    ("vocab_size", 2**22, r"vocab_size must be an integer in \[1, 1048576\]"),
    ("vocab_size", 512, r"shape \[256, 64\] is not the \[512, 64\] config.json builds"),
    ("intermediate_size", 2**20, "shape"),
    ("hidden_act", "nope", "config.json: no LlamaForCausalLM can be built"),
    ("num_key_value_heads", 3, "config.json"),
    ("tie_word_embeddings", False, "tied_to.*does not tie"),
])
def test_config_is_checked_against_the_weights_before_allocating(packages, tmp_path, key, value, match):
    pkg = _copy(packages, "rtn-w4", tmp_path)
    _edit_json(pkg / "config.json", lambda d: d.update({key: value}))
    with pytest.raises(PackageError, match=match):
        load_package(pkg, progress=False, verify=False)


def test_mask_popcount_and_sparse_bounds_are_checked_before_the_forward(packages, tmp_path):
    pkg = _copy(packages, "mixed-w2+fp16", tmp_path)
    f = pkg / "layers" / "layer_001" / "weights.safetensors"
    tensors = load_file(str(f))
    mask_key = next(k for k in tensors if k.endswith(".mask"))
    tensors[mask_key][0] ^= 1  # one flipped bit: one high-precision weight too many or too few
    save_file(tensors, str(f))
    with pytest.raises(PackageError, match=f"layer_001/weights.safetensors: mask {mask_key}"):
        load_package(pkg, progress=False, verify=False)

    pkg = _copy(packages, "pruned", tmp_path)
    for f in (pkg / "layers").glob("*/weights.safetensors"):
        tensors = load_file(str(f))
        idx = [k for k in tensors if k.endswith(".indices")]
        if idx:
            tensors[idx[0]][-1] = torch.iinfo(tensors[idx[0]].dtype).max
            save_file(tensors, str(f))
            with pytest.raises(PackageError, match="indices must be increasing positions"):
                load_package(pkg, progress=False, verify=False)
            return
    pytest.fail("the pruned package stores no index list")


def test_wrong_types_in_metadata_name_the_key(packages, tmp_path):
    pkg = _copy(packages, "gpt2", tmp_path)
    for edit, match in ((lambda d: d.update(modules=[]), "key 'modules' must be object"),
                        (lambda d: d.update(average_bits_per_param="4"), "average_bits_per_param"),
                        (lambda d: d["float_tensors"].update({"transformer.ln_f.weight": 3}),
                         "float_tensors.transformer.ln_f.weight must be an object")):
        shutil.copy(packages[0]["gpt2"] / "uqcit_metadata.json", pkg / "uqcit_metadata.json")
        _edit_json(pkg / "uqcit_metadata.json", edit)
        with pytest.raises(PackageError, match=match):
            load_package(pkg, progress=False, verify=False)
