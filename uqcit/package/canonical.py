"""Reproducible package bytes: one safetensors writer, one timestamp rule, one set of file modes.

- ``save_safetensors``: the safetensors library writes its ``__metadata__`` map in hash order,
  which changes from one process to the next. This serializes with the library (so names,
  dtypes, data order and offsets are the library's own) and rewrites the JSON header with
  sorted keys and no spaces, padded with spaces to a multiple of 8 bytes as the library pads
  it: equal tensors and metadata give equal bytes.
- ``created_stamp``: the metadata's ``created``. ``SOURCE_DATE_EPOCH`` (the reproducible-builds
  convention) wins when set; else ``reproducible=True`` gives the epoch itself,
  ``1970-01-01T00:00:00+0000`` (the stamp is then a fixed value, not a time); else the wall
  clock. Always UTC, so the time zone never changes the bytes.
- ``normalize_modes``: 0644 for every file, 0755 for every folder, whatever the umask or the
  writer (tokenizer files, safetensors) chose.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Mapping

import torch

from uqcit.core.io import FILE_MODE, atomic_write_with

DIR_MODE = 0o755
STAMP_FORMAT = "%Y-%m-%dT%H:%M:%S+0000"


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors serialization of ``tensors`` with a sorted, compact header (deterministic).

    >>> data = safetensors_bytes({"w": torch.zeros(2)}, {"b": "1", "a": "2"})
    >>> data[8:8 + int.from_bytes(data[:8], "little")]  # padded with spaces to a multiple of 8
    b'{"__metadata__":{"a":"2","b":"1"},"w":{"data_offsets":[0,8],"dtype":"F32","shape":[2]}} '
    >>> from safetensors.torch import load
    >>> load(data)["w"]
    tensor([0., 0.])
    """
    from safetensors.torch import save

    raw = save(dict(tensors), metadata=dict(metadata) if metadata else None)
    return canonical_safetensors(raw)


def canonical_safetensors(raw: bytes) -> bytes:
    """``raw`` (a safetensors file) with its header re-serialized with sorted keys; data unchanged."""
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` to ``path`` atomically with deterministic bytes (``safetensors_bytes``)."""
    data = safetensors_bytes(tensors, metadata)
    return atomic_write_with(Path(path), lambda tmp: tmp.write_bytes(data))


def canonicalize_file(path: str | os.PathLike) -> Path:
    """Rewrite a safetensors file written elsewhere (e.g. ``SensitivityResult.save``) in canonical form."""
    path = Path(path)
    data = canonical_safetensors(path.read_bytes())
    return atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


def created_stamp(reproducible: bool = False) -> str:
    """The metadata's ``created``: ``SOURCE_DATE_EPOCH``, else the epoch if ``reproducible``, else now (UTC)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is not None:
        try:
            seconds = int(epoch)
        except ValueError:
            raise ValueError(f"SOURCE_DATE_EPOCH={epoch!r} is not an integer number of seconds; "
                             "set it to e.g. $(git log -1 --format=%ct) or unset it") from None
    else:
        seconds = 0 if reproducible else int(time.time())
    return time.strftime(STAMP_FORMAT, time.gmtime(seconds))


def normalize_modes(root: str | os.PathLike) -> None:
    """0755 for ``root`` and every folder below it, 0644 for every file (symlinks are left to the check)."""
    root = Path(root)
    os.chmod(root, DIR_MODE)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, DIR_MODE)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, FILE_MODE)
