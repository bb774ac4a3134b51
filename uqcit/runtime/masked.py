"""Pruned layers at run time: a dense weight held at zero by a fixed mask.

``uqcit.stages.prune`` replaces each pruned Linear (or GPT-2 ``Conv1D``) with a ``MaskedLinear``
and each pruned embedding with a ``MaskedEmbedding``; packages store them sparse
(``uqcit.tensor.sparse``) and rebuild them from there.

>>> w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
>>> lin = MaskedLinear(w, torch.tensor([[True, False], [False, True]]))
>>> lin.weight.tolist(), lin.kept
([[1.0, 0.0], [0.0, 4.0]], 2)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from uqcit.runtime.modules import linear_weight


class MaskedLinear(nn.Linear):
    """A Linear whose pruned weights are held at zero by a fixed mask.

    ``weight`` is a dense ``[out, in]`` parameter, exactly zero where ``mask`` (a bool buffer of
    the same shape, True = kept) is False; ``forward(x) = F.linear(x, weight * mask, bias)``, so
    gradients never revive a pruned weight's effect. Without gradients the product is skipped
    (``weight`` is already zero there: code that edits it must keep it so, e.g. with
    ``apply_mask_``), so inference costs what a dense Linear costs. It is an ``nn.Linear``, so
    stages that look for Linears (levels, calibration statistics, quantization) still find it.
    """

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None):
        if weight.dim() != 2 or tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"weight must be [out, in] and mask the same shape; got "
                             f"{tuple(weight.shape)} and {tuple(mask.shape)}")
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate and initialize a weight
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        mask = mask.to(device=weight.device, dtype=torch.bool)
        self.weight = nn.Parameter(weight.detach().clone().masked_fill_(~mask, 0))
        self.register_buffer("mask", mask.clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_module(cls, module: nn.Module, mask: torch.Tensor) -> "MaskedLinear":
        """Prune ``nn.Linear`` or GPT-2 ``Conv1D`` ``module`` with ``mask`` (``[out, in]``)."""
        weight, bias = linear_weight(module)
        return cls(weight.contiguous(), mask, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight * self.mask if torch.is_grad_enabled() else self.weight
        return F.linear(x, weight, self.bias)

    @torch.no_grad()
    def apply_mask_(self) -> "MaskedLinear":
        """Zero the pruned entries of ``weight`` again (after editing it in place)."""
        self.weight.masked_fill_(~self.mask, 0)
        return self

    @classmethod
    def tied_to(cls, owner: "MaskedEmbedding", bias: torch.Tensor | None = None) -> "MaskedLinear":
        """An LM head sharing ``owner``'s ``weight`` parameter and ``mask`` (a tied embedding)."""
        head = cls(torch.zeros(0, 0, device=owner.weight.device), torch.zeros(0, 0, dtype=torch.bool), bias)
        head.out_features, head.in_features = (int(s) for s in owner.weight.shape)
        head.weight = owner.weight
        head.mask = owner.mask  # the same tensor: one mask for both
        return head

    @property
    def kept(self) -> int:
        return int(self.mask.sum())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kept={self.kept:,}/{self.mask.numel():,}")


class MaskedEmbedding(nn.Embedding):
    """An embedding whose pruned entries are held at zero by a fixed mask (see ``MaskedLinear``).

    ``weight`` is ``[num_embeddings, dim]``, zero where the bool buffer ``mask`` is False;
    ``forward(ids) = F.embedding(ids, weight * mask, padding_idx)`` (the product skipped without
    gradients, as in ``MaskedLinear``).
    """

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, padding_idx: int | None = None):
        if weight.dim() != 2 or tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"weight must be [num, dim] and mask the same shape; got "
                             f"{tuple(weight.shape)} and {tuple(mask.shape)}")
        nn.Module.__init__(self)  # nn.Embedding.__init__ would allocate and initialize a weight
        self.num_embeddings, self.embedding_dim = (int(s) for s in weight.shape)
        self.padding_idx, self.max_norm, self.norm_type = padding_idx, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        mask = mask.to(device=weight.device, dtype=torch.bool)
        self.weight = nn.Parameter(weight.detach().clone().masked_fill_(~mask, 0))
        self.register_buffer("mask", mask.clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self.weight * self.mask if torch.is_grad_enabled() else self.weight
        return F.embedding(ids, weight, self.padding_idx)

    @torch.no_grad()
    def apply_mask_(self) -> "MaskedEmbedding":
        """Zero the pruned entries of ``weight`` again (after editing it in place)."""
        self.weight.masked_fill_(~self.mask, 0)
        return self

    @property
    def kept(self) -> int:
        return int(self.mask.sum())

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, kept={self.kept:,}/{self.mask.numel():,}"


def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``MaskedLinear``/``MaskedEmbedding`` of ``model`` by name, a shared one under each of its names."""
    return {n: m for n, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, (MaskedLinear, MaskedEmbedding))}
