"""Image, image-text and audio models (tiny ViT, CLIP, Whisper): levels from the JSON rules, a plan,
RTN, a package that loads back and computes what the in-memory quantized model computes."""
from __future__ import annotations

import pytest

from uqcit.validation.multimodal import FAMILIES, multimodal_rulesets, run_family


@pytest.mark.parametrize("family", FAMILIES)
def test_family_round_trip(family, tmp_path):
    rec = run_family(family, tmp_path)
    assert rec["runs_after_load"]
    assert rec["max_abs_diff_loaded_vs_in_memory"] < 1e-5
    assert 0 < rec["rel_error_vs_float"] < 0.5  # quantized (changed), still the same function roughly
    assert rec["levels"]["L3"] >= 1 and rec["levels"]["L2"] >= 3


def test_rules_are_data_and_cover_cross_attention(tmp_path):
    rules = multimodal_rulesets()
    assert rules["whisper"].match("model.decoder.layers.1.encoder_attn.out_proj").role == "cross_attn"
    assert rules["clip"].match("text_projection").level == 5
    edited = tmp_path / "rules.json"
    from uqcit.validation.multimodal import _rules_data
    import json

    data = _rules_data(None)
    data["rulesets"][0]["rules"][0]["level"] = 3  # ViT's query projection moved to Level 3
    edited.write_text(json.dumps(data))
    assert multimodal_rulesets(edited)["vit"].match("vit.layers.0.attention.q_proj").level == 3
