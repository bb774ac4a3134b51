"""Calibration text run through a stack of blocks one block at a time (sequential GPTQ, learned rounding).

``BlockReplay`` records each micro-batch's input to the first block and the arguments every
block receives, then replays one block at a time: the statistics of a block's modules
(``uqcit.inputs.calibration.InputStats``) are collected after the blocks before it were rounded,
and with ``floats=True`` the float model's stream runs beside the rounded one (``InputStats.cross``,
for GPTAQ's asymmetric targets), also group by group inside a block (``input_groups``).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Mapping

import torch
from torch import nn

from uqcit.inputs.calibration import (
    InputStats,
    InputStatsCollector,
    _accepts,
    _check_batch,
    _check_micro_batch,
    _forward,
    _model_device,
)
from uqcit.runtime.modules import replace_module


class BlockReplay:
    """Calibration inputs run through a stack of blocks one block at a time (sequential GPTQ).

    The constructor runs ``batch`` through the model once, recording each micro-batch's input
    to the first block and the extra arguments every block receives (attention masks, position
    embeddings...), and collecting the ``capture`` statistics (module name -> want a Hessian)
    on the way. Then ``collect(i, names)`` gathers input statistics of modules inside block
    ``i`` by running only that block on its current inputs, and ``advance(i)`` runs block ``i``
    as it is now (e.g. quantized) and makes its outputs the inputs of block ``i + 1``. Memory:
    one block's input per micro-batch (SmolLM2, 16 x 256 tokens: 9 MB).

    ``floats=True`` (asymmetric GPTQ, twice the memory) keeps the float model's block inputs too:
    ``collect`` pairs each module's inputs on both (``InputStats.cross``) and moves ``floats`` past
    the block, which must still be float: collect a block's modules at once before modifying it, or
    group by group (``input_groups``) with the float originals of the rounded groups standing in.

    The blocks must run one after the other on the hidden state, as in every HF decoder or
    encoder stack (``for layer in self.layers: hidden = layer(hidden, ...)``).
    """

    def __init__(self, model: nn.Module, stack: nn.ModuleList, batch: torch.Tensor, *,
                 capture: dict[str, bool] | None = None, micro_batch: int = 4, floats: bool = False,
                 progress: bool = True):
        from tqdm.auto import tqdm

        batch = _check_batch(batch)
        _check_micro_batch(micro_batch)
        if not isinstance(stack, nn.ModuleList) or len(stack) == 0:
            raise TypeError(f"stack must be a non-empty nn.ModuleList of blocks, got {type(stack).__name__}")
        self.model, self.stack, self.progress = model, stack, progress
        self.hidden: list[torch.Tensor] = []  # per micro-batch: the input of the next block to run
        self.calls: list[list[tuple[tuple, dict]]] = [[] for _ in stack]  # per block, per micro-batch: (args[1:], kwargs)
        self._next = 0
        recorders = [blk.register_forward_pre_hook(self._recorder(i), with_kwargs=True)
                     for i, blk in enumerate(stack)]
        device = _model_device(model)
        # With nothing to capture only the blocks' inputs matter: skip the LM head's logits for
        # all but one position (a third of SmolLM2's forward pass at 256 tokens).
        extra = {"logits_to_keep": 1} if not capture and _accepts(model, "logits_to_keep") else {}
        try:
            with InputStatsCollector(model, capture or {}) as col, torch.no_grad():
                for s in tqdm(range(0, batch.shape[0], micro_batch), desc="calibration inputs",
                              unit="batch", disable=not progress):
                    _forward(model, batch[s:s + micro_batch].to(device), **extra)
                    col.end_batch()
        finally:
            for h in recorders:
                h.remove()
        self.captured: dict[str, InputStats] = col.stats()
        # Both streams start as the same embeddings; every step assigns new tensors, none is written in place.
        self.floats: list[torch.Tensor] | None = list(self.hidden) if floats else None
        self._floats_next = 0  # the block the float stream enters next

    def _recorder(self, index: int):
        def hook(module, args, kwargs):
            if not args:
                raise RuntimeError(f"block {index} was called without a positional hidden state; "
                                   "BlockReplay cannot replay it")
            if index == 0:
                self.hidden.append(args[0].detach())
            self.calls[index].append((tuple(args[1:]), dict(kwargs)))
        return hook

    def _check(self, index: int) -> None:
        if index != self._next:
            raise RuntimeError(f"blocks are replayed in order: the next block is {self._next}, not {index}")

    def collect(self, index: int, modules: Iterable[str], *, hessian: bool = True,
                floats_from: Mapping[str, nn.Module] | None = None, last: bool = True) -> dict[str, InputStats]:
        """Input statistics of ``modules`` (inside block ``index``) on the block's current inputs;
        with ``floats``, each with its ``cross`` term, and the float stream moves past the block.

        To collect a block group by group (``input_groups``) while rounding it, pass ``last=False``
        for every group but the last (the float stream stays before the block) and, as
        ``floats_from``, the float originals of the modules already replaced: they stand in during
        the float pass, so the float stream stays the float model's.
        """
        self._check(index)
        paired = self.floats is not None
        if paired and self._floats_next != index:
            raise RuntimeError(f"the float stream has moved past block {index}: collect a block's modules at once, "
                               "or its groups with last=False")
        modules = list(modules)
        swapped = dict(floats_from or {})
        if swapped and not paired:
            raise RuntimeError("floats_from stands in on the float stream: make the BlockReplay with floats=True")
        if set(swapped) & set(modules):
            raise ValueError(f"floats_from and modules overlap: {sorted(set(swapped) & set(modules))}")
        current = {n: self.model.get_submodule(n) for n in swapped}
        block = self.stack[index]
        with InputStatsCollector(self.model, modules, hessian=hessian, cross=paired) as col, torch.no_grad():
            for mb, (args, kwargs) in enumerate(self.calls[index]):
                if paired:
                    with col.recording(), _standing_in(self.model, swapped, current):
                        out = block_output(block(self.floats[mb], *args, **kwargs)).detach()
                    if last:
                        self.floats[mb] = out
                block(self.hidden[mb], *args, **kwargs)
                col.end_batch()
        if paired and last:
            self._floats_next = index + 1
        return col.stats()

    def input_groups(self, index: int, modules: Iterable[str]) -> list[list[str]]:
        """``modules`` of block ``index`` in the order the block calls them, those fed the very same
        input tensor in one group (a llama block: q/k/v, o, gate/up, down), from one micro-batch.

        >>> from uqcit.inputs.tiny import tiny_model
        >>> model, _ = tiny_model("llama")
        >>> replay = BlockReplay(model, model.model.layers, torch.randint(0, 256, (2, 16)), progress=False)
        >>> linears = [n for n, m in model.named_modules() if n.startswith("model.layers.0.") and isinstance(m, nn.Linear)]
        >>> [[n.rsplit(".", 1)[1] for n in g] for g in replay.input_groups(0, linears)]
        [['q_proj', 'k_proj', 'v_proj'], ['o_proj'], ['gate_proj', 'up_proj'], ['down_proj']]
        """
        self._check(index)
        wanted = set(modules)
        # The inputs themselves, not their ids: a freed tensor's id can come back for a new one.
        order: list[tuple[str, torch.Tensor]] = []
        hooks = [self.model.get_submodule(n).register_forward_pre_hook(
            lambda mod, args, kwargs, n=n: order.append((n, args[0] if args else kwargs.get("input", kwargs.get("x")))),
            with_kwargs=True) for n in wanted]
        try:
            with torch.no_grad():
                args, kwargs = self.calls[index][0]
                self.stack[index](self.hidden[0], *args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        groups: list[list[str]] = []
        last_input = None
        for name, x in order:
            if any(name in g for g in groups):
                continue  # called again in the same pass: its first call places it
            if groups and x is last_input:
                groups[-1].append(name)
            else:
                groups.append([name])
            last_input = x
        missing = wanted - {n for g in groups for n in g}
        if missing:
            raise RuntimeError(f"block {index} never called {sorted(missing)}")
        return groups

    def run(self, index: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Block ``index`` as it is now on other inputs ``hidden`` (one per micro-batch, shaped
        like its own), with the block's recorded arguments; no gradients. Learned rounding uses
        it to get the float block's outputs on the float model's stream."""
        self._check(index)
        with torch.no_grad():
            return [block_output(self.stack[index](h, *args, **kwargs))
                    for h, (args, kwargs) in zip(hidden, self.calls[index])]

    def advance(self, index: int) -> None:
        """Run block ``index`` as it is now; its outputs become the next block's inputs."""
        self._check(index)
        if self.floats is not None and self._floats_next == index:  # nothing collected: the block is float
            self.floats = self.run(index, self.floats)
            self._floats_next += 1
        with torch.no_grad():
            for mb, (args, kwargs) in enumerate(self.calls[index]):
                self.hidden[mb] = block_output(self.stack[index](self.hidden[mb], *args, **kwargs)).detach()
        self.calls[index] = []  # its arguments are not needed any more
        self._next += 1


@contextlib.contextmanager
def _standing_in(model: nn.Module, stand_ins: Mapping[str, nn.Module], current: Mapping[str, nn.Module]):
    """Inside, ``stand_ins`` take their names' places in ``model``; ``current`` is put back on exit."""
    for name, module in stand_ins.items():
        replace_module(model, name, module)
    try:
        yield
    finally:
        for name, module in current.items():
            replace_module(model, name, module)


def block_output(out) -> torch.Tensor:
    """The hidden state a block returns (HF blocks return it alone or first in a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out
