"""Reading a package back (layout: ``uqcit.package.format``) into a runnable model.

``load_package`` rebuilds a transformers model from ``config.json`` whose quantized modules
run from the packed codes, pruned ones from their sparse values, after verifying the
signature (given a public key) and decrypting/decoding the weights (given the secret).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from uqcit.package.format import METADATA_FILE, LoadedPackage, PackageError, read_json, read_metadata
from uqcit.package.secure.encryption import Unlocker
from uqcit.package.secure.signing import verify_package
from uqcit.runtime.masked import MaskedEmbedding, MaskedLinear
from uqcit.runtime.modules import Compensation, QuantEmbedding, QuantLinear, replace_module
from uqcit.runtime.online import apply_online_rotations
from uqcit.tensor.formats import parse_format
from uqcit.tensor.quant import QuantizedTensor
from uqcit.tensor.sparse import sparse_decode


def load_package(path: str | os.PathLike, *, progress: bool = True, public_key=None,
                 secret=None, decode: bool = True) -> LoadedPackage:
    """Load a package into a runnable transformers model whose quantized layers run from packed codes.

    With ``public_key`` (Ed25519, ``uqcit.package.secure.load_public_key``) the package is verified
    first and refused, naming the file, if anything was modified, added or removed.
    Encrypted or keyed-encoded weights need the ``secret`` they were exported with;
    ``decode=False`` keeps keyed-encoded weights as stored (a model that computes garbage,
    to see what the encoding does).

    >>> import tempfile
    >>> from uqcit.inputs.tiny import tiny_model
    >>> from uqcit.package.export import export_package
    >>> from uqcit.stages.levels import analyze_levels
    >>> from uqcit.stages.plan import PlanConfig, build_plan
    >>> from uqcit.stages.quantize import quantize_model
    >>> model, tok = tiny_model("llama")
    >>> levels = analyze_levels(model)
    >>> q = quantize_model(model, levels, build_plan(levels, PlanConfig(preset="uniform", group_size=32)),
    ...                    progress=False)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     pkg = load_package(export_package(q, tok, f"{d}/package", source_model="tiny-llama"), progress=False)
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> torch.equal(pkg.model(ids).logits, q.model(ids).logits)  # the same stored codes, the same function
    True
    >>> pkg.model.generate(ids, max_new_tokens=4, do_sample=False).shape
    torch.Size([1, 7])
    """
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    path = Path(path)
    if public_key is not None:
        verify_package(path, public_key)
    meta = read_metadata(path)
    unlock = Unlocker(path, meta, secret, decode=decode)
    config_dict = read_json(path / "config.json")
    try:
        config = AutoConfig.for_model(**config_dict)
    except (ValueError, KeyError, TypeError) as exc:
        raise PackageError(f"{path / 'config.json'}: not a transformers config ({exc})") from exc

    builder = AutoModelForCausalLM if meta.get("model_class", "").endswith("ForCausalLM") else AutoModel
    model = _build_from_config(builder, config, meta.get("model_class"))

    layers = sorted({e["layer"] for e in meta["modules"].values() if "layer" in e}
                    | {e["layer"] for e in meta["float_tensors"].values() if "layer" in e})
    state: dict[str, torch.Tensor] = {}
    for layer in tqdm(layers, desc="load package", unit="layer", disable=not progress):
        state.update(_load_layer(path, layer, unlock))

    built: dict[str, QuantizedTensor] = {}
    modules = meta["modules"]
    for name, entry in modules.items():
        if entry.get("tied_to"):
            continue
        if entry["kind"] in ("masked_linear", "masked_embedding"):
            built[name] = _load_masked(path, name, entry, state)
            continue
        try:
            fmt = parse_format(entry["format"])
            q = QuantizedTensor.from_state_dict(state, f"{name}.", tuple(entry["shape"]), fmt)
        except (KeyError, ValueError) as exc:
            raise PackageError(f"{path / 'layers' / entry['layer'] / 'weights.safetensors'}: "
                               f"module {name} cannot be rebuilt ({exc})") from exc
        built[name] = q
    named = dict(model.named_modules())
    for name, entry in modules.items():
        if name not in named:
            raise PackageError(f"{path / METADATA_FILE}: module {name} does not exist in a "
                               f"{type(model).__name__} built from config.json")
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
                except (KeyError, ValueError) as exc:
                    raise PackageError(f"{path / 'layers' / entry['layer'] / 'weights.safetensors'}: "
                                       f"compensation of {name} cannot be rebuilt ({exc})") from exc
        replace_module(model, name, new)

    float_state = {}
    for key, entry in meta["float_tensors"].items():
        src = entry.get("tied_to", key)
        if src not in state:
            raise PackageError(f"{path / 'layers'}: float tensor {src} is missing from the weight files")
        float_state[key] = state[src]
    own = model.state_dict()
    missing = [k for k in own if k not in float_state and k.rsplit(".", 1)[0] not in modules]
    if missing:
        raise PackageError(f"{path}: the package does not hold {len(missing)} tensor(s) the model "
                           f"needs, e.g. {missing[:5]}")
    model.load_state_dict(float_state, strict=False, assign=False)
    rot_state: dict[str, torch.Tensor] = {}
    for layer_dir in sorted(p for p in (path / "layers").iterdir() if p.is_dir()):
        rot_state.update(unlock.read(f"layers/{layer_dir.name}/rotation.safetensors") or {})
    if rot_state:
        apply_online_rotations(model, rot_state)
    model.eval()

    tok_dir = path / "tokenizer"
    if not tok_dir.is_dir():
        raise PackageError(f"{tok_dir}: folder missing; the package has no tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    except (OSError, ValueError) as exc:
        raise PackageError(f"{tok_dir}: tokenizer cannot be loaded ({exc})") from exc
    return LoadedPackage(model, tokenizer, meta, path, time.perf_counter() - t0)


def _load_layer(path: Path, layer: str, unlock: Unlocker | None = None) -> dict[str, torch.Tensor]:
    f = path / "layers" / layer / "weights.safetensors"
    if unlock is not None and (unlock.encrypted or unlock.encoded):
        tensors = unlock.read(f"layers/{layer}/weights.safetensors")
        if tensors is None:
            raise PackageError(f"{f}: file missing; the package is incomplete")
        return tensors
    if not f.is_file():
        raise PackageError(f"{f}: file missing; the package is incomplete")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PackageError(f"{f}: cannot be read as safetensors ({exc}); the package is corrupt "
                           "or truncated") from exc


def _load_masked(path: Path, name: str, entry: Mapping[str, Any], state: Mapping[str, torch.Tensor]):
    """Rebuild one pruned layer from its sparse tensors."""
    parts = {k: state[f"{name}.{k}"] for k in ("values", "bitmap", "indices") if f"{name}.{k}" in state}
    try:
        weight, mask = sparse_decode(parts, tuple(entry["shape"]))
    except (KeyError, ValueError, RuntimeError) as exc:
        raise PackageError(f"{path / 'layers' / entry['layer'] / 'weights.safetensors'}: pruned module "
                           f"{name} cannot be rebuilt ({exc})") from exc
    if entry["kind"] == "masked_embedding":
        return MaskedEmbedding(weight, mask, entry.get("padding_idx"))
    return MaskedLinear(weight, mask, state.get(f"{name}.bias") if entry.get("has_bias") else None)


def _tied_masked(built, entry: Mapping[str, Any], bias):
    """The module for a pruned entry: its own, or one sharing its owner's weight and mask."""
    if entry.get("tied_to") and isinstance(built, MaskedEmbedding) and entry["kind"] == "masked_linear":
        return MaskedLinear.tied_to(built, bias)  # an LM head tied to a pruned embedding
    return built


def _build_from_config(builder, config, model_class: str | None):
    """An un-trained model of the package's class; its random init is overwritten right after."""
    import transformers

    cls = getattr(transformers, model_class, None) if model_class else None
    gen_state = torch.random.get_rng_state()
    try:
        model = cls._from_config(config) if cls is not None else builder.from_config(config)
    finally:
        torch.random.set_rng_state(gen_state)  # building must not disturb the caller's RNG
    return model
