"""Generation samples side by side (002 §4): greedy continuations of fixed prompts by the
reference and by compressed models, with how many generated tokens agree.

Greedy decoding makes a sample a function of the model alone, so two runs of one model give
the same text and any difference between two models is theirs. Agreement is counted on token
ids, position by position: the fraction of generated positions where a model's token equals
the reference's, and the first position where they differ (after it, the two texts continue
different prefixes, so later positions rarely agree by chance).

>>> token_agreement([5, 6, 7, 8], [5, 6, 9, 8])
(0.75, 2)
>>> samples_html([{"method": "ref", "samples": [{"kind": "code", "prompt": "<b>", "text": "a<b",
...               "agreement": 1.0, "first_divergence": None}]}]).count("&lt;b")
2
"""
from __future__ import annotations

import dataclasses
import html
import time
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from uqcit.core.results import Result, html_table

if TYPE_CHECKING:  # torch is imported where a model runs: the report's HTML needs none of it
    import torch


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One fixed prompt: what kind of text it asks for, its text, and how it is given."""

    kind: str  # what it tests: "fact", "prose", "code"
    text: str
    chat: bool = True  # True: an instruction in the tokenizer's chat template; False: text to continue


def token_agreement(reference: Sequence[int], tokens: Sequence[int]) -> tuple[float, int | None]:
    """``(fraction of positions equal, first differing position or None)`` of ``tokens`` against
    ``reference``, over the longer of the two (a position only one of them has differs).

    >>> token_agreement([1, 2, 3], [1, 2, 3])
    (1.0, None)
    >>> token_agreement([1, 2, 3, 4], [1, 2])
    (0.5, 2)
    """
    n = max(len(reference), len(tokens))
    if n == 0:
        return 1.0, None
    same = [a == b for a, b in zip(reference, tokens)]
    equal = sum(same)
    first = next((i for i, s in enumerate(same) if not s), None)
    if first is None and len(reference) != len(tokens):
        first = min(len(reference), len(tokens))
    return equal / n, first


def prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids the model is given for ``prompt`` (chat template with the assistant's turn opened)."""
    if prompt.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"prompt {prompt.text[:40]!r} is a chat prompt but the tokenizer has no chat "
                             "template; give it with chat=False")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt.text
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def greedy_tokens(model, tokenizer, prompt: Prompt, new_tokens: int) -> list[int]:
    """The ``new_tokens`` (fewer if it ends its turn) token ids ``model`` writes after ``prompt``, greedily."""
    import torch

    ids = torch.tensor([prompt_ids(tokenizer, prompt)])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=pad)
    return out[0, ids.shape[1]:].tolist()


@dataclasses.dataclass(repr=False)
class SamplesResult(Result):
    """Each model's greedy tokens and texts for the same prompts, and their agreement with the reference."""

    prompts: list[Prompt]
    new_tokens: int
    reference: str  # the name whose tokens the others are compared with
    tokens: dict[str, list[list[int]]]  # name -> per prompt: generated token ids
    texts: dict[str, list[str]]  # name -> per prompt: the decoded text
    seconds: dict[str, float]  # name -> wall time of its generations

    def agreement(self, name: str) -> list[tuple[float, int | None]]:
        """``token_agreement`` of ``name`` with the reference, per prompt."""
        return [token_agreement(r, t) for r, t in zip(self.tokens[self.reference], self.tokens[name])]

    def mean_agreement(self, name: str) -> float:
        values = [a for a, _ in self.agreement(name)]
        return sum(values) / len(values)

    def samples(self, name: str) -> list[dict[str, Any]]:
        """Per prompt: the prompt, the text, its token count and agreement (the record's ``samples``)."""
        return [{"kind": p.kind, "prompt": p.text, "chat": p.chat, "text": text, "tokens": len(ids),
                 "agreement": a, "first_divergence": first}
                for p, text, ids, (a, first) in zip(self.prompts, self.texts[name], self.tokens[name],
                                                    self.agreement(name))]

    def summary(self) -> str:
        others = [n for n in self.tokens if n != self.reference]
        means = ", ".join(f"{n} {self.mean_agreement(n):.2f}" for n in others)
        return (f"{len(self.prompts)} prompts x {self.new_tokens} greedy tokens; mean agreement with "
                f"{self.reference}: {means or '(no other model)'}")

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "new_tokens": self.new_tokens,
                "prompts": [dataclasses.asdict(p) for p in self.prompts],
                "models": {n: {"samples": self.samples(n), "agreement_mean": self.mean_agreement(n),
                               "seconds": self.seconds[n]} for n in self.tokens}}

    def table_rows(self):
        rows = [(n, i, p.kind, a, first, self.texts[n][i]) for n in self.tokens
                for i, (p, (a, first)) in enumerate(zip(self.prompts, self.agreement(n)))]
        return ("model", "prompt", "kind", "agreement", "first divergence", "text"), rows

    def figure(self):
        """Agreement with the reference per prompt, one group of bars per model."""
        import plotly.graph_objects as go

        fig = go.Figure()
        labels = [f"{i}: {p.kind}" for i, p in enumerate(self.prompts)]
        for n in self.tokens:
            if n != self.reference:
                fig.add_bar(x=labels, y=[a for a, _ in self.agreement(n)], name=n, uid=f"samples-{n}")
        fig.update_layout(title=f"Greedy tokens equal to {self.reference}'s", yaxis_title="agreement",
                          yaxis_range=[0, 1.05], barmode="group", height=340)
        return fig


def generation_samples(models: Mapping[str, torch.nn.Module], tokenizer, prompts: Sequence[Prompt], *,
                       new_tokens: int = 48, reference: str | None = None) -> SamplesResult:
    """Greedy samples of every model in ``models`` (name -> model) for ``prompts``, compared with
    ``reference`` (a name in ``models``; default the first).

    >>> from uqcit.inputs.tiny import tiny_model
    >>> m, tok = tiny_model("llama")
    >>> res = generation_samples({"a": m, "b": m}, tok, [Prompt("prose", "Hello", chat=False)], new_tokens=4)
    >>> res.agreement("b")
    [(1.0, None)]
    """
    if not prompts:
        raise ValueError("prompts is empty: give at least one Prompt")
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    reference = reference if reference is not None else next(iter(models))
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models {sorted(models)}")
    tokens, texts, seconds = {}, {}, {}
    for name, model in models.items():
        t0 = time.perf_counter()
        tokens[name] = [greedy_tokens(model, tokenizer, p, new_tokens) for p in prompts]
        texts[name] = [tokenizer.decode(ids, skip_special_tokens=True) for ids in tokens[name]]
        seconds[name] = time.perf_counter() - t0
    return SamplesResult(list(prompts), new_tokens, reference, tokens, texts, seconds)


def samples_html(records: Sequence[Mapping[str, Any]], methods: Sequence[str] | None = None) -> str:
    """The samples of benchmark records (each with ``method`` and ``samples``) as HTML, prompt by
    prompt, every text escaped; ``methods`` picks and orders the records shown."""
    by_method = {r["method"]: r for r in records if r.get("samples")}
    shown = [by_method[m] for m in methods if m in by_method] if methods is not None else list(by_method.values())
    if not shown:
        return ""
    parts = []
    for i, first in enumerate(shown[0]["samples"]):
        rows = []
        for r in shown:
            s = r["samples"][i] if i < len(r["samples"]) else None
            if s is not None:
                diverge = "never" if s["first_divergence"] is None else s["first_divergence"]
                rows.append((r["method"], f"{s['agreement']:.2f}", diverge, s["text"]))
        parts.append(f"<p><b>{html.escape(first['kind'])}</b>: <code>{html.escape(first['prompt'])}</code></p>"
                     + html_table(("model", "tokens equal", "first divergence", "greedy text"), rows))
    return "<div class='samples'>" + "".join(parts) + "</div>"
