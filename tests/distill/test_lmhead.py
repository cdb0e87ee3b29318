"""The LM-head engine (fastkd.core.lmhead): chunk-size rule, softcap, reused workspaces, in-place accumulation."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastkd
from fastkd import reference as R
from fastkd.core import lmhead as L


def test_auto_chunk_rows_budget_and_multiples(monkeypatch):
    monkeypatch.delenv(L.CHUNK_MB_ENV, raising=False)
    cpu = torch.device("cpu")
    # default CPU budget 128 MiB at 8 bytes per column: V = Vt = 32000 -> 262 rows -> 256
    assert L.auto_chunk_rows(4096, 64000, cpu) == 256
    assert L.auto_chunk_rows(4096, 1000, cpu) == 8192 // 128 * 128 or L.auto_chunk_rows(4096, 1000, cpu) == 4096
    for n, cols, mb in [(10_000, 5000, 100.0), (3000, 64000, 500.0), (513, 777, 3.0)]:
        rows = L.auto_chunk_rows(n, cols, cpu, budget_mb=mb)
        assert rows % 128 == 0 or rows == n
        assert rows * cols * L.BYTES_PER_COL <= mb * 2**20 or rows == 128
    assert L.auto_chunk_rows(50, 64000, cpu) == 50  # N smaller than a chunk: one chunk
    # a budget below 128 rows is honoured with a multiple of 8 rows (at least 8)
    assert L.auto_chunk_rows(4096, 64000, cpu, budget_mb=20.0) == 40
    assert L.auto_chunk_rows(4096, 10**6, cpu, budget_mb=1.0) == 8
    monkeypatch.setenv(L.CHUNK_MB_ENV, "256")
    assert L.auto_chunk_rows(4096, 64000, cpu) == 512
    monkeypatch.setenv(L.CHUNK_MB_ENV, "64")
    assert L.auto_chunk_rows(4096, 64000, cpu) == 128
    assert L.auto_chunk_rows(4096, 64000, cpu, budget_mb=64.0) == 128  # the keyword wins over the variable
    for bad in ("abc", "0", "-3", "nan"):
        monkeypatch.setenv(L.CHUNK_MB_ENV, bad)
        with pytest.raises(ValueError, match=L.CHUNK_MB_ENV):
            L.auto_chunk_rows(4096, 64000, cpu)
    with pytest.raises(ValueError, match="budget_mb"):
        L.auto_chunk_rows(4096, 64000, cpu, budget_mb=0)


def test_softcap_forward_and_derivative():
    z = torch.randn(5, 7, dtype=torch.float64) * 10
    ref = z.clone().requires_grad_()
    capped_ref = 3.0 * torch.tanh(ref / 3.0)
    capped_ref.sum().backward()
    deriv = torch.empty_like(z)
    out = L.softcap_(z, 3.0, deriv)
    assert out.data_ptr() == z.data_ptr()
    torch.testing.assert_close(out, capped_ref.detach(), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(deriv, ref.grad, rtol=1e-14, atol=1e-14)
    w = torch.randn(3, 4)
    assert L.softcap_(w, None) is w


class _AllocationLog(TorchDispatchMode):
    """Records the shape and storage of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[str, tuple[int, ...], int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append((str(func), tuple(t.shape), t.untyped_storage().data_ptr()))
        return out


def _lse_chunk_loss(sl, z, grad, w, aux):
    """The engine's chunk-loss contract on a simple loss: per-token loss_i = logsumexp(z_i) (0 where w_i = 0)
    and the *weighted* gradient w_i · softmax(z_i), written in place of z."""
    lse = torch.logsumexp(z.double(), -1)
    if grad is not None:
        grad.sub_(lse.unsqueeze(-1).to(grad.dtype)).exp_().mul_(w.unsqueeze(-1).to(grad.dtype))
    return torch.where(w != 0, lse, 0.0).to(torch.float64 if z.dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_no_per_chunk_allocations(dtype, softcap):
    """Across 6 chunks: one logits workspace, no (V, H) temporary, gradients accumulated in place."""
    n, h, v, rows = 48, 16, 40, 8
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.3).to(dtype)
    bias = torch.randn(v, generator=g).to(dtype)
    seen: list[int] = []

    def chunk_loss(sl, z, grad, w, aux):
        seen.append(z.untyped_storage().data_ptr())
        assert grad is z  # the gradient is written into the logits buffer
        return _lse_chunk_loss(sl, z, grad, w, aux)

    head = L.LMHeadChunker(hidden, weight, bias, softcap, rows)
    head.alloc_grads(True, True, True)
    acc_ptrs = {head.grad_weight.untyped_storage().data_ptr(), head.grad_hidden.untyped_storage().data_ptr()}
    with _AllocationLog() as log:
        L.run_chunks(head, chunk_loss, (), torch.ones(n), rows, True)
    assert len(seen) == n // rows and len(set(seen)) == 1
    vh = [o for o in log.outputs if o[1] == (v, h) and o[2] not in acc_ptrs]
    assert vh == [], f"per-chunk (V, H) temporaries: {vh}"
    nh = [o for o in log.outputs if o[1] == (n, h) and o[2] not in acc_ptrs]
    assert nh == []
    # (rows, V) tensors: the workspace (+ cap derivative + fp32 staging), allocated once each
    cv_storages = {o[2] for o in log.outputs if o[1] in ((rows, v),) and o[0].startswith("aten.empty")}
    assert len(cv_storages) <= 3


@pytest.mark.parametrize("softcap", [None, 1.5])
def test_engine_gradients_match_float64_autograd(softcap):
    """run_chunks' accumulated gradients (odd N, last chunk short) equal autograd of the unchunked loss."""
    n, h, v = 23, 6, 11
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    w = torch.rand(n, generator=g, dtype=torch.float64)
    w[3] = 0.0
    head = L.LMHeadChunker(hidden, weight, bias, softcap, 5)
    head.alloc_grads(True, True, True)
    loss = L.run_chunks(head, _lse_chunk_loss, (), w, 5, True)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    z = leaves[0] @ leaves[1].T + leaves[2]
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    ref = torch.logsumexp(z, -1)
    (ref * w).sum().backward()
    torch.testing.assert_close(loss, torch.where(w != 0, ref, 0.0).detach(), rtol=1e-12, atol=1e-12)
    for got, leaf in zip(head.finished_grads(), leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-10, atol=1e-12)


def test_fused_head_function_gradcheck():
    n, h, v = 7, 4, 9
    g = torch.Generator().manual_seed(2)
    args = [torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)]
    # "sum": any token weights; "none": 0/1 weights (as token_weights makes them for that reduction)
    for reduction, w in (("sum", torch.rand(n, generator=g, dtype=torch.float64) + 0.5),
                         ("none", torch.tensor([1.0, 0, 1, 1, 0, 1, 1], dtype=torch.float64))):
        fn = lambda a, b, c, red=reduction, w=w: L.FusedHeadFunction.apply(a, b, c, w, _lse_chunk_loss, 3, red, 2.0)
        assert torch.autograd.gradcheck(fn, args)


def test_bf16_weight_gradient_accumulates_in_fp32():
    """bf16 head: the weight gradient over 32 chunks is the fp32 sum rounded once (not 32 bf16 roundings)."""
    n, h, v = 256, 8, 24
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(n, h, generator=g).bfloat16()
    weight = (torch.randn(v, h, generator=g) * 0.2).bfloat16()
    head = L.LMHeadChunker(hidden, weight, None, None, 8)
    head.alloc_grads(False, True, False)
    L.run_chunks(head, _lse_chunk_loss, (), torch.ones(n), 8, True)
    assert head.grad_weight.dtype == torch.float32
    z = hidden.double() @ weight.double().T
    ref = torch.softmax(z, -1).T @ hidden.double()
    gw = head.finished_grads()[1]
    assert gw.dtype == torch.bfloat16
    # bf16 logits/softmax per chunk limit the accuracy; a bf16 running sum would drift far more
    torch.testing.assert_close(gw.double(), ref, rtol=2e-2, atol=2e-2)


def test_iter_logits_matches_direct_and_reuses_workspace():
    n, h, v = 19, 5, 13
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(n, h, generator=g).bfloat16()
    weight = torch.randn(v, h, generator=g).bfloat16()
    bias = torch.randn(v, generator=g).bfloat16()
    ref = hidden.float() @ weight.float().T + bias.float()
    ref = 4.0 * torch.tanh(ref / 4.0) / 1.7
    ptrs = set()
    out = torch.empty(n, v)
    for sl, z in L.iter_logits(hidden, weight, bias, 8, softcap=4.0, temperature=1.7, dtype=torch.float32):
        assert z.dtype == torch.float32
        ptrs.add(z.untyped_storage().data_ptr())
        out[sl] = z
    assert len(ptrs) == 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_fused_loss_bf16_softcap_matches_float64():
    """The dense fused loss through the engine, bf16 with a softcap and bias, several chunks."""
    n, h, v = 40, 16, 50
    g = torch.Generator().manual_seed(5)
    hs, ws, bs = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.3, torch.randn(v, generator=g)
    ht, wt = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.3
    leaves = [x.bfloat16().requires_grad_() for x in (hs, ws, bs)]
    out = fastkd.fused_linear_distill_loss(leaves[0], leaves[1], ht.bfloat16(), wt.bfloat16(), student_bias=leaves[2],
                                           softcap=3.0, chunk_size=16, backend="torch")
    out.backward()
    ref_leaves = [x.bfloat16().double().requires_grad_() for x in (hs, ws, bs)]
    ref = R.fused_linear_distill_loss(ref_leaves[0], ref_leaves[1], ht.bfloat16().double(), wt.bfloat16().double(),
                                      student_bias=ref_leaves[2], softcap=3.0)
    ref.backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-2, atol=2e-3)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=5e-2, atol=5e-3)


def test_fused_loss_chunked_by_env_budget_matches_reference(monkeypatch):
    """FASTKD_CHUNK_MB drives the fused loss' automatic chunking (here 16 rows: 3 chunks, last one short);
    the result equals the float64 reference."""
    n, h, v = 41, 8, 1000
    g = torch.Generator().manual_seed(6)
    hs, ws = torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(v, h, generator=g, dtype=torch.float64)
    ht, wt = torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(v, h, generator=g, dtype=torch.float64)
    budget_mb = 16 * 2 * v * L.BYTES_PER_COL / 2**20  # 16 rows of student + teacher columns
    monkeypatch.setenv(L.CHUNK_MB_ENV, str(budget_mb))
    assert L.auto_chunk_rows(n, 2 * v, torch.device("cpu")) == 16
    calls = []
    real = L.run_chunks
    monkeypatch.setattr(L, "run_chunks", lambda student, cl, aux, w, rows, ng: calls.append(rows) or
                        real(student, cl, aux, w, rows, ng))
    a = [hs.clone().requires_grad_(), ws.clone().requires_grad_()]
    out = fastkd.fused_linear_distill_loss(a[0], a[1], ht, wt, divergence="jsd", temperature=1.3)
    out.backward()
    assert calls == [16]
    b = [hs.clone().requires_grad_(), ws.clone().requires_grad_()]
    ref = R.fused_linear_distill_loss(b[0], b[1], ht, wt, divergence="jsd", temperature=1.3)
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-11)


def test_chunk_bytes_per_col_of_the_fused_paths():
    """The dense and sparse fused paths size their chunks at 4 B per logit column on a GPU (Triton / CUDA row
    kernels keep no (rows, V) temporaries), 8 B on the CPU or with the torch backend."""
    from fastkd.core.lmhead import auto_chunk_rows, chunk_bytes_per_col

    cuda, cpu = torch.device("meta"), torch.device("cpu")
    assert chunk_bytes_per_col(cuda, "auto") == chunk_bytes_per_col(cuda, "triton") == 4
    assert chunk_bytes_per_col(cuda, "torch") == chunk_bytes_per_col(cpu, "auto") == 8
    v = 128256
    assert auto_chunk_rows(10**6, 2 * v, cpu, budget_mb=1024, bytes_per_col=4) == 1024
    assert auto_chunk_rows(10**6, 2 * v, cpu, budget_mb=1024) == 512
