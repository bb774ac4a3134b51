"""The package itself in transformers: ``AutoModelForCausalLM.from_pretrained(package, trust_remote_code=True)``.

Every package carries ``modeling_uqcit.py`` (a copy of ``uqcit/package/modeling_uqcit.py``) and an
``auto_map`` in its ``config.json`` naming that file's ``UqcitModel`` for the auto class that fits
the stored model (``AutoModelForCausalLM`` for a causal LM); ``write_remote_code`` adds both when
a package is sealed (``uqcit.package.export``), and ``load_package`` ignores the ``auto_map``. ``config.json`` keeps the source
model's ``model_type``, so ``AutoConfig`` and ``AutoTokenizer`` read the package as before; with
``trust_remote_code=True`` transformers imports the shipped file, whose ``from_pretrained`` hands
over to ``from_pretrained`` here, which calls ``load_package``: every format, rotation and
compensation the package holds, its manifest verified, the same logits. The shipped file is small
on purpose: the loading logic lives in the installed workbench, so an old package loads with the
reader the user has, and the file's bytes (covered by the manifest and any signature) rarely change.

>>> import tempfile, torch
>>> from uqcit.package import export_package, load_package
>>> from uqcit.package.examples import tiny_quantized
>>> q, tok = tiny_quantized()
>>> with tempfile.TemporaryDirectory() as d:
...     path = export_package(q, tok, f"{d}/pkg", source_model="tiny-llama")
...     auto = auto_map_of(path)
...     via_transformers = from_pretrained(path, trust_remote_code=True, progress=False)
>>> auto
{'AutoModelForCausalLM': 'modeling_uqcit.UqcitModel'}
>>> ids = torch.tensor([[1, 2, 3]])
>>> torch.equal(via_transformers(ids).logits, q.model(ids).logits)
True
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from uqcit.core.io import write_json
from uqcit.package.format import METADATA_FILE, read_json
from uqcit.package.load import load_package

MODELING_FILE = "modeling_uqcit.py"
MODEL_CLASS = "UqcitModel"
# Auto classes tried in this order: the first whose transformers mapping lists the stored class wins.
_AUTO_MAPPINGS = (("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
                  ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
                  ("AutoModel", "MODEL_MAPPING_NAMES"))
# What transformers' auto classes hand every from_pretrained (plumbing, not options of the load).
_PLUMBING = frozenset({"config", "trust_remote_code", "_from_auto", "adapter_kwargs", "code_revision",
                       "_commit_hash", "proxies"})
_HUB = ("cache_dir", "force_download", "local_files_only", "revision", "token")
_LOAD = ("secret", "public_key", "verify", "decode", "progress")
# transformers' device_map strategies that spread a model over devices: a package loads on one.
_SPREAD = ("auto", "balanced", "balanced_low_0", "sequential")


def auto_class(model_class: str, model_type: str) -> str | None:
    """The transformers auto class whose mapping builds ``model_class`` for ``model_type``, or None.

    >>> auto_class("LlamaForCausalLM", "llama"), auto_class("BertModel", "bert"), auto_class("Foo", "llama")
    ('AutoModelForCausalLM', 'AutoModel', None)
    """
    from transformers.models.auto import modeling_auto

    for auto, mapping in _AUTO_MAPPINGS:
        names = getattr(modeling_auto, mapping).get(model_type, ())
        if model_class in ((names,) if isinstance(names, str) else names):
            return auto
    return None


def write_remote_code(root: str | os.PathLike) -> Path | None:
    """Give the package folder ``root`` its transformers entry point: the ``auto_map`` in ``config.json``
    for the auto class that builds the stored model (``model_class`` of the metadata) and the shipped
    ``modeling_uqcit.py``; returns that file's path, or None (and no ``auto_map``) when no auto class
    builds the model. A source model's own ``auto_map`` is dropped either way: the package does not
    ship that code. Run when a package is sealed, so every package, streamed or not, gets it."""
    root = Path(root)
    config = read_json(root / "config.json")
    config.pop("auto_map", None)
    auto = auto_class(str(read_json(root / METADATA_FILE).get("model_class")), str(config.get("model_type")))
    if auto is not None:
        config["auto_map"] = {auto: f"{Path(MODELING_FILE).stem}.{MODEL_CLASS}"}
    write_json(root / "config.json", config)
    if auto is None:
        (root / MODELING_FILE).unlink(missing_ok=True)
        return None
    out = root / MODELING_FILE
    shutil.copyfile(Path(__file__).with_name(MODELING_FILE), out)
    return out


def auto_map_of(path: str | os.PathLike) -> dict[str, str]:
    """The ``auto_map`` of the package at ``path`` (empty for a package written before it was added)."""
    auto = read_json(Path(path) / "config.json").get("auto_map")
    return dict(auto) if isinstance(auto, dict) else {}


def from_pretrained(name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any) -> torch.nn.Module:
    """The model of the package at ``name_or_path`` (a folder, or a Hugging Face repository id that is
    downloaded whole first), built by ``load_package``: what the shipped ``UqcitModel.from_pretrained``
    returns to ``AutoModelForCausalLM.from_pretrained(package, trust_remote_code=True)``.

    Takes ``load_package``'s ``secret``, ``public_key``, ``verify``, ``decode`` and ``progress``, and the
    hub's ``revision``, ``token``, ``cache_dir``, ``local_files_only``, ``force_download``, ``subfolder``.
    ``dtype`` (or ``torch_dtype``: float32, bfloat16, float16, as a ``torch.dtype`` or its name;
    ``"auto"`` is float32) and a ``device_map`` naming one device (``"cpu"``, ``"cuda"``, ``"cuda:N"``,
    a ``torch.device`` or a GPU index) go to ``load_package``'s ``dtype`` and ``device``. A
    ``device_map`` that spreads the model (``"auto"``, a dict) and any other option are refused by name.
    """
    if model_args:
        raise TypeError(f"a UQCIT package takes no positional model arguments after the path, got {model_args!r}")
    dtype = kwargs.pop("dtype", None)
    dtype = kwargs.pop("torch_dtype", None) if dtype is None else dtype
    if isinstance(dtype, str) and dtype != "auto" and isinstance(getattr(torch, dtype, None), torch.dtype):
        dtype = getattr(torch, dtype)  # transformers takes dtype names too: "bfloat16"
    device = kwargs.pop("device_map", None)
    if isinstance(device, dict) or device in _SPREAD:
        raise ValueError(f"device_map={device!r}: a UQCIT package loads whole on one device; pass "
                         "device_map='cpu', 'cuda' or 'cuda:N'")
    device = f"cuda:{device}" if isinstance(device, int) and not isinstance(device, bool) else device
    hub = {k: kwargs.pop(k) for k in _HUB if k in kwargs}
    subfolder = kwargs.pop("subfolder", "") or ""
    load = {k: kwargs.pop(k) for k in _LOAD if k in kwargs}
    unknown = sorted(k for k in kwargs if k not in _PLUMBING)
    if unknown:
        raise TypeError(f"from_pretrained got option(s) {unknown} that a UQCIT package does not take; it takes "
                        f"{list(_LOAD)} (uqcit.load_package's) and the hub's {[*_HUB, 'subfolder']}")
    return load_package(_local(name_or_path, hub) / subfolder, device=device,
                        dtype=None if dtype == "auto" else dtype, **load).model


def _local(name_or_path: str | os.PathLike, hub: dict[str, Any]) -> Path:
    """``name_or_path`` itself when it is a folder, else the downloaded snapshot of that repository."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    # The whole package: load_package verifies the manifest, so a partial download is refused by name.
    return Path(snapshot_download(str(name_or_path), **{k: v for k, v in hub.items() if v is not None}))
