"""The compressed package on disk: its layout, its metadata record, and reading it back.

Layout::

    package/
      config.json              the transformers config of the model
      uqcit_metadata.json      recipe, plan, measured bits and figures, module index (PackageMetadata)
      layers/layer_NNN/        one folder per transformer block NNN
        weights.safetensors    packed codes, fp16 scales/zeros, masks, float params of the block
        rotation.safetensors   rotations not folded into weights (online ones), else empty
        precision_map.json     per module: format, stored bits, bits/weight
        ghz_clusters.json      correlation clusters of the block's modules
      layers/outer/            the same files for modules outside the blocks (embeddings, head, final norm)
      tokenizer/
      tokenizer.json ...       copies of tokenizer/'s files: AutoTokenizer.from_pretrained(package) works
      validation/{perplexity,benchmarks,noise_profile}.json
      README.md                model card from the metadata and validation figures (uqcit.package.card)
      modeling_uqcit.py        transformers' entry point, named by config.json's auto_map: from_pretrained(
                               package, trust_remote_code=True) hands over to load_package (uqcit.package.remote)

Every JSON file is written with sorted keys (``uqcit.core.io.write_json``). A signed or
protected package adds the files of ``uqcit.package.secure``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch

from uqcit.core.io import write_json

FORMAT_VERSION = 1
METADATA_FILE = "uqcit_metadata.json"
VALIDATION_FILES = ("perplexity", "benchmarks", "noise_profile")


class PackageError(ValueError):
    """A folder that is not a readable UQCIT package; the message names the file."""


class SecurityError(PackageError):
    """A package that fails verification or decryption; the message names the file.

    ``problems`` lists ``(relative path, what is wrong)`` for every file found wrong.
    """

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.problems = problems or []


@dataclasses.dataclass(frozen=True)
class PackageMetadata:
    """``uqcit_metadata.json`` as a typed record; ``to_dict``/``from_dict`` give the file's exact keys.

    Optional sections are absent from the file when None. Keys this version does not know
    (a caller's ``extra_metadata``) travel in ``extra`` and are written back unchanged.
    """

    uqcit_version: str
    format_version: int
    source_model: str
    model_class: str  # the transformers class the loader rebuilds, e.g. LlamaForCausalLM
    method: str
    recipe: Mapping[str, Any] | None  # the recipe's dict, None when exported without one
    plan: Mapping[str, Any] | None  # the bit plan's dict, None for a pruned model
    average_bits_per_param: float  # stored bits per weight of the compressed modules
    quantized_weight_count: int
    quantized_stored_bytes: int
    level_distribution: Mapping[str, Mapping[str, float]]  # "level_N" -> percent of weights, avg_bits
    modules: Mapping[str, Mapping[str, Any]]  # compressed module -> layer, kind, shape, format, tied_to...
    float_tensors: Mapping[str, Mapping[str, Any]]  # state-dict key -> layer and dtype, or tied_to
    created: str  # local time of the export, e.g. 2026-01-31T12:00:00+0000
    package_bytes: int | None = None  # every file of the package, this one included
    pruning: Mapping[str, Any] | None = None  # a pruned model: its config and kept-weight accounting
    rotation: Mapping[str, Any] | None = None  # the rotation it was quantized through (measured values)
    protection: Mapping[str, Any] | None = None  # encryption/encoding: salt, KDF, key check (no secret)
    signature: Mapping[str, Any] | None = None  # algorithm and public-key fingerprint of the signer
    # layer folder -> state-dict keys of its online rotations (rotation.safetensors); absent when none,
    # and the loader reads rotation.safetensors only in the folders listed here
    online_rotations: Mapping[str, list[str]] | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    OPTIONAL: ClassVar[tuple[str, ...]] = ("package_bytes", "pruning", "rotation", "protection", "signature",
                                           "online_rotations")
    # JSON type of each field (None allowed where the field may be null); bool is never an int here
    TYPES: ClassVar[Mapping[str, tuple[type, ...]]] = {
        "uqcit_version": (str,), "format_version": (int,), "source_model": (str,), "model_class": (str,),
        "method": (str,), "recipe": (dict, type(None)), "plan": (dict, type(None)),
        "average_bits_per_param": (int, float), "quantized_weight_count": (int,),
        "quantized_stored_bytes": (int,), "level_distribution": (dict,), "modules": (dict,),
        "float_tensors": (dict,), "created": (str,), "package_bytes": (int, type(None)),
        "pruning": (dict, type(None)), "rotation": (dict, type(None)), "protection": (dict, type(None)),
        "signature": (dict, type(None)), "online_rotations": (dict, type(None)),
    }

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        for key in self.OPTIONAL:
            if out[key] is None:
                del out[key]
        return out | dict(self.extra)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PackageMetadata":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = sorted(n for n in names - set(cls.OPTIONAL) if n not in data)
        if missing:
            raise ValueError(f"metadata lacks key(s) {missing}")
        known = {k: v for k, v in data.items() if k in names}
        for key, value in known.items():
            _check_type(key, value, cls.TYPES[key])
        for level, row in known["level_distribution"].items():
            _check_type(f"level_distribution.{level}", row, (dict,))
            for k in ("percent", "avg_bits"):
                _check_type(f"level_distribution.{level}.{k}", row.get(k), (int, float))
        for layer, keys in (known.get("online_rotations") or {}).items():
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise ValueError(f"key 'online_rotations.{layer}' must be a list of tensor names")
        if known.get("protection") is not None:
            for key, types in (("salt", (str,)), ("config", (dict,)), ("key_check", (str,))):
                _check_type(f"protection.{key}", known["protection"].get(key), types)
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def read(cls, path: str | os.PathLike) -> "PackageMetadata":
        """The validated metadata of the package at ``path``, without loading any weights."""
        path = Path(path)
        data = read_metadata(path)
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise PackageError(f"{path / METADATA_FILE}: {exc}; the package is corrupt or incomplete "
                               "(re-export it)") from exc

    def merged(self, extra: Mapping[str, Any]) -> "PackageMetadata":
        """A copy with ``extra``'s keys set over this record's (known keys land in their fields)."""
        return self.from_dict(self.to_dict() | dict(extra)) if extra else self

    def write(self, root: str | os.PathLike) -> None:
        write_json(Path(root) / METADATA_FILE, self.to_dict())

    @property
    def signed_by(self) -> str | None:
        """SHA-256 fingerprint of the key that signed the package (as recorded, not verified)."""
        return self.signature["public_key_sha256"] if self.signature else None

    @property
    def protected(self) -> tuple[str, ...]:
        """Which protections the weights carry: ``encryption``, ``encoding``, both or none."""
        return tuple(w for w in ("encryption", "encoding") if w in (self.protection or {}))

    @property
    def key_derivation(self) -> str | None:
        return self.protection.get("kdf") if self.protection else None

    def levels(self) -> list[tuple[str, float, float]]:
        """``(level, percent of weights, average bits/weight)`` per level, in file order."""
        return [(lvl, d["percent"], d["avg_bits"]) for lvl, d in self.level_distribution.items()]

    def module_rows(self) -> list[tuple[str, str, int | None, str, str | None]]:
        """``(name, layer folder, level, format, tied_to)`` per compressed module, by folder then name."""
        rows = [(name, e["layer"], e.get("level"), e["format"], e.get("tied_to")) for name, e in self.modules.items()]
        return sorted(rows, key=lambda row: (row[1], row[0]))


def _check_type(key: str, value: Any, types: tuple[type, ...]) -> None:
    """``ValueError`` naming ``key`` unless ``value`` has one of the JSON ``types`` (a bool is no number)."""
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        want = " or ".join("null" if t is type(None) else {dict: "object", str: "string"}.get(t, t.__name__)
                           for t in types)
        raise ValueError(f"key {key!r} must be {want}, got {type(value).__name__} {str(value)[:40]!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"key {key!r} must be finite, got {value}")


@dataclasses.dataclass
class LoadedPackage:
    """A package read back: runnable model, tokenizer and its metadata."""

    model: torch.nn.Module
    tokenizer: Any
    metadata: dict[str, Any]
    path: Path
    seconds: float

    @property
    def record(self) -> PackageMetadata:
        """The metadata as a typed ``PackageMetadata``."""
        return PackageMetadata.from_dict(self.metadata)

    def __repr__(self) -> str:
        return (f"<LoadedPackage {self.path.name}: {self.metadata.get('method')}, "
                f"{self.metadata.get('average_bits_per_param', float('nan')):.3f} bits/weight>")


def read_json(path: Path) -> Any:
    """A package's JSON file; ``PackageError`` naming the file when it is missing or not JSON."""
    if not path.is_file():
        raise PackageError(f"{path}: file missing; this folder is not a complete UQCIT package")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise PackageError(f"{path}: not valid JSON ({exc}); the package is corrupt") from exc


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a package as a dict, validated, without loading any weights.

    ``PackageMetadata.read`` gives the same as a typed record.
    """
    path = Path(path)
    if not path.is_dir():
        raise PackageError(f"{path}: no such package folder")
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        raise PackageError(f"{meta_path}: missing; {path} is not a UQCIT package "
                           "(export one with uqcit.package.export_package or `uqcit compress`)")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise PackageError(f"{meta_path}: format_version {meta.get('format_version') if isinstance(meta, dict) else None!r} "
                           f"is not {FORMAT_VERSION}; this package was written by another version")
    return meta


def package_bytes(path: str | os.PathLike) -> int:
    """Total bytes of every file in a package folder."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def refresh_package_bytes(root: Path, metadata: PackageMetadata) -> PackageMetadata:
    """Record the package's total bytes in its metadata; rewritten until the figure includes itself."""
    for _ in range(3):
        metadata = dataclasses.replace(metadata, package_bytes=package_bytes(root))
        metadata.write(root)
        if package_bytes(root) == metadata.package_bytes:
            break
    return metadata
