"""The measurement behind ``measure_sensitivity``: one reference pass, then the KL of the model as it is now.

``Probe`` runs the reference pass once (keeping ``fp16(p · 2**15)`` of every position and the
output of every block), and ``Probe.kl(name)`` measures the model as it is now against it,
replaying the blocks that finish before ``name`` is first called (``Replay``).
``measure_module`` / ``measure_joint`` swap weights for their quantized copies and restore
them bit for bit. See ``uqcit.stages.sensitivity`` for what each shortcut costs.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import torch
from torch import nn

from uqcit.runtime.modules import block_stack, model_logits
from uqcit.tensor.formats import QuantFormat
from uqcit.tensor.quant import dequantize, quantize

# Reference probabilities are stored as fp16(p * 2**15): p = 1 stays below fp16's max (65504) and
# p down to ~1.9e-9 keeps full fp16 precision (2**-14 / 2**15), instead of underflowing near 6e-8.
PROB_SCALE = 2.0**15
# Replaying every block must reproduce the reference output; a larger KL means the model does
# something between blocks that recorded outputs cannot stand in for (in-place edits, state).
FLOOR_LIMIT = 1e-4


def measure_module(probe: Probe, module: nn.Module, entry, fmts: list[QuantFormat],
                    done: torch.Tensor, done_sem: torch.Tensor) -> tuple[list[float], list[float]]:
    """KL and its standard error for each format not yet measured (NaN in ``done``).

    The weight is restored bit for bit afterwards, whatever happens.
    """
    kls = [float(v) for v in done.tolist()]
    sems = [float(v) for v in done_sem.tolist()]
    with swapped([module], [entry]) as (saved, put):
        for j, fmt in enumerate(fmts):
            if not math.isnan(kls[j]):
                continue
            w_hat = dequantized(saved[0], entry, fmt)
            if torch.equal(w_hat, saved[0]):
                kls[j], sems[j] = 0.0, 0.0  # the model is unchanged: its output, and the KL, exactly 0
                continue
            put(0, w_hat)
            kls[j], sems[j] = probe.kl(entry.name)
    return kls, sems


def measure_joint(probe: Probe, modules: list[nn.Module], entries: list, fmt: QuantFormat) -> tuple[float, float]:
    """KL with every module in ``fmt`` at once (one pass from the first of them)."""
    with swapped(modules, entries) as (saved, put):
        for k, entry in enumerate(entries):
            put(k, dequantized(saved[k], entry, fmt))
        return probe.kl_from(min(probe.start.get(e.name, 0) for e in entries))


def dequantized(weight: torch.Tensor, entry, fmt: QuantFormat) -> torch.Tensor:
    """``weight`` through ``fmt`` and back, in the weight's own layout and dtype."""
    transposed = entry.kind == "conv1d"  # GPT-2 Conv1D stores [in, out]; formats see [out, in]
    matrix = weight.t() if transposed else weight
    w_hat = dequantize(quantize(matrix, fmt), dtype=weight.dtype)
    return w_hat.t() if transposed else w_hat


@contextlib.contextmanager
def swapped(modules: list[nn.Module], entries: list) -> Iterator[tuple[list[torch.Tensor], Callable]]:
    """Yield saved copies of the modules' weights and ``put(k, w)``; restore every weight on exit."""
    saved = [m.weight.detach().clone() for m in modules]
    try:
        def put(k: int, w: torch.Tensor) -> None:
            with torch.no_grad():
                modules[k].weight.copy_(w)
        yield saved, put
    finally:
        with torch.no_grad():
            for m, w in zip(modules, saved):
                m.weight.copy_(w)


class Replay(nn.Module):
    """Stands in for a block: returns its recorded output for the current micro-batch."""

    def __init__(self, block: nn.Module, outputs: list[Any], cursor: list[int]):
        super().__init__()
        object.__setattr__(self, "_block", block)  # plain attribute: not a registered child
        self._outputs = outputs
        self._cursor = cursor

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._outputs[self._cursor[0]]

    def __getattr__(self, name: str) -> Any:
        # The model may read attributes of its blocks (an attention type, say): forward them.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


class Probe:
    """The reference pass and its records; ``kl(name)`` measures the model as it is now."""

    def __init__(self, model: nn.Module, levels, ids: torch.Tensor, batch_size: int, replay: bool):
        self.model = model
        self.batches = list(ids.split(batch_size))
        self.cursor = [0]
        found = block_stack(model, [m.name for m in levels.modules], levels.ruleset.block_pattern) if replay else None
        self.replay_blocks: nn.ModuleList | None = found[1] if found else None
        self.container_name = found[0] if found else None
        n_blocks = len(self.replay_blocks) if self.replay_blocks is not None else 0
        self.block_outputs: list[list[Any]] = [[] for _ in range(n_blocks)]
        self.ref: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (h fp16, s, A) per micro-batch
        self.start: dict[str, int] = {}  # module -> blocks finished before its first call
        self._reference_pass(levels)
        self.floor_kl = self.kl_from(n_blocks)[0]  # everything replayed: must reproduce the reference
        if self.replay_blocks is not None and not self.floor_kl < FLOOR_LIMIT:
            raise RuntimeError(
                f"replaying the recorded outputs of {self.container_name} does not reproduce the model "
                f"(KL {self.floor_kl:.2e}); measure with SensitivityConfig(replay=False)")
        # Work estimate for the progress bar: weights run when measuring from each start block.
        self._pos = {m.name: (m.block if m.block is not None else (-1 if self.start.get(m.name, 0) == 0
                                                                  else n_blocks)) for m in levels.modules}
        self._numel = {m.name: m.numel for m in levels.modules if m.kind != "embedding"}

    def work(self, name: str) -> float:
        start = self.start.get(name, 0)
        return sum(n for m, n in self._numel.items() if self._pos[m] >= start) / 1e6 or 1.0

    def _reference_pass(self, levels) -> None:
        named = dict(self.model.named_modules())
        events: list[tuple[str, Any]] = []
        handles = []
        try:
            for m in levels.modules:
                handles.append(named[m.name].register_forward_pre_hook(
                    lambda mod, args, name=m.name: events.append(("call", name))))
            for i, block in enumerate(self.replay_blocks or []):
                handles.append(block.register_forward_hook(self._recorder(i, events)))
            for mb, x in enumerate(self.batches):
                self.cursor[0] = mb
                events.clear()
                z = model_logits(self.model, x)
                if mb == 0:
                    finished = 0
                    for kind, what in events:
                        if kind == "done":
                            finished += 1
                        elif what not in self.start:
                            self.start[what] = finished
                self.ref.append(reference_stats(z))
                del z
        finally:
            for h in handles:
                h.remove()

    def _recorder(self, i: int, events: list) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.block_outputs[i].append(output)
            events.append(("done", i))
        return hook

    def kl(self, name: str) -> tuple[float, float]:
        """Mean KL of the model as it is now against the reference (and its standard error
        over sequences), recomputing only from the first block ``name`` can affect."""
        return self.kl_from(self.start.get(name, 0))

    def kl_from(self, start: int) -> tuple[float, float]:
        """Mean KL and standard error, replaying the first ``start`` blocks from the records."""
        per_seq = []
        with self._replaying(start):
            for mb, x in enumerate(self.batches):
                self.cursor[0] = mb
                per_seq.append(kl_per_sequence(model_logits(self.model, x), *self.ref[mb]))
        kl = torch.cat(per_seq) / self.batches[0].shape[1]  # [sequences] mean KL of each
        sem = float(kl.std() / math.sqrt(kl.numel())) if kl.numel() > 1 else math.nan
        return float(kl.mean()), sem

    @contextlib.contextmanager
    def _replaying(self, start: int) -> Iterator[None]:
        blocks = self.replay_blocks
        if blocks is None or start == 0:
            yield
            return
        originals = [blocks[i] for i in range(start)]
        try:
            for i, block in enumerate(originals):
                blocks[i] = Replay(block, self.block_outputs[i], self.cursor)
            yield
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block


def reference_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From reference logits [b, T, V]: stored probabilities h (fp16), their sums s and Σ p̃ log p̃.

    The reference distribution is p̃ = h / s with h = fp16(softmax(z) · 2**15).
    """
    h = torch.softmax(z, dim=-1).mul_(PROB_SCALE).to(torch.float16)
    hf = h.to(torch.float32)
    s = hf.sum(dim=-1, dtype=torch.float64)  # [b, T]
    pt = hf.div_(s.unsqueeze(-1).to(torch.float32))
    neg_entropy = torch.xlogy(pt, pt).sum(dim=-1, dtype=torch.float64)
    return h, s, neg_entropy


def kl_per_sequence(z: torch.Tensor, h: torch.Tensor, s: torch.Tensor, neg_entropy: torch.Tensor) -> torch.Tensor:
    """Per sequence, Σ over its positions of KL(p̃ ‖ softmax(z)) = Σ p̃ log p̃ − Σ p̃ z + logsumexp(z).

    z is shifted by its per-position max first, so the terms summed are small where p̃ is
    large and the cancellation in the difference stays near float32 resolution.
    """
    z = z - z.amax(dim=-1, keepdim=True)
    lse = torch.logsumexp(z, dim=-1).to(torch.float64)
    dot = torch.linalg.vecdot(z, h.to(torch.float32)).to(torch.float64) / s
    return (neg_entropy - dot + lse).sum(dim=-1)
