"""The compressed package on disk (seed 002 §5.1), safetensors and JSON only.

Layout::

    package/
      config.json              the transformers config of the model
      uqcit_metadata.json      recipe, plan, measured bits and figures, module index
      layers/layer_NNN/        one folder per transformer block NNN
        weights.safetensors    packed codes, fp16 scales/zeros, masks, float params of the block
        rotation.safetensors   rotations not folded into weights (online ones), else empty
        precision_map.json     per module: format, stored bits, bits/weight
        ghz_clusters.json      correlation clusters of the block's modules
      layers/outer/            the same files for modules outside the blocks (embeddings, head, final norm)
      tokenizer/
      validation/{perplexity,benchmarks,noise_profile}.json

A package is written to a temporary sibling folder and renamed into place, so an
existing package is never left half-overwritten. ``load_package`` rebuilds a
runnable transformers model whose quantized modules run from the packed codes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from uqcit import __version__
from uqcit.tensor.formats import parse_format
from uqcit.tensor.quant import QuantizedTensor
from uqcit.core.results import Result
from uqcit.runtime.modules import Compensation, QuantEmbedding, QuantLinear, replace_module

FORMAT_VERSION = 1
METADATA_FILE = "uqcit_metadata.json"
OUTER = "outer"
VALIDATION_FILES = ("perplexity", "benchmarks", "noise_profile")


class PackageError(ValueError):
    """A folder that is not a readable UQCIT package; the message names the file."""


@dataclasses.dataclass
class LoadedPackage:
    """A package read back: runnable model, tokenizer and its metadata."""

    model: torch.nn.Module
    tokenizer: Any
    metadata: dict[str, Any]
    path: Path
    seconds: float

    def __repr__(self) -> str:
        return (f"<LoadedPackage {self.path.name}: {self.metadata.get('method')}, "
                f"{self.metadata.get('average_bits_per_param', float('nan')):.3f} bits/weight>")


# --------------------------------------------------------------------------- export

def export_package(quantized, tokenizer, path: str | os.PathLike, *, recipe=None,
                   source_model: str = "unknown", levels=None,
                   validation: Mapping[str, Any] | None = None,
                   clusters=None, sensitivity=None,
                   extra_metadata: Mapping[str, Any] | None = None,
                   signing_key=None, protect=None, secret=None) -> Path:
    """Write ``quantized`` (a ``QuantizeResult``) as a package at ``path``, atomically.

    Returns the package path. ``validation`` maps ``perplexity``/``benchmarks``/
    ``noise_profile`` to JSON-able dicts (measured elsewhere); missing ones are
    written with what this function can measure itself (the weight noise profile).
    ``clusters`` (a ``ClustersResult``) fills each layer's ``ghz_clusters.json``;
    ``sensitivity`` (a ``SensitivityResult``) is stored as ``validation/sensitivity.safetensors``
    so another budget can be solved from the package without re-measuring.
    ``signing_key`` (Ed25519, see ``uqcit.package.secure``) signs every file; ``protect`` (a
    ``uqcit.package.secure.ProtectConfig``) encrypts and/or keyed-encodes the weight files under
    ``secret`` (never stored). Both happen in the temporary folder, before the swap.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_package(quantized, tokenizer, tmp, recipe=recipe, source_model=source_model,
                       levels=levels, validation=validation or {}, extra=extra_metadata or {},
                       clusters=clusters.for_layer_dir() if clusters is not None else {})
        if sensitivity is not None:
            sensitivity.save(tmp / "validation" / "sensitivity.safetensors")
            _refresh_package_bytes(tmp, _read_metadata(tmp))
        if signing_key is not None or (protect is not None and protect.active):
            from uqcit.package.secure import protect_package

            protect_package(tmp, protect, secret, signing_key)
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _swap_into_place(tmp: Path, path: Path) -> None:
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _layer_dir(block: int | None) -> str:
    return OUTER if block is None else f"layer_{block:03d}"


def _write_package(quantized, tokenizer, root: Path, *, recipe, source_model, levels,
                   validation, extra, clusters) -> None:
    from uqcit.stages.levels import block_of
    from uqcit.runtime.online import is_rotation_key, rotation_tensors_for_layer_dir

    model = quantized.model
    by_name = {m.name: m for m in quantized.modules}
    qmods = {name: mod for name, mod in model.named_modules() if isinstance(mod, (QuantLinear, QuantEmbedding))}
    masked = _masked_modules(model)  # pruned layers (uqcit.stages.prune), stored sparse

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    _write_json(root / "config.json", config)

    # Group every stored tensor by the block it belongs to.
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    precision: dict[str, dict[str, Any]] = {}
    module_index: dict[str, Any] = {}
    stored_ptrs: dict[tuple[int, int], str] = {}
    for name, mod in qmods.items():
        rec = by_name.get(name)
        layer = _layer_dir(block_of(name))
        q = mod.qtensor
        key_ptr = (q.tensors[next(iter(q.tensors))].data_ptr(), q.numel)
        tied_to = rec.tied_to if rec is not None else stored_ptrs.get(key_ptr)
        entry = {"layer": layer, "kind": "embedding" if isinstance(mod, QuantEmbedding) else "linear",
                 "shape": list(q.shape), "format": q.fmt.name, "tied_to": tied_to,
                 "level": rec.level if rec is not None else None,
                 "has_bias": isinstance(mod, QuantLinear) and mod.bias is not None}
        module_index[name] = entry
        if tied_to is None:
            stored_ptrs[key_ptr] = name
            tensors.setdefault(layer, {}).update(q.state_dict(prefix=f"{name}."))
            precision.setdefault(layer, {})[name] = {
                "format": q.fmt.to_dict() | {"name": q.fmt.name}, "level": entry["level"],
                "numel": q.numel, "stored_bits": q.stored_bits, "bits_per_weight": q.bits_per_weight,
                "rel_error": rec.rel_error if rec is not None else None}
        if entry["has_bias"]:
            tensors.setdefault(layer, {})[f"{name}.bias"] = mod.bias.detach().contiguous()
        comp = getattr(mod, "compensation", None)  # uqcit.stages.compensate: low-rank factors, output shift/scale
        if comp is not None:
            entry["compensation"] = comp.meta()
            tensors.setdefault(layer, {}).update(comp.state_dict(prefix=f"{name}.compensation."))
            if name in precision.get(layer, {}):
                precision[layer][name]["compensation"] = comp.meta()
    _write_masked(masked, by_name, getattr(getattr(quantized, "config", None), "value_dtype", "float32"),
                  tensors, precision, module_index)

    # Float parameters and persistent buffers of everything not quantized.
    float_index: dict[str, Any] = {}
    seen: dict[int, str] = {}
    for key, value in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in qmods or owner in masked or is_rotation_key(key):  # online rotations go to rotation.safetensors
            continue
        ptr = value.data_ptr()
        if ptr in seen and value.numel() > 0:
            float_index[key] = {"tied_to": seen[ptr]}
            continue
        seen[ptr] = key
        layer = _layer_dir(block_of(key))
        float_index[key] = {"layer": layer, "dtype": str(value.dtype).replace("torch.", "")}
        tensors.setdefault(layer, {})[key] = value.detach().contiguous()

    rotations = rotation_tensors_for_layer_dir(model)
    layer_names = sorted(set(tensors) | set(precision) | set(rotations))
    for layer in layer_names:
        ldir = root / "layers" / layer
        ldir.mkdir(parents=True)
        save_file(tensors.get(layer, {}), str(ldir / "weights.safetensors"),
                  metadata={"uqcit_format_version": str(FORMAT_VERSION), "layer": layer})
        rot = rotations.get(layer, {})
        save_file(rot, str(ldir / "rotation.safetensors"),
                  metadata={"rotations": "online" if rot else "none",
                            "note": "online rotations, installed by uqcit.runtime.online.apply_online_rotations"
                            if rot else "no rotation stored: none applied, or all folded into the weights"})
        _write_json(ldir / "precision_map.json", precision.get(layer, {}))
        _write_json(ldir / "ghz_clusters.json",
                    clusters.get(layer, {"computed": False, "clusters": [],
                                         "note": "no cluster detection ran for this package"}))

    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    tokenizer.save_pretrained(str(tok_dir))

    vdir = root / "validation"
    vdir.mkdir()
    noise = validation.get("noise_profile") or (  # a CompensateResult measures output noise too
        quantized.noise_profile() if callable(getattr(quantized, "noise_profile", None)) else None) or {
        "measure": "relative weight error ||W - W_hat|| / ||W|| per quantized module",
        "modules": {m.name: {"rel_error": m.rel_error, "sqnr_db": m.sqnr_db}
                    for m in quantized.stored}}
    _write_json(vdir / "noise_profile.json", noise)
    _write_json(vdir / "perplexity.json", validation.get("perplexity") or {"measured": False})
    _write_json(vdir / "benchmarks.json", validation.get("benchmarks") or {"measured": False})

    level_bits: dict[int, list[int]] = {}
    for m in quantized.stored:
        acc = level_bits.setdefault(m.level, [0, 0])
        acc[0] += m.numel
        acc[1] += m.stored_bits
    total_w = quantized.weight_count
    metadata = {
        "uqcit_version": __version__,
        "format_version": FORMAT_VERSION,
        "source_model": source_model,
        "model_class": type(model).__name__,
        "method": quantized.method_name,
        "recipe": recipe.to_dict() if recipe is not None else None,
        "plan": quantized.plan.to_dict() if quantized.plan is not None else None,
        "average_bits_per_param": quantized.bpw,
        "quantized_weight_count": total_w,
        "quantized_stored_bytes": quantized.stored_bits // 8,
        "level_distribution": {
            f"level_{lvl}": {"percent": 100 * w / max(total_w, 1), "avg_bits": b / w}
            for lvl, (w, b) in sorted(level_bits.items())},
        "modules": module_index,
        "float_tensors": float_index,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if hasattr(quantized, "accounting"):  # a PruneResult: kept weights vs N and N/ln N
        metadata["pruning"] = {"config": quantized.config.to_dict(), "accounting": quantized.accounting()}
    metadata.update(extra)
    _write_json(root / METADATA_FILE, metadata)
    _refresh_package_bytes(root, metadata)


def package_bytes(path: str | os.PathLike) -> int:
    """Total bytes of every file in a package folder."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def write_validation(path: str | os.PathLike, name: str, data: Mapping[str, Any], *,
                     signing_key=None) -> None:
    """Replace one ``validation/<name>.json`` of an existing package atomically.

    A signed package is re-signed, which needs its ``signing_key``: the package is first
    verified with that key (a tampered package is never re-signed), then written and
    signed again. Without the key a signed package is refused rather than left with a
    file its signature does not cover.
    """
    if name not in VALIDATION_FILES:
        raise ValueError(f"validation file must be one of {VALIDATION_FILES}, got {name!r}")
    path = Path(path)
    meta = _read_metadata(path)  # refuses a folder that is not a package
    from uqcit.package.secure import is_signed, sign_package, verify_package

    if is_signed(path):
        if signing_key is None:
            raise PackageError(f"{path}: the package is signed; writing validation/{name}.json would "
                               "break its signature. Pass signing_key= (the key that signed it) to "
                               "verify, write and re-sign it")
        verify_package(path, signing_key.public_key())
    _write_json(path / "validation" / f"{name}.json", dict(data))
    _refresh_package_bytes(path, meta)
    if signing_key is not None:
        sign_package(path, signing_key)


def _refresh_package_bytes(root: Path, metadata: dict[str, Any]) -> None:
    """Record the package's total bytes in its metadata; rewritten until the figure includes itself."""
    for _ in range(3):
        metadata["package_bytes"] = package_bytes(root)
        _write_json(root / METADATA_FILE, metadata)
        if package_bytes(root) == metadata["package_bytes"]:
            return


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


# --------------------------------------------------------------------------- load

def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise PackageError(f"{path}: file missing; this folder is not a complete UQCIT package")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{path}: not valid JSON ({exc}); the package is corrupt") from exc


def _read_metadata(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise PackageError(f"{path}: no such package folder")
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        raise PackageError(f"{meta_path}: missing; {path} is not a UQCIT package "
                           "(export one with uqcit.package.export.export_package or `uqcit compress`)")
    meta = _read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise PackageError(f"{meta_path}: format_version {meta.get('format_version') if isinstance(meta, dict) else None!r} "
                           f"is not {FORMAT_VERSION}; this package was written by another version")
    return meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a package, validated, without loading any weights."""
    return _read_metadata(Path(path))


def _load_layer(path: Path, layer: str, unlock=None) -> dict[str, torch.Tensor]:
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


def load_package(path: str | os.PathLike, *, progress: bool = True, public_key=None,
                 secret=None, decode: bool = True) -> LoadedPackage:
    """Load a package into a runnable transformers model whose quantized layers run from packed codes.

    With ``public_key`` (Ed25519, ``uqcit.package.secure.load_public_key``) the package is verified
    first and refused, naming the file, if anything was modified, added or removed.
    Encrypted or keyed-encoded weights need the ``secret`` they were exported with;
    ``decode=False`` keeps keyed-encoded weights as stored (a model that computes garbage,
    to see what the encoding does).

    >>> # pkg = load_package("runs/default/package"); pkg.model.generate(...)
    """
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    path = Path(path)
    if public_key is not None:
        from uqcit.package.secure import verify_package

        verify_package(path, public_key)
    meta = _read_metadata(path)
    from uqcit.package.secure import Unlocker

    unlock = Unlocker(path, meta, secret, decode=decode)
    config_dict = _read_json(path / "config.json")
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
        from uqcit.runtime.online import apply_online_rotations

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


def _masked_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every pruned module (``uqcit.stages.prune.MaskedLinear``/``MaskedEmbedding``) by name, a shared one
    under each of its names."""
    from uqcit.stages.prune import MaskedEmbedding, MaskedLinear

    return {n: m for n, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, (MaskedLinear, MaskedEmbedding))}


def _write_masked(masked, by_name, value_dtype: str, tensors, precision, module_index) -> None:
    """Pruned layers as kept values plus a bitmap or an index list (``prune.sparse_encode``)."""
    from uqcit.stages.levels import block_of
    from uqcit.stages.prune import MaskedEmbedding, sparse_encode

    first: dict[int, str] = {}  # id of a weight parameter -> the module that stores it
    for name, mod in masked.items():
        rec = by_name.get(name)
        layer = _layer_dir(block_of(name))
        tied_to = rec.tied_to if rec is not None and rec.tied_to else first.get(id(mod.weight))
        bias = getattr(mod, "bias", None)
        entry = {"layer": layer, "kind": "masked_embedding" if isinstance(mod, MaskedEmbedding) else "masked_linear",
                 "shape": list(mod.weight.shape), "format": f"sparse-{value_dtype}", "tied_to": tied_to,
                 "level": rec.level if rec is not None else None, "has_bias": bias is not None,
                 "padding_idx": getattr(mod, "padding_idx", None)}
        module_index[name] = entry
        if bias is not None:
            tensors.setdefault(layer, {})[f"{name}.bias"] = bias.detach().contiguous()
        if tied_to is not None:
            continue
        first[id(mod.weight)] = name
        sparse = sparse_encode(mod.weight, mod.mask, value_dtype)
        tensors.setdefault(layer, {}).update({f"{name}.{k}": v for k, v in sparse.items()})
        bits = 8 * sum(v.numel() * v.element_size() for v in sparse.values())
        storage = "bitmap" if "bitmap" in sparse else "indices"
        precision.setdefault(layer, {})[name] = {
            "format": {"name": f"sparse-{storage}-{value_dtype}", "storage": storage, "value_dtype": value_dtype},
            "level": entry["level"], "numel": mod.weight.numel(), "kept": int(sparse["values"].numel()),
            "stored_bits": bits, "bits_per_weight": bits / mod.weight.numel(),
            "rel_error": rec.rel_error if rec is not None else None}


def _load_masked(path: Path, name: str, entry: Mapping[str, Any], state: Mapping[str, torch.Tensor]):
    """Rebuild one pruned layer from its sparse tensors."""
    from uqcit.stages.prune import MaskedEmbedding, MaskedLinear, sparse_decode

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
    from uqcit.stages.prune import MaskedEmbedding, MaskedLinear

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
