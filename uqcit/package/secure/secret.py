"""The user's secret and the keys derived from it for one package; never written to a package.

A passphrase is stretched with scrypt, 32 raw bytes with HKDF, both under a per-package
random salt; every key a package uses (AES-GCM, the keyed encoding's streams, the
key-check value) is an HKDF subkey of that master key.

>>> s = Secret.from_passphrase("correct horse battery staple")
>>> keys = DerivedKeys(s, salt=b"s" * 16, scrypt_log2_n=10)
>>> keys.check_value() == DerivedKeys(s, b"s" * 16, 10).check_value()
True
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import secrets as _secrets
from pathlib import Path
from typing import ClassVar, Literal

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from uqcit.package.format import SecurityError
from uqcit.package.secure.keys import write_private


@dataclasses.dataclass(frozen=True, repr=False)
class Secret:
    """The user's key for encryption at rest and keyed encoding; never written to a package.

    >>> s = Secret.from_passphrase("correct horse battery staple")
    >>> t = Secret.generate()   # 32 random bytes; keep them with t.save(path)
    """

    material: bytes
    kind: Literal["raw", "passphrase"]

    RAW_BYTES: ClassVar[int] = 32

    def __post_init__(self) -> None:
        if self.kind == "raw" and len(self.material) != self.RAW_BYTES:
            raise ValueError(f"a raw secret is {self.RAW_BYTES} bytes, got {len(self.material)}")
        if self.kind == "passphrase" and not self.material:
            raise ValueError("the passphrase is empty")
        if self.kind not in ("raw", "passphrase"):
            raise ValueError(f"kind must be 'raw' or 'passphrase', got {self.kind!r}")

    @classmethod
    def from_passphrase(cls, passphrase: str) -> "Secret":
        """A passphrase, stretched with scrypt (salt and cost stored in the package)."""
        return cls(passphrase.encode("utf-8"), "passphrase")

    @classmethod
    def from_bytes(cls, key: bytes) -> "Secret":
        """Exactly 32 random bytes (e.g. from ``Secret.generate()``)."""
        return cls(bytes(key), "raw")

    @classmethod
    def generate(cls) -> "Secret":
        return cls(_secrets.token_bytes(cls.RAW_BYTES), "raw")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Secret":
        """Read a secret file written by ``save`` (64 hex digits)."""
        path = Path(path)
        text = path.read_text().strip()
        try:
            raw = bytes.fromhex(text)
        except ValueError as exc:
            raise SecurityError(f"{path}: a secret file holds 64 hex digits ({exc})") from exc
        if len(raw) != cls.RAW_BYTES:
            raise SecurityError(f"{path}: a secret file holds {2 * cls.RAW_BYTES} hex digits, "
                                f"found {len(text)}")
        return cls(raw, "raw")

    def save(self, path: str | os.PathLike) -> Path:
        """Write a raw secret as hex, mode 0600 (a passphrase is never saved)."""
        if self.kind != "raw":
            raise ValueError("only raw secrets are saved; a passphrase lives in the user's head")
        return write_private(Path(path), (self.material.hex() + "\n").encode())

    def __repr__(self) -> str:
        return f"<Secret {self.kind} (hidden)>"


class DerivedKeys:
    """Subkeys of one package, derived once from the user's secret and the package's salt."""

    def __init__(self, secret: Secret, salt: bytes, scrypt_log2_n: int):
        if secret.kind == "passphrase":
            master = Scrypt(salt=salt, length=32, n=2 ** scrypt_log2_n, r=8, p=1).derive(secret.material)
        else:
            master = _hkdf(secret.material, b"uqcit master v1", salt=salt)
        self._master = master

    def sub(self, info: bytes) -> bytes:
        return _hkdf(self._master, info)

    def check_value(self) -> str:
        """An HMAC of a fixed string: lets a wrong secret fail clearly before any file is touched."""
        return hmac.new(self.sub(b"uqcit key-check v1"), b"uqcit", hashlib.sha256).hexdigest()


def _hkdf(key: bytes, info: bytes, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)
