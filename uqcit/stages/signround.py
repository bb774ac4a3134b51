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

The error is the raw mean squared error of the block's output, massive residual channels and
all. Weighing it instead as the next RMS norm reads it (the first-order error of that norm's
output, which divides the massive channels away) was measured three times worse on SmolLM2
(8 blocks at w4-g64-sym, 16 windows: KL 0.120 vs 0.044): what those channels carry matters to
the blocks after the next one.

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
                     micro_batch: int = 8, seed: int = 0, progress: bool = True,
                     ) -> tuple[dict[str, QuantizedTensor], list[BlockRounding]]:
    """Learn the rounding of ``blocks`` (block index -> {module name: format}) in ``model``.

    Modules are left in ``model`` as they were (the caller swaps in the quantized modules);
    returns each module's ``QuantizedTensor`` and one ``BlockRounding`` per block.
    ``lr <= 0`` means ``1 / iters``.
    """
    from tqdm.auto import tqdm

    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
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
            qs, report = _learn_block(model, replay, b, names, target, iters, step_lr, clip_min, gen)
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
                 gen: torch.Generator) -> tuple[dict[str, QuantizedTensor], BlockRounding]:
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
        mse_rtn = _block_mse(replay, b, target)
        init = [p.detach().clone() for p in params]
        with torch.enable_grad():
            for step in range(iters):
                mb = int(torch.randint(len(target), (1,), generator=gen))
                args, kwargs = replay.calls[b][mb]
                pred = block_output(block(replay.hidden[mb], *args, **kwargs))
                loss = F.mse_loss(pred, target[mb])
                grads = torch.autograd.grad(loss, params)
                rate = lr * (1.0 - step / iters)  # linear decay to zero
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.sub_(rate * torch.sign(g))
                for lw in learned.values():
                    lw.clamp_(clip_min)
        mse_learned = _block_mse(replay, b, target)
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


def _block_mse(replay: BlockReplay, b: int, target: list[torch.Tensor]) -> float:
    """Mean squared error of block ``b`` (as it is now) on the quantized stream, on the first
    ``CHECK_MICRO_BATCHES`` micro-batches."""
    n = min(len(target), CHECK_MICRO_BATCHES)
    outs = replay.run(b, replay.hidden[:n])
    total = sum(float(F.mse_loss(o, t, reduction="sum")) for o, t in zip(outs, target[:n]))
    return total / sum(t.numel() for t in target[:n])


def _decoded_linear(module: nn.Module, q: QuantizedTensor) -> nn.Module:
    return QuantLinear(q, linear_weight(module)[1])
