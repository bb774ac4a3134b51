"""Reading a package back (layout: ``uqcit.package.format``) into a runnable model.

``load_package`` rebuilds a transformers model from ``config.json`` whose quantized modules
run from the packed codes, pruned ones from their sparse values, after verifying the
signature (given a public key) or the SHA-256 manifest, and decrypting/decoding the weights
(given the secret). Everything the package declares is checked before the model is built
(``uqcit.package.validate``): only the files its metadata names are read, at the folders the
naming rule gives, and every failure is a ``PackageError`` naming the file and the field.
``device`` and ``dtype`` place the built model (``resolve_device``, ``LOAD_DTYPES``).
"""
from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from uqcit.core.keys import ConfigError
from uqcit.inputs.skeleton import fill_meta_buffers
from uqcit.package.format import METADATA_FILE, LoadedPackage, PackageError, PackageMetadata, read_json, read_metadata
from uqcit.package.secure.encryption import Unlocker
from uqcit.package.secure.signing import verify_manifest, verify_package
from uqcit.package.validate import (
    ROTATION, WEIGHTS, LoadPlan, build_model, check_config, check_config_types, check_data, check_tensors,
    check_tree, config_errors, plan_load, read_header, specs_of)
from uqcit.runtime.masked import MaskedEmbedding, MaskedLinear
from uqcit.runtime.modules import Compensation, QuantEmbedding, QuantLinear, replace_module
from uqcit.runtime.online import apply_online_rotations
from uqcit.tensor.formats import parse_format
from uqcit.tensor.quant import QuantizedTensor
from uqcit.tensor.sparse import sparse_decode

# What rebuilding a checked module or rotation can still raise on contents no check foresaw.
_REBUILD_ERRORS = (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError)
# Compute dtypes a package loads in. The stored codes and fp16 scales keep their dtypes whatever this
# is (``uqcit.runtime.modules``); the float parts and the dequantized weights follow it.
LOAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` this machine has: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``;
    ``ConfigError`` naming it otherwise (a name torch does not know, no GPU, a GPU index too high).

    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("gpu")
    Traceback (most recent call last):
    ...
    uqcit.core.keys.ConfigError: device 'gpu': torch knows no such device; use 'cpu', 'cuda' or 'cuda:N'
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device {device!r}: torch knows no such device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ConfigError(f"device {device!r}: the workbench runs on 'cpu' or 'cuda[:N]', not {dev.type!r}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"device {device!r}: torch sees no CUDA GPU here (torch.cuda.is_available() is False); "
                          "use device 'cpu', or a machine and torch build with CUDA")
    if dev.index is not None and dev.index >= count:
        raise ConfigError(f"device {device!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}; "
                          "choose one of them or 'cpu'")
    return dev


def check_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` when a package can compute in it (``LOAD_DTYPES``), else ``ConfigError`` naming it.

    >>> check_dtype(torch.bfloat16)
    torch.bfloat16
    >>> check_dtype("bfloat16")
    Traceback (most recent call last):
    ...
    uqcit.core.keys.ConfigError: dtype 'bfloat16': a package loads in torch.float32, torch.bfloat16 or torch.float16 (pass the torch.dtype)
    """
    if not isinstance(dtype, torch.dtype) or dtype not in LOAD_DTYPES:
        raise ConfigError(f"dtype {dtype!r}: a package loads in torch.float32, torch.bfloat16 or torch.float16 "
                          "(pass the torch.dtype)")
    return dtype


def load_package(path: str | os.PathLike, *, progress: bool = True, public_key=None, secret=None,
                 decode: bool = True, verify: bool = True, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None) -> LoadedPackage:
    """Load a package into a runnable transformers model whose quantized layers run from packed codes.

    With ``public_key`` (Ed25519, ``uqcit.package.secure.load_public_key``) the package is verified
    first and refused, naming the file, if anything was modified, added or removed. Without a key,
    every file is still checked against the package's SHA-256 manifest (``verify=False`` skips it).
    Encrypted or keyed-encoded weights need the ``secret`` they were exported with;
    ``decode=False`` keeps keyed-encoded weights as stored (a model that computes garbage,
    to see what the encoding does). Names, types, shapes, dtypes and sizes are checked against
    the architecture ``config.json`` describes before any weight memory is allocated.

    ``dtype`` (``torch.bfloat16`` or ``torch.float16``; default float32) is the compute dtype: the
    float parts are cast to it and quantized layers dequantize into it (the packed C kernel, CPU
    float32 only, is then not used), while the stored codes and scales keep theirs. ``device``
    (``"cuda"``, ``"cuda:N"``; default the CPU) is where the model is moved once built; both are
    checked before anything is read (``resolve_device``, ``check_dtype``).

    >>> import tempfile
    >>> from uqcit.package.export import export_package
    >>> from uqcit.package.examples import tiny_quantized
    >>> q, tok = tiny_quantized()
    >>> with tempfile.TemporaryDirectory() as d:
    ...     pkg = load_package(export_package(q, tok, f"{d}/package", source_model="tiny-llama"), progress=False)
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> torch.equal(pkg.model(ids).logits, q.model(ids).logits)  # the same stored codes, the same function
    True
    >>> pkg.model.generate(ids, max_new_tokens=4, do_sample=False).shape
    torch.Size([1, 7])
    >>> with tempfile.TemporaryDirectory() as d:
    ...     half = load_package(export_package(q, tok, f"{d}/package", source_model="tiny-llama"), progress=False,
    ...                         dtype=torch.bfloat16)
    >>> half.model(ids).logits.dtype
    torch.bfloat16
    """
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoTokenizer

    t0 = time.perf_counter()
    device = None if device is None else resolve_device(device)
    dtype = None if dtype is None else check_dtype(dtype)
    path = Path(path)
    check_tree(path)  # no symlink or FIFO is followed or opened, not even to hash it
    if public_key is not None:
        verify_package(path, public_key)
    elif verify:  # integrity by default: every file against uqcit_manifest.json (verify=False skips it)
        verify_manifest(path)
    meta = read_metadata(path)
    PackageMetadata.read(path)  # every field's type, before any entry is used
    try:
        unlock = Unlocker(path, meta, secret, decode=decode)
    except PackageError:
        raise
    except (ValueError, KeyError, TypeError) as exc:  # a protection record of the right types, wrong values
        raise PackageError(f"{path / METADATA_FILE}: protection cannot be read ({type(exc).__name__}: "
                           f"{str(exc)[:200]}); the package is corrupt") from exc
    config_dict = read_json(path / "config.json")
    check_config(path / "config.json", config_dict)
    # auto_map points transformers at the package's modeling_uqcit.py (uqcit.package.remote); the model
    # built here is the plain transformers class, and its config must not send exports there
    config_dict.pop("auto_map", None)
    try:
        config = AutoConfig.for_model(**config_dict)
    except config_errors() as exc:
        raise PackageError(f"{path / 'config.json'}: not a transformers config "
                           f"({type(exc).__name__}: {str(exc)[:200]})") from exc

    check_config_types(path / "config.json", config_dict, config)
    plan = plan_load(path, meta, config)  # on the meta device: nothing allocated yet
    state: dict[str, torch.Tensor] = {}
    for layer in tqdm(sorted(plan.weights), desc="load package", unit="layer", disable=not progress):
        state.update(_read_checked(path, f"layers/{layer}/{WEIGHTS}", unlock, plan.weights[layer], plan))
    rot_state: dict[str, torch.Tensor] = {}
    for layer, expect in sorted(plan.rotations.items()):
        rot_state.update(_read_checked(path, f"layers/{layer}/{ROTATION}", unlock, expect, None))
    if plan.check_unlisted_rotations:
        _refuse_unlisted_rotations(path, plan, unlock)
    check_data(path, plan, state, rot_state)

    # On the meta device: the float model is never allocated, only what the package holds (a
    # class whose computed buffers live inside its layers is built in full, as before).
    model = build_model(path, plan.model_cls, config, "meta")
    if fill_meta_buffers(model, config):
        model = build_model(path, plan.model_cls, config)
    built: dict[str, Any] = {}
    modules = meta["modules"]
    for name, entry in modules.items():
        if entry.get("tied_to"):
            continue
        if entry["kind"] in ("masked_linear", "masked_embedding"):
            built[name] = _load_masked(path, name, entry, state)
            continue
        try:
            fmt = parse_format(entry["format"])
            built[name] = QuantizedTensor.from_state_dict(state, f"{name}.", tuple(entry["shape"]), fmt)
        except _REBUILD_ERRORS as exc:
            raise PackageError(f"{_weights(path, entry)}: module {name} cannot be rebuilt ({exc})") from exc
    named = dict(model.named_modules())
    for name, entry in modules.items():
        q = built[entry["tied_to"]] if entry.get("tied_to") else built[name]
        if entry["kind"] in ("masked_linear", "masked_embedding"):
            new = _tied_masked(q, entry, state.get(f"{name}.bias") if entry.get("has_bias") else None)
        elif entry["kind"] == "embedding":
            new = QuantEmbedding(q, padding_idx=getattr(named[name], "padding_idx", None))
        else:
            bias = state.get(f"{name}.bias") if entry.get("has_bias") else None
            new = QuantLinear(q, bias)
            if entry.get("compensation"):
                try:
                    new.set_compensation(Compensation.from_state_dict(state, f"{name}.compensation.",
                                                                      entry["compensation"]))
                except _REBUILD_ERRORS as exc:
                    raise PackageError(f"{_weights(path, entry)}: compensation of {name} cannot be "
                                       f"rebuilt ({exc})") from exc
        replace_module(model, name, new)

    model.load_state_dict(_float_state(model, meta["float_tensors"], state), strict=False, assign=True)
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise PackageError(f"{path / METADATA_FILE}: lists no values for {', '.join(empty[:3])}"
                           f"{' ...' if len(empty) > 3 else ''} of the model; the package is corrupt")
    if rot_state:
        try:
            apply_online_rotations(model, rot_state)
        except _REBUILD_ERRORS as exc:
            raise PackageError(f"{path / 'layers'}: online rotations cannot be installed "
                               f"({type(exc).__name__}: {str(exc)[:200]}); the package is corrupt") from exc
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    model.eval()
    # transformers' own save would fail deep inside on the shared embedding/head buffers, and what it
    # wrote (packed codes) no transformers loader reads back: refuse it, naming the exports that work.
    model.save_pretrained = functools.partial(_refuse_save_pretrained, path)
    return LoadedPackage(model, _tokenizer(path, AutoTokenizer), meta, path, time.perf_counter() - t0)


def _float_state(model: torch.nn.Module, entries: Mapping[str, Any], state: Mapping[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """The package's float tensors for ``load_state_dict(assign=True)``: each in its target's dtype,
    and given to every name that shares the target (tied weights stay one storage)."""
    targets = model.state_dict(keep_vars=True)
    sharing: dict[int, list[str]] = {}
    for key, t in targets.items():
        sharing.setdefault(id(t), []).append(key)
    out: dict[str, torch.Tensor] = {}
    for key, entry in entries.items():
        value = state[entry.get("tied_to", key)]
        if key not in targets:
            out[key] = value  # load_state_dict ignores it (strict=False), as before
            continue
        value = value.to(targets[key].dtype)
        for name in sharing[id(targets[key])]:
            out[name] = value
    return out


def _refuse_save_pretrained(path: Path, *args: Any, **kwargs: Any) -> None:
    """``save_pretrained`` of a model ``load_package`` built: raises, saying what to use instead."""
    raise NotImplementedError(
        f"save_pretrained cannot save the model of package {str(path)!r}: its compressed modules hold "
        "packed codes or sparse values that transformers cannot load back. For a transformers "
        "checkpoint (float weights) use `uqcit export PACKAGE --to hf` or "
        "uqcit.export.hf.export_dequantized(package, out); to keep the compression, export to "
        "compressed-tensors or GGUF (uqcit.export.compressed_tensors, uqcit.export.gguf); the package "
        "folder itself reloads with uqcit.load_package or transformers' from_pretrained(package, "
        "trust_remote_code=True)")


def _weights(path: Path, entry: Mapping[str, Any]) -> Path:
    return path / "layers" / entry["layer"] / WEIGHTS


def _read_checked(path: Path, rel: str, unlock: Unlocker, expect, plan: LoadPlan | None) -> dict[str, torch.Tensor]:
    """The tensors of ``rel``, its header checked against ``expect`` before the data is read."""
    f = path / rel
    sparse = plan.sparse if plan is not None else None
    if unlock.encrypted or unlock.encoded:  # the header is inside the ciphertext: check after decrypting
        tensors = unlock.read(rel)
        if tensors is None:
            raise PackageError(f"{f}: file missing; the package is incomplete")
        check_tensors(f, specs_of(tensors), expect, sparse)
        return tensors
    if not f.is_file():
        raise PackageError(f"{f}: file missing; the package is incomplete")
    check_tensors(f, read_header(f), expect, sparse)
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PackageError(f"{f}: cannot be read as safetensors ({exc}); the package is corrupt "
                           "or truncated") from exc


def _refuse_unlisted_rotations(path: Path, plan: LoadPlan, unlock: Unlocker) -> None:
    """Metadata without ``online_rotations`` (written before it was recorded): refuse rotations it
    cannot vouch for, rather than drop them silently; nothing of them is applied."""
    for layer in sorted(plan.weights):
        rel = f"layers/{layer}/{ROTATION}"
        if unlock.encrypted or unlock.encoded:
            held = list(unlock.read(rel) or {})
        else:
            held = list(read_header(path / rel)) if (path / rel).is_file() else []
        if held:
            raise PackageError(f"{path / rel}: holds online rotations that uqcit_metadata.json does not list "
                               "(online_rotations); re-export the package with this version")


def _load_masked(path: Path, name: str, entry: Mapping[str, Any], state: Mapping[str, torch.Tensor]):
    """Rebuild one pruned layer from its sparse tensors."""
    parts = {k: state[f"{name}.{k}"] for k in ("values", "bitmap", "indices") if f"{name}.{k}" in state}
    try:
        weight, mask = sparse_decode(parts, tuple(entry["shape"]))
    except _REBUILD_ERRORS as exc:
        raise PackageError(f"{_weights(path, entry)}: pruned module {name} cannot be rebuilt ({exc})") from exc
    if entry["kind"] == "masked_embedding":
        return MaskedEmbedding(weight, mask, entry.get("padding_idx"))
    return MaskedLinear(weight, mask, state.get(f"{name}.bias") if entry.get("has_bias") else None)


def _tied_masked(built, entry: Mapping[str, Any], bias):
    """The module for a pruned entry: its own, or one sharing its owner's weight and mask."""
    if entry.get("tied_to") and isinstance(built, MaskedEmbedding) and entry["kind"] == "masked_linear":
        return MaskedLinear.tied_to(built, bias)  # an LM head tied to a pruned embedding
    return built


def _tokenizer(path: Path, auto_tokenizer):
    tok_dir = path / "tokenizer"
    if not tok_dir.is_dir():
        raise PackageError(f"{tok_dir}: folder missing; the package has no tokenizer")
    try:
        return auto_tokenizer.from_pretrained(str(tok_dir))
    except Exception as exc:  # noqa: BLE001 -- tokenizers raises bare Exception on a damaged file
        raise PackageError(f"{tok_dir}: tokenizer cannot be loaded ({type(exc).__name__}: "
                           f"{str(exc)[:200]}); the package is corrupt") from exc
