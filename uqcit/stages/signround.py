"""Learned rounding block by block (SignRound): the block loop behind ``method="signround"``.

For each block of the stack, in order: the float block's outputs on the float model's own
stream are the target; the block's planned linears become ``LearnedWeight`` fake-quantized
weights (``uqcit.tensor.learned``; ``LearnedTable`` for lookup-table formats, ``LearnedVQ`` for
vector codebooks), and ``iters``
signed-gradient steps on random calibration micro-batches (inputs: the outputs of the blocks already quantized, so each block learns to
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
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from uqcit.core.names import block_of
from uqcit.inputs.replay import BlockReplay, block_output
from uqcit.runtime.modules import QuantLinear, block_stack, linear_weight, replace_module, weight_matrix
from uqcit.tensor.formats import FLOAT_BITS, QuantFormat
from uqcit.tensor.learned import LearnedTable, LearnedVQ, LearnedWeight, learned_weight, supports
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
    """A linear layer whose weight is a ``LearnedWeight``, ``LearnedTable`` or ``LearnedVQ`` (training only)."""

    def __init__(self, learned: LearnedWeight | LearnedTable | LearnedVQ, bias: torch.Tensor | None):
        super().__init__()
        self.learned = learned
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.learned(), self.bias)


def learnable_blocks(model: nn.Module, levels, plan) -> tuple[str, dict[int, dict[str, QuantFormat]]] | None:
    """The block stack's name and, per block index, the planned linears whose rounding can be
    learned (plain integer formats whose groups tile the weight) with their formats; ``None``
    when there are none or they sit in several stacks. ``model`` may be a meta-device skeleton
    (only shapes are read)."""
    pattern = levels.ruleset.block_pattern
    planned = {m.name: tuple(weight_matrix(model.get_submodule(m.name)).shape) for m in levels.modules
               if m.tied_to is None and m.kind != "embedding" and plan.format_for(m.name) is not None}
    names = [n for n, shape in planned.items() if supports(plan.format_for(n), shape)]
    untiled = [n for n, shape in planned.items() if n not in names and plan.format_for(n).bits != FLOAT_BITS
               and not plan.format_for(n).mixed]
    if untiled:  # they fall back to round-to-nearest: say so, a learned-rounding run must not quietly be RTN
        fmt = plan.format_for(untiled[0])
        warnings.warn(f"learned rounding skips {len(untiled)} of {len(planned)} planned modules (e.g. {untiled[0]}, "
                      f"{fmt.name}): their groups of {fmt.group_size} do not tile the weight, so they are rounded to "
                      f"nearest; choose a group size that divides every weight's size", stacklevel=2)
    found = block_stack(model, names, pattern)
    blocks: dict[int, dict[str, QuantFormat]] = {}
    for n in names:
        if block_of(n, pattern) is not None:
            blocks.setdefault(block_of(n, pattern), {})[n] = plan.format_for(n)
    return (found[0], blocks) if found is not None and blocks else None


def signround_blocks(model: nn.Module, stack_name: str, blocks: dict[int, dict[str, QuantFormat]],
                     batch: torch.Tensor, *, iters: int, lr: float, clip_min: float = 0.5,
                     micro_batch: int = 8, seed: int = 0, progress: bool = True,
                     ) -> tuple[dict[str, QuantizedTensor], list[BlockRounding]]:
    """Learn the rounding of ``blocks`` (block index -> {module name: format}) in ``model``.

    Modules are left in ``model`` as they were (the caller swaps in the quantized modules);
    returns each module's ``QuantizedTensor`` and one ``BlockRounding`` per block.
    ``lr <= 0`` means ``1 / iters``. Each block is ``signround_block``; the streamed job
    (``uqcit.stream.job``) runs the same function on blocks read one at a time.
    """
    from tqdm.auto import tqdm

    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    stack = model.get_submodule(stack_name)
    # BlockReplay records the blocks' inputs and arguments; the loop below replays them itself.
    replay = BlockReplay(model, stack, batch, micro_batch=micro_batch, progress=progress)
    quantized, calls = replay.hidden, replay.calls
    floats = [h.clone() for h in quantized]
    gen = torch.Generator().manual_seed(seed)  # one generator across blocks: same seed, same codes
    out: dict[str, QuantizedTensor] = {}
    reports: list[BlockRounding] = []
    last = max(blocks) if blocks else -1
    for b in tqdm(range(last + 1), desc="signround blocks", unit="block", disable=not progress):
        prefix = f"{stack_name}.{b}."
        formats = {n[len(prefix):]: fmt for n, fmt in blocks.get(b, {}).items()}
        qs, report = signround_block(stack[b], formats, calls[b], floats, quantized, gen, iters=iters, lr=lr,
                                     clip_min=clip_min, index=b, prefix=prefix)
        calls[b] = []  # its arguments are not needed any more
        out.update(qs)
        if report is not None:
            reports.append(report)
    return out, reports


def signround_block(block: nn.Module, formats: dict[str, QuantFormat], calls: list[tuple[tuple, dict]],
                    floats: list[torch.Tensor], quantized: list[torch.Tensor], gen: torch.Generator, *,
                    iters: int, lr: float, clip_min: float = 0.5, index: int = 0, prefix: str = "",
                    ) -> tuple[dict[str, QuantizedTensor], BlockRounding | None]:
    """One block of the loop: learn the rounding of ``formats`` (module name inside ``block`` ->
    format) and move both streams of block inputs past ``block``.

    ``floats`` and ``quantized`` hold one input per micro-batch (the float model's, and the
    model's with the blocks before quantized), ``calls`` the block's other arguments per
    micro-batch (``BlockReplay.calls``). On return ``floats`` holds the float block's outputs
    (the target) and ``quantized`` the outputs of the block with the learned modules as
    stored; ``block`` is as it was. ``gen`` draws the micro-batches of the steps, in order.
    Returns the ``QuantizedTensor`` of each module by ``prefix + name`` and the block's
    ``BlockRounding`` (``None`` without modules). ``lr <= 0`` means ``1 / iters``.

    >>> block = nn.Sequential(nn.Linear(64, 64))
    >>> x = [torch.randn(4, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    >>> floats, quantized = [h.clone() for h in x], [h.clone() for h in x]
    >>> qs, report = signround_block(block, {"0": QuantFormat(bits=3, group_size=32)}, [((), {})] * 3, floats,
    ...                              quantized, torch.Generator().manual_seed(0), iters=20, lr=0.0, prefix="mlp.")
    >>> sorted(qs), report.modules, torch.equal(floats[0], block(x[0]))
    (['mlp.0'], ('mlp.0',), True)
    >>> report.mse_learned < report.mse_rtn, torch.equal(quantized[0], _decoded_linear(block[0], qs["mlp.0"])(x[0]))
    (True, True)
    """
    t0 = time.perf_counter()
    _advance(block, calls, floats)  # the float block's outputs: the target, and the next float inputs
    qs: dict[str, QuantizedTensor] = {}
    report = None
    if formats:
        step_lr = lr if lr > 0 else 1.0 / max(iters, 1)
        learned, mse_rtn, mse_learned, kept = _learn_block(block, formats, calls, quantized, floats, iters,
                                                           step_lr, clip_min, gen)
        report = BlockRounding(index, tuple(prefix + n for n in formats), mse_rtn, mse_learned, kept,
                               time.perf_counter() - t0)
        qs = {prefix + n: q for n, q in learned.items()}
        # The next block's quantized stream comes from this block quantized as stored.
        originals = {n: block.get_submodule(n) for n in learned}
        for n, q in learned.items():
            replace_module(block, n, _decoded_linear(originals[n], q))
        try:
            _advance(block, calls, quantized)
        finally:
            for n, m in originals.items():
                replace_module(block, n, m)
    else:
        _advance(block, calls, quantized)
    return qs, report


def _learn_block(block: nn.Module, formats: dict[str, QuantFormat], calls: list[tuple[tuple, dict]],
                 inputs: list[torch.Tensor], target: list[torch.Tensor], iters: int, lr: float,
                 clip_min: float, gen: torch.Generator) -> tuple[dict[str, QuantizedTensor], float, float, str]:
    """The trained rounding of ``formats``' modules in ``block``; its output MSE before and
    after training and which rounding was kept."""
    frozen = [p for p in block.parameters() if p.requires_grad]  # the float block's own
    originals = {n: block.get_submodule(n) for n in formats}
    learned = {n: learned_weight(weight_matrix(m), formats[n]) for n, m in originals.items()}
    for n, m in originals.items():
        replace_module(block, n, _FakeQuantLinear(learned[n], linear_weight(m)[1]))
    params = [p for lw in learned.values() for p in lw.parameters()]
    for p in frozen:
        p.requires_grad_(False)
    try:
        mse_rtn = _block_mse(block, calls, inputs, target)
        init = [p.detach().clone() for p in params]
        with torch.enable_grad():
            for step in range(iters):
                mb = int(torch.randint(len(target), (1,), generator=gen))
                args, kwargs = calls[mb]
                pred = block_output(block(inputs[mb], *args, **kwargs))
                loss = F.mse_loss(pred, target[mb])
                grads = torch.autograd.grad(loss, params)
                rate = lr * (1.0 - step / iters)  # linear decay to zero
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.sub_(rate * torch.sign(g))
                for lw in learned.values():
                    lw.clamp_(clip_min)
        mse_learned = _block_mse(block, calls, inputs, target)
        kept = "learned"
        if mse_learned > mse_rtn:  # never store a rounding worse than the one it started from
            with torch.no_grad():
                for p, p0 in zip(params, init):
                    p.copy_(p0)
            kept = "rtn"
        qs = {n: lw.quantized() for n, lw in learned.items()}
    finally:
        for n, m in originals.items():
            replace_module(block, n, m)
        for p in frozen:
            p.requires_grad_(True)
    return qs, mse_rtn, mse_learned, kept


def _run(block: nn.Module, calls: list[tuple[tuple, dict]], hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """``block`` as it is now on ``hidden`` (one input per micro-batch), no gradients."""
    with torch.no_grad():
        return [block_output(block(h, *args, **kwargs)) for h, (args, kwargs) in zip(hidden, calls)]


def _advance(block: nn.Module, calls: list[tuple[tuple, dict]], hidden: list[torch.Tensor]) -> None:
    """Replace each input in ``hidden`` by the output of ``block`` as it is now (in place: one
    micro-batch at a time, so no second copy of the stream)."""
    with torch.no_grad():
        for mb, (args, kwargs) in enumerate(calls):
            hidden[mb] = block_output(block(hidden[mb], *args, **kwargs)).detach()


# Micro-batches the keep-or-revert check compares on: a fixed subset, so that more calibration
# text costs only the two passes every block needs (its target and its quantized outputs).
CHECK_MICRO_BATCHES = 8


def _block_mse(block: nn.Module, calls: list[tuple[tuple, dict]], inputs: list[torch.Tensor],
               target: list[torch.Tensor]) -> float:
    """Mean squared error of ``block`` (as it is now) on ``inputs``, on the first
    ``CHECK_MICRO_BATCHES`` micro-batches."""
    n = min(len(target), CHECK_MICRO_BATCHES)
    outs = _run(block, calls[:n], inputs[:n])
    total = sum(float(F.mse_loss(o, t, reduction="sum")) for o, t in zip(outs, target[:n]))
    return total / sum(t.numel() for t in target[:n])


def _decoded_linear(module: nn.Module, q: QuantizedTensor) -> nn.Module:
    return QuantLinear(q, linear_weight(module)[1])
