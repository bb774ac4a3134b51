"""File writes that never leave half a file, and the one JSON form of workbench data.

Every file the workbench writes goes through ``atomic_write`` (bytes) or one of its
wrappers: the data lands in a uniquely named temporary file beside the target, which is
flushed and then renamed over the target, so a reader sees the old file or the new one,
never half of one, and two writers never share a temporary name.

>>> import tempfile, pathlib
>>> with tempfile.TemporaryDirectory() as d:
...     _ = write_json(pathlib.Path(d) / "a.json", {"b": 2, "a": (1, 2)})
...     (pathlib.Path(d) / "a.json").read_text()
'{\\n  "a": [\\n    1,\\n    2\\n  ],\\n  "b": 2\\n}\\n'
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable

FILE_MODE = 0o644  # every file a package or cache holds: readable by all, like pip's files
PRIVATE_MODE = 0o600  # key material


def atomic_write(path: str | os.PathLike, data: bytes, *, mode: int = FILE_MODE) -> Path:
    """Write ``data`` to ``path`` through a unique temporary file and one rename.

    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as d:
    ...     atomic_write(pathlib.Path(d) / "x.bin", b"abc").read_bytes()
    b'abc'
    """
    path = Path(path)
    return atomic_write_with(path, lambda tmp: tmp.write_bytes(data), mode=mode)


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], Any], *,
                      mode: int = FILE_MODE) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then rename it over ``path``.

    For writers that want a file name (``safetensors.torch.save_file``). The temporary
    file is removed if ``write`` fails, and the target is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # the writer may have recreated the file with the umask's mode
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def to_json(data: Any, *, indent: int | None = 2) -> str:
    """The workbench's JSON text: sorted keys, so equal data gives equal bytes.

    Results and configs serialize through their ``to_dict``; tensors and arrays through
    ``tolist``; tuples and sets as lists. Anything else is an error, never ``str(x)``.
    """
    return json.dumps(data, indent=indent, sort_keys=True, default=json_default)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as JSON (``to_json``, newline-terminated) atomically."""
    return atomic_write(path, (to_json(data) + "\n").encode())


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for workbench values; raises for anything unknown."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write a {type(value).__name__} as JSON")
