import json

import pytest
import torch

from uqcit.stages.clusters import (
    ClustersConfig,
    apply_clusters_to_importance,
    detect_clusters,
    find_clusters,
    row_correlation,
)
from uqcit.core.config import StageConfig
from uqcit.stages.levels import analyze_levels
from uqcit.inputs.tiny import tiny_model


def _planted(rows=96, cols=256, seed=0):
    """Independent Gaussian rows, plus two planted groups: {3, 10, 20} and {30, 31} (anti-correlated)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    base, other = torch.randn(cols, generator=g), torch.randn(cols, generator=g)
    for r, scale in ((3, 1.0), (10, 0.5), (20, 2.0)):
        w[r] = scale * base + 0.2 * torch.randn(cols, generator=g)
    w[30] = other + 0.2 * torch.randn(cols, generator=g)
    w[31] = -3 * other + 0.2 * torch.randn(cols, generator=g)
    return w


def test_planted_clusters_are_found_exactly():
    assert find_clusters(row_correlation(_planted()), 0.7) == [[3, 10, 20], [30, 31]]


def test_independent_rows_have_no_clusters():
    w = torch.randn(512, 576, generator=torch.Generator().manual_seed(1))
    corr = row_correlation(w)
    assert find_clusters(corr, 0.7) == []
    assert corr.diagonal().eq(1).all() and corr.abs().max() <= 1


def test_threshold_slider_is_monotone():
    w = _planted()
    w[40:48] = w[40] + 0.9 * torch.randn(8, 256, generator=torch.Generator().manual_seed(2))  # a looser group
    corr = row_correlation(w)
    previous = None
    for t in (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4):
        clusters = find_clusters(corr, t)
        members = {r for c in clusters for r in c}
        if previous is not None:
            prev_members = {r for c in previous for r in c}
            assert prev_members <= members  # lowering the threshold never drops a channel
            for c in previous:  # ... and never splits a cluster
                assert any(set(c) <= set(d) for d in clusters)
        previous = clusters
    assert len(find_clusters(corr, 0.95)) < len({r for c in previous for r in c})


def test_constant_rows_never_link():
    w = _planted()
    w[50] = 1.0
    w[51] = 2.0
    assert find_clusters(row_correlation(w), 0.7) == [[3, 10, 20], [30, 31]]


def test_shared_precision_through_importance():
    imp = torch.rand(6, 8, generator=torch.Generator().manual_seed(3))
    out = apply_clusters_to_importance(imp, [[1, 4]])
    assert torch.equal(out[1], torch.maximum(imp[1], imp[4])) and torch.equal(out[1], out[4])
    assert torch.equal(out[[0, 2, 3, 5]], imp[[0, 2, 3, 5]]) and not torch.equal(out, imp)
    # With it, a mixed format keeps the same columns high in every row of the cluster.
    from uqcit.tensor.formats import QuantFormat
    from uqcit.tensor.quant import codes_of, quantize

    w = torch.randn(6, 8, generator=torch.Generator().manual_seed(4))
    q = quantize(w, QuantFormat(bits=2, group_size=8, high_bits=16, high_fraction=0.25), importance=out)
    mask = codes_of(q)["mask"].view(6, 8).bool()
    assert torch.equal(mask[1], mask[4])
    with pytest.raises(IndexError):
        apply_clusters_to_importance(imp, [[1, 9]])


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model("llama")
    return model, tok, analyze_levels(model)


def test_detect_on_a_model_finds_planted_rows_and_builds_views(tiny):
    model, tok, levels = tiny
    lin = model.model.layers[2].mlp.up_proj  # [128, 64]
    saved = lin.weight.detach().clone()
    try:
        with torch.no_grad():
            lin.weight[7] = 3 * lin.weight[90] + 0.01 * lin.weight[7]
        res = detect_clusters(model, levels, ClustersConfig(), progress=False)
    finally:
        with torch.no_grad():
            lin.weight.copy_(saved)
    assert res.clusters_of("model.layers.2.mlp.up_proj") == [[7, 90]]
    assert res.n_clusters == 1 and "model.embed_tokens" not in {m.name for m in res.modules}
    layers = res.for_layer_dir()
    assert layers["layer_002"]["clusters"] == [{"module": "model.layers.2.mlp.up_proj", "rows": [7, 90]}]
    assert layers["layer_000"]["computed"] and layers["layer_000"]["clusters"] == []
    json.dumps(res.to_dict()), json.dumps(layers)
    fig = res.figure("model.layers.2.mlp.up_proj")
    assert fig.data[0].uid and len(fig.layout.shapes) == 1
    assert len(fig.data[0].z) <= 128
    assert res.size_figure().data[0].uid == "cluster-sizes"


def test_activation_source_and_skips(tiny):
    model, tok, levels = tiny
    cfg = ClustersConfig(source="both", modules=r"layers\.0\.|embed", calib_samples=2, calib_seq_len=32,
                         max_rows=200)
    res = detect_clusters(model, levels, cfg, tok, progress=False)
    assert "model.embed_tokens" in res.skipped and "max_rows" in res.skipped["model.embed_tokens"]
    assert {m.name for m in res.modules} == {e.name for e in levels.quantizable() if ".layers.0." in e.name}
    with pytest.raises(ValueError, match="tokenizer"):
        detect_clusters(model, levels, ClustersConfig(source="activations"))
    assert StageConfig.from_json(cfg.to_json()) == cfg


def test_quantize_model_shares_precision_inside_clusters(tiny):
    """With clusters, a mixed format keeps a cluster's columns high for all its rows; bits unchanged."""
    from uqcit.stages.quantize import quantize_model
    from uqcit.stages.plan import BitPlan
    from uqcit.tensor.formats import parse_format
    from uqcit.tensor.quant import quant_params

    model, tok, levels = tiny
    name = "model.layers.2.mlp.up_proj"
    lin = model.model.layers[2].mlp.up_proj  # [128, 64]
    saved = lin.weight.detach().clone()
    try:
        with torch.no_grad():
            lin.weight[7] = 3 * lin.weight[90] + 0.01 * lin.weight[7]
        clusters = detect_clusters(model, levels, ClustersConfig(), progress=False)
        plan = BitPlan(default=None, exact={name: parse_format("w2-g32+w8@0.1")})
        plain = quantize_model(model, levels, plan, progress=False)
        shared = quantize_model(model, levels, plan, clusters=clusters, progress=False)
        weight = lin.weight.detach().clone()
    finally:
        with torch.no_grad():
            lin.weight.copy_(saved)
    assert shared.clustered == 1 and plain.clustered == 0
    assert shared.method_name.startswith("clusters-")
    assert shared.stored_bits == plain.stored_bits
    fmt = parse_format("w2-g32+w8@0.1")
    imp = apply_clusters_to_importance(weight.abs(), [[7, 90]])
    mask = quant_params(weight, fmt, imp).mask.reshape(weight.shape)
    # Row 7 is 1/3 of row 90: alone it would lose most of its columns to row 90's larger values.
    assert torch.equal(mask[7], mask[90]) and mask[7].any()
    plain_mask = quant_params(weight, fmt).mask.reshape(weight.shape)
    assert not torch.equal(plain_mask[7], plain_mask[90])
    from uqcit.tensor.packing import unpack

    stored = shared.model.get_submodule(name).qtensor.tensors["mask"]
    assert torch.equal(unpack(stored, 1, weight.numel()).view(torch.bool), mask.reshape(-1))
