"""``torch`` backend of the sparse (top-k / tail / sampled) distillation losses, plus the shared K-level math.

Every mode and divergence shares one mechanism. Per token (row) the backend needs only
three vocabulary-wide statistics of the tempered student logits s = z / T:

    lse      = logsumexp_v s_v                     (the full-vocabulary normaliser)
    lse_tail = logsumexp_{v ∉ ids} s_v             (topk_tail only: the student's tail mass, exactly)
    s_ids    = s gathered at the K ids             (−inf at padding slots)

From those and the teacher's per-slot log-probabilities, :func:`sparse_terms` computes (on (N, K) tensors)
the per-token loss and a gradient of the closed form

    ∂loss/∂z_v = q_v · (a + b · [v ∉ ids]) + Σ_k c_k · [v = id_k],        q = softmax(s),

with (a, b, c) already multiplied by ``weight · kd_scale / T``. A backend therefore makes one pass over V
for the statistics and one to write the gradient; the Triton backend runs the same :func:`sparse_terms`.

Off the ids the gradient is evaluated as ``b' · exp(s_v − lb)`` with ``lb = lse_tail`` and
``b' = q_tail · (a + b)`` for topk_tail (``lb = lse``, ``b' = a`` otherwise): the same number, but when the
student's tail mass underflows (q_v = 0 and b = p_tail / q_tail = inf in fp32) the product stays finite
(exp(s_v − lse_tail) ≤ 1). Slots whose id is outside [−1, V) get s = NaN from every backend and poison
their token (NaN loss, NaN gradient coefficients) instead of reading or writing outside the row; the
gradient at a duplicated id is the sum of its slots' coefficients on every backend.

Derivation: for events e with student probabilities q_e(s) and qg_e = q_e ∂D/∂q_e,
∂q_k/∂s_v = q_k(δ_{v,id_k} − q_v) and ∂q_tail/∂s_v = q_v([v ∉ ids] − q_tail), so
∂D/∂s_v = Σ_k qg_k δ_{v,id_k} − q_v Σ_e qg_e + (qg_tail / q_tail) q_v [v ∉ ids]: c = qg_k,
a = −Σ_e qg_e, b = qg_tail / q_tail. For top-k rkl/jsd the student is renormalised over the K ids
(q̃ = softmax_K(s_ids)), so c = qg − q̃ Σ qg and a = b = 0.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from fastkd.core.lmhead import backend_chunk_rows
from fastkd.core.registry import register

if TYPE_CHECKING:
    from fastkd.core.params import SparseParams



def _pos(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """0 where x == 0 else value (the 0·log 0 terms); a NaN x or value stays NaN (NaN inputs give NaN)."""
    return torch.where(x == 0, torch.zeros((), dtype=value.dtype, device=value.device), value)


def _safe_log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim; an all −inf row gives all −inf instead of NaN."""
    m = x.amax(-1, keepdim=True)
    empty = m == -math.inf
    out = torch.log_softmax(torch.where(empty, torch.zeros_like(x), x), dim=-1)
    return torch.where(empty, torch.full_like(x, -math.inf), out)


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))


def sparse_terms(
    s_ids: torch.Tensor,
    lse: torch.Tensor,
    lse_tail: torch.Tensor | None,
    t_logp: torch.Tensor,
    t_tail: torch.Tensor | None,
    weight: torch.Tensor,
    p: SparseParams,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss (N,) and gradient coefficients (c (N, K), a (N,), lb (N,), b' (N,)) for one block of rows.

    s_ids: tempered student logits at the ids, −inf at padding, NaN at an id outside [0, V);
    lse, lse_tail: (N,) statistics above. The math is shift-invariant: s_ids, lse and lse_tail may all be
    relative to one per-row shift (every backend passes them relative to a logit near the row's top, so that no
    log-normaliser is rounded at the logits' magnitude; the gradient's exponent is then relative to it too);
    t_logp: (N, K) teacher log-probabilities (renormalised over K for
    topk/sampled, raw for topk_tail), −inf at padding; t_tail: (N,) teacher log tail mass (topk_tail). All in
    the compute dtype. weight: (N,) token weights (0 = excluded).

    The gradient of row i is ``a·exp(s_v − lse) + Σ_k c_k·[v = id_k]`` at its ids and ``b'·exp(s_v − lb)``
    elsewhere. Loss includes kd_scale; (a, b', c) include weight · kd_scale / T. Excluded rows get exactly 0
    everywhere (lb = 0); a kept row with a NaN in s_ids, t_logp or t_tail gets NaN loss and coefficients.
    """
    zero = torch.zeros((), dtype=s_ids.dtype, device=s_ids.device)
    name = p.effective
    keep = weight != 0
    lse_k = torch.where(keep, lse, zero).unsqueeze(-1)  # excluded rows may have lse = −inf
    b = lb = None
    if p.mode == "topk_tail":
        log_q = s_ids - lse_k
        log_qt = torch.where(keep, lse_tail - lse_k.squeeze(-1), zero)
        q, qt = log_q.exp(), log_qt.exp()
        pk, pt = t_logp.exp(), t_tail.exp()
        if name == "fkl":
            loss = _pos(pk, pk * (t_logp - log_q)).sum(-1) + _pos(pt, pt * (t_tail - log_qt))
            c, ct = -pk, -pt
        elif name == "rkl":
            c = _pos(q, q * (log_q - t_logp))
            ct = _pos(qt, qt * (log_qt - t_tail))
            loss = c.sum(-1) + ct
        else:
            beta = p.beta
            log_m, log_mt = _log_mix(t_logp, log_q, beta), _log_mix(t_tail, log_qt, beta)
            c = (1 - beta) * _pos(q, q * (log_q - log_m))
            ct = (1 - beta) * _pos(qt, qt * (log_qt - log_mt))
            loss = (
                beta * (_pos(pk, pk * (t_logp - log_m)).sum(-1) + _pos(pt, pt * (t_tail - log_mt)))
                + c.sum(-1)
                + ct
            )
        a = -(c.sum(-1) + ct)
        # b' = q_tail·(a + qg_tail/q_tail) without the division (q_tail may underflow to 0 in fp32)
        b = a * qt + ct
        lb = torch.where(keep & (lse_tail > -math.inf), lse_tail, zero)
    elif name == "fkl" or p.mode == "sampled":
        pk = t_logp.exp()
        loss = _pos(pk, pk * (t_logp - (s_ids - lse_k))).sum(-1)
        c = -pk
        a = pk.sum(-1)
    else:  # topk rkl / jsd: the student renormalised over the K ids, gradient only at the ids
        log_q = _safe_log_softmax(s_ids)
        q = log_q.exp()
        if name == "rkl":
            qg = _pos(q, q * (log_q - t_logp))
            loss = qg.sum(-1)
        else:
            beta = p.beta
            pk = t_logp.exp()
            log_m = _log_mix(t_logp, log_q, beta)
            qg = (1 - beta) * _pos(q, q * (log_q - log_m))
            loss = beta * _pos(pk, pk * (t_logp - log_m)).sum(-1) + qg.sum(-1)
        c = qg - q * qg.sum(-1, keepdim=True)
        a = torch.zeros_like(loss)
    scale = weight.to(s_ids.dtype) * (p.kd_scale / p.temperature)
    loss = torch.where(keep, loss * p.kd_scale, zero)
    c = torch.where(keep.unsqueeze(-1), c * scale.unsqueeze(-1), zero)
    a = torch.where(keep, a * scale, zero)
    b = a if b is None else torch.where(keep, b * scale, zero)
    lb = torch.where(keep, lse, zero) if lb is None else lb
    # a NaN logit at an id, an id outside the vocabulary (NaN from the stats pass) or a NaN teacher value
    # poisons the token even where a zero probability would multiply it away (0·log(0/NaN))
    bad = s_ids.isnan().any(-1) | t_logp.isnan().any(-1)
    if t_tail is not None:
        bad = bad | t_tail.isnan()
    bad = (keep & bad).unsqueeze(-1)
    nan = torch.full((), math.nan, dtype=s_ids.dtype, device=s_ids.device)
    loss, a, b = (torch.where(bad.squeeze(-1), nan, x) for x in (loss, a, b))
    return loss, torch.where(bad, nan, c), a, lb, b


def student_row_stats(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy (R,) of q = softmax(s) over the full row and argmax (R,) int64 of s (first index on ties).

    s: (R, V) tempered student logits in the compute dtype. H = log d − c/d with m = max s, d = Σ e^{s−m},
    c = Σ e^{s−m}(s − m) (a −inf logit adds 0, not 0·(−inf)); an all −inf row gives NaN (its loss is NaN too).
    """
    m = s.amax(-1, keepdim=True)
    x = s - torch.where(m == -math.inf, torch.zeros_like(m), m)
    e = x.exp()
    d = e.sum(-1)
    c = torch.where(e == 0, torch.zeros((), dtype=s.dtype, device=s.device), e * x).sum(-1)
    return d.log() - c / d, s.argmax(-1)


def sparse_stats(
    stats: torch.Tensor,
    h_s: torch.Tensor,
    arg_s: torch.Tensor,
    ids: torch.Tensor,
    s_ids: torch.Tensor,
    lse: torch.Tensor,
    lse_tail: torch.Tensor | None,
    t_logp: torch.Tensor,
    t_tail: torch.Tensor | None,
    weight: torch.Tensor,
) -> None:
    """Write the per-token statistics of a block of rows into ``stats`` (R, 4) fp32 (O(R·K), every backend).

    h_s (R,): the student's full-vocabulary entropy and arg_s (R,) int: its argmax, both from the backend's
    vocabulary pass; ids (R, K) int64; s_ids, lse, lse_tail, t_logp, t_tail as in :func:`sparse_terms`
    (t_tail given ⇔ topk_tail). Columns (:data:`fastkd.core.stats.STATS_KEYS`), 0 where ``weight == 0``:

    - teacher_entropy: −Σ_k p_k log p_k over the slots (− p_tail log p_tail for topk_tail: the tail is one
      outcome), i.e. the entropy of the distribution the loss distils towards;
    - student_entropy: h_s;
    - top1_agree: 1.0 where arg_s equals the teacher's highest-valued id (the smallest id on ties; a token
      whose slots hold no teacher mass has no such id and gets 0);
    - kl: the forward-KL loss of this mode (the ``fkl`` branch of :func:`sparse_terms`, without T² or weight):
      Σ_k p_k (log p_k − log q_k) with the full-vocabulary log q_k, + p_tail (log p_tail − log q_tail) for
      topk_tail. A kept token with a NaN at an id, in t_logp or t_tail gets NaN, as its loss.
    """
    zero = torch.zeros((), dtype=s_ids.dtype, device=s_ids.device)
    keep = weight != 0
    lse_k = torch.where(keep, lse, zero).unsqueeze(-1)  # the same expressions as sparse_terms' fkl loss
    pk = t_logp.exp()
    kl = _pos(pk, pk * (t_logp - (s_ids - lse_k))).sum(-1)
    h_t = -_pos(pk, pk * t_logp).sum(-1)
    bad = s_ids.isnan().any(-1) | t_logp.isnan().any(-1)
    if t_tail is not None:
        log_qt = torch.where(keep, lse_tail - lse_k.squeeze(-1), zero)
        pt = t_tail.exp()
        kl = kl + _pos(pt, pt * (t_tail - log_qt))
        h_t = h_t - _pos(pt, pt * t_tail)
        bad = bad | t_tail.isnan()
    kl = torch.where(bad, torch.full((), math.nan, dtype=kl.dtype, device=kl.device), kl)
    # the teacher's top id: the largest t_logp among slots with mass, the smallest such id on ties
    has = (ids >= 0) & (t_logp > -math.inf)
    top = torch.where(has, t_logp, -math.inf).amax(-1, keepdim=True)
    none = torch.iinfo(torch.int64).max
    top_id = torch.where(has & (t_logp == top), ids, none).amin(-1)
    agree = (top_id == arg_s.to(torch.int64)) & (top_id != none)
    cols = torch.stack([h_t, h_s.to(h_t.dtype), agree.to(h_t.dtype), kl], dim=-1)
    stats.copy_(torch.where(keep.unsqueeze(-1), cols, zero))


def _chunk(
    z: torch.Tensor,
    ids: torch.Tensor,
    t_logp: torch.Tensor,
    t_tail: torch.Tensor | None,
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    p: SparseParams,
    has_excluded: bool = True,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """Loss of one row block; writes its gradient into ``grad`` and its statistics into ``stats`` (same rows)."""
    cdt = t_logp.dtype
    s = z.to(cdt)
    if p.temperature != 1.0:
        s = s * (1.0 / p.temperature)
    v = s.shape[1]
    valid = (ids >= 0) & (ids < v)
    safe = torch.where(valid, ids, torch.zeros_like(ids))
    neg_inf = torch.tensor(-math.inf, dtype=cdt, device=s.device)
    # an id outside [−1, V) is never used as an index: its slot reads NaN (poisons the token, no device assert)
    pad = torch.where(ids == -1, neg_inf, torch.tensor(math.nan, dtype=cdt, device=s.device))
    # Everything below sees the logits shifted by the row max m (softmax is shift-invariant): s − m is the exact
    # difference of two logits, so no log-normaliser is rounded at the logits' magnitude (a constant offset
    # of the logits leaves the fp32 accuracy unchanged). An all −inf row keeps m = 0.
    m = s.amax(-1, keepdim=True)
    m = torch.where(m == -math.inf, torch.zeros((), dtype=cdt, device=s.device), m)
    s_ids = torch.where(valid, s.gather(1, safe), pad) - m
    # the student's row statistics before any in-place softmax below may overwrite s (an extra pass over the
    # chunk: this is the fallback backend; the kernels fold it into their statistics pass)
    row = None if stats is None else student_row_stats(s)
    dense = grad is not None and not (p.mode == "topk" and p.effective != "fkl")
    x = None
    if not dense or p.mode == "topk_tail":
        x = s.sub_(m) if s.data_ptr() != z.data_ptr() else s - m  # in place in the private tempered copy
    not_k = lse_tail = None
    if p.mode == "topk_tail":
        # padding and out-of-range slots mark a spare column V, dropped afterwards
        spare = torch.where(valid, ids, torch.full_like(ids, v))
        not_k = torch.ones((s.shape[0], v + 1), dtype=torch.bool, device=s.device).scatter_(1, spare, False)[:, :v]
        lse_tail = torch.logsumexp(torch.where(not_k, x, neg_inf), dim=-1)
    if x is not None:
        lse = torch.logsumexp(x, dim=-1)
        loss, c, a, lb, b = sparse_terms(s_ids, lse, lse_tail, t_logp, t_tail, weight, p)
        if row is not None:
            sparse_stats(stats, *row, ids, s_ids, lse, lse_tail, t_logp, t_tail, weight)
        if grad is None:
            return loss
        g = grad if grad.dtype == cdt and grad.stride(-1) == 1 else torch.empty_like(s)
        if not dense:
            g.zero_()  # top-k rkl/jsd: the student renormalised over K, the gradient lives on the ids only
        else:
            # q_v·a at the ids, b'·exp(s_v − lse_tail) off them (finite when the tail mass underflows);
            # g may alias z: z was read in full above (x is a copy)
            base = torch.where(not_k, lb.unsqueeze(-1), lse.unsqueeze(-1))
            coef = torch.where(not_k, b.unsqueeze(-1), a.unsqueeze(-1))
            torch.sub(x, base, out=g).exp_().mul_(coef)
            if has_excluded:
                g.masked_fill_((weight == 0).unsqueeze(-1), 0)
    else:
        # One fused per-row softmax gives q (rows stay in cache; far fewer memory passes than max / exp /
        # sum / scale as separate tensor ops). It runs in place in ``grad`` when that has the compute dtype
        # (it may alias z: every other read of z is done by now), else in the private tempered copy s, else
        # in a new buffer (in-place softmax only on CPU). The shifted lse comes from the row maxima (two cheap
        # reductions, no argmax): max q = exp(max s − lse) ≥ 1/V never underflows, so lse − m = −log max q.
        cpu = s.device.type == "cpu"
        if grad.dtype == cdt and grad.stride(-1) == 1 and (cpu or grad.data_ptr() != s.data_ptr()):
            g = grad
        elif cpu and s.data_ptr() != z.data_ptr():
            g = s
        else:
            g = torch.empty_like(s)
        torch.ops.aten._softmax.out(s, 1, False, out=g)
        lse = -g.amax(-1).log()
        loss, c, a, _, _ = sparse_terms(s_ids, lse, lse_tail, t_logp, t_tail, weight, p)
        if row is not None:
            sparse_stats(stats, *row, ids, s_ids, lse, lse_tail, t_logp, t_tail, weight)
        g.mul_(a.unsqueeze(-1))
        if has_excluded:
            g.masked_fill_((weight == 0).unsqueeze(-1), 0)  # also clears inf·0 and 0/0 of excluded rows
    # padding and out-of-range slots add an exact 0 at column 0; duplicated ids add up
    g.scatter_add_(1, safe, torch.where(valid, c, torch.zeros((), dtype=c.dtype, device=c.device)))
    if g is not grad:
        grad.copy_(g)
    return loss


def sparse_forward(
    student: torch.Tensor,
    ids: torch.Tensor,
    t_logp: torch.Tensor,
    t_tail: torch.Tensor | None,
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    p: SparseParams,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """Backend entry point (op ``sparse``): see :mod:`fastkd.sparse.op`.

    student (N, V) raw logits (rows may be strided); ids (N, K) int64, −1 = padding; t_logp (N, K) and
    t_tail (N,) | None in the compute dtype (fp32, fp64 for fp64 logits); weight (N,); grad (N, V) in the
    student's dtype or None; stats (N, 4) fp32 or None (:func:`sparse_stats`). Returns the per-token loss
    (N,) in the compute dtype.
    """
    n, v = student.shape
    loss = torch.empty(n, dtype=t_logp.dtype, device=student.device)
    rows = p.chunk_size or backend_chunk_rows(n, v)
    has_excluded = bool((weight == 0).any())  # one host sync per call (this is the fallback backend)
    for start in range(0, n, rows):
        sl = slice(start, min(n, start + rows))
        loss[sl] = _chunk(
            student[sl],
            ids[sl],
            t_logp[sl],
            None if t_tail is None else t_tail[sl],
            weight[sl],
            None if grad is None else grad[sl],
            p,
            has_excluded,
            None if stats is None else stats[sl],
        )
    return loss


def _reasons(**_: object) -> list[str]:
    return []


register("sparse", "torch", sparse_forward, _reasons)
