"""The lab widgets, headless: every control is driven the way a click or a slider drives it.

No browser here (see test_browser.py): ipywidgets keep their state in Python, so moving a
slider is setting its ``value``, a click is ``button.click()`` or the figure's click callback.
Numbers are checked against the core (allocator, quantizer, evaluation), never against
constants.
"""
from __future__ import annotations

import copy
import html
import math

import pytest
import torch

pytest.importorskip("ipywidgets")

from plotly.callbacks import Points  # noqa: E402

from uqcit.stages.allocate import AllocateConfig, allocate  # noqa: E402
from uqcit.stages.clusters import find_clusters, row_correlation  # noqa: E402
from uqcit.stages.quantize import quantize_model  # noqa: E402
from uqcit.stages.evaluate import EvalConfig, evaluate_many  # noqa: E402
from uqcit.stages.levels import analyze_levels  # noqa: E402
from uqcit.pipeline import Session  # noqa: E402
from uqcit.recipe import Recipe  # noqa: E402
from uqcit.stages.sensitivity import SensitivityConfig, measure_sensitivity  # noqa: E402
from uqcit.widgets import (  # noqa: E402
    AUTO, BudgetEditor, ClusterExplorer, EvalPanel, ExportPanel, LabState, LevelMap, RotationView, Workbench,
)

FORMATS = ("w2", "w3", "w4", "w8")


@pytest.fixture(scope="module")
def tiny():
    """A tiny Llama session with levels and a measured (small) sensitivity table, shared by the module."""
    s = Session.from_model("tiny-llama", progress=False)
    levels = analyze_levels(s.reference)
    s.results["levels"] = levels
    sens = measure_sensitivity(s.reference, s.tokenizer, levels,
                               SensitivityConfig(formats=FORMATS, group_size=32, calib_samples=2, calib_seq_len=32),
                               progress=False)
    return s, levels, sens


def _editor(tiny, **kw):
    s, levels, sens = tiny
    return BudgetEditor(levels, sens, reference=s.reference, **kw)


def _bar_heights(editor) -> list[float]:
    return [y for t in editor.figure.data for y in t.y]


# --------------------------------------------------------------------------- budget editor


def test_target_slider_reallocates_and_updates_the_figure_in_place(tiny):
    ed = _editor(tiny, target_bpw=3.2)  # w2 at groups of 32 is 3 bits/weight: the cheapest plan
    fig, before_plan, before_heights = ed.figure, ed.allocation.choices, _bar_heights(ed)
    ed.target.value = 6.0  # what dragging the slider does
    assert ed.allocation.target_bpw == 6.0
    assert 5.9 < ed.allocation.achieved_bpw <= 6.0
    assert ed.allocation.choices != before_plan
    assert ed.figure is fig  # the same widget, traces updated, not a new figure
    assert _bar_heights(ed) != before_heights
    assert sum(_bar_heights(ed)) > sum(before_heights)
    assert f"{ed.allocation.achieved_bpw:.4f}" in ed.totals_html.value
    assert len(ed.history) == 1 and not ed.undo_button.disabled


def _late_view(figure) -> list[dict]:
    """The traces a view opened now would draw: the widget's state (Voilà opens its page's views
    after the notebook has run, so in-place updates sent before never reach them)."""
    return figure.get_state()["_widget_data"]


def test_budget_bars_are_one_slot_wide_and_a_late_view_sees_the_edits(tiny):
    s, levels, sens = tiny
    ed = _editor(tiny, target_bpw=3.5)
    # In overlay mode plotly sizes a trace's bars by that trace's own spacing: without a width,
    # Level 3 (one module per block) drew bars a block wide over their neighbours.
    assert all(t.width is not None and 0 < t.width <= 1 for t in ed.figure.data)
    ed.pin_level(3, "w8-g32")
    late = _late_view(ed.figure)
    assert [y for t in late for y in t["y"]] == _bar_heights(ed)  # the pinned plan, not the first one
    assert all(0 < t["width"] <= 1 for t in late)


def test_totals_match_the_core_and_the_stored_bits(tiny):
    s, levels, sens = tiny
    ed = _editor(tiny, target_bpw=3.5)
    module = levels.quantizable()[3].name
    ed.pin(module, "w8-g32")
    core = allocate(levels, sens, AllocateConfig(target_bpw=3.5, pins={module: "w8-g32"}))
    t = ed.totals
    assert t["bpw"] == core.achieved_bpw
    assert t["predicted_kl"] == core.predicted_kl
    assert t["weight_bytes"] == core.predicted_bytes
    assert ed.allocation.choices == core.choices
    float_bytes = sum(p.numel() * p.element_size() for p in s.reference.parameters()) - 4 * levels.total_params
    assert t["float_bytes"] == float_bytes and t["package_bytes"] == core.predicted_bytes + float_bytes
    # Bits the editor shows are the bits the quantizer stores.
    q = quantize_model(s.reference, levels, ed.allocation.plan, progress=False)
    assert q.stored_bits == core.total_bits


def test_pins_survive_resolving_and_undo_restores_them(tiny):
    _, levels, _ = tiny
    ed = _editor(tiny, target_bpw=4.0)
    module = levels.quantizable()[5].name
    ed.module_picker.value = module
    ed.module_format.value = "w8-g32"
    ed.pin_button.click()
    for target in (3.5, 4.5, 7.0, 3.6):
        ed.target.value = target
        row = next(r for r in ed.allocation.rows if r.module == module)
        assert row.format == "w8-g32" and row.pinned, target
    level = levels.entry(module).level
    ed.target.value = 5.0
    ed.pin_level(level, "w4-g32")
    at_level = [r for r in ed.allocation.rows if r.level == level]
    assert at_level and all(r.format == "w4-g32" and r.pinned for r in at_level)
    ed.undo()  # back to the single pin
    assert ed.pins == {module: "w8-g32"}
    ed.pin(module, AUTO)
    assert ed.pins == {} and not any(r.pinned for r in ed.allocation.rows)


def test_errors_show_inside_the_editor_and_the_last_plan_stays(tiny):
    _, levels, _ = tiny
    ed = _editor(tiny, target_bpw=5.0)
    biggest = max(levels.quantizable(), key=lambda e: e.numel).name
    ed.pin(biggest, "float")
    plan = ed.allocation
    ed.target.value = ed.target.min  # below what a float pin allows
    assert "below the cheapest plan" in ed.error.text
    assert ed.allocation is plan and ed.target.value == 5.0  # the slider snaps back to the plan shown
    ed.target.value = 6.0
    assert ed.error.text == ""
    ed.candidates.value = ()  # no candidate at all
    assert "at least one candidate" in ed.error.text


def test_apply_writes_the_allocate_stage_into_the_recipe(tiny):
    _, levels, _ = tiny
    lab = LabState(recipe=Recipe(name="r", stages=(levels.config,)))
    ed = _editor(tiny, target_bpw=4.0, state=lab)
    module = levels.quantizable()[0].name
    ed.pin(module, "w8-g32")
    ed.apply_button.click()
    stage = lab.recipe.stage("allocate")
    assert stage.target_bpw == 4.0 and stage.pins == {module: "w8-g32"}
    assert [st.type_tag for st in lab.recipe.stages] == ["levels", "allocate"]
    assert Recipe.from_json(lab.recipe.to_json()) == lab.recipe


# --------------------------------------------------------------------------- level map and clusters


def test_level_map_click_selects_the_module_everywhere(tiny):
    s, levels, sens = tiny
    lab = LabState()
    lm = LevelMap(levels, sensitivity=sens, state=lab)
    ed = BudgetEditor(levels, sens, state=lab)
    cx = ClusterExplorer(s.reference, levels, state=lab)
    target = next(m for m in levels.modules if m.role == "down" and m.block == 2)
    blocks = lm.figure.data[lm.figure._uqcit_uids.index("levels-blocks")]
    lm._on_click(blocks, Points(point_inds=[0], xs=[target.role], ys=["block 2"], trace_index=1))
    assert lab.module == target.name
    assert ed.module_picker.value == target.name and cx.module_picker.value == target.name
    assert target.name in lm.details.value and "KL in w2-g32" in lm.details.value
    lm.select("lm_head")  # tied to the embedding: the editor edits the owner
    assert ed.module_picker.value == levels.entry("lm_head").tied_to
    with pytest.raises(KeyError):
        lm.select("no.such.module")


def test_cluster_slider_reclusters_from_the_cached_correlation(tiny):
    s, levels, _ = tiny
    model = copy.deepcopy(s.reference)
    name = "model.layers.1.self_attn.q_proj"
    w = dict(model.named_modules())[name].weight
    with torch.no_grad():  # plant a strongly correlated pair
        w[9] = -3 * w[2] + 0.01 * torch.randn(w.shape[1], generator=torch.Generator().manual_seed(0))
    cx = ClusterExplorer(model, levels, module=name, threshold=0.95)
    corr = row_correlation(w.detach())
    assert cx.clusters == find_clusters(corr, 0.95) and [2, 9] in cx.clusters
    heat, sizes = cx.heatmap, cx.sizes
    counts = []
    for thr in (0.6, 0.4, 0.25):
        cx.threshold.value = thr
        assert cx.clusters == find_clusters(corr, thr)
        assert len(cx.heatmap.layout.shapes) == len(cx.clusters)  # one outline per cluster
        counts.append(sum(len(c) for c in cx.clusters))
    assert counts == sorted(counts) and counts[-1] > 2  # lowering the threshold only merges
    assert cx.heatmap is heat and cx.sizes is sizes
    assert name in cx._corr and len(cx._corr) == 1  # computed once
    lab = LabState(recipe=Recipe(name="r", stages=(levels.config, AllocateConfig())))
    cx2 = ClusterExplorer(model, levels, module=name, threshold=0.5, state=lab)
    cx2.apply_button.click()
    assert [st.type_tag for st in lab.recipe.stages] == ["levels", "clusters", "allocate"]
    assert lab.recipe.stage("clusters").threshold == 0.5


# --------------------------------------------------------------------------- evaluation, export, rotation


def test_eval_panel_matches_the_core_and_cancel_stops_a_run(tiny):
    s, levels, sens = tiny
    lab = LabState()
    cfg = EvalConfig(max_windows=2, window=128, total_tokens=256)
    panel = EvalPanel(s.reference, s.tokenizer, levels, state=lab, eval_config=cfg)
    panel.run_button.click()  # no plan yet
    assert "no plan to evaluate" in panel.error.text
    ed = BudgetEditor(levels, sens, target_bpw=3.0, state=lab)
    panel.run(wait=True)
    assert panel.error.text == "" and len(panel.runs) == 1
    run = panel.runs[0]
    q = quantize_model(s.reference, levels, ed.allocation.plan, progress=False)
    core = evaluate_many({"m": q.model}, s.tokenizer, cfg, reference=s.reference, progress=False)
    assert run["name"] == q.method_name
    assert math.isclose(run["ppl"], core["m"].ppl, rel_tol=1e-5)
    assert math.isclose(run["kl"], core["m"].kl, rel_tol=1e-4, abs_tol=1e-7)
    assert math.isclose(run["top1"], core["m"].top1, abs_tol=1e-9)
    assert run["bpw"] == ed.allocation.achieved_bpw
    assert "QUICK" in panel.scope.value and "QUICK" in panel.status.value
    assert list(panel.scatter.data[0].x) == [run["bpw"]]
    assert list(_late_view(panel.scatter)[0]["x"]) == [run["bpw"]]  # not the empty scatter it was built as
    assert "uqcit-runs" in panel.table.value

    def cancel_after_quantize(change):
        if change["new"] == 1:
            panel.cancel()

    panel.progress.observe(cancel_after_quantize, "value")
    panel.run(wait=True)
    assert panel.progress.description == "cancelled" and "cancelled" in panel.status.value
    assert len(panel.runs) == 1  # nothing recorded for the cancelled run
    assert not panel.run_button.disabled


def test_export_panel_writes_a_signed_package_and_lists_it(tiny, tmp_path):
    s, levels, sens = tiny
    lab = LabState(recipe=Recipe(name="wb", stages=(levels.config, AllocateConfig(target_bpw=3.0))))
    BudgetEditor(levels, sens, target_bpw=3.0, state=lab)
    panel = ExportPanel(s.reference, s.tokenizer, levels, state=lab, path=str(tmp_path / "pkg"),
                        source_model="tiny-llama")
    panel.path.value = ""
    panel.export_button.click()
    assert "give a path" in panel.error.text
    panel.path.value = str(tmp_path / "pkg")
    panel.sign.value = True
    panel.export(wait=True)
    assert panel.error.text == "", panel.error.text
    assert (tmp_path / "pkg" / "uqcit_metadata.json").is_file()
    assert "signature valid" in panel.signature.value
    assert (tmp_path / "pkg-keys" / "uqcit.key").is_file()
    assert "layers/" in panel.written.value and "uqcit_metadata.json" in panel.written.value
    from uqcit.package import load_package, read_metadata

    assert read_metadata(tmp_path / "pkg")["recipe"]["name"] == "wb"
    assert load_package(tmp_path / "pkg", progress=False).model is not None



def test_export_panel_writes_each_target_beside_the_package_or_says_why_not(tiny, tmp_path):
    s, levels, sens = tiny
    lab = LabState(recipe=Recipe(name="wb", stages=(levels.config, AllocateConfig(target_bpw=4.0))))
    BudgetEditor(levels, sens, target_bpw=4.0, formats=("w3-g32",), state=lab)  # 3-bit codes: see compressed-tensors
    pkg = tmp_path / "pkg"
    panel = ExportPanel(s.reference, s.tokenizer, levels, state=lab, path=str(pkg), source_model="tiny-llama")
    assert panel.widen.disabled
    panel.target.value = "compressed-tensors"
    assert not panel.widen.disabled
    panel.export(wait=True)
    refused = html.unescape(panel.target_status.value)
    assert panel.error.text == "", panel.error.text
    assert "uqcit-target-refused" in refused and "w3-g32" in refused and "widen" in refused, refused
    assert "Traceback" not in refused and "\n" not in refused
    assert (pkg / "uqcit_metadata.json").is_file() and lab.packages == [str(pkg)]  # the package stays
    assert not (tmp_path / "pkg-compressed-tensors").exists() and panel.last_target is None

    panel.widen.value = True  # the same 3-bit codes, stored in 4 bits
    panel.export(wait=True)
    ct = panel.last_target
    assert ct.path == tmp_path / "pkg-compressed-tensors" and set(ct.detail.bits.values()) == {4}
    size = (ct.path / "model.safetensors").stat().st_size
    assert ("model.safetensors", 1, size) in panel.listing(ct.path) and f"{size:,}" in panel.target_written.value
    assert "uqcit-target-written" in panel.target_status.value and "layers as integer codes" in ct.summary

    panel.target.value = "gguf"
    panel.target_path.value = str(tmp_path / "for-llama.cpp")
    panel.export(wait=True)
    assert (tmp_path / "for-llama.cpp" / "model.gguf").read_bytes()[:4] == b"GGUF"
    assert "model.gguf" in panel.target_written.value and panel.last_target.target == "gguf"

    panel.target.value, panel.target_path.value = "hf", ""
    panel.export(wait=True)
    assert (tmp_path / "pkg-hf" / "model.safetensors").is_file() and panel.error.text == ""
    panel.export_button.click()  # the target folder exists now: refused before anything is written
    assert "pkg-hf already exists" in panel.error.text and len(lab.packages) == 4

def test_rotation_view_rotates_in_the_background_and_feeds_the_recipe(tiny):
    s, levels, sens = tiny
    lab = LabState(recipe=Recipe(name="r", stages=(levels.config, AllocateConfig())))
    rv = RotationView(s.reference, levels, state=lab, group_size=32)
    layers = rv.layers
    rv.rotate(wait=True)
    assert rv.error.text == "", rv.error.text
    rot, report = rv.results["hadamard"]
    assert rot.invariants.passed and "pass" in rv.checks.value
    assert rv.layers is layers and len(rv.layers.data[0].x) == len(report.per_block())
    rv.apply_button.click()
    assert lab.rotation is rot and lab.recipe.stages[0].type_tag == "rotation"
    BudgetEditor(levels, sens, target_bpw=4.0, state=lab)
    panel = EvalPanel(s.reference, s.tokenizer, levels, state=lab,
                      eval_config=EvalConfig(max_windows=1, window=128, total_tokens=128))
    panel.run(wait=True)
    assert panel.runs[0]["name"].startswith("rot-hadamard-")


def test_workbench_composes_the_views_and_says_which_sensitivity(tiny, tmp_path):
    s, levels, sens = tiny
    path = sens.save(tmp_path / "sens.safetensors")
    wb = Workbench(s, sensitivity=path, eval_windows=1, export_path=str(tmp_path / "pkg"))
    assert wb.tabs.titles == ("Levels", "Clusters", "Rotation", "Budget", "Evaluate", "Export", "Recipe")
    assert wb.tabs.selected_index == 3
    assert "QUICK measurement" in wb.header.value  # 2×32 calibration tokens: fewer than the default
    assert all(getattr(v, "error", None) is None or v.error.text == "" for v in wb.views.values())
    wb.budget.target.value = 4.0
    wb.budget.apply_button.click()
    assert wb.recipe.stage("allocate").target_bpw == 4.0
    assert wb.recipe.stage("sensitivity").path == str(path)
    assert '"target_bpw": 4.0' in html.unescape(wb.views["Recipe"].children[0].value)
    with pytest.raises(TypeError):
        Workbench(s, sensitivity=123)


def test_workbench_shows_a_broken_tab_inside_itself(tiny):
    s, levels, sens = tiny
    foreign = copy.copy(sens)
    foreign.numel = [n + 1 for n in sens.numel]  # as if measured on another model
    wb = Workbench(s, sensitivity=foreign)
    text = wb.views["Budget"].children[0].text
    assert "Budget view" in text and "a measurement of another model?" in text
    assert wb.views["Levels"].error.text == ""


def test_a_partial_table_pins_what_is_not_measured_yet(tiny):
    _, levels, sens = tiny
    partial = copy.copy(sens)
    partial.table = sens.table.clone()
    missing = levels.quantizable()[2].name
    partial.table[sens.modules.index(missing)] = math.nan  # still being measured
    ed = BudgetEditor(levels, partial, target_bpw=4.0)
    row = next(r for r in ed.allocation.rows if r.module == missing)
    assert (row.format, row.pinned, row.kl) == ("w4-g32", True, None)
    assert ed.allocation.unmeasured == [missing] and "not measured yet" in ed.totals_html.value
    ed.pin(missing, "w8-g32")  # a user pin wins over the fallback
    assert next(r for r in ed.allocation.rows if r.module == missing).format == "w8-g32"


@pytest.mark.slow
def test_budget_editor_on_smollm2_matches_the_core(smollm2):
    """The real model: 211 modules, the committed measured table; totals are the allocator's."""
    from pathlib import Path

    from uqcit.stages.sensitivity import SensitivityResult
    from uqcit.widgets.workbench import DASHBOARD_SENSITIVITY

    path = Path(__file__).resolve().parents[2] / DASHBOARD_SENSITIVITY
    sens = SensitivityResult.load(path)
    levels = analyze_levels(smollm2.model)
    ed = BudgetEditor(levels, sens, target_bpw=3.25, reference=smollm2.model)
    assert len(ed.allocation.rows) == 211
    for target in (3.25, 4.5):
        ed.target.value = target
        core = allocate(levels, sens, AllocateConfig(target_bpw=target))
        assert ed.totals["bpw"] == core.achieved_bpw <= target
        assert ed.totals["predicted_kl"] == core.predicted_kl
    assert ed.totals["package_bytes"] > ed.totals["weight_bytes"]
