"""The teacher-cache writer (:class:`TeacherCacheWriter`); the format is described in :mod:`fastkd.cache`."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import torch

from fastkd.cache import io
from fastkd.cache import validate as V
from fastkd.cache.extract import extract
from fastkd.cache.format import ALLOWED_VALUES, FORMAT, INDEX, VALUE_DTYPES, VERSION, shard_metadata
from fastkd.cache.hidden import check_head, head_bytes, head_entry
from fastkd.cache.ids import choose_id_format, encode_ids, id_bits

__all__ = ["TeacherCacheWriter"]


def _temperature_list(temperatures: Any, values: str, store_tail: bool) -> list[float]:
    temps = [float(t) for t in temperatures]
    if not temps:
        return []
    if values != "logprobs" or not store_tail:
        raise ValueError("temperatures need values='logprobs' and store_tail=True (the tail is stored per temperature)")
    if any(not 0 < t < math.inf for t in temps):
        raise ValueError(f"temperatures must be positive and finite, got {tuple(temperatures)}")
    out = [1.0]
    for t in temps:
        if not any(math.isclose(t, u, rel_tol=1e-9) for u in out):
            out.append(t)
    return out


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
        temperatures: (log-prob caches with a tail) also store the log-normaliser and the log tail mass at
            each of these temperatures (1.0 is always stored, first), so ``cache.get(i, temperature=τ)``
            gives exact log-probs / tail at τ (:mod:`fastkd.cache.temper`); ``add_from_hidden`` computes them.
        validate: check every added example's values against what the losses accept (no id twice in a
            token, log-probs in [-inf, 0] with a top-k mass of at most 1, log tail masses in [-inf, 0],
            finite lse / hidden states) and raise ``ValueError`` naming the argument
            (:mod:`fastkd.cache.validate`); ``False`` skips these data checks for speed, for targets
            known to be valid. Shapes, dtypes and the id range are checked either way.
        values="hidden" (:mod:`fastkd.cache.hidden`): store the teacher's final hidden states per token
            (``add_hidden``) and the LM head once: ``lm_head`` (V, H), ``lm_head_bias`` (V,) | None,
            ``hidden_size`` H (checked), ``softcap`` / ``logit_scale`` of the teacher's head; ``value_dtype``
            "bfloat16" (default), "float16" or "float32"; ``k``, ``id_format``, ``store_tail`` do not apply.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        vocab_size: int | None = None,
        k: int | None = None,
        values: str = "logprobs",
        value_dtype: str | None = None,
        id_format: str = "auto",
        store_tail: bool = True,
        shard_tokens: int = 1 << 20,
        resume: bool = False,
        meta: dict[str, Any] | None = None,
        temperatures: tuple[float, ...] | list[float] = (),
        hidden_size: int | None = None,
        lm_head: torch.Tensor | None = None,
        lm_head_bias: torch.Tensor | None = None,
        softcap: float | None = None,
        logit_scale: float | None = None,
        validate: bool = True,
    ):
        if values not in ALLOWED_VALUES:
            raise ValueError(f"values must be one of {tuple(ALLOWED_VALUES)}, got {values!r}")
        if not isinstance(validate, bool):
            raise ValueError(f"validate must be a bool, got {validate!r}")
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        head_blob = None
        if values == "hidden":
            vocab_size, hidden_size = check_head(lm_head, lm_head_bias, hidden_size, vocab_size)
            for name, x in (("softcap", softcap), ("logit_scale", logit_scale)):
                if x is not None and not (isinstance(x, (int, float)) and 0 < x < math.inf):
                    raise ValueError(f"{name} must be a positive number or None, got {x!r}")
            if temperatures:
                raise ValueError("temperatures apply to log-prob caches; a hidden-state cache is exact at any T")
        if not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        if values != "hidden" and (not isinstance(k, int) or k <= 0):
            raise ValueError(f"k must be a positive int, got {k!r}")
        value_dtype = value_dtype or {"logprobs": "float16", "counts": "uint8", "hidden": "bfloat16"}[values]
        allowed = ALLOWED_VALUES[values]
        if value_dtype not in allowed:
            raise ValueError(
                f"value_dtype for values={values!r} must be one of {allowed}, got {value_dtype!r}"
            )
        self.path = Path(path)
        if values == "hidden":
            head_blob = head_bytes(lm_head, lm_head_bias)
            settings = {"vocab_size": vocab_size, "values": values, "value_dtype": value_dtype,
                        "hidden_size": hidden_size, "softcap": None if softcap is None else float(softcap),
                        "logit_scale": None if logit_scale is None else float(logit_scale),
                        "lm_head": head_entry(head_blob, lm_head, lm_head_bias)}
        else:
            settings = {
                "vocab_size": vocab_size,
                "k": k,
                "values": values,
                "value_dtype": value_dtype,
                "id_format": choose_id_format(vocab_size, id_format),
                "id_bits": id_bits(vocab_size),
                "store_tail": bool(store_tail and values == "logprobs"),
                "temperatures": _temperature_list(temperatures, values, store_tail),
            }
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = io.WriterLock(self.path)  # CacheLockedError if another writer has this directory
        try:
            index = self._open_index(settings, resume, meta)
            if head_blob is not None and not index["shards"]:  # (re)write the head before any shard exists
                io.fsync_write(self.path / index["lm_head"]["file"], head_blob)
        except BaseException:
            self._lock.release()
            raise
        self.index = index
        self.shard_tokens = shard_tokens
        self.validate = validate
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
            index = io.read_index(self.path)
            index["version"] = VERSION
            diff = {key: (index.get(key), val) for key, val in settings.items() if index.get(key) != val}
            if diff:
                raise ValueError(f"cannot resume {self.path}: settings differ (stored, requested): {diff}")
            io.remove_temporaries(self.path)  # left by writers that died (we hold the lock)
            return index
        else:
            io.remove_temporaries(self.path)  # a writer that died before its first index
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
        *,
        lse: torch.Tensor | None = None,
        tails: torch.Tensor | None = None,
    ) -> int:
        """Buffer one example: ids (T, k') int (−1 padding, k' ≤ k), values (T, k'), tail (T,) log mass.

        With ``temperatures``, ``values`` are log-probs at τ = 1 and ``lse`` (T, J) / ``tails`` (T, J) are
        the log-normaliser and log tail mass at each stored temperature (``add_from_hidden`` computes them).
        Returns the example's index. Writes a shard when enough tokens are buffered. Raises ``ValueError``
        naming the argument for anything the reader or the losses would refuse (``validate``).
        """
        if self.closed:
            raise RuntimeError("this TeacherCacheWriter is closed")
        ix = self.index
        if ix["values"] == "hidden":
            raise ValueError("this is a hidden-state cache: use add_hidden(hidden, input_ids)")
        V.check_integer("ids", ids)
        (V.check_floating if ix["values"] == "logprobs" else V.check_real)("values", values)
        if ids.dim() != 2 or values.shape != ids.shape:
            raise ValueError(
                f"ids and values must both be (T, k), got {tuple(ids.shape)} and {tuple(values.shape)}"
            )
        t, k = ids.shape
        if k > ix["k"]:
            raise ValueError(f"ids has {k} slots per token but the cache stores k={ix['k']}")
        if ix["store_tail"] and tail is not None:
            V.check_floating("tail", tail)
            if tuple(tail.shape) != (t,):
                raise ValueError(f"tail must have shape ({t},), got {tuple(tail.shape)}")
        n_temps = len(ix.get("temperatures", []))
        if n_temps:
            for name, x in (("lse", lse), ("tails", tails)):
                if x is None or tuple(x.shape) != (t, n_temps):
                    raise ValueError(f"{name} must be ({t}, {n_temps}) for temperatures {ix['temperatures']}, got "
                                     f"{None if x is None else tuple(x.shape)}")
                V.check_floating(name, x)
        elif lse is not None or tails is not None:
            raise ValueError("lse / tails are stored only by caches created with temperatures=")
        # the values (a pass over the data on the CPU)
        ids = ids.detach().to("cpu", torch.int64)
        V.check_ids(ids, ix["vocab_size"], self.validate)
        vals = values.detach().cpu()
        if ix["values"] == "counts":
            if vals.dtype.is_floating_point and not torch.equal(vals, vals.round()):
                raise ValueError("counts must be whole numbers")
            vals = vals.to(torch.int64)
            hi = 255 if ix["value_dtype"] == "uint8" else 2**31 - 1
            if vals.numel() and (int(vals.min()) < 0 or int(vals.max()) > hi):
                raise ValueError(f"counts must be in [0, {hi}] for value_dtype={ix['value_dtype']!r}")
        elif self.validate:
            V.check_logprobs(vals, ids >= 0)
        vals = torch.where(ids >= 0, vals, torch.zeros((), dtype=vals.dtype))
        if k < ix["k"]:
            ids = torch.nn.functional.pad(ids, (0, ix["k"] - k), value=-1)
            vals = torch.nn.functional.pad(vals, (0, ix["k"] - k), value=0)
        ex = {"ids": ids, "values": vals.to(VALUE_DTYPES[ix["value_dtype"]])}
        if ix["store_tail"]:
            if tail is None:  # derive the tail from the values (less exact than a computed one)
                head = torch.logsumexp(torch.where(ids >= 0, vals.double(), -math.inf), -1).clamp_max(0.0)
                tail = torch.log(-torch.expm1(head)).float()
            elif self.validate:
                V.check_log_mass("tail", tail.detach().cpu())
            ex["tail"] = tail.detach().cpu().to(VALUE_DTYPES[ix["value_dtype"]])
        if n_temps:
            ex["lse"] = lse.detach().cpu().float()
            ex["tails"] = tails.detach().cpu().to(VALUE_DTYPES[ix["value_dtype"]])
            if self.validate:
                V.check_finite("lse", ex["lse"])
                V.check_log_mass("tails", tails.detach().cpu())
        return self._append(ex, t, input_ids)

    def add_hidden(self, hidden: torch.Tensor, input_ids: torch.Tensor | None = None) -> int:
        """Buffer one example of a hidden-state cache: the teacher's final hidden states (T, H) (before the
        LM head and before ``logit_scale``), stored in ``value_dtype``; input_ids (T,) optional."""
        if self.closed:
            raise RuntimeError("this TeacherCacheWriter is closed")
        ix = self.index
        if ix["values"] != "hidden":
            raise ValueError("add_hidden needs a cache created with values='hidden'")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or hidden.shape[1] != ix["hidden_size"]:
            raise ValueError(f"hidden must be (T, {ix['hidden_size']}), got "
                             f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}")
        if not hidden.dtype.is_floating_point:
            raise ValueError(f"hidden must be a floating-point tensor, got {hidden.dtype}")
        h = hidden.detach().to("cpu", VALUE_DTYPES[ix["value_dtype"]]).contiguous()
        if self.validate:
            V.check_finite("hidden", h)
        return self._append({"hidden": h}, h.shape[0], input_ids)

    def _append(self, ex: dict[str, torch.Tensor], t: int, input_ids: torch.Tensor | None) -> int:
        ix = self.index
        has = input_ids is not None
        if ix["has_input_ids"] is not None and ix["has_input_ids"] != has:
            raise ValueError("pass input_ids for every example or for none")
        if has:
            V.check_integer("input_ids", input_ids)
            if tuple(input_ids.shape) != (t,):
                raise ValueError(f"input_ids must have shape ({t},), got {tuple(input_ids.shape)}")
            inp = input_ids.detach().cpu()
            if inp.numel() and (int(inp.min()) < -(2**31) or int(inp.max()) >= 2**31):
                raise ValueError(f"input_ids are stored as int32, got values in [{int(inp.min())}, {int(inp.max())}]")
            ex["input_ids"] = inp.to(torch.int32)
        ix["has_input_ids"] = has
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
        topk_backend: str = "auto",
    ) -> int:
        """Compute the example's targets from teacher hidden states (T, H) and LM head (V, H), then add it.

        ONE LM-head pass (:func:`fastkd.cache.extract.extract`): a log-prob cache takes the top-k, its
        log-probs and the log-normaliser / tail at every stored temperature (``temperature`` must then be
        1.0); a counts cache takes ``k`` RS-KD samples (``generator``); a hidden-state cache stores
        ``hidden`` as is (``weight`` must match its head). ``topk_backend``: "auto" (the streaming Triton
        top-k on CUDA tensors, torch otherwise), "torch" or "triton".
        """
        ix = self.index
        if weight.shape[0] != ix["vocab_size"]:
            raise ValueError(
                f"weight has {weight.shape[0]} rows but the cache's vocab_size is {ix['vocab_size']}"
            )
        if ix["values"] == "hidden":
            if weight.shape[1] != ix["hidden_size"]:
                raise ValueError(f"weight has {weight.shape[1]} columns, the cache's hidden_size is "
                                 f"{ix['hidden_size']}")
            return self.add_hidden(hidden, input_ids=input_ids)
        temps = ix.get("temperatures") or [1.0]
        if len(temps) > 1 and temperature != 1.0:
            raise ValueError("a cache with temperatures= stores log-probs at temperature 1.0: pass temperature=1.0 "
                             "and read other temperatures with cache.get(i, temperature=...)")
        counts = ix["values"] == "counts"
        out = extract(hidden, weight, bias, k=None if counts else ix["k"], temperatures=tuple(temps),
                      num_samples=ix["k"] if counts else None, generator=generator, temperature=temperature,
                      chunk_size=chunk_size, softcap=softcap, topk_backend=topk_backend)
        if counts:
            return self.add(out["sample_ids"], out["counts"], input_ids=input_ids)
        extra = {"lse": out["lse"], "tails": out["tails"]} if len(ix.get("temperatures", [])) else {}
        return self.add(out["ids"], out["logp"], out["tails"][:, 0], input_ids=input_ids, **extra)

    def flush(self) -> None:
        """Write the buffered examples as one shard and commit it to the index."""
        if not self._buf:
            return
        from safetensors.torch import save

        ix = self.index
        first = "hidden" if ix["values"] == "hidden" else "ids"
        tensors = {
            "offsets": torch.tensor(
                [0, *torch.tensor([e[first].shape[0] for e in self._buf]).cumsum(0).tolist()],
                dtype=torch.int64,
            ),
        }
        if first == "ids":
            tensors["ids"] = encode_ids(torch.cat([e["ids"] for e in self._buf]), ix["id_format"], ix["id_bits"])
        for key in ("values", "hidden", "tail", "lse", "tails", "input_ids"):
            if key in self._buf[0]:
                tensors[key] = torch.cat([e[key] for e in self._buf])
        data = save(tensors, metadata=shard_metadata(len(ix["shards"]), ix))
        name = f"shard-{len(ix['shards']):05d}.safetensors"
        io.fsync_write(self.path / name, data)
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
        io.write_index(self.path, ix)
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
