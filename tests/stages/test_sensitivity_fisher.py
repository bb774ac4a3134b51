"""Sensitivity predicted from the diagonal Fisher: against measured KLs, and what it leaves untouched."""
import numpy as np
import pytest
import torch

from uqcit.inputs.tiny import tiny_model
from uqcit.pipeline import Session
from uqcit.stages.allocate import FLOAT, AllocateConfig
from uqcit.stages.levels import LevelsConfig, analyze_levels
from uqcit.stages.sensitivity import SensitivityConfig, measure_sensitivity
from uqcit.stages.sensitivity_fisher import fisher_diagonal, fisher_sensitivity
from uqcit.stages.sensitivity_fit import spearman

FORMATS = ["w2-g32", "w3-g32", "w4-g32"]


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model("llama")
    return model, tok, analyze_levels(model)


def test_the_fisher_table_agrees_with_the_measured_one_in_rank_and_scale(tiny):
    model, tok, levels = tiny
    measured = measure_sensitivity(model, tok, levels, SensitivityConfig(
        formats=tuple(FORMATS), group_size=32, calib_samples=4, calib_seq_len=64), progress=False)
    fisher = fisher_sensitivity(model, tok, levels, FORMATS, group_size=32, calib_samples=8, calib_seq_len=64,
                                progress=False)
    assert fisher.modules == measured.modules and fisher.formats == measured.formats
    pred, true = fisher.table.numpy(), measured.table.numpy()
    resolved = true > 1e-5  # above what 4 x 64 tokens resolve
    assert resolved.sum() >= 20
    assert spearman(pred[resolved], true[resolved]) > 0.95
    # the scale is the KL's, not a proxy's: the second-order term is the KL to first order
    ratio = np.median(pred[resolved] / true[resolved])
    assert 0.6 < ratio < 1.6


def test_more_rounding_error_predicts_more_kl(tiny):
    model, tok, levels = tiny
    res = fisher_sensitivity(model, tok, levels, ["w2-g32", "w8-g32", "fp16"], group_size=32, calib_samples=2,
                             calib_seq_len=32, progress=False)
    live = res.table[:, 0] > 0
    assert int(live.sum()) >= len(res.modules) // 2
    assert bool((res.table[live, 0] > res.table[live, 1]).all())
    assert bool((res.table[live, 1] > res.table[live, 2]).all())
    assert res.meta["method"] == "fisher" and bool(torch.isnan(res.sem).all())


def test_the_model_comes_back_unchanged(tiny):
    model, tok, levels = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    fisher_sensitivity(model, tok, levels, ["w2-g32"], group_size=32, calib_samples=2, calib_seq_len=16,
                       progress=False)
    assert not model.training
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n] and p.grad is None


def test_the_same_seed_gives_the_same_table_and_another_seed_another(tiny):
    model, tok, levels = tiny
    kw = dict(group_size=32, calib_samples=2, calib_seq_len=16, progress=False)
    a = fisher_sensitivity(model, tok, levels, ["w2-g32"], seed=3, **kw)
    b = fisher_sensitivity(model, tok, levels, ["w2-g32"], seed=3, **kw)
    c = fisher_sensitivity(model, tok, levels, ["w2-g32"], seed=4, **kw)
    assert torch.equal(a.table, b.table) and not torch.equal(a.table, c.table)


def test_a_model_without_a_language_model_head_is_refused_by_name():
    model = tiny_model("bert")[0].bert  # the encoder alone: hidden states, no output distribution
    w = next(m.weight for m in model.modules() if isinstance(m, torch.nn.Linear))
    with pytest.raises(ValueError, match="no language-model head.*method='measured'"):
        fisher_diagonal(model, torch.zeros(1, 8, dtype=torch.long), {"w": w}, progress=False)


def test_the_pipeline_allocates_the_blocks_over_a_fisher_table_with_the_embedding_kept_float():
    s = Session.from_model("tiny-llama", progress=False)
    s.run_stage(LevelsConfig())
    s.run_stage(SensitivityConfig(formats=("w2-g64", "w3-g64", "w4-g64"), calib_samples=2, calib_seq_len=32,
                                  method="fisher"))
    res = s.run_stage(AllocateConfig(target_bpw=3.0, pins={"kind:embedding": FLOAT}, budget_over="free"))
    emb = [r for r in res.rows if r.pinned]
    assert emb and all(r.format == FLOAT for r in emb)
    blocks = [r for r in res.rows if not r.pinned]
    bpw_blocks = sum(r.bits for r in blocks) / sum(r.numel for r in blocks)
    assert res.achieved_bpw == pytest.approx(bpw_blocks)
    assert 2.9 < bpw_blocks <= 3.0  # the budget is spent on the blocks only
    assert len({r.format for r in blocks}) > 1  # the table made the allocator mix formats
