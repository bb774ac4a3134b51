"""Modules that run on quantized storage: ``QuantLinear`` and ``QuantEmbedding``.

They hold only what ``quant.quantize`` stored (packed codes, fp16 scales, masks...) as
persistent buffers, so ``state_dict()`` holds exactly the stored bits. ``QuantLinear`` computes
few-token calls (decoding) straight from the packed codes with the C kernel of
``uqcit.runtime.kernel`` where it is available and handles the format, and otherwise dequantizes the
weight for the call. A ``Compensation`` (noise correction of ``uqcit.stages.compensate``: low-rank
factors and an output scale/shift) can be attached to a ``QuantLinear``. ``linear_weight`` presents ``nn.Linear`` and GPT-2's ``Conv1D`` (which stores its
weight transposed) as one ``[out, in]`` matrix, so a ``QuantLinear`` replaces both.

>>> import torch
>>> from uqcit.tensor.formats import QuantFormat
>>> lin = torch.nn.Linear(64, 32)
>>> qlin = quantize_linear(lin, QuantFormat(bits=8, group_size=64))
>>> qlin(torch.randn(2, 64)).shape
torch.Size([2, 32])
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from uqcit.core.names import DEFAULT_BLOCK_PATTERN, block_of, stack_of
from uqcit.runtime import kernel as packed
from uqcit.tensor.formats import QuantFormat, parse_format
from uqcit.tensor.quant import QuantizedTensor, dequantize, dequantize_at, quantize, tensor_layout

KERNEL_MAX_ROWS = 16  # up to this many input rows the packed kernel beats dequantize + F.linear


@dataclasses.dataclass(eq=False)  # holds tensors: compare them explicitly
class Compensation:
    """Stored correction of one quantized linear layer's output (see ``uqcit.stages.compensate``).

    The layer computes ``y = scale * (Ŵx + A(Bx)) + shift + bias``: ``a`` ``[out, r]`` and ``b``
    ``[r, in]`` are low-rank factors (fp16 or integer ``QuantizedTensor``s), ``scale`` and
    ``shift`` fp16 ``[out]`` vectors; any part may be absent. ``stored_bits`` counts all of it.
    """

    a: QuantizedTensor | None = None
    b: QuantizedTensor | None = None
    scale: torch.Tensor | None = None  # fp16 [out]
    shift: torch.Tensor | None = None  # fp16 [out]

    def __post_init__(self) -> None:
        if (self.a is None) != (self.b is None):
            raise ValueError("low-rank compensation needs both factors a [out, r] and b [r, in]")
        if self.a is not None and (len(self.a.shape) != 2 or len(self.b.shape) != 2
                                   or self.a.shape[1] != self.b.shape[0]):
            raise ValueError(f"factors a {self.a.shape} and b {self.b.shape} must be [out, r] and [r, in]")
        for name in ("scale", "shift"):
            t = getattr(self, name)
            if t is not None and (t.dtype != torch.float16 or t.dim() != 1):
                raise ValueError(f"{name} must be a 1-D fp16 tensor, got {t.dtype} of shape {tuple(t.shape)}")

    @property
    def rank(self) -> int:
        return 0 if self.a is None else self.a.shape[1]

    @property
    def stored_bits(self) -> int:
        bits = sum(q.stored_bits for q in (self.a, self.b) if q is not None)
        return bits + sum(16 * t.numel() for t in (self.scale, self.shift) if t is not None)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.a is not None:
            out.update(self.a.state_dict(prefix + "a."))
            out.update(self.b.state_dict(prefix + "b."))
        for name in ("scale", "shift"):
            if getattr(self, name) is not None:
                out[prefix + name] = getattr(self, name)
        return out

    def meta(self) -> dict[str, Any]:
        """JSON-able description (the tensors go to ``state_dict``)."""
        lowrank = None if self.a is None else {
            "rank": self.rank, "a": {"shape": list(self.a.shape), "format": self.a.fmt.name},
            "b": {"shape": list(self.b.shape), "format": self.b.fmt.name}}
        return {"lowrank": lowrank, "scale": self.scale is not None, "shift": self.shift is not None,
                "stored_bits": self.stored_bits}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], prefix: str, meta: dict[str, Any]) -> "Compensation":
        """Read back what ``state_dict(prefix)`` wrote, as described by ``meta()``."""
        a = b = None
        lr = meta.get("lowrank")
        if lr:
            a = QuantizedTensor.from_state_dict(state, prefix + "a.", tuple(lr["a"]["shape"]), parse_format(lr["a"]["format"]))
            b = QuantizedTensor.from_state_dict(state, prefix + "b.", tuple(lr["b"]["shape"]), parse_format(lr["b"]["format"]))
        parts = {}
        for name in ("scale", "shift"):
            if meta.get(name):
                if prefix + name not in state:
                    raise ValueError(f"state lacks {prefix + name}, named by the compensation metadata")
                parts[name] = state[prefix + name]
        return cls(a, b, **parts)


class _QuantStorage(nn.Module):
    """Shared plumbing: the stored tensors as buffers, and keeping their dtypes fixed.

    ``model.to(torch.bfloat16)`` (or ``.half()``) casts every floating buffer; the fp16 scales
    and values are part of the storage format, so ``_apply`` lets device moves through and
    undoes dtype changes on them. The buffers are ``q``'s own tensors, not copies (so modules
    built from one ``QuantizedTensor``, like a tied embedding and LM head, share storage, and
    ``load_state_dict`` writes into ``q``). A dequantized-weight cache, when enabled, is dropped
    whenever the buffers move or are loaded.
    """

    def _init_storage(self, q: QuantizedTensor, cache_dequantized: bool) -> None:
        self.shape = q.shape
        self.fmt = q.fmt
        self._names = tuple(q.tensors)
        for name, t in q.tensors.items():
            self.register_buffer(name, t, persistent=True)
        self.cache_dequantized = cache_dequantized
        self._cache: torch.Tensor | None = None
        self._kernel = None  # QuantLinear: packed.PackedKernel (False: not usable), dropped when buffers change

    @property
    def qtensor(self) -> QuantizedTensor:
        """The ``QuantizedTensor`` held by the buffers (shares their memory)."""
        return QuantizedTensor(self.shape, self.fmt, {n: getattr(self, n) for n in self._names})

    @property
    def bits_per_weight(self) -> float:
        return self.fmt.bits_per_weight(math.prod(self.shape))

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The full weight in ``dtype``; reuses the cached copy when ``cache_dequantized``."""
        cache = self._cache
        if cache is not None and cache.dtype == dtype:
            return cache
        w = dequantize(self.qtensor, dtype=dtype)
        if self.cache_dequantized:
            self._cache = w
        return w

    def clear_cache(self) -> None:
        """Drop what was derived from the buffers (after they change in place)."""
        self._cache = None
        self._kernel = None  # it may hold decoded scales

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "_QuantStorage":
        stored = {n: self._buffers[n] for n in self._names}
        super()._apply(fn, recurse)
        for name, old in stored.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        self._cache = None
        self._kernel = None  # it points into the old buffers
        return self

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._cache = None
        self._kernel = None
        super()._load_from_state_dict(*args, **kwargs)


class QuantLinear(_QuantStorage):
    """``nn.Linear`` whose weight ``[out_features, in_features]`` is stored quantized.

    For float32, bfloat16 or float16 CPU inputs of at most ``KERNEL_MAX_ROWS`` rows (decoding) forward runs the
    packed kernel (``uqcit.runtime.kernel``: computes from the codes, equal to float32 rounding) when it
    is available and handles the format (``packed_kernel=True``, the default). Otherwise it
    dequantizes the weight to the input's dtype and calls ``F.linear``, exactly
    ``F.linear(x, dequantize(q, x.dtype), bias)``. ``cache_dequantized=True`` keeps the
    dequantized weight after the first forward: faster for long inputs, but it holds a full
    float copy of the weight in memory, which is what quantization was meant to save (off by
    default). ``set_compensation`` attaches a ``Compensation``.
    """

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None = None, *, cache_dequantized: bool = False,
                 packed_kernel: bool = True):
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D [out, in] weight, got shape {q.shape}")
        self.out_features, self.in_features = q.shape
        self._init_storage(q, cache_dequantized)
        self.packed_kernel = packed_kernel
        self.compensation: Compensation | None = None
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone())
        else:
            self.register_parameter("bias", None)

    @classmethod
    def empty(
        cls, out_features: int, in_features: int, fmt: QuantFormat, bias: bool = False, *,
        device: torch.device | str | None = None, cache_dequantized: bool = False,
    ) -> "QuantLinear":
        """A zero-filled module of this shape and format, ready for ``load_state_dict``."""
        q = _empty_qtensor((out_features, in_features), fmt, device)
        b = torch.zeros(out_features, device=device) if bias else None
        return cls(q, b, cache_dequantized=cache_dequantized)

    def set_compensation(self, comp: Compensation | None) -> None:
        """Attach (or with None remove) a noise correction; its factors are kept dequantized in
        float32 for compute (small: ``rank * (in + out)`` values), as non-persistent buffers."""
        for name in ("_comp_a", "_comp_b", "_comp_scale", "_comp_shift"):
            self._buffers.pop(name, None)
        self.compensation = comp
        if comp is None:
            return
        if comp.a is not None:
            if comp.a.shape[0] != self.out_features or comp.b.shape[1] != self.in_features:
                raise ValueError(f"factors a {comp.a.shape}, b {comp.b.shape} do not fit a "
                                 f"[{self.out_features}, {self.in_features}] layer")
            self.register_buffer("_comp_a", dequantize(comp.a), persistent=False)
            self.register_buffer("_comp_b", dequantize(comp.b), persistent=False)
        for name in ("scale", "shift"):
            t = getattr(comp, name)
            if t is not None:
                if t.numel() != self.out_features:
                    raise ValueError(f"compensation {name} has {t.numel()} values, the layer {self.out_features} outputs")
                self.register_buffer(f"_comp_{name}", t.to(torch.float32), persistent=False)

    def _packed_kernel(self, x: torch.Tensor):
        """The prepared kernel when it should compute this call, else None."""
        # bfloat16/float16 inputs run it too, in float32 (the kernel widens them): dequantizing the whole
        # weight to bfloat16 on every call made a bfloat16 package ~10x slower to decode than float32.
        if (not self.packed_kernel or self.cache_dequantized or x.device.type != "cpu"
                or x.dtype not in (torch.float32, torch.bfloat16, torch.float16)):
            return None
        if _tracing():  # an opaque C call cannot go into a traced graph (torch.export, ONNX, compile)
            return None
        if x.numel() > KERNEL_MAX_ROWS * self.in_features:
            return None
        if self._kernel is None:  # decided once per placement of the buffers
            q = self.qtensor
            self._kernel = packed.PackedKernel(q) if packed.available() and packed.supports(q) else False
        return self._kernel or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        comp = self.compensation
        kernel = self._packed_kernel(x)
        if kernel is not None:
            y = kernel(x).to(x.dtype)
        elif comp is None:  # exactly F.linear on the dequantized weight
            return F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        else:
            y = F.linear(x, self.dequantized(x.dtype))
        if comp is not None:
            if comp.a is not None:
                y = y + F.linear(F.linear(x, self._comp_b.to(x.dtype)), self._comp_a.to(x.dtype))
            if comp.scale is not None:
                y = y * self._comp_scale.to(x.dtype)
            if comp.shift is not None:
                y = y + self._comp_shift.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def extra_repr(self) -> str:
        comp = "" if self.compensation is None else (
            f", compensation=rank {self.compensation.rank}"
            + (" +scale" if self.compensation.scale is not None else "")
            + (" +shift" if self.compensation.shift is not None else ""))
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, format={self.fmt.name}, bpw={self.bits_per_weight:.4g}{comp}"
        )


class QuantEmbedding(_QuantStorage):
    """``nn.Embedding`` whose table ``[num_embeddings, embedding_dim]`` is stored quantized.

    forward equals ``F.embedding(ids, dequantize(q))`` bit for bit, but dequantizes only the
    looked-up rows (``quant.dequantize_at``), unless ``cache_dequantized=True``, which keeps the
    whole dequantized table after the first call. Output dtype follows the module's dtype
    (float32 until ``.to(dtype)``).
    """

    def __init__(self, q: QuantizedTensor, padding_idx: int | None = None, *, cache_dequantized: bool = False):
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"QuantEmbedding needs a 2-D [num_embeddings, dim] table, got shape {q.shape}")
        self.num_embeddings, self.embedding_dim = q.shape
        if padding_idx is not None:
            if not -self.num_embeddings <= padding_idx < self.num_embeddings:
                raise ValueError(f"padding_idx {padding_idx} out of range for {self.num_embeddings} embeddings")
            padding_idx %= self.num_embeddings
        self.padding_idx = padding_idx
        self._init_storage(q, cache_dequantized)
        # An empty float tensor that goes through .to()/.half() like any float buffer: its dtype
        # is the module's compute dtype (the stored fp16 buffers keep theirs, see _apply).
        self.register_buffer("_dtype_anchor", torch.empty(0, device=q.device), persistent=False)

    @classmethod
    def empty(
        cls, num_embeddings: int, embedding_dim: int, fmt: QuantFormat, padding_idx: int | None = None, *,
        device: torch.device | str | None = None, cache_dequantized: bool = False,
    ) -> "QuantEmbedding":
        """A zero-filled module of this shape and format, ready for ``load_state_dict``."""
        q = _empty_qtensor((num_embeddings, embedding_dim), fmt, device)
        return cls(q, padding_idx, cache_dequantized=cache_dequantized)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype_anchor.dtype

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (computed on each access unless cached): for code that reads
        ``embed_tokens.weight.dtype``/``.device``; it is a plain tensor, not a Parameter."""
        return self.dequantized(self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # A traced graph (torch.export, ONNX) cannot branch on the ids' values, which the row
        # lookup checks: it records the whole-table lookup, the same values.
        if self.cache_dequantized or _tracing():
            return F.embedding(ids, self.dequantized(self.dtype), self.padding_idx)
        if ids.numel():
            lo, hi = torch.aminmax(ids)
            if int(lo) < 0 or int(hi) >= self.num_embeddings:
                raise IndexError(f"ids must lie in [0, {self.num_embeddings}), got values in [{int(lo)}, {int(hi)}]")
        # Element index of every looked-up value: [..., dim] in row-major order of the table.
        cols = torch.arange(self.embedding_dim, device=ids.device)
        index = ids.to(torch.int64).unsqueeze(-1) * self.embedding_dim + cols
        return dequantize_at(self.qtensor, index, dtype=self.dtype)

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}, format={self.fmt.name}, bpw={self.bits_per_weight:.4g}"


def _tracing() -> bool:
    """Whether this call is being traced into a graph (torch.export, torch.onnx.export, torch.compile,
    torch.jit.trace), where only tensor operations are recorded: no C kernel, no branch on values."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _empty_qtensor(shape: tuple[int, int], fmt: QuantFormat, device: torch.device | str | None) -> QuantizedTensor:
    layout = tensor_layout(math.prod(shape), fmt)
    tensors = {n: torch.zeros(spec.numel, dtype=spec.dtype, device=device) for n, spec in layout.items()}
    return QuantizedTensor(shape, fmt, tensors)


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight of ``nn.Linear`` or GPT-2 ``Conv1D`` as ``[out, in]``, and its bias (detached).

    ``Conv1D`` stores ``[in, out]`` and computes ``x @ W + b``; its transpose is returned (a
    view: do not modify it), so ``F.linear(x, weight, bias)`` reproduces the module.
    """
    from transformers.pytorch_utils import Conv1D

    if not isinstance(module, (nn.Linear, Conv1D)):
        raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")
    bias = None if module.bias is None else module.bias.detach()
    weight = module.weight.detach()
    return (weight.t() if isinstance(module, Conv1D) else weight), bias


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The detached weight of an embedding, ``nn.Linear`` or ``Conv1D`` as the matrix that is quantized."""
    if isinstance(module, nn.Embedding):
        return module.weight.detach()
    return linear_weight(module)[0]


def quantize_linear(
    module: nn.Module, fmt: QuantFormat, importance: torch.Tensor | None = None, *, cache_dequantized: bool = False
) -> QuantLinear:
    """A ``QuantLinear`` replacing ``nn.Linear``/``Conv1D`` ``module`` (``importance`` is ``[out, in]``)."""
    weight, bias = linear_weight(module)
    return QuantLinear(quantize(weight, fmt, importance), bias, cache_dequantized=cache_dequantized)


def quantize_embedding(
    module: nn.Embedding, fmt: QuantFormat, importance: torch.Tensor | None = None, *, cache_dequantized: bool = False
) -> QuantEmbedding:
    """A ``QuantEmbedding`` replacing ``module``, with its padding index, in the module's dtype."""
    if not isinstance(module, nn.Embedding):
        raise TypeError(f"expected nn.Embedding, got {type(module).__name__}")
    q = quantize(module.weight.detach(), fmt, importance)
    emb = QuantEmbedding(q, module.padding_idx, cache_dequantized=cache_dequantized)
    return emb.to(module.weight.dtype)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted ``name`` in ``model`` (numeric parts index ``ModuleList``s)."""
    if not isinstance(new, nn.Module):
        raise TypeError(f"new must be an nn.Module, got {type(new).__name__}")
    if not name:
        raise ValueError("name must name a submodule, not the model itself")
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError as err:
        raise ValueError(f"{type(model).__name__} has no submodule {parent_name!r} (replacing {name!r})") from err
    if child not in parent._modules:
        raise ValueError(f"{parent_name or type(model).__name__!r} has no child module {child!r} (replacing {name!r})")
    setattr(parent, child, new)


def block_stack(model: nn.Module, names: Iterable[str],
                block_pattern: str = DEFAULT_BLOCK_PATTERN) -> tuple[str, nn.ModuleList] | None:
    """The ``ModuleList`` of blocks that the block modules among ``names`` sit in, with its dotted name.

    None when they sit in several stacks (an encoder and a decoder), in none, or in a
    container that is not a ``ModuleList``: such models are run whole, never block by block.
    """
    stacks = {stack_of(n, block_pattern).rstrip(".") for n in names if block_of(n, block_pattern) is not None}
    if len(stacks) != 1:
        return None
    (name,) = stacks
    try:
        container = model.get_submodule(name)
    except AttributeError:
        return None
    return (name, container) if isinstance(container, nn.ModuleList) else None


def model_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits ``[b, seq, vocab]`` of ``model`` on token ``ids``, without a KV cache.

    ``ids`` move to the model's device; a model without an LM head gives its last hidden state.
    Gradients flow (wrap the call in ``torch.no_grad()`` to measure).
    """
    device = next(model.parameters()).device
    # A generative HF model keeps a cache unless told not to; plain modules take no such flag.
    accepts_cache = hasattr(model, "generation_config") or type(model).__name__.endswith("ForCausalLM")
    out = model(input_ids=ids.to(device), use_cache=False) if accepts_cache else model(input_ids=ids.to(device))
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float()
