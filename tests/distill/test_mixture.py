"""Multi-teacher mixtures (issue 16 item 3): distill_loss / fused_linear_distill_loss with teacher_weights vs the
float64 reference applied to the mixture p = Σ_m w_m softmax(t_m / T) computed in float64 from the M teachers."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastkd
from fastkd import reference as R
from fastkd.distill import triton_impl as TD

DIVS = fastkd.DIVERGENCES
EXTRA = {"beta": 0.3, "alpha": 0.2, "mu": 0.4, "t": 0.6}
needs_triton = pytest.mark.skipif(TD._IMPORT_ERROR is not None, reason=f"no triton: {TD._IMPORT_ERROR}")


def _mix_logits(t: torch.Tensor, w: torch.Tensor, temperature: float, cap: float | None = None) -> torch.Tensor:
    """float64 teacher logits of the mixture: T · log Σ_m w_m softmax(cap(t_m) / T) (−inf where p = 0)."""
    t = R.apply_softcap(t.double(), cap)
    lw = w.double().reshape(*w.shape, *[1] * (t.dim() - w.dim()))
    p = (lw * torch.softmax(t / temperature, -1)).sum(0)
    return p.log() * temperature


def _ref(s, zt, div, **kw):
    """(loss, grad) of the float64 reference; the gradient with −inf replaced by −1e4 (exp underflows to 0)."""
    out = R.distill_loss(s.double(), zt, div, **kw)
    x = s.double().requires_grad_()
    y = R.distill_loss(x, torch.where(torch.isneginf(zt), -1e4, zt), div, **kw).sum()
    return out, (torch.autograd.grad(y, x)[0] if y.requires_grad else torch.zeros_like(x))


def _run(s, teachers, div, **kw):
    x = s.clone().requires_grad_()
    with TD.override_config(block_v=32):
        out = fastkd.distill_loss(x, teachers, div, **kw)
    out.sum().backward()
    return out.detach(), x.grad


def _problem(m=3, lead=(2, 5), v=131, dtype=torch.float32, seed=0, per_token=True):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(*lead, v, generator=g) * 2).to(dtype)
    t = (torch.randn(m, *lead, v, generator=g) * 2.5).to(dtype)
    t[0][torch.rand(*lead, v, generator=g) < 0.2] = -math.inf  # one teacher's -inf: the mixture stays finite
    s[..., 3] = t[..., 3] = -math.inf  # every teacher and the student: p = q = 0 there
    w = torch.rand(m, *lead, generator=g) if per_token else torch.rand(m, generator=g)
    w[0].mul_(0.0 if per_token else 1.0)  # zero weights are legal
    w = w / w.sum(0)
    return s, t, w


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_every_divergence_matches_float64_mixture(backend):
    lead = (2, 5) if backend == "torch" else (2, 3)  # the interpreter is slow: one chunk of 6 rows
    s, t, w = _problem(lead=lead)
    mask = torch.rand(lead, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[0, 0] = False
    for div in DIVS:
        kw = dict(temperature=1.7, scale_by_t2=True, mask=mask, **EXTRA)
        chunk = 4 if backend == "torch" else None  # torch: 3 mixture chunks of 4, 4, 2 rows
        loss, grad = _run(s, t, div, backend=backend, teacher_weights=w, chunk_size=chunk, reduction="none", **kw)
        rloss, rgrad = _ref(s, _mix_logits(t, w, 1.7), div, reduction="none", **kw)
        torch.testing.assert_close(loss.double(), rloss, rtol=2e-5, atol=2e-5, msg=div)
        torch.testing.assert_close(grad.double(), rgrad, rtol=1e-4, atol=1e-6, msg=div)
        assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask])) and torch.isfinite(loss).all()


@pytest.mark.parametrize("div", ["fkl", "jsd", "taid", "akl"])
def test_global_weights_labels_ce_and_sum(div):
    s, t, w = _problem(m=2, lead=(7,), v=61, seed=2, per_token=False)
    labels = torch.randint(0, 61, (7,), generator=torch.Generator().manual_seed(3))
    labels[::3] = -100
    kw = dict(labels=labels, ce_weight=0.4, reduction="sum", temperature=0.9, **EXTRA)
    loss, grad = _run(s, t, div, backend="torch", teacher_weights=w.tolist(), **kw)
    rloss, rgrad = _ref(s, _mix_logits(t, w, 0.9), div, **kw)
    torch.testing.assert_close(loss.double(), rloss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_bf16(backend):
    """bf16 teachers/student: the error is that of the single-teacher loss on the same inputs, plus the one
    bf16 rounding of the mixture logits (measured here as the reference's change under that rounding)."""
    s, t, w = _problem(dtype=torch.bfloat16, seed=4, lead=(2, 3))
    zt = _mix_logits(t, w, 1.5)
    for div in ("fkl", "rkl", "jsd", "tvd") if backend == "torch" else ("fkl", "tvd"):
        loss, grad = _run(s, t, div, backend=backend, teacher_weights=w, temperature=1.5, reduction="none")
        rloss, rgrad = _ref(s, zt, div, temperature=1.5, reduction="none")
        shifted = (zt - zt.amax(-1, keepdim=True)).to(torch.bfloat16).double()  # what the kernel receives
        sloss, sgrad = _ref(s, shifted, div, temperature=1.5, reduction="none")
        assert ((loss.double() - rloss).abs() <= 2 * (sloss - rloss).abs() + 1e-4 * (1 + rloss.abs())).all(), div
        # the gradient is the exact one of the rounded mixture, rounded once to bf16
        torch.testing.assert_close(grad.double(), sgrad, rtol=2**-8, atol=2**-7 * sgrad.abs().max().item(), msg=div)


@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd", "ab"])
def test_gradcheck_float64(div):
    s, t, w = _problem(m=3, lead=(3,), v=7, dtype=torch.float64, seed=5)
    s[..., 3] = t[..., 3] = 0.5  # gradcheck needs finite student logits (and rkl a finite divergence)
    x = s.clone().requires_grad_()
    f = lambda y: fastkd.distill_loss(y, t, div, teacher_weights=w, temperature=1.3, reduction="none", **EXTRA)
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_one_teacher_is_bitwise_the_single_teacher_loss(backend):
    s, t, _ = _problem(m=1, seed=6, lead=(2, 3))
    for w in ([1.0], torch.ones(1, 2, 3)) if backend == "torch" else (torch.ones(1, 2, 3),):
        loss, grad = _run(s, t, "jsd", backend=backend, teacher_weights=w, temperature=2.0)
        loss1, grad1 = _run(s, t[0], "jsd", backend=backend, temperature=2.0)
        assert torch.equal(loss, loss1) and torch.equal(grad, grad1)


def test_bad_weights_and_shapes():
    s, t, w = _problem(m=2, lead=(4,), v=11, seed=7)
    with pytest.raises(ValueError, match="teacher_weights"):
        fastkd.distill_loss(s, t, teacher_weights=[0.6, 0.6])
    with pytest.raises(ValueError, match="teacher_weights"):
        fastkd.distill_loss(s, t, teacher_weights=[1.5, -0.5])
    with pytest.raises(ValueError, match="teacher_weights"):
        fastkd.distill_loss(s, t, teacher_weights=[math.nan, 1.0])
    bad = w.clone()
    bad[:, 2] = torch.tensor([0.3, 0.3])
    with pytest.raises(ValueError, match="token 2"):
        fastkd.distill_loss(s, t, teacher_weights=bad)
    # an excluded token is not checked
    fastkd.distill_loss(s, t, teacher_weights=bad, mask=torch.tensor([True, True, False, True]))
    with pytest.raises(ValueError, match="teacher_weights must have shape"):
        fastkd.distill_loss(s, t, teacher_weights=torch.full((3,), 1 / 3))
    with pytest.raises(ValueError, match="teacher_weights must have shape"):
        fastkd.distill_loss(s, t, teacher_weights=torch.full((2, 5), 0.5))
    with pytest.raises(TypeError, match="teacher_weights"):
        fastkd.distill_loss(s, t, teacher_weights=torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="teacher_weights"):  # a stacked teacher without weights
        fastkd.distill_loss(s, t)
    with pytest.raises(ValueError, match="teacher_weights needs"):  # weights without a stacked teacher
        fastkd.distill_loss(s, t[0], teacher_weights=[1.0])
    with pytest.raises(ValueError, match="teacher_weights needs"):
        fastkd.fused_linear_distill_loss(torch.randn(4, 3), torch.randn(11, 3), torch.randn(4, 3),
                                         torch.randn(11, 3), teacher_weights=[1.0])
    with pytest.raises(ValueError, match="need teacher_weights"):
        fastkd.fused_linear_distill_loss(torch.randn(4, 3), torch.randn(11, 3), [torch.randn(4, 3)],
                                         [torch.randn(11, 3)])


def _linear(h, w, b):
    return torch.nn.functional.linear(h, w, b)


def _heads(m, n=29, h=12, v=61, dtype=torch.float64, seed=8):
    g = torch.Generator().manual_seed(seed)
    r = lambda *sh: torch.randn(*sh, generator=g, dtype=torch.float64).to(dtype)
    sizes = [9, 5, 16, 7][:m]
    return (r(n, h), r(v, h) * 0.5, r(v),
            [r(n, ht) for ht in sizes], [r(v, ht) * 0.6 for ht in sizes], [r(v) if i % 2 else None
                                                                          for i in range(m)])


@pytest.mark.parametrize(("div", "reduction", "opts"), [
    ("fkl", "mean", {}), ("jsd", "none", {"softcap": 2.5, "temperature": 1.8}),
    ("akl", "sum", {"per_token": True}), ("taid", "mean", {"logits": True, "softcap": 3.0}),
    ("rkl", "mean", {"backend": "triton", "per_token": True}),
])
def test_fused_matches_float64_mixture(div, reduction, opts):
    opts = dict(opts)
    backend, per_token, logits = opts.pop("backend", "torch"), opts.pop("per_token", False), opts.pop("logits", False)
    if backend == "triton" and TD._IMPORT_ERROR is not None:
        pytest.skip("no triton")
    dtype = torch.float32 if backend == "triton" else torch.float64
    hs, ws, bs, ths, tws, tbs = _heads(3, dtype=dtype)
    g = torch.Generator().manual_seed(9)
    w = torch.rand(3, 29, generator=g) if per_token else torch.rand(3, generator=g)
    w = (w / w.sum(0)).to(torch.float64)
    tl = [_linear(h, wt, b) for h, wt, b in zip(ths, tws, tbs)]
    temperature, cap = opts.get("temperature", 1.0), opts.get("softcap")
    labels = torch.randint(0, 61, (29,), generator=g)
    labels[::4] = -100
    kw = dict(divergence=div, labels=labels, reduction=reduction, **EXTRA, **opts)
    teach = dict(teacher_logits=torch.stack(tl)) if logits else dict(teacher_hidden=ths, teacher_weight=tws,
                                                                       teacher_bias=tbs)
    leaves = [x.clone().requires_grad_() for x in (hs, ws, bs)]
    with TD.override_config(block_v=32):
        out = fastkd.fused_linear_distill_loss(*leaves[:2], student_bias=leaves[2], teacher_weights=w,
                                               chunk_size=8, backend=backend, **teach, **kw)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, go.to(out.dtype))
    refl = [x.double().clone().requires_grad_() for x in (hs, ws, bs)]
    zs = R.apply_softcap(_linear(*refl), cap)
    zt = _mix_logits(torch.stack([x.double() for x in tl]), w, temperature, cap)
    ref = R.distill_loss(zs, zt, **{k: v for k, v in kw.items() if k != "softcap"})
    rgrads = torch.autograd.grad(ref, refl, go)
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(out.double(), ref, **tol)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a.double(), b, **tol)


def test_fused_one_teacher_bitwise():
    hs, ws, bs, ths, tws, tbs = _heads(1, dtype=torch.float32)
    outs = []
    for teach in (dict(teacher_hidden=ths, teacher_weight=tws, teacher_bias=tbs, teacher_weights=[1.0]),
                  dict(teacher_hidden=ths[0], teacher_weight=tws[0], teacher_bias=tbs[0])):
        leaves = [x.clone().requires_grad_() for x in (hs, ws)]
        out = fastkd.fused_linear_distill_loss(*leaves, chunk_size=8, divergence="jsd", softcap=3.0, **teach)
        outs.append((out, *torch.autograd.grad(out, leaves)))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


class _Allocations(TorchDispatchMode):
    """Bytes of every new storage made by an op (outputs that share no storage with an input)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        flat += [x for a in args if isinstance(a, (list, tuple)) for x in a if isinstance(x, torch.Tensor)]
        ins = {a.untyped_storage().data_ptr() for a in flat}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in ins:
                self.sizes.append(t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_memory_is_independent_of_m(dtype):
    """Allocations of a fused mixture call: the same whatever M (2 or 4 teachers), none of (N, V) size."""
    n, v, rows = 96, 80, 8
    totals = {}
    for m in (2, 4):
        hs, ws, _, ths, tws, _ = _heads(m, n=n, v=v, dtype=dtype)
        with _Allocations() as log:
            fastkd.fused_linear_distill_loss(hs.requires_grad_(), ws.requires_grad_(), ths, tws, backend="torch",
                                             teacher_weights=[1 / m] * m, chunk_size=rows, divergence="jsd")
        big = [b for b in log.sizes if b >= rows * v * 2]
        assert max(big) < n * v * 2, "an (N, V) buffer was allocated"
        totals[m] = sum(big)
    assert totals[2] == totals[4], totals


def test_stats_are_those_of_the_mixture():
    s, t, w = _problem(m=2, lead=(9,), v=40, seed=10)
    mask = torch.ones(9, dtype=torch.bool)
    mask[4] = False
    _, stats = fastkd.distill_loss(s, t, "jsd", teacher_weights=w, temperature=1.4, mask=mask, chunk_size=4,
                                   backend="torch", return_stats=True)
    ref = R.distill_stats(s.double(), _mix_logits(t, w, 1.4), temperature=1.4, mask=mask)
    for k in ("teacher_entropy", "student_entropy", "kl"):
        torch.testing.assert_close(stats[k].double(), ref[k], rtol=1e-5, atol=1e-6, msg=k)
    assert torch.equal(stats["top1_agree"].double(), ref["top1_agree"])


def test_fused_bf16_and_stats_of_the_mixture():
    """bf16 fused mixture (fp32 scratch path) equals the unfused mixture on the same bf16 logits up to the
    chunked GEMM's rounding; its stats are the mixture's."""
    hs, ws, _, ths, tws, _ = _heads(2, dtype=torch.bfloat16, seed=11)
    w = torch.tensor([0.35, 0.65])
    out, stats = fastkd.fused_linear_distill_loss(hs, ws, ths, tws, teacher_weights=w, divergence="jsd",
                                                  temperature=1.3, chunk_size=8, return_stats=True)
    zs = hs @ ws.T
    zt = torch.stack([h @ wt.T for h, wt in zip(ths, tws)])
    ref = fastkd.distill_loss(zs, zt, "jsd", teacher_weights=w, temperature=1.3)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=1e-4)
    rstats = R.distill_stats(zs.double(), _mix_logits(zt, w, 1.3), temperature=1.3)
    for k in ("teacher_entropy", "kl"):
        torch.testing.assert_close(stats[k].double(), rstats[k], rtol=2e-2, atol=2e-3, msg=k)


def test_bad_weights_without_value_checks_poison_the_loss():
    """Where value checks are off (a GPU without FASTKD_CHECK_INPUTS), a bad token's weights give NaN, not an
    exception (no host sync) and never a silently wrong finite loss."""
    from fastkd.core import checks as C

    s, t, w = _problem(m=2, lead=(4,), v=11, seed=12)
    bad = w.clone()
    bad[:, 1] = torch.tensor([0.9, 0.9])
    C.set_input_checks(False)
    try:
        out = fastkd.distill_loss(s, t, teacher_weights=bad, reduction="none", backend="torch")
    finally:
        C.set_input_checks(None)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2, 3]]).all()


def test_fused_every_divergence():
    hs, ws, bs, ths, tws, tbs = _heads(3, n=13, v=29, seed=13)
    g = torch.Generator().manual_seed(14)
    w = torch.rand(3, 13, generator=g, dtype=torch.float64)
    w = w / w.sum(0)
    zt = _mix_logits(torch.stack([_linear(h, wt, b) for h, wt, b in zip(ths, tws, tbs)]), w, 1.4, 2.0)
    for div in DIVS:
        kw = dict(temperature=1.4, **EXTRA)
        leaves = [x.clone().requires_grad_() for x in (hs, ws)]
        out = fastkd.fused_linear_distill_loss(*leaves, ths, tws, teacher_bias=tbs, teacher_weights=w, softcap=2.0,
                                               divergence=div, chunk_size=4, **kw)
        grads = torch.autograd.grad(out, leaves)
        refl = [x.clone().requires_grad_() for x in (hs, ws)]
        ref = R.distill_loss(R.apply_softcap(refl[0] @ refl[1].T, 2.0), zt, div, **kw)
        rgrads = torch.autograd.grad(ref, refl) if ref.requires_grad else [torch.zeros_like(x) for x in refl]
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11, msg=div)
        for a, b in zip(grads, rgrads):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=div)
