"""``return_stats=True`` (issue 16) on distill_loss / fused_linear_distill_loss vs the float64 oracle.

Every statistic of every backend (torch; Triton under the interpreter in both schedules) is compared with
``fastkd.reference.distill_stats`` on fresh random logits with odd V, −inf logits, masked / ignored rows
and low precision; the loss and the gradient must be bitwise the same with and without ``return_stats``.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import logits

import fastkd
from fastkd import reference as R
from fastkd.core.stats import STATS_KEYS, stats_dict
from fastkd.distill import triton_impl as TD


def _logits(n, v, dtype, seed, scale=2.0):
    return logits((n, v), dtype, scale, seed=seed)

BLOCK = 32
NEG = -math.inf
# (backend, schedule): the Triton kernels run in the interpreter (tests/conftest.py), both schedules
BACKENDS = [("torch", None)]
_TRITON = TD._IMPORT_ERROR is None
if _TRITON:
    BACKENDS += [("triton", "split"), ("triton", "two_pass")]
# Absolute tolerance of an entropy / kl for fp32 math on rows of ~100 columns, per input dtype (the inputs
# are the exact low-precision values, so only fp32 accumulation error remains)
ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def _with_neg_inf(zs, zt, teacher_only):
    """−inf on both sides in some columns; with ``teacher_only`` also teacher-only −inf in others (p = 0 there:
    fkl and kl stay finite; divergences with q·log(q/p) terms are infinite there by definition)."""
    zs, zt = zs.clone(), zt.clone()
    zs[0, 3:9] = NEG
    zt[0, 3:9] = NEG
    zs[3, 40:] = NEG
    zt[3, 40:] = NEG
    if teacher_only:
        zt[1, ::5] = NEG
        zt[2, 1:] = NEG  # one-hot teacher: entropy 0
    return zs, zt


def _same(a, b):
    """Bitwise equality (NaN-safe)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _run(zs, zt, div, backend, sched, return_stats, **kw):
    x = zs.clone().requires_grad_()
    with TD.override_config(block_v=BLOCK if backend == "triton" else None, schedule=sched):
        out = fastkd.distill_loss(x, zt, div, backend=backend, return_stats=return_stats, **kw)
    loss, stats = out if return_stats else (out, None)
    loss.sum().backward()
    return loss.detach(), x.grad, stats


def _check(stats, ref, zs, zt, temperature, dtype=torch.float32):
    assert set(stats) == set(STATS_KEYS)
    for k in STATS_KEYS:
        got = stats[k]
        assert got.dtype == torch.float32 and got.shape == ref[k].shape and not got.requires_grad, k
    exp = ref["top1_agree"].float()
    assert torch.equal(stats["top1_agree"], exp), (stats["top1_agree"], exp)
    for k in ("teacher_entropy", "student_entropy", "kl"):
        e = ref[k]
        torch.testing.assert_close(stats[k].double(), e, rtol=1e-5, atol=ATOL[dtype], msg=k)


DIVS = ["fkl", "rkl", "jsd", "akl", "tvd", "taid"]
# The interpreter is slow: each Triton schedule gets the divergences that take its different code paths
# (split: LAG 1 fkl / rkl / taid, LAG 2 jsd / tvd; two-pass: akl's head search, the mixture pass, fkl)
CASES = [("torch", None, d) for d in DIVS]
if _TRITON:
    CASES += [("triton", "split", d) for d in ("fkl", "rkl", "jsd", "tvd", "taid")]
    CASES += [("triton", "two_pass", d) for d in ("fkl", "jsd", "akl")]


@pytest.mark.parametrize("backend,sched,div", CASES)
def test_stats_match_oracle_and_leave_loss_bitwise(backend, sched, div):
    n, v, temp = 6, 75, 1.7  # V = 2·32 + 11: three blocks, a masked tail
    zs, zt = _logits(n, v, torch.float32, 1), _logits(n, v, torch.float32, 2)
    if div == "akl":  # distinct teacher values: the kernel's head boundary keeps ties together
        zt = (torch.argsort(torch.rand(n, v, generator=torch.Generator().manual_seed(9)), -1).float() - v / 2) / 16
    zs, zt = _with_neg_inf(zs, zt, teacher_only=div in ("fkl", "jsd", "tvd"))
    labels = torch.randint(0, v, (n,))
    labels[4] = -100
    mask = torch.ones(n, dtype=torch.bool)
    mask[5] = False
    kw = dict(temperature=temp, labels=labels, mask=mask, ce_weight=0.3)
    loss0, grad0, _ = _run(zs, zt, div, backend, sched, False, **kw)
    loss1, grad1, stats = _run(zs, zt, div, backend, sched, True, **kw)
    assert _same(loss0, loss1) and _same(grad0, grad1)
    ref = R.distill_stats(zs.double(), zt.double(), temperature=temp, labels=labels, mask=mask)
    _check(stats, ref, zs, zt, temp)
    assert (stats["teacher_entropy"][4:] == 0).all() and (stats["kl"][4:] == 0).all()


LOW = [("torch", None, torch.bfloat16), ("torch", None, torch.float16)]
if _TRITON:
    LOW += [("triton", "split", torch.bfloat16), ("triton", "two_pass", torch.float16)]


@pytest.mark.parametrize("backend,sched,dtype", LOW)
def test_stats_low_precision_reduction_none_vocab_size(backend, sched, dtype):
    n, v, vocab = 5, 77, 70
    zs, zt = _logits(n, v, dtype, 3, 3.0), _logits(n, v, dtype, 4, 3.0)
    zt[1] = zs[1]  # identical distributions: kl = 0, top1 agrees
    zs[3, 10] = zs[3, 20] = 40.0  # a tie in the student's argmax: the first index counts
    zt[3, 10] = 40.0
    loss0, grad0, _ = _run(zs, zt, "jsd", backend, sched, False, reduction="none", vocab_size=vocab)
    loss1, grad1, stats = _run(zs, zt, "jsd", backend, sched, True, reduction="none", vocab_size=vocab)
    assert loss1.shape == (n,)
    assert _same(loss0, loss1) and _same(grad0, grad1)
    ref = R.distill_stats(zs.double(), zt.double(), vocab_size=vocab)
    _check(stats, ref, zs, zt, 1.0, dtype)
    assert stats["top1_agree"][3] == 1.0 and stats["kl"][1].abs() < 1e-5


@pytest.mark.skipif(not _TRITON, reason="no triton")
def test_akl_default_schedule_writes_stats():
    """akl on the default Triton schedule (the akl split kernel, kernels/distill_akl.py): its STATS launch writes
    every kept row and leaves the loss bitwise unchanged."""
    n, v = 3, 75
    zs = _logits(n, v, torch.float32, 11)
    zt = (torch.argsort(torch.rand(n, v, generator=torch.Generator().manual_seed(12)), -1).float() - v / 2) / 16
    with TD.override_config(block_v=BLOCK):
        loss, stats = fastkd.distill_loss(zs, zt, "akl", reduction="none", backend="triton", return_stats=True)
        plain = fastkd.distill_loss(zs, zt, "akl", reduction="none", backend="triton")
    assert _same(loss, plain)
    _check(stats, R.distill_stats(zs.double(), zt.double()), zs, zt, 1.0)


@pytest.mark.parametrize("backend,sched", BACKENDS)
def test_stats_no_grad_path_and_sum(backend, sched):
    """Forward-only calls (no gradient buffer) take other kernel branches (torch: the fkl shortcut)."""
    n, v = 4, 50
    zs, zt = _logits(n, v, torch.float32, 5), _logits(n, v, torch.float32, 6)
    with TD.override_config(block_v=BLOCK if backend == "triton" else None, schedule=sched):
        # chunk_size=3: the torch backend fills the stats buffer chunk by chunk (4 rows = 3 + 1)
        loss, stats = fastkd.distill_loss(zs, zt, "fkl", reduction="sum", backend=backend, return_stats=True,
                                          chunk_size=3)
        plain = fastkd.distill_loss(zs, zt, "fkl", reduction="sum", backend=backend, chunk_size=3)
    assert _same(loss, plain)
    ref = R.distill_stats(zs.double(), zt.double())
    _check(stats, ref, zs, zt, 1.0)
    # forward KL at T = 1 without weights is the fkl loss itself
    torch.testing.assert_close(stats["kl"].sum(), loss, rtol=1e-5, atol=1e-5)


def test_stats_dict_zeroes_excluded_rows_and_checks_shape():
    buf = torch.full((3, 4), math.nan)
    out = stats_dict(buf, torch.tensor([0.5, 0.0, 1.0]))
    for k in STATS_KEYS:  # the excluded row is 0 even when the backend left garbage there
        assert out[k][1] == 0 and torch.isnan(out[k][0]) and torch.isnan(out[k][2])
    with pytest.raises(ValueError, match="stats buffer"):
        stats_dict(torch.zeros(3, 5), torch.ones(3))


@pytest.mark.parametrize("backend,reduction", [("torch", "mean"), ("torch", "none")]
                         + ([("triton", "none")] if _TRITON else []))
def test_fused_stats(backend, reduction):
    n, h, v = 13, 16, 67
    g = torch.Generator().manual_seed(7)
    hs = torch.randn(n, h, generator=g)
    ws = torch.randn(v, h, generator=g) * 0.5
    ht = torch.randn(n, h, generator=g)
    wt = torch.randn(v + 3, h, generator=g) * 0.5  # padded teacher vocabulary: vocab_size
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    kw = dict(divergence="skl", temperature=2.0, softcap=5.0, labels=labels, ce_weight=0.5, chunk_size=8,
              vocab_size=v, reduction=reduction, backend=backend)

    def run(rs):
        x = hs.clone().requires_grad_()
        w = ws.clone().requires_grad_()
        with TD.override_config(block_v=BLOCK if backend == "triton" else None):
            out = fastkd.fused_linear_distill_loss(x, w, ht, wt, return_stats=rs, **kw)
        loss, stats = out if rs else (out, None)
        loss.sum().backward()
        return loss.detach(), x.grad, w.grad, stats

    l0, gx0, gw0, _ = run(False)
    l1, gx1, gw1, stats = run(True)
    assert _same(l0, l1) and _same(gx0, gx1) and _same(gw0, gw1)
    zs = torch.nn.functional.linear(hs.double(), ws.double())
    zt = torch.nn.functional.linear(ht.double(), wt.double())
    ref = R.distill_stats(zs, zt, temperature=2.0, labels=labels, vocab_size=v, softcap=5.0)
    _check(stats, ref, zs, zt, 2.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("div", ["fkl", "jsd", "akl", "taid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_stats(backend, div, dtype):
    """The compiled kernels (CUDA extension; native Triton under ``pytest -m gpu``) vs the float64 oracle, with
    the loss and gradient bitwise equal with and without stats (several blocks per row at V = 50257)."""
    if backend == "cuda":
        from fastkd import _cpp_lib

        err = _cpp_lib.load_error()
        if err is not None:
            pytest.skip(f"fastkd._C unavailable: {err}")
        _cpp_lib.lib()
        import fastkd.distill.cuda_impl  # noqa: F401
    n, v = 37, 50257
    g = torch.Generator(device="cuda").manual_seed(0)
    zs = (torch.randn(n, v, device="cuda", generator=g) * 3).to(dtype)
    zt = (torch.randn(n, v, device="cuda", generator=g) * 3).to(dtype)
    zs[0, 100:200] = NEG
    zt[0, 100:200] = NEG
    mask = torch.ones(n, dtype=torch.bool, device="cuda")
    mask[5] = False
    out = []
    for rs in (False, True):
        x = zs.clone().requires_grad_()
        res = fastkd.distill_loss(x, zt, div, temperature=1.5, mask=mask, backend=backend, return_stats=rs)
        loss, stats = res if rs else (res, None)
        loss.backward()
        out.append((loss.detach(), x.grad, stats))
    assert _same(out[0][0], out[1][0]) and _same(out[0][1], out[1][1])
    ref = R.distill_stats(zs.double(), zt.double(), temperature=1.5, mask=mask)
    stats = out[1][2]
    assert torch.equal(stats["top1_agree"], ref["top1_agree"].float())
    for k in ("teacher_entropy", "student_entropy", "kl"):
        torch.testing.assert_close(stats[k].double(), ref[k], rtol=1e-4, atol=2e-4, msg=k)
