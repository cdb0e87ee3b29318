"""On-policy distillation primitives over the LM-head engine.

* :mod:`fastkd.onpolicy.op` — :func:`logprobs_from_hidden`: log-probs at given ids, entropy and top-k, from hidden
  states, chunk by chunk, with gradients (the row math every other module here reuses).
* :mod:`fastkd.onpolicy.estimators` — :func:`on_policy_distill_loss`: the sampled-token reverse-KL objectives
  (k1 / k2 / k3 losses and the detached-advantage policy-gradient form with an importance ratio).
* :mod:`fastkd.onpolicy.frameworks` — framework top-k semantics (verl, TRL) behind
  ``fused_linear_sparse_distill_loss(semantics=...)``.
* :mod:`fastkd.onpolicy.vocab_parallel` — :func:`vocab_parallel_logprobs_from_hidden` for a TP-sharded head.
* :mod:`fastkd.onpolicy.reference` — float64 references of all of the above.
"""
