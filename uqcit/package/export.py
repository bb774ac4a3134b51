"""Writing a package (layout: ``uqcit.package.format``), safetensors and JSON only.

``export_package`` writes an ``ExportRecord`` (built by a stage result's ``export_record()``)
to a temporary sibling folder, signs/encrypts it there if asked, and renames it into place,
so an existing package is never left half-overwritten. ``write_validation`` replaces one
validation file of a finished package.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from uqcit import __version__
from uqcit.core.io import write_json
from uqcit.core.names import block_of, layer_dir
from uqcit.core.record import ExportRecord, Exportable, ModuleRecord, weight_noise_profile
from uqcit.package.format import (
    FORMAT_VERSION, VALIDATION_FILES, PackageError, PackageMetadata, read_metadata, refresh_package_bytes)
from uqcit.package.secure.encryption import ProtectConfig, protect_package
from uqcit.package.secure.secret import Secret
from uqcit.package.secure.signing import is_signed, sign_package, verify_package
from uqcit.runtime.masked import MaskedEmbedding, masked_modules
from uqcit.runtime.modules import QuantEmbedding, QuantLinear
from uqcit.runtime.online import is_rotation_key, rotation_tensors_for_layer_dir
from uqcit.tensor.sparse import sparse_encode


def export_package(compressed: ExportRecord | Exportable, tokenizer, path: str | os.PathLike, *, recipe=None,
                   source_model: str = "unknown", levels=None,
                   validation: Mapping[str, Any] | None = None,
                   clusters=None, sensitivity=None,
                   extra_metadata: Mapping[str, Any] | None = None,
                   signing_key=None, protect: ProtectConfig | None = None,
                   secret: Secret | None = None) -> Path:
    """Write ``compressed`` as a package at ``path``, atomically; returns the package path.

    ``compressed`` is an ``ExportRecord`` or a stage result that builds one (``QuantizeResult``,
    ``CompensateResult``, ``PruneResult``; for a retrained model pass
    ``retrain_result.export_record(compressed)``). ``validation`` maps ``perplexity``/``benchmarks``/
    ``noise_profile`` to JSON-able dicts (measured elsewhere); a missing noise profile is the
    record's own. ``clusters`` (a ``ClustersResult``) fills each layer's ``ghz_clusters.json``;
    ``sensitivity`` (a ``SensitivityResult``) is stored as ``validation/sensitivity.safetensors``
    so another budget can be solved from the package without re-measuring. ``levels`` is accepted
    for symmetry with the other stages and not stored.
    ``signing_key`` (Ed25519, see ``uqcit.package.secure``) signs every file; ``protect`` (a
    ``uqcit.package.secure.ProtectConfig``) encrypts and/or keyed-encodes the weight files under
    ``secret`` (never stored). Both happen in the temporary folder, before the swap.
    """
    record = compressed if isinstance(compressed, ExportRecord) else compressed.export_record()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        metadata = _write_package(record, tokenizer, tmp, recipe=recipe, source_model=source_model,
                                  validation=validation or {}, extra=extra_metadata or {},
                                  clusters=clusters.for_layer_dir() if clusters is not None else {})
        if sensitivity is not None:
            sensitivity.save(tmp / "validation" / "sensitivity.safetensors")
            refresh_package_bytes(tmp, metadata)
        if signing_key is not None or (protect is not None and protect.active):
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


def _write_package(record: ExportRecord, tokenizer, root: Path, *, recipe, source_model, validation,
                   extra, clusters) -> PackageMetadata:
    model = record.model
    by_name = record.by_name()
    qmods = {name: mod for name, mod in model.named_modules() if isinstance(mod, (QuantLinear, QuantEmbedding))}
    masked = masked_modules(model)  # pruned layers (uqcit.stages.prune), stored sparse

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    write_json(root / "config.json", config)

    # Group every stored tensor by the block it belongs to.
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    precision: dict[str, dict[str, Any]] = {}
    module_index: dict[str, Any] = {}
    _write_quantized(qmods, by_name, tensors, precision, module_index)
    _write_masked(masked, by_name, record.sparse_value_dtype, tensors, precision, module_index)
    float_index = _write_floats(model, set(qmods) | set(masked), tensors)

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
        write_json(ldir / "precision_map.json", precision.get(layer, {}))
        write_json(ldir / "ghz_clusters.json",
                   clusters.get(layer, {"computed": False, "clusters": [],
                                        "note": "no cluster detection ran for this package"}))

    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    tokenizer.save_pretrained(str(tok_dir))

    vdir = root / "validation"
    vdir.mkdir()
    noise = validation.get("noise_profile") or record.noise_profile or weight_noise_profile(record.modules)
    write_json(vdir / "noise_profile.json", noise)
    write_json(vdir / "perplexity.json", validation.get("perplexity") or {"measured": False})
    write_json(vdir / "benchmarks.json", validation.get("benchmarks") or {"measured": False})

    metadata = PackageMetadata(
        uqcit_version=__version__,
        format_version=FORMAT_VERSION,
        source_model=source_model,
        model_class=type(model).__name__,
        method=record.method,
        recipe=recipe.to_dict() if recipe is not None else None,
        plan=record.plan,
        average_bits_per_param=record.bpw,
        quantized_weight_count=record.weight_count,
        quantized_stored_bytes=record.stored_bits // 8,
        level_distribution=_level_distribution(record.stored, record.weight_count),
        modules=module_index,
        float_tensors=float_index,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        pruning=record.pruning,
    ).merged(extra)
    metadata.write(root)
    return refresh_package_bytes(root, metadata)


def _level_distribution(stored: tuple[ModuleRecord, ...], total_w: int) -> dict[str, dict[str, float]]:
    """Share of the compressed weights and their average bits/weight, per level."""
    level_bits: dict[int, list[int]] = {}
    for m in stored:
        acc = level_bits.setdefault(m.level, [0, 0])
        acc[0] += m.numel
        acc[1] += m.stored_bits
    return {f"level_{lvl}": {"percent": 100 * w / max(total_w, 1), "avg_bits": b / w}
            for lvl, (w, b) in sorted(level_bits.items())}


def _write_quantized(qmods, by_name: Mapping[str, ModuleRecord], tensors, precision, module_index) -> None:
    """Quantized layers: packed codes and scales, bias, and low-rank compensation if any."""
    stored_ptrs: dict[tuple[int, int], str] = {}
    for name, mod in qmods.items():
        rec = by_name.get(name)
        layer = layer_dir(block_of(name))
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
        # uqcit.stages.compensate: low-rank factors, output shift/scale (QuantEmbedding has none)
        comp = mod.compensation if isinstance(mod, QuantLinear) else None
        if comp is not None:
            entry["compensation"] = comp.meta()
            tensors.setdefault(layer, {}).update(comp.state_dict(prefix=f"{name}.compensation."))
            if name in precision.get(layer, {}):
                precision[layer][name]["compensation"] = comp.meta()


def _write_masked(masked, by_name: Mapping[str, ModuleRecord], value_dtype: str, tensors, precision,
                  module_index) -> None:
    """Pruned layers as kept values plus a bitmap or an index list (``uqcit.tensor.sparse``)."""
    first: dict[int, str] = {}  # id of a weight parameter -> the module that stores it
    for name, mod in masked.items():
        rec = by_name.get(name)
        layer = layer_dir(block_of(name))
        tied_to = rec.tied_to if rec is not None and rec.tied_to else first.get(id(mod.weight))
        is_embedding = isinstance(mod, MaskedEmbedding)
        bias = None if is_embedding else mod.bias
        entry = {"layer": layer, "kind": "masked_embedding" if is_embedding else "masked_linear",
                 "shape": list(mod.weight.shape), "format": f"sparse-{value_dtype}", "tied_to": tied_to,
                 "level": rec.level if rec is not None else None, "has_bias": bias is not None,
                 "padding_idx": mod.padding_idx if is_embedding else None}
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


def _write_floats(model: torch.nn.Module, compressed: set[str],
                  tensors: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Float parameters and persistent buffers of everything not compressed; returns their index."""
    float_index: dict[str, Any] = {}
    seen: dict[int, str] = {}
    for key, value in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in compressed or is_rotation_key(key):  # online rotations go to rotation.safetensors
            continue
        ptr = value.data_ptr()
        if ptr in seen and value.numel() > 0:
            float_index[key] = {"tied_to": seen[ptr]}
            continue
        seen[ptr] = key
        layer = layer_dir(block_of(key))
        float_index[key] = {"layer": layer, "dtype": str(value.dtype).replace("torch.", "")}
        tensors.setdefault(layer, {})[key] = value.detach().contiguous()
    return float_index


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
    read_metadata(path)  # refuses a folder that is not a package
    if is_signed(path):
        if signing_key is None:
            raise PackageError(f"{path}: the package is signed; writing validation/{name}.json would "
                               "break its signature. Pass signing_key= (the key that signed it) to "
                               "verify, write and re-sign it")
        verify_package(path, signing_key.public_key())
    write_json(path / "validation" / f"{name}.json", dict(data))
    refresh_package_bytes(path, PackageMetadata.read(path))
    if signing_key is not None:
        sign_package(path, signing_key)
