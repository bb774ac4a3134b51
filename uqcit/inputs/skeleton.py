"""Models with no weights: a transformers model built on the meta device, its computed buffers made real.

Building a model on the meta device (``with torch.device("meta")``) allocates nothing, but also
leaves its computed, non-persistent buffers (rotary frequencies, position ids) as meta tensors:
no file holds them, so whoever fills the skeleton's weights needs them recomputed.
``fill_meta_buffers`` takes them from the same model class built on the CPU with no layers and an
8-token vocabulary, which costs next to nothing; buffers that live inside the layers cannot come
from there and are returned, so the caller can build that model in full instead (or refuse).

>>> from uqcit.inputs.tiny import tiny_model
>>> model, _ = tiny_model("llama")
>>> with torch.device("meta"):
...     empty = type(model)._from_config(model.config)
>>> [n for n, b in empty.named_buffers() if b.is_meta]
['model.rotary_emb.inv_freq', 'model.rotary_emb.original_inv_freq']
>>> fill_meta_buffers(empty, model.config)
[]
>>> torch.equal(empty.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
True
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def fill_meta_buffers(model: nn.Module, config, dtype: torch.dtype | None = None) -> list[str]:
    """Give ``model``'s meta buffers the values the same class computes on the CPU (a copy of
    ``config`` with no layers and an 8-token vocabulary); returns the names it could not fill
    (buffers inside the layers, or a class that cannot be built that small), in place otherwise."""
    missing = [name for name, b in model.named_buffers() if b.is_meta]
    if not missing:
        return []
    small = copy.deepcopy(config)
    small.num_hidden_layers, small.vocab_size, small.pad_token_id = 0, 8, None
    if getattr(small, "layer_types", None) is not None:
        small.layer_types = []
    gen_state = torch.random.get_rng_state()
    try:  # building must not disturb the caller's RNG
        kwargs = {} if dtype is None else {"dtype": dtype}
        buffers = dict(type(model)._from_config(small, **kwargs).named_buffers())
    except Exception:  # noqa: BLE001 (any model class's own failure: the caller builds in full)
        return missing
    finally:
        torch.random.set_rng_state(gen_state)
    unfilled = []
    for name in missing:
        if name not in buffers or buffers[name].shape != model.get_buffer(name).shape:
            unfilled.append(name)
            continue
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, buffers[name])
    return unfilled
