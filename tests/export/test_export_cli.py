"""``uqcit export PACKAGE --to {compressed-tensors,gguf,hf} --out DIR``: the three exports, one-line errors, exit 2."""
from __future__ import annotations

import json
import re

import pytest

from uqcit.cli import main
from uqcit.export.hf import ExportError


def _package(tmp_path_factory, bits: int, symmetric: bool) -> str:
    from uqcit.inputs.tiny import tiny_model
    from uqcit.package import export_package
    from uqcit.stages.levels import analyze_levels
    from uqcit.stages.plan import PlanConfig, build_plan
    from uqcit.stages.quantize import quantize_model

    model, tok = tiny_model("llama")
    levels = analyze_levels(model)
    plan = build_plan(levels, PlanConfig(preset="uniform", bits=bits, group_size=32, symmetric=symmetric))
    q = quantize_model(model, levels, plan, progress=False)
    return str(export_package(q, tok, tmp_path_factory.mktemp("pkg") / "package", source_model="tiny-llama"))


@pytest.fixture(scope="module")
def w4(tmp_path_factory) -> str:
    return _package(tmp_path_factory, 4, True)


@pytest.fixture(scope="module")
def w3(tmp_path_factory) -> str:
    return _package(tmp_path_factory, 3, False)


def _export(package: str, to: str, out, *extra: str) -> int:
    try:
        return main(["export", package, "--to", to, "--out", str(out), "--no-progress", *extra])
    except SystemExit as exc:  # argparse's own errors exit from parse_args
        return exc.code


def test_each_target_writes_its_folder(w4, tmp_path, capsys):
    assert _export(w4, "compressed-tensors", tmp_path / "ct") == 0
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert "28 layers as integer codes" in capsys.readouterr().out
    assert _export(w4, "gguf", tmp_path / "gguf") == 0
    assert (tmp_path / "gguf" / "model.gguf").read_bytes()[:4] == b"GGUF"
    assert "model.gguf: GGUF" in capsys.readouterr().out
    assert _export(w4, "hf", tmp_path / "hf") == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_widen_carries_3_bit_codes_in_4_bits(w3, tmp_path):
    assert _export(w3, "compressed-tensors", tmp_path / "ct", "--widen") == 0
    groups = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert {g["weights"]["num_bits"] for g in groups.values()} == {4}


@pytest.mark.parametrize("case", ["exists", "not a package", "3-bit", "widen for hf", "unknown target"])
def test_bad_input_is_one_line_and_exit_2(case, w3, tmp_path, capsys):
    out = tmp_path / "out"
    package, to, extra, word = {
        "exists": (w3, "hf", (), "already exists"),
        "not a package": (str(tmp_path), "hf", (), "not a UQCIT package"),
        "3-bit": (w3, "compressed-tensors", (), "w3-g32.*--widen"),
        "widen for hf": (w3, "hf", ("--widen",), "--widen is for --to compressed-tensors"),
        "unknown target": (w3, "onnx", (), "invalid choice"),
    }[case]
    if case == "exists":
        out.mkdir()
    code = _export(package, to, out, *extra)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("uqcit: error: ") and err.count("\n") == 1
    assert re.search(word, err), err
    assert out.exists() == (case == "exists")  # nothing written


def test_a_failed_gguf_export_leaves_no_folder(w4, tmp_path, monkeypatch, capsys):
    import uqcit.export

    def refuse(pkg, path):
        path.write_bytes(b"half")
        raise ExportError("tokenizer is not byte-level BPE")

    monkeypatch.setattr(uqcit.export, "export_gguf", refuse)
    assert _export(w4, "gguf", tmp_path / "gguf") == 2
    assert "byte-level BPE" in capsys.readouterr().err and not (tmp_path / "gguf").exists()

