"""Every Triton kernel, compiled for the GPU (native Triton), against the float64 reference.

Run by ``make gpu-check`` (``pytest -m gpu``: tests/conftest.py then leaves TRITON_INTERPRET unset on a CUDA
host); skipped on CPU machines and in interpreter sessions. Shapes are odd (V not a multiple of 16, several
vocabulary blocks), logits fresh random bf16/fp32 with a few -inf entries and masked (ignored) tokens; each
config compiles once, so the whole file stays near a minute on one H200.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import fastkd
from fastkd import reference as R

pytestmark = pytest.mark.gpu

DEV = os.environ.get("FASTKD_GPU_TEST_DEVICE", "cuda")  # "cpu": dry-check these tests in the interpreter
N, V = 37, 50257  # V = GPT-2's vocabulary: not a multiple of 16, 13 blocks of 4096
FUSED = (300, 256, 384, 32003)  # N, H (student), Ht (teacher), V of the LM-head tests
SINKHORN_N = (40, 300)  # the one-launch small kernel (n <= 64), the tiled half-step kernel
GRAD_EPS = {torch.float32: 2e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}


def _logits(n: int, v: int, dtype: torch.dtype, scale: float = 2.0, neg_inf: bool = True) -> torch.Tensor:
    x = torch.randn(n, v, device=DEV) * scale
    if neg_inf:
        x[1, 7] = float("-inf")  # -inf logits are legal (masked vocabulary entries)
        x[2, :: max(1, v // 50)] = float("-inf")
    return x.to(dtype)


def _check(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """|got − ref| ≤ tol · max|ref| + tiny, tol from the storage dtype's rounding (kernels compute in fp32)."""
    scale = ref.abs().max().item()
    tol = 8 * GRAD_EPS[dtype] * max(scale, 1e-30) + 1e-7
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= tol, f"{what}: max |err| {err:.3e} > {tol:.3e} (max |ref| {scale:.3e})"


def _mask(n: int) -> torch.Tensor:
    m = torch.ones(n, dtype=torch.bool, device=DEV)
    m[::5] = False  # masked tokens: no loss, zero gradient
    return m


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("div", fastkd.DIVERGENCES)
def test_distill_kernel_vs_float64(div, dtype):
    if dtype == torch.float32 and div not in ("fkl", "jsd", "akl"):
        pytest.skip("fp32: fkl / jsd / akl only (each dtype × divergence is one more compile)")
    s = _logits(N, V, dtype).requires_grad_(True)
    t = _logits(N, V, dtype, neg_inf=False)
    mask = _mask(N)
    loss = fastkd.distill_loss(s, t, div, mask=mask, backend="triton")
    (g,) = torch.autograd.grad(loss, [s])
    sd = s.detach().double().requires_grad_(True)
    ref = R.distill_loss(sd, t.double(), div, mask=mask)
    (rg,) = torch.autograd.grad(ref, [sd])
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-4, abs_tol=1e-6), (loss.item(), ref.item())
    _check(g, rg, dtype, f"{div} gradient")
    assert torch.all(g[~mask] == 0)


def test_distill_kernel_labels_temperature_fp16():
    s = _logits(N, 4099, torch.float16).requires_grad_(True)
    t = _logits(N, 4099, torch.float16, neg_inf=False)
    labels = torch.randint(0, 4099, (N,), device=DEV)  # V = 4099: one full block and a 3-column tail
    labels[3] = -100
    kw = dict(temperature=2.0, scale_by_t2=True, labels=labels, ce_weight=0.3)
    loss = fastkd.distill_loss(s, t, "fkl", backend="triton", **kw)
    (g,) = torch.autograd.grad(loss, [s])
    sd = s.detach().double().requires_grad_(True)
    ref = R.distill_loss(sd, t.double(), "fkl", **kw)
    (rg,) = torch.autograd.grad(ref, [sd])
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-3), (loss.item(), ref.item())
    _check(g, rg, torch.float16, "fkl+ce gradient")


@pytest.mark.parametrize("div", ["fkl", "jsd"])
def test_distill_split_schedule_many_rows(div):
    """The split-row kernel (ticketed units, cross-program waits) with thousands of programs in flight: 2048
    rows of V = 50257 inside 50304-wide bf16 tensors (strided rows, masked tail segment) agree with the
    two-pass kernel and the float64 loss; grad_output != 1 per row."""
    from fastkd.distill import triton_impl as TD

    n, v = 2048, 50257
    fs, ft = _logits(n, 50304, torch.bfloat16, neg_inf=False), _logits(n, 50304, torch.bfloat16, neg_inf=False)
    fs[1, ::97] = ft[1, ::97] = float("-inf")  # -inf on both sides: finite loss (student-only -inf gives fkl = inf)
    mask, go = _mask(n), torch.rand(n, device=DEV) + 0.5
    out = {}
    for sched in TD.SCHEDULES:
        x = fs.clone().requires_grad_(True)
        with TD.override_config(schedule=sched):
            loss = fastkd.distill_loss(x[:, :v], ft[:, :v], div, mask=mask, reduction="none", backend="triton")
        (g,) = torch.autograd.grad(loss, [x], go)
        out[sched] = (loss.detach(), g)
    ref = R.distill_loss(fs[:, :v].double(), ft[:, :v].double(), div, mask=mask, reduction="none")
    _check(out["split"][0], ref, torch.float32, f"{div} split loss")
    _check(out["split"][1], out["two_pass"][1].double(), torch.bfloat16, f"{div} split vs two-pass gradient")
    assert torch.all(out["split"][1][:, v:] == 0) and torch.all(out["split"][1][~mask] == 0)


def test_scale_grad_kernel():
    from fastkd.core.autograd import scale_grad_

    g = _logits(N, V, torch.bfloat16, neg_inf=False)
    go = torch.rand(N, device=DEV) + 0.5
    go[4] = 1.0  # a factor of exactly 1 leaves the row untouched
    want = (g.double() * go.double()[:, None])
    scale_grad_(g, go, per_row=True)
    _check(g, want, torch.bfloat16, "scaled gradient")


@pytest.mark.parametrize("mode", ["topk", "topk_tail"])
def test_sparse_kernels_vs_float64(mode):
    from fastkd.sparse import reference as SR

    k = 64
    s = _logits(N, V, torch.bfloat16, neg_inf=False).requires_grad_(True)
    t_lp = torch.log_softmax(torch.randn(N, V, device=DEV, dtype=torch.float64) * 2, -1)
    lp, ids = t_lp.topk(k, -1)
    ids[5, -3:] = -1  # padding slots
    loss = fastkd.sparse_distill_loss(s, ids, lp.float(), mode=mode, backend="triton")
    (g,) = torch.autograd.grad(loss, [s])
    sd = s.detach().double().requires_grad_(True)
    ref = SR.sparse_distill_loss(sd, ids, lp, mode=mode).mean()
    (rg,) = torch.autograd.grad(ref, [sd])
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-4, abs_tol=1e-6), (loss.item(), ref.item())
    _check(g, rg, torch.bfloat16, f"sparse {mode} gradient")


def test_fused_lm_head_triton_vs_float64():
    n, h, ht, v = FUSED
    hs = (torch.randn(n, h, device=DEV) / 4).bfloat16().requires_grad_(True)
    w = (torch.randn(v, h, device=DEV) * 2 / h**0.5).bfloat16().requires_grad_(True)
    hts = (torch.randn(n, ht, device=DEV) / 4).bfloat16()
    wt = (torch.randn(v, ht, device=DEV) * 2 / ht**0.5).bfloat16()
    loss = fastkd.fused_linear_distill_loss(hs, w, hts, wt, divergence="fkl", chunk_size=n // 3 + 1,
                                            backend="triton")  # three chunks
    gh, gw = torch.autograd.grad(loss, [hs, w])
    hd, wd = hs.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = R.distill_loss(hd @ wd.T, hts.double() @ wt.double().T, "fkl")
    rgh, rgw = torch.autograd.grad(ref, [hd, wd])
    assert math.isclose(loss.item(), ref.item(), rel_tol=2e-3), (loss.item(), ref.item())
    # bf16 logits from bf16 GEMMs: a few bf16 roundings of each logit and gradient
    for got, want, what in ((gh, rgh, "grad_hidden"), (gw, rgw, "grad_weight")):
        err = (got.double() - want).abs().max().item()
        assert err <= 0.05 * want.abs().max().item(), f"{what}: {err:.3e}"


def test_fused_sparse_lm_head_triton_vs_float64():
    from fastkd.sparse import reference as SR

    (n, h, _, v), k = FUSED, 64
    hs = (torch.randn(n, h, device=DEV) / 4).bfloat16().requires_grad_(True)
    w = (torch.randn(v, h, device=DEV) * 2 / h**0.5).bfloat16().requires_grad_(True)
    lp, ids = torch.log_softmax(torch.randn(n, v, device=DEV, dtype=torch.float64) * 2, -1).topk(k, -1)
    loss = fastkd.fused_linear_sparse_distill_loss(hs, w, ids, lp.float(), mode="topk_tail", chunk_size=n // 3 + 1,
                                                   backend="triton")
    gh, gw = torch.autograd.grad(loss, [hs, w])
    hd, wd = hs.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = SR.sparse_distill_loss(hd @ wd.T, ids, lp, mode="topk_tail").mean()
    rgh, rgw = torch.autograd.grad(ref, [hd, wd])
    assert math.isclose(loss.item(), ref.item(), rel_tol=2e-3), (loss.item(), ref.item())
    for got, want, what in ((gh, rgh, "grad_hidden"), (gw, rgw, "grad_weight")):
        err = (got.double() - want).abs().max().item()
        assert err <= 0.05 * want.abs().max().item(), f"{what}: {err:.3e}"


@pytest.mark.parametrize(("n", "metric"), [(SINKHORN_N[0], "sqeuclidean"), (SINKHORN_N[1], "sqeuclidean"),
                                           (SINKHORN_N[1], "cosine")])
def test_sinkhorn_kernels_vs_float64(n, metric):
    """n ≤ 64: the one-launch small kernel; n = 300: the tiled half-step kernel (points, cost on the fly)."""
    from fastkd.ot import reference as OR

    x = torch.rand(3, n, 3, device=DEV)
    y = torch.rand(3, n + 5, 3, device=DEV) + 0.25
    out = fastkd.sinkhorn(x=x, y=y, metric=metric, eps=0.1, max_iter=50, tol=0, backend="triton")
    a = torch.full((3, n), 1.0 / n, dtype=torch.float64, device=DEV)
    b = torch.full((3, n + 5), 1.0 / (n + 5), dtype=torch.float64, device=DEV)
    ref = OR.sinkhorn(a, b, OR.pairwise_cost(x.double(), y.double(), metric), 0.1, 50)["value"]
    torch.testing.assert_close(out.value.double(), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("div", ["fkl", "rkl"])
def test_sparse_union_student_ids_vs_float64(div):
    """topk_tail membership (sorted-id tile walk) natively: mode="union" of a teacher top-32 and the student's
    top-64 (ids shared by both sources, padding, ids clustered in one tile), -inf logits, masked tokens."""
    from fastkd.sparse import reference as SR

    s = _logits(N, V, torch.bfloat16).requires_grad_(True)
    t_lp = torch.log_softmax(torch.randn(N, V, device=DEV, dtype=torch.float64) * 2, -1)
    lp_t, ids_t = t_lp.topk(32, -1)
    ids_t = torch.where(s.detach().gather(-1, ids_t) == float("-inf"), -1, ids_t)  # fkl would be infinite there
    ids_s, _ = fastkd.student_topk(s.detach(), 64)
    ids_s[3] = torch.arange(64, device=DEV) + 4100  # clustered: inside one 1024-wide tile
    ids_s[4, :8] = ids_t[4, :8]  # chosen by both
    ids_s[5, -3:] = -1
    lp_s = t_lp.gather(-1, ids_s.clamp_min(0))
    mask = _mask(N)
    loss = fastkd.sparse_distill_loss(s, ids_t, lp_t.float(), mode="union", student_ids=ids_s,
                                      student_id_values=lp_s.float(), divergence=div, mask=mask, reduction="none",
                                      backend="triton")
    (g,) = torch.autograd.grad(loss.sum(), [s])
    ids, vals = fastkd.union_ids(ids_t, lp_t, ids_s, lp_s)
    sd = s.detach().double().requires_grad_(True)
    ref = SR.sparse_distill_loss(sd, ids, vals, mode="topk_tail", divergence=div) * mask
    (rg,) = torch.autograd.grad(ref.sum(), [sd])
    _check(loss.double(), ref.detach(), torch.float32, f"union {div} loss")
    _check(g, rg, torch.bfloat16, f"union {div} gradient")


def test_onpolicy_row_kernels_vs_float64():
    """The on-policy row kernels (Triton, bf16 workspace) under on_policy_distill_loss and logprobs_from_hidden:
    loss and gradients against the torch row math in float64."""
    n, h, _, v = FUSED
    hs = (torch.randn(n, h, device=DEV) / 4).bfloat16().requires_grad_(True)
    w = (torch.randn(v, h, device=DEV) * 2 / h**0.5).bfloat16().requires_grad_(True)
    ids = torch.randint(0, v, (n,), device=DEV)
    t_lp, s_lp = -5 * torch.rand(n, device=DEV), -5 * torch.rand(n, device=DEV)
    kw = dict(temperature=1.3, mask=_mask(n), chunk_size=n // 3 + 1)  # three chunks
    hd, wd = hs.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    for fn, args in ((fastkd.on_policy_distill_loss, (ids, t_lp)),
                     (lambda *a, **k: fastkd.logprobs_from_hidden(*a, **k).sum(), (ids,))):
        extra = {"sampling_logprobs": s_lp} if len(args) == 2 else {}
        opts = kw if len(args) == 2 else {"temperature": kw["temperature"], "chunk_size": kw["chunk_size"]}
        loss = fn(hs, w, *args, backend="triton", **opts, **extra)
        gh, gw = torch.autograd.grad(loss, [hs, w])
        ref = fn(hd, wd, *(a.double() if a.is_floating_point() else a for a in args), backend="torch", **opts,
                 **{k: x.double() for k, x in extra.items()})
        rgh, rgw = torch.autograd.grad(ref, [hd, wd])
        assert math.isclose(loss.item(), ref.item(), rel_tol=2e-3, abs_tol=1e-3), (loss.item(), ref.item())
        for got, want, what in ((gh, rgh, "grad_hidden"), (gw, rgw, "grad_weight")):
            err = (got.double() - want).abs().max().item()
            assert err <= 0.05 * want.abs().max().item(), f"{what}: {err:.3e}"
