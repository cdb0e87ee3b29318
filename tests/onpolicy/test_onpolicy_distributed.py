"""Vocabulary-parallel logprobs_from_hidden with 2 gloo CPU processes vs the single-process float64 reference.

One spawn runs every case (spawning is the slow part); the process group has a 120 s timeout so a stuck peer
fails the test instead of hanging CI."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import WORLD, init, spawn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo needed")


def _worker(rank: int, port: int) -> None:
    from fastkd.integrations.distributed import vocab_parallel_logprobs_from_hidden
    from fastkd.onpolicy import reference as R

    init(rank, port)
    try:
        g = torch.Generator().manual_seed(0)  # the same full tensors on every rank
        n, h, v = 11, 6, 23 * WORLD
        vr = v // WORLD
        cols = slice(rank * vr, (rank + 1) * vr)
        hid_full = torch.randn(n, h, generator=g, dtype=torch.float64)
        w_full = torch.randn(v, h, generator=g, dtype=torch.float64)
        b_full = torch.randn(v, generator=g, dtype=torch.float64)
        b_full[30] = -math.inf  # a masked column on rank 1
        for ids_shape, temp, cap, chunk, k in (((n,), 1.0, None, 4, 0), ((n, 3), 0.7, 5.0, 3, 30), ((n, 1), 1.3,
                                                                                                       None, None, 5)):
            ids = torch.randint(0, v, ids_shape, generator=g)
            ids[0, ...] = 31  # owned by rank 1
            hid = hid_full.clone().requires_grad_(True)
            w = w_full[cols].clone().requires_grad_(True)
            b = b_full[cols].clone().requires_grad_(True)
            out = vocab_parallel_logprobs_from_hidden(hid, w, ids, bias=b, temperature=temp, softcap=cap,
                                                      return_entropy=True, return_topk=k, chunk_size=chunk)
            rh = hid_full.clone().requires_grad_(True)
            rw = w_full.clone().requires_grad_(True)
            rb = b_full.clone().requires_grad_(True)
            lq, ent, logq = R.logprobs(rh, rw, ids, bias=rb, temperature=temp, softcap=cap)
            torch.testing.assert_close(out.logprobs, lq, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(out.entropy, ent, rtol=1e-12, atol=1e-12)
            if k:
                top = logq.topk(k, -1)
                torch.testing.assert_close(out.topk_logprobs, top.values)
                torch.testing.assert_close(logq.gather(1, out.topk_ids), top.values)
            go = torch.randn(lq.shape, generator=g, dtype=torch.float64)
            ge = torch.randn(n, generator=g, dtype=torch.float64)
            got = torch.autograd.grad((out.logprobs * go).sum() + (out.entropy * ge).sum(), (hid, w, b))
            want = torch.autograd.grad((lq * go).sum() + (ent * ge).sum(), (rh, rw, rb))
            torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(got[1], want[1][cols], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(got[2], want[2][cols], rtol=1e-10, atol=1e-10)
        with pytest.raises(ValueError, match="ids must be in"):
            vocab_parallel_logprobs_from_hidden(hid_full, w_full[cols], torch.full((n,), v))
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_logprobs_match_single_process():
    spawn(_worker)


def test_vocab_parallel_logprobs_needs_process_group():
    from fastkd.onpolicy.vocab_parallel import vocab_parallel_logprobs_from_hidden

    with pytest.raises(RuntimeError, match="process group"):
        vocab_parallel_logprobs_from_hidden(torch.randn(2, 3), torch.randn(4, 3), torch.zeros(2, dtype=torch.long))
