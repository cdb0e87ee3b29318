"""``fastkd.cache``: an on-disk cache of sparse teacher outputs (top-k log-probs or sample counts per token).

Layout of a cache directory::

    index.json                 format, settings, and the list of complete shards (the source of truth)
    shard-00000.safetensors    one shard: several examples, tensors below, T = tokens in the shard
    ...

Tensors of a shard (safetensors, compact dtypes):
    ``offsets``   (E + 1,) int64   token offset of each example inside the shard
    ``ids``       (T, K) int16 (V < 2^15), (T, K) int16 holding id+1 as uint16 bits (V < 2^16), or
                  (T, ceil(K·b/8)) uint8 with id+1 bit-packed in b = ceil(log2(V+1)) bits (larger V; 17 bits
                  for V = 128256); 0 / −1 = padding slot. ``id_format`` "int32" stores plain int32.
    ``values``    (T, K) float16 / bfloat16 / float32 log-probs, or uint8 / int32 sample counts
    ``tail``      (T,) log of the teacher mass outside the K ids (top-k caches, ``store_tail``)
    ``input_ids`` (T,) int32 token ids of the example (optional)

Crash safety: a shard is written to a temporary file, fsynced and renamed, then ``index.json`` is replaced
atomically the same way. A writer that dies mid-way leaves every shard listed in the index readable; a
writer opened with ``resume=True`` continues after the last complete shard (``writer.n_examples`` says how
many examples to skip). One writer per directory: a writer holds an exclusive lock on ``.lock`` and a second
one raises :class:`CacheLockedError`.

Untrusted caches (:mod:`fastkd.cache_io`): the index is validated field by field, only plain file names inside
the directory are opened (no symlinks), sizes are checked before reading, every shard's CRC-32 is checked
when it is read (SHA-256 of every shard with ``verify=True``), each shard is bound to its position and the
index settings by its own metadata, and its tensors are validated (monotonic offsets, shapes, ids < V).
Every problem raises :class:`CacheCorruptedError` naming the cache file.

Building from a teacher: :meth:`TeacherCacheWriter.add_from_hidden` takes the teacher's final hidden
states and LM-head weight and computes top-k log-probs (or samples) chunk by chunk: peak memory
O(chunk · V), never (N, V) logits.
"""

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

from fastkd import cache_io as io
from fastkd.cache_io import FORMAT, INDEX, VERSION, CacheCorruptedError, CacheLockedError, id_bits
from fastkd.core.lmhead import iter_logits

__all__ = ["FORMAT", "INDEX", "VERSION", "CacheCorruptedError", "CacheLockedError", "TeacherCache",
           "TeacherCacheDataset", "TeacherCacheWriter", "id_bits"]
_VALUE_DTYPES = io.VALUE_DTYPES


# ---------------------------------------------------------------------------------------------------------
# id encodings
# ---------------------------------------------------------------------------------------------------------


def choose_id_format(vocab_size: int, id_format: str = "auto") -> str:
    if id_format == "auto":
        if vocab_size < 2**15:
            return "int16"
        if vocab_size < 2**16:
            return "uint16"
        return "packed" if id_bits(vocab_size) < 32 else "int32"
    if id_format not in ("int16", "uint16", "packed", "int32"):
        raise ValueError(
            f"id_format must be 'auto', 'int16', 'uint16', 'packed' or 'int32', got {id_format!r}"
        )
    limit = {"int16": 2**15, "uint16": 2**16, "packed": 2**31, "int32": 2**31}[id_format]
    if vocab_size >= limit:
        raise ValueError(
            f"id_format={id_format!r} holds vocabularies below {limit}, got vocab_size={vocab_size}"
        )
    return id_format


def encode_ids(ids: torch.Tensor, fmt: str, bits: int) -> torch.Tensor:
    """(T, K) int64 ids (−1 = padding) → the stored tensor."""
    if fmt == "int32":
        return ids.to(torch.int32)
    if fmt == "int16":
        return ids.to(torch.int16)
    x = ids.to(torch.int64) + 1
    if fmt == "uint16":
        return torch.where(x >= 2**15, x - 2**16, x).to(torch.int16)
    t, k = x.shape
    shifts = torch.arange(bits, dtype=torch.int64)
    flat = ((x.reshape(t, k, 1) >> shifts) & 1).reshape(t, k * bits)
    nbytes = (k * bits + 7) // 8
    flat = torch.nn.functional.pad(flat, (0, nbytes * 8 - k * bits)).reshape(t, nbytes, 8)
    return (flat << torch.arange(8, dtype=torch.int64)).sum(-1).to(torch.uint8)


def decode_ids(stored: torch.Tensor, fmt: str, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`encode_ids` → (T, K) int64 with −1 at padding slots."""
    if fmt in ("int32", "int16"):
        return stored.to(torch.int64)
    if fmt == "uint16":
        return (stored.to(torch.int64) & 0xFFFF) - 1
    t = stored.shape[0]
    b = ((stored.to(torch.int64).unsqueeze(-1) >> torch.arange(8, dtype=torch.int64)) & 1).reshape(t, -1)
    b = b[:, : k * bits].reshape(t, k, bits)
    return (b << torch.arange(bits, dtype=torch.int64)).sum(-1) - 1


# ---------------------------------------------------------------------------------------------------------
# teacher → sparse targets, chunk by chunk
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def topk_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    k: int,
    temperature: float = 1.0,
    chunk_size: int = 256,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of softmax((h W^T + b) / T) per token without (N, V) logits.

    hidden (N, H), weight (V, H), bias (V,). Returns ids (N, k) int64, log-probs (N, k) fp32 and the log of
    the mass outside the k ids (N,) fp32, computed exactly as logsumexp over the other entries − lse.
    """
    n = hidden.shape[0]
    k = min(k, weight.shape[0])
    ids = torch.empty(n, k, dtype=torch.int64, device=hidden.device)
    logp = torch.empty(n, k, dtype=torch.float32, device=hidden.device)
    tail = torch.empty(n, dtype=torch.float32, device=hidden.device)
    # the LM-head engine's chunk logits (fp32, softcap then temperature) in one reused workspace
    for sl, z in iter_logits(hidden, weight, bias, chunk_size, softcap=softcap, temperature=temperature,
                             dtype=torch.float32):
        lse = torch.logsumexp(z, -1)
        top = z.topk(k, -1)
        ids[sl], logp[sl] = top.indices, top.values - lse.unsqueeze(-1)
        tail[sl] = torch.logsumexp(z.scatter_(1, top.indices, -math.inf), -1) - lse
    return ids, logp, tail


@torch.no_grad()
def sample_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    num_samples: int,
    temperature: float = 1.0,
    chunk_size: int = 256,
    generator: torch.Generator | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random-Sampling KD targets: ``num_samples`` draws per token from the teacher (with replacement).

    Returns ids (N, num_samples) int64 (distinct ids first, −1 padding) and counts (N, num_samples) int32.
    """
    n, v = hidden.shape[0], weight.shape[0]
    s = num_samples
    ids = torch.full((n, s), -1, dtype=torch.int64, device=hidden.device)
    counts = torch.zeros(n, s, dtype=torch.int32, device=hidden.device)
    for sl, z in iter_logits(hidden, weight, bias, chunk_size, softcap=softcap, temperature=temperature,
                             dtype=torch.float32):
        probs = torch.softmax(z, -1)
        draws = torch.multinomial(probs, s, replacement=True, generator=generator)
        c = torch.zeros_like(probs).scatter_add_(1, draws, torch.ones_like(draws, dtype=probs.dtype))
        top = c.topk(min(s, v), -1)
        ids[sl, : top.indices.shape[1]] = torch.where(top.values > 0, top.indices, -1)
        counts[sl, : top.indices.shape[1]] = top.values.to(torch.int32)
    return ids, counts


# ---------------------------------------------------------------------------------------------------------
# writer
# ---------------------------------------------------------------------------------------------------------


def _fsync_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(io.tmp_name(path.name))  # private to this writer: two never share a temporary
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_index(path: Path) -> dict[str, Any]:
    f = path / INDEX
    if not os.path.lexists(f):
        raise FileNotFoundError(f"{path} is not a teacher cache: {INDEX} is missing")
    try:
        index = json.loads(io.read_file(f, INDEX))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheCorruptedError(f"{INDEX} is corrupted (not valid JSON: {exc})") from exc
    return io.check_index(index)


class TeacherCacheWriter:
    """Appends examples to a cache directory; see the module docstring. Use as a context manager.

    Args:
        path: the cache directory (created).
        vocab_size: the teacher's vocabulary size V (ids must lie in [0, V)).
        k: slots per token (top-k size, or number of samples for count caches).
        values: "logprobs" (top-k) or "counts" (sampled).
        value_dtype: "float16" (default for log-probs), "bfloat16", "float32"; "uint8" (default for counts)
            or "int32".
        id_format: "auto" (int16 / uint16 / bit-packed by V), or one of "int16", "uint16", "packed", "int32".
        store_tail: store the log tail mass per token (log-prob caches; default True).
        shard_tokens: tokens per shard (a shard is written once it holds at least this many).
        resume: continue an existing cache (its settings must match); else an existing index is an error.
        meta: JSON-serialisable metadata kept in the index (teacher name, temperature, mode, ...).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        vocab_size: int,
        k: int,
        values: str = "logprobs",
        value_dtype: str | None = None,
        id_format: str = "auto",
        store_tail: bool = True,
        shard_tokens: int = 1 << 20,
        resume: bool = False,
        meta: dict[str, Any] | None = None,
    ):
        if values not in ("logprobs", "counts"):
            raise ValueError(f"values must be 'logprobs' or 'counts', got {values!r}")
        if not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        if not isinstance(k, int) or k <= 0:
            raise ValueError(f"k must be a positive int, got {k!r}")
        value_dtype = value_dtype or ("float16" if values == "logprobs" else "uint8")
        allowed = ("float16", "bfloat16", "float32") if values == "logprobs" else ("uint8", "int32")
        if value_dtype not in allowed:
            raise ValueError(
                f"value_dtype for values={values!r} must be one of {allowed}, got {value_dtype!r}"
            )
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.path = Path(path)
        fmt = choose_id_format(vocab_size, id_format)
        settings = {
            "vocab_size": vocab_size,
            "k": k,
            "values": values,
            "value_dtype": value_dtype,
            "id_format": fmt,
            "id_bits": id_bits(vocab_size),
            "store_tail": bool(store_tail and values == "logprobs"),
        }
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = io.WriterLock(self.path)  # CacheLockedError if another writer has this directory
        try:
            index = self._open_index(settings, resume, meta)
        except BaseException:
            self._lock.release()
            raise
        self.index = index
        self.shard_tokens = shard_tokens
        self._buf: list[dict[str, torch.Tensor]] = []
        self._buf_tokens = 0
        self.closed = False

    def _open_index(self, settings: dict[str, Any], resume: bool, meta: dict[str, Any] | None) -> dict[str, Any]:
        """The existing index (resume) or a new one; called with the lock held."""
        if os.path.lexists(self.path / INDEX):
            if not resume:
                raise FileExistsError(
                    f"{self.path} already holds a teacher cache; pass resume=True to continue "
                    f"it or choose a new directory"
                )
            index = _read_index(self.path)
            diff = {key: (index.get(key), val) for key, val in settings.items() if index.get(key) != val}
            if diff:
                raise ValueError(f"cannot resume {self.path}: settings differ (stored, requested): {diff}")
            for tmp in self.path.glob("*.tmp"):  # left by writers that died (we hold the lock)
                tmp.unlink()
            return index
        else:
            return {
                "format": FORMAT,
                "version": VERSION,
                **settings,
                "meta": meta or {},
                "shards": [],
                "n_examples": 0,
                "n_tokens": 0,
                "has_input_ids": None,
            }

    # number of examples stored or buffered; a resumed writer starts at the stored count
    @property
    def n_examples(self) -> int:
        return self.index["n_examples"] + len(self._buf)

    def add(
        self,
        ids: torch.Tensor,
        values: torch.Tensor,
        tail: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> int:
        """Buffer one example: ids (T, k') int (−1 padding, k' ≤ k), values (T, k'), tail (T,) log mass.

        Returns the example's index. Writes a shard when enough tokens are buffered.
        """
        if self.closed:
            raise RuntimeError("this TeacherCacheWriter is closed")
        ix = self.index
        if ids.dim() != 2 or values.shape != ids.shape:
            raise ValueError(
                f"ids and values must both be (T, k), got {tuple(ids.shape)} and {tuple(values.shape)}"
            )
        t, k = ids.shape
        if k > ix["k"]:
            raise ValueError(f"ids has {k} slots per token but the cache stores k={ix['k']}")
        ids = ids.detach().to("cpu", torch.int64)
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= ix["vocab_size"]):
            raise ValueError(
                f"ids must be in [0, {ix['vocab_size']}) or -1, got [{int(ids.min())}, {int(ids.max())}]"
            )
        vals = values.detach().cpu()
        if ix["values"] == "counts":
            if vals.dtype.is_floating_point and not torch.equal(vals, vals.round()):
                raise ValueError("counts must be whole numbers")
            vals = vals.to(torch.int64)
            hi = 255 if ix["value_dtype"] == "uint8" else 2**31 - 1
            if vals.numel() and (int(vals.min()) < 0 or int(vals.max()) > hi):
                raise ValueError(f"counts must be in [0, {hi}] for value_dtype={ix['value_dtype']!r}")
        vals = torch.where(ids >= 0, vals, torch.zeros((), dtype=vals.dtype))
        if k < ix["k"]:
            ids = torch.nn.functional.pad(ids, (0, ix["k"] - k), value=-1)
            vals = torch.nn.functional.pad(vals, (0, ix["k"] - k), value=0)
        ex = {"ids": ids, "values": vals.to(_VALUE_DTYPES[ix["value_dtype"]])}
        if ix["store_tail"]:
            if tail is None:  # derive the tail from the values (less exact than a computed one)
                lse = torch.logsumexp(torch.where(ids >= 0, vals.double(), -math.inf), -1).clamp_max(0.0)
                tail = torch.log(-torch.expm1(lse)).float()
            if tuple(tail.shape) != (t,):
                raise ValueError(f"tail must have shape ({t},), got {tuple(tail.shape)}")
            ex["tail"] = tail.detach().cpu().to(_VALUE_DTYPES[ix["value_dtype"]])
        has = input_ids is not None
        if ix["has_input_ids"] is None:
            ix["has_input_ids"] = has
        elif ix["has_input_ids"] != has:
            raise ValueError("pass input_ids for every example or for none")
        if has:
            if tuple(input_ids.shape) != (t,):
                raise ValueError(f"input_ids must have shape ({t},), got {tuple(input_ids.shape)}")
            ex["input_ids"] = input_ids.detach().cpu().to(torch.int32)
        self._buf.append(ex)
        self._buf_tokens += t
        if self._buf_tokens >= self.shard_tokens:
            self.flush()
        return self.n_examples - 1

    def add_from_hidden(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        temperature: float = 1.0,
        chunk_size: int = 256,
        input_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        softcap: float | None = None,
    ) -> int:
        """Compute the example's targets from teacher hidden states (T, H) and LM head (V, H), then add it."""
        ix = self.index
        if weight.shape[0] != ix["vocab_size"]:
            raise ValueError(
                f"weight has {weight.shape[0]} rows but the cache's vocab_size is {ix['vocab_size']}"
            )
        if ix["values"] == "counts":
            ids, counts = sample_from_hidden(
                hidden,
                weight,
                bias,
                num_samples=ix["k"],
                temperature=temperature,
                chunk_size=chunk_size,
                generator=generator,
                softcap=softcap,
            )
            return self.add(ids, counts, input_ids=input_ids)
        ids, logp, tail = topk_from_hidden(
            hidden, weight, bias, k=ix["k"], temperature=temperature, chunk_size=chunk_size, softcap=softcap
        )
        return self.add(ids, logp, tail, input_ids=input_ids)

    def flush(self) -> None:
        """Write the buffered examples as one shard and commit it to the index."""
        if not self._buf:
            return
        from safetensors.torch import save

        ix = self.index
        tensors = {
            "offsets": torch.tensor(
                [0, *torch.tensor([e["ids"].shape[0] for e in self._buf]).cumsum(0).tolist()],
                dtype=torch.int64,
            ),
            "ids": encode_ids(torch.cat([e["ids"] for e in self._buf]), ix["id_format"], ix["id_bits"]),
            "values": torch.cat([e["values"] for e in self._buf]),
        }
        for key in ("tail", "input_ids"):
            if key in self._buf[0]:
                tensors[key] = torch.cat([e[key] for e in self._buf])
        data = save(tensors, metadata=io.shard_metadata(len(ix["shards"]), ix))
        name = f"shard-{len(ix['shards']):05d}.safetensors"
        _fsync_write(self.path / name, data)
        ix["shards"].append(
            {
                "file": name,
                "n_examples": len(self._buf),
                "n_tokens": self._buf_tokens,
                "bytes": len(data),
                "crc32": io.crc32(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
        ix["n_examples"] += len(self._buf)
        ix["n_tokens"] += self._buf_tokens
        _fsync_write(self.path / INDEX, json.dumps(ix, indent=1).encode())
        self._buf, self._buf_tokens = [], 0

    def close(self) -> None:
        """Write what is buffered and release the directory's lock."""
        if not self.closed:
            try:
                self.flush()
            finally:
                self.closed = True
                self._lock.release()

    def __enter__(self) -> TeacherCacheWriter:
        return self

    def __exit__(self, exc_type, *_: object) -> None:
        # on an exception keep what is complete on disk and drop the partial buffer (resume redoes it)
        if exc_type is None:
            self.close()
        else:
            self._buf, self._buf_tokens, self.closed = [], 0, True
            self._lock.release()


# ---------------------------------------------------------------------------------------------------------
# reader
# ---------------------------------------------------------------------------------------------------------


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
    int64 (if stored).
    """

    create = TeacherCacheWriter

    def __init__(self, path: str | os.PathLike, *, verify: bool = False):
        self.path = Path(path)
        self.index = _read_index(self.path)
        ix = self.index
        self._starts = [0]
        for sh in ix["shards"]:
            self._starts.append(self._starts[-1] + sh["n_examples"])
        self._open: dict[int, dict[str, torch.Tensor]] = {}
        for i, sh in enumerate(ix["shards"]):
            io.stat_shard(self.path / sh["file"], sh["file"], sh["bytes"])
            if verify:
                self._shard(i, verify=True)

    def __len__(self) -> int:
        return self.index["n_examples"]

    @property
    def n_tokens(self) -> int:
        return self.index["n_tokens"]

    @property
    def k(self) -> int:
        return self.index["k"]

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
        io.check_shard(tensors, meta, i, sh, self.index, decode_ids)
        if len(self._open) >= 2:  # keep at most two decoded shards in memory
            self._open.pop(next(iter(self._open)))
        self._open[i] = tensors
        return tensors

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
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
        out = {
            "teacher_ids": decode_ids(t["ids"][a:b], ix["id_format"], ix["id_bits"], ix["k"]),
            "teacher_values": t["values"][a:b].float(),
        }
        if "tail" in t:
            out["teacher_tail"] = t["tail"][a:b].float()
        if "input_ids" in t:
            out["input_ids"] = t["input_ids"][a:b].long()
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(len(self)):
            yield self[i]

    def dataset(self) -> TeacherCacheDataset:
        return TeacherCacheDataset(self)


class TeacherCacheDataset(torch.utils.data.Dataset):
    """``torch.utils.data.Dataset`` over a :class:`TeacherCache`; use :meth:`collate` as ``collate_fn``."""

    def __init__(self, cache: TeacherCache | str | os.PathLike, pad_token_id: int = 0):
        self.cache = cache if isinstance(cache, TeacherCache) else TeacherCache(cache)
        self.pad_token_id = pad_token_id

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return self.cache[idx]

    def collate(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pad to the longest example: teacher_ids −1, values 0, tail −inf, input_ids pad_token_id;
        adds ``mask`` (B, T) bool, True = a real token."""
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
