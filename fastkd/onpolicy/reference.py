"""Float64 references of the on-policy family: full (N, V) logits, plain autograd, formulas written out.

Everything here materialises the logits; it exists to test :mod:`fastkd.onpolicy` (and to read the formulas).
"""

from __future__ import annotations

import math

import torch


def student_logits(hidden, weight, bias=None, temperature: float = 1.0, softcap: float | None = None):
    """u = softcap(h W.T + b) / T in float64, (N, V) (differentiable)."""
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def logprobs(hidden, weight, ids, *, bias=None, temperature=1.0, softcap=None):
    """(log-probs at ids (like ids), entropy (N,), log-softmax (N, V)) in float64 for 2-D hidden."""
    u = student_logits(hidden, weight, bias, temperature, softcap)
    logq = torch.log_softmax(u, dim=-1)
    two_d = ids.dim() == 2
    lq = logq.gather(1, ids.long() if two_d else ids.long()[:, None])
    p = logq.exp()
    ent = -(p * torch.where(p == 0, 0.0, logq)).sum(-1)  # a p = 0 entry adds 0 (and no NaN gradient)
    return (lq if two_d else lq[:, 0]), ent, logq


def reverse_kl(logq: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(q‖p) per row of full log-distributions."""
    q = logq.exp()
    return (q * torch.where(q == 0, 0.0, logq - logp)).sum(-1)


def forward_kl(logq: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) per row."""
    return reverse_kl(logp, logq)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp_max(0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
