"""Where the workbench keeps its data: converted model caches and corpora.

``home()`` resolves, in order:

1. ``$UQCIT_HOME`` when set;
2. ``<sys.prefix>/share/uqcit`` when Python runs in a virtual environment whose
   prefix is writable (a project-local venv keeps its caches beside itself);
3. ``$XDG_CACHE_HOME/uqcit``, else ``~/.cache/uqcit``.

Folders are created on first use, never at import.

>>> models_dir() == home() / "models"
True
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_HOME = "UQCIT_HOME"


def home() -> Path:
    """The workbench's data/cache folder (created on demand); see the module docstring."""
    env = os.environ.get(ENV_HOME)
    if env:
        return _ensure(Path(env).expanduser())
    if sys.prefix != sys.base_prefix:  # a venv: never write into a system-wide prefix
        candidate = Path(sys.prefix) / "share" / "uqcit"
        if _writable(candidate):
            try:
                return _ensure(candidate)
            except PermissionError:
                pass  # the check raced with a permission change: use the user cache instead
    cache_root = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return _ensure(Path(cache_root).expanduser() / "uqcit")


def corpora_dir() -> Path:
    """Text corpora fetched by ``uqcit fetch-data`` (``uqcit.inputs.corpus.fetch_corpora``)."""
    return _ensure(home() / "corpora")


def models_dir() -> Path:
    """Converted model caches, one folder per model (e.g. ``smollm2-135m``)."""
    return _ensure(home() / "models")


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _writable(path: Path) -> bool:
    """Whether ``path`` exists writable, or its nearest existing ancestor lets us create it."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)
