"""Teacher extraction (fastkd.cache.extract): the Triton streaming top-k + lse / tail kernel (interpreter) and the
torch path against float64, the auto backend choice, and one LM-head pass for every requested quantity."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from fastkd.cache import TeacherCache, TeacherCacheWriter
from fastkd.cache import extract as X
from fastkd.core import lmhead
from fastkd.core.registry import BackendUnavailableError

triton = pytest.importorskip("triton")
# the interpreter's numpy log(0) of an empty / all -inf tail (the kernel returns -inf, as intended)
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
from fastkd.kernels.topk import MAX_K, topk_lse_rows, topk_rows  # noqa: E402


def _ref(z: torch.Tensor, ids: torch.Tensor, temps):
    """float64 lse (N, J) and log tail mass (N, J) outside ``ids`` (the ids the backend chose)."""
    zd = z.double()
    lse = torch.stack([torch.logsumexp(zd / t, -1) for t in temps], -1)
    tail = torch.stack([torch.logsumexp((zd / t).scatter(1, ids, -math.inf), -1) for t in temps], -1) - lse
    return lse, tail


def _check_row_stats(z, k, temps, vals, ids, lse, tails):
    ref = z.topk(k, -1)
    assert torch.equal(vals, ref.values)  # torch.topk's values exactly
    assert torch.equal(z.gather(1, ids), vals) and all(len(set(r.tolist())) == k for r in ids)
    rl, rt = _ref(z, ids, temps)
    # fp32 rounding of quantities of size max|z| / τ (a tiny tail is exact in log space, not 0 - head)
    scale = z[torch.isfinite(z)].abs().max().item() / min(temps)
    tol = 4e-6 * (1 + scale)
    assert ((lse.double() - rl).abs() <= tol).all(), (lse, rl)
    fin = torch.isfinite(rt)
    assert torch.equal(torch.isneginf(tails), ~fin)
    assert ((tails.double()[fin] - rt[fin]).abs() <= tol).all(), (tails, rt)


def _rows(n: int, v: int, k: int, seed: int) -> torch.Tensor:
    """Random rows with -inf entries, a row with fewer finite entries than k, a peaked row (tail ~1e-30)
    and a row with tied values (ties at the k-th place)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g) * 3
    z[0, ::7] = -math.inf
    z[1, max(1, k // 2):] = -math.inf  # fewer than k finite entries: -inf values and tail = -inf
    if n > 2:
        z[2, :] = -80.0 + torch.rand(v, generator=g)  # peaked: tail mass ~ V e^-75 ~ 1e-30
        z[2, torch.randperm(v, generator=g)[:k]] = torch.rand(k, generator=g)
    if n > 3:
        z[3] = torch.randint(-3, 3, (v,), generator=g).float()  # many exact ties
    return z


@pytest.mark.parametrize(("n", "v", "k", "bv", "temps"), [
    (4, 301, 5, 64, (1.0, 2.0, 0.5)),  # odd V, several tiles, J = 3
    (4, 97, 16, 64, (1.0,)),
    (3, 24, 24, 16, (1.0, 3.0)),  # k = V: the tail is empty (-inf) on every row
    (2, 160, MAX_K, 128, (1.0, 0.7)),  # k at the kernel's bound (the interpreter's slowest case, ~25 s)
    (4, 150, 7, 1024, (0.25, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 8.0)),  # J = 8 (the bound), one tile
])
def test_kernel_vs_torch_and_float64(n, v, k, bv, temps):
    z = _rows(n, v, k, seed=v + k)
    vals, ids, lse, tails = topk_lse_rows(z, k, temps, block_v=bv)
    _check_row_stats(z, k, temps, vals, ids, lse, tails)
    ref = z.topk(k, -1)
    full = torch.cat([ref.values, z.topk(min(k + 1, v), -1).values[:, k:]], -1)
    distinct = [r for r in range(n) if len(set(full[r].tolist())) == full.shape[1]]  # no ties: torch's ids too
    assert distinct
    assert torch.equal(ids[distinct], ref.indices[distinct])
    tv, ti, tl, tt = X._torch_topk_lse(z.clone(), k, tuple(temps))  # the torch path, same checks
    _check_row_stats(z, k, temps, tv, ti, tl, tt)
    torch.testing.assert_close(lse, tl, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(tails, tt, rtol=2e-6, atol=2e-6)
    v2, i2 = topk_rows(z, k, block_v=bv)  # J = 0 compiles without the tail sums and selects the same
    assert torch.equal(v2, vals) and torch.equal(i2, ids)


def test_kernel_adversarial_orders():
    """Ascending rows (every tile's best entries enter and evict: the insertion loop's worst case), descending
    rows (nothing enters after the first tile), and a row whose maximum sits in the last, partial tile."""
    v, k, temps = 301, 5, (1.0, 0.5)
    z = torch.stack([torch.linspace(-4, 4, v), torch.linspace(4, -4, v), torch.randn(v).clamp(max=2.0)])
    z[2, -1] = 9.0
    vals, ids, lse, tails = topk_lse_rows(z, k, temps, block_v=64)
    _check_row_stats(z, k, temps, vals, ids, lse, tails)
    assert torch.equal(ids[:2], z[:2].topk(k, -1).indices) and ids[2, 0] == v - 1


def test_tiny_tail_is_exact_in_log_space():
    """Peaked rows: the tail mass is 1e-30-ish (e^-135 at τ = 0.5): total − head would give
    log(0) = -inf or noise in fp32; the kernel and the torch path give the float64 value to fp32 rounding."""
    v, k = 257, 4
    z = torch.full((2, v), -60.0)
    z[:, :k] = torch.tensor([10.0, 9.5, 9.0, 8.0])
    z[1, 100] = -200.0
    temps = (1.0, 0.5, 2.0)
    for _, ids, _, tails in (topk_lse_rows(z, k, temps, block_v=64), X._torch_topk_lse(z.clone(), k, temps)):
        _, rt = _ref(z, ids, temps)
        assert (rt[:, 0] < -65).all() and (rt[:, 1] < -130).all()  # tail mass e^-67 ~ 1e-29, e^-135
        torch.testing.assert_close(tails.double(), rt, rtol=1e-6, atol=0)
    naive = torch.log1p(-torch.exp(torch.logsumexp(z[:, :k], -1) - torch.logsumexp(z, -1)))
    assert not torch.isfinite(naive).any() or (naive - rt[:, 0]).abs().max() > 1  # why it is computed as a sum


def test_extract_topk_backends_through_the_engine():
    """extract_topk on the LM-head engine: triton and torch paths agree with each other and with float64,
    with a bias that masks columns (-inf logits), softcap and an odd vocabulary."""
    g = torch.Generator().manual_seed(3)
    v, h, k, temps = 211, 12, 9, (1.0, 2.0, 0.5)
    w, b = torch.randn(v, h, generator=g) * 0.8, torch.randn(v, generator=g)
    b[::5] = -math.inf
    x = torch.randn(23, h, generator=g) * 2
    outs = {be: X.extract_topk(x, w, b, k=k, temperatures=temps, chunk_size=6, softcap=12.0, temperature=1.3,
                               topk_backend=be) for be in ("torch", "triton")}
    zd = 12.0 * torch.tanh((x.double() @ w.double().T + b.double()) / 12.0) / 1.3
    top = zd.topk(k, -1)
    for be, out in outs.items():
        assert torch.equal(out["ids"], top.indices), be
        lse, tail = _ref(zd, out["ids"], temps)
        torch.testing.assert_close(out["lse"].double(), lse, rtol=0, atol=1e-5)
        torch.testing.assert_close(out["tails"].double(), tail, rtol=0, atol=2e-5)
        torch.testing.assert_close(out["logp"].double(), top.values - lse[:, :1], rtol=0, atol=1e-5)
    for key in ("logp", "lse", "tails"):
        torch.testing.assert_close(outs["triton"][key], outs["torch"][key], rtol=1e-6, atol=1e-6)


def test_auto_backend_choice_and_errors(caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with caplog.at_level(logging.DEBUG, logger="fastkd"):
        assert X.choose_topk_backend("auto", cpu, 8, 2) == "torch"  # CPU: torch, even under the interpreter
    assert "skipped triton: tensor on cpu" in caplog.text and "using torch" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="fastkd"):
        assert X.choose_topk_backend("auto", cuda, 8, 2) == "triton"  # (no CUDA call: a device object only)
        assert X.choose_topk_backend("auto", cuda, MAX_K + 1, 2) == "torch"
        assert X.choose_topk_backend("auto", cuda, 8, 9) == "torch"
    assert "using triton" in caplog.text and f"k={MAX_K + 1} > {MAX_K}" in caplog.text
    assert "9 temperatures" in caplog.text
    assert X.choose_topk_backend("torch", cuda, 500, 20) == "torch"
    assert X._TRITON_MAX_K == MAX_K
    with pytest.raises(BackendUnavailableError, match=f"k={MAX_K + 1}"):
        X.choose_topk_backend("triton", cuda, MAX_K + 1, 1)
    with pytest.raises(ValueError, match="topk_backend"):
        X.extract_topk(torch.randn(2, 3), torch.randn(5, 3), k=2, topk_backend="cuda")
    with pytest.raises(ValueError, match="k must be"):
        topk_rows(torch.zeros(2, 10), 11)
    with pytest.raises(ValueError, match="temperatures"):
        topk_lse_rows(torch.zeros(2, 10), 2, (1.0,) * 9)
    with pytest.raises(ValueError, match="needs k"):
        X.extract(torch.randn(2, 3), torch.randn(5, 3))


class _Count:
    """Counts LM-head passes (iter_logits calls) and chunk GEMMs (LMHeadChunker.logits calls)."""

    def __init__(self, monkeypatch):
        self.passes = self.gemms = 0
        orig_iter, orig_logits = X.iter_logits, lmhead.LMHeadChunker.logits

        def it(*a, **kw):
            self.passes += 1
            return orig_iter(*a, **kw)

        def logits(chunker, sl):
            self.gemms += 1
            return orig_logits(chunker, sl)

        monkeypatch.setattr(X, "iter_logits", it)
        monkeypatch.setattr(lmhead.LMHeadChunker, "logits", logits)


def _old_samples(x, w, b, s, chunk, gen):
    """The RS-KD sampling as it was in its own LM-head loop (reference for 'unchanged')."""
    z_all = torch.addmm(b, x, w.T)
    ids = torch.full((x.shape[0], s), -1, dtype=torch.int64)
    counts = torch.zeros(x.shape[0], s, dtype=torch.int32)
    for st in range(0, x.shape[0], chunk):
        probs = torch.softmax(z_all[st:st + chunk], -1)
        draws = torch.multinomial(probs, s, replacement=True, generator=gen)
        c = torch.zeros_like(probs).scatter_add_(1, draws, torch.ones_like(draws, dtype=probs.dtype))
        top = c.topk(s, -1)
        ids[st:st + chunk] = torch.where(top.values > 0, top.indices, -1)
        counts[st:st + chunk] = top.values.to(torch.int32)
    return ids, counts


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_engine_pass_for_samples_and_topk(monkeypatch, tmp_path, backend):
    g = torch.Generator().manual_seed(4)
    v, h, n, chunk, s = 150, 8, 21, 5, 6
    w, b, x = torch.randn(v, h, generator=g), torch.randn(v, generator=g), torch.randn(n, h, generator=g)
    ref_topk = X.extract_topk(x, w, b, k=4, temperatures=(1.0, 2.0), chunk_size=chunk, topk_backend="torch")
    ref_ids, ref_counts = _old_samples(x, w, b, s, chunk, torch.Generator().manual_seed(7))
    cnt = _Count(monkeypatch)
    out = X.extract(x, w, b, k=4, temperatures=(1.0, 2.0), num_samples=s, generator=torch.Generator().manual_seed(7),
                    chunk_size=chunk, topk_backend=backend)
    assert (cnt.passes, cnt.gemms) == (1, math.ceil(n / chunk))  # ONE pass for samples + top-k + every τ
    assert torch.equal(out["sample_ids"], ref_ids) and torch.equal(out["counts"], ref_counts)  # same draws
    assert torch.equal(out["ids"], ref_topk["ids"])
    for key in ("logp", "lse", "tails"):
        torch.testing.assert_close(out[key], ref_topk[key], rtol=1e-6, atol=1e-6)
    # the writer: one pass per example for either cache kind
    for values, temps in (("logprobs", (2.0, 0.5)), ("counts", ())):
        cnt.passes = cnt.gemms = 0
        with TeacherCacheWriter(tmp_path / values, vocab_size=v, k=s, values=values, temperatures=temps) as wr:
            wr.add_from_hidden(x, w, b, chunk_size=chunk, generator=torch.Generator().manual_seed(7),
                               topk_backend=backend)
        assert (cnt.passes, cnt.gemms) == (1, math.ceil(n / chunk)), values
    ex = TeacherCache(tmp_path / "counts")[0]
    assert torch.equal(ex["teacher_ids"], ref_ids) and torch.equal(ex["teacher_values"].to(torch.int32), ref_counts)


@pytest.mark.gpu
def test_gpu_extraction_auto_is_triton_and_matches_float64(caplog):
    """On a CUDA host (``pytest -m gpu``): auto picks the compiled Triton kernel; ids / lse / tails equal the
    torch path and float64 at a GPT-2-sized odd vocabulary, k = 64 and 128, three temperatures."""
    g = torch.Generator(device="cuda").manual_seed(0)
    n, h, v = 300, 64, 50257
    w = torch.randn(v, h, device="cuda", generator=g) * 0.3
    b = torch.randn(v, device="cuda", generator=g)
    b[::97] = -math.inf
    x = torch.randn(n, h, device="cuda", generator=g)
    temps = (1.0, 2.0, 0.5)
    zd = x.double() @ w.double().T + b.double()
    for k in (64, MAX_K):
        with caplog.at_level(logging.DEBUG, logger="fastkd"):
            out = X.extract_topk(x, w, b, k=k, temperatures=temps, chunk_size=128)
        assert "'extract_topk': using triton" in caplog.text
        ref = X.extract_topk(x, w, b, k=k, temperatures=temps, chunk_size=128, topk_backend="torch")
        top = zd.topk(k, -1)
        # the top-k of the fp32 logits: the fp64 values up to fp32 rounding (near-ties may swap places)
        torch.testing.assert_close(zd.gather(1, out["ids"]), top.values, rtol=0, atol=1e-4)
        lse, tail = _ref(zd, out["ids"], temps)
        for key, exact in (("lse", lse), ("tails", tail), ("logp", top.values - lse[:, :1])):
            torch.testing.assert_close(out[key].double(), exact, rtol=0, atol=2e-4, msg=key)
            torch.testing.assert_close(out[key], ref[key], rtol=0, atol=2e-4, msg=key)
