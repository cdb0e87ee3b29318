"""Distill a tiny byte-level language model with fastkd, end to end on a CPU.

1. Train a teacher (a small causal transformer) on Python's own standard-library source code, tokenised
   as bytes (V = 256).
2. Distill smaller students from it, each for the same number of steps on the same windows:
   - ``ce``      cross-entropy only (the baseline),
   - ``fused``   fastkd.fused_linear_distill_loss (forward KL + CE from hidden states and LM heads),
   - ``sparse``  offline: the teacher's top-k log-probs (+ tail mass) written to a fastkd.cache.TeacherCache,
                 then fastkd.fused_linear_sparse_distill_loss (the teacher is not run while training),
   - ``uld``     cross-tokenizer: a second teacher trained on a *different* tokenizer (the same byte
                 segmentation, but a shuffled, larger id space of 320 entries), distilled with
                 fastkd.uld_loss, which compares sorted probabilities and so needs no vocabulary mapping.
3. Print validation perplexity per student, wall time, and the peak extra memory (fresh process, peak RSS)
   of one loss forward+backward fused vs unfused (logits → log_softmax → kl_div), at this example's shape
   and at a 32k vocabulary.

Run:  python examples/distill_tiny.py            (about 2–3 minutes on one CPU core)
      python examples/distill_tiny.py --quick    (smoke test, well under a minute)
      python examples/distill_tiny.py --hf-memory fused|logits   (one HF Trainer step's peak memory at V=32000)
      python examples/distill_tiny.py --sparse-study [--json] [--temperature T] [--quick]
          quality per byte of sparse teacher targets: students trained on CE only, dense fused KD, and each
          sparse cache mode (topk, topk_tail, sampled) at K ∈ {4, 8, 16, 32} slots, over 3 seeds, with the
          same teacher, windows and steps; a table of val ppl (mean ± std), cache bytes/token and the fraction
          of dense KD's improvement over CE each recovers (about 10 minutes on an idle 2-core CPU; results
          and the chosen default in docs/sparse.md). --json: one JSON object on stdout, the table on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fastkd

# ---------------------------------------------------------------------------------------------------------
# data: bytes of stdlib sources
# ---------------------------------------------------------------------------------------------------------
_FILES = ("inspect.py", "argparse.py", "typing.py", "dataclasses.py", "functools.py", "pathlib.py",
          "textwrap.py", "string.py", "enum.py", "tempfile.py")


def load_bytes(limit: int) -> torch.Tensor:
    """Up to ``limit`` bytes of standard-library source code as int64 token ids in [0, 256)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    data = bytearray()
    for name in _FILES:
        path = root / name
        if path.exists():
            data += path.read_bytes()
        if len(data) >= limit:
            break
    if len(data) < 10_000:
        raise RuntimeError(f"found too little standard-library source under {root}")
    return torch.tensor(list(data[:limit]), dtype=torch.long)


def windows(data: torch.Tensor, n: int, ctx: int, gen: torch.Generator) -> torch.Tensor:
    """n random windows (n, ctx + 1) of the byte stream."""
    starts = torch.randint(0, data.numel() - ctx - 1, (n,), generator=gen)
    return torch.stack([data[s: s + ctx + 1] for s in starts.tolist()])


# ---------------------------------------------------------------------------------------------------------
# a tiny causal transformer that exposes its hidden states and LM head
# ---------------------------------------------------------------------------------------------------------
class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, ctx: int, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(ctx, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids → (B, T, dim) final hidden states."""
        t = ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        return self.norm(self.body(self.embed(ids) + self.pos[:t], mask=mask, is_causal=True))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden(ids))


def ce_loss(model: TinyLM, batch: torch.Tensor, id_map: torch.Tensor | None = None) -> torch.Tensor:
    x, y = batch[:, :-1], batch[:, 1:]
    if id_map is not None:
        x, y = id_map[x], id_map[y]
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def perplexity(model: TinyLM, val: torch.Tensor) -> float:
    model.eval()
    loss = sum(ce_loss(model, val[i: i + 64]).item() * len(val[i: i + 64]) for i in range(0, len(val), 64))
    model.train()
    return math.exp(loss / len(val))


def train(model: TinyLM, batches: list[torch.Tensor], loss_fn, lr: float) -> float:
    """Adam over the given batches; returns wall seconds."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    t0 = time.perf_counter()
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        opt.step()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------
# peak memory of one loss step, measured in a fresh process
# ---------------------------------------------------------------------------------------------------------
def _measure(kind: str, n: int, h: int, v: int) -> None:
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(n, h, generator=g, requires_grad=True)
    ws = (torch.randn(v, h, generator=g) * 0.1).requires_grad_()
    ht, wt = torch.randn(n, 2 * h, generator=g), torch.randn(v, 2 * h, generator=g) * 0.1
    # warm up on a tiny problem so that imports and first-call setup are not counted
    fastkd.fused_linear_distill_loss(hs[:4], ws, ht[:4], wt).backward()
    ws.grad = hs.grad = None
    def step() -> None:
        if kind == "fused":
            loss = fastkd.fused_linear_distill_loss(hs, ws, ht, wt, divergence="fkl")
        else:
            ls, lt = hs @ ws.t(), ht @ wt.t()
            loss = F.kl_div(F.log_softmax(ls, -1), F.log_softmax(lt, -1), log_target=True,
                            reduction="batchmean")
        loss.backward()

    base = _rss_reset_peak()
    step()  # the first full-size step: its peak RSS is the memory figure
    peak = _peak_rss()
    ws.grad = hs.grad = None
    t0 = time.perf_counter()
    step()  # a second, warm step: the time figure
    dt = time.perf_counter() - t0
    print(f"{max(peak - base, 0) / 2**20:.1f} {dt:.3f}")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss_reset_peak() -> int:
    """Current RSS in bytes, after resetting the kernel's peak-RSS mark (VmHWM) to it (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def _peak_rss() -> int:
    """Peak RSS in bytes since the last reset."""
    return _status_kib("VmHWM") * 1024


def measure(kind: str, n: int, h: int, v: int, threads: int) -> tuple[float, float]:
    """(peak extra MiB, seconds) of one fwd+bwd of the loss, in a fresh Python process."""
    out = subprocess.run([sys.executable, __file__, "--threads", str(threads), "--measure", kind, str(n), str(h),
                          str(v)],
                         capture_output=True, text=True, check=True)
    mib, sec = out.stdout.split()[-2:]
    return float(mib), float(sec)


def hf_trainer_memory(kind: str, vocab: int = 32000, bsz: int = 8, seq: int = 256) -> None:
    """One training step of fastkd's DistillationTrainer ("fused") or of a plain Trainer whose loss is
    logits → log_softmax → kl_div ("logits"), tiny random Llamas (student 64×2, teacher 128×2 hidden×layers);
    prints the peak extra RSS of the step and its wall time. Needs transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from fastkd.integrations.hf import DistillationTrainer

    def llama(h: int, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=seq, tie_word_embeddings=False))

    student, teacher = llama(64, 0), llama(128, 1).eval().requires_grad_(False)

    class LogitsKD(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ls = model(input_ids=inputs["input_ids"]).logits[:, :-1]
            with torch.no_grad():
                lt = teacher(input_ids=inputs["input_ids"]).logits[:, :-1]
            keep = inputs["labels"][:, 1:] != -100
            kl = F.kl_div(F.log_softmax(ls, -1), F.log_softmax(lt, -1), log_target=True, reduction="none")
            return (kl.sum(-1) * keep).sum() / keep.sum()

    ids = torch.randint(0, vocab, (bsz, seq), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, save_strategy="no",
                             max_steps=1, per_device_train_batch_size=bsz, disable_tqdm=True, optim="sgd")
    tr = (DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows)
          if kind == "fused" else LogitsKD(model=student, args=args, train_dataset=rows))
    small = {k: v[None, :8] for k, v in rows[0].items()}
    tr.compute_loss(student, small).backward()  # warm-up: first-call imports and setup are not counted
    student.zero_grad()
    base = _rss_reset_peak()
    t0 = time.perf_counter()
    tr.train()
    dt = time.perf_counter() - t0
    print(f"{kind}: one Trainer step at B={bsz}, T={seq}, V={vocab}: peak extra "
          f"{(_peak_rss() - base) / 2**20:.0f} MiB, {dt:.2f} s")


# ---------------------------------------------------------------------------------------------------------
# --sparse-study: distillation quality per byte of stored teacher targets
# ---------------------------------------------------------------------------------------------------------
STUDY_MODES = ("topk", "topk_tail", "sampled")


def _study_config(quick: bool) -> dict:
    """Sizes of the study (full: about 10 minutes on an idle 2-core CPU; quick: a CI smoke run)."""
    if quick:
        return dict(ctx=32, bsz=8, t_dim=48, s_dim=24, t_steps=40, s_steps=12, n_bytes=60_000, n_val=32,
                    ks=(4, 16), seeds=2)
    return dict(ctx=64, bsz=32, t_dim=128, s_dim=48, t_steps=400, s_steps=300, n_bytes=400_000, n_val=256,
                ks=(4, 8, 16, 32), seeds=3)


def _counts(draws: torch.Tensor, v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, S) draws → distinct ids (N, S) (−1 padding) and their counts (N, S) int32, as a sampled cache stores."""
    one = torch.ones_like(draws, dtype=torch.int32)
    c = torch.zeros(draws.shape[0], v, dtype=torch.int32).scatter_add_(1, draws, one)
    top = c.topk(draws.shape[1], -1)
    return torch.where(top.values > 0, top.indices, -1), top.values


def _build_caches(tmp: Path, t_hidden: list[torch.Tensor], wt: torch.Tensor, ks: tuple[int, ...], seeds: int,
                  temperature: float) -> tuple[dict[tuple, list[tuple]], dict[tuple, float], dict[int, float]]:
    """Write every TeacherCache of the study in one pass over the teacher's hidden states, read them back.

    Per K: "topk" (top-K log-probs of softmax(z / T), no tail), "topk_tail" (the same + the exact log tail
    mass), and per seed "sampled" (K draws from softmax(z / T) with replacement: distinct ids + uint8 counts).
    One example per batch of windows (B·T tokens); no input_ids, so bytes/token counts the targets only.
    The top-max(K) and max(K) draws are computed once per batch: the top-K are its first K columns (sorted),
    the tail of K adds the dropped columns' mass to the stored tail, and K draws are the first K of them.
    Returns targets[(mode, K, seed)] = per batch (ids (B, T, K), values (B, T, K), tail (B, T) | None)
    (seed None for the deterministic top-k modes), bytes_per_token[(mode, K)] and the teacher's mean mass
    outside its top K, tail_mass[K] (how much a renormalised top-K target inflates the K kept entries).
    """
    from fastkd.cache import TeacherCache, topk_from_hidden

    kmax, v = max(ks), wt.shape[0]
    keys = [(m, k, None) for m in ("topk", "topk_tail") for k in ks] + [("sampled", k, s) for s in range(seeds)
                                                                          for k in ks]
    gens = [torch.Generator().manual_seed(10_000 + s) for s in range(seeds)]
    writers = {key: TeacherCache.create(tmp / "-".join(map(str, key)), vocab_size=v, k=key[1],
                                        values="counts" if key[0] == "sampled" else "logprobs",
                                        store_tail=key[0] == "topk_tail") for key in keys}
    tail_mass: dict[int, float] = {}
    n_tokens = sum(hb.shape[0] * hb.shape[1] for hb in t_hidden)
    for hb in t_hidden:
        h = hb.reshape(-1, hb.shape[-1])
        ids, logp, tail = topk_from_hidden(h, wt, k=kmax, temperature=temperature)
        probs = torch.softmax(h @ wt.t() / temperature, -1)
        draws = [torch.multinomial(probs, kmax, replacement=True, generator=g) for g in gens]
        for mode, k, seed in keys:
            if mode == "sampled":
                writers[(mode, k, seed)].add(*_counts(draws[seed][:, :k], v))
            else:  # mass outside the top K = stored tail + the top-kmax entries beyond K
                tail_k = torch.logsumexp(torch.cat([tail[:, None], logp[:, k:]], 1), 1)
                if mode == "topk_tail":
                    tail_mass[k] = tail_mass.get(k, 0.0) + float(tail_k.exp().sum()) / n_tokens
                writers[(mode, k, seed)].add(ids[:, :k], logp[:, :k], tail_k if mode == "topk_tail" else None)
    targets, bpt = {}, {}
    for key, w in writers.items():
        w.close()
        cache = TeacherCache(w.path)
        bpt[key[:2]] = cache.bytes_per_token()
        out = []
        for i, hb in enumerate(t_hidden):
            e, lead = cache[i], hb.shape[:2]
            tail = e["teacher_tail"].view(lead) if key[0] == "topk_tail" else None
            out.append((e["teacher_ids"].view(*lead, -1), e["teacher_values"].view(*lead, -1), tail))
        targets[key] = out
    return targets, bpt, tail_mass


def _grad_error(m: TinyLM, batches: list[torch.Tensor], t_hidden: list[torch.Tensor], wt: torch.Tensor,
                targets: list[tuple], mode: str, temperature: float) -> float:
    """Σ‖g_sparse − g_dense‖² / Σ‖g_dense‖² of the KD loss's gradient w.r.t. the student's parameters, per batch.

    g_dense: the full forward-KL loss at T from the teacher's hidden states; g_sparse: the same loss from the
    stored targets (both mean over the batch's tokens, × T², no CE). For top-k it is the squared bias of a
    step, for sampled (unbiased) the variance of one batch's draws, both relative to the dense step.
    """
    params = [p for p in m.parameters() if p.requires_grad]
    values = "counts" if mode == "sampled" else "logprobs"
    kw = dict(temperature=temperature, scale_by_t2=True)
    num = den = 0.0
    for b, ht, (ids, vals, tail) in zip(batches, t_hidden, targets, strict=False):
        h = m.hidden(b[:, :-1])
        gd = torch.autograd.grad(fastkd.fused_linear_distill_loss(h, m.lm_head.weight, ht, wt, divergence="fkl",
                                                                  **kw), params, retain_graph=True)
        gs = torch.autograd.grad(fastkd.fused_linear_sparse_distill_loss(
            h, m.lm_head.weight, ids, vals, teacher_tail=tail, mode=mode, values=values, **kw), params)
        num += sum(float((x - y).square().sum()) for x, y in zip(gs, gd, strict=True))
        den += sum(float(y.square().sum()) for y in gd)
    return num / den


def sparse_study(quick: bool, temperature: float, as_json: bool) -> dict:
    """Train students on CE, dense fused KD and every sparse mode × K over several seeds; see the module doc.

    All students of one seed share the initial weights; every student sees the same windows in the same
    order for the same steps; the loss is KD (fkl, temperature T, × T²) + CE (weight 1) for every KD student.
    """
    cfg = _study_config(quick)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    ctx, bsz = cfg["ctx"], cfg["bsz"]
    data = load_bytes(cfg["n_bytes"])
    split = int(0.9 * data.numel())
    gen = torch.Generator().manual_seed(1)
    val = windows(data[split:], cfg["n_val"], ctx, gen)
    teacher_batches = [windows(data[:split], bsz, ctx, gen) for _ in range(cfg["t_steps"])]
    batches = [windows(data[:split], bsz, ctx, gen) for _ in range(cfg["s_steps"])]
    teacher = TinyLM(256, cfg["t_dim"], 2, ctx)
    train(teacher, teacher_batches, ce_loss, 3e-3)
    teacher.eval().requires_grad_(False)
    t_ppl = perplexity(teacher, val)
    with torch.no_grad():  # the teacher's hidden states of every student window, computed once
        t_hidden = [teacher.hidden(b[:, :-1]) for b in batches]
    wt = teacher.lm_head.weight
    t_teacher = time.perf_counter() - t_start

    def student(seed: int) -> TinyLM:
        torch.manual_seed(1000 + seed)
        return TinyLM(256, cfg["s_dim"], 1, ctx)

    def ce_only(m: TinyLM, item: tuple) -> torch.Tensor:
        return ce_loss(m, item[0])

    def dense(m: TinyLM, item: tuple) -> torch.Tensor:
        b, ht = item
        return fastkd.fused_linear_distill_loss(m.hidden(b[:, :-1]), m.lm_head.weight, ht, wt, divergence="fkl",
                                                temperature=temperature, scale_by_t2=True, labels=b[:, 1:],
                                                ce_weight=1.0)

    def sparse(mode: str):
        values = {"topk": "logprobs", "topk_tail": "logprobs", "sampled": "counts"}[mode]

        def loss(m: TinyLM, item: tuple) -> torch.Tensor:
            b, (ids, vals, tail) = item
            h = m.hidden(b[:, :-1])
            kd = fastkd.fused_linear_sparse_distill_loss(h, m.lm_head.weight, ids, vals, teacher_tail=tail,
                                                         mode=mode, values=values, temperature=temperature,
                                                         scale_by_t2=True)
            return kd + F.cross_entropy(m.lm_head(h).reshape(-1, 256), b[:, 1:].reshape(-1))

        return loss

    ppl: dict[tuple[str, int], list[float]] = {}
    t_train = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        targets, bpt, tail_mass = _build_caches(Path(tmp), t_hidden, wt, cfg["ks"], cfg["seeds"], temperature)
        t_cache = time.perf_counter() - t0
    for seed in range(cfg["seeds"]):
        runs = [(("ce", 0), ce_only, [(b,) for b in batches]),
                (("dense", 0), dense, list(zip(batches, t_hidden, strict=True)))]
        for mode in STUDY_MODES:
            for k in cfg["ks"]:
                tg = targets[(mode, k, seed if mode == "sampled" else None)]
                runs.append(((mode, k), sparse(mode), list(zip(batches, tg, strict=True))))
        for key, fn, items in runs:
            m = student(seed)
            sec = train(m, items, fn, 3e-3)
            t_train += sec
            ppl.setdefault(key, []).append(perplexity(m, val))
            if seed == 0 and key[0] == "ce":
                s_ce = m
            print(f"  seed {seed} {key[0]:<9} K={key[1]:<2} val ppl {ppl[key][-1]:.3f}  train {sec:.1f} s "
                  f"(elapsed {time.perf_counter() - t_start:.0f} s)", file=sys.stderr, flush=True)

    def mean_std(xs: list[float]) -> tuple[float, float]:
        t = torch.tensor(xs, dtype=torch.float64)
        return float(t.mean()), float(t.std()) if len(xs) > 1 else 0.0

    ce, ce_sd = mean_std(ppl[("ce", 0)])
    dn, dn_sd = mean_std(ppl[("dense", 0)])
    gain = ce - dn
    rows = []
    for mode in STUDY_MODES:
        for k in cfg["ks"]:
            mu, sd = mean_std(ppl[(mode, k)])
            err = _grad_error(s_ce, batches[:4], t_hidden[:4], wt, targets[(mode, k, 0 if mode == "sampled" else None)],
                              mode, temperature)
            # paired: the fraction per seed (same initial weights for CE, dense and this student), then mean ± std
            pm, psd = mean_std([(c - x) / (c - d) for c, d, x in zip(ppl[("ce", 0)], ppl[("dense", 0)],
                                                                      ppl[(mode, k)], strict=True)])
            rows.append({"mode": mode, "k": k, "bytes_per_token": round(bpt[(mode, k)], 2), "ppl": mu,
                         "ppl_std": sd, "recovered": (ce - mu) / gain if gain > 0 else float("nan"),
                         "recovered_paired": pm, "recovered_paired_std": psd, "grad_rel_err": err})
    result = {"ce": ce, "dense": dn, "sparse": rows, "ce_std": ce_sd, "dense_std": dn_sd, "teacher": t_ppl,
              "teacher_tail_mass": {str(k): m for k, m in tail_mass.items()},
              "temperature": temperature, "config": cfg, "wall_s": {
                  "total": time.perf_counter() - t_start, "teacher": t_teacher, "caches": t_cache,
                  "students": t_train}}
    if as_json:
        print(json.dumps(result))
    print_study(result, sys.stderr if as_json else sys.stdout)
    return result


def print_study(r: dict, file=sys.stdout) -> None:
    """The study's table (a Markdown pipe table, readable as is) from :func:`sparse_study`'s result."""
    cfg, w = r["config"], r["wall_s"]
    out = [f"sparse study: byte-level LM, teacher dim {cfg['t_dim']}×2 layers (val ppl {r['teacher']:.3f}), students "
           f"dim {cfg['s_dim']}×1, context {cfg['ctx']}, batch {cfg['bsz']}, {cfg['s_steps']} steps, "
           f"{cfg['seeds']} seeds; KD = fkl at T={r['temperature']:g} (× T²) + CE (weight 1)",
           "val perplexity: mean ± std over seeds, lower is better; recovered = (ppl_CE − ppl) / (ppl_CE − "
           "ppl_dense) of the mean ppl; per seed: the same fraction per seed (paired), mean ± std",
           "grad rel. err = ‖g_sparse − g_dense‖² / ‖g_dense‖² of the KD loss's gradient w.r.t. the student's "
           "parameters on 4 training batches, at the seed-0 CE student (top-k: squared bias; sampled: one "
           "batch's sampling variance)", "",
           "| student | K | cache B/token | val ppl | recovered | per seed | grad rel. err |",
           "|---|---:|---:|---:|---:|---:|---:|",
           f"| CE only | | 0 | {r['ce']:.3f} ± {r['ce_std']:.3f} | 0% | | |",
           f"| dense fused KD (teacher online) | | | {r['dense']:.3f} ± {r['dense_std']:.3f} | 100% | | 0 |"]
    out += [f"| sparse {x['mode']} | {x['k']} | {x['bytes_per_token']:.1f} | {x['ppl']:.3f} ± {x['ppl_std']:.3f} | "
            f"{x['recovered']:.0%} | {x['recovered_paired']:.0%} ± {x['recovered_paired_std']:.0%} | "
            f"{x['grad_rel_err']:.3f} |" for x in r["sparse"]]
    out.append("\nthe teacher's mean probability mass outside its top K at this T: " + ", ".join(
        f"K={k} {m:.3f}" for k, m in r["teacher_tail_mass"].items()))
    out.append(f"\nwall {w['total']:.0f} s: teacher {w['teacher']:.0f} s, caches {w['caches']:.0f} s, "
               f"student training {w['students']:.0f} s")
    print("\n".join(out), file=file)


# ---------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: tiny ops gain nothing from more, and OpenMP spin-waiting "
                         "makes them far slower on a busy machine)")
    ap.add_argument("--hf-memory", choices=("fused", "logits"),
                    help="instead: peak memory of one HF Trainer step, DistillationTrainer vs logits KD")
    ap.add_argument("--sparse-study", action="store_true",
                    help="instead: CE vs dense KD vs sparse caches (topk / topk_tail / sampled, several K), seeds")
    ap.add_argument("--json", action="store_true", help="--sparse-study: print one JSON object")
    ap.add_argument("--temperature", type=float, default=2.0, help="--sparse-study: KD temperature")
    ap.add_argument("--measure", nargs=4, metavar=("KIND", "N", "H", "V"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.hf_memory:
        torch.set_num_threads(max(1, a.threads))
        hf_trainer_memory(a.hf_memory)
        return
    if a.measure:
        torch.set_num_threads(max(1, a.threads))
        _measure(a.measure[0], *map(int, a.measure[1:]))
        return
    if a.sparse_study:
        torch.set_num_threads(max(1, a.threads))
        sparse_study(a.quick, a.temperature, a.json)
        return
    torch.manual_seed(0)
    torch.set_num_threads(max(1, a.threads))
    ctx, bsz = (32, 16) if a.quick else (64, 32)
    t_steps, s_steps = (30, 20) if a.quick else (400, 300)
    data = load_bytes(60_000 if a.quick else 400_000)
    split = int(0.9 * data.numel())
    gen = torch.Generator().manual_seed(1)
    val = windows(data[split:], 64 if a.quick else 256, ctx, gen)
    teacher_batches = [windows(data[:split], bsz, ctx, gen) for _ in range(t_steps)]
    student_batches = [windows(data[:split], bsz, ctx, gen) for _ in range(s_steps)]
    t_dim, s_dim = (64, 32) if a.quick else (128, 48)
    rows = []

    # 1. teachers: bytes, and a different tokenizer (a shuffled id space of 320) for ULD
    teacher = TinyLM(256, t_dim, 2, ctx)
    t_time = train(teacher, teacher_batches, ce_loss, 3e-3)
    teacher.eval().requires_grad_(False)
    rows.append(("teacher (bytes)", perplexity(teacher, val), t_time))
    id_map = torch.randperm(320, generator=torch.Generator().manual_seed(7))[:256]  # byte → id in [0, 320)
    has_uld = hasattr(fastkd, "uld_loss") and _importable("fastkd.ot.losses")
    if has_uld:
        teacher_b = TinyLM(320, t_dim, 2, ctx)
        tb_time = train(teacher_b, teacher_batches, lambda m, b: ce_loss(m, b, id_map), 3e-3)
        teacher_b.eval().requires_grad_(False)
        with torch.no_grad():  # its perplexity on the same bytes (ids mapped)
            ppl_b = math.exp(sum(ce_loss(teacher_b, val[i: i + 64], id_map).item() * len(val[i: i + 64])
                                 for i in range(0, len(val), 64)) / len(val))
        rows.append(("teacher (320-id tokenizer)", ppl_b, tb_time))

    def student() -> TinyLM:
        torch.manual_seed(3)
        return TinyLM(256, s_dim, 1, ctx)

    # 2a. CE-only baseline
    s_ce = student()
    wall = train(s_ce, student_batches, ce_loss, 3e-3)
    rows.append(("student: CE only", perplexity(s_ce, val), wall))

    # 2b. fused dense distillation: KD(fkl, T=2) + CE, from hidden states and LM heads
    def fused_loss(m: TinyLM, b: torch.Tensor) -> torch.Tensor:
        x, y = b[:, :-1], b[:, 1:]
        with torch.no_grad():
            ht = teacher.hidden(x)
        return fastkd.fused_linear_distill_loss(m.hidden(x), m.lm_head.weight, ht, teacher.lm_head.weight,
                                                divergence="fkl", temperature=2.0, scale_by_t2=True,
                                                labels=y, ce_weight=1.0)

    s_f = student()
    wall = train(s_f, student_batches, fused_loss, 3e-3)
    rows.append(("student: fastkd fused KD+CE", perplexity(s_f, val), wall))

    # 2c. offline sparse: top-k teacher cache, then the fused sparse loss (+ CE)
    if _importable("fastkd.cache"):
        from fastkd.cache import TeacherCache

        k = 8
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            with TeacherCache.create(Path(tmp) / "c", vocab_size=256, k=k, values="logprobs") as w, \
                    torch.no_grad():
                for b in student_batches:
                    hb = teacher.hidden(b[:, :-1])
                    for row, h in zip(b, hb, strict=True):
                        w.add_from_hidden(h, teacher.lm_head.weight, temperature=2.0, input_ids=row[:-1])
            cache = TeacherCache(Path(tmp) / "c")
            cache_time = time.perf_counter() - t0
            cached = iter(range(len(cache)))

            def sparse_loss(m: TinyLM, b: torch.Tensor) -> torch.Tensor:
                ex = [cache[next(cached)] for _ in range(len(b))]
                ids = torch.stack([e["teacher_ids"] for e in ex])
                vals = torch.stack([e["teacher_values"] for e in ex])
                tail = torch.stack([e["teacher_tail"] for e in ex])
                x, y = b[:, :-1], b[:, 1:]
                h = m.hidden(x)
                kd = fastkd.fused_linear_sparse_distill_loss(
                    h, m.lm_head.weight, ids, vals, teacher_tail=tail, mode="topk_tail", values="logprobs",
                    temperature=2.0, scale_by_t2=True)
                ce = F.cross_entropy(m.lm_head(h).reshape(-1, 256), y.reshape(-1))
                return kd + ce

            s_s = student()
            wall = train(s_s, student_batches, sparse_loss, 3e-3)
            rows.append((f"student: fastkd sparse top-{k} cache (+{cache_time:.0f}s to build, "
                         f"{cache.bytes_per_token():.0f} B/token)", perplexity(s_s, val), wall))

    # 2d. cross-tokenizer ULD from the 320-id teacher
    if has_uld:
        def uld(m: TinyLM, b: torch.Tensor) -> torch.Tensor:
            x, y = b[:, :-1], b[:, 1:]
            with torch.no_grad():
                lt = teacher_b(id_map[x])
            ls = m(x)
            return fastkd.uld_loss(ls, lt, temperature=1.0) + F.cross_entropy(ls.reshape(-1, 256), y.reshape(-1))

        s_u = student()
        wall = train(s_u, student_batches, uld, 3e-3)
        rows.append(("student: fastkd ULD (teacher tokenizer 320 ids) + CE", perplexity(s_u, val), wall))

    print(f"\nbyte-level LM on stdlib sources: teacher dim {t_dim}×2 layers, students dim {s_dim}×1 layer, "
          f"context {ctx}, batch {bsz}, {s_steps} student steps\n")
    print(f"{'model (val ppl = held-out perplexity, lower is better)':<72} {'val ppl':>8} {'train s':>8}")
    for name, ppl, sec in rows:
        print(f"{name:<72} {ppl:>8.3f} {sec:>8.1f}")

    n_ex = bsz * ctx
    shapes = [(n_ex, s_dim, 256)] + ([] if a.quick else [(2048, 64, 32000)])
    print("\none loss forward+backward: peak extra memory of the first step (fresh process, peak RSS above "
          "the RSS before it), time of a second warm step")
    print(f"{'N × H → V':<24} {'unfused MiB':>12} {'fused MiB':>10} {'unfused s':>10} {'fused s':>8}")
    for n, h, v in shapes:
        um, us = measure("unfused", n, h, v, a.threads)
        fm, fs = measure("fused", n, h, v, a.threads)
        print(f"{f'{n} × {h} → {v}':<24} {um:>12.1f} {fm:>10.1f} {us:>10.3f} {fs:>8.3f}")


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()
