"""The teacher-cache reader (:class:`TeacherCache`) and its ``torch.utils.data.Dataset``
(:class:`TeacherCacheDataset`); the format is described in :mod:`fastkd.cache`."""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fastkd.cache import io
from fastkd.cache.format import CacheCorruptedError, check_shard
from fastkd.cache.hidden import collate_hidden, read_head
from fastkd.cache.ids import decode_ids
from fastkd.cache.temper import at_temperature, cache_stats
from fastkd.cache.writer import TeacherCacheWriter

__all__ = ["TeacherCache", "TeacherCacheDataset"]


def _safetensors_metadata(data: bytes) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors blob (8-byte little-endian header length, then JSON)."""
    n = int.from_bytes(data[:8], "little")
    if not 0 < n <= len(data) - 8:
        raise ValueError(f"header length {n} does not fit the file")
    meta = json.loads(data[8:8 + n]).get("__metadata__")
    if meta is not None and not isinstance(meta, dict):
        raise ValueError("__metadata__ is not an object")
    return meta


class TeacherCache:
    """Random-access reader of a cache directory; ``TeacherCache.create(...)`` returns a writer.

    ``cache[i]`` → dict with ``teacher_ids`` (T, K) int64 (−1 padding), ``teacher_values`` (T, K) float32
    (log-probs, or counts), ``teacher_tail`` (T,) float32 log tail mass (if stored) and ``input_ids`` (T,)
    int64 (if stored). ``cache.get(i, temperature=τ)`` re-tempers (caches built with ``temperatures=``).
    A hidden-state cache gives ``cache[i]["hidden"]`` (T, H) in the stored dtype (and ``input_ids``), and
    ``cache.lm_head()`` → (weight (V, H), bias (V,) | None), verified against its SHA-256.
    """

    create = TeacherCacheWriter

    def __init__(self, path: str | os.PathLike, *, verify: bool = False):
        self.path = Path(path)
        self.index = io.read_index(self.path)
        ix = self.index
        self._starts = [0]
        for sh in ix["shards"]:
            self._starts.append(self._starts[-1] + sh["n_examples"])
        self._open: dict[int, dict[str, torch.Tensor]] = {}
        self._head: tuple[torch.Tensor, torch.Tensor | None] | None = None
        for i, sh in enumerate(ix["shards"]):
            io.stat_shard(self.path / sh["file"], sh["file"], sh["bytes"])
            if verify:
                self._shard(i, verify=True)
        if ix["values"] == "hidden":
            io.stat_shard(self.path / ix["lm_head"]["file"], ix["lm_head"]["file"], ix["lm_head"]["bytes"])
            if verify:
                self.lm_head()

    def __len__(self) -> int:
        return self.index["n_examples"]

    @property
    def n_tokens(self) -> int:
        return self.index["n_tokens"]

    @property
    def k(self) -> int | None:
        return self.index.get("k")

    @property
    def temperatures(self) -> list[float]:
        return list(self.index.get("temperatures", []))

    def lm_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's LM head of a hidden-state cache: weight (V, H), bias (V,) | None (stored dtype)."""
        if self.index["values"] != "hidden":
            raise ValueError("lm_head() belongs to hidden-state caches (values='hidden')")
        if self._head is None:
            self._head = read_head(self.path, self.index)
        return self._head

    def stats(self, quantiles: tuple[float, ...] = (0.5, 0.9, 0.99, 1.0)) -> dict[str, Any]:
        """Per temperature: tail-mass quantiles (= TV distance to the top-k renormalisation) and the
        worst-case quantisation error of values / tail; see :func:`fastkd.cache.temper.cache_stats`."""
        return cache_stats(self, quantiles)

    @property
    def vocab_size(self) -> int:
        return self.index["vocab_size"]

    @property
    def values_kind(self) -> str:
        return self.index["values"]

    def bytes_per_token(self) -> float:
        total = sum(sh["bytes"] for sh in self.index["shards"])
        return total / max(1, self.n_tokens)

    def _shard(self, i: int, verify: bool = False) -> dict[str, torch.Tensor]:
        if i in self._open:
            return self._open[i]
        from safetensors.torch import load

        sh = self.index["shards"][i]
        name = sh["file"]
        data = io.read_file(self.path / name, f"shard {name}", size=sh["bytes"])
        if io.crc32(data) != sh["crc32"]:
            raise CacheCorruptedError(f"shard {name} fails its CRC-32 check (the file was altered)")
        if verify and hashlib.sha256(data).hexdigest() != sh["sha256"]:
            raise CacheCorruptedError(f"shard {name} fails its SHA-256 check (the file was altered)")
        try:
            tensors = load(data)
            meta = _safetensors_metadata(data)
        except Exception as exc:
            raise CacheCorruptedError(f"shard {name} is corrupted ({type(exc).__name__}: {exc})") from exc
        check_shard(tensors, meta, i, sh, self.index)
        if len(self._open) >= 2:  # keep at most two decoded shards in memory
            self._open.pop(next(iter(self._open)))
        self._open[i] = tensors
        return tensors

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return self._example(idx)[0]

    def get(self, idx: int, temperature: float | None = None, approximate: bool = False) -> dict[str, torch.Tensor]:
        """``cache[idx]``, with ``teacher_values`` / ``teacher_tail`` the exact log-probs / log tail mass at
        ``temperature`` (a temperature the cache stores; ``approximate=True`` renormalises the top-k instead
        for one it does not). See :mod:`fastkd.cache.temper`."""
        ex, lse, tails = self._example(idx)
        if temperature is None:
            return ex
        return at_temperature(ex, lse, tails, self.index, temperature, approximate)

    def _example(self, idx: int) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        n = len(self)
        if not isinstance(idx, int):
            raise TypeError(f"cache indices are ints, got {type(idx).__name__}")
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"example {idx} out of range for a cache of {n} examples")
        s = bisect.bisect_right(self._starts, idx) - 1
        t = self._shard(s)
        j = idx - self._starts[s]
        a, b = int(t["offsets"][j]), int(t["offsets"][j + 1])
        ix = self.index
        if ix["values"] == "hidden":
            out = {"hidden": t["hidden"][a:b]}
        else:
            out = {
                "teacher_ids": decode_ids(t["ids"][a:b], ix["id_format"], ix["id_bits"], ix["k"]),
                "teacher_values": t["values"][a:b].float(),
            }
        if "tail" in t:
            out["teacher_tail"] = t["tail"][a:b].float()
        if "input_ids" in t:
            out["input_ids"] = t["input_ids"][a:b].long()
        lse = t["lse"][a:b] if "lse" in t else None
        return out, lse, (t["tails"][a:b] if "tails" in t else None)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(len(self)):
            yield self[i]

    def dataset(self) -> TeacherCacheDataset:
        return TeacherCacheDataset(self)


class TeacherCacheDataset(torch.utils.data.Dataset):
    """``torch.utils.data.Dataset`` over a :class:`TeacherCache`; use :meth:`collate` as ``collate_fn``."""

    def __init__(self, cache: TeacherCache | str | os.PathLike, pad_token_id: int = 0,
                 temperature: float | None = None, approximate: bool = False):
        self.cache = cache if isinstance(cache, TeacherCache) else TeacherCache(cache)
        self.pad_token_id = pad_token_id
        self.temperature, self.approximate = temperature, approximate
        if temperature is not None:  # fail now, not in a DataLoader worker
            if self.cache.values_kind != "logprobs":
                raise ValueError(f"temperature= needs a log-prob cache, this one stores {self.cache.values_kind!r}")
            if not approximate and temperature not in self.cache.temperatures:
                at_temperature({"teacher_ids": torch.zeros(0, 1, dtype=torch.long)}, None, None, self.cache.index,
                               temperature)  # raises the clear "not stored" error

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return self.cache.get(idx, self.temperature, self.approximate)

    def collate(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pad to the longest example: teacher_ids −1, values 0, tail −inf, input_ids pad_token_id;
        adds ``mask`` (B, T) bool, True = a real token. Hidden-state caches: ``teacher_hidden`` (B, T, H)."""
        if "hidden" in batch[0]:
            return collate_hidden(batch, self.pad_token_id)
        b, t = len(batch), max(x["teacher_ids"].shape[0] for x in batch)
        k = batch[0]["teacher_ids"].shape[1]
        out = {
            "teacher_ids": torch.full((b, t, k), -1, dtype=torch.int64),
            "teacher_values": torch.zeros(b, t, k),
            "mask": torch.zeros(b, t, dtype=torch.bool),
        }
        if "teacher_tail" in batch[0]:
            out["teacher_tail"] = torch.full((b, t), -math.inf)
        if "input_ids" in batch[0]:
            out["input_ids"] = torch.full((b, t), self.pad_token_id, dtype=torch.int64)
        for i, x in enumerate(batch):
            n = x["teacher_ids"].shape[0]
            out["mask"][i, :n] = True
            for key in ("teacher_ids", "teacher_values", "teacher_tail", "input_ids"):
                if key in out:
                    out[key][i, :n] = x[key]
        return out
