"""Multi-teacher mixtures for ``distill_loss`` and ``fused_linear_distill_loss``.

With M teachers and weights w (M,) or (M, N) (w ≥ 0, finite, Σ_m w_m = 1 per token), the loss distils
towards the mixture, at the loss's temperature T::

    p = Σ_m w_m p_m,   p_m = softmax(t_m / T)   (t_m: teacher m's logits, softcapped first in the fused path)

Design: the mixture is formed in the log domain, chunk of rows by chunk of rows,

    log p = logsumexp_m(log w_m + log_softmax(t_m / T))        (fp32; fp64 for fp64 inputs)

with a running ``logaddexp`` into one (c, V) accumulator, so the extra memory is O(chunk · V) whatever M is.
The chunk's mixture is handed to the *unchanged* single-teacher backends (torch / Triton / CUDA) as teacher
logits ``(log p − max log p) · T``: the backend divides by T and takes a softmax, which gives back p (the
row shift is free for every divergence, taid included, and keeps bf16 rounding small near the mode). A
teacher-side softcap is applied per teacher before mixing and never to the mixture.

* unfused (:class:`MixtureRows`): the teachers are given as logits (M, N, V); the backend callable is wrapped
  so that it runs chunk by chunk on the chunk's mixture. Buffers: an fp32 accumulator and an fp32 scratch
  (c, V), plus a (c, V) buffer in the kernel dtype for bf16/fp16; c = ``chunk_size`` or
  :func:`~fastkd.core.lmhead.backend_chunk_rows` (16 MiB per fp32 buffer).
* fused (:class:`MixtureChunkLoss`): per engine chunk, each teacher's chunk logits ``h_m[c] W_mᵀ (+ b_m)``
  are computed into ONE reused (c, V) workspace and folded into the fp32 accumulator; the last workspace
  then receives the mixture logits. Buffers: workspace + accumulator (+ an fp32 scratch for bf16/fp16),
  never (N, V) per teacher. Cost: the M teacher GEMMs plus ~4 elementwise passes over (c, V) per teacher.

M = 1 is routed to the single-teacher path (bitwise the same loss). Statistics (``return_stats``) are those
of the mixture (teacher_entropy = entropy of p, top1_agree against argmax p).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from fastkd.core import checks as C
from fastkd.core.lmhead import auto_chunk_rows, backend_chunk_rows, check_linear, softcap_
from fastkd.core.params import DistillParams

WEIGHT_TOL = 1e-5  # |Σ_m w_m − 1| allowed per token


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def teacher_weights_tensor(teacher_weights: object, m: int, lead: tuple[int, ...],
                           device: torch.device) -> torch.Tensor:
    """``teacher_weights`` as a float64 tensor (M,) or (M, N) (N = prod(lead)); shape / type checks only."""
    if isinstance(teacher_weights, torch.Tensor):
        if not teacher_weights.dtype.is_floating_point:
            raise TypeError(f"teacher_weights must be a floating-point tensor, got {teacher_weights.dtype}")
        C.check_constant("teacher_weights", teacher_weights)
        if teacher_weights.device != device:
            raise ValueError(f"teacher_weights is on {teacher_weights.device} but the logits are on {device}")
        w = teacher_weights.to(torch.float64)
    elif isinstance(teacher_weights, Sequence) and not isinstance(teacher_weights, str):
        try:
            w = torch.tensor([float(x) for x in teacher_weights], dtype=torch.float64, device=device)
        except (TypeError, ValueError):
            raise TypeError("teacher_weights must be a tensor or a sequence of numbers") from None
    else:
        raise TypeError(f"teacher_weights must be a tensor or a sequence of numbers, got "
                        f"{type(teacher_weights).__name__}")
    n = math.prod(lead)
    if tuple(w.shape) == (m,):
        return w
    if tuple(w.shape) in ((m, *lead), (m, n)):
        return w.reshape(m, n)
    raise ValueError(f"teacher_weights must have shape ({m},) or ({m}, {', '.join(map(str, lead))}) for {m} "
                     f"teachers and tokens of shape {lead}, got {tuple(w.shape)}")


def check_weight_values(w: torch.Tensor, token_weight: torch.Tensor) -> torch.Tensor:
    """Validate w (M,) | (M, N) float64 on the kept tokens (``token_weight != 0``); return it.

    Every kept token's weights must be finite, ≥ 0 and sum to 1 within :data:`WEIGHT_TOL` (excluded
    tokens are not checked). Where value checks are enabled (CPU tensors, ``FASTKD_CHECK_INPUTS=1``) a bad
    token raises ValueError; elsewhere (no host sync on a GPU) its weights become NaN, so the loss is NaN.
    """
    ok = torch.isfinite(w).all(0) & (w >= 0).all(0)
    ok = ok & ((torch.where(torch.isfinite(w), w, 0.0).sum(0) - 1).abs() <= WEIGHT_TOL)
    keep = token_weight.reshape(-1) != 0
    bad = ~ok & keep if w.dim() == 2 else ~ok & keep.any()
    if C.value_checks_enabled(w):
        if bool(bad.any()):
            if w.dim() == 1:
                raise ValueError(f"teacher_weights must be finite, >= 0 and sum to 1 (within {WEIGHT_TOL}), "
                                 f"got {w.tolist()}")
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"teacher_weights must be finite, >= 0 and sum to 1 (within {WEIGHT_TOL}) for "
                             f"every kept token; token {i} has weights {w[:, i].tolist()} "
                             f"({int(bad.sum())} bad tokens)")
        return w
    return torch.where(bad, torch.full_like(w, math.nan), w)


class LogMixture:
    """Reused buffers that form one chunk's teacher mixture in the log domain (module docstring).

    Call :meth:`add` once per teacher (first=True for the first), then :meth:`logits`.
    """

    def __init__(self, rows: int, temperature: float):
        self.rows, self.temperature = rows, temperature
        self._acc: torch.Tensor | None = None  # (rows, V) fp32 running log p
        self._tmp: torch.Tensor | None = None  # (rows, V) fp32 log w_m + log p_m of one teacher
        self._out: torch.Tensor | None = None  # (rows, V) kernel dtype, when no other buffer can hold it

    def _buf(self, name: str, c: int, v: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = getattr(self, name)
        if buf is None or buf.shape[0] < c or buf.shape[1] != v or buf.dtype != dtype:
            buf = torch.empty(max(c, self.rows), v, dtype=dtype, device=device)
            setattr(self, name, buf)
        return buf[:c]

    def add(self, z: torch.Tensor, log_w: torch.Tensor, first: bool, scratch: bool = False) -> None:
        """Fold teacher logits z (c, V) with log-weights ``log_w`` (0-d or (c, 1)) into the mixture.

        ``scratch=True``: z is a workspace that may be overwritten (used in place when it has the compute
        dtype). Rows where the teacher is all −inf give NaN (as the single-teacher loss does)."""
        c, v = z.shape
        cdt = _compute_dtype(z.dtype)
        acc = self._buf("_acc", c, v, cdt, z.device)
        if first:
            x = acc.copy_(z)
        elif scratch and z.dtype == cdt:
            x = z
        else:
            x = self._buf("_tmp", c, v, cdt, z.device).copy_(z)
        if self.temperature != 1.0:
            x.div_(self.temperature)
        x.sub_(torch.logsumexp(x, -1, keepdim=True)).add_(log_w)
        if not first:
            torch.logaddexp(acc, x, out=acc)

    def logits(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The chunk's teacher logits for a single-teacher backend, ``(log p − max log p) · T`` (c, V) in
        ``dtype``, written into ``out`` when given (it may alias the last teacher's workspace)."""
        acc = self._acc
        c = acc.shape[0] if out is None else out.shape[0]
        acc = acc[:c]
        acc.sub_(acc.amax(-1, keepdim=True))
        if self.temperature != 1.0:
            acc.mul_(self.temperature)
        if out is None:
            if acc.dtype == dtype:
                return acc
            out = self._buf("_out", c, acc.shape[1], dtype, acc.device)
        return out.copy_(acc)

    def release(self) -> None:
        self._acc = self._tmp = self._out = None


def _log_w(log_w: torch.Tensor, m: int, sl: slice) -> torch.Tensor:
    return log_w[m] if log_w.dim() == 1 else log_w[m, sl].unsqueeze(-1)


class MixtureRows:
    """A ``distill`` backend callable (contract in :mod:`fastkd.distill.op`) whose teacher is a mixture.

    teachers: (M, N, Vt) logits; log_w: (M,) | (M, N) log-weights in the compute dtype; the ``teacher``
    argument of :meth:`__call__` is ignored (the op passes a zero-stride placeholder). Rows are processed in
    chunks of ``rows``: mixture of the chunk → ``fn`` on the chunk (its loss, gradient and statistics rows).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], teachers: torch.Tensor, log_w: torch.Tensor, rows: int,
                 temperature: float):
        self.fn, self.teachers, self.log_w, self.rows = fn, teachers, log_w, rows
        self.temperature = temperature

    def __call__(self, student, teacher, labels, weight, grad, p: DistillParams, stats=None) -> torch.Tensor:
        n, vocab = student.shape
        loss = torch.empty(n, dtype=_compute_dtype(student.dtype), device=student.device)
        mix = LogMixture(self.rows, self.temperature)
        try:
            for start in range(0, n, self.rows):
                sl = slice(start, min(n, start + self.rows))
                for m in range(self.teachers.shape[0]):
                    mix.add(self.teachers[m, sl, :vocab], _log_w(self.log_w, m, sl), first=m == 0)
                zt = mix.logits(student.dtype)
                extra = () if stats is None else (stats[sl],)
                loss[sl] = self.fn(student[sl], zt, None if labels is None else labels[sl], weight[sl],
                                   None if grad is None else grad[sl], p, *extra)
        finally:
            mix.release()
        return loss


def split_teacher_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         teacher_weights: object) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """For :func:`fastkd.distill_loss`: (teacher used for the single-teacher checks, teachers (M, ..., V) or
    None, weights float64 (M,) | (M, N) or None). Raises when only one of a stacked teacher
    (``teacher_logits.dim() == student_logits.dim() + 1``) and ``teacher_weights`` is given."""
    stacked = teacher_logits.dim() == student_logits.dim() + 1
    if teacher_weights is None:
        if stacked:
            raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} has one more dimension than "
                             f"student_logits {tuple(student_logits.shape)} (M stacked teachers): pass "
                             f"teacher_weights (M,) or (M, N) to distil towards their mixture")
        return teacher_logits, None, None
    if not stacked:
        shape = ", ".join(map(str, student_logits.shape))
        raise ValueError(f"teacher_weights needs teacher_logits of shape (M, {shape}) (M stacked teachers), "
                         f"got teacher_logits {tuple(teacher_logits.shape)}")
    m = teacher_logits.shape[0]
    if m == 0:
        raise ValueError("teacher_logits holds no teacher (M = 0)")
    w = teacher_weights_tensor(teacher_weights, m, tuple(student_logits.shape[:-1]), student_logits.device)
    return teacher_logits[0], teacher_logits, w


def bind_rows(fn: Callable[..., torch.Tensor], teachers: torch.Tensor, w: torch.Tensor, token_weight: torch.Tensor,
              params: DistillParams, vocab: int) -> tuple[Callable[..., torch.Tensor], torch.Tensor]:
    """(backend callable, teacher (N, V) argument) of the unfused op for M stacked teachers.

    M = 1: ``fn`` and the teacher's own rows (the single-teacher path, bitwise). M > 1: a
    :class:`MixtureRows` and a zero-stride placeholder."""
    w = check_weight_values(w, token_weight)
    n = token_weight.numel()
    t3 = teachers.reshape(teachers.shape[0], n, teachers.shape[-1])
    if t3.shape[0] == 1:
        return fn, t3[0]
    log_w = w.to(_compute_dtype(teachers.dtype)).log()
    rows = params.chunk_size or backend_chunk_rows(n, vocab)
    placeholder = teachers.new_zeros(()).expand(n, teachers.shape[-1])
    return MixtureRows(fn, t3, log_w, rows, params.temperature), placeholder


class MixtureHead:
    """The teacher mixture's chunk logits from M teacher heads or stacked logits (module docstring).

    heads: M (hidden (N, Ht_m), weight (Vt_m, Ht_m), bias (Vt_m,) | None), or ``logits`` (M, N, Vt); log_w:
    (M,) | (M, N). :meth:`logits` computes each teacher's chunk logits into ONE reused workspace (flat,
    rows · max Vt elements in the teacher dtype), softcaps them, folds them into the mixture and writes the
    mixture logits ``(log p − max)·T`` (c, vocab) back into the workspace (valid until the next call).
    """

    def __init__(self, heads: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None,
                 logits: torch.Tensor | None, log_w: torch.Tensor, softcap: float | None, temperature: float,
                 vocab: int, rows: int):
        self.heads, self.t_logits, self.log_w, self.softcap, self.vocab, self.rows = (
            heads, logits, log_w, softcap, vocab, rows)
        self._ws: torch.Tensor | None = None
        self._mix = LogMixture(rows, temperature)

    def _workspace(self, c: int, v: int, like: torch.Tensor) -> torch.Tensor:
        cols = max(w.shape[0] for _, w, _ in self.heads) if self.heads else self.t_logits.shape[-1]
        if self._ws is None or self._ws.numel() < c * cols:
            self._ws = torch.empty(max(c, self.rows) * cols, dtype=like.dtype, device=like.device)
        return self._ws[: c * v].view(c, v)

    def logits(self, sl: slice) -> torch.Tensor:
        c, vocab = sl.stop - sl.start, self.vocab
        m_count = len(self.heads) if self.heads else self.t_logits.shape[0]
        z = None
        for m in range(m_count):
            if self.heads:
                h, w, b = self.heads[m]
                z = self._workspace(c, w.shape[0], w)
                if b is None:
                    torch.mm(h[sl], w.t(), out=z)
                else:
                    torch.addmm(b, h[sl], w.t(), out=z)
            else:
                z = self._workspace(c, self.t_logits.shape[-1], self.t_logits).copy_(self.t_logits[m, sl])
            softcap_(z, self.softcap)
            self._mix.add(z[:, :vocab], _log_w(self.log_w, m, sl), first=m == 0, scratch=True)
        return self._mix.logits(z.dtype, out=self._workspace(c, vocab, z))

    def release(self) -> None:
        self._ws = None
        self._mix.release()


class DenseAux(NamedTuple):
    """The tensors a dense chunk loss reads besides the student's chunk: the engine's ``aux`` tuple, by name."""

    t_hidden: torch.Tensor | None
    t_weight: torch.Tensor | None
    t_bias: torch.Tensor | None
    t_logits: torch.Tensor | None
    labels: torch.Tensor | None


class MixtureChunkLoss:
    """The per-chunk loss of :func:`fastkd.fused_linear_distill_loss` with M teachers (``run_chunks`` contract):
    the chunk's mixture logits from a :class:`MixtureHead`, then one ``distill`` backend on the chunk as in
    :class:`fastkd.distill.fused.DenseChunkLoss` (same ``stats`` attribute)."""

    def __init__(self, params: DistillParams, vocab: int, fn: Callable[..., torch.Tensor], head: MixtureHead,
                 stats: torch.Tensor | None = None):
        self.params, self.vocab, self.fn, self.head, self.stats = params, vocab, fn, head, stats

    def __call__(self, sl, z, grad, w, aux):
        zt = self.head.logits(sl)
        labels, vocab = DenseAux(*aux).labels, self.vocab
        lab = None if labels is None else labels[sl]
        extra = () if self.stats is None else (self.stats[sl],)
        loss = self.fn(z[:, :vocab], zt, lab, w, None if grad is None else grad[:, :vocab], self.params, *extra)
        if grad is not None and vocab < grad.shape[1]:
            grad[:, vocab:].zero_()
        return loss

    def release(self) -> None:
        self.head.release()


def split_teacher_heads(student_hidden: torch.Tensor, teacher_hidden, teacher_weight, teacher_bias,
                        teacher_logits: torch.Tensor | None, teacher_weights: object) -> tuple | None:
    """For :func:`fastkd.fused_linear_distill_loss`: None for a single teacher, else
    ``(first teacher's (hidden, weight, bias, logits) for the single-teacher checks, heads | None,
    logits (M, ..., Vt) | None, weights float64 (M,) | (M, N))``. Every teacher head is checked like the
    single teacher (constants, shapes, dtype, device)."""
    listed = isinstance(teacher_hidden, (list, tuple)) or isinstance(teacher_weight, (list, tuple))
    stacked = teacher_logits is not None and teacher_logits.dim() == student_hidden.dim() + 1
    lead = tuple(student_hidden.shape[:-1])
    if teacher_weights is None:
        if listed or stacked:
            raise ValueError("several teachers (a list of teacher_hidden / teacher_weight, or stacked "
                             "teacher_logits (M, ..., V)) need teacher_weights (M,) or (M, N)")
        return None
    if teacher_logits is not None:
        if listed or teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None:
            raise ValueError("pass either teacher_logits or teacher_hidden + teacher_weight, not both")
        if not stacked:
            raise ValueError(f"teacher_weights needs stacked teacher_logits (M, {', '.join(map(str, lead))}, V), "
                             f"got teacher_logits {tuple(teacher_logits.shape)}")
        m = teacher_logits.shape[0]
        if m == 0:
            raise ValueError("teacher_logits holds no teacher (M = 0)")
        w = teacher_weights_tensor(teacher_weights, m, lead, student_hidden.device)
        return (None, None, None, teacher_logits[0]), None, teacher_logits, w
    if not listed:
        raise ValueError("teacher_weights needs a list of M teacher_hidden and M teacher_weight tensors (or "
                         "stacked teacher_logits (M, ..., V))")
    if not isinstance(teacher_hidden, (list, tuple)) or not isinstance(teacher_weight, (list, tuple)):
        raise TypeError("teacher_hidden and teacher_weight must both be lists of M tensors")
    m = len(teacher_hidden)
    biases = [None] * m if teacher_bias is None else teacher_bias
    if not isinstance(biases, (list, tuple)):
        raise TypeError("with several teachers, teacher_bias must be a list of M tensors / None, or None")
    if m == 0 or len(teacher_weight) != m or len(biases) != m:
        raise ValueError(f"teacher_hidden, teacher_weight (and teacher_bias) must list the same number >= 1 of "
                         f"teachers, got {len(teacher_hidden)}, {len(teacher_weight)}, {len(biases)}")
    heads = []
    for i, (h, wt, b) in enumerate(zip(teacher_hidden, teacher_weight, biases, strict=True)):
        check_linear("teacher", h, wt, b)
        for name, tensor in (("teacher_hidden", h), ("teacher_weight", wt), ("teacher_bias", b)):
            C.check_constant(f"{name}[{i}]", tensor)
        if tuple(h.shape[:-1]) != lead:
            raise ValueError(f"teacher_hidden[{i}] shape {tuple(h.shape)} must match student_hidden "
                             f"{tuple(student_hidden.shape)} in every dimension but the last")
        if h.dtype != student_hidden.dtype:
            raise TypeError(f"teacher_hidden[{i}] dtype {h.dtype} differs from student_hidden dtype "
                            f"{student_hidden.dtype}")
        C.check_same_device(student_hidden=student_hidden, **{f"teacher_hidden[{i}]": h})
        heads.append((h, wt, b))
    w = teacher_weights_tensor(teacher_weights, m, lead, student_hidden.device)
    h0, w0, b0 = heads[0]
    return (h0, w0, b0, None), heads, None, w


def bind_chunk_loss(single, fn: Callable[..., torch.Tensor], mix: tuple, token_weight: torch.Tensor,
                    params: DistillParams, vocab: int, vs: int, vocab_size: int | None, rows: int):
    """The fused op's chunk loss for the teachers of :func:`split_teacher_heads` (``mix`` = its result but the
    first item): ``single`` (the single-teacher chunk loss, on the first teacher) when M = 1, else a
    :class:`MixtureChunkLoss` sharing ``single.stats``."""
    heads, logits, w = mix
    w = check_weight_values(w, token_weight)
    n = token_weight.numel()
    for i, (_, wt, _) in enumerate(heads or ()):
        if C.resolve_vocab(vs, wt.shape[0], vocab_size) != vocab:
            raise ValueError(f"teacher_weight[{i}] has {wt.shape[0]} rows but the first teacher's vocabulary is "
                             f"{vocab}; pass vocab_size= to use the leading columns")
    if (len(heads) if heads else logits.shape[0]) == 1:
        return single
    head = _mixture_head(heads, logits, w, n, params.softcap, params.temperature, vocab, rows)
    return MixtureChunkLoss(params, vocab, fn, head, getattr(single, "stats", None))


def _mixture_head(heads, logits, w: torch.Tensor, n: int, softcap: float | None, temperature: float, vocab: int,
                  rows: int) -> MixtureHead:
    t3 = None if logits is None else logits.reshape(logits.shape[0], n, logits.shape[-1])
    flat = None if heads is None else [(h.reshape(n, h.shape[-1]), wt, b) for h, wt, b in heads]
    log_w = w.to(_compute_dtype((t3 if t3 is not None else flat[0][1]).dtype)).log()
    return MixtureHead(flat, t3, log_w, softcap, temperature, vocab, rows)


def fused_teacher_entropy(a: dict) -> torch.Tensor:
    """Teacher entropy (N,) fp32 at the loss's temperature for the arguments ``a`` of
    :func:`fastkd.fused_linear_distill_loss` (one teacher or a mixture; softcap applied): the
    ``select="teacher_entropy_top"`` pre-pass of :mod:`fastkd.core.selection`. Costs one pass of the teacher
    head(s) over all tokens (the GEMMs, or a read of given logits), chunk by chunk, O(chunk · V) memory."""
    sh, sw = a["student_hidden"], a["student_weight"]
    lead = tuple(sh.shape[:-1])
    n = math.prod(lead)
    split = split_teacher_heads(sh, a["teacher_hidden"], a["teacher_weight"], a["teacher_bias"], a["teacher_logits"],
                                a["teacher_weights"])
    if split is not None:
        _, heads, logits, w = split
    elif a["teacher_logits"] is not None:
        C.check_float_tensor("teacher_logits", a["teacher_logits"])
        heads, logits, w = None, a["teacher_logits"].unsqueeze(0), torch.ones(1, dtype=torch.float64)
    else:
        if a["teacher_hidden"] is None or a["teacher_weight"] is None:
            raise ValueError("pass teacher_hidden and teacher_weight (or teacher_logits)")
        check_linear("teacher", a["teacher_hidden"], a["teacher_weight"], a["teacher_bias"])
        heads, logits = [(a["teacher_hidden"], a["teacher_weight"], a["teacher_bias"])], None
        w = torch.ones(1, dtype=torch.float64)
    w = w.to(sh.device)
    vt = heads[0][1].shape[0] if heads else logits.shape[-1]
    vocab = C.resolve_vocab(sw.shape[0], vt, a["vocab_size"])
    rows = a["chunk_size"] or auto_chunk_rows(n, 2 * vt, sh.device)
    temperature = a["temperature"]
    head = _mixture_head(heads, logits, w, n, a["softcap"], temperature, vocab, rows)
    out = torch.empty(n, dtype=torch.float32, device=sh.device)
    try:
        for start in range(0, n, rows):
            sl = slice(start, min(n, start + rows))
            x = head.logits(sl).to(_compute_dtype(sh.dtype)).div_(temperature)
            log_p = torch.log_softmax(x, -1)
            p = log_p.exp()
            out[sl] = -torch.where(p == 0, 0.0, p * log_p).sum(-1)
    finally:
        head.release()
    return out
