"""Calibration statistics: input Hessians from hooks, token counts, Fisher; no side effects."""
from __future__ import annotations

import pytest
import torch

from uqcit.inputs.calibration import InputStats, channel_importance, collect_input_stats
from uqcit.inputs.fisher import accumulate_fisher
from uqcit.inputs.tiny import tiny_model

DOWN = "model.layers.1.mlp.down_proj"
Q, K = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"


def ids(n: int = 3, seq: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def captured_inputs(model, name: str, batch: torch.Tensor) -> torch.Tensor:
    """The inputs of module ``name`` on ``batch``, captured directly: [tokens, in]."""
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])


def test_hessian_is_mean_xtx_of_the_real_inputs_and_hooks_are_removed():
    model, _ = tiny_model("llama")
    batch = ids()
    stats = collect_input_stats(model, batch, [DOWN, Q, K, "model.embed_tokens"], micro_batch=2,
                                progress=False)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    x = captured_inputs(model, DOWN, batch)
    st = stats[DOWN]
    assert isinstance(st, InputStats) and st.kind == "linear" and st.tokens == batch.numel()
    torch.testing.assert_close(st.hessian, x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.channel_sq, x.square().mean(0), rtol=1e-5, atol=1e-7)
    # q and k share their input tensor (and so the shared product): same Hessian
    torch.testing.assert_close(stats[Q].hessian, stats[K].hessian, rtol=0, atol=0)
    # the embedding: token frequencies, no Hessian
    emb = stats["model.embed_tokens"]
    assert emb.kind == "embedding" and emb.hessian is None
    expected = torch.bincount(batch.reshape(-1), minlength=256).float() / batch.numel()
    torch.testing.assert_close(emb.channel_sq, expected)


def test_diagonal_only_and_micro_batching_agree():
    model, _ = tiny_model("llama")
    batch = ids(4, 16, seed=1)
    full = collect_input_stats(model, batch, [DOWN], micro_batch=4, progress=False)[DOWN]
    diag = collect_input_stats(model, batch, [DOWN], hessian=False, micro_batch=1, progress=False)[DOWN]
    assert diag.hessian is None
    torch.testing.assert_close(diag.channel_sq, full.channel_sq, rtol=1e-5, atol=1e-7)


def test_gpt2_conv1d_inputs_use_the_out_in_convention():
    model, _ = tiny_model("gpt2")
    name = "transformer.h.0.mlp.c_proj"  # Conv1D [in=256, out=64]
    stats = collect_input_stats(model, ids(2, 16), [name], progress=False)
    assert stats[name].hessian.shape == (256, 256)


def test_hooks_are_removed_when_the_forward_fails():
    model, _ = tiny_model("llama")
    bad = torch.full((1, 8), 10_000)  # out of the 256-token vocabulary
    with pytest.raises(IndexError):
        collect_input_stats(model, bad, [DOWN], progress=False)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_bad_inputs_are_named():
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="no module 'nope'"):
        collect_input_stats(model, ids(), ["nope"], progress=False)
    with pytest.raises(TypeError, match="LlamaRMSNorm"):
        collect_input_stats(model, ids(), ["model.norm"], progress=False)
    with pytest.raises(ValueError, match="LongTensor"):
        collect_input_stats(model, ids().float(), [DOWN], progress=False)
    with pytest.raises(TypeError, match="list of module names"):
        collect_input_stats(model, ids(), DOWN, progress=False)


def test_fisher_is_the_squared_gradient_of_one_sample():
    model, _ = tiny_model("llama")
    one = ids(1, 20, seed=2)
    fisher = accumulate_fisher(model, one, modules=[DOWN, "model.embed_tokens", "lm_head"], progress=False)
    loss = model(input_ids=one, labels=one, use_cache=False).loss
    g_down, g_emb = torch.autograd.grad(loss, [model.get_submodule(DOWN).weight, model.model.embed_tokens.weight])
    torch.testing.assert_close(fisher[DOWN], g_down.square())
    torch.testing.assert_close(fisher["model.embed_tokens"], g_emb.square())
    assert fisher["lm_head"] is fisher["model.embed_tokens"]  # tied: one parameter, one Fisher
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_fisher_averages_micro_batches_and_restores_flags():
    model, _ = tiny_model("llama")
    batch = ids(2, 16, seed=3)
    w = model.get_submodule(DOWN).weight
    w.requires_grad_(False)
    both = accumulate_fisher(model, batch, modules=[DOWN], progress=False)[DOWN]
    parts = [accumulate_fisher(model, batch[i:i + 1], modules=[DOWN], progress=False)[DOWN] for i in range(2)]
    torch.testing.assert_close(both, (parts[0] + parts[1]) / 2)
    assert w.requires_grad is False


def test_channel_importance_ranks_the_loud_channel_first():
    w = torch.ones(4, 6)
    stats = InputStats("x", "linear", 10, torch.tensor([1.0, 1.0, 100.0, 1.0, 1.0, 1.0]))
    imp = channel_importance(stats, w)
    assert imp.shape == w.shape and bool((imp.argmax(dim=1) == 2).all())
    with pytest.raises(ValueError, match="input channels"):
        channel_importance(stats, torch.ones(4, 5))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_block_replay_reproduces_the_model_block_by_block(family):
    from uqcit.inputs.replay import BlockReplay

    model, _ = tiny_model(family)
    stack, down = ("model.layers", "mlp.down_proj") if family == "llama" else ("transformer.h", "mlp.c_proj")
    batch = ids(3, 16, seed=4)
    names = [f"{stack}.{b}.{down}" for b in range(4)]
    oneshot = collect_input_stats(model, batch, names, micro_batch=2, progress=False)
    replay = BlockReplay(model, model.get_submodule(stack), batch, micro_batch=2, progress=False)
    assert all(not m._forward_pre_hooks for m in model.modules())
    for b, name in enumerate(names):
        # an unmodified model replayed block by block sees exactly the inputs of a full forward
        got = replay.collect(b, [name])[name]
        torch.testing.assert_close(got.hessian, oneshot[name].hessian, rtol=1e-4, atol=1e-6)
        assert got.tokens == batch.numel()
        replay.advance(b)
    with pytest.raises(RuntimeError, match="in order"):
        replay.collect(1, [names[1]])


def test_collector_gathers_stats_during_the_fisher_pass():
    from uqcit.inputs.calibration import InputStatsCollector

    model, _ = tiny_model("llama")
    batch = ids(2, 16, seed=5)
    with InputStatsCollector(model, [DOWN], hessian=False) as col:
        accumulate_fisher(model, batch, modules=[DOWN], progress=False)
    during = col.stats()[DOWN]
    plain = collect_input_stats(model, batch, [DOWN], hessian=False, progress=False)[DOWN]
    torch.testing.assert_close(during.channel_sq, plain.channel_sq, rtol=1e-5, atol=1e-7)
    assert all(not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="already taken"):
        col.stats()
