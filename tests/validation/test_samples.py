"""Generation samples: token agreement, greedy samples of tiny models, and the report showing them escaped."""
from __future__ import annotations

import json

import pytest
import torch

from uqcit.core.keys import ConfigError
from uqcit.inputs.tiny import tiny_model
from uqcit.validation.report import build_report, load_claims
from uqcit.validation.samples import Prompt, generation_samples, token_agreement


@pytest.mark.parametrize("ref, toks, expected", [
    ([1, 2, 3, 4], [1, 2, 3, 4], (1.0, None)),
    ([1, 2, 3, 4], [9, 2, 3, 4], (0.75, 0)),
    ([1, 2, 3, 4], [1, 2, 3], (0.75, 3)),  # one ended its turn early: the missing position differs
    ([1, 2], [1, 2, 5, 6], (0.5, 2)),
])
def test_token_agreement(ref, toks, expected):
    assert token_agreement(ref, toks) == expected


def test_samples_of_a_changed_model_differ_from_the_reference():
    model, tok = tiny_model("llama")
    other, _ = tiny_model("llama")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    prompts = [Prompt("prose", "The cat", chat=False), Prompt("code", "def f(x):", chat=False)]
    res = generation_samples({"ref": model, "same": model, "other": other}, tok, prompts, new_tokens=6)
    assert res.agreement("same") == [(1.0, None)] * 2
    assert [len(t) for t in res.tokens["ref"]] == [6, 6]
    assert res.mean_agreement("other") < 1.0
    samples = res.samples("other")
    assert [s["kind"] for s in samples] == ["prose", "code"] and all(isinstance(s["text"], str) for s in samples)
    assert json.loads(res.to_json())["models"]["same"]["agreement_mean"] == 1.0


def test_chat_prompt_needs_a_chat_template():
    model, tok = tiny_model("llama")
    with pytest.raises(ValueError, match="chat template"):
        generation_samples({"m": model}, tok, [Prompt("fact", "Capital of France?")], new_tokens=2)


def _claims_file(tmp_path, samples: dict) -> str:
    data = load_claims()
    claim = {"id": "c", "source": "000", "section": "§1", "claim": "outputs stay meaningful",
             "inputs": {"a": {"file": "gen.json", "method": "m", "field": "agreement_mean"}},
             "figure": {"expression": "a"}, "rule": {"kind": "at_least", "holds": 0.5}, "samples": samples,
             "command": "x"}
    path = tmp_path / "claims.json"
    path.write_text(json.dumps({**data, "claims": [claim]}))
    return str(path)


def test_report_shows_the_samples_escaped(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    sample = {"kind": "code", "prompt": "<b>bold</b>", "chat": False, "text": "<script>alert(1)</script>",
              "tokens": 3, "agreement": 0.25, "first_divergence": 1}
    (results / "gen.json").write_text(json.dumps([{"method": "m", "agreement_mean": 0.25, "samples": [sample]}]))
    report = build_report(results, _claims_file(tmp_path, {"file": "gen.json"}))
    assert report.claim("c").verdict == "does not hold"
    page = report.to_html()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "0.25" in page


def test_samples_entry_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="colour"):
        load_claims(_claims_file(tmp_path, {"file": "gen.json", "colour": "red"}))
