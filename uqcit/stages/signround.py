"""Learned rounding block by block (SignRound): the block loop behind ``method="signround"``.

For each block of the stack, in order: the float block's outputs on the float model's own
stream are the target; the block's planned linears become ``LearnedWeight`` fake-quantized
weights (``uqcit.tensor.learned``), and ``iters`` signed-gradient steps on random calibration
micro-batches (inputs: the outputs of the blocks already quantized, so each block learns to
undo the error that reaches it) minimize the mean squared error of the block's output. The
learning rate decays linearly to zero (the paper's schedule; ``lr`` defaults to ``1/iters``).
The trained rounding is kept only if its output error on the first micro-batches beats
round-to-nearest's (it nearly always does); either way the stored tensor is an ordinary
packed ``QuantizedTensor`` of the planned format.

Memory: two streams of block inputs (float and quantized) for the calibration set, one
block's activations for a backward pass.
"""
from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F
from torch import nn

from uqcit.inputs.calibration import BlockReplay, block_output
from uqcit.runtime.modules import QuantLinear, linear_weight, replace_module, weight_matrix
from uqcit.tensor.formats import QuantFormat
from uqcit.tensor.learned import LearnedWeight
from uqcit.tensor.quant import QuantizedTensor


@dataclasses.dataclass(frozen=True)
class BlockRounding:
    """What learning the rounding of one block did: output MSE before and after."""

    block: int
    modules: tuple[str, ...]
    mse_rtn: float  # block output error with round-to-nearest on the min/max grid
    mse_learned: float  # ... with the learned rounding and clipping
    kept: str  # "learned" or "rtn"
    seconds: float


class _FakeQuantLinear(nn.Module):
    """A linear layer whose weight is a ``LearnedWeight`` (training only)."""

    def __init__(self, learned: LearnedWeight, bias: torch.Tensor | None):
        super().__init__()
        self.learned = learned
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.learned(), self.bias)


def signround_blocks(model: nn.Module, stack_name: str, blocks: dict[int, dict[str, QuantFormat]],
                     batch: torch.Tensor, *, iters: int, lr: float, clip_min: float = 0.5,
                     micro_batch: int = 8, seed: int = 0, loss: str = "mse", progress: bool = True,
                     ) -> tuple[dict[str, QuantizedTensor], list[BlockRounding]]:
    """Learn the rounding of ``blocks`` (block index -> {module name: format}) in ``model``.

    Modules are left in ``model`` as they were (the caller swaps in the quantized modules);
    returns each module's ``QuantizedTensor`` and one ``BlockRounding`` per block.
    ``lr <= 0`` means ``1 / iters``. ``loss="normed"`` measures the error where the next
    layer reads it (``normed_error``) instead of the raw residual stream's mean squared error.
    """
    from tqdm.auto import tqdm

    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if loss not in ("mse", "normed"):
        raise ValueError(f"loss must be 'mse' or 'normed', got {loss!r}")
    stack = model.get_submodule(stack_name)
    replay = BlockReplay(model, stack, batch, micro_batch=micro_batch, progress=progress)
    float_stream = [h.clone() for h in replay.hidden]
    gen = torch.Generator().manual_seed(seed)
    step_lr = lr if lr > 0 else 1.0 / max(iters, 1)
    out: dict[str, QuantizedTensor] = {}
    reports: list[BlockRounding] = []
    last = max(blocks) if blocks else -1
    for b in tqdm(range(last + 1), desc="signround blocks", unit="block", disable=not progress):
        t0 = time.perf_counter()
        target = replay.run(b, float_stream)
        names = blocks.get(b, {})
        if names:
            gain = reader_norm_weight(model, stack, b, target[0].shape[-1]) if loss == "normed" else None
            qs, report = _learn_block(model, replay, b, names, target, iters, step_lr, clip_min, gen, gain)
            out.update(qs)
            reports.append(dataclasses.replace(report, seconds=time.perf_counter() - t0))
            # The next block's quantized stream comes from this block quantized as stored.
            originals = {n: model.get_submodule(n) for n in qs}
            for n, q in qs.items():
                replace_module(model, n, _decoded_linear(originals[n], q))
            replay.advance(b)
            for n, m in originals.items():
                replace_module(model, n, m)
        else:
            replay.advance(b)
        float_stream = target
    return out, reports


def _learn_block(model: nn.Module, replay: BlockReplay, b: int, names: dict[str, QuantFormat],
                 target: list[torch.Tensor], iters: int, lr: float, clip_min: float,
                 gen: torch.Generator, gain: torch.Tensor | None,
                 ) -> tuple[dict[str, QuantizedTensor], BlockRounding]:
    block = replay.stack[b]
    frozen = [p for p in block.parameters() if p.requires_grad]  # the float block's own
    originals = {n: model.get_submodule(n) for n in names}
    learned = {n: LearnedWeight(weight_matrix(m), names[n]) for n, m in originals.items()}
    for n, m in originals.items():
        replace_module(model, n, _FakeQuantLinear(learned[n], linear_weight(m)[1]))
    params = [p for lw in learned.values() for p in lw.parameters()]
    for p in frozen:
        p.requires_grad_(False)
    try:
        mse_rtn = _block_mse(replay, b, target, gain)
        init = [p.detach().clone() for p in params]
        with torch.enable_grad():
            for step in range(iters):
                mb = int(torch.randint(len(target), (1,), generator=gen))
                args, kwargs = replay.calls[b][mb]
                pred = block_output(block(replay.hidden[mb], *args, **kwargs))
                loss = _error(pred, target[mb], gain).square().mean()
                grads = torch.autograd.grad(loss, params)
                rate = lr * (1.0 - step / iters)  # linear decay to zero
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.sub_(rate * torch.sign(g))
                for lw in learned.values():
                    lw.clamp_(clip_min)
        mse_learned = _block_mse(replay, b, target, gain)
        kept = "learned"
        if mse_learned > mse_rtn:  # never store a rounding worse than the one it started from
            with torch.no_grad():
                for p, p0 in zip(params, init):
                    p.copy_(p0)
            kept = "rtn"
        qs = {n: lw.quantized() for n, lw in learned.items()}
    finally:
        for n, m in originals.items():
            replace_module(model, n, m)
        for p in frozen:
            p.requires_grad_(True)
    return qs, BlockRounding(b, tuple(names), mse_rtn, mse_learned, kept, 0.0)


# Micro-batches the keep-or-revert check compares on: a fixed subset, so that more calibration
# text costs only the two passes every block needs (its target and its quantized outputs).
CHECK_MICRO_BATCHES = 8


def _block_mse(replay: BlockReplay, b: int, target: list[torch.Tensor], gain: torch.Tensor | None) -> float:
    """Mean squared error (``_error``) of block ``b`` (as it is now) on the quantized stream, on
    the first ``CHECK_MICRO_BATCHES`` micro-batches."""
    n = min(len(target), CHECK_MICRO_BATCHES)
    outs = replay.run(b, replay.hidden[:n])
    total = sum(float(_error(o, t, gain).square().sum()) for o, t in zip(outs, target[:n]))
    return total / sum(t.numel() for t in target[:n])


def _error(pred: torch.Tensor, target: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    return pred - target if gain is None else normed_error(pred, target, gain)


def normed_error(pred: torch.Tensor, target: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """The error of a residual-stream output ``pred`` against ``target`` as the next RMS norm
    (weight ``gain``) passes it on, to first order: ``gain * (d - h (h.d)/(h.h)) / rms(h)``.

    Why: the raw mean squared error of the residual stream is dominated by its few massive
    channels (SmolLM2's channel 507: RMS ~2,000 against a median of ~6), which the next norm
    divides away and its weight nearly zeroes; this error weighs each channel as the next layer
    reads it, and the massive channels through the normalization they set.

    >>> h = torch.tensor([[3.0, 4.0]])
    >>> normed_error(h * 1.1, h, torch.ones(2)).abs().max() < 1e-6  # a pure rescale: the norm removes it
    tensor(True)
    """
    h = target.detach()
    d = pred - h
    hh = h.square().sum(-1, keepdim=True).clamp(min=1e-12)
    rms = (hh / h.shape[-1]).sqrt()
    return (d - h * ((h * d).sum(-1, keepdim=True) / hh)) * (gain / rms)


def reader_norm_weight(model: nn.Module, stack: nn.ModuleList, b: int, hidden: int) -> torch.Tensor:
    """Weight of the norm that reads block ``b``'s output: the first norm of width ``hidden``
    inside block ``b + 1`` or, after the last block, the first the model registers after its
    stack (the final norm); ones when there is none (the normalization alone is then weighed).
    Per-head norms (Qwen3's ``q_norm``) have another width and are passed over."""
    if b + 1 < len(stack):
        candidates = stack[b + 1].modules()
    else:
        inside = {id(m) for m in stack.modules()}
        seen, candidates = False, []
        for m in model.modules():
            if m is stack:
                seen = True
            elif seen and id(m) not in inside:
                candidates.append(m)
    for m in candidates:
        weight = getattr(m, "weight", None)
        if "norm" in type(m).__name__.lower() and isinstance(weight, torch.Tensor) and weight.numel() == hidden:
            return weight.detach().float().reshape(-1)
    return torch.ones(hidden)


def _decoded_linear(module: nn.Module, q: QuantizedTensor) -> nn.Module:
    return QuantLinear(q, linear_weight(module)[1])
