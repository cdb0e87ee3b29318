"""The LM-head engine: chunked ``hidden @ weight.T`` with a per-chunk loss, shared by every fused path.

Users: ``fastkd.distill.fused`` (dense), ``fastkd.sparse.op`` (sparse), ``fastkd.distill.vocab_parallel``
(vocabulary-parallel) and the teacher-cache extraction in ``fastkd.cache``. The engine owns, in one place:

* **Chunk size** — :func:`auto_chunk_rows`: rows whose working set fits a stated memory budget
  (``FASTKD_CHUNK_MB`` MiB; default 128 MiB on CPU, min(1 GiB, free/4) on a GPU), a multiple of 128 rows
  when N allows (whole tensor-core / cache tiles), never fewer than 8.
* **Softcap** — :func:`softcap_` applies ``cap·tanh(z/cap)`` in place and can store its derivative
  ``1 − tanh²(z/cap)`` for the backward; nothing else in fastkd caps logits.
* **Head options** — :class:`HeadOptions` (a head's ``softcap``, its ``logit_scale`` s and its compute dtype
  under autocast) may stand wherever a bare softcap is accepted: logits = cap·tanh(s·(h W.T + b)/cap), the
  scale first (TRL's order). With a compute dtype (AMP) the head runs its GEMMs in that dtype on a copy of
  the weight made once per call, and the weight / bias gradients accumulate in fp32 into gradients of the
  parameter's own dtype (no rounding to the compute dtype). Defaults leave every path bitwise unchanged.
* **Chunk logits** — :meth:`LMHeadChunker.logits` writes ``h_c @ W.T (+ b)`` (then the cap) into one
  ``(rows, V)`` workspace allocated on the first chunk of a call and reused by every later chunk
  (``torch.mm(..., out=)`` / ``torch.addmm(b, ..., out=)``). A teacher head given as hidden states goes
  through a second chunker with its own workspace.
* **Backward accumulation** — the loss writes the gradient of the capped chunk logits *into the logits
  workspace*; :meth:`LMHeadChunker.backward` multiplies in the cap derivative in place and accumulates

      grad_hidden[c] = g @ W            (torch.mm(..., out=grad_hidden[c]))
      grad_weight   += g.T @ h_c        (addmm_ into an fp32 accumulator for bf16/fp16 weights; the first
                                         chunk writes it with mm: the accumulator is never zero-filled)
      grad_bias     += g.T @ 1          (addmv_)

  For bf16/fp16 weights on CUDA the accumulation is ``torch.addmm(acc, g.T, h_c, out_dtype=fp32, out=acc)``;
  where that overload is missing (CPU, older PyTorch) only the chunk's (c, V) / (c, H) operands are
  copied into preallocated fp32 staging buffers. No (V, H) temporary is ever made per chunk.

Steady-state memory beyond the gradients: one (rows, V) logits buffer per head (+ one for the cap
derivative with a softcap, + the fp32 staging buffers for low-precision weights off CUDA) plus whatever
the loss backend needs for one chunk — all O(rows · V), independent of N; the buffers are dropped when
the call's chunk loop ends.

:class:`FusedHeadFunction` is the autograd wrapper: for scalar reductions everything happens in forward and
backward scales the stored gradients by ``grad_output``; for ``reduction="none"`` the per-token
``grad_output`` is only known in backward, so forward computes the losses alone and backward re-runs the
chunks with ``weight · grad_output``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from fastkd.core import checks as C
from fastkd.core.autograd import scale_grad

CHUNK_MB_ENV = "FASTKD_CHUNK_MB"
ROW_MULTIPLE = 128  # chunk rows are a multiple of this when the budget and N allow
_MIN_ROWS = 8
_CPU_BUDGET_MB = 128.0  # 256-row chunks at V = Vt = 32000: the K = rows grad_weight GEMM stays efficient
_GPU_BUDGET_MB = 1024.0
# Bytes per logit column of one chunk row: the engine's fp32-sized logits buffer + about as much again of
# loss-backend temporaries (the torch backend's chunk math). KERNEL_BYTES_PER_COL: the buffer alone, for a
# chunk whose loss runs in Triton / CUDA row kernels on a GPU (no (rows, V) temporaries): twice the rows in the
# same budget, so the K = rows grad-weight GEMM accumulating into its fp32 (V, H) buffer stays compute-bound.
BYTES_PER_COL = 8
KERNEL_BYTES_PER_COL = 4

_LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class HeadOptions:
    """What one LM head does to its logits: ``cap·tanh(scale·(h W.T + b)/cap)`` (scale, then softcap).

    ``dtype``: the compute dtype (autocast's, :func:`amp_dtype`), or None for the weight's own dtype.
    """

    softcap: float | None = None
    scale: float = 1.0
    dtype: torch.dtype | None = None


def head_options(head: float | HeadOptions | None) -> HeadOptions:
    """A bare softcap (float | None) or :class:`HeadOptions` as :class:`HeadOptions`."""
    return head if isinstance(head, HeadOptions) else HeadOptions(softcap=head)


def amp_dtype(*tensors: torch.Tensor | None) -> torch.dtype | None:
    """The autocast dtype for the tensors' device when autocast is on there (None otherwise, or for float64)."""
    first = next(t for t in tensors if t is not None)
    device = first.device.type
    if not torch.is_autocast_enabled(device) or any(t is not None and t.dtype == torch.float64 for t in tensors):
        return None
    return torch.get_autocast_dtype(device)


def chunk_budget_mb(device: torch.device, budget_mb: float | None = None) -> float:
    """The chunk working-set budget in MiB: ``budget_mb``, else ``FASTKD_CHUNK_MB``, else the device default."""
    if budget_mb is None:
        env = os.environ.get(CHUNK_MB_ENV, "").strip()
        if env:
            try:
                budget_mb = float(env)
            except ValueError:
                raise ValueError(f"{CHUNK_MB_ENV} must be a positive number of MiB, got {env!r}") from None
            if not math.isfinite(budget_mb) or budget_mb <= 0:
                raise ValueError(f"{CHUNK_MB_ENV} must be a positive number of MiB, got {env!r}")
    elif not isinstance(budget_mb, (int, float)) or not math.isfinite(budget_mb) or budget_mb <= 0:
        raise ValueError(f"budget_mb must be a positive number of MiB, got {budget_mb!r}")
    if budget_mb is not None:
        return float(budget_mb)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return min(_GPU_BUDGET_MB, free / 4 / 2**20)
    return _CPU_BUDGET_MB


def auto_chunk_rows(n: int, cols: int, device: torch.device, budget_mb: float | None = None,
                    bytes_per_col: float = BYTES_PER_COL) -> int:
    """Rows per chunk for ``n`` tokens whose chunk holds ``cols`` logit columns (student + teacher heads).

    rows = budget / (cols · ``bytes_per_col``) (default 8: the logits buffer plus as much again of loss
    temporaries; :func:`chunk_bytes_per_col`), rounded down to a multiple of 128 when that leaves at least 128
    rows (else to a multiple of 8, at least 8), and at most ``n``. The budget is ``budget_mb`` /
    ``FASTKD_CHUNK_MB`` / the device default (:func:`chunk_budget_mb`). Example: CPU, V = Vt = 32000 →
    128 MiB / 512 kB → 256 rows.
    """
    if n <= 0:
        return 1
    budget = chunk_budget_mb(device, budget_mb) * 2**20
    rows = int(budget // max(1, cols * bytes_per_col))
    rows = rows // ROW_MULTIPLE * ROW_MULTIPLE if rows >= ROW_MULTIPLE else max(_MIN_ROWS, rows // 8 * 8)
    return max(1, min(n, rows))


def chunk_bytes_per_col(device: torch.device, backend: str) -> int:
    """:data:`KERNEL_BYTES_PER_COL` off the CPU unless the torch backend is asked for (``backend``: the
    requested name; "auto" runs Triton / CUDA kernels on a GPU), else :data:`BYTES_PER_COL`."""
    return BYTES_PER_COL if device.type == "cpu" or backend == "torch" else KERNEL_BYTES_PER_COL


# Elements per fp32 (rows, V) temporary of a torch backend's chunk: 4M = 16 MiB (a handful are alive at once).
BACKEND_CHUNK_ELEMS = 1 << 22


def backend_chunk_rows(n_rows: int, vocab: int, elems: int = BACKEND_CHUNK_ELEMS) -> int:
    """Rows per chunk inside a torch backend (distill, sparse): :func:`auto_chunk_rows`' rule (multiples of
    128 rows) with a budget of ``elems`` fp32 elements per (rows, V) temporary."""
    return auto_chunk_rows(n_rows, vocab, torch.device("cpu"), budget_mb=elems * BYTES_PER_COL / 2**20)


def softcap_(z: torch.Tensor, cap: float | None, deriv: torch.Tensor | None = None) -> torch.Tensor:
    """``z ← cap·tanh(z/cap)`` in place (Gemma-style final-logit capping); returns ``z``.

    With ``deriv`` (same shape), also stores ``d cap·tanh(z/cap)/dz = 1 − tanh²(z/cap)`` there.
    """
    if cap is None:
        return z
    z.div_(cap).tanh_()
    if deriv is not None:
        torch.mul(z, z, out=deriv)
        deriv.neg_().add_(1.0)
    return z.mul_(cap)


def _addmm_fp32_inplace(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool = True) -> bool:
    """``acc += a @ b`` (``acc = a @ b`` when not ``accumulate``) for bf16/fp16 a, b into fp32 ``acc`` without a
    temporary; False if unsupported."""
    try:
        if accumulate:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):  # CPU, or PyTorch without addmm(out_dtype=)
        return False
    return True


class LMHeadChunker:
    """One LM head ``hidden (N, H) @ weight (V, H).T (+ bias (V,))``, evaluated chunk by chunk.

    :meth:`logits` returns a (c, V) view of a workspace reused by every chunk (valid until the next call);
    after :meth:`alloc_grads`, :meth:`backward` takes the gradient of a chunk's capped logits (normally
    written into that same view) and accumulates ``grad_hidden`` / ``grad_weight`` / ``grad_bias``.
    :meth:`release` drops the workspaces (the engine calls it when a chunk loop ends).
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 softcap: float | HeadOptions | None = None, rows: int | None = None):
        opts = head_options(softcap)
        self.hidden, self.weight, self.bias, self.softcap = hidden, weight, bias, opts.softcap
        self.scale = opts.scale
        self.rows = rows
        self.grad_hidden = self.grad_weight = self.grad_bias = None
        cdt = weight.dtype if opts.dtype is None else opts.dtype
        # The GEMM operands: the parameters themselves, or (AMP) one compute-dtype copy per call.
        self._w = weight if weight.dtype == cdt else weight.detach().to(cdt)
        self._b = bias if bias is None or bias.dtype == cdt else bias.detach().to(cdt)
        self._cdt = cdt
        self._acc32 = cdt in _LOW_PRECISION
        self._z: torch.Tensor | None = None  # (rows, V) logits / gradient workspace
        self._dcap: torch.Tensor | None = None  # (rows, V) softcap derivative (only when gradients are needed)
        self._g32: torch.Tensor | None = None  # fp32 staging of a low-precision chunk gradient (rows, V)
        self._h32: torch.Tensor | None = None  # fp32 staging of the chunk's hidden states (rows, H)
        self._ones: torch.Tensor | None = None
        self._native_fp32_acc = True  # addmm(out_dtype=) worked (or is still to be tried)
        self._gw_started = False  # a chunk has written grad_weight (the first one writes, the others add)

    def _buf(self, name: str, c: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        buf = getattr(self, name)
        if buf is None or buf.shape[0] < c:
            buf = torch.empty(max(c, self.rows or c), cols, dtype=dtype, device=self.weight.device)
            setattr(self, name, buf)
        return buf[:c]

    def _hidden(self, sl: slice) -> torch.Tensor:
        h = self.hidden[sl]
        return h if h.dtype == self._cdt else h.to(self._cdt)

    def logits(self, sl: slice) -> torch.Tensor:
        """The chunk's (scaled, capped) logits (c, V) in the compute dtype, in the reused workspace."""
        h = self._hidden(sl)
        c, v = h.shape[0], self.weight.shape[0]
        z = self._buf("_z", c, v, self._cdt)
        if self._b is None:
            torch.mm(h, self._w.t(), out=z)
        else:
            torch.addmm(self._b, h, self._w.t(), out=z)
        if self.scale != 1.0:
            z.mul_(self.scale)
        need_deriv = self.softcap is not None and (self.grad_hidden is not None or self.grad_weight is not None
                                                   or self.grad_bias is not None)
        return softcap_(z, self.softcap, self._buf("_dcap", c, v, z.dtype) if need_deriv else None)

    def alloc_grads(self, need_hidden: bool, need_weight: bool, need_bias: bool) -> None:
        h, w = self.hidden, self.weight
        self.grad_hidden = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_hidden else None
        wdt = torch.float32 if self._acc32 else w.dtype
        # Not zeroed: the first chunk's GEMM writes it (``mm`` into the accumulator instead of zeros + addmm,
        # which would cost one more write and read of the whole (V, H) accumulator); see _gw_started.
        self.grad_weight = torch.empty(w.shape, dtype=wdt, device=w.device) if need_weight else None
        self._gw_started = False
        self.grad_bias = (torch.zeros(w.shape[0], dtype=wdt, device=w.device)
                          if need_bias and self.bias is not None else None)

    def backward(self, sl: slice, grad_logits: torch.Tensor) -> None:
        """Accumulate one chunk's gradients from ``grad_logits`` (c, V), the gradient of the capped logits
        (modified in place by the cap derivative). Call after :meth:`logits` of the same ``sl``."""
        g = grad_logits
        if self.softcap is not None:  # d/dz cap·tanh(z/cap) = 1 − tanh², stored by logits()
            g.mul_(self._dcap[: g.shape[0]])
        if self.scale != 1.0:
            g.mul_(self.scale)
        h = self._hidden(sl)
        if self.grad_hidden is not None:
            if self.grad_hidden.dtype == self._cdt:
                torch.mm(g, self._w, out=self.grad_hidden[sl])
            else:  # AMP with hidden states in another dtype than the compute dtype
                self.grad_hidden[sl].copy_(torch.mm(g, self._w))
        if self.grad_weight is None and self.grad_bias is None:
            return
        g_acc, h_acc = g, h
        started = self._gw_started
        self._gw_started = True
        if self._acc32:  # fp32 accumulation: partial sums are never rounded to bf16/fp16
            if self.grad_weight is not None and self._native_fp32_acc and g.is_cuda:
                self._native_fp32_acc = _addmm_fp32_inplace(self.grad_weight, g.t(), h, accumulate=started)
                if self._native_fp32_acc:
                    if self.grad_bias is not None:
                        self.grad_bias.add_(g.sum(0, dtype=torch.float32))
                    return
            g_acc = self._buf("_g32", g.shape[0], g.shape[1], torch.float32).copy_(g)
            if self.grad_weight is not None:
                h_acc = self._buf("_h32", h.shape[0], h.shape[1], torch.float32).copy_(h)
        if self.grad_weight is not None:
            if started:
                self.grad_weight.addmm_(g_acc.t(), h_acc)
            else:
                torch.mm(g_acc.t(), h_acc, out=self.grad_weight)
        if self.grad_bias is not None:
            ones = self._ones
            if ones is None or ones.shape[0] < g.shape[0] or ones.dtype != g_acc.dtype:
                ones = self._ones = torch.ones(max(g.shape[0], self.rows or 0), dtype=g_acc.dtype,
                                               device=g.device)
            self.grad_bias.addmv_(g_acc.t(), ones[: g.shape[0]])

    def finished_grads(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        # No .to() when the accumulator already has the parameter's dtype: an aliasing no-op .to() of a
        # tensor created inside the Function trips torch.compile's higher-order-op capture.
        gw, gb = self.grad_weight, self.grad_bias
        if gw is not None and not self._gw_started:  # no chunk ran (N = 0): the accumulator was never written
            gw.zero_()
            self._gw_started = True
        if gw is not None and gw.dtype != self.weight.dtype:
            gw = gw.to(self.weight.dtype)
        if gb is not None and gb.dtype != self.bias.dtype:
            gb = gb.to(self.bias.dtype)
        return self.grad_hidden, gw, gb

    def release(self) -> None:
        """Drop the chunk workspaces (gradients are kept)."""
        self._z = self._dcap = self._g32 = self._h32 = self._ones = None


def iter_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, *,
                softcap: float | None = None, temperature: float = 1.0,
                dtype: torch.dtype | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(rows slice, logits)`` chunk by chunk, no gradients: ``softcap(h_c W.T + b) / temperature``.

    hidden (N, H), weight (V, H), bias (V,) | None; ``dtype`` (e.g. fp32 for bf16 heads) converts the head
    once per call, never per chunk. Each yielded (c, V) view lives in one reused workspace: it is valid
    (and may be modified in place) until the next chunk is requested. Used by the teacher-cache extraction.
    """
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    head = LMHeadChunker(hidden, weight, bias, softcap, rows)
    try:
        for start in range(0, hidden.shape[0], rows):
            sl = slice(start, min(hidden.shape[0], start + rows))
            z = head.logits(sl)
            yield sl, (z.div_(temperature) if temperature != 1.0 else z)
    finally:
        head.release()


ChunkLoss = Callable[[slice, torch.Tensor, "torch.Tensor | None", torch.Tensor, tuple], torch.Tensor]


def run_chunks(student: LMHeadChunker, chunk_loss: ChunkLoss, aux: tuple, weight: torch.Tensor, rows: int,
               need_grad: bool) -> torch.Tensor:
    """Loss (N,) over row chunks; with ``need_grad`` the student's gradients are accumulated as well.

    ``chunk_loss(sl, logits, grad, weight[sl], aux)`` returns the chunk's per-token loss and, when ``grad`` is
    given, writes the weighted gradient of the chunk's (capped) student logits into it; ``grad`` *is* the
    logits view (in place), so the loss must read a logit before overwriting it (every backend does).
    Optional hooks of ``chunk_loss``: ``finish(student)`` after the last chunk when gradients were
    accumulated (e.g. an all-reduce of ``grad_hidden``), ``release()`` when the loop ends (drop the loss's
    own workspaces, e.g. a teacher head's logits buffer).
    """
    n = weight.numel()
    loss = torch.empty(n, dtype=torch.float64 if student.hidden.dtype == torch.float64 else torch.float32,
                       device=weight.device)
    student.rows = rows
    # Autocast off: the heads cast to their compute dtype themselves (HeadOptions.dtype), and their GEMMs write
    # into preallocated workspaces, which autocast refuses.
    try:
        with torch.autocast(weight.device.type, enabled=False):
            for start in range(0, n, rows):
                sl = slice(start, min(n, start + rows))
                z = student.logits(sl)
                loss[sl] = chunk_loss(sl, z, z if need_grad else None, weight[sl], aux)
                if need_grad:
                    student.backward(sl, z)
            finish = getattr(chunk_loss, "finish", None)
            if need_grad and finish is not None:
                finish(student)
    finally:
        student.release()
        release = getattr(chunk_loss, "release", None)
        if release is not None:
            release()
    return loss


class FusedHeadFunction(torch.autograd.Function):
    """Chunked LM head + a per-chunk loss on its logits: the engine of every fused loss (dense, sparse).

    apply(hidden (N, H), weight (V, H), bias (V,) | None, tok_weight (N,), chunk_loss, rows, reduction,
    softcap, *aux): ``aux`` holds the loss's own tensors (teacher side, labels, ids, ...) that
    ``chunk_loss`` slices. Scalar reductions get all gradients in forward (scaled in backward); for
    ``reduction="none"`` forward computes losses only and backward re-runs the chunks with
    ``tok_weight · grad_output``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, tok_weight, chunk_loss, rows, reduction, softcap, *aux):
        student = LMHeadChunker(hidden, weight, bias, softcap, rows)
        needs = ctx.needs_input_grad[:3]
        ctx.per_row = reduction == "none"
        ctx.used = False
        ctx.n_aux = len(aux)
        compute = any(needs) and not ctx.per_row
        if compute:
            student.alloc_grads(*needs)
        loss = run_chunks(student, chunk_loss, aux, tok_weight, rows, compute)
        if ctx.per_row and any(needs):
            ctx.save_for_backward(hidden, weight, bias, tok_weight, *aux)
            ctx.args = (chunk_loss, rows, softcap)
        elif compute:
            ctx.save_for_backward(*student.finished_grads())
        return C.reduce_tokens(loss, tok_weight, reduction, (tok_weight.numel(),))

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.used:
            raise RuntimeError("fastkd: backward ran twice through a fused loss after its CUDA gradients were "
                               "scaled in place; recompute the loss instead of using retain_graph=True")
        nones = (None,) * (5 + ctx.n_aux)
        if ctx.per_row:
            hidden, weight, bias, tok_weight, *aux = ctx.saved_tensors
            chunk_loss, rows, softcap = ctx.args
            student = LMHeadChunker(hidden, weight, bias, softcap, rows)
            student.alloc_grads(*ctx.needs_input_grad[:3])
            w = tok_weight * grad_output.reshape(-1).to(tok_weight.dtype)
            run_chunks(student, chunk_loss, tuple(aux), w, rows, True)
            return (*student.finished_grads(), *nones)
        scaled = [None if g is None else scale_grad(g, grad_output, False) for g in ctx.saved_tensors]
        ctx.used = any(s is not None and s[1] for s in scaled)
        return (*(None if s is None else s[0] for s in scaled), *nones)


def check_linear(prefix: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 amp: bool = False) -> None:
    """Shapes, devices and (unless ``amp``: autocast casts them to one compute dtype) equal dtypes of a head."""
    C.check_float_tensor(f"{prefix}_hidden", hidden)
    C.check_float_tensor(f"{prefix}_weight", weight, min_dim=2)
    if weight.dim() != 2:
        raise ValueError(f"{prefix}_weight must be (V, H) like nn.Linear.weight, got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{prefix}_hidden has hidden size {hidden.shape[-1]} but {prefix}_weight expects "
                         f"{weight.shape[1]} (weight shape {tuple(weight.shape)})")
    if weight.dtype != hidden.dtype and not amp:
        raise TypeError(f"{prefix}_weight dtype {weight.dtype} differs from {prefix}_hidden dtype {hidden.dtype}")
    if bias is not None:
        C.check_float_tensor(f"{prefix}_bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{prefix}_bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype and not amp:
            raise TypeError(f"{prefix}_bias dtype {bias.dtype} differs from {prefix}_hidden dtype {hidden.dtype}")
    C.check_same_device(**{f"{prefix}_hidden": hidden, f"{prefix}_weight": weight, f"{prefix}_bias": bias})
