"""The LM-head engine: chunked ``hidden @ weight.T`` with a per-chunk loss, shared by every fused path.

For one chunk of ``c`` rows :func:`run_chunks` computes the (soft-capped) logits ``h_c @ W.T (+ b)``, hands
them to the loss's ``chunk_loss`` (which runs one backend on the chunk and writes the logit gradient in
place of the logits), then turns that gradient into ``grad_hidden[c] = g @ W``,
``grad_weight += g.T @ h_c`` (fp32 accumulator for low-precision weights) and ``grad_bias += g.sum(0)``.
Peak extra memory is O(c · V) plus the gradients themselves, independent of N.

:class:`FusedHeadFunction` is the autograd wrapper: for scalar reductions everything happens in forward and
backward scales the stored gradients by ``grad_output``; for ``reduction="none"`` the per-token
``grad_output`` is only known in backward, so forward computes the losses alone and backward re-runs the
chunks with ``weight · grad_output``. Users: ``fastkd.distill.fused`` (dense), ``fastkd.sparse.op``
(sparse), ``fastkd.integrations.distributed`` (vocabulary-parallel) and the teacher-cache extraction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastkd.core import checks as C
from fastkd.core.autograd import scale_grad

_CPU_CHUNK_ELEMS = 1 << 24  # student + teacher chunk logits: 64 MiB together at fp32 (256 rows at V=32000)
_GPU_CHUNK_BYTES = 1 << 30  # at most ~1 GiB of chunk temporaries on a GPU


def auto_chunk_rows(n: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk from N, V and (on a GPU) free memory; a multiple of 8 where possible."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(_GPU_CHUNK_BYTES, free // 4)
        rows = budget // max(1, vocab * 4 * 6)  # ~6 fp32-sized (c, V) temporaries alive at once
    else:
        rows = _CPU_CHUNK_ELEMS // max(1, vocab)
    rows = max(8, rows // 8 * 8)
    return max(1, min(n, rows))


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for low-precision inputs with an fp32 result (fp32 accumulate, no rounding of the output)."""
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):  # older PyTorch without mm(out_dtype=)
            return torch.mm(a, b).float()
    return torch.mm(a.float(), b.float())


class LMHeadChunker:
    """Chunked ``hidden @ weight.T`` with gradient back-propagation, shared by the dense and sparse losses.

    hidden (N, H), weight (V, H), bias (V,) or None. Call :meth:`logits` for a row slice, then
    :meth:`backward` with the gradient of those (capped) logits to accumulate ``grad_hidden``,
    ``grad_weight``, ``grad_bias`` (allocated by :meth:`alloc_grads`).
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 softcap: float | None = None):
        self.hidden, self.weight, self.bias, self.softcap = hidden, weight, bias, softcap
        self.grad_hidden = self.grad_weight = self.grad_bias = None
        self._acc32 = weight.dtype in (torch.bfloat16, torch.float16)

    def logits(self, sl: slice) -> torch.Tensor:
        z = self.hidden[sl] @ self.weight.t()
        if self.bias is not None:
            z += self.bias
        if self.softcap is not None:
            z = torch.tanh_(z.div_(self.softcap)).mul_(self.softcap)
        return z

    def alloc_grads(self, need_hidden: bool, need_weight: bool, need_bias: bool) -> None:
        h, w = self.hidden, self.weight
        self.grad_hidden = torch.empty_like(h) if need_hidden else None
        wdt = torch.float32 if self._acc32 else w.dtype
        self.grad_weight = torch.zeros(w.shape, dtype=wdt, device=w.device) if need_weight else None
        self.grad_bias = (torch.zeros(w.shape[0], dtype=wdt, device=w.device)
                          if need_bias and self.bias is not None else None)

    def backward(self, sl: slice, grad_logits: torch.Tensor, capped_logits: torch.Tensor | None) -> None:
        """Accumulate the gradients of one chunk; ``capped_logits`` are this chunk's logits after the cap."""
        g = grad_logits
        if self.softcap is not None:  # d/dz cap·tanh(z/cap) = 1 − tanh², tanh = capped / cap
            g = g * (1 - (capped_logits / self.softcap).square())
        if self.grad_hidden is not None:
            torch.mm(g, self.weight, out=self.grad_hidden[sl])
        if self.grad_weight is not None:
            if self._acc32:  # fp32 accumulation: no rounding of partial sums to bf16/fp16 per chunk
                self.grad_weight.add_(_mm_fp32(g.t(), self.hidden[sl]))
            else:
                self.grad_weight.addmm_(g.t(), self.hidden[sl])
        if self.grad_bias is not None:
            self.grad_bias.add_(g.sum(0, dtype=self.grad_bias.dtype))

    def finished_grads(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        gw = self.grad_weight.to(self.weight.dtype) if self.grad_weight is not None else None
        gb = self.grad_bias.to(self.bias.dtype) if self.grad_bias is not None else None
        return self.grad_hidden, gw, gb


ChunkLoss = Callable[[slice, torch.Tensor, "torch.Tensor | None", torch.Tensor, tuple], torch.Tensor]


def run_chunks(student: LMHeadChunker, chunk_loss: ChunkLoss, aux: tuple, weight: torch.Tensor, rows: int,
               need_grad: bool) -> torch.Tensor:
    """Loss (N,) over row chunks; with ``need_grad`` the student's gradients are accumulated as well.

    ``chunk_loss(sl, logits, grad, weight[sl], aux)`` returns the chunk's per-token loss and, when ``grad`` is
    given, writes the weighted gradient of the chunk's (capped) student logits into it. ``grad`` is the
    logits buffer itself (in place) unless a softcap needs the logits afterwards.
    """
    n = weight.numel()
    loss = torch.empty(n, dtype=torch.float64 if student.hidden.dtype == torch.float64 else torch.float32,
                       device=weight.device)
    for start in range(0, n, rows):
        sl = slice(start, min(n, start + rows))
        z = student.logits(sl)
        if not need_grad:
            loss[sl] = chunk_loss(sl, z, None, weight[sl], aux)
            continue
        grad = torch.empty_like(z) if student.softcap is not None else z
        loss[sl] = chunk_loss(sl, z, grad, weight[sl], aux)
        student.backward(sl, grad, z)
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
        student = LMHeadChunker(hidden, weight, bias, softcap)
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
            student = LMHeadChunker(hidden, weight, bias, softcap)
            student.alloc_grads(*ctx.needs_input_grad[:3])
            w = tok_weight * grad_output.reshape(-1).to(tok_weight.dtype)
            run_chunks(student, chunk_loss, tuple(aux), w, rows, True)
            return (*student.finished_grads(), *nones)
        scaled = [None if g is None else scale_grad(g, grad_output, False) for g in ctx.saved_tensors]
        ctx.used = any(s is not None and s[1] for s in scaled)
        return (*(None if s is None else s[0] for s in scaled), *nones)


def check_linear(prefix: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    C.check_float_tensor(f"{prefix}_hidden", hidden)
    C.check_float_tensor(f"{prefix}_weight", weight, min_dim=2)
    if weight.dim() != 2:
        raise ValueError(f"{prefix}_weight must be (V, H) like nn.Linear.weight, got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{prefix}_hidden has hidden size {hidden.shape[-1]} but {prefix}_weight expects "
                         f"{weight.shape[1]} (weight shape {tuple(weight.shape)})")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{prefix}_weight dtype {weight.dtype} differs from {prefix}_hidden dtype {hidden.dtype}")
    if bias is not None:
        C.check_float_tensor(f"{prefix}_bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{prefix}_bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{prefix}_bias dtype {bias.dtype} differs from {prefix}_hidden dtype {hidden.dtype}")
    C.check_same_device(**{f"{prefix}_hidden": hidden, f"{prefix}_weight": weight, f"{prefix}_bias": bias})


