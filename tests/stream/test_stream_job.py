"""Streamed quantize jobs write the very package the in-memory path writes (uqcit.stream.job)."""
from pathlib import Path

import pytest

from uqcit.core.keys import ConfigError
from uqcit.pipeline import Session, export_session
from uqcit.recipe import builtin_recipe
from uqcit.stages.quantize import QuantizeConfig
from uqcit.stream import compress_streamed

CALIB = dict(calib_samples=6, calib_seq_len=32)  # 6 = one full micro-batch of 4 and a short one


def in_memory(src: Path, recipe, out: Path) -> Path:
    session = Session.from_model(str(src), progress=False)
    session.run(recipe, skip=("eval",))
    export_session(session, out, recipe=recipe, model_name=str(src))
    return out


@pytest.mark.parametrize("family, recipe, quantize", [
    ("llama", "rtn-w4-g128", None),  # tied head: RTN once, stored once
    ("mistral", "rtn-w3-g128", QuantizeConfig(method="gptq", **CALIB)),  # untied head: GPTQ from the stream
    ("mistral", "uqcit-default", QuantizeConfig(method="gptq", sequential=True, importance="activation", **CALIB)),
])
def test_streamed_package_equals_in_memory_byte_for_byte(tmp_path, save_tiny, package_files, family, recipe, quantize):
    src = save_tiny(family, tmp_path / "src")
    recipe = builtin_recipe(recipe)
    if quantize is not None:
        recipe = recipe.with_stage(quantize)
    expected = package_files(in_memory(src, recipe, tmp_path / "memory"))
    report = compress_streamed(src, recipe, tmp_path / "streamed", progress=False)
    got = package_files(tmp_path / "streamed")
    assert sorted(got) == sorted(expected)
    assert [name for name in expected if got[name] != expected[name]] == []
    assert report.blocks == 4 and report.resumed_at == 0 and len(report.block_seconds) == 4
    assert not (tmp_path / ".streamed.stream").exists()  # the run folder goes once the package is in place


def test_a_stage_that_cannot_stream_is_refused_before_any_work(tmp_path, save_tiny):
    src = save_tiny("llama", tmp_path / "src")
    with pytest.raises(ConfigError, match=r"\['sensitivity', 'allocate'\] cannot run streamed"):
        compress_streamed(src, builtin_recipe("alloc-gptq-3.25"), tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="'signround' cannot run streamed"):
        compress_streamed(src, builtin_recipe("rtn-w4-g128").with_stage(QuantizeConfig(method="signround")),
                          tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_folder_without_safetensors_is_refused(tmp_path, save_tiny):
    src = save_tiny("llama", tmp_path / "src")
    (src / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        compress_streamed(src, builtin_recipe("rtn-w4-g128"), tmp_path / "out", progress=False)
