"""Hidden-state teacher caches (``values="hidden"``): exact dense distillation from disk.

Instead of sparse targets, each token stores the teacher's final hidden state h_t (H values in bf16 / fp16 /
fp32) and the cache stores the teacher's LM head once (``lm_head.safetensors``: ``weight`` (V, H) and, if
any, ``bias`` (V,)), with its size, CRC-32 and SHA-256 in the index and the head's ``softcap`` and
``logit_scale`` in the settings. Training then recomputes the teacher logits chunk by chunk inside
:func:`fastkd.fused_linear_distill_loss` (``teacher_hidden = cache[i]["hidden"] · logit_scale``,
``teacher_weight, teacher_bias = cache.lm_head()``), so every divergence equals online distillation up to
the rounding of the stored hidden states. Cost: H · bytes(dtype) per token (H = 4096 in bf16: 8 KiB)
against V · 2 bytes for bf16 logits (V = 128256: 250.5 KiB), a 31× saving, and no top-k truncation.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from fastkd.cache import io
from fastkd.cache.format import FORMAT, VALUE_DTYPES, CacheCorruptedError

LM_HEAD = "lm_head.safetensors"


def check_head(lm_head: torch.Tensor | None, bias: torch.Tensor | None, hidden_size: int | None,
               vocab_size: int | None) -> tuple[int, int]:
    """Validate the LM head given to a hidden-state writer; returns (V, H)."""
    if not isinstance(lm_head, torch.Tensor) or lm_head.dim() != 2 or not lm_head.dtype.is_floating_point:
        raise ValueError("values='hidden' needs lm_head=<the teacher's (V, H) floating-point LM-head weight>")
    v, h = lm_head.shape
    if hidden_size is not None and hidden_size != h:
        raise ValueError(f"hidden_size={hidden_size} but lm_head has shape {tuple(lm_head.shape)} (V, H)")
    if vocab_size is not None and vocab_size != v:
        raise ValueError(f"vocab_size={vocab_size} but lm_head has {v} rows")
    if bias is not None and tuple(bias.shape) != (v,):
        raise ValueError(f"lm_head_bias must have shape ({v},), got {tuple(bias.shape)}")
    if lm_head.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"lm_head must be float16 / bfloat16 / float32, got {lm_head.dtype}")
    return v, h


def head_bytes(lm_head: torch.Tensor, bias: torch.Tensor | None) -> bytes:
    """The safetensors blob of the head (CPU, contiguous; the bias in the weight's dtype)."""
    from safetensors.torch import save

    tensors = {"weight": lm_head.detach().to("cpu").contiguous()}
    if bias is not None:
        tensors["bias"] = bias.detach().to("cpu", lm_head.dtype).contiguous()
    # one metadata key: safetensors writes its metadata map in hash order, and the SHA-256 of these bytes
    # must identify the head (a resumed writer compares it), so the bytes must be deterministic
    return save(tensors, metadata={"format": f"{FORMAT}-lm-head"})


def head_entry(data: bytes, lm_head: torch.Tensor, bias: torch.Tensor | None) -> dict[str, Any]:
    return {"file": LM_HEAD, "bytes": len(data), "crc32": io.crc32(data),
            "sha256": hashlib.sha256(data).hexdigest(), "dtype": str(lm_head.dtype).removeprefix("torch."),
            "bias": bias is not None}


def read_head(path: Path, index: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Load and verify (size, SHA-256, shapes) the stored LM head → (weight (V, H), bias (V,) | None)."""
    from safetensors.torch import load

    entry = index["lm_head"]
    name = entry["file"]
    data = io.read_file(path / name, name, size=entry["bytes"])
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CacheCorruptedError(f"{name} fails its SHA-256 check (the LM head was altered)")
    try:
        t = load(data)
    except Exception as exc:
        raise CacheCorruptedError(f"{name} is corrupted ({type(exc).__name__}: {exc})") from exc
    v, h = index["vocab_size"], index["hidden_size"]
    dt = VALUE_DTYPES[entry["dtype"]]
    w, b = t.get("weight"), t.get("bias")
    if w is None or tuple(w.shape) != (v, h) or w.dtype != dt or set(t) - {"weight", "bias"}:
        raise CacheCorruptedError(f"{name} must hold weight ({v}, {h}) {dt}" + (" and bias" if entry["bias"] else ""))
    if (b is not None) != entry["bias"] or (b is not None and tuple(b.shape) != (v,)):
        raise CacheCorruptedError(f"{name}: bias presence/shape does not match the index")
    return w, b


def collate_hidden(batch: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad hidden-state examples: ``teacher_hidden`` (B, T, H) zeros at padding, ``mask`` (B, T) bool,
    ``input_ids`` (B, T) (pad_token_id) when stored."""
    b, t = len(batch), max(x["hidden"].shape[0] for x in batch)
    h = batch[0]["hidden"]
    out = {"teacher_hidden": h.new_zeros(b, t, h.shape[1]), "mask": torch.zeros(b, t, dtype=torch.bool)}
    if "input_ids" in batch[0]:
        out["input_ids"] = torch.full((b, t), pad_token_id, dtype=torch.int64)
    for i, x in enumerate(batch):
        n = x["hidden"].shape[0]
        out["mask"][i, :n] = True
        out["teacher_hidden"][i, :n] = x["hidden"]
        if "input_ids" in out:
            out["input_ids"][i, :n] = x["input_ids"]
    return out
