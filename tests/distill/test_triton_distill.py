"""Triton backend of distill_loss vs the float64 reference and the torch backend.

Without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1), on
small odd shapes with BLOCK_V=32 so that every row spans several vocabulary blocks (V=131 = 4·32 + 3).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import logits as _logits
from helpers import ref_loss_grad as _ref
from helpers import spy_launches
from helpers import teacher as _teacher
from hypothesis_compat import HealthCheck, given, settings, st

import fastkd
from fastkd import reference as R
from fastkd.core.autograd import scale_grad_
from fastkd.core.params import DistillParams
from fastkd.core.registry import BackendUnavailableError
from fastkd.distill import reference as ref_distill
from fastkd.distill import triton_impl as TD

DIVS = fastkd.DIVERGENCES
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Relative rounding of one stored gradient element per dtype (the kernel computes in fp32).
GRAD_EPS = {torch.float32: 2e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}
BLOCK = 32
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

pytestmark = pytest.mark.skipif(TD._IMPORT_ERROR is not None, reason=f"no triton: {TD._IMPORT_ERROR}")


def _run(zs, zt, div, backend="triton", block=BLOCK, **kw):
    """(loss, grad w.r.t. zs) from fastkd.distill_loss(zs, zt, div, **kw) on ``backend``."""
    x = zs.clone().requires_grad_()
    with TD.override_config(block_v=block):
        out = fastkd.distill_loss(x, zt, div, backend=backend, **kw)
    out.sum().backward()
    return out.detach(), x.grad


def _check(s, zt, div, torch_too=True, **kw):
    loss, grad = _run(s, zt, div, **kw)
    rloss, rgrad = _ref(s, zt, div, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == s.dtype
    assert torch.equal(grad[torch.isneginf(s)], torch.zeros_like(grad[torch.isneginf(s)]))
    torch.testing.assert_close(loss.double(), rloss, rtol=2e-5, atol=2e-5 * (1 + rloss.abs().max().item()))
    eps = GRAD_EPS[s.dtype]
    gscale = rgrad.abs().max().item()
    torch.testing.assert_close(grad.double(), rgrad, rtol=eps, atol=2 * eps * gscale + 1e-7)
    if torch_too:  # the torch backend computes the same fp32 math
        tloss, tgrad = _run(s, zt, div, backend="torch", **kw)
        torch.testing.assert_close(loss, tloss, rtol=2e-5, atol=2e-5 * (1 + tloss.abs().max().item()))
        torch.testing.assert_close(grad.float(), tgrad.float(), rtol=eps, atol=2 * eps * gscale + 1e-7)
    return loss, grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", DIVS)
def test_matches_reference(div, dtype):
    shape = (2, 3, 131)
    s, t = _logits(shape, dtype), _teacher(shape, dtype, div)
    mask = torch.rand(shape[:-1]) > 0.3
    _check(s, t, div, temperature=1.7, scale_by_t2=True, mask=mask)


@pytest.mark.parametrize("div", DIVS)
def test_labels_ce_and_reductions(div):
    s, t = _logits((3, 67), torch.float32), _logits((3, 67), torch.float32)
    labels = torch.tensor([5, -100, 66])
    _check(s, t, div, labels=labels, ce_weight=0.7, temperature=2.0, reduction="sum")
    _check(s, t, div, labels=labels, ce_weight=1.3, reduction="none", torch_too=False)
    _check(s, t, div, labels=labels, reduction="mean", num_items_in_batch=7, torch_too=False)


def _neg_inf(shape, dtype, teacher_only, div):
    s, t = _logits(shape, dtype), _teacher(shape, dtype, div)
    cols = torch.rand(shape) < 0.25
    cols[..., 0] = False  # keep at least one finite column per row
    t[cols] = float("-inf")
    if not teacher_only:
        s[cols] = float("-inf")
    return s, t


@pytest.mark.parametrize("div", DIVS)
def test_neg_inf_both_sides(div):
    s, t = _neg_inf((3, 131), torch.bfloat16, False, div)
    loss, grad = _check(s, t, div, temperature=0.8)
    assert torch.isfinite(loss).all() and torch.isfinite(grad.float()).all()


@pytest.mark.parametrize("div", DIVS)
def test_neg_inf_teacher_only(div):
    s, t = _neg_inf((3, 131), torch.float32, True, div)
    if div in ("rkl", "symkl", "akl"):  # q > 0 where p == 0: the divergence is +inf, as in the reference
        loss, _ = _run(s, t, div, reduction="none")
        rloss, _ = _ref(s, t, div, reduction="none")
        assert torch.isinf(rloss).all() and torch.equal(loss.double(), rloss)
    else:
        loss, grad = _check(s, t, div, reduction="none", t=0.3)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("div", ["fkl", "jsd", "akl", "taid"])
def test_vocab_padding_strided_views(div):
    s, t = _logits((4, 131), torch.float16), _teacher((4, 140), torch.float16, div)
    t[:, 131:] = 50.0  # padding columns must be ignored
    loss, grad = _run(s, t, div, vocab_size=131)
    rloss, rgrad = _ref(s, t, div, vocab_size=131)
    torch.testing.assert_close(loss.double(), rloss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-3, atol=1e-3 * rgrad.abs().max().item())
    s2 = _logits((4, 140), torch.float16)
    s2[:, 131:] = float("nan")  # student padding: gradient there is 0
    _, grad2 = _run(s2, t[:, :140], div, vocab_size=131)
    assert torch.equal(grad2[:, 131:], torch.zeros_like(grad2[:, 131:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("div", ["rkl", "skl", "tvd", "akl"])
def test_inplace_grad(div, dtype):
    s, t = _logits((5, 131), dtype), _teacher((5, 131), dtype, div)
    rloss, rgrad = _run(s, t, div, backend="torch", reduction="sum")
    leaf = s.clone().requires_grad_()
    x = leaf * 1  # a non-leaf whose storage may be overwritten
    with TD.override_config(block_v=BLOCK):
        out = fastkd.distill_loss(x, t, div, backend="triton", inplace_grad=True, reduction="sum")
    out.backward()
    torch.testing.assert_close(out, rloss, rtol=2e-5, atol=2e-5)
    eps = GRAD_EPS[dtype]
    torch.testing.assert_close(leaf.grad.float(), rgrad.float(), rtol=eps, atol=2 * eps)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_grad_output_not_one(reduction):
    s, t = _logits((4, 131), torch.float32), _logits((4, 131), torch.float32)
    go = torch.tensor([0.5, -2.0, 1.0, 3.0]) if reduction == "none" else torch.tensor(-1.7)
    x = s.clone().requires_grad_()
    with TD.override_config(block_v=BLOCK):
        out = fastkd.distill_loss(x, t, "jsd", backend="triton", reduction=reduction)
    out.backward(go)
    xr = s.double().requires_grad_()
    R.distill_loss(xr, t.double(), "jsd", reduction=reduction).backward(go.double())
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-7)


def test_excluded_rows_are_zero_whatever_the_logits():
    s, t = _logits((4, 131), torch.float32), _logits((4, 131), torch.float32)
    s[1] = float("nan")
    t[2] = float("-inf")
    mask = torch.tensor([True, False, False, True])
    for div in ("fkl", "akl"):
        loss, grad = _run(s, t, div, mask=mask, reduction="none")
        assert torch.equal(loss[1:3], torch.zeros(2)) and torch.equal(grad[1:3], torch.zeros(2, 131))
        assert torch.isfinite(loss).all()
    loss, grad = _run(s, t, "rkl", mask=torch.zeros(4, dtype=torch.bool))
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_nan_input_gives_nan():
    s, t = _logits((2, 131), torch.float32), _logits((2, 131), torch.float32)
    s[0, 7] = float("nan")
    loss, _ = _run(s, t, "fkl", reduction="none")
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])


@pytest.mark.parametrize("side", ["teacher", "student"])
@pytest.mark.parametrize(("div", "kw"), [(d, {}) for d in DIVS] + [("skl", {"alpha": 1.0}), ("jsd", {"beta": 0.0})])
def test_nan_or_inf_in_either_input_gives_nan(div, kw, side):
    """Issue 13 item 2: skl (NaN teacher) and srkl (NaN student) gave a finite loss (the x > 0 guard ate it)."""
    for bad in (math.nan, math.inf):
        s, t = _logits((3, 67), torch.float32), _logits((3, 67), torch.float32)
        (t if side == "teacher" else s)[1, 7] = bad
        loss, _ = _run(s, t, div, reduction="none", **kw)
        assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


def test_label_out_of_range_is_never_read():
    """Issue 13 item 3: the kernel loaded the label's logit unmasked. Row 0's label V would read row 1's first
    logit and row 1's label −1 row 0's last one (finite garbage); the masked load gives NaN for those rows."""
    s, t = _logits((3, 131), torch.float32), _logits((3, 131), torch.float32)
    labels = torch.tensor([131, -1, 5])
    for grad in (None, torch.empty_like(s)):
        with TD.override_config(block_v=BLOCK):
            loss = TD.distill_forward(s, t, labels, torch.ones(3), grad, DistillParams(ce_weight=0.5))
        assert torch.isnan(loss[:2]).all() and torch.isfinite(loss[2])
        ref = TD.distill_forward(s[2:], t[2:], labels[2:], torch.ones(1), None, DistillParams(ce_weight=0.5))
        torch.testing.assert_close(loss[2:], ref)


@pytest.mark.parametrize(("div", "kw"), [
    ("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}), ("skl", {"alpha": 0.0}), ("skl", {"alpha": 1.0}),
    ("srkl", {"alpha": 0.0}), ("srkl", {"alpha": 1.0}), ("symkl", {"beta": 0.2}), ("taid", {"t": 0.0}),
    ("taid", {"t": 1.0}), ("akl", {"mu": 0.0}), ("akl", {"mu": 0.9})])
def test_parameter_endpoints(div, kw):
    s, t = _logits((3, 131), torch.float32), _logits((3, 131), torch.float32)
    _check(s, t, div, **kw)


def _akl_threshold_formula(s, t, mu):
    """AKL with the kernel's documented head: {i: Σ_{p_j ≥ p_i} p_j ≤ mu} ∪ {first argmax}, float64."""
    lq, lp = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    p, q = lp.exp(), lq.exp()
    mass = (p.unsqueeze(-2) * (p.unsqueeze(-2) >= p.unsqueeze(-1))).sum(-1)
    head = mass <= mu
    head.scatter_(-1, p.argmax(-1, keepdim=True), True)
    err = (p - q).abs()
    gh, gt = (err * head).sum(-1), (err * ~head).sum(-1)
    return (gh * ref_distill.fkl(lp, lq) + gt * ref_distill.rkl(lp, lq)) / (gh + gt)


@pytest.fixture
def two_pass(monkeypatch):
    """akl on the two-pass kernel (through any override_config: every V exceeds the split kernel's limit)."""
    monkeypatch.setattr(TD.KA, "AKL_MAX_V", 0)


def test_akl_ties_move_together(two_pass):
    # p ∝ (4, 3, 3, 1, 1, ...): the tied 3s straddle mu in the reference's stable sort, not in the two-pass
    # kernel (the default split akl kernel splits them like the reference: tests/distill/test_distill_akl.py)
    t = torch.zeros(2, 50)
    t[:, 0], t[:, 1], t[:, 2] = math.log(40.0), math.log(30.0), math.log(30.0)
    p = torch.softmax(t[0].double(), -1)
    mu = float(p[0] + p[1] + 0.5 * p[2])
    s = _logits((2, 50), torch.float32)
    loss, _ = _run(s, t, "akl", mu=mu, reduction="none")
    torch.testing.assert_close(loss.double(), _akl_threshold_formula(s, t, mu), rtol=1e-5, atol=1e-6)
    t[:, 3] = math.log(40.0)  # tied maxima that do not fit: only the first is forced into the head
    loss, _ = _run(s, t, "akl", mu=0.05, reduction="none")
    torch.testing.assert_close(loss.double(), _akl_threshold_formula(s, t, 0.05), rtol=1e-5, atol=1e-6)
    rloss, _ = _ref(s, t, "akl", mu=0.05, reduction="none")
    torch.testing.assert_close(loss.double(), rloss, rtol=1e-5, atol=1e-6)


def test_default_config_and_peaked_teacher():
    s = _logits((3, 300), torch.float32)
    t = _logits((3, 300), torch.float32, scale=30.0)  # nearly one-hot teacher
    for div in ("akl", "srkl"):
        loss, grad = _run(s, t, div, block=None)
        rloss, rgrad = _ref(s, t, div)
        torch.testing.assert_close(loss.double(), rloss, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(grad.double(), rgrad, rtol=1e-5, atol=1e-6)


def test_bf16_no_worse_than_pytorch_bf16():
    s, t = _logits((6, 131), torch.bfloat16), _logits((6, 131), torch.bfloat16)
    loss, _ = _run(s, t, "fkl", reduction="none")
    rloss, _ = _ref(s, t, "fkl", reduction="none")
    lp, lq = torch.log_softmax(t, -1), torch.log_softmax(s, -1)  # PyTorch computing in bf16
    torch_err = (torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1).double()
                 - rloss).abs().max()
    assert (loss.double() - rloss).abs().max() <= torch_err + 1e-5


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 3), v=st.integers(1, 90), div=st.sampled_from(DIVS),
       temp=st.sampled_from([0.5, 1.0, 3.0]), seed=st.integers(0, 2**16))
def test_property_vs_torch_backend(rows, v, div, temp, seed):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(rows, v, generator=g) * 3, torch.randn(rows, v, generator=g) * 3
    loss, grad = _run(s, t, div, temperature=temp, reduction="none", block=16)
    tloss, tgrad = _run(s, t, div, temperature=temp, reduction="none", backend="torch")
    torch.testing.assert_close(loss, tloss, rtol=1e-5, atol=1e-5)
    # Gradients like rkl's q·(log q − log p − L) cancel terms as large as the tempered logits, so fp32
    # rounding scales with that magnitude (seen: 3.8e-6 at |z/T| ≈ 18 for two correct fp32 backends).
    scale = 1.0 + (s.abs().max() + t.abs().max()).item() / temp
    torch.testing.assert_close(grad, tgrad, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_grad(dtype):
    g = _logits((5, 131), dtype)
    orig = g.clone()
    with TD.override_config(block_v=BLOCK):
        assert scale_grad_(g, torch.tensor(1.0), per_row=False) is g
        assert torch.equal(g, orig)
        scale_grad_(g, torch.tensor(-2.5), per_row=False)
        torch.testing.assert_close(g, (orig.float() * -2.5).to(dtype))
        g = orig.clone()
        f = torch.tensor([1.0, 0.0, 3.0, 1.0, -0.5])
        scale_grad_(g, f, per_row=True)
        torch.testing.assert_close(g, (orig.float() * f[:, None]).to(dtype))
        assert torch.equal(g[0], orig[0]) and torch.equal(g[3], orig[3])
        with pytest.raises(ValueError, match="grad_output"):
            scale_grad_(g, torch.ones(3), per_row=True)


@pytest.mark.parametrize("v", [4096, 2 * 4096 + 37], ids=["full_blocks", "full_blocks_and_tail"])
def test_scale_grad_full_blocks_and_tail(v):
    """V > the 4096 block: unmasked full blocks, then one masked tail block (nothing past V is touched)."""
    buf = _logits((3, v + 5), torch.bfloat16)
    g, orig = buf[:, :v], buf.clone()
    f = torch.tensor([0.5, 1.0, -3.0])
    scale_grad_(g, f, per_row=True)
    torch.testing.assert_close(g, (orig[:, :v].float() * f[:, None]).to(torch.bfloat16))
    assert torch.equal(buf[:, v:], orig[:, v:])


def test_reasons():
    s = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="float64"):
        fastkd.distill_loss(s, s.clone(), backend="triton")
    # softcap never reaches a distill backend (the LM-head engine applies it), so it is no reason
    assert TD._reasons(student=s.float(), teacher=s.float(), params=DistillParams(softcap=5.0)) == []
    assert TD._reasons(student=s.float(), teacher=s.float(), params=DistillParams()) == []


# ---------------------------------------------------------------------------------------------------------
# Schedules: split rows (fastkd.kernels.distill_split, the default) and the two-pass fallback
# ---------------------------------------------------------------------------------------------------------

SPLIT_DIVS = [d for d in DIVS if d != "akl"]


def _strided_case(dtype, seed):
    """Rows of V = 151 (= 4·32 + 23: a masked tail segment, V % 16 != 0) inside 160-wide tensors, −inf on both
    sides in row 0, a masked row, labels (one in the tail segment) and a per-row grad_output != 1."""
    g = torch.Generator().manual_seed(seed)
    fs = (torch.randn(4, 160, generator=g) * 2).to(dtype)
    ft = (torch.randn(4, 160, generator=g) * 2).to(dtype)
    fs[0, 7] = ft[0, 7] = fs[0, 40] = ft[0, 40] = float("-inf")
    kw = dict(mask=torch.tensor([True, True, False, True]), labels=torch.tensor([150, 0, 3, 77]),
              ce_weight=0.4, temperature=1.6, reduction="none")
    return fs, ft, kw, torch.tensor([0.5, -2.0, 1.0, 3.0])


@pytest.mark.parametrize("sched", TD.SCHEDULES)
@pytest.mark.parametrize("div", SPLIT_DIVS)
def test_schedules_strided_odd_v_vs_float64(div, sched):
    dtype = torch.bfloat16 if div in ("fkl", "jsd", "tvd") else torch.float16 if div == "ab" else torch.float32
    fs, ft, kw, go = _strided_case(dtype, 7 + len(div))
    v = 151
    x = fs.clone().requires_grad_()
    with TD.override_config(block_v=BLOCK, schedule=sched):
        out = fastkd.distill_loss(x[:, :v], ft[:, :v], div, backend="triton", **kw)
    out.backward(go)
    rloss = R.distill_loss(fs[:, :v].double(), ft[:, :v].double(), div, **kw)
    fin = lambda z: torch.where(torch.isneginf(z), -1e4, z.double())
    xr = fin(fs).requires_grad_()
    rl = R.distill_loss(xr[:, :v], fin(ft)[:, :v], div, **kw)
    if rl.requires_grad:  # skl at α = 1 is D ≡ 0
        rl.backward(go.double())
    rgrad = torch.where(torch.isneginf(fs), 0.0, xr.grad if xr.grad is not None else torch.zeros_like(xr))
    torch.testing.assert_close(out.double(), rloss, rtol=2e-5, atol=2e-5 * (1 + rloss.abs().max().item()))
    eps = GRAD_EPS[dtype]
    scale = rgrad.abs().max().item()
    torch.testing.assert_close(x.grad.double(), rgrad, rtol=eps, atol=2 * eps * scale + 1e-7)
    assert torch.equal(x.grad[:, v:], torch.zeros_like(x.grad[:, v:]))
    assert torch.equal(x.grad[2], torch.zeros_like(x.grad[2]))  # masked row


@pytest.mark.parametrize("div", ["fkl", "jsd", "taid"])
def test_split_equals_two_pass_bitwise_close(div):
    """The split schedule merges per-segment statistics: same math, so the two schedules agree to fp32
    rounding (and the split one is deterministic: two runs are bitwise equal)."""
    s, t = _logits((3, 200), torch.float32), _logits((3, 200), torch.float32)
    runs = {}
    for sched in ("split", "split", "two_pass"):
        with TD.override_config(block_v=16, schedule=sched):
            runs.setdefault(sched, []).append(_run(s, t, div, block=16))
    (l1, g1), (l2, g2) = runs["split"]
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    lt, gt = runs["two_pass"][0]
    torch.testing.assert_close(l1, lt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, gt, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_akl_default_wide_head_search(dtype, two_pass):
    """akl (two-pass kernel, forced) at its default blocks: the head search's AKL_NT × AKL_BLOCK tile spans several
    1024-wide teacher blocks and a masked tail (V = 2500), masked rows, a per-row grad_output != 1. (fp16, not
    bf16: the distinct teacher values k/16, |k| <= 1250, are exact in fp16 only; bf16 would tie them.)"""
    from fastkd.kernels import distill as K

    v = 2500
    assert v > 2 * K.AKL_BLOCK
    s, t = _logits((3, v), dtype), _teacher((3, v), dtype, "akl")
    mask = torch.tensor([True, False, True])
    go = torch.tensor([0.5, 2.0, -1.5])
    x = s.clone().requires_grad_()
    out = fastkd.distill_loss(x, t, "akl", backend="triton", mask=mask, reduction="none")
    out.backward(go)
    xr = s.double().requires_grad_()
    rl = R.distill_loss(xr, t.double(), "akl", mask=mask, reduction="none")
    rl.backward(go.double())
    torch.testing.assert_close(out.double(), rl.detach(), rtol=2e-5, atol=2e-5)
    eps = GRAD_EPS[dtype]
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=eps, atol=2 * eps * xr.grad.abs().max().item())


def test_schedule_selection():
    assert TD.schedule(DistillParams("fkl"))[0] == "split"
    assert TD.schedule(DistillParams("jsd"))[0] == "split"
    sched, why = TD.schedule(DistillParams("akl"))
    assert sched == "akl_split" and "akl" in why  # tests/distill/test_distill_akl.py tests that kernel
    with TD.override_config(schedule="two_pass"):
        assert TD.schedule(DistillParams("fkl")) == ("two_pass", "forced by override_config(schedule='two_pass')")
    with pytest.raises(ValueError, match="schedule"), TD.override_config(schedule="three_pass"):
        pass


def test_split_kernel_is_launched_with_lag(monkeypatch):
    """The default launch goes to the split kernel with grid (N + LAG)·S (LAG 1 for fkl, 2 for jsd)."""
    from fastkd.kernels import distill_split as KS

    seen = spy_launches(monkeypatch, KS, "_distill_split_kernel", lambda grid, kw: (grid[0], kw["LAG"]))
    s, t = _logits((3, 100), torch.float32), _logits((3, 100), torch.float32)
    for div in ("fkl", "jsd", "taid"):
        _run(s, t, div)
    assert seen == [((3 + 1) * 4, 1), ((3 + 2) * 4, 2), ((3 + 2) * 4, 2)]  # taid: a mid phase for its logits


@pytest.mark.parametrize("sched", TD.SCHEDULES)
@pytest.mark.parametrize("tau", [0.0, 0.3, 0.8])
@pytest.mark.parametrize("offset", [1e4, -3e3])
def test_taid_is_offset_independent(sched, tau, offset):
    """taid interpolates the max-subtracted logits, so a constant offset of both sides costs no fp32 accuracy,
    over several segments / blocks (V = 151, BLOCK_V = 32: a masked tail), with −inf logits, a masked row and
    labels (interpolating the raw logits rounds u at the offset's magnitude: ~6e-5 relative at +1e4)."""
    fs, ft, kw, go = _strided_case(torch.float32, 11)
    kw = dict(kw, temperature=1.0, t=tau)
    s, t = fs[:, :151] + offset, ft[:, :151] + offset
    xr = s.double().requires_grad_()
    ref = R.distill_loss(xr, t.double(), "taid", **kw)
    ref.backward(go.double())
    x = s.clone().requires_grad_()
    with TD.override_config(block_v=BLOCK, schedule=sched):
        loss = fastkd.distill_loss(x, t, "taid", backend="triton", **kw)
    loss.backward(go)
    rgrad = torch.nan_to_num(xr.grad, nan=0.0)  # the float64 reference's −inf columns
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(x.grad.double(), rgrad, rtol=0, atol=1e-6 * float(rgrad.abs().max()))


def test_cost_model_cross_program_rule():
    """bench/costcount's L2 rule for re-reads by later programs: a hit when (resident + distance) × the
    program's distinct bytes fits in L2, else HBM traffic."""
    from fastkd.bench.costcount import GPUS, LaunchStats

    gpu = GPUS["h200"]
    near = LaunchStats("k", 8, 1, 1, load_bytes=3 * 2**15, store_bytes=0, unique_load_bytes=3 * 2**15,
                       max_program_bytes=2**15, programs=1, cross_reread={32: 2 * 2**15})
    assert near.cost(gpu).bytes == 2**15  # (1 resident + 32) × 32 KB <= 50 MB: one HBM read
    far = LaunchStats("k", 8, 1, 1, load_bytes=3 * 2**15, store_bytes=0, unique_load_bytes=3 * 2**15,
                      max_program_bytes=2**15, programs=1, cross_reread={2000: 2 * 2**15})
    assert far.cost(gpu).bytes == 3 * 2**15  # (1 + 2000) × 32 KB = 66 MB > L2: re-reads from HBM


# ---------------------------------------------------------------------------------------------------------
# GPU-only (larger shapes, default and autotuned configs)
# ---------------------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("div", DIVS)
def test_gpu_large_vs_torch(div):
    s = (torch.randn(64, 32003, device="cuda") * 3).bfloat16()
    t = (torch.randn(64, 32003, device="cuda") * 3).bfloat16()
    labels = torch.randint(0, 32003, (64,), device="cuda")
    kw = dict(temperature=1.5, labels=labels, ce_weight=0.5)
    loss, grad = _run(s, t, div, block=None, **kw)
    tloss, tgrad = _run(s, t, div, backend="torch", **kw)
    torch.testing.assert_close(loss, tloss, rtol=1e-4, atol=1e-4)
    gmax = tgrad.float().abs().max().item()
    torch.testing.assert_close(grad.float(), tgrad.float(), rtol=1e-2, atol=1e-2 * gmax)


@requires_cuda
@pytest.mark.gpu
def test_gpu_autotune_inplace_and_scale(monkeypatch):
    monkeypatch.setenv("FASTKD_AUTOTUNE", "1")
    s = torch.randn(256, 50000, device="cuda").half()
    t = torch.randn(256, 50000, device="cuda").half()
    loss, grad = _run(s, t, "jsd", block=None)
    tloss, tgrad = _run(s, t, "jsd", backend="torch")
    torch.testing.assert_close(loss, tloss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad.float(), tgrad.float(), rtol=1e-2, atol=1e-6)
    g = grad.clone()
    scale_grad_(g, torch.full((256,), 2.0, device="cuda"), per_row=True)
    torch.testing.assert_close(g.float(), 2 * grad.float())


def test_gpu_suite_dry_run(tmp_path):
    """bench/gpu_suite.py --dry-run runs its cases on CPU and the Triton provider is measured."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from fastkd.bench import gpu_suite

    rc = gpu_suite.main(["--dry-run", "--cases", "distill-jsd", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "gpu_suite_dry.json").read_text())
    triton_rows = [r for r in rows if r["provider"] == "fastkd-triton"]
    assert rc == 0 and triton_rows and triton_rows[0]["status"] == "ok"
    assert triton_rows[0]["max_abs_err"] < 1e-3


def test_kernel_files_share_helpers_through_blocks():
    """The shared @triton.jit helpers and workspace slot names come from kernels/_blocks.py; a kernel file imports
    private names from no other kernel file, except a split schedule from its own family's kernel (the
    divergence math of distill.py, the sparse folds of sparse.py)."""
    import ast
    import re
    from pathlib import Path

    allowed = {("distill_split.py", "distill"), ("sparse_split.py", "sparse")}
    folder = Path(__file__).resolve().parents[2] / "kernels"
    seen = set()
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastkd.kernels."):
                src = node.module.rsplit(".", 1)[1]
                seen.add((path.name, src))
                assert src == "_blocks" or (path.name, src) in allowed, f"{path.name} imports from {src}"
    assert {("distill.py", "_blocks"), ("distill_split.py", "_blocks"), ("distill_akl.py", "_blocks"),
            ("sparse_split.py", "_blocks")} <= seen
    akl = (folder / "distill_akl.py").read_text()
    assert not re.search(r"\b(wp|wr) \+ \d", akl), "distill_akl addresses a workspace slot by number"


@pytest.mark.parametrize("schedule", ["split", "two_pass"])
def test_tvd_ties_take_torch_sign_zero(schedule):
    """tvd's gradient takes sign(q − p) = 0 where q = p (torch.sign, the reference's autograd of |x|): rows whose
    student equals the teacher (one with −inf columns) give a zero loss and an exactly zero gradient; a row
    equal but for two columns and a row of another teacher match the float64 reference. The kernels take the
    sign from a clamp of the scaled difference, not a compare (kernels/distill._tvd_terms)."""
    g = torch.Generator().manual_seed(7)
    s = torch.randn(5, 131, generator=g) * 2
    t = s.clone()
    t[1, [5, 90]] += torch.tensor([1.5, -0.75])
    s[2, [0, 70]] = t[2, [0, 70]] = -math.inf
    t[4] = torch.randn(131, generator=g) * 2
    with TD.override_config(schedule=schedule):
        loss, grad = _run(s, t, "tvd", reduction="none")
    rl, rg = _ref(s, t, "tvd", reduction="none")
    assert torch.equal(loss[[0, 2, 3]], torch.zeros(3)) and torch.equal(grad[[0, 2, 3]], torch.zeros(3, 131))
    torch.testing.assert_close(loss.double(), rl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), rg, rtol=1e-4, atol=1e-6)


# (BLOCK_V, SUB_V, num_warps) of the three row shapes below: aligned rows take the table's split_launch with
# segments of two sub-blocks; unaligned rows take split_unaligned (jsd: one sub-block of 4096; tvd: 8 warps)
SUB_LAUNCHES = {"jsd": [(8192, 4096, 8), (8192, 4096, 8), (4096, 4096, 8)],
                "tvd": [(8192, 4096, 4), (8192, 4096, 4), (8192, 4096, 8)]}


@pytest.mark.parametrize("div", sorted(SUB_LAUNCHES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", range(3), ids=["sub1_empty", "sub1_tail", "unaligned"])
def test_split_sub_blocks_vs_float64(case, dtype, div, monkeypatch):
    """jsd's and tvd's default split launches (2-byte logits, rows of a multiple of 16 columns) take segments of
    8192 columns whose mid and final phases loop over two sub-blocks of 4096 (the table's ``split_sub``): the tail
    segment's second sub-block is empty (v = 8192 + 112) or a masked tail (8192 + 4096 + 80); rows that are not
    vector-loadable (v odd) take the table's ``split_unaligned`` (``unaligned_config``). −inf columns, a
    zero-weight row (labels −100), labels and the float64 reference."""
    from fastkd.kernels import distill_split as KS

    v = (8192 + 112, 8192 + 4096 + 80, 8192 + 4096 + 77)[case]
    seen = spy_launches(monkeypatch, KS, "_distill_split_kernel",
                        lambda grid, kw: (kw["BLOCK_V"], kw["SUB_V"], kw["num_warps"]))
    hyper = {"beta": 0.3} if div == "jsd" else {}
    g = torch.Generator().manual_seed(v)
    s = (torch.randn(3, v, generator=g) * 3).to(dtype)
    t = (torch.randn(3, v, generator=g) * 3).to(dtype)
    s[0, [3, 5000, v - 1]] = t[0, [3, 5000, v - 1]] = -math.inf
    t[1, 8200] = -math.inf
    labels = torch.tensor([7, -100, v - 2])
    x = s.clone().requires_grad_()
    out = fastkd.distill_loss(x, t, div, backend="triton", labels=labels, ce_weight=0.5, reduction="none", **hyper)
    out.sum().backward()
    assert seen == [SUB_LAUNCHES[div][case]]
    fin = lambda z: torch.where(torch.isneginf(z), -1e4, z.double())
    xr = fin(s).requires_grad_()
    rl = R.distill_loss(xr, fin(t), div, labels=labels, ce_weight=0.5, reduction="none", **hyper)
    rl.sum().backward()
    rgrad = torch.where(torch.isneginf(s), 0.0, xr.grad)
    torch.testing.assert_close(out.double(), rl.detach(), rtol=2e-5, atol=2e-5)
    eps = GRAD_EPS[dtype]
    torch.testing.assert_close(x.grad.double(), rgrad, rtol=eps, atol=2 * eps * rgrad.abs().max().item() + 1e-7)
    assert torch.equal(x.grad[1], torch.zeros_like(x.grad[1]))
