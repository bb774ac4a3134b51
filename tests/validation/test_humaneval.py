"""The HumanEval harness on a tiny model: the sandbox passes canonical solutions, fails wrong or
endless ones, and the scores are what they must be against the model itself."""
from __future__ import annotations

import copy

import torch

from uqcit.inputs.tiny import tiny_model
from uqcit.validation.humaneval import evaluate_humaneval, load_problems, run_check


def test_sandbox_passes_fails_and_times_out():
    p = load_problems(limit=3)[2]
    assert run_check(p, p["canonical_solution"]).passed
    wrong = run_check(p, "    return 0\n")
    assert not wrong.passed and wrong.reason.startswith("failed")
    assert run_check(p, "    while True:\n        pass\n", timeout=1).reason == "timed out"


def test_scores_on_a_tiny_model():
    model, tok = tiny_model("llama")
    problems = load_problems(limit=2)
    same = evaluate_humaneval(model, tok, problems, reference=model, max_new_tokens=4)
    assert same.canonical_kl == 0.0 and len(same.passed) == 2 and same.pass_at_1 == 0.0
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other = evaluate_humaneval(noisy, tok, problems, reference=model, completions=False)
    assert other.canonical_kl > 0 and other.passed is None and other.nll != same.nll
