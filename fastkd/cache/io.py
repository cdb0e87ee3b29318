"""Teacher-cache file access: safe reads, checksums, crash-safe writes, the writer lock.

- Files are opened with ``O_NOFOLLOW`` and must be regular files (no symlinks, devices or FIFOs); the size
  is checked with ``fstat`` before reading, and exactly the indexed number of bytes is read. Error messages
  name only cache files (never the target of a link or a path outside the cache).
- Every shard carries a CRC-32 in the index, checked each time the shard is read from disk (~GB/s, cheap
  next to the read); ``verify=True`` also checks the SHA-256 of every shard up front.
- :func:`fsync_write` writes a file crash-safely: a temporary file private to this writer (pid + random
  suffix) is written, fsynced, renamed over the target, and the directory is fsynced so that the rename
  itself is durable. A process killed at any point leaves either the old file or the new one, plus at most a
  ``*.tmp`` that the next writer removes.
- Writers hold an exclusive ``fcntl.flock`` on ``<cache>/.lock`` (:class:`WriterLock`); a second writer fails
  with :class:`CacheLockedError`.

Imports :mod:`fastkd.cache.format` only.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import stat
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastkd.cache.format import INDEX, CacheCorruptedError, CacheLockedError, check_index

LOCK = ".lock"
MAX_INDEX_BYTES = 64 << 20
WRITE_PHASES = ("written", "fsynced", "renamed")
# Called as ``after_phase(phase, file_name)`` after each phase of every fsync_write (``WRITE_PHASES``); a
# test sets it in a subprocess to kill the writer at a chosen point. None in normal use.
after_phase: Callable[[str, str], None] | None = None


def _open_regular(path: Path, name: str) -> int:
    """fd of a regular file ``path`` (no symlink, device or FIFO); errors name only ``name``."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise CacheCorruptedError(f"{name} is missing") from None
    except OSError as exc:
        why = "is a symbolic link" if exc.errno == errno.ELOOP else f"cannot be opened ({exc.strerror})"
        raise CacheCorruptedError(f"{name} {why}; cache files must be regular files") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CacheCorruptedError(f"{name} is not a regular file")
    return fd


def read_file(path: Path, name: str, size: int | None = None, limit: int = MAX_INDEX_BYTES) -> bytes:
    """Read a cache file: exactly ``size`` bytes (checked with fstat first), or at most ``limit``."""
    fd = _open_regular(path, name)
    try:
        have = os.fstat(fd).st_size
        if size is not None and have != size:
            raise CacheCorruptedError(f"{name} is truncated or altered: {have} bytes, the index says {size}")
        if size is None and have > limit:
            raise CacheCorruptedError(f"{name} is {have} bytes, more than the {limit} a cache index may hold")
        want = have
        chunks, got = [], 0
        while got < want:
            b = os.read(fd, min(want - got, 1 << 26))
            if not b:
                break
            chunks.append(b)
            got += len(b)
        data = b"".join(chunks)
    finally:
        os.close(fd)
    if len(data) != want:
        raise CacheCorruptedError(f"{name} changed while being read ({len(data)} of {want} bytes)")
    return data


def stat_shard(path: Path, name: str, size: int) -> None:
    """Cheap open-time check of a listed shard: present, a regular file (not a link), of the indexed size."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CacheCorruptedError(f"shard {name} listed in {INDEX} is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise CacheCorruptedError(f"shard {name} is not a regular file (symbolic links are not followed)")
    if st.st_size != size:
        raise CacheCorruptedError(f"shard {name} is truncated or altered: {st.st_size} bytes, the index says {size}")


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def tmp_name(name: str) -> str:
    """A temporary name private to this writer (pid + random), next to ``name``."""
    return f"{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


_TMP = re.compile(r".+\.[0-9]+-[0-9a-f]{8}\.tmp")


def remove_temporaries(path: Path) -> None:
    """Delete the temporaries (:func:`tmp_name`) that writers which died left in ``path``; call with the lock
    held, so that no live writer owns one."""
    for tmp in path.iterdir():
        if _TMP.fullmatch(tmp.name) and tmp.is_file() and not tmp.is_symlink():
            tmp.unlink()


def _phase(phase: str, name: str) -> None:
    if after_phase is not None:
        after_phase(phase, name)


def fsync_write(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` crash-safely (see the module docstring)."""
    tmp = path.with_name(tmp_name(path.name))  # private to this writer: two never share a temporary
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        _phase("written", path.name)
        os.fsync(f.fileno())
    _phase("fsynced", path.name)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    _phase("renamed", path.name)


def _fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename inside it survives a power loss (not every platform allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_index(path: Path, index: dict[str, Any]) -> None:
    """Commit ``index`` as ``<path>/index.json`` (:func:`fsync_write`)."""
    fsync_write(path / INDEX, json.dumps(index, indent=1).encode())


def read_index(path: Path) -> dict[str, Any]:
    """The validated index of the cache directory ``path`` (:func:`fastkd.cache.format.check_index`)."""
    f = path / INDEX
    if not os.path.lexists(f):
        raise FileNotFoundError(f"{path} is not a teacher cache: {INDEX} is missing")
    try:
        index = json.loads(read_file(f, INDEX))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheCorruptedError(f"{INDEX} is corrupted (not valid JSON: {exc})") from exc
    return check_index(index)


class WriterLock:
    """Exclusive ``fcntl.flock`` on ``<cache>/.lock`` for the lifetime of one writer (released on close)."""

    def __init__(self, path: Path):
        self.fd: int | None = os.open(path / LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.fd)
            self.fd = None
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CacheLockedError(
                    f"{path} is being written by another TeacherCacheWriter (it holds {LOCK}); one writer per "
                    f"cache directory: wait for it to finish, then resume=True"
                ) from None
            raise

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        self.release()
