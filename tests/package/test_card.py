"""The package's model card (README.md): the package's own figures, rewritten when they change."""
from uqcit.inputs.tiny import tiny_model
from uqcit.package import export_package, write_validation
from uqcit.package.card import CARD_FILE
from uqcit.package.secure.signing import verify_manifest
from uqcit.stages.levels import analyze_levels
from uqcit.stages.plan import PlanConfig, build_plan
from uqcit.stages.quantize import quantize_model


def test_the_card_quotes_the_stored_figures_and_follows_them(tmp_path):
    model, tok = tiny_model("llama")
    levels = analyze_levels(model)
    q = quantize_model(model, levels, build_plan(levels, PlanConfig(preset="uniform", bits=4, group_size=32,
                                                                    symmetric=True)), progress=False)
    ppl = {"reference_ppl": 31.25, "package_ppl": 33.5, "windows": 2, "full_protocol": False}
    path = export_package(q, tok, tmp_path / "pkg", source_model="HuggingFaceTB/SmolLM2-135M",
                          validation={"perplexity": ppl, "benchmarks": {"kl": 0.1234, "top1": 91.5}})
    card = (path / CARD_FILE).read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M" in card and "`w4-g32-sym` (29 modules)" in card
    assert "31.250 → 33.500 (quick: 2 window(s))" in card and "| 0.1234 |" in card and "91.50%" in card
    assert "asymmetric layers" not in card  # every layer is symmetric: plain from_pretrained loads the export
    write_validation(path, "perplexity", {**ppl, "package_ppl": 32.0, "windows": 32, "full_protocol": True})
    assert "31.250 → 32.000 (full protocol)" in (path / CARD_FILE).read_text()
    assert CARD_FILE in verify_manifest(path)  # the card is covered by the manifest
