"""Teacher-cache file layer: index schema, safe shard reads, checksums, shard validation, the writer lock.

A cache directory is data that may come from elsewhere, so :mod:`fastkd.cache` reads it through this module:

- ``index.json`` is validated field by field (:func:`check_index`); any malformed entry raises
  :class:`CacheCorruptedError` naming the field, never ``KeyError``/``IndexError``/``TypeError``.
- Shard file names must be plain names (``[A-Za-z0-9._-]``, no ``..``, no separators); files are opened with
  ``O_NOFOLLOW`` and must be regular files (no symlinks, devices or FIFOs); the size is checked with
  ``fstat`` before reading, and exactly the indexed number of bytes is read. Error messages name only
  cache files (never the target of a link or a path outside the cache).
- Every shard carries a CRC-32 in the index, checked each time the shard is read from disk (~GB/s, cheap
  next to the read); ``verify=True`` also checks the SHA-256 of every shard up front.
- Each shard's safetensors metadata binds it to its position and to the index settings (``shard``,
  ``vocab_size``, ``k``, ``id_format``, ``values``, ``value_dtype``): swapped entries or an edited
  ``id_format`` are refused. :func:`check_shard` validates tensor dtypes and shapes, monotonic offsets, and
  that every decoded id lies in [−1, vocab_size).
- Writers hold an exclusive ``fcntl.flock`` on ``<cache>/.lock`` (:class:`WriterLock`); a second writer fails
  with :class:`CacheLockedError`. Temporary files carry the writer's pid and a random suffix.
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
from pathlib import Path
from typing import Any

import torch

FORMAT = "fastkd-teacher-cache"
VERSION = 3  # 2: per-shard crc32 and position/settings metadata; 3: hidden-state caches, temperatures
READ_VERSIONS = (2, 3)  # a version-2 index reads as a version-3 sparse cache without temperatures
INDEX = "index.json"
LOCK = ".lock"
MAX_INDEX_BYTES = 64 << 20
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
VALUE_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "uint8": torch.uint8,
    "int32": torch.int32,
}
ID_FORMATS = ("int16", "uint16", "packed", "int32")
_ID_LIMIT = {"int16": 2**15, "uint16": 2**16, "packed": 2**31, "int32": 2**31}
SHARD_META = ("vocab_size", "k", "id_format", "values", "value_dtype")
HIDDEN_SHARD_META = ("vocab_size", "values", "value_dtype", "hidden_size")


def shard_meta_keys(index: dict[str, Any]) -> tuple[str, ...]:
    """Index settings each shard repeats in its metadata (a hidden-state shard also binds the head's SHA-256,
    a re-temperable one its temperatures)."""
    if index["values"] == "hidden":
        return HIDDEN_SHARD_META + ("lm_head",)
    return SHARD_META + (("temperatures",) if index.get("temperatures") else ())


def _meta_value(index: dict[str, Any], key: str) -> str:
    return index["lm_head"]["sha256"] if key == "lm_head" else str(index[key])


class CacheCorruptedError(RuntimeError):
    """A cache file is missing, truncated, malformed or does not match its index."""


class CacheLockedError(RuntimeError):
    """Another writer holds the cache directory's lock."""


def _int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def plain_name(name: object) -> bool:
    """A file name that can only denote a file directly inside the cache directory."""
    return isinstance(name, str) and bool(_NAME.fullmatch(name)) and ".." not in name


def id_bits(vocab_size: int) -> int:
    """Bits needed to store id + 1 for ids in [0, vocab_size) (0 encodes padding)."""
    return max(1, (vocab_size).bit_length())


def check_index(index: object) -> dict[str, Any]:
    """Validate a parsed ``index.json``; returns it or raises :class:`CacheCorruptedError` naming the problem."""

    def bad(what: str) -> CacheCorruptedError:
        return CacheCorruptedError(f"{INDEX} is corrupted: {what}")

    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CacheCorruptedError(f"{INDEX} is not a {FORMAT} index")
    if index.get("version") not in READ_VERSIONS:
        raise CacheCorruptedError(
            f"{INDEX} has format version {index.get('version')!r}, this fastkd reads {READ_VERSIONS} "
            f"(rebuild the cache)"
        )
    if index["version"] == 2:
        index.setdefault("temperatures", [])
    v = index.get("vocab_size")
    if not _int(v) or not 0 < v < 2**31:
        raise bad(f"vocab_size must be an int in [1, 2^31), got {v!r}")
    values, vdt = index.get("values"), index.get("value_dtype")
    if values not in ALLOWED_VALUES:
        raise bad(f"values must be one of {tuple(ALLOWED_VALUES)}, got {values!r}")
    if vdt not in ALLOWED_VALUES[values]:
        raise bad(f"value_dtype {vdt!r} is not one of {ALLOWED_VALUES[values]} for values={values!r}")
    if values == "hidden":
        _check_hidden_settings(index, bad)
    else:
        _check_sparse_settings(index, bad)
    if index.get("has_input_ids") not in (None, True, False):
        raise bad(f"has_input_ids must be a bool or null, got {index.get('has_input_ids')!r}")
    if not isinstance(index.get("meta", {}), dict):
        raise bad("meta must be an object")
    shards = index.get("shards")
    if not isinstance(shards, list):
        raise bad("shards must be a list")
    n_ex = n_tok = 0
    for i, sh in enumerate(shards):
        if not isinstance(sh, dict):
            raise bad(f"shard entry {i} is not an object")
        if not plain_name(sh.get("file")):
            raise bad(f"shard entry {i} has file {str(sh.get('file'))[:80]!r}; only plain file names inside the "
                      f"cache directory are allowed")
        for key in ("n_examples", "n_tokens", "bytes", "crc32"):
            if not _int(sh.get(key)) or sh[key] < 0:
                raise bad(f"shard entry {i} ({sh['file']}): {key} must be an int >= 0, got {sh.get(key)!r}")
        if not isinstance(sh.get("sha256"), str) or not _HEX64.fullmatch(sh["sha256"]):
            raise bad(f"shard entry {i} ({sh['file']}): sha256 must be 64 lowercase hex digits")
        n_ex += sh["n_examples"]
        n_tok += sh["n_tokens"]
    if len({sh["file"] for sh in shards}) != len(shards):
        raise bad("two shard entries name the same file")
    for key, total in (("n_examples", n_ex), ("n_tokens", n_tok)):
        if index.get(key) != total:
            raise bad(f"{key} is {index.get(key)!r} but the shards hold {total}")
    return index


ALLOWED_VALUES = {"logprobs": ("float16", "bfloat16", "float32"), "counts": ("uint8", "int32"),
                  "hidden": ("float16", "bfloat16", "float32")}


def _check_sparse_settings(index: dict[str, Any], bad) -> None:
    v, k, values = index["vocab_size"], index.get("k"), index["values"]
    if not _int(k) or k <= 0:
        raise bad(f"k must be a positive int, got {k!r}")
    fmt = index.get("id_format")
    if fmt not in ID_FORMATS or v >= _ID_LIMIT[fmt]:
        raise bad(f"id_format {fmt!r} cannot hold vocab_size={v}")
    if index.get("id_bits") != id_bits(v):
        raise bad(f"id_bits must be {id_bits(v)} for vocab_size={v}, got {index.get('id_bits')!r}")
    if not isinstance(index.get("store_tail"), bool) or (index["store_tail"] and values != "logprobs"):
        raise bad(f"store_tail must be a bool (False for counts), got {index.get('store_tail')!r}")
    temps = index.get("temperatures")
    if not isinstance(temps, list) or any(not _pos_float(t) for t in temps) or len(set(temps)) != len(temps):
        raise bad(f"temperatures must be a list of distinct positive numbers, got {temps!r}")
    if temps and (values != "logprobs" or temps[0] != 1.0 or not index["store_tail"]):
        raise bad("temperatures need a log-prob cache with a stored tail, and list 1.0 first")


def _pos_float(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < float("inf")


def _check_hidden_settings(index: dict[str, Any], bad) -> None:
    h = index.get("hidden_size")
    if not _int(h) or h <= 0:
        raise bad(f"hidden_size must be a positive int, got {h!r}")
    for key in ("softcap", "logit_scale"):
        if index.get(key) is not None and not _pos_float(index[key]):
            raise bad(f"{key} must be a positive number or null, got {index.get(key)!r}")
    head = index.get("lm_head")
    if not isinstance(head, dict) or not plain_name(head.get("file")):
        raise bad("lm_head must be an object naming a plain file inside the cache directory")
    for key in ("bytes", "crc32"):
        if not _int(head.get(key)) or head[key] < 0:
            raise bad(f"lm_head.{key} must be an int >= 0, got {head.get(key)!r}")
    if not isinstance(head.get("sha256"), str) or not _HEX64.fullmatch(head["sha256"]):
        raise bad("lm_head.sha256 must be 64 lowercase hex digits")
    if head.get("dtype") not in ("float16", "bfloat16", "float32") or not isinstance(head.get("bias"), bool):
        raise bad(f"lm_head.dtype must be a float dtype and lm_head.bias a bool, got {head!r}"[:200])


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


def shard_metadata(position: int, index: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata binding a shard to its position and the index settings."""
    meta = {"format": FORMAT, "version": str(VERSION), "shard": str(position)}
    meta.update({key: _meta_value(index, key) for key in shard_meta_keys(index)})
    return meta


def _ids_in_range(stored: torch.Tensor, fmt: str, bits: int, k: int, vocab: int, decode) -> tuple[int, int] | None:
    """(min, max) of the decoded ids when some lie outside [−1, vocab), else None; chunked to bound memory."""
    rows = max(1, (1 << 22) // max(1, stored.shape[1] * (8 if fmt == "packed" else 1)))
    for r0 in range(0, stored.shape[0], rows):
        ids = decode(stored[r0:r0 + rows], fmt, bits, k)
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= vocab):
            return int(ids.min()), int(ids.max())
    return None


def check_shard(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None, position: int,
                entry: dict[str, Any], index: dict[str, Any], decode) -> None:
    """Validate one loaded shard against its index entry; raises :class:`CacheCorruptedError` naming it."""
    name = entry["file"]

    def bad(what: str) -> CacheCorruptedError:
        return CacheCorruptedError(f"shard {name} is corrupted: {what}")

    meta = meta or {}
    if meta.get("shard") != str(position):
        raise bad(f"its metadata says position {meta.get('shard')!r}, the index lists it at {position} "
                  f"(shard entries swapped or copied)")
    for key in shard_meta_keys(index):
        if meta.get(key) != _meta_value(index, key):
            raise bad(f"it was written with {key}={meta.get(key)!r}, the index says {_meta_value(index, key)!r}")
    fmt, k, t_n, e_n = index.get("id_format"), index.get("k"), entry["n_tokens"], entry["n_examples"]
    hidden = index["values"] == "hidden"
    n_temps = len(index.get("temperatures", []))
    expected = {"offsets", "hidden"} if hidden else {"offsets", "ids", "values"}
    if index.get("store_tail"):
        expected.add("tail")
    if n_temps:
        expected |= {"lse", "tails"}
    if index["has_input_ids"]:
        expected.add("input_ids")
    if set(tensors) != expected:
        raise bad(f"tensors {sorted(tensors)}, expected {sorted(expected)}")
    off = tensors["offsets"]
    if off.dtype != torch.int64 or tuple(off.shape) != (e_n + 1,):
        raise bad(f"offsets must be ({e_n + 1},) int64, got {tuple(off.shape)} {off.dtype}")
    if int(off[0]) != 0 or int(off[-1]) != t_n or bool((off[1:] < off[:-1]).any()):
        raise bad(f"offsets must rise monotonically from 0 to n_tokens={t_n}")
    if hidden:
        shape, dt = (t_n, index["hidden_size"]), VALUE_DTYPES[index["value_dtype"]]
        if tuple(tensors["hidden"].shape) != shape or tensors["hidden"].dtype != dt:
            raise bad(f"hidden must be {shape} {dt}, got {tuple(tensors['hidden'].shape)} {tensors['hidden'].dtype}")
        if "input_ids" in tensors and (tuple(tensors["input_ids"].shape) != (t_n,)
                                       or tensors["input_ids"].dtype != torch.int32):
            raise bad(f"input_ids must be ({t_n},) int32")
        return
    width = (k * index["id_bits"] + 7) // 8 if fmt == "packed" else k
    id_dt = {"int16": torch.int16, "uint16": torch.int16, "packed": torch.uint8, "int32": torch.int32}[fmt]
    shapes = {
        "ids": ((t_n, width), id_dt),
        "values": ((t_n, k), VALUE_DTYPES[index["value_dtype"]]),
        "tail": ((t_n,), VALUE_DTYPES[index["value_dtype"]]),
        "input_ids": ((t_n,), torch.int32),
        "lse": ((t_n, n_temps), torch.float32),
        "tails": ((t_n, n_temps), VALUE_DTYPES[index["value_dtype"]]),
    }
    for key, (shape, dt) in shapes.items():
        if key in tensors and (tuple(tensors[key].shape) != shape or tensors[key].dtype != dt):
            raise bad(f"{key} must be {shape} {dt}, got {tuple(tensors[key].shape)} {tensors[key].dtype}")
    out = _ids_in_range(tensors["ids"], fmt, index["id_bits"], k, index["vocab_size"], decode)
    if out is not None:
        raise bad(f"ids span [{out[0]}, {out[1]}], outside [-1, vocab_size={index['vocab_size']})")


def tmp_name(name: str) -> str:
    """A temporary name private to this writer (pid + random), next to ``name``."""
    return f"{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def write_index(path: Path, index: dict[str, Any], fsync_write) -> None:
    fsync_write(path / INDEX, json.dumps(index, indent=1).encode())


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
