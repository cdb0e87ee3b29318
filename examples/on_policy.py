"""On-policy distillation of a tiny byte-level language model with fastkd, end to end on a CPU.

The byte-level teacher / student of ``examples/distill_tiny.py`` (imported from it). The teacher is trained on
standard-library source; each student is first warmed up with cross-entropy (the same weights for every method of
a seed), then trained for the same number of steps on the same loss-token budget per step (B prompts × G
positions) by one of:

* ``off-policy KD``   fastkd.fused_linear_distill_loss (forward KL) on data continuations (teacher-forced),
* ``on-policy RKL``   the student samples G bytes after each prompt; the local teacher scores the sampled bytes;
                      fastkd.on_policy_distill_loss(estimator="advantage", sampling_logprobs=...) — the
                      detached per-token reverse-KL advantage with the importance ratio to the sampling policy,
* ``on-policy exact RKL`` the same student samples; the local teacher's full distribution at each sampled
                      position; fastkd.fused_linear_distill_loss(divergence="rkl") — the per-position reverse KL
                      whose gradient the sampled "advantage" estimator estimates (no sampling noise in the loss),
* ``on-policy top-k`` the same student samples, scored by a served-teacher stand-in (``ServedTeacher`` of
                      ``examples/served_teacher.py``, subclassed: it returns only log-probs of given ids and its
                      own top-k); fastkd.fused_linear_sparse_distill_loss(semantics="trl_tail") on its top-k.

Reported per method, mean ± std over seeds: the student's validation perplexity (data) and the teacher's
per-token reverse KL on the student's own samples, KL(q_student ‖ p_teacher) averaged over G sampled positions of
held-out prompts (exact over the 256 bytes) — before (after warm-up) and after training.

Run:  python examples/on_policy.py            (a few minutes on one CPU core)
      python examples/on_policy.py --quick    (smoke test, well under a minute)
      python examples/on_policy.py --json     (also one JSON object on stdout)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_tiny import TinyLM, ce_loss, load_bytes, perplexity, train, windows  # noqa: E402
from served_teacher import ServedTeacher  # noqa: E402

import fastkd  # noqa: E402

METHODS = ("off-policy KD", "on-policy RKL", "on-policy exact RKL", "on-policy top-k")


def config(quick: bool) -> dict:
    if quick:
        return dict(prompt=12, gen=12, bsz=8, t_dim=48, s_dim=24, t_steps=40, warm=10, steps=10, n_bytes=60_000,
                    n_val=32, n_eval=16, k=8, seeds=2, lr=3e-3)
    return dict(prompt=32, gen=32, bsz=16, t_dim=128, s_dim=48, t_steps=400, warm=60, steps=150, n_bytes=400_000,
                n_val=256, n_eval=64, k=16, seeds=2, lr=3e-3)


class ServedTinyTeacher(ServedTeacher):
    """The served-teacher stand-in over a local TinyLM: ``score(seqs, ids)`` and ``top_logprobs(seqs, k)`` of the
    completion positions (after ``prompt`` bytes) only — no full distribution leaves it."""

    def __init__(self, model: TinyLM, prompt: int) -> None:
        self._model, self._prompt = model, prompt

    @torch.no_grad()
    def _logprobs(self, seqs: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self._model(seqs[:, :-1])[:, self._prompt - 1:], dim=-1)


@torch.no_grad()
def sample(model: TinyLM, prompts: torch.Tensor, gen: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt + G sampled bytes (B, P + G), the sampling log-probs of the sampled bytes (B, G))."""
    model.eval()
    seq, logps = prompts, []
    for _ in range(gen):
        logq = torch.log_softmax(model(seq)[:, -1], -1)
        x = torch.multinomial(logq.exp(), 1, generator=g)
        logps.append(logq.gather(1, x))
        seq = torch.cat([seq, x], 1)
    model.train()
    return seq, torch.cat(logps, 1)


@torch.no_grad()
def reverse_kl_on_samples(student: TinyLM, teacher: TinyLM, prompts: torch.Tensor, gen: int, seed: int) -> float:
    """Mean over G positions of the student's own samples of KL(q_student ‖ p_teacher), exact over the bytes."""
    seq, _ = sample(student, prompts, gen, torch.Generator().manual_seed(seed))
    p = prompts.shape[1]
    logq = torch.log_softmax(student(seq[:, :-1])[:, p - 1:], -1)
    logp = torch.log_softmax(teacher(seq[:, :-1])[:, p - 1:], -1)
    return float((logq.exp() * (logq - logp)).sum(-1).mean())


def run(quick: bool, threads: int) -> dict:
    cfg = config(quick)
    torch.set_num_threads(max(1, threads))
    t_start = time.perf_counter()
    torch.manual_seed(0)
    p, gl, bsz = cfg["prompt"], cfg["gen"], cfg["bsz"]
    ctx = p + gl
    data = load_bytes(cfg["n_bytes"])
    split = int(0.9 * data.numel())
    gen = torch.Generator().manual_seed(1)
    val = windows(data[split:], cfg["n_val"], ctx, gen)
    eval_prompts = windows(data[split:], cfg["n_eval"], ctx, gen)[:, :p]
    teacher = TinyLM(256, cfg["t_dim"], 2, ctx + 1)
    train(teacher, [windows(data[:split], bsz, ctx, gen) for _ in range(cfg["t_steps"])], ce_loss, cfg["lr"])
    teacher.eval().requires_grad_(False)
    served = ServedTinyTeacher(teacher, p)
    wt = teacher.lm_head.weight
    warm_batches = [windows(data[:split], bsz, ctx, gen) for _ in range(cfg["warm"])]
    batches = [windows(data[:split], bsz, ctx, gen) for _ in range(cfg["steps"])]

    def off_policy(m: TinyLM, b: torch.Tensor, _g) -> torch.Tensor:
        h = m.hidden(b[:, :-1])[:, p - 1:]
        ht = teacher.hidden(b[:, :-1])[:, p - 1:]
        return fastkd.fused_linear_distill_loss(h, m.lm_head.weight, ht, wt, divergence="fkl")

    def on_policy_rkl(m: TinyLM, b: torch.Tensor, g) -> torch.Tensor:
        seq, logq_s = sample(m, b[:, :p], gl, g)
        ids = seq[:, p:]
        t_lp = torch.log_softmax(teacher(seq[:, :-1])[:, p - 1:], -1).gather(-1, ids[..., None])[..., 0]
        h = m.hidden(seq[:, :-1])[:, p - 1:]
        return fastkd.on_policy_distill_loss(h, m.lm_head.weight, ids, t_lp, estimator="advantage",
                                             sampling_logprobs=logq_s)

    def on_policy_exact_rkl(m: TinyLM, b: torch.Tensor, g) -> torch.Tensor:
        seq, _ = sample(m, b[:, :p], gl, g)
        h = m.hidden(seq[:, :-1])[:, p - 1:]
        ht = teacher.hidden(seq[:, :-1])[:, p - 1:]
        return fastkd.fused_linear_distill_loss(h, m.lm_head.weight, ht, wt, divergence="rkl")

    def on_policy_topk(m: TinyLM, b: torch.Tensor, g) -> torch.Tensor:
        seq, _ = sample(m, b[:, :p], gl, g)
        t_ids, t_lp = served.top_logprobs(seq, cfg["k"])
        h = m.hidden(seq[:, :-1])[:, p - 1:]
        return fastkd.fused_linear_sparse_distill_loss(h, m.lm_head.weight, t_ids, t_lp, semantics="trl_tail")

    fns = dict(zip(METHODS, (off_policy, on_policy_rkl, on_policy_exact_rkl, on_policy_topk), strict=True))
    res: dict[str, dict[str, list[float]]] = {m: {"ppl": [], "rkl": []} for m in ("warm-up (before)", *METHODS)}
    for seed in range(cfg["seeds"]):
        torch.manual_seed(1000 + seed)
        base = TinyLM(256, cfg["s_dim"], 1, ctx + 1)
        train(base, warm_batches, ce_loss, cfg["lr"])
        res["warm-up (before)"]["ppl"].append(perplexity(base, val))
        res["warm-up (before)"]["rkl"].append(reverse_kl_on_samples(base, teacher, eval_prompts, gl, 99))
        for name, fn in fns.items():
            m = TinyLM(256, cfg["s_dim"], 1, ctx + 1)
            m.load_state_dict(base.state_dict())
            g = torch.Generator().manual_seed(2000 + seed)
            opt = torch.optim.AdamW(m.parameters(), lr=cfg["lr"], weight_decay=0.0)
            for b in batches:
                opt.zero_grad(set_to_none=True)
                fn(m, b, g).backward()
                opt.step()
            res[name]["ppl"].append(perplexity(m, val))
            res[name]["rkl"].append(reverse_kl_on_samples(m, teacher, eval_prompts, gl, 99))
            print(f"  seed {seed} {name:<16} val ppl {res[name]['ppl'][-1]:.3f}  teacher RKL on samples "
                  f"{res[name]['rkl'][-1]:.4f}  (elapsed {time.perf_counter() - t_start:.0f} s)", file=sys.stderr,
                  flush=True)
    return {"config": cfg, "teacher_ppl": perplexity(teacher, val), "results": res,
            "wall_s": time.perf_counter() - t_start}


def _ms(xs: list[float]) -> str:
    t = torch.tensor(xs, dtype=torch.float64)
    return f"{float(t.mean()):.3f} ± {float(t.std()) if len(xs) > 1 else 0.0:.3f}"


def print_table(r: dict) -> None:
    cfg = r["config"]
    print(f"teacher val ppl {r['teacher_ppl']:.3f}; {cfg['seeds']} seeds; {cfg['steps']} steps × {cfg['bsz']} prompts "
          f"× {cfg['gen']} loss tokens per method (after {cfg['warm']} CE warm-up steps); wall {r['wall_s']:.0f} s")
    print("| student | val ppl (lower is better) | teacher RKL on student samples (nats/token) |")
    print("|---|---|---|")
    for name, v in r["results"].items():
        print(f"| {name} | {_ms(v['ppl'])} | {_ms(v['rkl'])} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--json", action="store_true", help="also print one JSON object (last line of stdout)")
    a = ap.parse_args()
    r = run(a.quick, a.threads)
    print_table(r)
    if a.json:
        print(json.dumps(r))
    assert all(math.isfinite(x) for v in r["results"].values() for xs in v.values() for x in xs)


if __name__ == "__main__":
    main()
