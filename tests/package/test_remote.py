"""The package itself in transformers: ``AutoModelForCausalLM.from_pretrained(package, trust_remote_code=True)``.

Run in a fresh interpreter (transformers imports the package's own ``modeling_uqcit.py`` from its
modules cache, pointed at a temporary folder) on packages that hold mixed formats, online rotations,
low-rank compensation and pruned layers: the same logits as ``load_package``, and ``generate`` runs.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from uqcit.package import export_package, load_package
from uqcit.package.remote import MODELING_FILE, auto_map_of, from_pretrained, write_remote_code
from uqcit.package.secure.signing import verify_manifest

IDS = [[1, 2, 3, 40, 50, 60, 7]]


def _packages(root: Path) -> dict[str, Path]:
    from uqcit.inputs.tiny import tiny_model
    from uqcit.stages.compensate import CompensateConfig, compensate
    from uqcit.stages.levels import analyze_levels
    from uqcit.stages.plan import PlanConfig, build_plan
    from uqcit.stages.prune import PruneConfig, prune_model
    from uqcit.stages.quantize import quantize_model
    from uqcit.stages.rotation import RotationConfig, rotate_model

    model, tok = tiny_model("llama")
    levels = analyze_levels(model)
    mixed = quantize_model(model, levels, build_plan(levels, PlanConfig()), progress=False)  # binary concentration
    w3 = quantize_model(model, levels, build_plan(levels, PlanConfig(preset="uniform", bits=3, group_size=32)),
                        progress=False)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    rotated = rotate_model(model, RotationConfig(), progress=False).model
    rot_levels = analyze_levels(rotated)
    results = {
        "mixed": mixed,
        "compensated": compensate(w3, model, levels, CompensateConfig(rank=4), calibration=calib, progress=False),
        "rotated": quantize_model(rotated, rot_levels, build_plan(rot_levels, PlanConfig(
            preset="uniform", bits=4, group_size=32, symmetric=True)), progress=False),
        "pruned": prune_model(model, levels, PruneConfig(), progress=False),
    }
    return {name: export_package(res, tok, root / name, source_model="tiny-llama") for name, res in results.items()}


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, Path]:
    return _packages(tmp_path_factory.mktemp("remote"))


# A fresh interpreter: what a transformers user runs. Last, the workbench is made unimportable, as on a
# machine without it, and the error of loading the first package again is recorded.
_TRANSFORMERS_LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
ids = torch.tensor(json.loads(sys.argv[1]))
out = {}
for path in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, progress=False)
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(**tok("ab", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    out[path] = {"logits": logits, "class": type(model).__name__, "generated": generated.shape[1]}
sys.modules.update({name: None for name in [*sys.modules, "uqcit"] if name.split(".")[0] == "uqcit"})
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[2], trust_remote_code=True)
except ImportError as exc:
    out["without uqcit"] = str(exc)
torch.save(out, "result.pt")
"""


def test_transformers_loads_every_kind_of_package_with_the_package_logits(packages, tmp_path):
    meta = {name: load_package(path, progress=False) for name, path in packages.items()}
    assert meta["rotated"].metadata.get("online_rotations")  # what the cases are meant to cover
    assert any(e.get("compensation") for e in meta["compensated"].metadata["modules"].values())
    assert {e["kind"] for e in meta["pruned"].metadata["modules"].values()} == {"masked_linear"}
    assert len({e["format"] for e in meta["mixed"].metadata["modules"].values()}) > 1
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HOME": str(tmp_path / "hf")}
    subprocess.run([sys.executable, "-c", _TRANSFORMERS_LOAD, json.dumps(IDS), *map(str, packages.values())],
                   check=True, env=env, cwd=tmp_path, timeout=300)
    got = torch.load(tmp_path / "result.pt")
    for name, path in packages.items():
        with torch.no_grad():
            ref = meta[name].model(torch.tensor(IDS)).logits
        # Same logits up to float summation order (the child runs 1 thread, the suite may run 2).
        torch.testing.assert_close(got[str(path)]["logits"], ref, rtol=1e-5, atol=1e-5, msg=name)
        assert got[str(path)]["class"] == "LlamaForCausalLM" and got[str(path)]["generated"] == 2 + 4
    # without the workbench: one line naming the pip package
    assert "pip install uqcit-workbench" in got["without uqcit"] and "\n" not in got["without uqcit"]


def test_the_entry_point_is_in_the_package_and_covered_by_its_manifest(packages):
    path = packages["mixed"]
    assert auto_map_of(path) == {"AutoModelForCausalLM": "modeling_uqcit.UqcitModel"}
    shipped = Path(__file__).resolve().parents[2] / "uqcit" / "package" / MODELING_FILE
    assert (path / MODELING_FILE).read_bytes() == shipped.read_bytes()
    assert MODELING_FILE in verify_manifest(path)
    model = load_package(path, progress=False).model
    assert not hasattr(model.config, "auto_map")  # exports of the loaded model do not point at a missing file


def test_a_hub_id_is_downloaded_whole_then_loaded(packages, monkeypatch, tmp_path):
    import huggingface_hub

    asked = {}

    def snapshot_download(repo_id, **kwargs):
        asked.update(kwargs, repo_id=repo_id)
        return str(packages["mixed"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = from_pretrained("someone/tiny-package", revision="abc", token=None, trust_remote_code=True,
                            config=object(), _from_auto=True, progress=False)
    assert asked == {"repo_id": "someone/tiny-package", "revision": "abc"}
    assert type(model).__name__ == "LlamaForCausalLM"
    with pytest.raises(NotImplementedError, match="uqcit export PACKAGE --to hf"):  # says what to use instead
        model.save_pretrained(tmp_path / "saved")


@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": torch.int8}, r"dtype torch.int8: a package loads in torch.float32, torch.bfloat16"),
    ({"torch_dtype": "complex64"}, r"dtype torch.complex64: a package loads in"),
    ({"device_map": "auto"}, r"device_map='auto': a UQCIT package loads whole on one device"),
    ({"device_map": {"": 0}}, r"device_map=\{'': 0\}: a UQCIT package loads whole on one device"),
    ({"device_map": "npu"}, r"device 'npu': torch knows no such device"),
    ({"attn_implementation": "sdpa"}, r"\['attn_implementation'\].*'secret'"),
])
def test_options_it_cannot_honour_are_refused_by_name(packages, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        from_pretrained(packages["mixed"], trust_remote_code=True, **kwargs)



def test_dtype_and_device_map_go_to_load_package(packages):
    ids = torch.tensor(IDS)
    cases = {"compensated": {"dtype": "bfloat16", "device_map": "cpu"}, "rotated": {"torch_dtype": torch.bfloat16}}
    for name, kwargs in cases.items():  # low-rank factors, scales and online rotations computed in bfloat16
        model = from_pretrained(packages[name], trust_remote_code=True, progress=False, **kwargs)
        with torch.no_grad():
            got, want = model(ids).logits, load_package(packages[name], progress=False).model(ids).logits
        assert got.dtype == torch.bfloat16
        # 2% of the largest logit: 5 bfloat16 steps (see test_package's bfloat16 test)
        assert (got.float() - want).abs().max() <= 0.02 * want.abs().max(), name
    auto = from_pretrained(packages["rotated"], dtype="auto", device_map=torch.device("cpu"), progress=False)
    with torch.no_grad():
        assert torch.equal(auto(ids).logits, want)  # "auto" is the float32 load


def test_a_masked_lm_package_maps_its_own_auto_class(tmp_path):
    from uqcit.inputs.tiny import tiny_model
    from uqcit.stages.levels import analyze_levels
    from uqcit.stages.plan import PlanConfig, build_plan
    from uqcit.stages.quantize import quantize_model

    model, tok = tiny_model("bert")
    levels = analyze_levels(model)
    q = quantize_model(model, levels, build_plan(levels, PlanConfig(preset="uniform", group_size=32)), progress=False)
    path = export_package(q, tok, tmp_path / "pkg", source_model="tiny-bert")
    assert auto_map_of(path) == {"AutoModelForMaskedLM": "modeling_uqcit.UqcitModel"}
    got = from_pretrained(path, progress=False)
    with torch.no_grad():
        assert torch.equal(got(torch.tensor(IDS)).logits, q.model(torch.tensor(IDS)).logits)


def test_a_model_no_auto_class_builds_gets_no_entry_point(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {"AutoModel": "x.Y"}}))
    (tmp_path / "uqcit_metadata.json").write_text(json.dumps({"model_class": "SomethingElse"}))
    (tmp_path / MODELING_FILE).write_text("")
    assert write_remote_code(tmp_path) is None
    assert auto_map_of(tmp_path) == {} and not (tmp_path / MODELING_FILE).exists()
