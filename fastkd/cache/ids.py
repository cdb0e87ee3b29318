"""Id encodings of the teacher cache: int16 / uint16 / bit-packed / int32 (see :mod:`fastkd.cache`).

The bottom floor of the package: it imports nothing from it.
"""

from __future__ import annotations

import torch

__all__ = ["ID_FORMATS", "ID_LIMIT", "choose_id_format", "decode_ids", "encode_ids", "id_bits"]

ID_FORMATS = ("int16", "uint16", "packed", "int32")
ID_LIMIT = {"int16": 2**15, "uint16": 2**16, "packed": 2**31, "int32": 2**31}  # vocabularies below this fit


def id_bits(vocab_size: int) -> int:
    """Bits needed to store id + 1 for ids in [0, vocab_size) (0 encodes padding)."""
    return max(1, (vocab_size).bit_length())


def choose_id_format(vocab_size: int, id_format: str = "auto") -> str:
    if id_format == "auto":
        if vocab_size < 2**15:
            return "int16"
        if vocab_size < 2**16:
            return "uint16"
        return "packed" if id_bits(vocab_size) < 32 else "int32"
    if id_format not in ID_FORMATS:
        raise ValueError(
            f"id_format must be 'auto', 'int16', 'uint16', 'packed' or 'int32', got {id_format!r}"
        )
    limit = ID_LIMIT[id_format]
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
