"""Package protection that is what it says it is: signatures, encryption at rest, keyed encoding.

Nothing here computes on encrypted weights. What is built, and what each part really gives:

- **Signatures** (Ed25519, ``signing``): a manifest of every file (path, size, SHA-256) and
  its signature; ``verify_package`` refuses any modified, missing or added file, naming it.
  Integrity and origin, not secrecy. Keys live in ``keys``.
- **Encryption at rest** (AES-256-GCM, ``encryption``): each layer's weight files, under a
  key derived from the user's ``Secret`` (``secret``) and a per-package salt; the key is
  never written to the package. Confidentiality and integrity of the weights on disk.
- **Keyed encoding** (signed permutation, ``encoding``): the package keeps its format and
  loads, but computes garbage until decoded with the key. Obfuscation, not encryption.
- **CKKS demo** (``ckks``, optional, needs ``tenseal``): one linear layer evaluated on
  CKKS-encrypted activations with plaintext weights, with its measured error and overhead.

Key-check values (an HMAC of a fixed string under a derived key) let a wrong secret fail
with a clear message before any file is touched. ``export_package(signing_key=, protect=,
secret=)`` and ``load_package(public_key=, secret=)`` use all of this; this module is the
public face of the parts.
"""
from uqcit.package.format import SecurityError
from uqcit.package.secure.ckks import CKKSResult, ckks_available, ckks_linear
from uqcit.package.secure.encoding import ENCODING_SCHEME, STRUCTURAL_TENSORS, decode_tensors, encode_tensors
from uqcit.package.secure.encryption import (
    ENCRYPTED_MAGIC, ENCRYPTED_SUFFIX, NONCE_BYTES, PROTECTED_FILES, ProtectConfig, Unlocker, protect_package)
from uqcit.package.secure.keys import (
    fingerprint, generate_signing_key, keygen, load_public_key, load_signing_key, save_public_key, save_signing_key)
from uqcit.package.secure.secret import DerivedKeys, Secret
from uqcit.package.secure.signing import (
    MANIFEST_FILE, SIGNATURE_FILE, VerifyResult, build_manifest, is_signed, sign_package, verify_manifest, verify_package, write_manifest)

__all__ = [
    "CKKSResult", "DerivedKeys", "ENCODING_SCHEME", "ENCRYPTED_MAGIC", "ENCRYPTED_SUFFIX", "MANIFEST_FILE",
    "NONCE_BYTES", "PROTECTED_FILES", "ProtectConfig", "SIGNATURE_FILE", "STRUCTURAL_TENSORS", "Secret",
    "SecurityError", "Unlocker", "VerifyResult", "build_manifest", "ckks_available", "ckks_linear",
    "decode_tensors", "encode_tensors", "fingerprint", "generate_signing_key", "is_signed", "keygen",
    "load_public_key", "load_signing_key", "protect_package", "save_public_key", "save_signing_key",
    "sign_package", "verify_manifest", "verify_package", "write_manifest",
]
