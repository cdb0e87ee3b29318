"""Per-token distillation statistics: the names, the backend buffer and the public dict.

``return_stats=True`` on a loss returns ``(loss, stats)``; ``stats`` maps each name of :data:`STATS_KEYS` to
an fp32 (N,) tensor (N = tokens, flattened), exactly 0 where the token is excluded (mask / ignore_index /
zero weight) and without gradient. Everything is at the loss's temperature T, with p the teacher's and q
the student's distribution after dividing the logits by T:

* ``teacher_entropy`` = −Σ p log p, ``student_entropy`` = −Σ q log q (0·log 0 = 0);
* ``top1_agree`` = 1.0 where argmax(student) == argmax(teacher) (first index on ties, like
  ``torch.argmax``; sparse losses compare with the teacher's highest-valued stored id), else 0.0;
* ``kl`` = Σ p (log p − log q): the forward KL at T, no T² factor and no token weight, whatever divergence
  is trained.

Backends receive an optional ``stats`` output of shape (N, 4) fp32 whose columns follow :data:`STATS_KEYS`
(:func:`new_buffer`), written in the passes they already make (None when not requested); the op turns it
into the dict with :func:`stats_dict`. Kernels compute entropies stably from per-block
(m = max x, d = Σ e^{x−m}, c = Σ e^{x−m}(x−m)): H = log d − c/d, blocks merged by rescaling with
e^{m_j − m*} (c_j + d_j (m_j − m*)).
"""

from __future__ import annotations

import torch

STATS_KEYS: tuple[str, ...] = ("teacher_entropy", "student_entropy", "top1_agree", "kl")
N_STATS = len(STATS_KEYS)
TEACHER_ENTROPY, STUDENT_ENTROPY, TOP1_AGREE, KL = range(N_STATS)  # column indices of the (N, 4) buffer


def new_buffer(n: int, device: torch.device | str) -> torch.Tensor:
    """The (n, 4) fp32 buffer a backend fills (columns in :data:`STATS_KEYS` order), zero-initialised so that
    rows a backend skips read as excluded."""
    return torch.zeros(n, N_STATS, dtype=torch.float32, device=device)


def stats_dict(buf: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: (N,) fp32}`` from a backend's (N, 4) buffer, 0 where ``weight == 0`` (excluded tokens), detached.

    buf: (N, 4) float (any float dtype, returned as fp32); weight: (N,) the op's per-token weights.
    Excluded rows are zeroed here (not trusted to the backend), so NaN/inf of masked garbage rows never leak.
    """
    if buf.dim() != 2 or buf.shape[1] != N_STATS or buf.shape[0] != weight.numel():
        raise ValueError(f"stats buffer must have shape ({weight.numel()}, {N_STATS}), got {tuple(buf.shape)}")
    keep = (weight.reshape(-1) != 0).unsqueeze(-1)
    out = torch.where(keep, buf.detach().to(torch.float32), torch.zeros((), dtype=torch.float32, device=buf.device))
    return {name: out[:, i] for i, name in enumerate(STATS_KEYS)}


def _neg_xlogx_sum(x: torch.Tensor, log_x: torch.Tensor) -> torch.Tensor:
    # x == 0 (not <= 0) so that NaN rows stay NaN, while 0·(−inf) terms of −inf logits count as 0
    return -torch.where(x == 0, torch.zeros((), dtype=x.dtype, device=x.device), x * log_x).sum(-1)


def row_stats(zs: torch.Tensor, zt: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor,
              p: torch.Tensor | None = None, q: torch.Tensor | None = None) -> torch.Tensor:
    """The (rows, 4) statistics of dense rows from quantities a torch backend already has.

    zs, zt: (rows, V) raw (un-tempered) student / teacher logits, any float dtype (argmax only: dividing
    by T > 0 keeps the order, and raw logits avoid ties created by rounding); log_p, log_q: (rows, V) the
    tempered log-softmaxes; p, q: their exps when already computed. Returns the compute dtype of log_p.
    """
    p = log_p.exp() if p is None else p
    q = log_q.exp() if q is None else q
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    kl = torch.where(p == 0, zero, p * (log_p - log_q)).sum(-1)
    agree = (zs.argmax(-1) == zt.argmax(-1)).to(log_p.dtype)
    return torch.stack([_neg_xlogx_sum(p, log_p), _neg_xlogx_sum(q, log_q), agree, kl], dim=-1)
