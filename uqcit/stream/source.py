"""A model read lazily from its safetensors shards, on a skeleton that holds no weights.

``LazyCheckpoint`` opens a local Hugging Face model folder (``config.json`` plus one
``model.safetensors`` or the shards named by ``model.safetensors.index.json``) and reads one
tensor at a time: a shard is opened (memory-mapped) only while a tensor is copied out of it, so
the address space a job needs is one shard plus what it keeps, never the whole model.
``skeleton()`` builds the transformers model on the meta device (``accelerate.init_empty_weights``:
parameters have shapes and no storage; buffers such as rotary frequencies are real), which is
enough for the levels analysis and the bit plan, and for naming what to read.

>>> import tempfile
>>> from uqcit.inputs.tiny import tiny_model
>>> model, tok = tiny_model("llama")
>>> folder = tempfile.mkdtemp()
>>> model.save_pretrained(folder); tok.save_pretrained(folder)  # doctest: +ELLIPSIS
(...)
>>> ckpt = LazyCheckpoint(folder)
>>> ckpt.skeleton().model.layers[0].mlp.up_proj.weight.device
device(type='meta')
>>> ckpt.tensor("model.layers.0.mlp.up_proj.weight").shape
torch.Size([128, 64])
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from uqcit.inputs.skeleton import fill_meta_buffers
from uqcit.package.validate import ST_DTYPES

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPES = {name: dtype for dtype, name in ST_DTYPES.items()}  # safetensors dtype name -> torch dtype


class LazyCheckpoint:
    """The tensors of a local model folder by name, read on demand (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32):
        self.folder = Path(folder).expanduser()
        self.dtype = dtype  # what every floating-point tensor is converted to (the in-memory path's dtype)
        if not (self.folder / "config.json").is_file():
            raise FileNotFoundError(f"{str(self.folder)!r} holds no config.json: stream from a local "
                                    "transformers model folder (save_pretrained writes one)")
        self.shard_of = _shard_map(self.folder)
        self._headers: dict[Path, tuple[int, dict]] = {}

    def __repr__(self) -> str:
        return f"LazyCheckpoint({str(self.folder)!r}, {len(self.shard_of)} tensors)"

    def fingerprint(self) -> dict[str, int]:
        """Size of each shard: a resumed job checks it reads the same checkpoint."""
        return {f: (self.folder / f).stat().st_size for f in sorted(set(self.shard_of.values()))}

    def config(self):
        """The transformers config, set to this checkpoint's working dtype (as ``from_pretrained`` does)."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.folder, local_files_only=True)
        config.dtype = self.dtype
        return config

    def skeleton(self) -> torch.nn.Module:
        """The causal LM on the meta device, tied like the loaded model, in eval mode; its
        non-persistent buffers (rotary frequencies: computed, not stored) are real."""
        from transformers import AutoModelForCausalLM

        config = self.config()
        # torch.device("meta") allocates nothing; accelerate's init_empty_weights would allocate each
        # parameter on the CPU first (a 1.4 GB peak of address space for a 2.6 GB model here).
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        unfilled = fill_meta_buffers(model, config, self.dtype)
        if unfilled:
            raise ValueError(f"{type(model).__name__}: buffer {unfilled[0]!r} lives in a block; streaming rebuilds "
                             "only the buffers outside the blocks, so this model runs in memory only")
        model.tie_weights()
        model.eval()
        return model

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read from its shard (floating point converted to ``dtype``).

        Read with ``readinto`` at the header's offsets, not memory-mapped: a tensor taken from
        ``safe_open`` can be a view that keeps its whole shard mapped, which an address-space
        limit counts (and a block's tensors would keep their shard alive together)."""
        if name not in self.shard_of:
            raise KeyError(f"{self.folder}: no tensor {name!r} in the checkpoint")
        path = self.folder / self.shard_of[name]
        start, header = self._header(path)
        info = header[name]
        begin, end = info["data_offsets"]
        t = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
        with open(path, "rb") as f:
            f.seek(start + begin)
            if t.numel() and f.readinto(t.view(-1).view(torch.uint8).numpy()) != end - begin:
                raise ValueError(f"{path}: tensor {name!r} is cut short; the shard is damaged")
        return t.to(self.dtype) if t.is_floating_point() else t

    def _header(self, path: Path) -> tuple[int, dict]:
        """Where a shard's data starts, and its header (cached per shard)."""
        if path not in self._headers:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                self._headers[path] = (8 + n, json.loads(f.read(n)))
        return self._headers[path]

    def load_into(self, module: torch.nn.Module, prefix: str, *, tied: dict[str, str] | None = None) -> None:
        """Give ``module``'s parameters and persistent buffers (named ``prefix + key``) their
        values from the checkpoint, in place of meta tensors. ``tied`` maps a key of ``module``
        whose tensor the checkpoint leaves out (a tied LM head) to the checkpoint name to read."""
        state = {}
        for key in module.state_dict():
            name = (tied or {}).get(key, prefix + key)
            state[key] = self.tensor(name)
        module.load_state_dict(state, assign=True, strict=True)


def _shard_map(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file of a model folder."""
    index = folder / INDEX_FILE
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}: streaming "
                                "reads safetensors checkpoints only (save with safe_serialization)")
    with open(single, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {name: SINGLE_FILE for name in header if name != "__metadata__"}


def free(module: torch.nn.Module) -> None:
    """Send ``module``'s tensors back to the meta device: its storage is released."""
    module.to("meta")
