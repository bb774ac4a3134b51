"""Integrity and signatures: a manifest of every file of a package, optionally signed with Ed25519.

Every package carries ``uqcit_manifest.json``: every other file's relative path, size and
SHA-256 (``write_manifest``). ``verify_manifest`` (what ``load_package`` runs by default)
refuses a package with any modified, missing or added file, naming the file: integrity,
signed or not. A signed package adds ``uqcit_manifest.sig``, the Ed25519 signature of the
manifest's exact bytes (``sign_package``); ``verify_package`` checks it and then the files.
Integrity and origin, not secrecy.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from uqcit.core.io import atomic_write, to_json
from uqcit.core.results import Result
from uqcit.package.format import METADATA_FILE, PackageError, PackageMetadata, SecurityError, read_metadata
from uqcit.package.secure.keys import fingerprint

MANIFEST_FILE = "uqcit_manifest.json"
SIGNATURE_FILE = "uqcit_manifest.sig"
SIG_BYTES = 64  # an Ed25519 signature


def _package_files(root: Path) -> dict[str, Path]:
    """Every file under ``root`` but the manifest and signature, by POSIX relative path."""
    out: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        for name in list(dirnames) + filenames:
            p = d / name
            if p.is_symlink():
                raise SecurityError(f"{p}: symbolic links are not allowed in a package",
                                    [(p.relative_to(root).as_posix(), "symlink")])
        for name in filenames:
            rel = (d / name).relative_to(root).as_posix()
            if rel not in (MANIFEST_FILE, SIGNATURE_FILE):
                out[rel] = d / name
    return dict(sorted(out.items()))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Path, size and SHA-256 of every file of a package (except the manifest and signature)."""
    root = Path(root)
    return {"format": "uqcit-manifest", "version": 1, "hash": "sha256",
            "files": {rel: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                      for rel, p in _package_files(root).items()}}


def is_signed(root: str | os.PathLike) -> bool:
    """Whether the package carries a signature (every package carries a manifest)."""
    return (Path(root) / SIGNATURE_FILE).exists()


def write_manifest(root: str | os.PathLike, key: Ed25519PrivateKey | None = None) -> bytes:
    """Write the manifest of every file of ``root`` (and its signature with ``key``); returns its bytes.

    The metadata's ``package_bytes`` is settled first (to include the manifest and any
    signature), since the manifest covers the metadata. ``export_package`` runs this inside
    its temporary folder; done in place, an interruption between the files leaves a package
    that fails verification, never one that passes wrongly.
    """
    root = Path(root)
    meta_path = root / METADATA_FILE
    sig_bytes = SIG_BYTES if key is not None else 0
    for _ in range(6):  # the manifest's size depends on the metadata's, which records it
        manifest = _canonical(build_manifest(root))
        total = sum(e["bytes"] for e in json.loads(manifest)["files"].values()) + len(manifest) + sig_bytes
        meta = PackageMetadata.read(root) if meta_path.is_file() else None
        if meta is None or meta.package_bytes == total:
            break
        dataclasses.replace(meta, package_bytes=total).write(root)
    else:  # pragma: no cover - converges in two rounds
        raise RuntimeError(f"{root}: package_bytes did not settle while writing its manifest")
    if key is None:
        (root / SIGNATURE_FILE).unlink(missing_ok=True)
    atomic_write(root / MANIFEST_FILE, manifest)
    if key is not None:
        atomic_write(root / SIGNATURE_FILE, key.sign(manifest))
    return manifest


def sign_package(root: str | os.PathLike, key: Ed25519PrivateKey) -> Path:
    """Sign a package in place: write the manifest of every file and its Ed25519 signature."""
    write_manifest(root, key)
    return Path(root)


def _canonical(manifest: dict[str, Any]) -> bytes:
    return (to_json(manifest, indent=1) + "\n").encode()


@dataclasses.dataclass(repr=False)
class VerifyResult(Result):
    """A package that verified: what the signature covers."""

    path: Path
    key_fingerprint: str
    files: dict[str, int]  # relative path -> bytes, every file the signature covers
    seconds: float

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def summary(self) -> str:
        return (f"{self.path.name}: signature valid (key {self.key_fingerprint[:16]}), "
                f"{len(self.files)} files, {self.total_bytes:,} bytes verified in {self.seconds:.2f} s")

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "key_fingerprint": self.key_fingerprint, "files": self.files,
                "total_bytes": self.total_bytes, "seconds": self.seconds}

    def table_rows(self):
        return ("file", "bytes"), sorted(self.files.items())

    def figure(self):
        import plotly.graph_objects as go

        tops: dict[str, int] = {}
        for rel, n in self.files.items():
            top = rel.split("/")[0]
            tops[top] = tops.get(top, 0) + n
        fig = go.Figure(go.Bar(x=list(tops), y=list(tops.values()), uid="verify-bytes"))
        fig.update_layout(title="Bytes covered by the signature, per top-level entry",
                          yaxis_type="log", height=320)
        return fig


def verify_package(root: str | os.PathLike, public_key: Ed25519PublicKey) -> VerifyResult:
    """Check a package's signature and every file against its manifest; raise ``SecurityError``.

    The error names the file: a bad signature (manifest or signature modified, or another
    key), or a file modified, missing, or added after signing.
    """
    t0 = time.perf_counter()
    root = Path(root)
    if not root.is_dir():
        raise PackageError(f"{root}: no such package folder")
    fp = fingerprint(public_key)
    man_path, sig_path = root / MANIFEST_FILE, root / SIGNATURE_FILE
    for p in (man_path, sig_path):
        if not p.is_file():
            raise SecurityError(f"{p}: missing; the package is not signed (or its signature was removed), "
                                "so it cannot be verified", [(p.name, "missing")])
    manifest_bytes = man_path.read_bytes()
    try:
        public_key.verify(sig_path.read_bytes(), manifest_bytes)
    except InvalidSignature:
        raise SecurityError(f"{sig_path}: the signature does not verify with key {fp[:16]}: "
                            f"{man_path.name} or {sig_path.name} was modified, or another key signed it",
                            [(SIGNATURE_FILE, "bad signature")]) from None
    listed = _check_files(root, json.loads(manifest_bytes), "signed manifest")  # signed, so well-formed
    return VerifyResult(root, fp, listed, time.perf_counter() - t0)


def verify_manifest(root: str | os.PathLike) -> dict[str, int]:
    """Check every file of a package against its (unsigned or signed) manifest; raise ``SecurityError``.

    Returns relative path -> bytes of every file checked. The error names the file: the
    manifest missing or unreadable, a file modified, missing, or added after export. This
    is integrity (accidents, bit rot, a half-copied folder), not origin: anyone can rewrite
    an unsigned manifest; ``verify_package`` checks who signed it.
    """
    root = Path(root)
    read_metadata(root)  # a folder that is no package at all says so, not "no manifest"
    man_path = root / MANIFEST_FILE
    if not man_path.is_file():
        raise SecurityError(f"{man_path}: missing; the package has no integrity manifest (exported by an "
                            "older version, or the file was removed). Re-export it, or load with "
                            "verify=False to skip the check", [(MANIFEST_FILE, "missing")])
    try:
        manifest = json.loads(man_path.read_bytes())
        files = manifest["files"]
        ok = (manifest.get("format") == "uqcit-manifest" and isinstance(files, dict) and all(
            isinstance(k, str) and isinstance(e, dict) and isinstance(e.get("bytes"), int)
            and isinstance(e.get("sha256"), str) for k, e in files.items()))
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise SecurityError(f"{man_path}: not a valid manifest (field 'files' must map each path to its "
                            "bytes and sha256); the package is corrupt: re-export it",
                            [(MANIFEST_FILE, "malformed")])
    return _check_files(root, manifest, "manifest")


def _check_files(root: Path, manifest: dict[str, Any], what: str) -> dict[str, int]:
    listed: dict[str, dict[str, Any]] = manifest["files"]
    actual = _package_files(root)
    after = "signing" if what == "signed manifest" else "export"
    problems: list[tuple[str, str]] = []
    problems += [(rel, f"added after {after} (not in the {what})") for rel in actual if rel not in listed]
    for rel, entry in listed.items():
        p = actual.get(rel)
        if p is None:
            problems.append((rel, f"missing (listed in the {what})"))
        elif p.stat().st_size != entry["bytes"]:
            problems.append((rel, f"modified (size {p.stat().st_size}, {what} says {entry['bytes']})"))
        elif _sha256(p) != entry["sha256"]:
            problems.append((rel, f"modified (SHA-256 differs from the {what})"))
    if problems:
        shown = "; ".join(f"{root / rel}: {w}" for rel, w in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        way_out = ("get an intact copy from its signer" if what == "signed manifest" else
                   "restore the files or re-export the package (load_package(verify=False) skips the check)")
        raise SecurityError(f"package fails verification: {shown}{more}; {way_out}", problems)
    return {rel: e["bytes"] for rel, e in listed.items()}
