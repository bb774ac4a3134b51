"""Self-generated text (seed 000 §3): the original model writes the text it is retrained on.

Sampled continuations of short, diverse prompts, seeded and deterministic, with end-of-sequence
tokens banned so every sequence is full length. No external data set is read. Used by
``uqcit.stages.retrain``.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from uqcit.core.results import Result
from uqcit.inputs.corpus import encode

# Short, deliberately varied openings (news, science, how-to, dialogue, code, lists, fiction...):
# they only steer where the original model starts writing; every token after them is its own.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "The history of the city begins",
    "In a press conference on Tuesday, the minister said",
    "Photosynthesis is the process by which",
    "To bake a simple loaf of bread, you will need",
    "Dear Sarah,\n\nThank you for your letter about",
    "def fibonacci(n):\n",
    "The main causes of the First World War were",
    "Once upon a time, in a small village by the sea,",
    "Q: What is the difference between weather and climate?\nA:",
    "The stock market fell sharply today after",
    "Here are five tips for staying healthy during winter:\n1.",
    "The theory of evolution explains",
    "In mathematics, a prime number is",
    "The football match ended in a draw after",
    "Climate scientists warned this week that",
    "My favourite holiday was the summer we spent",
    "The new smartphone features a larger screen and",
    "How to change a flat tyre:\nStep 1:",
    "The court ruled that the company had",
    "A healthy breakfast should include",
    "The painting, completed in 1889, shows",
    "Water boils at 100 degrees Celsius because",
    "The government announced a new plan to reduce",
    "She opened the door and saw",
    "The recipe calls for two cups of flour,",
    "Artificial intelligence is changing the way",
    "The river flows through three countries before",
    "In his latest novel, the author explores",
    "The bushfires that swept across the state",
    "A computer program is a set of instructions that",
    "The company reported a profit of",
    "The students gathered in the hall to hear",
)


@dataclasses.dataclass(repr=False)
class SelfText(Result):
    """Token ids the original model wrote: ``ids[i]`` continues prompt ``prompt_index[i]``."""

    ids: torch.Tensor  # LongTensor [n, seq_len]
    prompt_lengths: torch.Tensor  # LongTensor [n]: leading prompt tokens of each sequence
    prompt_index: torch.Tensor  # LongTensor [n]: which prompt each sequence continues
    prompts: tuple[str, ...]
    seconds: float

    @property
    def generated_tokens(self) -> int:
        """Tokens the model sampled (prompt tokens excluded)."""
        return int(self.ids.numel() - self.prompt_lengths.sum())

    def summary(self) -> str:
        return (f"{self.ids.shape[0]} sequences × {self.ids.shape[1]} tokens, "
                f"{self.generated_tokens:,} sampled by the model in {self.seconds:.1f} s")

    def to_dict(self) -> dict[str, Any]:
        return {"sequences": int(self.ids.shape[0]), "seq_len": int(self.ids.shape[1]),
                "generated_tokens": self.generated_tokens, "seconds": self.seconds,
                "prompts": list(self.prompts)}

    def texts(self, tokenizer, limit: int | None = None) -> list[str]:
        """The sequences decoded (the first ``limit``)."""
        rows = self.ids if limit is None else self.ids[:limit]
        return [tokenizer.decode(r.tolist()) for r in rows]

    def table_rows(self):
        return ("prompt", "sequences"), [(p, int((self.prompt_index == i).sum())) for i, p in enumerate(self.prompts)]

    def figure(self):
        import plotly.graph_objects as go

        counts = [int((self.prompt_index == i).sum()) for i in range(len(self.prompts))]
        fig = go.Figure(go.Bar(x=list(range(len(self.prompts))), y=counts, uid="selftext-prompts",
                               hovertext=list(self.prompts)))
        fig.update_layout(title="Self-generated sequences per prompt", xaxis_title="prompt",
                          yaxis_title="sequences", height=300)
        return fig


def banned_tokens(model: nn.Module, tokenizer) -> list[int]:
    """End-of-sequence ids (tokenizer's and generation config's): never sampled, so text runs on."""
    ids: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None),
                   getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else list(source))
    return sorted(ids)


@torch.no_grad()
def self_generate(model: nn.Module, tokenizer, *, n_sequences: int, seq_len: int,
                  prompts: Sequence[str] = DEFAULT_PROMPTS, temperature: float = 1.0, top_k: int = 50,
                  batch: int = 16, seed: int = 0, progress: bool = True) -> SelfText:
    """``model`` continues ``prompts`` (cycling, ``batch`` samples of one prompt at a time) to
    ``n_sequences`` sequences of ``seq_len`` tokens, sampled with a generator seeded by ``seed``."""
    from tqdm.auto import tqdm

    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt text")
    encoded = []
    for p in prompts:
        ids = encode(tokenizer, p)
        if ids.numel() == 0:
            raise ValueError(f"prompt {p!r} encodes to no tokens with this tokenizer")
        if ids.numel() >= seq_len:
            raise ValueError(f"prompt {p!r} has {ids.numel()} tokens; seq_len={seq_len} leaves nothing to "
                             "generate. Use a longer seq_len or a shorter prompt")
        encoded.append(ids)
    banned = torch.tensor(banned_tokens(model, tokenizer), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    rows, lengths, which = [], [], []
    t0 = time.perf_counter()
    n_batches = math.ceil(n_sequences / batch)
    try:
        for b in tqdm(range(n_batches), desc="self-generate", unit="batch", disable=not progress):
            k = min(batch, n_sequences - b * batch)
            pi = b % len(prompts)
            prompt = encoded[pi]
            rows.append(_sample(model, prompt, k, seq_len, temperature, top_k, banned, generator))
            lengths += [prompt.numel()] * k
            which += [pi] * k
    finally:
        model.train(was_training)
    return SelfText(torch.cat(rows), torch.tensor(lengths), torch.tensor(which), tuple(prompts),
                    time.perf_counter() - t0)


def _sample(model: nn.Module, prompt: torch.Tensor, k: int, seq_len: int, temperature: float,
            top_k: int, banned: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``k`` continuations of one prompt, sampled token by token with the KV cache: [k, seq_len]."""
    device = next(model.parameters()).device
    ids = prompt.to(device).unsqueeze(0).expand(k, -1).contiguous()
    out = model(input_ids=ids, use_cache=True)
    past = out.past_key_values
    logits = out.logits[:, -1]
    pieces = [ids]
    for step in range(seq_len - prompt.numel()):
        logits = logits.float() / temperature
        if banned.numel():
            logits[:, banned.to(device)] = -math.inf
        if top_k and top_k < logits.shape[-1]:
            values, index = logits.topk(top_k, dim=-1)
            choice = torch.multinomial(F.softmax(values, -1).cpu(), 1, generator=generator).to(device)
            nxt = index.gather(-1, choice)
        else:
            nxt = torch.multinomial(F.softmax(logits, -1).cpu(), 1, generator=generator).to(device)
        pieces.append(nxt)
        if step + 1 < seq_len - prompt.numel():
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
    return torch.cat(pieces, dim=1).cpu()
