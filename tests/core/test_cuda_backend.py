"""CUDA C++ backend (fastkd._C) vs the float64 reference, the torch backend and the Triton backend.

GPU-only: every test is skipped without a CUDA device, and nothing here touches CUDA at import. The
extension is the prebuilt ``fastkd._C`` or, where nvcc is present, JIT-built on first use (about a minute).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import logits, teacher
from helpers import ref_loss_grad as _ref
from hypothesis_compat import HealthCheck, given, settings, st

import fastkd
from fastkd import reference as R
from fastkd.core.registry import BackendUnavailableError


def _logits(shape, dtype, scale=2.0):
    return logits(shape, dtype, scale, device="cuda")


def _teacher(shape, dtype, div):
    return teacher(shape, dtype, div, device="cuda")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DIVS = fastkd.DIVERGENCES
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GRAD_EPS = {torch.float32: 2e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}


@pytest.fixture(scope="module", autouse=True)
def _extension():
    from fastkd import _cpp_lib

    err = _cpp_lib.load_error()
    if err is not None:
        pytest.skip(f"fastkd._C unavailable: {err}")
    _cpp_lib.lib()  # JIT-builds here if needed, once per module
    import fastkd.distill.cuda_impl  # noqa: F401
    import fastkd.ot.cuda_impl  # noqa: F401
    import fastkd.sparse.cuda_impl  # noqa: F401  (registers even where ops do not declare it yet)


def _run(zs, zt, div, backend="cuda", **kw):
    x = zs.clone().requires_grad_()
    out = fastkd.distill_loss(x, zt, div, backend=backend, **kw)
    out.sum().backward()
    return out.detach(), x.grad


def _check(s, zt, div, others=("torch", "triton"), **kw):
    loss, grad = _run(s, zt, div, **kw)
    rloss, rgrad = _ref(s, zt, div, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == s.dtype
    assert torch.equal(grad[torch.isneginf(s)], torch.zeros_like(grad[torch.isneginf(s)]))
    torch.testing.assert_close(loss.double(), rloss, rtol=2e-5, atol=2e-5 * (1 + rloss.abs().max().item()))
    eps = GRAD_EPS[s.dtype]
    gscale = rgrad.abs().max().item()
    torch.testing.assert_close(grad.double(), rgrad, rtol=eps, atol=2 * eps * gscale + 1e-7)
    for other in others:
        try:
            oloss, ograd = _run(s, zt, div, backend=other, **kw)
        except BackendUnavailableError:
            continue
        torch.testing.assert_close(loss, oloss, rtol=2e-5, atol=2e-5 * (1 + oloss.abs().max().item()))
        torch.testing.assert_close(grad.float(), ograd.float(), rtol=eps, atol=2 * eps * gscale + 1e-7)
    return loss, grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", DIVS)
def test_matches_reference(div, dtype):
    shape = (3, 47, 1271)  # odd: V not a multiple of any vector width / block
    s, t = _logits(shape, dtype), _teacher(shape, dtype, div)
    mask = torch.rand(shape[:-1], device="cuda") > 0.3
    _check(s, t, div, temperature=1.7, scale_by_t2=True, mask=mask)


@pytest.mark.parametrize("div", DIVS)
def test_labels_ce_and_reductions(div):
    s, t = _logits((3, 67), torch.float32), _teacher((3, 67), torch.float32, div)
    labels = torch.tensor([5, -100, 66], device="cuda")
    _check(s, t, div, labels=labels, ce_weight=0.7, temperature=2.0, reduction="sum")
    _check(s, t, div, labels=labels, ce_weight=1.3, reduction="none", others=())
    _check(s, t, div, labels=labels, reduction="mean", num_items_in_batch=7, others=())


@pytest.mark.parametrize("div", DIVS)
def test_neg_inf_logits(div):
    s, t = _logits((4, 1031), torch.bfloat16), _teacher((4, 1031), torch.bfloat16, div)
    cols = torch.rand(s.shape, device="cuda") < 0.25
    cols[:, 0] = False
    s[cols] = float("-inf")
    t[cols] = float("-inf")
    loss, grad = _check(s, t, div, temperature=0.8)
    assert torch.isfinite(loss).all() and torch.isfinite(grad.float()).all()


@pytest.mark.parametrize("div", ("fkl", "jsd", "tvd", "taid"))
def test_neg_inf_teacher_only_finite(div):
    s, t = _logits((3, 515), torch.float32), _logits((3, 515), torch.float32)
    t[torch.rand(t.shape, device="cuda") < 0.3] = float("-inf")
    loss, grad = _check(s, t, div, reduction="none", t=0.3)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("div", ("rkl", "symkl", "akl"))
def test_neg_inf_teacher_only_infinite(div):
    s, t = _logits((3, 515), torch.float32), _teacher((3, 515), torch.float32, div)
    t[:, 7] = float("-inf")
    loss, _ = _run(s, t, div, reduction="none")
    rloss, _ = _ref(s, t, div, reduction="none")
    assert torch.isinf(rloss).all() and torch.equal(loss.double().cpu(), rloss.cpu())


@pytest.mark.parametrize("div", ("fkl", "akl", "srkl"))
def test_vocab_padding_strided_and_misaligned_rows(div):
    # vocab_size slices a view whose rows are strided; V=1001 with an odd row stride defeats 16-byte loads
    s, t = _logits((5, 1003), torch.bfloat16), _teacher((5, 1001), torch.bfloat16, div)
    x = s.clone().requires_grad_()
    out = fastkd.distill_loss(x, t, div, vocab_size=1001, backend="cuda", reduction="sum")
    out.backward()
    rloss, rgrad = _ref(s[:, :1001], t, div, reduction="sum")
    torch.testing.assert_close(out.double(), rloss, rtol=2e-5, atol=2e-5)
    gmax = rgrad.abs().max().item()
    torch.testing.assert_close(x.grad[:, :1001].double(), rgrad, rtol=2**-8, atol=2**-7 * gmax)
    assert torch.equal(x.grad[:, 1001:], torch.zeros_like(x.grad[:, 1001:]))


def test_strided_rows_vectorised_path_with_tail():
    # both row strides are 1024 elements (16-byte aligned), V = 1001 leaves a one-column scalar tail
    s, t = _logits((6, 1024), torch.bfloat16), _teacher((6, 1024), torch.bfloat16, "rkl")
    x = s.clone().requires_grad_()
    out = fastkd.distill_loss(x, t, "rkl", vocab_size=1001, backend="cuda", reduction="sum")
    out.backward()
    rloss, rgrad = _ref(s[:, :1001], t[:, :1001], "rkl", reduction="sum")
    torch.testing.assert_close(out.double(), rloss, rtol=2e-5, atol=2e-5)
    gmax = rgrad.abs().max().item()
    torch.testing.assert_close(x.grad[:, :1001].double(), rgrad, rtol=2**-8, atol=2**-7 * gmax)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", ("fkl", "jsd", "akl"))
def test_inplace_grad_aliases_student(div, dtype):
    s, t = _logits((6, 2053), dtype), _teacher((6, 2053), dtype, div)
    rloss, rgrad = _ref(s, t, div)
    leaf = s.clone().requires_grad_()
    x = leaf * 1  # non-leaf whose storage may be overwritten
    out = fastkd.distill_loss(x, t, div, inplace_grad=True, backend="cuda")
    out.backward()
    torch.testing.assert_close(out.double(), rloss, rtol=2e-5, atol=2e-5)
    eps = GRAD_EPS[dtype]
    gmax = rgrad.abs().max().item()
    torch.testing.assert_close(leaf.grad.double(), rgrad, rtol=eps, atol=2 * eps * gmax + 1e-7)


@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_grad_output_not_one(reduction):
    s, t = _logits((4, 300), torch.float32), _logits((4, 300), torch.float32)
    x = s.clone().requires_grad_()
    out = fastkd.distill_loss(x, t, "jsd", reduction=reduction, backend="cuda")
    go = torch.randn_like(out) * 3
    out.backward(go)
    xr = s.double().requires_grad_()
    R.distill_loss(xr, t.double(), "jsd", reduction=reduction).backward(go.double())
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-7)


def test_excluded_rows_are_zero_whatever_the_logits():
    s, t = _logits((4, 257), torch.float32), _logits((4, 257), torch.float32)
    s[1] = float("nan")
    t[1] = float("-inf")
    mask = torch.tensor([True, False, True, True], device="cuda")
    for div in DIVS:
        loss, grad = _run(s, t, div, mask=mask, reduction="none")
        assert loss[1].item() == 0 and torch.equal(grad[1], torch.zeros_like(grad[1]))
        assert torch.isfinite(loss[[0, 2, 3]]).all()
    loss, grad = _run(s, t, "fkl", mask=torch.zeros(4, dtype=torch.bool, device="cuda"))
    assert loss.item() == 0 and not grad.any()


def test_nan_input_gives_nan():
    s, t = _logits((2, 100), torch.float32), _logits((2, 100), torch.float32)
    s[0, 3] = float("nan")
    loss, _ = _run(s, t, "fkl", reduction="none")
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])


@pytest.mark.parametrize("side", ["teacher", "student"])
@pytest.mark.parametrize(("div", "kw"), [(d, {}) for d in DIVS] + [("skl", {"alpha": 1.0}), ("jsd", {"beta": 0.0})])
def test_nan_or_inf_in_either_input_gives_nan(div, kw, side):
    """Issue 13 item 2: NaN / +inf in the teacher (or student) gives a NaN loss for that row, as on torch / Triton."""
    for bad in (math.nan, math.inf):
        s, t = _logits((3, 300), torch.float32), _logits((3, 300), torch.float32)
        (t if side == "teacher" else s)[1, 7] = bad
        loss, _ = _run(s, t, div, reduction="none", **kw)
        assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


def test_label_out_of_range_gives_nan_without_reading_outside_the_row():
    """Issue 13 item 3: value checks are off for CUDA tensors; a bad label must not be dereferenced."""
    from fastkd.core.params import DistillParams
    from fastkd.distill import cuda_impl

    s, t = _logits((3, 50), torch.float32), _logits((3, 50), torch.float32)
    labels = torch.tensor([50, -1, 4], device="cuda")
    loss = cuda_impl.distill_forward(s, t, labels, torch.ones(3, device="cuda"), None, DistillParams(ce_weight=1.0))
    assert torch.isnan(loss[:2]).all() and torch.isfinite(loss[2])

@pytest.mark.parametrize(("div", "kw"), [
    ("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}), ("skl", {"alpha": 0.0}), ("skl", {"alpha": 1.0}),
    ("srkl", {"alpha": 0.0}), ("srkl", {"alpha": 1.0}), ("symkl", {"beta": 0.2}), ("taid", {"t": 0.0}),
    ("taid", {"t": 1.0}), ("akl", {"mu": 0.0}), ("akl", {"mu": 0.9}), ("akl", {"mu": 1.0})])
def test_parameter_endpoints(div, kw):
    s, t = _logits((3, 131), torch.float32), _teacher((3, 131), torch.float32, div)
    _check(s, t, div, **kw)


def test_akl_peaked_teacher_and_large_vocab():
    s = _logits((8, 128256), torch.bfloat16)
    t = _logits((8, 128256), torch.bfloat16, scale=8.0)
    _check(s, t, "akl", others=("torch",))


def test_bf16_no_worse_than_pytorch_bf16():
    s, t = _logits((16, 4099), torch.bfloat16), _logits((16, 4099), torch.bfloat16)
    loss, _ = _run(s, t, "fkl", reduction="none")
    rloss, _ = _ref(s, t, "fkl", reduction="none")
    lp, lq = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    torch_err = (torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1).double()
                 - rloss).abs().max()
    assert (loss.double() - rloss).abs().max() <= torch_err + 1e-5


def test_deterministic_bitwise():
    s, t = _logits((64, 50257), torch.bfloat16), _logits((64, 50257), torch.bfloat16)
    for div in ("fkl", "akl", "tvd"):
        a = _run(s, t, div, reduction="none")
        b = _run(s, t, div, reduction="none")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_tiny_shapes_vs_float64_autograd():
    # The kernel has no float64 path (torch.autograd.gradcheck needs one), so on tiny problems its fp32
    # gradient is checked against float64 autograd through the reference (every divergence, T != 1, ce).
    s, t = _logits((2, 9), torch.float32), _logits((2, 9), torch.float32)
    labels = torch.tensor([3, 8], device="cuda")
    for div in DIVS:
        t_ = _teacher((2, 9), torch.float32, div) if div == "akl" else t
        _check(s, t_, div, others=(), temperature=1.3, labels=labels, ce_weight=0.4)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 9), v=st.integers(1, 3000), div=st.sampled_from(DIVS),
       temp=st.sampled_from([0.5, 1.0, 3.0]), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_property_vs_torch_backend(rows, v, div, temp, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    s = (torch.randn(rows, v, generator=g, device="cuda") * 3).to(dtype)
    t = (torch.randn(rows, v, generator=g, device="cuda") * 3).to(dtype)
    loss, grad = _run(s, t, div, temperature=temp, reduction="none")
    tloss, tgrad = _run(s, t, div, temperature=temp, reduction="none", backend="torch")
    torch.testing.assert_close(loss, tloss, rtol=1e-4, atol=1e-5)
    eps = GRAD_EPS[dtype]
    gmax = tgrad.float().abs().max().item()
    torch.testing.assert_close(grad.float(), tgrad.float(), rtol=eps, atol=2 * eps * gmax + 1e-6)


def test_bad_inputs_name_the_problem():
    s = torch.randn(2, 8, dtype=torch.float64, device="cuda")
    with pytest.raises(BackendUnavailableError, match="float64"):
        fastkd.distill_loss(s, s.clone(), backend="cuda")
    with pytest.raises(BackendUnavailableError, match="cpu"):
        fastkd.distill_loss(s.float().cpu(), s.float().cpu(), backend="cuda")


def test_launch_error_raises_with_cuda_string():
    from fastkd import _cpp_lib

    lib = _cpp_lib.lib()
    s = torch.randn(2, 8, device="cuda")
    w = torch.ones(2, device="cuda")
    loss = torch.empty(2, device="cuda")
    with pytest.raises(RuntimeError, match="CUDA error"):  # unknown dtype code → cudaErrorInvalidValue
        lib.distill(s.data_ptr(), s.data_ptr(), 0, 0, w.data_ptr(), loss.data_ptr(), 2, 8, 8, 8, 0, 9, 0,
                    1.0, 1.0, [0.5, 0.1, 0.5, 0.5], 0.0, torch.cuda.current_stream().cuda_stream)
    with pytest.raises(ValueError, match="hyper"):  # wrong number of hyperparameters (std::invalid_argument)
        lib.distill(s.data_ptr(), s.data_ptr(), 0, 0, w.data_ptr(), loss.data_ptr(), 2, 8, 8, 8, 0, 0, 0,
                    1.0, 1.0, [0.5], 0.0, torch.cuda.current_stream().cuda_stream)


# ---------------------------------------------------------------------------------------------------------
# sparse and sinkhorn
# ---------------------------------------------------------------------------------------------------------


def _sparse_inputs(n, v, k, dtype):
    s = _logits((n, v), dtype)
    ids = torch.stack([torch.randperm(v, device="cuda")[:k] for _ in range(n)])
    ids[0, -2:] = -1  # padding slots
    vals = torch.log_softmax(torch.randn(n, k, device="cuda") * 2, -1)
    return s, ids, vals


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("mode", "div"), [("topk", "fkl"), ("topk", "rkl"), ("topk", "jsd"),
                                           ("topk_tail", "fkl"), ("topk_tail", "rkl"), ("topk_tail", "jsd")])
def test_sparse_vs_torch(mode, div, dtype):
    s, ids, vals = _sparse_inputs(7, 3001, 17, dtype)
    if mode == "topk_tail":
        vals = vals - 0.7  # leave tail mass
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 1], dtype=torch.bool, device="cuda")
    out = {}
    for backend in ("cuda", "torch"):
        x = s.clone().requires_grad_()
        loss = fastkd.sparse_distill_loss(x, ids, vals, mode=mode, divergence=div, temperature=1.5,
                                          mask=mask, reduction="none", backend=backend)
        loss.sum().backward()
        out[backend] = (loss.detach(), x.grad)
    torch.testing.assert_close(out["cuda"][0], out["torch"][0], rtol=1e-5, atol=1e-5)
    eps = GRAD_EPS[dtype]
    g = out["torch"][1].float()
    gmax = g.abs().max().item()
    torch.testing.assert_close(out["cuda"][1].float(), g, rtol=eps, atol=2 * eps * gmax + 1e-7)


def test_sinkhorn_vs_torch():
    torch.manual_seed(0)
    x = torch.rand(5, 37, 3, device="cuda")
    y = torch.rand(5, 53, 3, device="cuda")
    for dt in (torch.float32, torch.float64):
        kw = dict(x=x.to(dt), y=y.to(dt), eps=0.05, max_iter=200, tol=1e-7)
        rc = fastkd.sinkhorn(backend="cuda", **kw)
        rt = fastkd.sinkhorn(backend="torch", **kw)
        assert rc.n_iter == rt.n_iter
        tol = 1e-4 if dt == torch.float32 else 1e-10
        torch.testing.assert_close(rc.value, rt.value, rtol=tol, atol=tol)
        torch.testing.assert_close(rc.f, rt.f, rtol=tol, atol=tol)
        torch.testing.assert_close(rc.g, rt.g, rtol=tol, atol=tol)
    cost = torch.rand(3, 20, 30, device="cuda", dtype=torch.float64)
    rc = fastkd.sinkhorn(cost=cost, eps=0.01, eps_scaling=0.5, max_iter=60, backend="cuda")
    rt = fastkd.sinkhorn(cost=cost, eps=0.01, eps_scaling=0.5, max_iter=60, backend="torch")
    assert rc.n_iter == rt.n_iter
    torch.testing.assert_close(rc.reg_value, rt.reg_value, rtol=1e-9, atol=1e-10)
    assert math.isfinite(float(rc.error.max()))
