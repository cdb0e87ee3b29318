"""Vocabulary-parallel losses and DDP with 2 gloo processes on CPU vs the single-process results.

Each test spawns 2 processes once and runs all of its cases inside them (spawning is the slow part);
a failing assertion in a worker fails the test with the worker's traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import WORLD, init, spawn

import fastkd
import fastkd.reference as R

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo needed")


# ---- vocabulary-parallel ------------------------------------------------------------------------------
def _vp_worker(rank: int, port: int) -> None:
    from fastkd.integrations.distributed import (
        vocab_parallel_distill_loss,
        vocab_parallel_fused_linear_distill_loss,
    )

    init(rank, port)
    try:
        g = torch.Generator().manual_seed(0)  # same full tensors on every rank
        n, v, h = 13, 37 * WORLD, 8
        vr = v // WORLD
        cols = slice(rank * vr, (rank + 1) * vr)
        s_full = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
        t_full = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
        s_full[2, 5] = float("-inf")  # masked vocabulary entries on both sides
        t_full[2, 5] = float("-inf")
        s_full[4, 40] = float("-inf")
        t_full[4, 40] = float("-inf")
        labels = torch.randint(0, v, (n,), generator=g)
        labels[[1, 7]] = -100
        cases = [("fkl", {}), ("rkl", {}), ("jsd", dict(beta=0.3)), ("jsd", dict(beta=0.0)),
                 ("fkl", dict(temperature=2.0, ce_weight=0.7, scale_by_t2=True)),
                 ("jsd", dict(ce_weight=0.4, reduction="sum")), ("rkl", dict(num_items_in_batch=5.0)),
                 ("rkl", dict(reduction="none", ce_weight=1.0))]
        # the float64 oracle back-propagates NaN through logaddexp(-inf, -inf); give it a finite stand-in
        # (exp(-1e4) == 0 exactly in float64, so values are unchanged)
        s_fin, t_fin = s_full.clamp_min(-1e4), t_full.clamp_min(-1e4)
        for div, kw in cases:
            s_sh = s_full[:, cols].clone().requires_grad_()
            out = vocab_parallel_distill_loss(s_sh, t_full[:, cols], div, labels=labels, chunk_size=5, **kw)
            gout = torch.rand(out.shape, generator=g, dtype=torch.float64) + 0.5
            (out * gout).sum().backward()
            s_ref = s_fin.clone().requires_grad_()
            ref = R.distill_loss(s_ref, t_fin, div, labels=labels, **kw)
            (ref * gout).sum().backward()
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12, msg=f"{div} {kw}")
            torch.testing.assert_close(s_sh.grad, s_ref.grad[:, cols], rtol=1e-9, atol=1e-12,
                                       msg=f"grad {div} {kw}")
        # float32 vs fastkd.distill_loss in one process
        s32, t32 = s_full.float(), t_full.float()
        s_sh = s32[:, cols].clone().requires_grad_()
        vocab_parallel_distill_loss(s_sh, t32[:, cols], "jsd", labels=labels, ce_weight=0.5).backward()
        s_one = s32.clone().requires_grad_()
        fastkd.distill_loss(s_one, t32, "jsd", labels=labels, ce_weight=0.5, backend="torch").backward()
        torch.testing.assert_close(s_sh.grad, s_one.grad[:, cols], rtol=1e-4, atol=1e-6)

        # the registry's Triton backend (interpreter here) on the augmented shards, float32
        for div, kw in (("fkl", dict(temperature=1.5)), ("rkl", {}), ("jsd", dict(beta=0.3, ce_weight=0.5))):
            s_sh = s32[:, cols].clone().requires_grad_()
            out = vocab_parallel_distill_loss(s_sh, t32[:, cols], div, labels=labels, chunk_size=8,
                                              backend="triton", **kw)
            out.backward()
            s_one = s32.clone().requires_grad_()
            ref = fastkd.distill_loss(s_one, t32, div, labels=labels, backend="torch", **kw)
            ref.backward()
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6, msg=f"triton {div}")
            torch.testing.assert_close(s_sh.grad, s_one.grad[:, cols], rtol=1e-4, atol=1e-6, msg=f"triton {div}")

        # fused: replicated hidden states, sharded LM heads (teacher hidden or teacher logits)
        hs = torch.randn(n, h, generator=g, dtype=torch.float64)
        ws = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5
        bs = torch.randn(v, generator=g, dtype=torch.float64)
        ht = torch.randn(n, 2 * h, generator=g, dtype=torch.float64)
        wt = torch.randn(v, 2 * h, generator=g, dtype=torch.float64) * 0.5
        fused_cases = [("fkl", dict(ce_weight=0.3)), ("rkl", dict(temperature=1.5)), ("jsd", dict(beta=0.7)),
                       ("jsd", dict(reduction="none", temperature=2.0, ce_weight=0.2)),
                       # one 13-row engine chunk run as sub-chunks of 10 + 3 rows (each with its collectives)
                       ("jsd", dict(chunk_size=40, beta=0.4, ce_weight=0.2)),
                       ("rkl", dict(chunk_size=40, reduction="none"))]
        for div, kw in fused_cases:
            for use_logits in (False, True):
                hs_r = hs.clone().requires_grad_()
                ws_r = ws[cols].clone().requires_grad_()
                bs_r = bs[cols].clone().requires_grad_()
                teacher = (dict(teacher_logits=(ht @ wt.t())[:, cols]) if use_logits
                           else dict(teacher_hidden=ht, teacher_weight=wt[cols]))
                out = vocab_parallel_fused_linear_distill_loss(hs_r, ws_r, student_bias=bs_r, divergence=div,
                                                               labels=labels, **teacher, **{"chunk_size": 4, **kw})
                gout = torch.rand(out.shape, generator=g, dtype=torch.float64) + 0.5  # same on both ranks
                (out * gout).sum().backward()
                hs_f, ws_f, bs_f = (x.clone().requires_grad_() for x in (hs, ws, bs))
                ref = R.fused_linear_distill_loss(hs_f, ws_f, ht, wt, student_bias=bs_f, divergence=div,
                                                  labels=labels, **{k: x for k, x in kw.items() if k != "chunk_size"})
                (ref * gout).sum().backward()
                torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(hs_r.grad, hs_f.grad, rtol=1e-9, atol=1e-12)
                torch.testing.assert_close(ws_r.grad, ws_f.grad[cols], rtol=1e-9, atol=1e-12)
                torch.testing.assert_close(bs_r.grad, bs_f.grad[cols], rtol=1e-9, atol=1e-12)
        # bad inputs name the argument
        try:
            vocab_parallel_distill_loss(s32[:, cols], t32[:, cols], "tvd")
            raise AssertionError("tvd accepted")
        except ValueError as e:
            assert "divergence" in str(e)
        dist.barrier()  # no rank tears gloo down while its peer still finishes the last collective
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_matches_single_process():
    spawn(_vp_worker)


def test_vocab_parallel_backend_is_the_registry_choice(monkeypatch):
    """The augmented shards the vocab-parallel losses hand to the ``distill`` registry select Triton for
    CUDA tensors (no GPU here: meta tensors that report is_cuda, as bench/model.py does) and torch for
    float64, with the registry's reasons; the jsd side pass (srkl, α = 1 − β) is Triton-capable too."""
    from fastkd.core.params import make_params
    from fastkd.core.registry import select, status
    from fastkd.distill.vocab_parallel import _aug_dtype, _VPChunk

    base_is_cuda = torch._C.TensorBase.is_cuda
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: t.device.type == "meta"
                                                          or base_is_cuda.__get__(t)))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # meta is not "cuda": let the device check pass
    for div in ("fkl", "rkl", "jsd"):
        params = make_params(div, temperature=2.0, scale_by_t2=True, beta=0.3, ce_weight=0.5)
        chunk = _VPChunk(params, 0, None, fastkd.distill.op.backend_fn("auto"), rows=8)
        assert chunk.kd_params.ce_weight == 0.0 and chunk.kd_params.softcap is None
        for dtype in (torch.float32, torch.bfloat16, torch.float16):  # the augmented rows are fp32 for all
            aug = torch.empty(8, 38, dtype=_aug_dtype(dtype), device="meta")
            for p in (chunk.kd_params, chunk.b_params):
                if p is None:
                    continue
                assert select("distill", "auto", student=aug, teacher=aug, params=p).backend == "triton", div
        aug64 = torch.empty(8, 38, dtype=_aug_dtype(torch.float64), device="meta")
        assert select("distill", "auto", student=aug64, teacher=aug64, params=chunk.kd_params).backend == "torch"
        reasons = status("distill", student=aug64, teacher=aug64, params=chunk.kd_params)["triton"]
        assert any("float64" in r for r in reasons), reasons


def test_vocab_parallel_needs_process_group():
    from fastkd.integrations.distributed import vocab_parallel_distill_loss

    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_distill_loss(torch.randn(2, 5), torch.randn(2, 5))


# ---- DDP ----------------------------------------------------------------------------------------------
def _ddp_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, 12, generator=g)
    teacher = torch.randn(8, 6, 50, generator=g) * 2
    labels = torch.randint(0, 50, (8, 6), generator=g)
    labels[0, :4] = -100
    labels[5, :] = -100
    labels[6, 1::2] = -100
    return x, teacher, labels


def _model() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 50))


def _ddp_worker(rank: int, port: int) -> None:
    init(rank, port)
    try:
        x, teacher, labels = _ddp_data()
        n_items = int((labels != -100).sum())  # global count, as HF computes it
        model = torch.nn.parallel.DistributedDataParallel(_model())
        part = slice(rank * 4, (rank + 1) * 4)
        # sum / global count on each rank; DDP averages gradients, so scale by the world size (HF convention)
        loss = fastkd.distill_loss(model(x[part]), teacher[part], "jsd", labels=labels[part], ce_weight=0.2,
                                   num_items_in_batch=n_items, backend="torch") * WORLD
        loss.backward()
        single = _model()
        ref = fastkd.distill_loss(single(x), teacher, "jsd", labels=labels, ce_weight=0.2, backend="torch")
        ref.backward()
        for (name, p), q in zip(model.module.named_parameters(), single.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
        total = loss.detach() / WORLD
        dist.all_reduce(total)
        torch.testing.assert_close(total, ref.detach(), rtol=1e-5, atol=1e-7)
        dist.barrier()  # no rank tears gloo down while its peer still finishes the last collective
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_match_single_process():
    spawn(_ddp_worker)


# ---- per-rank memory of the vocabulary-parallel path ----------------------------------------------------------
def _peak_extra_mib(fn) -> float:
    """Peak RSS above the current one while ``fn()`` runs (Linux VmHWM, reset first), after one warm-up call."""
    fn()
    before = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current RSS
    fn()
    status = Path("/proc/self/status").read_text().splitlines()
    hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) * 1024
    return (hwm - before) / 2**20


def _vp_memory_worker(rank: int, port: int) -> None:
    from fastkd.integrations.distributed import vocab_parallel_fused_linear_distill_loss

    init(rank, port)
    try:
        n, v, h, chunk = 256, 16384, 32, 256
        g = torch.Generator().manual_seed(0)
        hs, ht = torch.randn(n, h, generator=g), torch.randn(n, h, generator=g)
        w, wt = torch.randn(v, h, generator=g), torch.randn(v, h, generator=g)
        cols = slice(rank * v // WORLD, (rank + 1) * v // WORLD)
        ws, wts = w[cols].clone(), wt[cols].clone()

        def dense():
            x, ww = hs.clone().requires_grad_(), w.clone().requires_grad_()
            fastkd.fused_linear_distill_loss(x, ww, ht, wt, chunk_size=chunk, temperature=2.0,
                                             backend="torch").backward()

        def vp():
            x, ww = hs.clone().requires_grad_(), ws.clone().requires_grad_()
            vocab_parallel_fused_linear_distill_loss(x, ww, ht, wts, chunk_size=chunk, temperature=2.0,
                                                     backend="torch").backward()

        one, shard = _peak_extra_mib(dense), _peak_extra_mib(vp)
        # measured 37.4 vs 50.0 MiB: the dense working set halved plus the VP's augmented sub-chunk rows and
        # statistics temporaries; before the sub-chunked backend calls the VP peak was >= the dense one
        assert one > 8 and shard < 0.85 * one, (shard, one)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_vocab_parallel_memory_scales_with_the_shard(monkeypatch):
    """Per-rank peak memory of the fused vocab-parallel loss on V/2 shards is about half the single-process
    fused loss's on the full V at the same chunk rows (it was equal before the sub-chunked backend calls)."""
    # glibc: serve every allocation above 64 kB by mmap, so freed buffers leave the RSS and VmHWM sees peaks
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    spawn(_vp_memory_worker)
