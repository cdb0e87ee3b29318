"""Teacher-cache format: the index schema, shard metadata and shard validation (no file access).

A cache directory is data that may come from elsewhere, so :mod:`fastkd.cache` validates what it reads here:

- ``index.json`` is validated field by field (:func:`check_index`): a missing required key or a malformed
  entry raises :class:`CacheCorruptedError` naming the key, never ``KeyError``/``IndexError``/``TypeError``.
- Shard and head file names must be plain names (``[A-Za-z0-9._-]``, no ``..``, no separators); how they are
  opened (no symlinks, sizes checked first) is :mod:`fastkd.cache.io`.
- Each shard's safetensors metadata binds it to its position and to the index settings (``shard``,
  ``vocab_size``, ``k``, ``id_format``, ``values``, ``value_dtype``): swapped entries or an edited
  ``id_format`` are refused. :func:`check_shard` validates tensor dtypes and shapes, monotonic offsets, and
  that every decoded id lies in [−1, vocab_size).

Imports only :mod:`fastkd.cache.ids` from the package.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from fastkd.cache.ids import ID_FORMATS, ID_LIMIT, decode_ids, id_bits

FORMAT = "fastkd-teacher-cache"
VERSION = 3  # 2: per-shard crc32 and position/settings metadata; 3: hidden-state caches, temperatures
READ_VERSIONS = (2, 3)  # a version-2 index reads as a version-3 sparse cache without temperatures
INDEX = "index.json"
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
VALUE_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "uint8": torch.uint8,
    "int32": torch.int32,
}
ALLOWED_VALUES = {"logprobs": ("float16", "bfloat16", "float32"), "counts": ("uint8", "int32"),
                  "hidden": ("float16", "bfloat16", "float32")}
# keys every index holds, then those of a sparse / hidden-state index, of a shard entry and of lm_head
INDEX_KEYS = ("format", "version", "vocab_size", "values", "value_dtype", "has_input_ids", "meta", "shards",
              "n_examples", "n_tokens")
SPARSE_KEYS = ("k", "id_format", "id_bits", "store_tail", "temperatures")
HIDDEN_KEYS = ("hidden_size", "softcap", "logit_scale", "lm_head")
SHARD_KEYS = ("file", "n_examples", "n_tokens", "bytes", "crc32", "sha256")
HEAD_KEYS = ("file", "bytes", "crc32", "sha256", "dtype", "bias")
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


def _missing(d: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    return next((key for key in keys if key not in d), None)


def check_index(index: object) -> dict[str, Any]:
    """Validate a parsed ``index.json``; returns it or raises :class:`CacheCorruptedError` naming the problem."""

    def bad(what: str) -> CacheCorruptedError:
        return CacheCorruptedError(f"{INDEX} is corrupted: {what}")

    def require(d: dict[str, Any], keys: tuple[str, ...], where: str = "") -> None:
        key = _missing(d, keys)
        if key is not None:
            raise bad(f"{where}missing required key {key!r}")

    if not isinstance(index, dict):
        raise CacheCorruptedError(f"{INDEX} is not a {FORMAT} index (not a JSON object)")
    require(index, ("format",))
    if index["format"] != FORMAT:
        raise CacheCorruptedError(f"{INDEX} is not a {FORMAT} index (format={str(index['format'])[:80]!r})")
    require(index, ("version",))
    if index["version"] not in READ_VERSIONS or isinstance(index["version"], bool):
        raise CacheCorruptedError(
            f"{INDEX} has format version {index['version']!r}, this fastkd reads {READ_VERSIONS} "
            f"(rebuild the cache)"
        )
    if index["version"] == 2:
        index.setdefault("temperatures", [])
    require(index, INDEX_KEYS)
    v = index["vocab_size"]
    if not _int(v) or not 0 < v < 2**31:
        raise bad(f"vocab_size must be an int in [1, 2^31), got {v!r}")
    values, vdt = index["values"], index["value_dtype"]
    if not isinstance(values, str) or values not in ALLOWED_VALUES:
        raise bad(f"values must be one of {tuple(ALLOWED_VALUES)}, got {values!r}")
    if not isinstance(vdt, str) or vdt not in ALLOWED_VALUES[values]:
        raise bad(f"value_dtype {vdt!r} is not one of {ALLOWED_VALUES[values]} for values={values!r}")
    if values == "hidden":
        require(index, HIDDEN_KEYS)
        _check_hidden_settings(index, bad)
    else:
        require(index, SPARSE_KEYS)
        _check_sparse_settings(index, bad)
    if index["has_input_ids"] not in (None, True, False):
        raise bad(f"has_input_ids must be a bool or null, got {index['has_input_ids']!r}")
    if not isinstance(index["meta"], dict):
        raise bad("meta must be an object")
    shards = index["shards"]
    if not isinstance(shards, list):
        raise bad("shards must be a list")
    n_ex = n_tok = 0
    for i, sh in enumerate(shards):
        if not isinstance(sh, dict):
            raise bad(f"shard entry {i} is not an object")
        require(sh, SHARD_KEYS, f"shard entry {i}: ")
        if not plain_name(sh["file"]):
            raise bad(f"shard entry {i} has file {str(sh['file'])[:80]!r}; only plain file names inside the "
                      f"cache directory are allowed")
        for key in ("n_examples", "n_tokens", "bytes", "crc32"):
            if not _int(sh[key]) or sh[key] < 0:
                raise bad(f"shard entry {i} ({sh['file']}): {key} must be an int >= 0, got {sh[key]!r}")
        if not isinstance(sh["sha256"], str) or not _HEX64.fullmatch(sh["sha256"]):
            raise bad(f"shard entry {i} ({sh['file']}): sha256 must be 64 lowercase hex digits")
        n_ex += sh["n_examples"]
        n_tok += sh["n_tokens"]
    if len({sh["file"] for sh in shards}) != len(shards):
        raise bad("two shard entries name the same file")
    for key, total in (("n_examples", n_ex), ("n_tokens", n_tok)):
        if not _int(index[key]) or index[key] != total:
            raise bad(f"{key} is {index[key]!r} but the shards hold {total}")
    if n_ex and index["has_input_ids"] is None:
        raise bad("has_input_ids must be a bool once the cache holds examples, got null")
    return index


def _check_sparse_settings(index: dict[str, Any], bad) -> None:
    v, k, values = index["vocab_size"], index["k"], index["values"]
    if not _int(k) or k <= 0:
        raise bad(f"k must be a positive int, got {k!r}")
    fmt = index["id_format"]
    if not isinstance(fmt, str) or fmt not in ID_FORMATS or v >= ID_LIMIT[fmt]:
        raise bad(f"id_format {fmt!r} cannot hold vocab_size={v}")
    if not _int(index["id_bits"]) or index["id_bits"] != id_bits(v):
        raise bad(f"id_bits must be {id_bits(v)} for vocab_size={v}, got {index['id_bits']!r}")
    if not isinstance(index["store_tail"], bool) or (index["store_tail"] and values != "logprobs"):
        raise bad(f"store_tail must be a bool (False for counts), got {index['store_tail']!r}")
    temps = index["temperatures"]
    if not isinstance(temps, list) or any(not _pos_float(t) for t in temps) or len(set(temps)) != len(temps):
        raise bad(f"temperatures must be a list of distinct positive numbers, got {temps!r}")
    if temps and (values != "logprobs" or temps[0] != 1.0 or not index["store_tail"]):
        raise bad("temperatures need a log-prob cache with a stored tail, and list 1.0 first")


def _pos_float(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < float("inf")


def _check_hidden_settings(index: dict[str, Any], bad) -> None:
    h = index["hidden_size"]
    if not _int(h) or h <= 0:
        raise bad(f"hidden_size must be a positive int, got {h!r}")
    for key in ("softcap", "logit_scale"):
        if index[key] is not None and not _pos_float(index[key]):
            raise bad(f"{key} must be a positive number or null, got {index[key]!r}")
    head = index["lm_head"]
    if not isinstance(head, dict):
        raise bad("lm_head must be an object naming a plain file inside the cache directory")
    key = _missing(head, HEAD_KEYS)
    if key is not None:
        raise bad(f"lm_head: missing required key {key!r}")
    if not plain_name(head["file"]):
        raise bad("lm_head must be an object naming a plain file inside the cache directory")
    for key in ("bytes", "crc32"):
        if not _int(head[key]) or head[key] < 0:
            raise bad(f"lm_head.{key} must be an int >= 0, got {head[key]!r}")
    if not isinstance(head["sha256"], str) or not _HEX64.fullmatch(head["sha256"]):
        raise bad("lm_head.sha256 must be 64 lowercase hex digits")
    if not isinstance(head["dtype"], str) or head["dtype"] not in ("float16", "bfloat16", "float32"):
        raise bad(f"lm_head.dtype must be 'float16', 'bfloat16' or 'float32', got {str(head['dtype'])[:80]!r}")
    if not isinstance(head["bias"], bool):
        raise bad(f"lm_head.bias must be a bool, got {str(head['bias'])[:80]!r}")


def shard_metadata(position: int, index: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata binding a shard to its position and the index settings."""
    meta = {"format": FORMAT, "version": str(VERSION), "shard": str(position)}
    meta.update({key: _meta_value(index, key) for key in shard_meta_keys(index)})
    return meta


def _ids_in_range(stored: torch.Tensor, fmt: str, bits: int, k: int, vocab: int) -> tuple[int, int] | None:
    """(min, max) of the decoded ids when some lie outside [−1, vocab), else None; chunked to bound memory."""
    rows = max(1, (1 << 22) // max(1, stored.shape[1] * (8 if fmt == "packed" else 1)))
    for r0 in range(0, stored.shape[0], rows):
        ids = decode_ids(stored[r0:r0 + rows], fmt, bits, k)
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= vocab):
            return int(ids.min()), int(ids.max())
    return None


def check_shard(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None, position: int,
                entry: dict[str, Any], index: dict[str, Any]) -> None:
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
    out = _ids_in_range(tensors["ids"], fmt, index["id_bits"], k, index["vocab_size"])
    if out is not None:
        raise bad(f"ids span [{out[0]}, {out[1]}], outside [-1, vocab_size={index['vocab_size']})")


