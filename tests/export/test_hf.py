"""The dequantized export: a plain transformers checkpoint that loads without uqcit."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from uqcit.export.hf import ExportError, export_dequantized
from uqcit.package import LoadedPackage, export_package, load_package
from uqcit.runtime.modules import Compensation, QuantLinear
from uqcit.tensor.formats import QuantFormat
from uqcit.tensor.quant import quantize

IDS = torch.tensor([[1, 2, 3, 40, 50, 60, 7]])


def _package(tmp_path_factory, symmetric: bool = False) -> LoadedPackage:
    from uqcit.inputs.tiny import tiny_model
    from uqcit.stages.levels import analyze_levels
    from uqcit.stages.plan import PlanConfig, build_plan
    from uqcit.stages.quantize import quantize_model

    model, tok = tiny_model("llama")
    levels = analyze_levels(model)
    plan = build_plan(levels, PlanConfig(preset="uniform", bits=4, group_size=32, symmetric=symmetric))
    q = quantize_model(model, levels, plan, progress=False)
    path = export_package(q, tok, tmp_path_factory.mktemp("pkg") / "package", source_model="tiny-llama")
    return load_package(path, progress=False)


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> LoadedPackage:
    return _package(tmp_path_factory)


# Run in a fresh interpreter that never imports uqcit: the checkpoint must stand on its own.
_PLAIN_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
with torch.no_grad():
    logits = model(torch.tensor([[1, 2, 3, 40, 50, 60, 7]])).logits
torch.save({"logits": logits, "ids": tok("hello world").input_ids,
            "uqcit": sorted(m for m in sys.modules if m.split(".")[0] == "uqcit")}, sys.argv[2])
"""


def test_plain_transformers_gives_the_package_logits(package, tmp_path):
    out = export_dequantized(package.path, tmp_path / "hf")  # from the path: loaded and verified
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    result = tmp_path / "result.pt"
    subprocess.run([sys.executable, "-c", _PLAIN_LOAD, str(out), str(result)], check=True,
                   env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=120)
    got = torch.load(result)
    assert got["uqcit"] == []
    with torch.no_grad():
        ref = package.model(IDS).logits
    torch.testing.assert_close(got["logits"], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert got["ids"] == package.tokenizer("hello world").input_ids


def _plain(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out).eval()


def test_compensation_folds_into_the_weight(package, tmp_path):
    model = copy.deepcopy(package.model)
    layer = model.model.layers[1].self_attn.o_proj
    assert isinstance(layer, QuantLinear)
    gen = torch.Generator().manual_seed(0)
    fp16 = QuantFormat(bits=16)
    comp = Compensation(a=quantize(0.05 * torch.randn(64, 4, generator=gen), fp16),
                        b=quantize(0.05 * torch.randn(4, 64, generator=gen), fp16),
                        scale=(1 + 0.1 * torch.randn(64, generator=gen)).to(torch.float16))
    layer.set_compensation(comp)
    loaded = LoadedPackage(model, package.tokenizer, package.metadata, package.path, 0.0)
    with torch.no_grad():
        ref, before = model(IDS).logits, package.model(IDS).logits
        got = _plain(export_dequantized(loaded, tmp_path / "hf"))(IDS).logits
    assert (ref - before).abs().max() > 1e-3  # the compensation matters
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))  # and it was folded, up to float32 rounding


def test_a_shift_without_a_bias_is_refused(package, tmp_path):
    model = copy.deepcopy(package.model)
    model.model.layers[0].mlp.down_proj.set_compensation(Compensation(shift=torch.ones(64, dtype=torch.float16)))
    loaded = LoadedPackage(model, package.tokenizer, package.metadata, package.path, 0.0)
    with pytest.raises(ExportError, match="down_proj.*shift.*no bias"):
        export_dequantized(loaded, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_online_rotations_are_refused_naming_the_way_out(package, tmp_path):
    meta = {**package.metadata, "online_rotations": {"layer_000": ["model.layers.0.mlp.rotation"]}}
    loaded = LoadedPackage(package.model, package.tokenizer, meta, package.path, 0.0)
    with pytest.raises(ExportError, match="online rotations.*without an online rotation.*load_package"):
        export_dequantized(loaded, tmp_path / "hf")


def test_an_existing_folder_is_not_overwritten(package, tmp_path):
    (tmp_path / "hf").mkdir()
    with pytest.raises(FileExistsError):
        export_dequantized(package, tmp_path / "hf")


def test_an_untied_output_layer_is_kept(package, tmp_path):
    model = copy.deepcopy(package.model)
    assert model.config.tie_word_embeddings
    model.lm_head = QuantLinear(quantize(torch.randn(256, 64, generator=torch.Generator().manual_seed(1)),
                                         QuantFormat(bits=4, group_size=32)))
    loaded = LoadedPackage(model, package.tokenizer, package.metadata, package.path, 0.0)
    with torch.no_grad():
        ref = model(IDS).logits
        plain = _plain(export_dequantized(loaded, tmp_path / "hf"))
        got = plain(IDS).logits
    assert not plain.config.tie_word_embeddings
    # the package's few-token forward runs the packed kernel: equal to float32 rounding, not bit for bit
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
