"""Ed25519 signing keys: generate, save and load them as PEM, and name them by fingerprint.

>>> key = generate_signing_key()
>>> len(fingerprint(key)) == 64 and fingerprint(key) == fingerprint(key.public_key())
True
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from uqcit.core.io import PRIVATE_MODE, atomic_write
from uqcit.package.format import SecurityError


def generate_signing_key() -> Ed25519PrivateKey:
    """A new Ed25519 private key (its ``public_key()`` verifies what it signs)."""
    return Ed25519PrivateKey.generate()


def save_signing_key(key: Ed25519PrivateKey, path: str | os.PathLike, *,
                     passphrase: str | None = None) -> Path:
    """Write a private key as PKCS#8 PEM (encrypted when ``passphrase`` is given), mode 0600."""
    enc = (serialization.BestAvailableEncryption(passphrase.encode()) if passphrase
           else serialization.NoEncryption())
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    return write_private(Path(path), data)


def save_public_key(key: Ed25519PrivateKey | Ed25519PublicKey, path: str | os.PathLike) -> Path:
    """Write the public half of ``key`` as SubjectPublicKeyInfo PEM."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return atomic_write(path, pub.public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo))


def load_signing_key(path: str | os.PathLike, *, passphrase: str | None = None) -> Ed25519PrivateKey:
    """Read a private key written by ``save_signing_key`` (or any Ed25519 PKCS#8 PEM)."""
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(),
                                                 passphrase.encode() if passphrase else None)
    except FileNotFoundError:
        raise
    except (ValueError, TypeError) as exc:
        raise SecurityError(f"{path}: not a readable PEM private key ({exc}); a passphrase-protected "
                            "key needs its passphrase") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SecurityError(f"{path}: holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    """Read a public key written by ``save_public_key``."""
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise
    except ValueError as exc:
        raise SecurityError(f"{path}: not a readable PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SecurityError(f"{path}: holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def fingerprint(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, hex: names a key in messages and metadata."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def keygen(directory: str | os.PathLike, name: str = "uqcit", *,
           passphrase: str | None = None) -> tuple[Path, Path]:
    """Create ``<name>.key`` (private, 0600) and ``<name>.pub`` in ``directory``; never overwrites."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    priv, pub = directory / f"{name}.key", directory / f"{name}.pub"
    for p in (priv, pub):
        if p.exists():
            raise FileExistsError(f"{p} exists; keygen never overwrites a key (choose another name)")
    key = generate_signing_key()
    save_signing_key(key, priv, passphrase=passphrase)
    save_public_key(key, pub)
    return priv, pub


def write_private(path: Path, data: bytes) -> Path:
    """Write key material readable by its owner only (0600), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, data, mode=PRIVATE_MODE)
