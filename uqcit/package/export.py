"""Writing a package (layout: ``uqcit.package.format``), safetensors and JSON only, atomically.

``export_package`` writes an ``ExportRecord`` (built by a stage result's ``export_record()``)
into a temporary sibling folder under the target's lock, encrypts it there if asked, writes
the integrity manifest (and the signature, with a key), verifies it, and swaps it into place
in one step (``uqcit.package.swap``): the target always names a whole package, the old one
or the new one. ``stage_package`` is the same in two halves, for a caller that loads the
staged package back and adds its validation figures before the swap (``run_job``).
``write_validation`` changes one validation file of a finished package the same way: a
copy, changed, re-manifested (re-signed), swapped.

Bytes are reproducible: sorted JSON, deterministic safetensors headers, fixed file modes,
and ``created`` from ``SOURCE_DATE_EPOCH`` (or fixed by ``reproducible=True``); see
``uqcit.package.canonical``. Encryption draws a fresh salt and nonces, so an encrypted
package is never byte-identical to another.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from safetensors import SafetensorError

from uqcit import __version__
from uqcit.core.io import write_json
from uqcit.core.names import block_of, layer_dir
from uqcit.core.record import ExportRecord, Exportable, ModuleRecord, weight_noise_profile
from uqcit.package.canonical import canonicalize_file, created_stamp, normalize_modes, save_safetensors
from uqcit.package.card import CARD_FILE, write_card
from uqcit.package.format import (
    FORMAT_VERSION, METADATA_FILE, VALIDATION_FILES, PackageError, PackageMetadata, read_metadata)
from uqcit.package.remote import MODELING_FILE, write_remote_code
from uqcit.package.secure.encryption import ProtectConfig, protect_package
from uqcit.package.secure.keys import fingerprint
from uqcit.package.secure.secret import Secret
from uqcit.package.secure.signing import (
    MANIFEST_FILE, SIGNATURE_FILE, is_signed, verify_manifest, verify_package, write_manifest)
from uqcit.package.swap import (
    check_target, checkpoint, recover, resolve_target, swap_into_place, target_lock, temp_name)
from uqcit.runtime.masked import MaskedEmbedding, MaskedLinear, masked_modules
from uqcit.runtime.modules import QuantEmbedding, QuantLinear
from uqcit.runtime.online import is_rotation_key, rotation_tensors_for_layer_dir
from uqcit.tensor.sparse import sparse_encode

LOCK_TIMEOUT_S = 600.0  # how long a second exporter of one target waits for the first


def export_package(compressed: ExportRecord | Exportable, tokenizer, path: str | os.PathLike, *, recipe=None,
                   source_model: str = "unknown", levels=None,
                   validation: Mapping[str, Any] | None = None,
                   clusters=None, sensitivity=None,
                   extra_metadata: Mapping[str, Any] | None = None,
                   signing_key=None, protect: ProtectConfig | None = None,
                   secret: Secret | None = None, reproducible: bool = True,
                   lock_timeout: float | None = LOCK_TIMEOUT_S) -> Path:
    """Write ``compressed`` as a package at ``path``, atomically; returns the package path.

    ``compressed`` is an ``ExportRecord`` or a stage result that builds one (``QuantizeResult``,
    ``CompensateResult``, ``PruneResult``; for a retrained model pass
    ``retrain_result.export_record(compressed)``). ``validation`` maps ``perplexity``/``benchmarks``/
    ``noise_profile`` to JSON-able dicts (measured elsewhere); a missing noise profile is the
    record's own. ``clusters`` (a ``ClustersResult``) fills each layer's ``ghz_clusters.json``;
    ``sensitivity`` (a ``SensitivityResult``) is stored as ``validation/sensitivity.safetensors``
    so another budget can be solved from the package without re-measuring. ``levels`` is accepted
    for symmetry with the other stages and not stored.
    ``signing_key`` (Ed25519, see ``uqcit.package.secure``) signs the manifest; ``protect`` (a
    ``uqcit.package.secure.ProtectConfig``) encrypts and/or keyed-encodes the weight files under
    ``secret`` (never stored). Both happen in the temporary folder, before the swap.
    By default no wall-clock data enters the package, so the same record exported twice gives
    byte-identical files: ``created`` is ``SOURCE_DATE_EPOCH`` or the epoch, and a stored
    sensitivity table drops its measurement timings; ``reproducible=False`` records the wall
    clock and the timings. A second exporter
    of the same ``path`` waits up to ``lock_timeout`` seconds (None: forever). ``path`` must be
    absent, an empty folder or a UQCIT package; anything else is refused (``PackageError``).
    """
    with stage_package(compressed, tokenizer, path, recipe=recipe, source_model=source_model,
                       validation=validation, clusters=clusters, sensitivity=sensitivity,
                       extra_metadata=extra_metadata, signing_key=signing_key, protect=protect,
                       secret=secret, reproducible=reproducible, lock_timeout=lock_timeout) as staged:
        return staged.commit()


@dataclasses.dataclass
class StagedPackage:
    """A complete package in its temporary folder, not yet at its target; ``commit()`` swaps it in."""

    path: Path  # the temporary folder: load it, inspect it
    target: Path
    signing_key: Any = None
    committed: bool = False
    swap_method: str | None = None  # "renameat2", "rename" or "two-renames" once committed

    def write_validation(self, name: str, data: Mapping[str, Any]) -> Path:
        """Set ``validation/<name>.json`` of the staged package (covered by the manifest at commit)."""
        if name not in VALIDATION_FILES:
            raise ValueError(f"validation file must be one of {VALIDATION_FILES}, got {name!r}")
        out = self.path / "validation" / f"{name}.json"
        with _writing(out, self.path):
            write_json(out, dict(data))
        return out

    def commit(self) -> Path:
        """Manifest (and sign), verify, and swap the staged package into place; returns the target."""
        if self.committed:
            raise RuntimeError(f"{self.target}: this staged package was already committed")
        _seal(self.path, self.signing_key)
        self.swap_method = swap_into_place(self.path, self.target)
        self.committed = True
        return self.target


@contextlib.contextmanager
def stage_package(compressed: ExportRecord | Exportable, tokenizer, path: str | os.PathLike, *,
                  lock_timeout: float | None = LOCK_TIMEOUT_S, **options) -> Iterator[StagedPackage]:
    """``export_package`` in two halves: write the package into a temporary folder and yield it.

    The target's lock is held for the whole block; leaving it without ``commit()`` (or with an
    error) deletes the temporary folder and leaves the target as it was. ``options`` are
    ``export_package``'s keywords.

    >>> with stage_package(q, tok, "out/pkg") as staged:  # doctest: +SKIP
    ...     loaded = load_package(staged.path)
    ...     staged.write_validation("perplexity", measure(loaded))
    ...     staged.commit()
    """
    record = compressed if isinstance(compressed, ExportRecord) else compressed.export_record()
    with stage_with(path, lambda tmp: _fill(record, tokenizer, tmp, **options),
                    signing_key=options.get("signing_key"), lock_timeout=lock_timeout) as staged:
        yield staged


@contextlib.contextmanager
def stage_with(path: str | os.PathLike, write: Callable[[Path], Any], *, signing_key=None,
               lock_timeout: float | None = LOCK_TIMEOUT_S) -> Iterator[StagedPackage]:
    """``stage_package`` for any writer: ``write(tmp)`` fills the temporary folder (a streamed job
    writes its package this way, ``uqcit.stream``); lock, checks, discard and commit are the same."""
    path = resolve_target(Path(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    with target_lock(path, lock_timeout):
        check_target(path)
        recover(path)
        staged = StagedPackage(temp_name(path), path, signing_key)
        try:
            staged.path.mkdir()
            checkpoint("stage:mkdir")
            write(staged.path)
            yield staged
        finally:
            if not staged.committed:
                _discard(staged.path)


def _fill(record: ExportRecord, tokenizer, tmp: Path, *, recipe=None, source_model: str = "unknown",
          levels=None, validation=None, clusters=None, sensitivity=None, extra_metadata=None,
          signing_key=None, protect: ProtectConfig | None = None, secret: Secret | None = None,
          reproducible: bool = True) -> None:
    """Every file of the package but the manifest and signature, into ``tmp``."""
    _write_package(record, tokenizer, tmp, recipe=recipe, source_model=source_model,
                   validation=validation or {}, extra=extra_metadata or {},
                   clusters=clusters.for_layer_dir() if clusters is not None else {},
                   created=created_stamp(reproducible))
    if sensitivity is not None:
        out = tmp / "validation" / "sensitivity.safetensors"
        with _writing(out, tmp):
            (sensitivity if not reproducible else sensitivity.without_timings()).save(out)
            canonicalize_file(out)  # sorted header: the library writes its metadata in hash order
    if protect is not None and protect.active:
        with _writing(tmp / "layers", tmp):
            protect_package(tmp, protect, secret, None)  # signing waits for the manifest, at commit
        checkpoint("stage:protect")
    if signing_key is not None:
        meta = PackageMetadata.read(tmp)
        dataclasses.replace(meta, signature={
            "algorithm": "ed25519", "public_key_sha256": fingerprint(signing_key),
            "manifest": MANIFEST_FILE, "signature": SIGNATURE_FILE}).write(tmp)


def _seal(root: Path, signing_key) -> None:
    """Transformers entry point, model card, modes, manifest (and signature), then verify: what the swap
    puts in place is checked whole."""
    with _writing(root / MODELING_FILE, root):
        write_remote_code(root)  # config.json's auto_map + modeling_uqcit.py (uqcit.package.remote)
    with _writing(root / CARD_FILE, root):
        write_card(root)  # here, after the validation figures: the card quotes them
    normalize_modes(root)
    with _writing(root / MANIFEST_FILE, root):
        write_manifest(root, signing_key)
    verify_manifest(root)
    if signing_key is not None:
        verify_package(root, signing_key.public_key())
    checkpoint("seal:verified")


@contextlib.contextmanager
def _writing(path: Path, root: Path) -> Iterator[None]:
    """A disk-full error while writing ``path`` becomes a ``PackageError`` naming it; marks the step."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise PackageError(f"{path}: disk full while writing the package ({exc.strerror}); nothing was "
                               f"replaced, the package at the target (if any) is intact. Free space or "
                               "export elsewhere") from exc
        raise
    except SafetensorError as exc:  # SensitivityResult.save's writer reports I/O errors as this
        raise PackageError(f"{path}: could not be written ({exc}); nothing was replaced, the package at the "
                           "target (if any) is intact. Check free space and permissions") from exc
    checkpoint(f"write:{path.relative_to(root).as_posix()}")


def _write_package(record: ExportRecord, tokenizer, root: Path, *, recipe, source_model, validation,
                   extra, clusters, created: str) -> PackageMetadata:
    model = record.model
    write_config(root, model.config)
    parts = layer_parts(dict(model.named_modules()), model.state_dict(), record.by_name(),
                        record.sparse_value_dtype, masked=masked_modules(model))
    rotations = rotation_tensors_for_layer_dir(model)
    for layer in sorted(set(parts.tensors) | set(parts.precision) | set(rotations)):
        write_layer(root, layer, parts.tensors.get(layer, {}), parts.precision.get(layer, {}),
                    rotations.get(layer, {}), clusters.get(layer))
    return write_rest(record, tokenizer, root, recipe=recipe, source_model=source_model, validation=validation,
                      extra=extra, created=created, modules=parts.modules, float_tensors=parts.float_tensors,
                      online_rotations={layer: sorted(rot) for layer, rot in sorted(rotations.items()) if rot})


@dataclasses.dataclass
class LayerParts:
    """What a package stores of some modules, grouped by layer folder (``layer_parts``)."""

    tensors: dict[str, dict[str, torch.Tensor]]  # layer folder -> weights.safetensors entries
    precision: dict[str, dict[str, Any]]  # layer folder -> precision_map.json
    modules: dict[str, Any]  # the metadata's module index entries
    float_tensors: dict[str, Any]  # the metadata's float tensor index entries


def layer_parts(modules: Mapping[str, torch.nn.Module], state: Mapping[str, torch.Tensor],
                by_name: Mapping[str, ModuleRecord], sparse_value_dtype: str = "float32", *,
                masked: Mapping[str, torch.nn.Module] | None = None) -> LayerParts:
    """The stored tensors and index entries of ``modules`` (full dotted names) and of the float
    entries of ``state`` (full keys) that no compressed module owns. The whole model gives the
    whole package; one block, its names prefixed, gives its layer folder: how ``uqcit.stream``
    writes a package block by block. ``masked`` defaults to the pruned modules among ``modules``."""
    qmods = {name: mod for name, mod in modules.items() if isinstance(mod, (QuantLinear, QuantEmbedding))}
    if masked is None:
        masked = {name: mod for name, mod in modules.items() if isinstance(mod, (MaskedLinear, MaskedEmbedding))}
    parts = LayerParts({}, {}, {}, {})
    _write_quantized(qmods, by_name, parts.tensors, parts.precision, parts.modules)
    _write_masked(masked, by_name, sparse_value_dtype, parts.tensors, parts.precision, parts.modules)
    parts.float_tensors = _write_floats(state, set(qmods) | set(masked), parts.tensors)
    return parts


def write_config(root: Path, config) -> None:
    """The package's ``config.json``: the transformers config without its quantization entry."""
    data = config.to_dict()
    data.pop("quantization_config", None)
    _json(root, "config.json", data)


def write_layer(root: Path, layer: str, tensors: Mapping[str, torch.Tensor], precision: Mapping[str, Any],
                rotation: Mapping[str, torch.Tensor], clusters: Mapping[str, Any] | None) -> None:
    """One layer folder under ``root/layers``: weights, online rotations, precision map, GHZ clusters."""
    ldir = root / "layers" / layer
    ldir.mkdir(parents=True)
    with _writing(ldir / "weights.safetensors", root):
        save_safetensors(dict(tensors), ldir / "weights.safetensors",
                         metadata={"uqcit_format_version": str(FORMAT_VERSION), "layer": layer})
    with _writing(ldir / "rotation.safetensors", root):
        save_safetensors(dict(rotation), ldir / "rotation.safetensors", metadata={
            "rotations": "online" if rotation else "none",
            "note": "online rotations, installed by uqcit.runtime.online.apply_online_rotations"
            if rotation else "no rotation stored: none applied, or all folded into the weights"})
    _json(root, f"layers/{layer}/precision_map.json", dict(precision))
    _json(root, f"layers/{layer}/ghz_clusters.json",
          clusters if clusters is not None else {"computed": False, "clusters": [],
                                                 "note": "no cluster detection ran for this package"})


def write_rest(record: ExportRecord, tokenizer, root: Path, *, recipe, source_model, validation, extra,
               created: str, modules: Mapping[str, Any], float_tensors: Mapping[str, Any],
               online_rotations: Mapping[str, Any]) -> PackageMetadata:
    """What follows the layer folders: tokenizer, validation files, metadata. Of ``record.model``
    only the class name is read here (a meta-device skeleton will do)."""
    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    with _writing(tok_dir, root):
        tokenizer.save_pretrained(str(tok_dir))
        for f in sorted(tok_dir.iterdir()):  # also at the root: AutoTokenizer.from_pretrained(package)
            if not (root / f.name).exists():
                shutil.copyfile(f, root / f.name)

    vdir = root / "validation"
    vdir.mkdir()
    noise = validation.get("noise_profile") or record.noise_profile or weight_noise_profile(record.modules)
    _json(root, "validation/noise_profile.json", noise)
    _json(root, "validation/perplexity.json", validation.get("perplexity") or {"measured": False})
    _json(root, "validation/benchmarks.json", validation.get("benchmarks") or {"measured": False})

    metadata = PackageMetadata(
        uqcit_version=__version__,
        format_version=FORMAT_VERSION,
        source_model=source_model,
        model_class=type(record.model).__name__,
        method=record.method,
        recipe=recipe.to_dict() if recipe is not None else None,
        plan=record.plan,
        average_bits_per_param=record.bpw,
        quantized_weight_count=record.weight_count,
        quantized_stored_bytes=record.stored_bits // 8,
        level_distribution=_level_distribution(record.stored, record.weight_count),
        modules=dict(modules),
        float_tensors=dict(float_tensors),
        created=created,
        pruning=record.pruning,
        online_rotations=dict(online_rotations) or None,
    ).merged(extra)
    with _writing(root / METADATA_FILE, root):
        metadata.write(root)  # package_bytes is settled with the manifest, at commit
    return metadata


def _json(root: Path, rel: str, data: Any) -> None:
    with _writing(root / rel, root):
        write_json(root / rel, data)


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


def _write_floats(state: Mapping[str, torch.Tensor], compressed: set[str],
                  tensors: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Float parameters and persistent buffers (``state``, full keys) of everything not compressed;
    returns their index."""
    float_index: dict[str, Any] = {}
    seen: dict[int, str] = {}
    for key, value in state.items():
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
                     signing_key=None, lock_timeout: float | None = LOCK_TIMEOUT_S) -> None:
    """Replace one ``validation/<name>.json`` of an existing package atomically.

    Copy-on-write: the package is copied (hard links: no file is ever changed in place) into a
    temporary folder, which gets the new file, a new manifest (and signature) and is swapped
    in whole. The package is verified first (a tampered package is never re-sealed). A signed
    package needs its ``signing_key`` to be re-signed; without it, it is refused rather than
    left with a file its signature does not cover.
    """
    if name not in VALIDATION_FILES:
        raise ValueError(f"validation file must be one of {VALIDATION_FILES}, got {name!r}")
    path = resolve_target(Path(path))
    read_metadata(path)  # refuses a folder that is not a package
    with target_lock(path, lock_timeout):
        recover(path)
        if is_signed(path):
            if signing_key is None:
                raise PackageError(f"{path}: the package is signed; writing validation/{name}.json would "
                                   "break its signature. Pass signing_key= (the key that signed it) to "
                                   "verify, write and re-sign it")
            verify_package(path, signing_key.public_key())
        elif (path / MANIFEST_FILE).is_file():
            verify_manifest(path)
        staged = StagedPackage(temp_name(path), path, signing_key)
        try:
            shutil.copytree(path, staged.path, symlinks=True, copy_function=link_or_copy)
            checkpoint("stage:copied")
            staged.write_validation(name, data)
            staged.commit()
        finally:
            if not staged.committed:
                _discard(staged.path)


def _discard(path: Path) -> None:
    """Remove an uncommitted temporary folder (what a killed exporter leaves, the next one removes)."""
    shutil.rmtree(path, ignore_errors=True)


def link_or_copy(src: str, dst: str) -> None:
    """A hard link to ``src`` at ``dst`` (no file is ever changed in place), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
