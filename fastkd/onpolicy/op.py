"""``fastkd.logprobs_from_hidden``: student log-probs at given ids from hidden states, never an (N, V) tensor.

With ``u = softcap(h W.T + b) / T`` (the chunk's logits, fp32; fp64 for fp64 heads) and ``lse = logsumexp(u)``:

    logprobs[n, k]  = u[n, ids[n, k]] − lse[n]
    entropy[n]      = lse[n] − Σ_v p[n, v] u[n, v],          p = exp(u − lse)
    topk[n]         = the k largest u[n] − lse[n] and their ids

Backward (the upstream gradients g (N, K) of the log-probs and g_H (N,) of the entropy are only known there, so the
chunks are run again: one more logits GEMM) writes, per chunk,

    ∂/∂u[v] = Σ_k g[k]·[v = ids[k]] − p[v]·Σ_k g[k] − g_H·p[v]·(log p[v] + H)

into the engine's logits workspace and lets :class:`~fastkd.core.lmhead.LMHeadChunker` accumulate the hidden,
weight and bias gradients (divided by T, through the softcap). Peak extra memory: the engine's (chunk, V) workspace
plus two fp32 (chunk, V) temporaries (torch row math; none with the Triton row math), and O(N·K) outputs.

Row math backends (op ``"onpolicy_rows"`` of :mod:`fastkd.core.registry`, :func:`rows_backend`): ``torch`` (any
device and dtype, the extras, vocabulary-parallel heads) and ``triton`` (:mod:`fastkd.onpolicy.triton_impl`: two
row kernels on the workspace in its own dtype, the log-sum-exp kept split as (max, log-sum); "auto" takes it for
CUDA tensors). With it a chunk holds more rows under the same memory budget (:func:`chunk_rows`).

:class:`RowOps` holds the three row reductions (log-sum-exp, gather at global ids, sum over the vocabulary) and the
top-k; :mod:`fastkd.onpolicy.vocab_parallel` overrides them with collectives over a vocabulary-sharded head, so the
same chunk functions serve both. :class:`IdsLossChunk` is the per-chunk consumer of
:class:`~fastkd.core.lmhead.FusedHeadFunction` for any per-token loss that is a function of the student's log-probs
at given ids (the on-policy estimators, the framework top-k semantics): its gradient reaches the logits through the
same row formula, computed in forward for scalar reductions (three GEMMs in all).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fastkd.core import checks as C
from fastkd.core.lmhead import HeadOptions, LMHeadChunker, amp_dtype, auto_chunk_rows, run_chunks
from fastkd.core.registry import declare, register, requested_backend, select


class LogProbs(NamedTuple):
    """What :func:`logprobs_from_hidden` returns when extras are requested (None where not requested)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    topk_logprobs: torch.Tensor | None
    topk_ids: torch.Tensor | None


class RowOps:
    """Row reductions of one process's full-vocabulary chunk logits ``u`` (c, V)."""

    vocab_start = 0

    def lse(self, u: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(u, dim=-1)

    def gather(self, u: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """u at global ids (c, K) (every id in range)."""
        return u.gather(1, ids)

    def vsum(self, x: torch.Tensor) -> torch.Tensor:
        """A per-row partial sum over this process's vocabulary columns (c,) → the full sum."""
        return x

    def topk(self, u: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        top = u.topk(k, dim=-1)
        return top.values, top.indices

    def scatter_(self, g: torch.Tensor, ids: torch.Tensor, src: torch.Tensor) -> None:
        """g[row, ids[row, k]] += src[row, k] for the ids in this process's columns."""
        g.scatter_add_(1, ids, src)

    def finish(self, student: LMHeadChunker) -> None:
        """After the last backward chunk (all-reduce of the hidden gradient when the vocabulary is sharded)."""


LOCAL = RowOps()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def scaled_logits(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """``z / T`` in the compute dtype; in place when ``z`` already has it (z is the engine's workspace)."""
    u = z if z.dtype == compute_dtype(z.dtype) else z.to(compute_dtype(z.dtype))
    return u.div_(temperature) if temperature != 1.0 else u


def entropy_rows(u: torch.Tensor, lse: torch.Tensor, ops: RowOps) -> torch.Tensor:
    """H = lse − Σ p·u per row (an entry with p = 0 adds 0, also where u = −inf)."""
    p = (u - lse[:, None]).exp_()
    return lse - ops.vsum(torch.where(p == 0, 0.0, p * u).sum(-1))


def grad_rows_(u: torch.Tensor, lse: torch.Tensor, ids: torch.Tensor, g: torch.Tensor, ops: RowOps,
               ent: torch.Tensor | None = None, g_ent: torch.Tensor | None = None) -> torch.Tensor:
    """Overwrite ``u`` (c, V) with ∂/∂u of Σ_k g[:, k]·logprob[:, k] (+ g_ent·entropy); returns it.

    ``ids`` (c, K) global ids in range, ``g`` (c, K) (0 at slots that must get no gradient), ``ent``/``g_ent`` (c,).
    """
    logp = u.sub_(lse[:, None])
    s = g.sum(-1, keepdim=True)
    if g_ent is not None:
        p = logp.exp()
        # −g_H·p·(log p + H); p = 0 (u = −inf) contributes 0 rather than 0·(−inf)
        logp.add_(ent[:, None]).mul_(p).mul_(-g_ent[:, None])
        logp.masked_fill_(p == 0, 0.0)
        logp.addcmul_(p, s, value=-1.0)
    else:  # −p·Σg in place: no second (c, V) temporary, one pass fewer
        logp.exp_().mul_(-s)
    ops.scatter_(logp, ids, g.to(logp.dtype))
    return logp


def write_grad_(z: torch.Tensor, grad_u: torch.Tensor, temperature: float) -> None:
    """The gradient of the chunk's (capped) logits ``z`` from the gradient of u = z / T, in z's own dtype."""
    if temperature != 1.0:
        grad_u.div_(temperature)
    if grad_u.dtype != z.dtype:  # else grad_u is z itself (scaled_logits works in place when dtypes agree)
        z.copy_(grad_u)


def safe_ids(ids: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids with every invalid entry replaced by 0, valid mask): nothing ever reads outside a row."""
    valid = (ids >= 0) & (ids < vocab)
    return torch.where(valid, ids, 0), valid


# ---- the row math's backends (op "onpolicy_rows") ---------------------------------------------------------------
def torch_row_logprobs(z: torch.Tensor, ids: torch.Tensor, temperature: float) -> tuple[torch.Tensor, ...]:
    """The ``onpolicy_rows`` contract in torch (:func:`fastkd.onpolicy.triton_impl.row_logprobs`): for u = z / T in
    the compute dtype, (shift m = max u (0 for an all −inf row), log Σ e^{u − m}, (u at ids − m) − log Σ)."""
    u = z.to(compute_dtype(z.dtype)) / temperature
    m = u.amax(-1)
    shift = torch.where(m == -math.inf, 0.0, m)
    ld = (u - shift[:, None]).exp().sum(-1).log()
    return shift, ld, (u.gather(1, ids) - shift[:, None]) - ld[:, None]


register("onpolicy_rows", "torch", torch_row_logprobs)  # runs any input: no capabilities to declare
declare("onpolicy_rows", ["fastkd.onpolicy.triton_impl"], ("triton", "torch"))


def rows_backend(backend: str, hidden: torch.Tensor, dtype: torch.dtype, ops: RowOps) -> str:
    """The backend of one call's row math, "triton" or "torch" (the registry's choice for op ``onpolicy_rows``:
    "auto" takes Triton for CUDA tensors of a float32/bfloat16/float16 head; "triton" also runs CPU tensors under
    ``TRITON_INTERPRET=1``). ``dtype``: the head's logits dtype. Under torch.compile "auto" takes torch (inductor
    fuses that row math; the Triton launches are eager code), as do vocabulary-parallel row ops (collectives)."""
    if backend == "auto" and torch.compiler.is_compiling():
        return "torch"
    return select("onpolicy_rows", backend, z=hidden, dtype=dtype, vocab_parallel=type(ops) is not RowOps).backend


def _triton_rows():
    from fastkd.onpolicy import triton_impl

    return triton_impl


@dataclass(frozen=True)
class LogprobsParams:
    temperature: float
    softcap: float | None
    rows: int
    entropy: bool
    topk: int
    vocab: int
    ops: RowOps
    dtype: torch.dtype | None = None  # the head's compute dtype under autocast (None: the weight's own)
    backend: str = "torch"  # of the row math: "triton" only without entropy / top-k (those stay torch)

    @property
    def head(self) -> float | HeadOptions | None:
        return self.softcap if self.dtype is None else HeadOptions(softcap=self.softcap, dtype=self.dtype)


class _ForwardChunk:
    def __init__(self, p: LogprobsParams, out: tuple[torch.Tensor, ...]):
        self.p, self.out = p, out

    def __call__(self, sl, z, grad, w, aux):
        ids, valid = aux
        p, (lq, ent, topv, topi, shift) = self.p, self.out
        if p.backend == "triton":  # no extras: (shift, log Σ) kept split for the backward pass, log Σ returned
            shift[sl], ld, lq_k = _triton_rows().row_logprobs(z, ids[sl], p.temperature)
            lq[sl] = torch.where(valid[sl], lq_k, math.nan)
            return ld
        u = scaled_logits(z, p.temperature)
        lse = p.ops.lse(u)
        lq[sl] = torch.where(valid[sl], p.ops.gather(u, ids[sl]) - lse[:, None], math.nan)
        if p.entropy:
            ent[sl] = entropy_rows(u, lse, p.ops)
        if p.topk:
            v, i = p.ops.topk(u, p.topk)
            topv[sl], topi[sl] = v - lse[:, None], i
        return lse


class _BackwardChunk:
    def __init__(self, p: LogprobsParams, lse, ent, g, g_ent, shift):
        self.p, self.lse, self.ent, self.g, self.g_ent, self.shift = p, lse, ent, g, g_ent, shift

    def __call__(self, sl, z, grad, w, aux):
        ids, valid = aux
        p = self.p
        g = torch.where(valid[sl], self.g[sl], 0.0)
        if p.backend == "triton":  # self.lse holds log Σ e^{u − shift}
            _triton_rows().row_grad_(grad, ids[sl], g, self.shift[sl], self.lse[sl], p.temperature)
            return self.lse[sl]
        u = scaled_logits(z, p.temperature)
        g_ent = None if self.g_ent is None else self.g_ent[sl]
        gu = grad_rows_(u, self.lse[sl], ids[sl], g, p.ops, None if g_ent is None else self.ent[sl], g_ent)
        write_grad_(grad, gu, p.temperature)
        return self.lse[sl]

    def finish(self, student: LMHeadChunker) -> None:
        self.p.ops.finish(student)


class LogprobsFunction(torch.autograd.Function):
    """apply(hidden (N, H), weight (V_r, H), bias | None, ids (N, K) safe, valid (N, K), params) →
    (logprobs (N, K), entropy (N,) | (0,), topk values (N, k), topk ids (N, k)); the last two have no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, valid, p: LogprobsParams):
        n, k = ids.shape
        dev, cdt = hidden.device, compute_dtype(hidden.dtype)
        lq = torch.empty(n, k, dtype=cdt, device=dev)
        ent = torch.empty(n if p.entropy else 0, dtype=cdt, device=dev)
        topv = torch.empty(n, p.topk, dtype=cdt, device=dev)
        topi = torch.empty(n, p.topk, dtype=torch.int64, device=dev)
        shift = torch.empty(n if p.backend == "triton" else 0, dtype=torch.float32, device=dev)
        head = LMHeadChunker(hidden, weight, bias, p.head, p.rows)
        lse = run_chunks(head, _ForwardChunk(p, (lq, ent, topv, topi, shift)), (ids, valid), valid[:, 0], p.rows,
                         False)
        ctx.p = p
        ctx.save_for_backward(hidden, weight, bias, ids, valid, lse, ent, shift)
        ctx.mark_non_differentiable(topv, topi)
        return lq, ent, topv, topi

    @staticmethod
    def backward(ctx, g, g_ent, _gv, _gi):
        hidden, weight, bias, ids, valid, lse, ent, shift = ctx.saved_tensors
        p = ctx.p
        needs = ctx.needs_input_grad[:3]
        head = LMHeadChunker(hidden, weight, bias, p.head, p.rows)
        head.alloc_grads(*needs)
        cdt = lse.dtype
        g = torch.zeros_like(ids, dtype=cdt) if g is None else g.to(cdt)
        g_ent = None if g_ent is None or not p.entropy else g_ent.to(cdt)
        run_chunks(head, _BackwardChunk(p, lse, ent, g, g_ent, shift), (ids, valid), valid[:, 0], p.rows, True)
        return (*head.finished_grads(), None, None, None)


# ---- argument checks (shared with the other on-policy modules) --------------------------------------------------
def check_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.dtype | None:
    """Checks the head; returns the autocast compute dtype when autocast is on for it (then dtypes may differ)."""
    C.check_float_tensor("hidden", hidden)
    C.check_float_tensor("weight", weight, min_dim=2)
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, H) like nn.Linear.weight, got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden has hidden size {hidden.shape[-1]} but weight expects {weight.shape[1]} "
                         f"(weight shape {tuple(weight.shape)})")
    amp = amp_dtype(hidden, weight, bias)
    if weight.dtype != hidden.dtype and amp is None:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if bias is not None:
        C.check_float_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype and amp is None:
            raise TypeError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
    C.check_same_device(hidden=hidden, weight=weight, bias=bias)
    return amp


def check_ids(name: str, ids: object, lead: tuple[int, ...], vocab: int, device: torch.device,
              allow_k: bool = True) -> tuple[torch.Tensor, bool]:
    """ids of shape ``lead`` (one per token) or ``lead + (K,)`` → (ids (N, K) int64, had a K dimension)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
    if tuple(ids.shape) == lead:
        per_token = False
    elif allow_k and ids.dim() == len(lead) + 1 and tuple(ids.shape[:-1]) == lead and ids.shape[-1] >= 1:
        per_token = True
    else:
        want = f"{lead}" + (f" or {(*lead, 'K')}" if allow_k else "")
        raise ValueError(f"{name} must have shape {want} (hidden's leading dimensions), got {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but hidden is on {device}")
    flat = ids.reshape(math.prod(lead), -1).long()
    if C.value_checks_enabled(ids) and flat.numel():
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"{name} must be in [0, {vocab}) (the vocabulary); got values in [{lo}, {hi}]")
    return flat, per_token


def check_common(temperature: float, softcap: float | None, chunk_size: int | None) -> None:
    C.check_positive("temperature", temperature)
    if softcap is not None:
        C.check_positive("softcap", softcap)
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def chunk_rows(chunk_size: int | None, n: int, vocab_local: int, device: torch.device, backend: str = "torch",
               dtype: torch.dtype | None = None, softcap: float | None = None, on_cuda: bool = False) -> int:
    """Rows per chunk: ``chunk_size``, else the engine's budget (:func:`~fastkd.core.lmhead.auto_chunk_rows`).

    torch row math: the engine's (rows, V) workspace + two compute-dtype (rows, V) temporaries. Triton row math
    (``backend="triton"``) has no (rows, V) temporary: the workspace in the head's logits ``dtype``, the cap
    derivative's buffer of the same size with a ``softcap``, and off CUDA (``on_cuda`` False) the engine's fp32
    staging of a low-precision gradient — the same budget holds more rows (the grad-weight GEMM, K = rows, then
    stays compute-bound)."""
    if chunk_size:
        return chunk_size
    if backend != "triton":
        return auto_chunk_rows(max(n, 1), 2 * vocab_local, device)
    elem = torch.empty((), dtype=dtype).element_size()
    per_logit = elem * (2 if softcap is not None else 1) + (4 if elem < 4 and not on_cuda else 0)
    return auto_chunk_rows(max(n, 1), vocab_local, device, bytes_per_col=per_logit)


def logprobs_impl(hidden, weight, ids, *, bias, temperature, softcap, return_entropy, return_topk, chunk_size,
                  ops: RowOps, vocab: int, rows: int | None = None, amp: torch.dtype | None = None,
                  backend: str = "auto"):
    """Checks done by the caller except ids; shared by the single-process and vocabulary-parallel entry points."""
    lead = tuple(hidden.shape[:-1])
    flat, per_token = check_ids("ids", ids, lead, vocab, hidden.device)
    if not isinstance(return_topk, int) or isinstance(return_topk, bool) or not 0 <= return_topk <= vocab:
        raise ValueError(f"return_topk must be an int in [0, {vocab}] (the vocabulary size), got {return_topk!r}")
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    n = flat.shape[0]
    h = hidden.reshape(n, hidden.shape[-1])
    sid, valid = safe_ids(flat, vocab)
    zdt = amp or weight.dtype
    if return_entropy or return_topk:  # the extras keep the torch row math (the backend's name is still checked)
        requested_backend(backend)
        rb = "torch"
    else:
        rb = rows_backend(backend, hidden, zdt, ops)
    rows = rows or chunk_rows(chunk_size, n, weight.shape[0], hidden.device, rb, zdt, softcap, hidden.is_cuda)
    p = LogprobsParams(float(temperature), None if softcap is None else float(softcap), rows, return_entropy,
                       return_topk, vocab, ops, amp, rb)
    lq, ent, topv, topi = LogprobsFunction.apply(h, weight, bias, sid, valid, p)
    lq = lq.view(*lead, -1) if per_token else lq.view(lead)
    if not return_entropy and not return_topk:
        return lq
    return LogProbs(lq, ent.view(lead) if return_entropy else None,
                    topv.view(*lead, return_topk) if return_topk else None,
                    topi.view(*lead, return_topk) if return_topk else None)


def logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
    return_topk: int = 0,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor | LogProbs:
    """``log_softmax(softcap(hidden @ weight.T + bias) / T)`` at ``ids``, chunk by chunk (never an (N, V) tensor).

    Args:
        hidden: (..., H) float32/bfloat16/float16/float64; weight: (V, H) as ``nn.Linear.weight``; bias: (V,) or
            None. All three get gradients through the log-probs and the entropy.
        ids: (...,) — one id per token (e.g. the sampled token) — or (..., K) (e.g. a teacher's top-k ids);
            integers in [0, V). Checked where value checks run (CPU, ``FASTKD_CHECK_INPUTS=1``); elsewhere an id
            outside [0, V) gives a NaN log-prob and no gradient, never a read outside the row.
        temperature: T > 0; softcap: Gemma-style ``cap·tanh(z/cap)`` before the temperature.
        return_entropy: also the entropy of softmax(u) per token (differentiable).
        return_topk: also the student's own k most likely ids and their log-probs (no gradient), k ≤ V.
        chunk_size: tokens per chunk (default: the LM-head engine's memory budget).
        backend: the row math's: "auto" (Triton for CUDA tensors of a float32/bfloat16/float16 head, else torch;
            ``FASTKD_BACKEND`` when "auto"), "torch" or "triton". With ``return_entropy`` / ``return_topk`` the row
            math is torch's.

    Returns:
        the log-probs, shaped like ``ids``, fp32 (fp64 for fp64 heads) — or, when ``return_entropy`` or
        ``return_topk`` is set, :class:`LogProbs` ``(logprobs, entropy (...,) | None, topk_logprobs (..., k) |
        None, topk_ids (..., k) int64 | None)``. A NaN in a token's hidden state gives NaN outputs for that token.
    """
    amp = check_head(hidden, weight, bias)
    check_common(temperature, softcap, chunk_size)
    return logprobs_impl(hidden, weight, ids, bias=bias, temperature=temperature, softcap=softcap,
                         return_entropy=return_entropy, return_topk=return_topk, chunk_size=chunk_size,
                         ops=LOCAL, vocab=weight.shape[0], amp=amp, backend=backend)


# ---- a per-token loss of the log-probs at given ids, through FusedHeadFunction ----------------------------------
IdsLossFn = Callable[..., "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


class IdsLossChunk:
    """Per-chunk consumer of :class:`~fastkd.core.lmhead.FusedHeadFunction` for ``loss_n = fn(logq_n, *rows_n)``.

    aux = (ids (N, K) safe, valid (N, K), *extra) — ``extra`` are (N, ...) tensors sliced per chunk and passed to
    ``fn`` after ``logq`` (c, K) (−inf at invalid slots). ``fn`` returns ``(loss (c,), outputs {name: (c,)})``; it
    runs under autograd on the (c, K) log-probs only, and its gradient reaches the logits through
    :func:`grad_rows_`; with ``closed_form=True`` ``fn`` returns ``(loss, outputs, ∂loss/∂logq (c, K))`` itself
    and no autograd runs inside the chunk (torch.compile traces it whole). ``outputs``, when :attr:`out` holds (N,)
    buffers of those names, are stored there (the forward pass; set :attr:`out` to None afterwards so a
    ``reduction="none"`` backward re-run skips them).
    """

    def __init__(self, fn: IdsLossFn, temperature: float, ops: RowOps | None = None,
                 out: dict[str, torch.Tensor] | None = None, closed_form: bool = False, backend: str = "torch"):
        # (a default of None, not LOCAL: torch.compile cannot wrap an instance default argument)
        self.fn, self.temperature, self.ops, self.out = fn, temperature, LOCAL if ops is None else ops, out
        self.closed_form = closed_form
        self.row_math = _triton_rows() if backend == "triton" else None  # the row math's backend (rows_backend)

    def __call__(self, sl, z, grad, w, aux):
        ids, valid, *extra = aux
        vs, sid = valid[sl], ids[sl]
        if self.row_math is not None:  # Triton: z stays in its dtype, read here and again by row_grad_
            shift, ld, lq = self.row_math.row_logprobs(z, sid, self.temperature)
        else:
            u = scaled_logits(z, self.temperature)
            lse = self.ops.lse(u)
            lq = self.ops.gather(u, sid) - lse[:, None]
        lq = torch.where(vs, lq, -math.inf)
        rows = [e[sl] for e in extra]
        if grad is None:
            loss, outs = self.fn(lq, *rows)[:2]
        else:
            if self.closed_form:  # fn also returns d loss / d lq: no autograd inside the chunk (traceable)
                loss, outs, g = self.fn(lq, *rows)
                g = torch.where(vs, g * w.to(g.dtype)[:, None], 0.0)
            else:
                with torch.enable_grad():
                    leaf = lq.detach().requires_grad_(True)
                    loss, outs = self.fn(leaf, *rows)
                    (g,) = torch.autograd.grad((loss * w.to(loss.dtype)).sum(), leaf)
                g = torch.where(vs, g, 0.0)
            if self.row_math is not None:
                self.row_math.row_grad_(grad, sid, g, shift, ld, self.temperature)
            else:
                write_grad_(grad, grad_rows_(u, lse, sid, g, self.ops), self.temperature)
        if self.out is not None:
            for name, buf in self.out.items():
                buf[sl] = outs[name].detach()
        return loss.detach()

    def finish(self, student: LMHeadChunker) -> None:
        self.ops.finish(student)
