"""``torch`` backend of the divergence losses on logits: chunked PyTorch, always available.

One mechanism serves every divergence. For a chunk of rows it computes, in fp32 (fp64 for fp64 inputs),
log q = log_softmax(s), log p = log_softmax(t) and then, per divergence, the per-token loss and the
vector ``qg_i = q_i · ∂D/∂q_i``; the gradient with respect to the tempered student logits is then always
``qg − q · Σ_j qg_j`` (the softmax chain rule). Only one chunk of (rows × vocab) temporaries is alive at
a time; the gradient is written straight into the caller's buffer in its dtype.

Dispatch: :data:`TERMS` maps every name of the divergence table (:mod:`fastkd.core.divergences`) but taid
(which needs the logits) to ``(log_p, log_q, p, q, params) -> (D, qg)``; the divergence computed is
``params.effective`` (the table's endpoint rules). 0·log 0 terms are guarded with ``x == 0`` (not
``x <= 0``) so that NaN inputs give NaN; a cross-entropy label outside [0, V) gives a NaN loss.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from functools import cache

import torch

from fastkd.core.lmhead import backend_chunk_rows
from fastkd.core.params import DistillParams
from fastkd.core.registry import register
from fastkd.core.stats import row_stats


def _where_pos(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """value where x != 0 else 0, for x ≥ 0 or NaN: 0·(−inf) terms are 0, NaN inputs stay NaN."""
    return torch.where(x == 0, torch.zeros((), dtype=value.dtype, device=value.device), value)


def _log_mix(log_a: torch.Tensor, wa: float, log_b: torch.Tensor, wb: float) -> torch.Tensor:
    if wa <= 0:
        return log_b + math.log(wb)
    if wb <= 0:
        return log_a + math.log(wa)
    return torch.logaddexp(log_a + math.log(wa), log_b + math.log(wb))


def _akl_weights(p: torch.Tensor, q: torch.Tensor, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    p_sorted, idx = torch.sort(p, dim=-1, descending=True, stable=True)
    err = (p_sorted - q.gather(-1, idx)).abs_()
    head = torch.cumsum(p_sorted, dim=-1) <= mu
    head[:, 0] = True
    g_h = (err * head).sum(-1)
    g_t = err.sum(-1) - g_h
    den = g_h + g_t
    safe = torch.where(den > 0, den, torch.ones_like(den))
    zero = torch.zeros_like(den)
    # NaN inputs: den is NaN; keep it in the weights so that the loss is NaN too
    return torch.where(den > 0, g_h / safe, zero + den * 0), torch.where(den > 0, g_t / safe, zero + den * 0)


# Every divergence is a function (log_p, log_q, p, q, params) -> (per-row D, qg = q·∂D/∂q), in a dict keyed
# by the table's names (tested to cover the table). taid is handled in divergence_terms (it needs logits).
Terms = tuple[torch.Tensor, torch.Tensor]


def _fkl(log_p, log_q, p, q=None, prm=None) -> Terms:
    return _where_pos(p, p * (log_p - log_q)).sum(-1), -p


def _rkl(log_p, log_q, p, q, prm=None) -> Terms:
    qg = _where_pos(q, q * (log_q - log_p))
    return qg.sum(-1), qg


def _mixed(wf: torch.Tensor, wr: torch.Tensor, log_p, log_q, p, q) -> Terms:
    lf, qf = _fkl(log_p, log_q, p)
    lr, qr = _rkl(log_p, log_q, p, q)
    return wf * lf + wr * lr, wf.unsqueeze(-1) * qf + wr.unsqueeze(-1) * qr


def _symkl(log_p, log_q, p, q, prm: DistillParams) -> Terms:
    one = torch.ones(p.shape[:-1], dtype=p.dtype, device=p.device)
    return _mixed(one * prm.beta, one * (1.0 - prm.beta), log_p, log_q, p, q)


def _akl(log_p, log_q, p, q, prm: DistillParams) -> Terms:
    return _mixed(*_akl_weights(p, q, prm.mu), log_p, log_q, p, q)


def _jsd(log_p, log_q, p, q, prm: DistillParams) -> Terms:
    b = prm.beta
    log_m = _log_mix(log_p, b, log_q, 1 - b)
    qg = (1 - b) * _where_pos(q, q * (log_q - log_m))
    return b * _where_pos(p, p * (log_p - log_m)).sum(-1) + qg.sum(-1), qg


def _skl(log_p, log_q, p, q, prm: DistillParams) -> Terms:
    a = prm.alpha
    log_m = _log_mix(log_p, a, log_q, 1 - a)
    return _where_pos(p, p * (log_p - log_m)).sum(-1), -(1 - a) * _where_pos(p, (log_p + log_q - log_m).exp())


def _srkl(log_p, log_q, p, q, prm: DistillParams) -> Terms:
    a = prm.alpha
    log_m = _log_mix(log_p, 1 - a, log_q, a)
    kl = _where_pos(q, q * (log_q - log_m))
    return kl.sum(-1), kl - a * _where_pos(q, (2 * log_q - log_m).exp())


def _tvd(log_p, log_q, p, q, prm=None) -> Terms:
    diff = q - p
    return 0.5 * diff.abs().sum(-1), 0.5 * q * torch.sign(diff)


def _pow_diff(base: torch.Tensor, other: torch.Tensor, diff: torch.Tensor, c: float) -> torch.Tensor:
    """(e^other − e^base) / c where other = base + c·diff, without cancellation as c·diff → 0.

    |c·diff| < 1/2: e^base · expm1(c·diff) / c (→ e^base · diff as c → 0); else the direct difference, whose two
    terms then differ by a factor ≥ e^{1/2} (and which gives 0 for −inf logits, where diff is ±inf or NaN).
    """
    u = c * diff
    small = u.abs() < 0.5  # False for NaN (−inf − (−inf)) and ±inf
    near = base.exp() * torch.expm1(torch.where(small, u, torch.zeros((), dtype=u.dtype, device=u.device))) / c
    return torch.where(small, near, (other.exp() - base.exp()) / c)


def _ab(log_p, log_q, p, q, prm: DistillParams) -> Terms:
    """D = −1/(αβ) Σ (p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β)); qg = (q^(α+β) − p^α q^β)/α.

    Evaluated as D = −1/(α+β) Σ (p^(α+β)·E_β(log q − log p) + q^(α+β)·E_α(log p − log q)), E_c(x) =
    (e^{c·x} − 1)/c (:func:`_pow_diff`), qg = −q^(α+β)·E_α(log p − log q): the same function without the
    cancellation of the 1/(αβ) form as α → 0 or β → 0 (each term tends to a KL-like one). Powers in the log domain
    (x^a = e^{a log x}), so −inf logits give 0 terms when α, β > 0.
    """
    a, b = prm.alpha, prm.beta
    s = a + b
    lpq = a * log_p + b * log_q
    t_p = _pow_diff(s * log_p, lpq, log_q - log_p, b)  # (p^α q^β − p^(α+β)) / β
    t_q = _pow_diff(s * log_q, lpq, log_p - log_q, a)  # (p^α q^β − q^(α+β)) / α
    return -(t_p + t_q).sum(-1) / s, -t_q


def _zero(log_p, log_q, p, q, prm=None) -> Terms:
    """skl / srkl at α = 1 (table endpoint): D ≡ 0, but NaN inputs still give NaN."""
    bad = (p.sum(-1) + q.sum(-1)) * 0.0  # NaN where an input row is NaN, else 0
    return bad, torch.zeros_like(q)


TERMS: dict[str, Callable[..., Terms]] = {
    "fkl": _fkl, "rkl": _rkl, "jsd": _jsd, "symkl": _symkl, "skl": _skl, "srkl": _srkl, "tvd": _tvd,
    "akl": _akl, "ab": _ab, "zero": _zero,
}


def divergence_terms(
    name: str, s: torch.Tensor, t: torch.Tensor, p: DistillParams, need_log_p: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(D, qg, q, log_p, log_q) for tempered logits s (student), t (teacher): the per-row divergence D, the
    vector qg = q·∂D/∂q, q and the log-softmaxes (log_p is None for taid unless ``need_log_p``)."""
    log_q = torch.log_softmax(s, dim=-1)
    q = log_q.exp()
    if name == "taid":  # target r = softmax((1−t)·s + t·z_t), then forward KL(r‖q)
        # from the log-softmaxes (each side shifted by its own log-normaliser, which softmax ignores): no logit
        # is rounded at the magnitude of a large common offset. t = 0: r = q exactly, the teacher is not read
        # (t = 1 never gets here: a table endpoint)
        log_p = torch.log_softmax(t, dim=-1)
        log_r = log_q if p.t == 0 else torch.log_softmax((1 - p.t) * log_q + p.t * log_p, dim=-1)
        loss, qg = _fkl(log_r, log_q, log_r.exp())
        return loss, qg, q, log_p if need_log_p else None, log_q
    log_p = torch.log_softmax(t, dim=-1)
    loss, qg = TERMS[name](log_p, log_q, log_p.exp(), q, p)
    return loss, qg, q, log_p, log_q


def chunk_loss_grad(
    zs: torch.Tensor,
    zt: torch.Tensor,
    labels: torch.Tensor | None,
    weight: torch.Tensor,
    p: DistillParams,
    need_grad: bool,
    need_stats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Loss (rows,), ``weight``-scaled gradient w.r.t. the raw student logits and statistics for one chunk.

    zs, zt: (rows, V) raw logits of any float dtype; labels: (rows,) int64 or None; weight: (rows,) fp32,
    0 = excluded token. Returns (loss, grad, stats) in the compute dtype (fp32, or fp64 for fp64 inputs);
    loss and grad are exactly 0 on excluded rows; stats: (rows, 4) (:func:`fastkd.core.stats.row_stats`,
    from the chunk's log-softmaxes, computed before the gradient overwrites anything) or None. The loss and
    gradient ops are the same with and without stats.
    """
    cdt = torch.float64 if zs.dtype == torch.float64 else torch.float32
    inv_t = 1.0 / p.temperature
    s = zs.to(cdt) * inv_t if inv_t != 1.0 else zs.to(cdt)
    t = zt.to(cdt) * inv_t if inv_t != 1.0 else zt.to(cdt)
    name = p.effective
    stats = None
    if name == "fkl" and not need_grad:
        log_q = torch.log_softmax(s, dim=-1)
        log_p = torch.log_softmax(t, dim=-1)
        p_t = log_p.exp()
        loss = _fkl(log_p, log_q, p_t)[0]
        if need_stats:
            stats = row_stats(zs, zt, log_p, log_q, p=p_t)
        grad = None
    else:
        loss, qg, q, log_p, log_q = divergence_terms(name, s, t, p, need_log_p=need_stats)
        if need_stats:
            stats = row_stats(zs, zt, log_p, log_q, q=q)
        grad = None
        if need_grad:  # ∂D/∂s = qg − q·Σqg, then the chain rule through s = z / T
            if name in ("fkl", "taid"):  # qg = −target, Σqg = −1 exactly: q − target (one reduction fewer)
                grad = qg.add_(q)
            else:
                grad = qg.sub_(q * qg.sum(-1, keepdim=True))
            if p.kd_scale * inv_t != 1.0:
                grad = grad.mul_(p.kd_scale * inv_t)
    loss = loss * p.kd_scale
    if p.ce_weight:
        z = zs.to(cdt)
        log_sm = torch.log_softmax(z, dim=-1)
        valid = (labels >= 0) & (labels < z.shape[-1])  # a bad label gives a NaN loss, never a bad read
        safe = torch.where((weight != 0) & valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
        ce = torch.where(valid, -log_sm.gather(-1, safe).squeeze(-1), math.nan)
        loss = loss + p.ce_weight * ce
        if grad is not None:
            g_ce = log_sm.exp_()
            g_ce.scatter_add_(-1, safe, torch.full_like(safe, -1, dtype=cdt))
            grad.add_(g_ce, alpha=p.ce_weight)
    keep = weight != 0
    loss = torch.where(keep, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    if grad is not None:
        w = weight.to(cdt).unsqueeze(-1)
        grad = torch.where(keep.unsqueeze(-1), grad * w, torch.zeros((), dtype=cdt, device=grad.device))
    return loss, grad, stats


# On CPU the eager chunk math is a dozen memory-bound passes; inductor fuses it into a few vectorised
# loops (docs/DESIGN.md, "Performance"). Compiling costs seconds per divergence and dtype, so it is used
# only for large chunks: FASTKD_TORCH_COMPILE=auto (default) | 1 (always) | 0 (never).
_COMPILE_MIN_ELEMS = 1 << 20
ChunkOut = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]  # (loss, grad, stats)
ChunkFn = Callable[..., ChunkOut]


@cache
def _compiled_chunk_fn() -> ChunkFn:
    return torch.compile(chunk_loss_grad, dynamic=True)


_COMPILE_FAILED: list[str] = []


def chunk_fn(elems: int, device: torch.device) -> ChunkFn:
    """The chunk implementation for a chunk of ``elems`` elements: compiled or eager (same function)."""
    mode = os.environ.get("FASTKD_TORCH_COMPILE", "auto")
    if _COMPILE_FAILED or mode == "0" or torch.compiler.is_compiling():
        return chunk_loss_grad
    if mode == "1" or (mode == "auto" and device.type == "cpu" and elems >= _COMPILE_MIN_ELEMS):
        return _guarded_compiled
    return chunk_loss_grad


def _guarded_compiled(*args: object) -> ChunkOut:
    try:
        return _compiled_chunk_fn()(*args)
    except Exception as exc:  # no C++ compiler, inductor bug: fall back to eager, say so once
        _COMPILE_FAILED.append(f"{type(exc).__name__}: {exc}")
        warnings.warn(f"fastkd: torch.compile of the chunk kernel failed, using eager PyTorch ({exc})",
                      RuntimeWarning, stacklevel=2)
        return chunk_loss_grad(*args)


def distill_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    p: DistillParams,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """Backend entry point (op ``distill``): see :mod:`fastkd.distill.op`.

    student, teacher: (N, V) (rows may be strided); labels (N,) int64 or None; weight (N,) fp32;
    grad: (N, V) output buffer in the student's dtype (may alias ``student``) or None; stats: (N, 4) fp32
    output (:mod:`fastkd.core.stats`) or None. Returns the per-token loss (N,) in fp32 (fp64 for fp64 inputs).
    """
    n, v = student.shape
    cdt = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = torch.empty(n, dtype=cdt, device=student.device)
    rows = p.chunk_size or backend_chunk_rows(n, v)
    run = chunk_fn(min(rows, n) * v, student.device)
    for start in range(0, n, rows):
        sl = slice(start, min(n, start + rows))
        lab = labels[sl] if labels is not None else None
        chunk_loss, chunk_grad, chunk_stats = run(student[sl], teacher[sl], lab, weight[sl], p, grad is not None,
                                                  stats is not None)
        loss[sl] = chunk_loss
        if stats is not None:
            stats[sl].copy_(chunk_stats)
        if grad is not None:
            grad[sl].copy_(chunk_grad)
    return loss


register("distill", "torch", distill_forward)  # runs any input: no capabilities to declare
