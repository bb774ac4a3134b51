"""The diagonal empirical Fisher of a model's weights: squared gradients of its own loss.

``accumulate_fisher`` sums them per weight, one micro-batch at a time (Fisher-weighted importance,
``uqcit.stages.importance``); it shares the module resolution and input checks of
``uqcit.inputs.calibration``.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from uqcit.inputs.calibration import (
    _as_out_in,
    _check_batch,
    _check_micro_batch,
    _forward,
    _is_weight_module,
    _model_device,
    _names,
    _resolve,
)


def accumulate_fisher(model: nn.Module, batch: torch.Tensor, *, modules: Iterable[str] | None = None,
                      micro_batch: int = 1, progress: bool = True) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of each module's weight: ``F = mean_b (∂L_b/∂W)²``.

    ``L_b`` is the model's own loss on micro-batch ``b`` (``labels = input_ids``: next-token
    NLL for causal LMs), so with ``micro_batch=1`` each term is one sequence's squared gradient.
    ``modules`` defaults to every Linear, Conv1D and Embedding. Results are float32, shaped
    like the weight in ``[out, in]`` convention (Conv1D transposed); modules sharing a weight
    (a tied embedding and LM head) get the same tensor, the Fisher of the shared parameter.
    Gradients are taken with ``torch.autograd.grad``: no ``.grad`` is left on the model, only
    one micro-batch's gradients exist at a time, and ``requires_grad`` flags and train/eval
    mode are restored afterwards.
    """
    from tqdm.auto import tqdm

    batch = _check_batch(batch)
    _check_micro_batch(micro_batch)
    if modules is None:
        modules = [n for n, m in model.named_modules() if _is_weight_module(m)]
    targets = _resolve(model, _names(modules))
    params: list[nn.Parameter] = []
    index_of: dict[int, int] = {}
    slot: dict[str, int] = {}
    for name, module in targets.items():
        p = module.weight
        if id(p) not in index_of:
            index_of[id(p)] = len(params)
            params.append(p)
        slot[name] = index_of[id(p)]
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    flags = [p.requires_grad for p in params]
    was_training = model.training
    device = _model_device(model)
    n_steps = 0
    try:
        model.eval()  # no dropout: the Fisher of the model as it will be used
        for p in params:
            p.requires_grad_(True)
        for s in tqdm(range(0, batch.shape[0], micro_batch), desc="fisher", unit="batch",
                      disable=not progress):
            ids = batch[s:s + micro_batch].to(device)
            loss = _forward(model, ids, labels=ids).loss
            if loss is None:
                raise ValueError(f"{type(model).__name__} returned no loss for labels=input_ids; "
                                 "accumulate_fisher needs a language-model head")
            grads = torch.autograd.grad(loss, params)
            for acc, g in zip(sums, grads):
                acc.addcmul_(g, g)
            n_steps += 1
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    fisher = [acc.div_(n_steps) for acc in sums]
    out = {}
    for name, module in targets.items():
        f = fisher[slot[name]]
        out[name] = f if isinstance(module, nn.Embedding) else _as_out_in(module, f)
    return out
