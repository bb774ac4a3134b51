import copy

import pytest
import torch
import torch.nn.functional as F

from uqcit.stages.evaluate import EvalConfig, evaluate, evaluate_many
from uqcit.inputs.tiny import tiny_model

CFG = EvalConfig(max_windows=2, window=128, total_tokens=1024)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=1)


def _perturbed(model, scale=0.05, seed=0):
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return m


def test_reference_against_itself_is_exact(llama):
    model, tok = llama
    res = evaluate_many({"same": model}, tok, CFG, reference=model, progress=False)
    assert res["same"].kl == pytest.approx(0.0, abs=1e-7)
    assert res["same"].top1 == 100.0
    assert res["same"].ppl == pytest.approx(res["reference"].ppl, rel=1e-6)
    assert res["reference"].kl is None


def test_perplexity_and_kl_match_independent_computation(llama):
    model, tok = llama
    other = _perturbed(model)
    res = evaluate_many({"other": other}, tok, CFG, reference=model, progress=False)["other"]
    from uqcit.inputs import corpus as data

    windows = data.eval_windows(tok, data.read_text(data.corpus_path()), total_tokens=1024,
                                window=128, max_windows=2)
    nll, kl, agree, n = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for ids in windows:
            out = other(input_ids=ids[None], labels=ids[None])
            nll += out.loss.item()  # HF's own shifted mean NLL
            p_ref = F.softmax(model(input_ids=ids[None]).logits[0, :-1], -1)
            p = F.softmax(out.logits[0, :-1], -1)
            kl += (p_ref * (p_ref.log() - p.log())).sum(-1).mean().item()
            agree += (p_ref.argmax(-1) == p.argmax(-1)).sum().item()
            n += ids.numel() - 1
    assert res.ppl == pytest.approx(torch.tensor(nll / 2).exp().item(), rel=1e-5)
    assert res.kl == pytest.approx(kl / 2, rel=1e-4)
    assert res.kl > 0
    assert res.top1 == pytest.approx(100 * agree / n)
    assert res.tokens == n


def test_quick_mode_says_so(llama):
    model, tok = llama
    r = evaluate(model, tok, CFG, progress=False)
    assert not r.full_protocol
    assert "QUICK" in r.summary() and "not the full protocol" in r._repr_html_()
    assert len(r.figure().data) == 1
    assert EvalConfig().is_full_protocol and EvalConfig().n_windows == 32


def test_encoder_is_refused():
    model, tok = tiny_model("bert")
    with pytest.raises(ValueError, match="not a causal language model"):
        evaluate(model, tok, CFG, progress=False)
