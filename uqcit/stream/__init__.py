"""Models larger than memory: the quantize job one decoder block at a time (``compress_streamed``),
from lazily read safetensors shards, with a block-level checkpoint to resume from.

Its names load on first use, so ``uqcit --help`` (which adds ``--stream``) does not import torch.
"""
from __future__ import annotations

_EXPORTS = {"compress_streamed": "uqcit.stream.job", "StreamReport": "uqcit.stream.report",
            "LazyCheckpoint": "uqcit.stream.source"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    import importlib

    if name not in _EXPORTS:
        raise AttributeError(f"module 'uqcit.stream' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
