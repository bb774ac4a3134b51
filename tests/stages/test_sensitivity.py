import math

import pytest
import torch
import torch.nn.functional as F

from uqcit.core.config import StageConfig
from uqcit.inputs.corpus import calibration_batch
from uqcit.stages.levels import analyze_levels
from uqcit.stages.sensitivity import (
    SensitivityConfig,
    SensitivityResult,
    measure_sensitivity,
    resolve_formats,
)
from uqcit.inputs.tiny import tiny_model

# Small enough for a fast suite; 2 sequences so every cell has a standard error.
CFG = SensitivityConfig(formats=("w2", "w4", "w8", "fp16"), group_size=32, calib_samples=2, calib_seq_len=48,
                        batch_size=2)


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model("llama")
    return model, tok, analyze_levels(model)


@pytest.fixture(scope="module")
def measured(tiny):
    model, tok, levels = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = measure_sensitivity(model, tok, levels, CFG, progress=False)
    return res, before


def test_every_module_and_format_is_measured_and_ordered(measured, tiny):
    res, _ = measured
    _, _, levels = tiny
    assert res.modules == [e.name for e in levels.quantizable()]
    assert res.formats == ["w2-g32", "w4-g32", "w8-g32", "fp16"] and res.complete
    floor = max(res.floor_kl, 0.0)
    for m in res.modules:
        kl = res.row(m)
        assert kl["w8-g32"] < kl["w2-g32"], m
        assert abs(kl["fp16"]) < 1e-6  # fp16 of float32 weights moves the output by ~nothing
    # fp16 is measured once with every module in fp16 (fp16_joint): one value for all.
    assert len(set(res.table[:, 3].tolist())) == 1
    assert floor < 1e-6


def test_model_is_bit_identical_after_measurement(measured, tiny):
    res, before = measured
    model, _, _ = tiny
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert type(model.model.layers[0]).__name__ == "LlamaDecoderLayer"  # replay stand-ins removed
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied


def test_kl_agrees_with_a_direct_float64_computation(tiny):
    """The fp16-stored reference and the replayed blocks give the KL a direct pass gives."""
    model, tok, levels = tiny
    cfg = CFG.replace(modules=r"layers\.1\.self_attn\.o_proj$", formats=("w2",), fp16_joint=False)
    res = measure_sensitivity(model, tok, levels, cfg, progress=False)
    from uqcit.tensor.formats import QuantFormat
    from uqcit.tensor.quant import dequantize, quantize

    ids = calibration_batch(tok, n_samples=2, seq_len=48, seed=0)
    lin = model.model.layers[1].self_attn.o_proj
    with torch.no_grad():
        ref = F.log_softmax(model(ids).logits.double(), -1)
        saved = lin.weight.clone()
        lin.weight.copy_(dequantize(quantize(saved, QuantFormat(bits=2, group_size=32))))
        try:
            q = F.log_softmax(model(ids).logits.double(), -1)
        finally:
            lin.weight.copy_(saved)
    direct = float((ref.exp() * (ref - q)).sum(-1).mean())
    assert res.kl("model.layers.1.self_attn.o_proj", "w2-g32") == pytest.approx(direct, rel=1e-3, abs=1e-7)


def test_resumes_after_interruption_without_remeasuring(tiny, tmp_path):
    model, tok, levels = tiny
    cfg = CFG.replace(modules=r"layers\.[01]\.", formats=("w2", "w4"), flush_every=2)
    path = tmp_path / "sens.safetensors"
    seen: list[str] = []

    def stop_after_three(name, row):
        seen.append(name)
        if len(seen) == 3:
            raise KeyboardInterrupt  # a user pressing stop
    with pytest.raises(KeyboardInterrupt):
        measure_sensitivity(model, tok, levels, cfg, path=path, progress=False, callback=stop_after_three)
    partial = SensitivityResult.load(path)
    assert int(partial.measured.sum()) == 3  # the third was flushed on the way out
    rest: list[str] = []
    res = measure_sensitivity(model, tok, levels, cfg, path=path, progress=False,
                              callback=lambda name, row: rest.append(name))
    assert res.complete and not set(rest) & set(seen) and len(rest) == len(res.modules) - 3
    assert torch.equal(res.table[:3], partial.table[:3])
    # Nothing left to do: the file is read back and nothing is measured.
    again: list[str] = []
    assert torch.equal(measure_sensitivity(model, tok, levels, cfg, path=path, progress=False,
                                           callback=lambda n, r: again.append(n)).table, res.table)
    assert again == []
    # Other settings never mix with the file's measurements.
    with pytest.raises(ValueError, match="other settings.*seed"):
        measure_sensitivity(model, tok, levels, cfg.replace(seed=1), path=path, progress=False)


def test_file_round_trips_without_pickle(measured, tmp_path):
    res, _ = measured
    path = res.save(tmp_path / "s.safetensors")
    back = SensitivityResult.load(path)
    assert back.modules == res.modules and back.formats == res.formats and back.numel == res.numel
    assert torch.equal(back.table, res.table) and torch.equal(back.sem, res.sem)
    assert back.meta == res.meta
    with open(path, "rb") as f:
        assert b"pickle" not in f.read(4096).lower()
    with pytest.raises(ValueError, match="not a sensitivity file"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        SensitivityResult.load(tmp_path / "other.safetensors")


def test_views_config_and_errors(measured):
    res, _ = measured
    fig = res.figure()
    assert fig.data[0].uid == "sensitivity-heatmap"
    assert all(t.uid for t in res.layer_figure().data)
    d = res.to_dict()
    assert len(d["kl"]) == len(res.modules) and "floor_kl" in d["meta"]
    assert "modules" in res.summary() and res._repr_html_()
    with pytest.raises(KeyError, match="nope"):
        res.kl("nope", "w2-g32")
    with pytest.raises(KeyError, match="w3-g32"):
        res.kl(res.modules[0], "w3-g32")
    assert StageConfig.from_json(CFG.to_json()) == CFG
    with pytest.raises(ValueError, match="listed twice"):
        resolve_formats(["w4", "w4-g128"], 128)
    with pytest.raises(ValueError, match="cannot read format"):
        resolve_formats(["w4-huge"], 128)
    assert not math.isnan(res.sem[0, 0])


def test_without_timings_keeps_every_measurement_and_drops_only_wall_clock(measured, tmp_path):
    res, _ = measured
    assert not torch.isnan(res.seconds).all() and any(k.startswith("seconds") for k in res.meta)
    bare = res.without_timings()
    assert torch.equal(bare.table, res.table) and torch.equal(bare.sem, res.sem)
    assert bare.modules == res.modules and bare.formats == res.formats
    assert torch.isnan(bare.seconds).all() and not any(k.startswith("seconds") for k in bare.meta)
    assert bare.meta["settings"] == res.meta["settings"]
    a, b = bare.save(tmp_path / "a.safetensors"), res.without_timings().save(tmp_path / "b.safetensors")
    assert SensitivityResult.load(a).meta == SensitivityResult.load(b).meta
