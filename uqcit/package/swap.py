"""Putting a finished package folder in place: one atomic swap, under a lock, with stale leftovers cleaned.

A package is written complete into a uniquely named sibling folder ``.NAME.tmp-<uuid>``,
verified there, and then swapped with the target in one step:

- target exists: ``renameat2(tmp, target, RENAME_EXCHANGE)`` (Linux >= 3.15 on ext4, xfs,
  btrfs, tmpfs...) exchanges the two names atomically; the old package is then under the
  temporary name and is deleted. At every instant the target names a whole package.
- target absent (or an empty folder): one ``rename``.
- fallback, where ``renameat2`` is missing or the file system refuses the exchange (macOS,
  some network file systems): two renames, ``target -> .NAME.old-<uuid>`` then
  ``tmp -> target``. A kill between the two leaves no package at the target for that
  instant; the next export (or ``recover``) moves the stranded old package back first.

An advisory lock (``fcntl.flock`` on ``.NAME.lock`` beside the target, removed on release)
serializes exporters of one target: a second one waits up to ``timeout`` seconds, then fails
naming the lock. A killed exporter's lock dies with it (the kernel drops ``flock`` locks with
the process); its lock file may stay behind, harmless, and is reused. Under the lock, leftovers of killed
exports (``.NAME.tmp-*``/``.NAME.old-*`` with our uuid suffix, nothing else) are removed.

``checkpoint(step)`` marks each file-system step of an export; a fault-injection harness sets
``FAULT_HOOK`` to raise or kill there (tests/package/test_export_atomic.py,
benchmarks/export_faults.py). It is None in normal use.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

from uqcit.package.format import METADATA_FILE, PackageError

AT_FDCWD = -100  # <fcntl.h>: paths relative to the current directory
RENAME_EXCHANGE = 2  # <linux/fs.h>: atomically exchange oldpath and newpath
LOCK_POLL_S = 0.05

FAULT_HOOK: Callable[[str], None] | None = None  # fault injection only: called with each step's name


def checkpoint(step: str) -> None:
    """One file-system step of an export is done; the fault-injection hook may fail or kill here."""
    if FAULT_HOOK is not None:
        FAULT_HOOK(step)


def _stale_pattern(target: Path) -> re.Pattern[str]:
    # uuid4().hex (32) from this version, 8 hex digits from the previous one
    return re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-([0-9a-f]{{32}}|[0-9a-f]{{8}})$")


def temp_name(target: Path, kind: str = "tmp") -> Path:
    """A fresh sibling of ``target`` that cleanup recognizes: ``.NAME.tmp-<uuid4 hex>``."""
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex}"


def resolve_target(target: Path) -> Path:
    """The folder an export replaces: ``target``, or the folder a symbolic link there points to."""
    if target.is_symlink():
        if not target.exists():
            raise PackageError(f"{target}: is a dangling symbolic link; remove it or choose another path")
        return target.resolve()  # the link keeps pointing at the (replaced) folder
    return target


def check_target(target: Path) -> None:
    """Refuse to replace anything but a UQCIT package folder (or an empty folder) at ``target``."""
    if not target.exists():
        return
    if not target.is_dir():
        raise PackageError(f"{target}: exists and is not a folder; refusing to replace it with a package. "
                           "Choose another output path or remove the file")
    if not (target / METADATA_FILE).is_file() and any(target.iterdir()):
        raise PackageError(f"{target}: exists and is not a UQCIT package (no {METADATA_FILE}); refusing to "
                           "replace it. Choose another output path or empty the folder")


@contextlib.contextmanager
def target_lock(target: Path, timeout: float | None = 600.0) -> Iterator[Path]:
    """Hold the advisory lock ``.NAME.lock`` beside ``target``; waits up to ``timeout`` s (None: forever).

    The lock file is removed on release, while still locked; a waiter that then wins the
    lock on the removed file sees that its file is no longer the one at the path and tries
    again, so two holders never coexist and no lock file outlives the export.
    """
    lock = target.parent / f".{target.name}.lock"
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock(fd, lock, target, timeout, deadline)
            try:
                current = os.stat(lock).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break  # locked, and it is the file at the path
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # a removed lock file: its holder is gone; lock the current one
    try:
        yield lock
    finally:
        try:
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)  # releases the lock


def _flock(fd: int, lock: Path, target: Path, timeout: float | None, deadline: float | None) -> None:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                raise PackageError(f"{lock}: another export to {target} holds this lock (waited "
                                   f"{timeout:g} s); wait for it to finish or choose another output "
                                   "path") from None
            time.sleep(LOCK_POLL_S)


def recover(target: Path) -> list[Path]:
    """Clean up after killed exports of ``target``; call with the lock held. Returns what was removed.

    A stranded old package (killed between the fallback's two renames: no target, an
    ``.old-*`` folder) is moved back to the target first; every other ``.NAME.tmp-*`` /
    ``.NAME.old-*`` folder is deleted.
    """
    pattern = _stale_pattern(target)
    stale = sorted((p for p in target.parent.iterdir() if pattern.match(p.name)),
                   key=lambda p: p.stat().st_mtime)
    if not target.exists() and not target.is_symlink():
        olds = [p for p in stale if ".old-" in p.name and (p / METADATA_FILE).is_file()]
        if olds:
            os.rename(olds[-1], target)
            checkpoint("recover:restore-old")
            stale.remove(olds[-1])
    for p in stale:
        _remove(p)
        checkpoint("recover:remove-stale")
    return stale


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


_RENAMEAT2: Callable[..., int] | None | bool = False  # False: not looked up yet


def _renameat2() -> Callable[..., int] | None:
    global _RENAMEAT2
    if _RENAMEAT2 is False:
        fn = None
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name, use_errno=True)
            fn = libc.renameat2  # glibc >= 2.28
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
        except (OSError, AttributeError, TypeError):
            fn = None
        _RENAMEAT2 = fn
    return _RENAMEAT2  # type: ignore[return-value]


def exchange(a: Path, b: Path) -> bool:
    """Atomically exchange the names ``a`` and ``b``; False where the system cannot (use the fallback)."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # kernel or file system without RENAME_EXCHANGE
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) failed: {os.strerror(err)}", str(a), None, str(b))


def swap_into_place(tmp: Path, target: Path) -> str:
    """Make the finished folder ``tmp`` the package at ``target`` (lock held); returns the method used."""
    if target.exists():
        if target.is_dir() and not any(target.iterdir()):
            os.rmdir(target)  # an empty folder: nothing to keep
        elif exchange(tmp, target):
            checkpoint("swap:exchanged")
            _fsync_dir(target.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # the old package, now under the temporary name; a
            # failure here leaves a stale folder for the next export to remove, never a failed export
            checkpoint("swap:old-removed")
            return "renameat2"
        else:
            old = temp_name(target, "old")
            os.rename(target, old)
            try:
                checkpoint("swap:fallback-old-moved")
                os.rename(tmp, target)
            except Exception:
                os.rename(old, target)  # an error (not a kill) between the two: put the old one back
                raise
            checkpoint("swap:fallback-new-in-place")
            _fsync_dir(target.parent)
            shutil.rmtree(old, ignore_errors=True)
            checkpoint("swap:old-removed")
            return "two-renames"
    os.rename(tmp, target)
    checkpoint("swap:renamed")
    _fsync_dir(target.parent)
    return "rename"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
