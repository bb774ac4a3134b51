"""Streamed quantize jobs write the very package the in-memory path writes (uqcit.stream.job)."""
import json
from pathlib import Path

import pytest

from uqcit.core.keys import ConfigError
from uqcit.pipeline import Session, export_session
from uqcit.recipe import builtin_recipe
from uqcit.stages.plan import PlanConfig
from uqcit.stages.quantize import QuantizeConfig
from uqcit.stream import compress_streamed

CALIB = dict(calib_samples=6, calib_seq_len=32)  # 6 = one full micro-batch of 4 and a short one
# Learned rounding on micro-batches of 2, 2 and 1 sequences: 5 steps drawn among them per block.
SIGNROUND = dict(method="signround", iters=5, micro_batch=2, calib_samples=5, calib_seq_len=32)
# Block linears at w3-g64-iz (learned by signround) but the mixed-format down projections and
# untied head (rounded to nearest on activation importance).
MIXED = PlanConfig(preset="uniform", bits=3, group_size=64, int_zeros=True,
                   overrides={r"re:.*mlp\.down_proj|lm_head": "w4-g128+w8@0.3"})


def in_memory(src: Path, recipe, out: Path) -> Session:
    session = Session.from_model(str(src), progress=False)
    session.run(recipe, skip=("eval",))
    export_session(session, out, recipe=recipe, model_name=str(src))
    return session


@pytest.mark.parametrize("family, recipe, stages", [
    ("llama", "rtn-w4-g128", ()),  # tied head: RTN once, stored once
    ("mistral", "rtn-w3-g128", (QuantizeConfig(method="gptq", **CALIB),)),  # untied head: GPTQ from the stream
    ("mistral", "uqcit-default", (QuantizeConfig(method="gptq", sequential=True, importance="activation", **CALIB),)),
    # signround-2.5's plan (w2-g64-iz blocks, w3-g128-iz embedding): every block linear learns its rounding
    ("llama", "signround-2.5", (QuantizeConfig(**SIGNROUND),)),  # tied head: the embedding rounded to nearest
    ("mistral", "signround-2.5", (QuantizeConfig(head_feedback=True, **SIGNROUND),)),  # no tied head to feed back
    # The tiny llama's head is tied: the embedding rounded by GPTQ against the head's inputs, the
    # stream of block inputs (float one-shot; quantized sequential and signround) through the final norm.
    ("llama", "gptq-4.25", (QuantizeConfig(method="gptq", head_feedback=True, **CALIB),)),
    ("llama", "gptq-4.25", (QuantizeConfig(method="gptq", sequential=True, head_feedback=True, **CALIB),)),
    ("llama", "signround-2.5", (QuantizeConfig(head_feedback=True, **SIGNROUND),)),  # on its micro-batches of 2
    ("mistral", "signround-2.5", (MIXED, QuantizeConfig(**{**SIGNROUND, "importance": "activation", "micro_batch": 4}))),
])
def test_streamed_package_equals_in_memory_byte_for_byte(tmp_path, save_tiny, package_files, family, recipe, stages):
    src = save_tiny(family, tmp_path / "src")
    recipe = builtin_recipe(recipe)
    for stage in stages:
        recipe = recipe.with_stage(stage)
    session = in_memory(src, recipe, tmp_path / "memory")
    expected = package_files(tmp_path / "memory")
    report = compress_streamed(src, recipe, tmp_path / "streamed", progress=False)
    got = package_files(tmp_path / "streamed")
    assert sorted(got) == sorted(expected)
    assert [name for name in expected if got[name] != expected[name]] == []
    assert report.blocks == 4 and report.resumed_at == 0 and len(report.block_seconds) == 4
    assert not (tmp_path / ".streamed.stream").exists()  # the run folder goes once the package is in place
    result, qcfg = session.results["quantize"], recipe.stage("quantize")
    fed = qcfg.head_feedback and family == "llama"  # a tied embedding rounded against the head's inputs
    if fed:
        assert [m.method for m in result.stored if m.kind == "embedding"] == ["gptq"]
    if qcfg.method == "signround":  # the blocks did learn their rounding
        assert len(result.rounding) == 4 and "learned" in {r.kept for r in result.rounding}
        # the embedding (and mixed formats): to nearest, or GPTQ with head feedback
        assert {m.method for m in result.stored} == {"signround", "gptq" if fed else "rtn"}
        assert json.loads(got["uqcit_metadata.json"])["method"].startswith("signround-")


def test_a_stage_that_cannot_stream_is_refused_before_any_work(tmp_path, save_tiny):
    src = save_tiny("llama", tmp_path / "src")
    with pytest.raises(ConfigError, match=r"\['sensitivity', 'allocate'\] cannot run streamed"):
        compress_streamed(src, builtin_recipe("alloc-gptq-3.25"), tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match=r"importance='activation' streams only with micro_batch=4"):
        compress_streamed(src, builtin_recipe("signround-2.5").with_stage(MIXED).with_stage(QuantizeConfig(
            **{**SIGNROUND, "importance": "activation"})), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.stream").exists()


def test_a_folder_without_safetensors_is_refused(tmp_path, save_tiny):
    src = save_tiny("llama", tmp_path / "src")
    (src / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        compress_streamed(src, builtin_recipe("rtn-w4-g128"), tmp_path / "out", progress=False)
