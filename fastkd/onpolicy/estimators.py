"""``fastkd.on_policy_distill_loss``: the sampled-token reverse-KL objectives of on-policy distillation.

The student q_θ samples token x at a position (from a sampling policy q_s: the student itself, possibly a few
updates stale); a teacher p scores it. Per token, with ``r = log q_θ(x) − log p(x)`` computed from the fused head
(:func:`fastkd.onpolicy.op.logprobs_from_hidden`'s row math, the gradient of scalar reductions in forward, three
GEMMs), the estimators and exactly what they estimate (expectations over x ~ q_s; "on-policy" means q_s = q_θ):

``"k1"``  loss r, gradient ∇log q_θ(x). On-policy the value is unbiased for KL(q‖p); the gradient's expectation is
          E_q[∇log q] = 0 — it is *not* an estimate of ∇KL(q‖p) (the score-function term is missing). verl's
          ``k1`` supervised mode; use "advantage" (or "k2") for a gradient.
``"k2"``  loss ½r², gradient r·∇log q_θ(x). On-policy the gradient is unbiased for ∇KL(q‖p) (it is the REINFORCE
          estimator with reward −r); the value is biased: E[½r²] ≥ ½KL², ≈ KL only when q ≈ p.
``"k3"``  loss e^{−r} − 1 + r ≥ 0 (Schulman's low-variance estimator), gradient (1 − e^{−r})·∇log q_θ(x).
          On-policy the value is unbiased for KL(q‖p) (lower variance than k1 when q ≈ p); the gradient's
          expectation is Σ_x (q − p)∇log q = ∇_θ KL(p‖q): the *forward* KL's gradient, not the reverse one's.
``"advantage"``  the policy-gradient form (Thinking Machines' on-policy distillation; verl
          ``use_policy_gradient``; TRL iw_opd): a detached advantage A = log p(x) − log q_s(x), with q_s the
          given ``sampling_logprobs`` (else the detached current log q_θ(x)), and
            importance_ratio=True (default): loss −A·ρ, ρ = q_θ(x)/q_s(x); gradient −A·ρ·∇log q_θ(x). Its
              expectation over x ~ q_s is E_q[(log q_s − log p)∇log q] = ∇KL(q‖p) − ∇KL(q‖q_s): unbiased for
              ∇KL(q‖p) exactly when q_s = q_θ (the first update on fresh samples), biased by −∇KL(q‖q_s) when stale.
              The value's expectation is KL(q‖p) − KL(q‖q_s) (= KL(q‖p) on-policy). Variance grows with ρ.
            ``clip=(ε_lo, ε_hi)``: PPO's max(−A·ρ, −A·clip(ρ, 1 − ε_lo, 1 + ε_hi)): no gradient where ρ left the
              interval in the advantage's favoured direction — bounded variance, biased whenever it is active.
            importance_ratio=False: loss −A·log q_θ(x) (TRL iw_opd's form; its per-position weights go in as
              ``token_weight``); gradient −A·∇log q_θ(x), expectation E_{q_s}[(log q_s − log p)∇log q]: ∇KL(q‖p)
              on-policy, biased otherwise (no correction for q_s ≠ q_θ).
          Per-position reverse KL only: none of these adds the future-token (sequence-level) terms, as in the
          recipes named above.
"""

from __future__ import annotations

import math

import torch

from fastkd.core import checks as C
from fastkd.core.docs import shared_doc
from fastkd.core.lmhead import FusedHeadFunction, HeadOptions
from fastkd.onpolicy import op as O

ESTIMATORS = ("k1", "k2", "k3", "advantage")


def _check_logprobs(name: str, t: object, lead: tuple[int, ...], device: torch.device) -> torch.Tensor:
    C.check_float_tensor(name, t, min_dim=0)
    C.check_constant(name, t)
    if tuple(t.shape) != lead:
        raise ValueError(f"{name} must have shape {lead} (one log-prob per sampled token, like ids), "
                         f"got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but hidden is on {device}")
    return t


def _clip_bounds(clip: object) -> tuple[float, float] | None:
    if clip is None:
        return None
    lo, hi = (clip, clip) if isinstance(clip, (int, float)) and not isinstance(clip, bool) else tuple(clip)
    C.check_positive("clip", lo)
    C.check_positive("clip", hi)
    if lo >= 1:
        raise ValueError(f"clip's lower epsilon must be < 1 (the ratio's lower bound is 1 − ε), got {lo!r}")
    return float(lo), float(hi)


def token_loss(lq: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None, estimator: str, importance_ratio: bool,
               clip: tuple[float, float] | None) -> torch.Tensor:
    """Per-token loss (c,) from the student's log-prob lq (c,) at the sampled token, the teacher's t and the
    sampling policy's s (or None)."""
    if estimator == "k1":
        return lq - t
    if estimator == "k2":
        return 0.5 * (lq - t) ** 2
    if estimator == "k3":
        r = lq - t
        return torch.expm1(-r) + r
    ls = lq.detach() if s is None else s
    adv = t - ls
    if not importance_ratio:
        return -adv * lq
    ratio = torch.exp(lq - ls)
    loss = -adv * ratio
    if clip is not None:
        loss = torch.maximum(loss, -adv * ratio.clamp(1.0 - clip[0], 1.0 + clip[1]))
    return loss


def token_loss_grad(lq: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None, estimator: str,
                    importance_ratio: bool, clip: tuple[float, float] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(:func:`token_loss`, its derivative in lq) in closed form (the advantage and s are constants)."""
    if estimator == "k1":
        return lq - t, torch.ones_like(lq)
    r = lq - t
    if estimator == "k2":
        return 0.5 * r * r, r
    if estimator == "k3":
        em1 = torch.expm1(-r)
        return em1 + r, -em1
    ls = lq if s is None else s
    adv = t - ls
    if not importance_ratio:
        return -adv * lq, -adv
    ratio = torch.exp(lq - ls)
    loss = -adv * ratio
    if clip is None:
        return loss, loss
    clipped = -adv * ratio.clamp(1.0 - clip[0], 1.0 + clip[1])
    # the clipped branch (strictly larger) has no gradient; at a tie both branches' gradients agree
    return torch.maximum(loss, clipped), torch.where(clipped > loss, 0.0, loss)


# the shared keywords whose meaning here is the shared piece's (fastkd.core.docs); temperature (the student's
# only), chunk_size and backend (no "cuda") are written out
SHARED_KEYWORDS = ("mask", "reduction", "num_items_in_batch")


@shared_doc(*SHARED_KEYWORDS)
def on_policy_distill_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    estimator: str = "advantage",
    sampling_logprobs: torch.Tensor | None = None,
    importance_ratio: bool = True,
    clip: float | tuple[float, float] | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    mask: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Sampled-token reverse-KL distillation loss from hidden states (estimators: the module docstring).

    Args:
        hidden: (..., H); weight: (V, H); bias: (V,) or None — the student's head; all get gradients.
        ids: (...,) the sampled tokens, in [0, V) where kept (checked where value checks run).
        teacher_logprobs: (...,) log p(x) of the teacher at ``ids`` (constant; a served teacher's prompt log-probs).
        estimator: "k1", "k2", "k3" or "advantage" (default).
        sampling_logprobs: (...,) log q_s(x) of the policy that sampled ``ids`` ("advantage" only; default: the
            current student's, detached — on-policy).
        importance_ratio: "advantage": −A·ρ (True) or −A·log q (False, TRL iw_opd).
        clip: "advantage" with the ratio: ε or (ε_lo, ε_hi), PPO clipping of ρ to [1 − ε_lo, 1 + ε_hi].
        temperature: T > 0 for the student only: its log q is log_softmax(softcap(h W.T + b) / T); the teacher's
            log-probs are taken as given. softcap: Gemma-style ``cap·tanh(z/cap)`` of the student's logits.
        token_weight: (...,) float per-token weights (e.g. IW-OPD's position weights), multiplied in after the
            reduction's normalisation; the token mask below is (...,) bool, True = keep.
        {shared}
        chunk_size: tokens per chunk (default: the LM-head engine's memory budget).
        backend: the row math's: "auto" (Triton for CUDA tensors of a float32/bfloat16/float16 head, else torch;
            ``FASTKD_BACKEND`` when "auto"), "torch" or "triton".

    Under ``torch.autocast`` the head's GEMMs run in the autocast dtype (weight / bias gradients accumulated in
    fp32, returned in the parameters' dtype); the row math stays fp32.

    Returns: fp32 scalar (fp64 for fp64 heads), or (...,) for reduction="none" (0 at excluded tokens, times
    ``token_weight`` when given).
    """
    amp = O.check_head(hidden, weight, bias)
    O.check_common(temperature, softcap, chunk_size)
    C.check_choice("estimator", estimator, ESTIMATORS)
    if not isinstance(importance_ratio, bool):
        raise TypeError(f"importance_ratio must be a bool, got {type(importance_ratio).__name__}")
    bounds = _clip_bounds(clip)
    if estimator != "advantage" and (sampling_logprobs is not None or bounds is not None):
        raise ValueError(f"sampling_logprobs and clip belong to estimator='advantage', got estimator={estimator!r}")
    if bounds is not None and not importance_ratio:
        raise ValueError("clip clips the importance ratio; it needs importance_ratio=True")
    lead = tuple(hidden.shape[:-1])
    device = hidden.device
    cdt = O.compute_dtype(hidden.dtype)
    _check_logprobs("teacher_logprobs", teacher_logprobs, lead, device)
    if sampling_logprobs is not None:
        _check_logprobs("sampling_logprobs", sampling_logprobs, lead, device)
    tok_w, _ = C.token_weights(lead, device, labels=None, ignore_index=-100, mask=mask, reduction=reduction,
                               num_items_in_batch=num_items_in_batch, dtype=cdt)
    if token_weight is not None:
        C.check_float_tensor("token_weight", token_weight, min_dim=0)
        C.check_constant("token_weight", token_weight)
        if tuple(token_weight.shape) != lead or token_weight.device != device:
            raise ValueError(f"token_weight must have shape {lead} on {device}, got {tuple(token_weight.shape)} "
                             f"on {token_weight.device}")
        tw = token_weight.reshape(-1).to(cdt)
        keep = (tok_w * tw != 0).reshape(lead)
        # "none": the weight multiplies the returned per-token values (below), so their gradient carries it once
        tok_w = tok_w * tw if reduction != "none" else torch.where(keep.reshape(-1), tok_w, 0.0)
    else:
        keep = (tok_w != 0).reshape(lead) if mask is not None else None
    vocab = weight.shape[0]
    kept_ids = ids if keep is None or not isinstance(ids, torch.Tensor) or tuple(ids.shape) != lead \
        else torch.where(keep.to(ids.device), ids, 0)
    flat, _ = O.check_ids("ids", kept_ids, lead, vocab, device, allow_k=False)
    n = flat.shape[0]
    sid, valid = O.safe_ids(flat, vocab)
    kept = tok_w != 0
    # excluded tokens may carry padding (−inf / NaN teacher values): zero them so that 0 · NaN never reaches a sum
    t = torch.where(kept, teacher_logprobs.reshape(n).to(cdt), 0.0)
    s = None if sampling_logprobs is None else torch.where(kept, sampling_logprobs.reshape(n).to(cdt), 0.0)

    def fn(lq, t_rows, *s_rows):
        loss, g = token_loss_grad(lq[:, 0], t_rows, s_rows[0] if s_rows else None, estimator, importance_ratio,
                                  bounds)
        return loss, {}, g[:, None]

    zdt = amp or weight.dtype
    rb = O.rows_backend(backend, hidden, zdt, O.LOCAL)
    rows = O.chunk_rows(chunk_size, n, vocab, device, rb, zdt, softcap, hidden.is_cuda)
    chunk = O.IdsLossChunk(fn, float(temperature), closed_form=True, backend=rb)
    aux = (sid, valid, t) if s is None else (sid, valid, t, s)
    h = hidden.reshape(n, hidden.shape[-1])
    cap = None if softcap is None else float(softcap)
    head = cap if amp is None else HeadOptions(softcap=cap, dtype=amp)
    loss = FusedHeadFunction.apply(h, weight, bias, tok_w, chunk, rows, reduction, head, *aux)
    if reduction == "none":
        loss = torch.where(kept.reshape(lead), loss.view(lead), 0.0)
        if token_weight is not None:
            loss = loss * token_weight.to(cdt)
    return loss


def iw_opd_weights(advantages: torch.Tensor, mask: torch.Tensor, gamma: float, eps: float = 1e-8) -> torch.Tensor:
    """IW-OPD position weights (B, T): ``1 + γ·(1 − Σ_{s<t}|A_s| / max(Σ_s |A_s|, ε))`` per sequence, 0 where
    masked — the paper's importance weights as TRL computes them, to pass as ``token_weight`` (detached).

    advantages (B, T) = log p − log q_s at the sampled tokens; mask (B, T) bool, True = kept.
    """
    C.check_float_tensor("advantages", advantages, min_dim=2)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != advantages.shape:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(advantages.shape)}")
    C.check_range("gamma", gamma, 0.0, math.inf)
    C.check_positive("eps", eps)
    a = torch.where(mask, advantages.detach(), 0.0).abs()
    prefix = a.cumsum(-1) - a
    total = a.sum(-1, keepdim=True).clamp_min(eps)
    return torch.where(mask, 1.0 + gamma * (1.0 - prefix / total), 0.0)
