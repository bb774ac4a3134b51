"""Calibration statistics: the "accumulate" half of every data-aware stage.

``collect_input_stats`` runs calibration text through the model with forward hooks on the
named modules and accumulates, per module, the token mean of ``x xᵀ`` over its inputs (the
Hessian ``H`` of the layer's squared output error, used by GPTQ) and of ``x_j²`` per input
channel (its diagonal, used by activation-aware importance). Inputs are folded into the sums
micro-batch by micro-batch and never stored.

``uqcit.inputs.replay.BlockReplay`` runs calibration text through a stack of blocks one block at
a time, so that these statistics can be collected after the blocks before were modified.

The diagonal empirical Fisher (squared gradients of the model's loss) is ``uqcit.inputs.fisher``.

>>> from uqcit.inputs.tiny import tiny_model
>>> model, tok = tiny_model("llama")
>>> batch = torch.randint(0, 256, (2, 16))
>>> stats = collect_input_stats(model, batch, ["model.layers.0.mlp.down_proj"], progress=False)
>>> stats["model.layers.0.mlp.down_proj"].hessian.shape
torch.Size([128, 128])
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Iterable, Literal, Mapping

import torch
from torch import nn

from uqcit.runtime.modules import linear_weight


@dataclasses.dataclass(eq=False)  # holds tensors: compare them explicitly
class InputStats:
    """Input statistics of one module over the calibration tokens.

    For a Linear/Conv1D module (inputs ``x`` of width ``in``): ``channel_sq[j]`` is the mean of
    ``x_j²`` over tokens and ``hessian`` the mean of ``x xᵀ`` (``diag(hessian) == channel_sq``).
    For an embedding the input is a one-hot token: ``channel_sq[t]`` is token ``t``'s frequency
    (the diagonal of its ``H``, which is diagonal) and there is no ``hessian`` (it would be
    vocab × vocab).
    """

    name: str
    kind: Literal["linear", "embedding"]
    tokens: int  # calibration tokens seen
    channel_sq: torch.Tensor  # float32 [in] (embedding: [num_embeddings])
    hessian: torch.Tensor | None = None  # float32 [in, in]; None for embeddings or hessian=False
    cross: torch.Tensor | None = None  # float32 [in, in]: mean of x_float x̃ᵀ, float input times this one

    @property
    def in_features(self) -> int:
        return self.channel_sq.numel()

    @property
    def channel_norm(self) -> torch.Tensor:
        """Root-mean-square of each input channel: Wanda's ‖x_j‖ up to the constant √tokens."""
        return self.channel_sq.sqrt()

    @property
    def nbytes(self) -> int:
        mats = [t for t in (self.hessian, self.cross, self.channel_sq) if t is not None]
        return sum(t.numel() * t.element_size() for t in mats)

    def __repr__(self) -> str:
        return (f"InputStats({self.name!r}, {self.kind}, in={self.in_features}, tokens={self.tokens}, "
                f"hessian={'yes' if self.hessian is not None else 'no'})")


def collect_input_stats(model: nn.Module, batch: torch.Tensor, modules: Iterable[str], *,
                        hessian: bool = True, micro_batch: int = 4,
                        progress: bool = True) -> dict[str, InputStats]:
    """Input statistics of ``modules`` (Linear, Conv1D or Embedding names) over ``batch``.

    ``batch`` is ``LongTensor [n, seq]`` of token ids (e.g. ``uqcit.inputs.corpus.calibration_batch``), run
    ``micro_batch`` sequences at a time with no gradients. ``hessian=False`` keeps only the
    per-channel diagonal. Memory: a Hessian is ``4 · in²`` bytes per module (SmolLM2-135M:
    about 0.5 GB for all 210 Linear layers); pass fewer ``modules`` to bound it. Embeddings
    never get a Hessian (see ``InputStats``). Modules fed the same input tensor in one forward
    (q/k/v, gate/up) share the computation of ``x xᵀ``. The model is not modified: its hooks
    are removed when collection ends, also on error.
    """
    from tqdm.auto import tqdm

    batch = _check_batch(batch)
    _check_micro_batch(micro_batch)
    modules = _names(modules)
    device = _model_device(model)
    with InputStatsCollector(model, modules, hessian=hessian) as col, torch.no_grad():
        for s in tqdm(range(0, batch.shape[0], micro_batch), desc="calibration inputs", unit="batch",
                      disable=not progress):
            _forward(model, batch[s:s + micro_batch].to(device))
            col.end_batch()
    return col.stats()


class InputStatsCollector:
    """Context manager collecting input statistics during whatever forward passes run inside it.

    ``collect_input_stats`` is this around a calibration loop; use it directly to gather the
    statistics during another pass, e.g. the Fisher pass of ``uqcit.inputs.fisher.accumulate_fisher``:

    >>> from uqcit.inputs.fisher import accumulate_fisher
    >>> from uqcit.inputs.tiny import tiny_model
    >>> model, _ = tiny_model("llama")
    >>> batch = torch.randint(0, 256, (2, 16))
    >>> with InputStatsCollector(model, ["lm_head"], hessian=False) as col:
    ...     fisher = accumulate_fisher(model, batch, modules=["lm_head"], progress=False)
    >>> col.stats()["lm_head"].tokens
    32

    ``modules`` is a list of names, or a mapping name -> whether that module gets a Hessian
    (``hessian`` applies to a list). Hooks are removed on exit, also on error. ``cross=True``
    (linears only) pairs each pass with the one before it inside ``recording()`` (``InputStats.cross``).
    """

    def __init__(self, model: nn.Module, modules: Iterable[str] | Mapping[str, bool], *, hessian: bool = True,
                 cross: bool = False):
        targets = _resolve(model, modules)
        want = dict(modules) if isinstance(modules, Mapping) else {n: hessian for n in targets}
        self._targets = {n: (m, bool(want[n])) for n, m in targets.items()}
        self._cross = cross
        self._acc: dict[str, _Acc] = {}
        self._shared = _SharedProduct()
        self._handles: list = []
        self._taken = False

    def __enter__(self) -> "InputStatsCollector":
        if self._handles or self._acc:
            raise RuntimeError("an InputStatsCollector collects once; make a new one")
        try:
            for name, (module, hessian) in self._targets.items():
                if isinstance(module, nn.Embedding):
                    if self._cross:
                        raise TypeError(f"{name}: cross terms are collected for linear modules, not embeddings")
                    a = _Acc(name, "embedding", torch.zeros(module.num_embeddings, dtype=torch.float64,
                                                            device=module.weight.device))
                    hook = _embedding_hook(a)
                else:
                    n_in = linear_weight(module)[0].shape[1]
                    dev = module.weight.device
                    square = lambda: torch.zeros(n_in, n_in, dtype=torch.float32, device=dev)  # noqa: E731
                    a = _Acc(name, "linear", torch.zeros(n_in, dtype=torch.float32, device=dev),
                             square() if hessian else None, cross=square() if self._cross else None)
                    hook = _linear_hook(a, self._shared)
                self._acc[name] = a
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    @contextlib.contextmanager
    def recording(self):
        """Inside, passes only record each module's input ``x`` (the float model's, same tokens); the
        next pass outside adds ``x x̃ᵀ`` with its own inputs ``x̃`` to ``cross`` (``cross=True``)."""
        if not self._cross:
            raise RuntimeError("recording() pairs inputs for cross terms: make the collector with cross=True")
        self._shared.recording = True
        try:
            yield
        finally:
            self._shared.recording = False

    def end_batch(self) -> None:
        """Drop the one input still referenced (optional: only frees its memory sooner)."""
        self._shared.clear()

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._shared.clear()

    def stats(self) -> dict[str, InputStats]:
        """The statistics per module, token means over everything seen. Call it once, after
        collecting: the sums become means in place (no second copy of the Hessians)."""
        if self._handles:
            raise RuntimeError("stats() is read after the `with` block has ended")
        if self._taken:
            raise RuntimeError("stats() was already taken from this collector")
        self._taken = True
        return {name: a.finish() for name, a in self._acc.items()}


def channel_importance(stats: InputStats, weight: torch.Tensor) -> torch.Tensor:
    """``|W| · ‖x‖`` per weight (Wanda's score) for ``weight`` in ``[out, in]`` convention.

    Linear stats broadcast along rows (input channel ``j`` scales column ``j``); embedding stats
    along columns (token ``t``'s frequency scales row ``t``).
    """
    norm = stats.channel_norm.to(device=weight.device)
    w = weight.detach().to(torch.float32).abs()
    if stats.kind == "embedding":
        if w.shape[0] != norm.numel():
            raise ValueError(f"{stats.name}: embedding stats cover {norm.numel()} tokens, "
                             f"weight has {w.shape[0]} rows")
        return w * norm[:, None]
    if w.shape[-1] != norm.numel():
        raise ValueError(f"{stats.name}: stats have {norm.numel()} input channels, weight has {w.shape[-1]}")
    return w * norm


# ------------------------------------------------------------------------------ internals


@dataclasses.dataclass(eq=False)
class _Acc:
    name: str
    kind: Literal["linear", "embedding"]
    sq: torch.Tensor  # linear: Σ x_j² (unused when xxt is kept); embedding: token counts (float64, exact)
    xxt: torch.Tensor | None = None  # Σ x xᵀ
    tokens: int = 0
    cross: torch.Tensor | None = None  # Σ x_float x̃ᵀ

    def finish(self) -> InputStats:
        n = max(self.tokens, 1)
        cross = None if self.cross is None else self.cross.div_(n)
        if self.xxt is not None:
            h = self.xxt.div_(n)
            return InputStats(self.name, self.kind, self.tokens, h.diagonal().clone(), h, cross)
        return InputStats(self.name, self.kind, self.tokens, (self.sq / n).to(torch.float32), None, cross)


class _SharedProduct:
    """The last input seen and its ``(Σ x xᵀ, Σ x², rows)``: q/k/v (and gate/up) get the very
    same tensor one after another, so computing the product once saves two thirds of the work.
    Holds one reference at a time, dropped after every micro-batch. While ``recording``, hooks put
    their inputs in ``refs`` instead (in call order); ``cross`` shares ``Σ x_float x̃ᵀ`` likewise."""

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None
        self.value: tuple[torch.Tensor | None, torch.Tensor, int] | None = None
        self.recording = False
        self.refs: dict[str, list[torch.Tensor]] = {}
        self.pair: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def get(self, x: torch.Tensor, want_xxt: bool):
        if self.x is x and self.value is not None and (self.value[0] is not None or not want_xxt):
            return self.value
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        xxt = flat.T @ flat if want_xxt else None
        sq = flat.square().sum(0)
        self.x, self.value = x, (xxt, sq, flat.shape[0])
        return self.value

    def cross(self, ref: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.pair is None or self.pair[0] is not ref or self.pair[1] is not x:
            if ref.shape != x.shape:
                raise RuntimeError(f"cross terms pair inputs of one shape, got {tuple(ref.shape)} and {tuple(x.shape)}")
            flat = lambda t: t.detach().reshape(-1, t.shape[-1]).to(torch.float32)  # noqa: E731
            self.pair = (ref, x, flat(ref).T @ flat(x))
        return self.pair[2]

    def clear(self) -> None:
        self.x = self.value = self.pair = None
        self.refs = {}


def _linear_hook(acc: _Acc, shared: _SharedProduct):
    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("input", kwargs.get("x"))
        if x is None:
            raise RuntimeError(f"{acc.name}: could not find the input of {type(module).__name__}.forward")
        if shared.recording:  # the float pass of a pair: only its inputs
            shared.refs.setdefault(acc.name, []).append(x)
            return
        xxt, sq, rows = shared.get(x, acc.xxt is not None)
        if acc.xxt is not None:
            acc.xxt.add_(xxt)
        else:
            acc.sq.add_(sq)
        if acc.cross is not None:
            refs = shared.refs.get(acc.name)
            if not refs:
                raise RuntimeError(f"{acc.name}: no float input to pair with; run the float pass inside recording()")
            acc.cross.add_(shared.cross(refs.pop(0), x))
        acc.tokens += rows
    return hook


def _embedding_hook(acc: _Acc):
    def hook(module, args, kwargs):
        ids = args[0] if args else kwargs["input"]
        ids = ids.detach().reshape(-1)
        acc.sq.add_(torch.bincount(ids, minlength=acc.sq.numel()).to(acc.sq.dtype))
        acc.tokens += ids.numel()
    return hook


def _forward(model: nn.Module, ids: torch.Tensor, **kwargs):
    # No KV cache: calibration runs whole sequences once, a cache would only cost memory.
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kwargs["use_cache"] = False
    return model(input_ids=ids, **kwargs)


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes the keyword ``name``."""
    return name in inspect.signature(model.forward).parameters


def _names(modules: Iterable[str]) -> list[str]:
    """``modules`` as a non-empty list of names."""
    if isinstance(modules, str):
        raise TypeError(f"modules must be a list of module names, not the string {modules!r}")
    names = list(modules)
    if not names:
        raise ValueError("modules is empty: name at least one Linear, Conv1D or Embedding module")
    return names


def _check_micro_batch(micro_batch: int) -> None:
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")


def _check_batch(batch: torch.Tensor) -> torch.Tensor:
    if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or batch.dtype != torch.long:
        raise ValueError(f"batch must be a LongTensor [n, seq] of token ids, got "
                         f"{getattr(batch, 'dtype', type(batch).__name__)} of shape "
                         f"{tuple(getattr(batch, 'shape', ()))}")
    if batch.numel() == 0:
        raise ValueError(f"batch is empty (shape {tuple(batch.shape)})")
    return batch


def _is_weight_module(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, nn.Embedding, Conv1D))


def _resolve(model: nn.Module, modules: Iterable[str]) -> dict[str, nn.Module]:
    if isinstance(modules, str):
        raise TypeError(f"modules must be a list of module names, not the string {modules!r}")
    named = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for name in modules:
        if name not in named:
            raise ValueError(f"{type(model).__name__} has no module {name!r}")
        module = named[name]
        if not _is_weight_module(module):
            raise TypeError(f"module {name!r} is a {type(module).__name__}; calibration statistics "
                            "are collected for nn.Linear, transformers Conv1D and nn.Embedding")
        out[name] = module
    return out


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _as_out_in(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``module.weight`` in ``[out, in]`` convention (Conv1D stores ``[in, out]``)."""
    from transformers.pytorch_utils import Conv1D

    return t.t().contiguous() if isinstance(module, Conv1D) else t

