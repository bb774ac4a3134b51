"""API keys: created by the ``uqcit serve-key`` command, stored as SHA-256 hashes, checked per request.

A key is 32 random bytes (``uqk_`` + URL-safe base64); only its hash and a short prefix (to tell
keys apart in ``serve-key list``) are stored, so a copy of the database grants nothing. A fast
hash is enough here: a password needs a slow KDF because people choose guessable ones, a
256-bit random key cannot be guessed.

>>> key = new_key()
>>> key.startswith(KEY_PREFIX), len(hash_key(key)), hash_key(key) == hash_key(key)
(True, 64, True)
"""
from __future__ import annotations

import hashlib
import secrets

from uqcit.server.db import JobStore

KEY_PREFIX = "uqk_"
HEADER = "X-API-Key"


def new_key() -> str:
    """A fresh random API key (shown once; the server keeps only its hash)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The stored form of a key: SHA-256, hex."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def create_key(store: JobStore, name: str) -> tuple[int, str]:
    """Create and record a key named ``name``; returns (id, key). The key is not stored, only its hash.

    >>> import tempfile, pathlib
    >>> store = JobStore(pathlib.Path(tempfile.mkdtemp()) / "db.sqlite3")
    >>> key_id, key = create_key(store, "ci")
    >>> check_key(store, key) == key_id, check_key(store, key + "x"), check_key(store, None)
    (True, None, None)
    """
    key = new_key()
    return store.add_key(name, hash_key(key), key[: len(KEY_PREFIX) + 6]), key


def check_key(store: JobStore, key: str | None) -> int | None:
    """The id of the live key ``key`` is, or None (missing, unknown or revoked)."""
    if not key:
        return None
    return store.key_id(hash_key(key))
