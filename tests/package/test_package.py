import json
import os

import pytest
import torch
from safetensors import safe_open

from uqcit.stages.quantize import quantize_model
from uqcit.stages.levels import analyze_levels
from uqcit.package import PackageError, export_package, load_package, package_bytes, read_metadata
from uqcit.stages.plan import PlanConfig, build_plan
from uqcit.recipe import builtin_recipe
from uqcit.inputs.tiny import tiny_model


def _compress(family, preset="binary-concentration", bits=4, group=32):
    model, tok = tiny_model(family)
    levels = analyze_levels(model)
    plan = build_plan(levels, PlanConfig(preset=preset, bits=bits, group_size=group))
    return model, tok, levels, quantize_model(model, levels, plan, progress=False)


def _logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2", "bert"])
def test_package_round_trip_reproduces_compressed_logits(family, tmp_path):
    model, tok, levels, q = _compress(family)
    path = export_package(q, tok, tmp_path / "pkg", recipe=builtin_recipe("uqcit-default"),
                          source_model=f"tiny-{family}", levels=levels)
    loaded = load_package(path, progress=False)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(loaded.model, ids), _logits(q.model, ids))
    # the original model was not modified by quantization
    assert not any(type(m).__name__.startswith("Quant") for m in model.modules())
    # and the compressed one really differs from it
    assert not torch.allclose(_logits(model, ids), _logits(q.model, ids))


def test_save_pretrained_of_a_loaded_package_names_the_exports(tmp_path):
    # transformers' save fails on the tied embedding/head buffers, and packed codes would not load
    # back in transformers anyway: the refusal names the exports that do.
    _, tok, levels, q = _compress("llama")
    path = export_package(q, tok, tmp_path / "pkg", source_model="tiny-llama", levels=levels)
    model = load_package(path, progress=False).model
    with pytest.raises(NotImplementedError, match="save_pretrained cannot save") as info:
        model.save_pretrained(tmp_path / "saved")
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert "uqcit export PACKAGE --to hf" in message and "export_dequantized" in message
    assert "compressed-tensors" in message and "GGUF" in message
    assert not (tmp_path / "saved").exists()


def test_package_layout_and_bits_reported_are_bits_stored(tmp_path):
    model, tok, levels, q = _compress("llama")
    path = export_package(q, tok, tmp_path / "pkg", source_model="tiny-llama", levels=levels)
    for f in ("config.json", "uqcit_metadata.json", "tokenizer", "validation/perplexity.json",
              "validation/benchmarks.json", "validation/noise_profile.json"):
        assert (path / f).exists(), f
    layer_dirs = sorted(p.name for p in (path / "layers").iterdir())
    assert layer_dirs == ["layer_000", "layer_001", "layer_002", "layer_003", "outer"]
    for d in layer_dirs:
        for f in ("weights.safetensors", "rotation.safetensors", "precision_map.json", "ghz_clusters.json"):
            assert (path / "layers" / d / f).is_file()
    meta = read_metadata(path)
    # Count the bytes of every quantized tensor actually in the files.
    stored = 0
    for d in layer_dirs:
        with safe_open(str(path / "layers" / d / "weights.safetensors"), "pt") as f:
            for key in f.keys():
                module = key.rsplit(".", 1)[0]
                if module in meta["modules"] and not key.endswith(".bias"):
                    t = f.get_tensor(key)
                    stored += t.numel() * t.element_size()
    assert stored == meta["quantized_stored_bytes"] == q.stored_bits // 8
    assert meta["average_bits_per_param"] == pytest.approx(q.bpw)
    assert meta["modules"]["lm_head"]["tied_to"] == "model.embed_tokens"
    assert meta["package_bytes"] == package_bytes(path)
    assert not list(path.rglob("*.pt")) and not list(path.rglob("*.bin"))


def test_export_is_atomic_and_keeps_the_old_package(tmp_path, monkeypatch):
    model, tok, levels, q = _compress("llama")
    path = export_package(q, tok, tmp_path / "pkg", levels=levels)
    before = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(tok), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_package(q, tok, path, levels=levels)
    after = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(os.listdir(tmp_path)) == ["pkg"]  # no temporary folders left behind


def test_corrupt_truncated_and_foreign_folders_are_named(tmp_path):
    model, tok, levels, q = _compress("llama")
    path = export_package(q, tok, tmp_path / "pkg", levels=levels)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    with pytest.raises(PackageError, match="uqcit_metadata.json"):
        load_package(foreign, progress=False)
    with pytest.raises(PackageError, match="no such package folder"):
        load_package(tmp_path / "missing", progress=False)

    w = path / "layers" / "layer_001" / "weights.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(PackageError, match="layer_001/weights.safetensors"):
        load_package(path, progress=False)
    w.write_bytes(data)

    meta = path / "uqcit_metadata.json"
    meta.write_text(meta.read_text()[:100])
    with pytest.raises(PackageError, match="uqcit_metadata.json.*not valid JSON"):
        load_package(path, progress=False)


def test_package_with_float_modules_and_uniform_plan(tmp_path):
    model, tok = tiny_model("mistral")
    levels = analyze_levels(model)
    plan = build_plan(levels, PlanConfig(preset="uniform", bits=3, group_size=32,
                                         overrides={"re:.*o_proj": "float", "lm_head": "w8-g32"}))
    q = quantize_model(model, levels, plan, progress=False)
    path = export_package(q, tok, tmp_path / "pkg", levels=levels)
    loaded = load_package(path, progress=False)
    ids = torch.arange(30)[None]
    assert torch.equal(_logits(loaded.model, ids), _logits(q.model, ids))
    meta = read_metadata(path)
    assert "model.layers.0.self_attn.o_proj" not in meta["modules"]
    assert meta["modules"]["lm_head"]["format"] == "w8-g32"
    prec = json.loads((path / "layers" / "layer_000" / "precision_map.json").read_text())
    assert prec["model.layers.0.self_attn.q_proj"]["format"]["name"] == "w3-g32"


def test_clusters_and_sensitivity_travel_with_the_package(tmp_path):
    from uqcit.stages.clusters import ClustersConfig, detect_clusters
    from uqcit.stages.sensitivity import SensitivityConfig, SensitivityResult, measure_sensitivity

    model, tok, levels, q = _compress("llama")
    clusters = detect_clusters(model, levels, ClustersConfig(threshold=0.2))
    sens = measure_sensitivity(model, tok, levels, SensitivityConfig(formats=("w2", "w8"), group_size=32,
                                                                      calib_samples=2, calib_seq_len=32),
                               progress=False)
    path = export_package(q, tok, tmp_path / "pkg", levels=levels, clusters=clusters, sensitivity=sens)
    ghz = json.loads((path / "layers" / "layer_000" / "ghz_clusters.json").read_text())
    assert ghz["computed"] is True and ghz["threshold"] == 0.2
    assert sum(len(v["clusters"]) for v in clusters.for_layer_dir().values()) == \
        sum(len(json.loads((d / "ghz_clusters.json").read_text())["clusters"])
            for d in (path / "layers").iterdir())
    back = SensitivityResult.load(path / "validation" / "sensitivity.safetensors")
    assert back.modules == sens.modules and torch.equal(torch.as_tensor(back.table), torch.as_tensor(sens.table))
    assert read_metadata(path)["package_bytes"] == package_bytes(path)


def test_metadata_is_one_typed_record_that_inspect_reads(tmp_path, capsys):
    from uqcit.cli import main
    from uqcit.package import PackageMetadata

    model, tok, levels, q = _compress("llama")
    path = export_package(q.export_record(), tok, tmp_path / "pkg", source_model="tiny-llama",
                          extra_metadata={"note": "kept as given"})
    meta = PackageMetadata.read(path)
    assert meta.to_dict() == read_metadata(path)  # every key of the file, no more
    assert meta.extra == {"note": "kept as given"} and meta.pruning is None and meta.signed_by is None
    assert (meta.method, meta.average_bits_per_param, meta.package_bytes) == (q.method_name, q.bpw, package_bytes(path))
    assert main(["inspect", str(path), "--layers"]) == 0
    out = capsys.readouterr().out
    assert f"method        {q.method_name}" in out and "(tied to model.embed_tokens)" in out
    assert out.count("% of weights") == len(meta.level_distribution) > 0
    bad = json.loads((path / "uqcit_metadata.json").read_text())
    del bad["modules"]
    (path / "uqcit_metadata.json").write_text(json.dumps(bad))
    with pytest.raises(PackageError, match=r"uqcit_metadata.json: metadata lacks key\(s\) \['modules'\]"):
        PackageMetadata.read(path)


def test_a_package_loads_in_bfloat16_close_to_float32_and_generates(tmp_path):
    _, tok, levels, q = _compress("llama")  # binary concentration: int codes and fp16 salient values
    path = export_package(q, tok, tmp_path / "pkg", source_model="tiny-llama", levels=levels)
    f32 = load_package(path, progress=False).model
    bf16 = load_package(path, progress=False, dtype=torch.bfloat16).model
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    ref, got = _logits(f32, ids), _logits(bf16, ids)
    assert got.dtype == torch.bfloat16 and torch.equal(ref, _logits(q.model, ids))  # float32 stays exact
    # bfloat16 keeps 8 significant bits (a step of 2**-8 = 0.4% of a value): the logits come out
    # rounded at that scale plus what the blocks' own roundings add (measured ~0.5% of the largest
    # logit). 2% of the largest logit is 5 such steps; a misread weight or scale moves them by ~100%.
    assert (got.float() - ref).abs().max() <= 0.02 * ref.abs().max()
    stored = {n: b for n, b in f32.named_buffers() if n.endswith((".codes", ".scales"))}
    kept = dict(bf16.named_buffers())
    assert stored and all(torch.equal(kept[n], b) and kept[n].dtype == b.dtype for n, b in stored.items())
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())  # the float parts follow dtype
    assert bf16.generate(ids[:1, :5], max_new_tokens=4, do_sample=False).shape == (1, 9)


@pytest.mark.parametrize("kwargs, match", [
    ({"device": "gpu"}, r"device 'gpu': torch knows no such device"),
    ({"device": "cuda:99"}, r"device 'cuda:99': (torch sees no CUDA GPU|this machine has \d+ CUDA GPU)"),
    ({"dtype": torch.int8}, r"dtype torch.int8: a package loads in torch.float32, torch.bfloat16"),
])
def test_a_device_or_dtype_it_cannot_use_is_refused_before_anything_is_read(tmp_path, kwargs, match):
    from uqcit.core.keys import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_package(tmp_path / "no-such-package", progress=False, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_package_loads_on_cuda_with_the_cpu_logits(tmp_path):
    _, tok, levels, q = _compress("llama")
    path = export_package(q, tok, tmp_path / "pkg", source_model="tiny-llama", levels=levels)
    gpu = load_package(path, progress=False, device="cuda").model
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    assert all(b.is_cuda for b in gpu.buffers()) and all(p.is_cuda for p in gpu.parameters())
    # float32 on another device: the same weights, float sums in another order
    torch.testing.assert_close(_logits(gpu, ids.cuda()).cpu(), _logits(q.model, ids), rtol=1e-4, atol=1e-4)
    assert gpu.generate(ids[:1, :5].cuda(), max_new_tokens=4, do_sample=False).shape == (1, 9)
    half = load_package(path, progress=False, device="cuda", dtype=torch.bfloat16).model
    assert _logits(half, ids.cuda()).dtype == torch.bfloat16
