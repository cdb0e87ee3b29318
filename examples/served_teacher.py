"""Distill from a teacher that can only score given ids (a served teacher), on a CPU in seconds.

An inference server gives log-probabilities at ids you send it (prompt log-probs) and, at best, its own top-k;
it cannot give the full distribution. Reverse KL / JSD need the teacher's log-probs where the *student* puts
its mass, so each step runs in two phases:

1. Student proposes: ``ids, _ = fastkd.student_topk_from_hidden(h, W, k)`` — the student's k most likely ids per
   token, computed chunk by chunk through the LM-head engine (never an (N, V) logits tensor).
2. Teacher scores: the server returns log p_T at those ids, plus its own top-k ids and log-probs.
3. Loss: ``fastkd.fused_linear_sparse_distill_loss(h, W, teacher_ids, teacher_logprobs, mode="union",
   student_ids=ids, student_id_values=teacher_logprobs_at_ids, divergence="rkl")``: one row per token holding
   the union of both id sets (an id both chose appears once, with the teacher's value), buckets at those ids
   and one tail bucket for the rest of the vocabulary. Without the teacher's own top-k, use
   ``mode="topk_tail"`` with the student's ids and the scored log-probs as the teacher's ids and values.

:class:`ServedTeacher` stands in for the server: a frozen random bigram model whose only methods are
``score(tokens, ids)`` and ``top_logprobs(tokens, k)``.

Run:  python examples/served_teacher.py [--steps 40] [--divergence rkl|fkl|jsd] [--k 16]
"""

from __future__ import annotations

import argparse

import torch

import fastkd

VOCAB, HIDDEN = 512, 32


class ServedTeacher:
    """A teacher behind an API: log-probs at given ids and its own top-k, nothing else."""

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self._emb = torch.randn(VOCAB, HIDDEN, generator=g)
        self._head = torch.randn(VOCAB, HIDDEN, generator=g) * 0.6

    def _logprobs(self, tokens: torch.Tensor) -> torch.Tensor:  # private: a server never ships this
        return torch.log_softmax(self._emb[tokens] @ self._head.T, dim=-1)

    def score(self, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """log p_T(id | token) at each requested id (N, k); −1 (padding) gets −inf."""
        lp = self._logprobs(tokens).gather(-1, ids.clamp_min(0))
        return torch.where(ids >= 0, lp, -torch.inf)

    def top_logprobs(self, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's own k most likely ids and their log-probs (N, k) each."""
        lp, ids = self._logprobs(tokens).topk(k, dim=-1)
        return ids, lp


def main(steps: int = 40, k: int = 16, teacher_k: int = 8, divergence: str = "rkl", seed: int = 0) -> dict:
    """Train a student (embedding + LM head) against :class:`ServedTeacher`; returns the per-step losses."""
    torch.manual_seed(seed)
    teacher = ServedTeacher(seed + 1)
    emb = torch.nn.Embedding(VOCAB, HIDDEN)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    opt = torch.optim.Adam([*emb.parameters(), *head.parameters()], lr=0.05)
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (256,))
        h = emb(tokens)
        # phase 1: the student's ids (no gradient, chunked)
        s_ids, _ = fastkd.student_topk_from_hidden(h, head.weight, k, chunk_size=64)
        # phase 2: what the server returns
        s_scored = teacher.score(tokens, s_ids)
        t_ids, t_lp = teacher.top_logprobs(tokens, teacher_k)
        # phase 3: the union loss on the fused LM head
        loss = fastkd.fused_linear_sparse_distill_loss(
            h, head.weight, t_ids, t_lp, mode="union", student_ids=s_ids, student_id_values=s_scored,
            divergence=divergence,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return {"losses": losses}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--divergence", default="rkl", choices=["fkl", "rkl", "jsd"])
    args = ap.parse_args()
    out = main(steps=args.steps, k=args.k, divergence=args.divergence)
    for i in range(0, len(out["losses"]), max(1, len(out["losses"]) // 8)):
        print(f"step {i:3d}  union {args.divergence} loss {out['losses'][i]:.4f}")
    print(f"final       union {args.divergence} loss {out['losses'][-1]:.4f}")
