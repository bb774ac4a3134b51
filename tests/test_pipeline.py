import json
import subprocess
import sys

import pytest
import torch

from uqcit.stages.quantize import QuantizeConfig
from uqcit.stages.evaluate import EvalConfig
from uqcit.stages.levels import LevelsConfig
from uqcit.pipeline import Session, compressed_result, run_job
from uqcit.stages.plan import PlanConfig
from uqcit.recipe import builtin_recipe
from uqcit.inputs.tiny import tiny_model

QUICK = EvalConfig(max_windows=1, window=128, total_tokens=1024)


def _tiny_session():
    model, tok = tiny_model("llama")
    return Session(name="tiny-llama", reference=model, tokenizer=tok, progress=False)


def test_stages_run_in_order_and_need_their_inputs():
    s = _tiny_session()
    with pytest.raises(RuntimeError, match="'levels' has not run"):
        s.run_stage(PlanConfig())
    s.run_stage(LevelsConfig())
    with pytest.raises(RuntimeError, match="needs a bit plan"):
        s.run_stage(QuantizeConfig())
    s.run_stage(PlanConfig(preset="uniform", bits=4, group_size=32))
    q = s.run_stage(QuantizeConfig())
    assert q.bpw == pytest.approx(4 + 32 / 32)  # 4-bit codes + fp16 scale and zero per 32 weights
    ev = s.run_stage(QUICK)
    assert ev.kl > 0 and 0 < ev.top1 <= 100
    assert set(s.seconds) >= {"levels", "plan", "quantize", "eval"}


def test_a_new_stage_plugs_in_without_editing_the_runner():
    import dataclasses

    from uqcit.core.config import HANDLERS, StageConfig, stage_handler
    from uqcit.core.results import Result

    @dataclasses.dataclass(frozen=True)
    class CountConfig(StageConfig):
        type_tag = "count-test"

    @dataclasses.dataclass
    class CountResult(Result):
        n: int

        def to_dict(self):
            return {"n": self.n}

    try:
        stage_handler(CountConfig)(lambda s, c: CountResult(sum(1 for _ in s.reference.parameters())))
        s = _tiny_session()
        assert s.run_stage(CountConfig()).n == len(list(s.reference.parameters()))
    finally:
        HANDLERS.pop(CountConfig, None)
    with pytest.raises(ValueError, match="no handler for stage type 'count-test'"):
        _tiny_session().run_stage(CountConfig())


def test_run_job_on_tiny_model_writes_validation(tmp_path):
    s = _tiny_session()
    report = run_job("tiny-llama", builtin_recipe("uqcit-default"), tmp_path / "pkg",
                     eval_config=QUICK, progress=False, session=s)
    assert report.compressed.kl > 0
    v = json.loads((tmp_path / "pkg" / "validation" / "perplexity.json").read_text())
    assert v["package_ppl"] == report.compressed.ppl and v["full_protocol"] is False
    table = report.format_table()
    assert "bits/weight" in table and "QUICK" in table


@pytest.mark.slow
def test_main_job_on_smollm2_reproduces_in_a_new_process(smollm2, tmp_path):
    """The README's main job (quick evaluation), then `uqcit eval` in a fresh process."""
    s = Session(name="smollm2-135m", reference=smollm2.model, tokenizer=smollm2.tokenizer, progress=False)
    cfg = EvalConfig(max_windows=1)
    report = run_job("smollm2-135m", builtin_recipe("uqcit-default"), tmp_path / "pkg",
                     eval_config=cfg, progress=False, session=s)
    assert 5.0 < report.bpw < 8.0
    assert report.compressed.ppl > report.reference.ppl * 0.9
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "uqcit.cli", "eval", str(tmp_path / "pkg"),
                           "--reference", "none", "--quick", "1", "--json", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    again = json.loads(out.read_text())["package"]
    assert again["ppl"] == pytest.approx(report.compressed.ppl, rel=1e-6)
    inspect = subprocess.run([sys.executable, "-m", "uqcit.cli", "inspect", str(tmp_path / "pkg")],
                             capture_output=True, text=True, timeout=120)
    assert inspect.returncode == 0 and "level_3" in inspect.stdout and "perplexity" in inspect.stdout


def test_package_bytes_in_metadata_stay_true_after_validation(tmp_path):
    from uqcit.package import package_bytes, read_metadata

    s = _tiny_session()
    report = run_job("tiny-llama", builtin_recipe("uqcit-default"), tmp_path / "pkg",
                     eval_config=QUICK, progress=False, session=s)
    assert read_metadata(tmp_path / "pkg")["package_bytes"] == package_bytes(tmp_path / "pkg")
    assert report.package_bytes == package_bytes(tmp_path / "pkg")


def test_run_job_with_rotation_names_it_counts_its_bits_and_scores_against_the_original(tmp_path):
    from uqcit.package import read_metadata
    from uqcit.recipe import Recipe
    from uqcit.stages.rotation import RotationConfig

    recipe = Recipe(name="rot-test", stages=(
        RotationConfig(), LevelsConfig(), PlanConfig(preset="uniform", bits=8, group_size=32),
        QuantizeConfig(), QUICK))
    s = _tiny_session()
    original = s.reference
    report = run_job("tiny-llama", recipe, tmp_path / "pkg", eval_config=QUICK, progress=False, session=s)
    q = s.require("quantize")
    rot = s.require("rotation")
    assert report.method == "rot-hadamard-rtn-w8-g32" == q.method_name
    # `reference` stays the original; the later stages worked on the rotated model.
    assert s.reference is original and s.rotated is rot.model and s.working is rot.model
    assert s.require("levels").config == LevelsConfig()
    # Online rotations (down_proj inputs, final norm) are stored, so they are counted.
    assert rot.stored_bits > 0 and q.rotation_bits == rot.stored_bits
    assert q.bpw == pytest.approx((q.stored_bits + rot.stored_bits) / q.weight_count)
    assert read_metadata(tmp_path / "pkg")["rotation"]["max_logit_diff"] < 1e-4
    # 8-bit of a function-preserving rotation: the package must track the *original* closely.
    assert report.compressed.kl < 0.01


def test_one_function_decides_the_compressed_model():
    """compensate > quantize > prune; a retrain on top: as trained for evaluation, folded for the package."""
    import dataclasses

    from uqcit.core.results import Result

    @dataclasses.dataclass
    class Fake(Result):
        model: object
        tag: str = ""

        def to_dict(self):
            return {"tag": self.tag}

    class FakeRetrain(Fake):
        def apply_to(self, compressed):
            return dataclasses.replace(compressed, model=("folded", self.model))

    prune, quant, comp = Fake("p", "prune"), Fake("q", "quantize"), Fake("c", "compensate")
    assert compressed_result({}) is None
    assert compressed_result({"prune": prune, "quantize": quant}) is quant
    assert compressed_result({"prune": prune, "quantize": quant, "compensate": comp}) is comp
    retrained = FakeRetrain("r", "retrain")
    both = {"quantize": quant, "retrain": retrained}
    assert compressed_result(both) is retrained
    stored = compressed_result(both, stored=True)
    assert stored.model == ("folded", "r") and stored.tag == "quantize"
    s = _tiny_session()
    s.results.update(both)
    assert s.compressed == "r"


def test_export_session_is_the_job_s_export_step(tmp_path):
    """What run_job exports, export_session exports (the widgets' way in), rotation and clusters included."""
    from uqcit.package import read_metadata
    from uqcit.pipeline import export_session
    from uqcit.recipe import Recipe
    from uqcit.stages.clusters import ClustersConfig
    from uqcit.stages.rotation import RotationConfig

    recipe = Recipe(name="rot-clusters", stages=(
        RotationConfig(), LevelsConfig(), ClustersConfig(threshold=0.5),
        PlanConfig(preset="uniform", bits=8, group_size=32), QuantizeConfig()))
    s = _tiny_session()
    with pytest.raises(RuntimeError, match="nothing to export"):
        export_session(s, tmp_path / "none", recipe=recipe, model_name="tiny-llama")
    s.run(recipe)
    stored = export_session(s, tmp_path / "pkg", recipe=recipe, model_name="tiny-llama")
    assert stored is s.require("quantize") and "export" in s.seconds
    meta = read_metadata(tmp_path / "pkg")
    assert meta["recipe"]["name"] == "rot-clusters" and meta["rotation"]["construction"] == "hadamard"
    assert stored.method_name.startswith("rot-hadamard-") and meta["method"] == stored.method_name
    found = [json.loads(f.read_text()) for f in (tmp_path / "pkg" / "layers").glob("*/ghz_clusters.json")]
    assert any(c["computed"] for c in found)  # the session's clusters travel with the package
