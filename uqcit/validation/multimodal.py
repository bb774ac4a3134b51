"""The multimodal families of seed 000 §6.3, structurally: tiny random ViT and CLIP (image,
image-text) and Whisper (audio) models built from transformers configs get levels (rules from
``multimodal_rules.json``, editable data), a bit plan, RTN quantization and a package that loads
back and runs. Random weights: this shows the pipeline handles the architectures, not quality.

    python -m uqcit.validation.multimodal --out benchmarks/results/multimodal.json

>>> sorted(multimodal_rulesets())
['clip', 'vit', 'whisper']
>>> multimodal_rulesets()["whisper"].match("model.decoder.layers.0.encoder_attn.q_proj").level
3
"""
from __future__ import annotations

import json
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from uqcit.stages.level_rules import RuleSet

FAMILIES = ("vit", "clip", "whisper")


def _rules_data(path: str | Path | None) -> dict[str, Any]:
    text = (Path(path).read_text() if path is not None
            else resources.files("uqcit.validation").joinpath("multimodal_rules.json").read_text())
    return json.loads(text)


def multimodal_rulesets(path: str | Path | None = None) -> dict[str, RuleSet]:
    """The level rules of the multimodal families: ``path``, or the JSON file beside this module."""
    return {rs.name: rs for rs in (RuleSet.from_dict(d) for d in _rules_data(path)["rulesets"])}


def plan_overrides(family: str, path: str | Path | None = None) -> dict[str, str]:
    """Modules ``family`` keeps in float (``PlanConfig.overrides``), from the same JSON file.

    >>> [(k.split(".")[-1], v) for k, v in plan_overrides("whisper").items()]
    [('embed_positions', 'float')]
    """
    return dict(_rules_data(path).get("plan_overrides", {}).get(family, {}))


def tiny_multimodal(family: str, seed: int = 0):
    """A tiny random model of ``family`` and a batch of inputs for it: ``(model, inputs)``."""
    import transformers as T

    torch.manual_seed(seed)
    small = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, hidden_size=32)
    if family == "vit":
        model = T.ViTForImageClassification(T.ViTConfig(**small, image_size=32, patch_size=8, num_labels=4))
        inputs = {"pixel_values": torch.randn(2, 3, 32, 32)}
    elif family == "clip":
        text = dict(small, vocab_size=128, max_position_embeddings=32, bos_token_id=1, eos_token_id=2,
                    pad_token_id=0)
        model = T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=dict(small, image_size=32, patch_size=8),
                                         projection_dim=16))
        inputs = {"input_ids": torch.randint(3, 128, (2, 8)), "pixel_values": torch.randn(2, 3, 32, 32)}
    elif family == "whisper":
        model = T.WhisperForConditionalGeneration(T.WhisperConfig(
            d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=128, num_mel_bins=16, max_source_positions=16,
            max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))
        inputs = {"input_features": torch.randn(2, 16, 32), "decoder_input_ids": torch.randint(3, 128, (2, 6))}
    else:
        raise ValueError(f"unknown multimodal family {family!r}; known: {list(FAMILIES)}")
    return model.eval(), inputs


def _output(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits_per_image if hasattr(out, "logits_per_image") else out.logits


def run_family(family: str, workdir: str | Path, *, group_size: int = 32) -> dict[str, Any]:
    """Levels, the seed's binary-concentration plan, RTN, export, load back, run: one record."""
    from uqcit.inputs.tiny import byte_tokenizer
    from uqcit.package import export_package, load_package
    from uqcit.stages.levels import analyze_levels
    from uqcit.stages.plan import PlanConfig, build_plan
    from uqcit.stages.quantize import QuantizeConfig, quantize_model

    t0 = time.perf_counter()
    model, inputs = tiny_multimodal(family)
    levels = analyze_levels(model, ruleset=multimodal_rulesets()[family])
    plan = build_plan(levels, PlanConfig(group_size=group_size, overrides=plan_overrides(family)))
    q = quantize_model(model, levels, plan, QuantizeConfig(), progress=False)
    # The package format holds a tokenizer; the tiny byte tokenizer stands in (CLIP's text side and
    # Whisper's decoder take ids; ViT ignores it).
    path = export_package(q, byte_tokenizer(), Path(workdir) / family, source_model=f"tiny-{family}", levels=levels)
    loaded = load_package(path, progress=False).model
    ref, mem, back = _output(model, inputs), _output(q.model, inputs), _output(loaded, inputs)
    return {"model": f"tiny-{family}", "method": q.method_name, "model_class": type(model).__name__,
            "levels": {f"L{lv}": c.modules for lv, c in levels.level_counts().items()},
            "unclassified_other_params": list(levels.unhandled), "bpw": q.bpw,
            "runs_after_load": bool(torch.isfinite(back).all()),
            "max_abs_diff_loaded_vs_in_memory": float((back - mem).abs().max()),
            "rel_error_vs_float": float((back - ref).norm() / ref.norm()),
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from uqcit.core.io import write_json

    ap = argparse.ArgumentParser(description="tiny ViT / CLIP / Whisper through levels, plan, RTN and a package")
    ap.add_argument("--out", required=True, help="JSON file for the records")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        records = [run_family(f, tmp) for f in FAMILIES]
    write_json(args.out, records)
    for r in records:
        print(f"{r['model']}: levels {r['levels']}, {r['bpw']:.3f} bits/weight, runs after load: "
              f"{r['runs_after_load']}, loaded vs in memory {r['max_abs_diff_loaded_vs_in_memory']:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
