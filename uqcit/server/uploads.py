"""Model uploads: a tar archive of a model folder, size-limited, unpacked only as plain files.

The archive (``.tar`` or ``.tar.gz``, its files at the top level) is streamed to the data folder
with its size counted against ``max_upload_bytes``, then unpacked member by member: regular files
only (no link, device or folder), names without a path, safetensors and text files only (a
pickle checkpoint, ``.bin``/``.pt``, can run code when loaded: refused by name), the unpacked
bytes counted against the same limit (a gzip bomb stops there). The folder appears under its
name only when complete (one rename), and an upload never replaces a model.
"""
from __future__ import annotations

import os
import secrets
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from uqcit.server.checks import ApiError

ALLOWED_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja", ".tiktoken", ".md")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz")
MAX_MEMBERS = 1000
CHUNK = 1 << 20


def too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, "too_large", f"upload of {size:,}+ bytes is over this server's limit of {limit:,} "
                    "bytes (its operator sets it: uqcit serve --max-upload-mb)")


def member_name(member: tarfile.TarInfo) -> str | None:
    """The file name a member unpacks to; None for the archive's top folder entry (``.``).

    >>> member_name(tarfile.TarInfo("./config.json"))
    'config.json'
    >>> member_name(tarfile.TarInfo("../x.safetensors"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    uqcit.server.checks.ApiError: archive member '../x.safetensors': a model upload holds its files at ...
    """
    parts = [p for p in PurePosixPath(member.name).parts if p != "."]
    if not parts and member.isdir():
        return None
    if len(parts) != 1 or parts[0].startswith(".") or "\x00" in parts[0]:
        raise ApiError(400, "bad_upload", f"archive member {member.name!r}: a model upload holds its files at "
                       "the archive's top level (no folder, no '..', no leading '.')")
    name = parts[0]
    if not member.isfile():
        raise ApiError(400, "bad_upload", f"archive member {member.name!r} is not a regular file (a link, "
                       "device or folder); upload plain files only")
    suffix = os.path.splitext(name)[1].lower()
    if suffix in PICKLE_SUFFIXES:
        raise ApiError(400, "bad_upload", f"archive member {name!r} is a pickle checkpoint, which can run code "
                       "when loaded; the server loads safetensors only (save_pretrained(..., "
                       "safe_serialization=True))")
    if suffix not in ALLOWED_SUFFIXES:
        raise ApiError(400, "bad_upload", f"archive member {name!r}: a model upload holds only "
                       f"{', '.join(ALLOWED_SUFFIXES)} files")
    return name


def unpack(archive: Path, dest: Path, limit: int) -> Path:
    """Unpack the uploaded ``archive`` as the model folder ``dest`` (see the module docstring)."""
    tmp = dest.parent / f".{dest.name}.unpack-{secrets.token_hex(8)}"
    tmp.mkdir()
    try:
        try:
            tar = tarfile.open(archive, "r:*")
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ApiError(400, "bad_upload", f"the body is not a tar archive (.tar or .tar.gz) of a model "
                           f"folder ({exc})") from None
        total = 0
        with tar:
            try:
                for count, member in enumerate(tar, 1):
                    if count > MAX_MEMBERS:
                        raise ApiError(400, "bad_upload", f"the archive holds over {MAX_MEMBERS} files")
                    name = member_name(member)
                    if name is None:
                        continue
                    total += member.size
                    if total > limit:
                        raise too_large(total, limit)
                    if (tmp / name).exists():
                        raise ApiError(400, "bad_upload", f"archive member {name!r} appears twice")
                    with tar.extractfile(member) as src, open(tmp / name, "xb") as out:
                        shutil.copyfileobj(src, out, CHUNK)
            except (tarfile.TarError, EOFError, OSError) as exc:  # zlib.error is caught as a TarError
                raise ApiError(400, "bad_upload", f"the archive is damaged ({exc})") from None
        if not (tmp / "config.json").is_file():
            raise ApiError(400, "bad_upload", "the archive holds no config.json: upload a transformers model "
                           "folder (save_pretrained)")
        if not any(p.suffix == ".safetensors" for p in tmp.iterdir()):
            raise ApiError(400, "bad_upload", "the archive holds no .safetensors weights")
        try:
            os.rename(tmp, dest)  # fails on an existing non-empty folder: an upload never replaces a model
        except OSError:
            raise ApiError(409, "exists", f"a model named {dest.name!r} exists already; upload under "
                           "another name") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
