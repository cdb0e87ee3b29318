"""``triton`` backend of the on-policy row math (kernels in ``fastkd.kernels.onpolicy``).

Registers op ``"onpolicy_rows"`` on backend ``"triton"``: the per-chunk row math of
:class:`fastkd.onpolicy.op.IdsLossChunk` and :func:`fastkd.onpolicy.op.logprobs_from_hidden` (without extras)
as two row-per-program launches on the chunk's logits workspace, in its own dtype:

* :func:`row_logprobs` — (shift, log-sum, log-probs at the ids) from one read of the logits;
* :func:`row_grad_` — the logits gradient from g = ∂loss/∂logq, written over the logits (one more read, one
  write), no fp32 (c, V) temporary.

The torch backend (``fastkd.onpolicy.op``) keeps the entropy / top-k extras, float64 heads and the
vocabulary-parallel row ops (their reductions are collectives). Imports cleanly without Triton (the backend is
then registered with the import error as its reason). Default launch: ``BLOCK_V=4096``, ``num_warps=8``;
:data:`CONFIG` can be changed (tests use small blocks so that several vocabulary tiles are exercised).
"""

from __future__ import annotations

import torch

from fastkd.core.registry import import_kernels, register

(triton, K_), _IMPORT_ERROR = import_kernels("triton", "fastkd.kernels.onpolicy")

CONFIG: dict[str, int] = {"block_v": 4096, "num_warps": 8}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _launch(v: int) -> tuple[int, int]:
    block_v = min(CONFIG["block_v"], triton.next_power_of_2(max(v, 16)))
    return block_v, max(1, min(CONFIG["num_warps"], block_v // 128))  # ≥ 4 logits per thread


def row_logprobs(z: torch.Tensor, ids: torch.Tensor, temperature: float) -> tuple[torch.Tensor, ...]:
    """For logits z (c, V) and ids (c, K) int64: (shift m (c,), log Σ e^{z/T − m} (c,), log-probs at the ids
    (c, K)), all fp32; the log-prob of an id outside [0, V) is NaN (it is never read)."""
    c, v = z.shape
    k = ids.shape[1]
    if z.stride(1) != 1:
        z = z.contiguous()
    ids = ids.contiguous()
    dev = z.device
    shift = torch.empty(c, dtype=torch.float32, device=dev)
    ld = torch.empty(c, dtype=torch.float32, device=dev)
    lq = torch.empty(c, k, dtype=torch.float32, device=dev)
    if c == 0:
        return shift, ld, lq
    block_v, warps = _launch(v)
    K_._rows_lse_kernel[(c,)](z, ids, shift, ld, lq, v, k, z.stride(0), ids.stride(0), 1.0 / temperature,
                              BLOCK_V=block_v, BLOCK_K=triton.next_power_of_2(max(k, 2)), num_warps=warps)
    return shift, ld, lq


def row_grad_(z: torch.Tensor, ids: torch.Tensor, g: torch.Tensor, shift: torch.Tensor, ld: torch.Tensor,
              temperature: float) -> torch.Tensor:
    """Overwrite z (c, V) with ∂/∂z of Σ_k g[:, k]·logprob[:, k] (logprob = log_softmax(z / T) at ids (c, K), every
    id in [0, V); g (c, K) fp32, 0 at slots that get no gradient; shift, ld from :func:`row_logprobs`); returns z.
    Repeated ids add up."""
    c, v = z.shape
    k = ids.shape[1]
    if c == 0:
        return z
    if z.stride(1) != 1:
        raise ValueError("row_grad_ writes the gradient over z in place: z needs unit column stride")
    g = g.to(torch.float32)
    if k == 1:
        srt, gs = ids.contiguous(), g.contiguous()
    else:  # ascending ids: each tile compares only the ids that fall inside it (kernels/onpolicy.py)
        srt, perm = ids.sort(dim=1)
        gs = g.gather(1, perm)
    gsum = g.sum(-1)
    block_v, warps = _launch(v)
    K_._rows_grad_kernel[(c,)](z, z, srt, gs, gsum, shift, ld, v, k, z.stride(0), z.stride(0), 1.0 / temperature,
                               BLOCK_V=block_v, BLOCK_K=triton.next_power_of_2(max(k, 2)), num_warps=warps)
    return z


def _limits(dtype: torch.dtype | None = None, vocab_parallel: bool = False, **_) -> list[str]:
    reasons = []
    if dtype is not None and dtype not in DTYPES:
        reasons.append(f"the head's compute dtype {str(dtype).removeprefix('torch.')} is not supported by the triton "
                       "backend of 'onpolicy_rows' (float32, bfloat16, float16; backend='torch' takes any)")
    if vocab_parallel:
        reasons.append("a vocabulary-parallel head's row reductions are collectives (torch row math)")
    return reasons


IMPL = register("onpolicy_rows", "triton", row_logprobs, _limits, requires="triton", tensors=("z",),
                import_error=_IMPORT_ERROR)
