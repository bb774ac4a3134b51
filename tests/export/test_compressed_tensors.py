"""The compressed-tensors export, read back by transformers and compressed-tensors alone (no uqcit)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from uqcit.export.compressed_tensors import export_compressed_tensors, pack_rows, zero_point_codes
from uqcit.export.hf import ExportError, dequantized_state
from uqcit.package import LoadedPackage, export_package, load_package
from uqcit.runtime.modules import Compensation, QuantLinear
from uqcit.tensor.formats import parse_format
from uqcit.tensor.quant import dequantize, quantize

IDS = torch.tensor([[1, 2, 3, 40, 50, 60, 7]])
# Mixed plans: every width compressed-tensors carries, groups of 16/32/64, groups of 96 that span
# rows (carried as groups of 32), zero points stored as fp16 and as packed integers (-iz), a float
# layer; the tiny llama's rows are 64 (attention, up/gate) and 128 (down) wide.
SYM = ("w4-g32-sym", {"re:.*q_proj": "w8-g32-sym", "re:.*k_proj": "w2-g16-sym", "re:.*mlp\\..*": "w4-g64-sym",
                      "model.layers.1.self_attn.o_proj": "fp16"})
ASYM = ("w4-g32", {"re:.*q_proj": "w8-g32", "re:.*k_proj": "w3-g16", "re:.*v_proj": "w2-g32-sym",
                   "re:.*o_proj": "w2-g96", "re:.*mlp\\..*": "w4-g64-iz"})


def _package(tmp_path_factory, default: str, overrides: dict[str, str]) -> LoadedPackage:
    from uqcit.inputs.tiny import tiny_model
    from uqcit.stages.levels import analyze_levels
    from uqcit.stages.plan import PlanConfig, build_plan
    from uqcit.stages.quantize import quantize_model

    model, tok = tiny_model("llama")
    levels = analyze_levels(model)
    fmt = parse_format(default)
    plan = build_plan(levels, PlanConfig(preset="uniform", bits=fmt.bits, group_size=fmt.group_size,
                                         symmetric=fmt.symmetric, overrides=overrides))
    q = quantize_model(model, levels, plan, progress=False)
    return load_package(export_package(q, tok, tmp_path_factory.mktemp("pkg") / "package",
                                       source_model="tiny-llama"), progress=False)


@pytest.fixture(scope="module")
def sym(tmp_path_factory) -> LoadedPackage:
    return _package(tmp_path_factory, *SYM)


@pytest.fixture(scope="module")
def asym(tmp_path_factory) -> LoadedPackage:
    return _package(tmp_path_factory, *ASYM)


# A fresh interpreter that never imports uqcit: (1) plain from_pretrained of the symmetric export,
# (2) compressed-tensors' own decompressor on every layer of the asymmetric export (transformers 5.23
# cannot load asymmetric pack-quantized checkpoints compressed: it makes the zero-point parameter
# unpacked on the meta device), (3) the loader that can, dequantize=True, on a one-format export.
_PLAIN = """
import json, sys, torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig
sym, asym, uniform, result = sys.argv[1:]
ids = torch.tensor([[1, 2, 3, 40, 50, 60, 7]])
model = AutoModelForCausalLM.from_pretrained(sym).eval()
with torch.no_grad():
    out = {"sym_logits": model(ids).logits}  # the first forward decompresses the layers
out["sym_weights"] = {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
config = QuantizationConfig.model_validate(json.load(open(f"{asym}/config.json"))["quantization_config"])
state, out["asym_weights"] = load_file(f"{asym}/model.safetensors"), {}
for scheme in config.config_groups.values():
    for name in scheme.targets:
        layer = {k[len(name) + 1:]: v for k, v in state.items() if k.rsplit(".", 1)[0] == name}
        layer["weight_scale"] = layer["weight_scale"].float()  # as loading into a float32 model casts it
        out["asym_weights"][name] = BaseCompressor.get_value_from_registry(config.format).decompress(
            layer, scheme)["weight"]
model = AutoModelForCausalLM.from_pretrained(uniform, quantization_config=CompressedTensorsConfig(dequantize=True))
with torch.no_grad():
    out["uniform_logits"] = model.eval()(ids).logits
out["uqcit"] = sorted(m for m in sys.modules if m.split(".")[0] == "uqcit")
torch.save(out, result)
"""


def test_transformers_and_compressed_tensors_alone_give_the_package_weights_and_logits(
        sym, asym, tmp_path, tmp_path_factory):
    got_sym = export_compressed_tensors(sym.path, tmp_path / "sym")  # from the path: loaded and verified
    got_asym = export_compressed_tensors(asym, tmp_path / "asym", widen=True)
    uniform = _package(tmp_path_factory, "w4-g32", {})
    export_compressed_tensors(uniform, tmp_path / "uniform")
    assert got_sym.formats["model.layers.0.self_attn.k_proj"] == "w2-g16-sym"
    assert got_sym.bits["model.layers.0.self_attn.k_proj"] == 2 and got_asym.bits["model.layers.0.self_attn.k_proj"] == 4
    assert got_asym.group_size["model.layers.0.self_attn.o_proj"] == 32  # gcd(96, 64)
    assert set(got_sym.dense) == {"lm_head", "model.layers.1.self_attn.o_proj"}
    config = json.loads((tmp_path / "sym" / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["format"], config["ignore"]) == (
        "compressed-tensors", "pack-quantized", ["lm_head", "model.layers.1.self_attn.o_proj"])
    assert {(g["weights"]["num_bits"], g["weights"]["group_size"]) for g in config["config_groups"].values()} == {
        (2, 16), (4, 32), (4, 64), (8, 32)}
    assert {"tokenizer.json", "generation_config.json"} <= {p.name for p in (tmp_path / "sym").iterdir()}

    result = tmp_path / "result.pt"
    subprocess.run([sys.executable, "-c", _PLAIN, *(str(tmp_path / n) for n in ("sym", "asym", "uniform")),
                    str(result)], check=True, timeout=300,
                   env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    got = torch.load(result)
    assert got["uqcit"] == []
    with torch.no_grad():
        ref_sym, ref_uniform = sym.model(IDS).logits, uniform.model(IDS).logits
    torch.testing.assert_close(got["sym_logits"], ref_sym, rtol=1e-5, atol=1e-5 * float(ref_sym.abs().max()))  # the packed kernel vs F.linear
    sym_state = dequantized_state(sym.model)
    assert got["sym_weights"].keys() == set(got_sym.formats) | set(got_sym.dense)
    for name, weight in got["sym_weights"].items():  # codes and dense layers alike: bit for bit
        assert torch.equal(weight, sym_state[f"{name}.weight"]), name
    asym_layers = {n: m.qtensor for n, m in asym.model.named_modules() if isinstance(m, QuantLinear)}
    assert got["asym_weights"].keys() == got_asym.formats.keys()
    for name, weight in got["asym_weights"].items():  # zero points, widened codes, row-spanning groups: exact
        assert torch.equal(weight, dequantize(asym_layers[name])), name
    # dequantize=True computes in the checkpoint's fp16 scale dtype: within fp16 rounding of the weights
    torch.testing.assert_close(got["uniform_logits"], ref_uniform, rtol=0, atol=1e-3)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("cols", [5, 32, 70])
def test_rows_pack_as_compressed_tensors_packs_them(bits, cols):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = torch.randint(0, 1 << bits, (6, cols), generator=torch.Generator().manual_seed(bits * cols))
    signed = (codes - (1 << (bits - 1))).to(torch.int8)  # compressed-tensors packs signed codes
    assert torch.equal(pack_rows(codes, bits), pack_to_int32(signed, bits))
    assert torch.equal(pack_rows(codes.T, bits).T, pack_to_int32(signed, bits, packed_dim=0))  # zero points


def test_zero_points_are_the_stored_integers_however_stored():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    fp16, packed = quantize(w, parse_format("w4-g32")), quantize(w, parse_format("w4-g32-iz"))
    assert torch.equal(zero_point_codes(fp16).to(torch.float16), fp16.tensors["zeros"])
    assert torch.equal(zero_point_codes(packed), zero_point_codes(fp16)) and zero_point_codes(fp16).dtype == torch.int32


def _swap(pkg: LoadedPackage, name: str, module) -> LoadedPackage:
    model = copy.deepcopy(pkg.model)
    parent, leaf = name.rsplit(".", 1)
    setattr(model.get_submodule(parent), leaf, module)
    return LoadedPackage(model, pkg.tokenizer, pkg.metadata, pkg.path, 0.0)


def _with_comp(pkg: LoadedPackage) -> LoadedPackage:
    model = copy.deepcopy(pkg.model)
    model.model.layers[0].mlp.down_proj.set_compensation(Compensation(scale=torch.ones(64, dtype=torch.float16)))
    return LoadedPackage(model, pkg.tokenizer, pkg.metadata, pkg.path, 0.0)


def _rotated(pkg: LoadedPackage) -> LoadedPackage:
    meta = {**pkg.metadata, "online_rotations": {"layer_000": ["model.layers.0.mlp.rotation"]}}
    return LoadedPackage(pkg.model, pkg.tokenizer, meta, pkg.path, 0.0)


REFUSED = {  # case -> (package change, words the error must hold, in order)
    "3-bit": (lambda p: p, r"k_proj \(w3-g16\).*widen=True.*gguf.*export_dequantized"),
    "salient mask": (lambda p: _swap(p, "model.layers.0.mlp.up_proj", QuantLinear(quantize(
        torch.randn(128, 64), parse_format("w4-g32+w16@0.1")))), r"up_proj \(w4-g32\+w16@0.1\).*hf export"),
    "compensation": (_with_comp, r"down_proj \(w4-g64-iz\).*compensation.*hf export"),
    "vector codebook": (lambda p: _swap(p, "model.layers.0.mlp.up_proj", QuantLinear(quantize(
        torch.randn(128, 64), parse_format("w2-g32-vq4")))), r"up_proj \(w2-g32-vq4\).*4 weights.*codebook of 256 "
                                                              r"fitted points.*hf export"),
    "online rotation": (_rotated, r"online rotations.*compressed-tensors checkpoint"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_compressed_tensors_cannot_hold_is_refused_naming_the_layer_and_the_way_out(asym, case, tmp_path):
    change, words = REFUSED[case]
    with pytest.raises(ValueError, match=words) as err:
        export_compressed_tensors(change(asym), tmp_path / "ct", widen=case != "3-bit")
    assert isinstance(err.value, ExportError) and "\n" not in str(err.value)
    assert not (tmp_path / "ct").exists() and not list(tmp_path.iterdir())


def test_an_existing_folder_is_not_overwritten(sym, tmp_path):
    (tmp_path / "ct").mkdir()
    with pytest.raises(FileExistsError):
        export_compressed_tensors(sym, tmp_path / "ct")


def test_a_layer_that_is_no_linear_in_its_architecture_is_refused(tmp_path):
    from uqcit.inputs.tiny import tiny_model
    from uqcit.stages.levels import analyze_levels
    from uqcit.stages.plan import PlanConfig, build_plan
    from uqcit.stages.quantize import quantize_model

    model, tok = tiny_model("gpt2")  # GPT-2's projections are Conv1D (weight stored [in, out])
    levels = analyze_levels(model)
    q = quantize_model(model, levels, build_plan(levels, PlanConfig(preset="uniform", group_size=32)), progress=False)
    with pytest.raises(ExportError, match=r"c_attn \(w4-g32\) is a Conv1D in GPT2LMHeadModel.*hf export"):
        export_compressed_tensors(LoadedPackage(q.model, tok, {}, tmp_path / "pkg", 0.0), tmp_path / "ct")
