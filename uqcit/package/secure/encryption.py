"""Encryption at rest (AES-256-GCM), applying protection at export, and unlocking at load.

Each layer's ``weights.safetensors`` and ``rotation.safetensors`` becomes ``<name>.enc``
(a fresh random 96-bit nonce per file; the file's path and the package's salt are
authenticated too, so files cannot be swapped). The key is derived from the user's
``Secret`` (``uqcit.package.secure.secret``) and never written to the package.
Confidentiality and integrity of the weights on disk; the config, metadata, tokenizer and
validation files stay readable.
"""
from __future__ import annotations

import dataclasses
import hmac
import os
import secrets as _secrets
from pathlib import Path
from typing import Any, ClassVar

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from safetensors import SafetensorError
from safetensors.torch import load, load_file

from uqcit.core.config import StageConfig
from uqcit.core.io import atomic_write
from uqcit.package.format import METADATA_FILE, PackageError, PackageMetadata, SecurityError, refresh_package_bytes
from uqcit.package.secure.encoding import ENCODING_SCHEME, decode_tensors, encode_file
from uqcit.package.secure.keys import fingerprint
from uqcit.package.secure.secret import DerivedKeys, Secret
from uqcit.package.secure.signing import MANIFEST_FILE, SIGNATURE_FILE, sign_package

ENCRYPTED_SUFFIX = ".enc"
PROTECTED_FILES = ("weights.safetensors", "rotation.safetensors")  # per layer folder
ENCRYPTED_MAGIC = b"UQCIT-AESGCM-1\n"  # first bytes of every encrypted file
NONCE_BYTES = 12
_AES_INFO = b"uqcit aes-256-gcm v1"


# Not a stage: an option of export_package, so it is not registered with the stage configs;
# it keeps the StageConfig JSON form because the package records it (ProtectConfig.from_dict reads it).
@dataclasses.dataclass(frozen=True)
class ProtectConfig(StageConfig):
    """What ``export_package`` does to a package beyond signing (the keys are passed apart)."""

    type_tag: ClassVar[str] = "protect"

    encrypt: bool = False  # AES-256-GCM of each layer's weight files; loading then needs the secret
    encode: bool = False  # keyed signed permutation of every stored weight tensor (obfuscation)
    scrypt_log2_n: int = 15  # passphrase stretching cost 2^n (r=8): ~0.1 s and 32 MiB per derivation

    def __post_init__(self) -> None:
        if not 10 <= self.scrypt_log2_n <= 22:
            raise ValueError(f"scrypt_log2_n must be in [10, 22], got {self.scrypt_log2_n}")

    @property
    def active(self) -> bool:
        return self.encrypt or self.encode


def protect_package(root: str | os.PathLike, config: ProtectConfig | None, secret: Secret | None,
                    signing_key: Ed25519PrivateKey | None = None) -> None:
    """Encode, encrypt and sign a freshly written package folder in place (in that order).

    ``export_package`` calls this on its temporary folder before swapping it into place.
    """
    root = Path(root)
    config = config or ProtectConfig()
    meta = PackageMetadata.read(root)
    if config.active:
        if secret is None:
            raise ValueError("encrypt/encode need a secret: pass secret=Secret.from_passphrase(...) "
                             "or Secret.from_file(...)")
        salt = _secrets.token_bytes(16)
        keys = DerivedKeys(secret, salt, config.scrypt_log2_n)
        prot: dict[str, Any] = {
            "config": config.to_dict(), "salt": salt.hex(),
            "kdf": ("scrypt" if secret.kind == "passphrase" else "hkdf-sha256"),
            "key_check": keys.check_value(),
            "note": "the secret is not stored here; loading needs it (load_package(..., secret=...))"}
        if config.encode:
            for rel in _layer_files(root, ("weights.safetensors",)):
                encode_file(root / rel, keys, rel)
            prot["encoding"] = {"scheme": ENCODING_SCHEME, "files": _layer_files(root, ("weights.safetensors",)),
                                "what": "every stored tensor flattened, permuted, and a keyed half of its "
                                        "entries negated (floats) or bit-inverted (integer codes); "
                                        "obfuscation, not encryption"}
        if config.encrypt:
            done = []
            for rel in _layer_files(root, PROTECTED_FILES):
                _encrypt_file(root, rel, keys.sub(_AES_INFO), salt)
                done.append(rel + ENCRYPTED_SUFFIX)
            prot["encryption"] = {"cipher": "AES-256-GCM", "nonce_bytes": NONCE_BYTES, "files": done}
        meta = dataclasses.replace(meta, protection=prot)
    if signing_key is not None:
        meta = dataclasses.replace(meta, signature={
            "algorithm": "ed25519", "public_key_sha256": fingerprint(signing_key),
            "manifest": MANIFEST_FILE, "signature": SIGNATURE_FILE})
    meta.write(root)
    if signing_key is not None:
        sign_package(root, signing_key)  # also settles package_bytes
    else:
        refresh_package_bytes(root, meta)


def _layer_files(root: Path, names: tuple[str, ...]) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for n in names for p in (root / "layers").glob(f"*/{n}"))


def _encrypt_file(root: Path, rel: str, key: bytes, salt: bytes) -> None:
    src = root / rel
    nonce = _secrets.token_bytes(NONCE_BYTES)  # random per file: unique with overwhelming probability
    ct = AESGCM(key).encrypt(nonce, src.read_bytes(), _aad(rel, salt))
    atomic_write(root / (rel + ENCRYPTED_SUFFIX), ENCRYPTED_MAGIC + nonce + ct)
    src.unlink()


def _aad(rel: str, salt: bytes) -> bytes:
    # Binding the path and the package's salt: a file moved to another layer or package fails.
    return rel.encode() + b"\0" + salt


class Unlocker:
    """Reads a package's weight files, decrypting and decoding them as its metadata says.

    Built by ``load_package``; a wrong or missing secret fails here, before any weights.
    ``decode=False`` leaves keyed-encoded tensors as stored (to show what they compute).
    """

    def __init__(self, root: Path, meta: dict[str, Any], secret: Secret | None, *, decode: bool = True):
        self.root = root
        prot = meta.get("protection") or {}
        self.encrypted = "encryption" in prot
        self.encoded = "encoding" in prot and decode
        self._keys: DerivedKeys | None = None
        self._salt = bytes.fromhex(prot["salt"]) if prot else b""
        if not (self.encrypted or self.encoded):
            return
        what = " and ".join(w for w, on in (("encrypted", self.encrypted), ("keyed-encoded", self.encoded)) if on)
        if secret is None:
            raise SecurityError(f"{root / METADATA_FILE}: the package's weights are {what}; pass the "
                                "secret it was exported with (load_package(..., secret=Secret...), "
                                "CLI --secret-file or --passphrase-env)", [(METADATA_FILE, "secret needed")])
        cfg = ProtectConfig.from_dict(prot["config"])
        keys = DerivedKeys(secret, self._salt, cfg.scrypt_log2_n)
        if not hmac.compare_digest(keys.check_value(), prot["key_check"]):
            raise SecurityError(f"{root / METADATA_FILE}: wrong secret: it is not the one this package "
                                f"was {what} with", [(METADATA_FILE, "wrong secret")])
        self._keys = keys

    def read(self, rel: str) -> dict[str, torch.Tensor] | None:
        """The tensors of ``rel`` (e.g. ``layers/layer_000/weights.safetensors``); None if absent."""
        plain, enc = self.root / rel, self.root / (rel + ENCRYPTED_SUFFIX)
        try:
            if self.encrypted and enc.is_file():
                tensors = load(self._decrypt(rel, enc))
            elif plain.is_file():
                if self.encrypted:
                    raise SecurityError(f"{plain}: stored in plain text in an encrypted package "
                                        "(replaced after export?)", [(rel, "not encrypted")])
                tensors = load_file(str(plain))
            else:
                return None
        except (SafetensorError, OSError, ValueError) as exc:
            if isinstance(exc, SecurityError):
                raise
            raise PackageError(f"{plain}: cannot be read as safetensors ({exc}); the package is corrupt "
                               "or truncated") from exc
        if self.encoded and rel.endswith("/weights.safetensors"):
            assert self._keys is not None
            tensors = decode_tensors(tensors, self._keys, rel)
        return tensors

    def _decrypt(self, rel: str, path: Path) -> bytes:
        assert self._keys is not None
        blob = path.read_bytes()
        if not blob.startswith(ENCRYPTED_MAGIC) or len(blob) < len(ENCRYPTED_MAGIC) + NONCE_BYTES + 16:
            raise SecurityError(f"{path}: not a UQCIT encrypted file (header damaged)",
                                [(rel + ENCRYPTED_SUFFIX, "bad header")])
        nonce = blob[len(ENCRYPTED_MAGIC):len(ENCRYPTED_MAGIC) + NONCE_BYTES]
        try:
            return AESGCM(self._keys.sub(_AES_INFO)).decrypt(
                nonce, blob[len(ENCRYPTED_MAGIC) + NONCE_BYTES:], _aad(rel, self._salt))
        except InvalidTag:
            raise SecurityError(f"{path}: authentication failed: the file was modified or moved "
                                "(the secret itself is correct)", [(rel + ENCRYPTED_SUFFIX, "modified")]) from None
