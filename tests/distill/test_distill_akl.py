"""Split-row AKL kernel (fastkd.kernels.distill_akl) vs the float64 reference, in Triton's CPU interpreter.

The head set must be the reference's (stable descending sort, cumulative mass <= mu, first argmax forced):
ties split at the boundary by index, -inf logits, flat and peaked teachers, mu at 0 and near 1, odd V, bf16,
masked rows, the cross-entropy term, and the whole-row fallback when the rounds do not resolve a row.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import ref_loss_grad

import fastkd
from fastkd import reference as R
from fastkd.core.params import DistillParams
from fastkd.distill import triton_impl as TD

pytestmark = pytest.mark.skipif(TD._IMPORT_ERROR is not None, reason=f"no triton: {TD._IMPORT_ERROR}")

GRAD_EPS = {torch.float32: 2e-6, torch.bfloat16: 2**-8, torch.float16: 2**-10}


def _check(s, t, block=None, **kw):
    x = s.clone().requires_grad_()
    with TD.override_config(block_v=block):
        assert TD.schedule(DistillParams("akl"), v=s.shape[-1])[0] == "akl_split"
        loss = fastkd.distill_loss(x, t, "akl", backend="triton", reduction="none", **kw)
    loss.sum().backward()
    rloss, rgrad = ref_loss_grad(s, t, "akl", reduction="none", **kw)
    torch.testing.assert_close(loss.double(), rloss, rtol=2e-5, atol=2e-5 * (1 + rloss.abs().max().item()))
    eps = GRAD_EPS[s.dtype]
    torch.testing.assert_close(x.grad.double(), rgrad, rtol=eps, atol=2 * eps * rgrad.abs().max().item() + 1e-7)
    return loss


def _split_tie_rows(v):
    """Rows whose head boundary falls inside a tied group (the reference takes the lowest indices first)."""
    t = torch.randn(2, v).clamp(max=2.0)
    t[:, :3] = math.log(40.0)  # a tied top group (first argmax forced)
    t[:, 5::16] = 2.5  # a tied group spread over several segments, next below the top group
    p = torch.softmax(t[0].double(), -1)
    mu = float(p[:3].sum() + 4.5 * p[5])  # the boundary falls in the 5th of the tied 2.5s
    return t, mu


def test_mixed_rows_fp32():
    """Random, peaked, flat, -inf and quantized (tied) teachers in one batch, V odd, several segments."""
    torch.manual_seed(0)
    v = 251
    s = torch.randn(7, v) * 2
    t = torch.randn(7, v) * 2
    t[1] *= 15  # peaked
    t[2] = 0.7  # flat: one tied group of V
    t[3, torch.rand(v) < 0.3] = float("-inf")  # -inf on both sides (p = q = 0 there)
    s[3, t[3].isneginf()] = float("-inf")
    t[4] = torch.round(t[4] * 2) / 2  # many ties
    t[5, 17] = t[5].max() + 3  # a lone maximum
    mask = torch.tensor([True, True, True, True, True, True, False])  # a masked row
    loss = _check(s, t, block=64, mask=mask)  # 4 segments, the last one masked
    assert loss[6] == 0


def test_bf16_mu_endpoints_temperature_and_ce():
    torch.manual_seed(1)
    v = 257
    s = (torch.randn(2, v) * 2).to(torch.bfloat16)
    t = (torch.randn(2, v) * 2).to(torch.bfloat16)
    for mu in (0.0, 0.999):
        _check(s, t, block=128, mu=mu)
    labels = torch.tensor([3, 256])
    _check(s, t, block=128, mu=0.3, temperature=2.0, labels=labels, ce_weight=0.5)


def test_tied_group_split_like_the_reference():
    """The boundary inside a tied group: the first indices are in the head (the two-pass kernel keeps a tied
    group together instead, see test_triton_distill.test_akl_ties_move_together)."""
    torch.manual_seed(2)
    t, mu = _split_tie_rows(203)
    s = torch.randn(2, 203) * 2
    _check(s, t, block=64, mu=mu)


def test_whole_row_fallback(monkeypatch):
    """With one round the rows are left unresolved: the err phase finishes the search over the whole row."""
    from fastkd.kernels import distill_akl as KA

    monkeypatch.setattr(KA, "AKL_ROUNDS", 1)
    torch.manual_seed(3)
    t, mu = _split_tie_rows(131)
    s = torch.randn(2, 131) * 2
    _check(s, t, block=32, mu=mu)


def test_schedule():
    assert TD.schedule(DistillParams("akl"))[0] == "akl_split"
    sched, why = TD.schedule(DistillParams("akl"), v=(1 << 24) + 1)
    assert sched == "two_pass" and "V=" in why
    with TD.override_config(schedule="two_pass"):
        assert TD.schedule(DistillParams("akl"))[0] == "two_pass"


def test_stats_and_bitwise_loss():
    """return_stats on the split akl kernel: statistics vs the float64 oracle (0 on the masked row), loss and
    gradient bitwise equal with and without stats (the STATS constexpr adds stores only)."""
    from fastkd.core.stats import STATS_KEYS

    torch.manual_seed(4)
    s, t = torch.randn(3, 150) * 2, torch.randn(3, 150) * 2
    s[0, 3:9] = t[0, 3:9] = float("-inf")
    mask = torch.tensor([True, True, False])
    runs = []
    for stats_on in (False, True):
        x = s.clone().requires_grad_()
        with TD.override_config(block_v=64):
            out = fastkd.distill_loss(x, t, "akl", backend="triton", reduction="none", mask=mask, temperature=1.5,
                                      return_stats=stats_on)
        loss, st = out if stats_on else (out, None)
        loss.sum().backward()
        runs.append((loss.detach(), x.grad, st))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    ref = R.distill_stats(s.double(), t.double(), temperature=1.5, mask=mask)
    st = runs[1][2]
    assert torch.equal(st["top1_agree"], ref["top1_agree"].float())
    for k in STATS_KEYS:
        torch.testing.assert_close(st[k].double(), ref[k].double(), rtol=1e-5, atol=1e-5, msg=k)


def test_bf16_default_blocks_value_rounds():
    """bf16 N(0, 2²) rows at the default launch (several 8192 segments): the value rounds (no counts for 2-byte
    logits) then the histogram round that counts the bracket's keys; one row with a wide tied boundary group."""
    torch.manual_seed(5)
    v = 20011
    s = (torch.randn(3, v) * 2).to(torch.bfloat16)
    t = (torch.randn(3, v) * 2).to(torch.bfloat16)
    t[2] = torch.round(t[2].float() * 4).to(torch.bfloat16) / 4  # coarse values: ~1000 equal logits per key
    for mu in (0.5, 0.9):
        _check(s, t, mu=mu)


def test_fp16_keys_and_mu_one_is_fkl():
    """fp16 keys (shift 13); mu = 1 puts every token in the head: the loss is fkl's."""
    torch.manual_seed(6)
    v = 3001
    s = (torch.randn(2, v) * 2).to(torch.float16)
    t = (torch.randn(2, v) * 2).to(torch.float16)
    _check(s, t, block=512, mu=0.37)
    with TD.override_config(block_v=512):
        akl = fastkd.distill_loss(s, t, "akl", backend="triton", reduction="none", mu=1.0)
        fkl = fastkd.distill_loss(s, t, "fkl", backend="triton", reduction="none")
    torch.testing.assert_close(akl, fkl, rtol=1e-6, atol=1e-7)


def test_bf16_tie_split_across_segments():
    """The boundary inside a tied bf16 group spread over 4 segments: the head takes its lowest indices, counted
    from the histogram round's per-segment counts."""
    torch.manual_seed(7)
    t, _ = _split_tie_rows(203)
    t = t.to(torch.bfloat16)
    p = torch.softmax(t[0].double(), -1)
    mu = float(p[:3].sum() + 4.5 * p[5])
    s = (torch.randn(2, 203) * 2).to(torch.bfloat16)
    _check(s, t, block=64, mu=mu)


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_top_group_split_with_the_argmax_in_it(dt):
    """The boundary falls inside the top key's tied group, spread over segments: the argmax (its first index) is in
    the head once, as the first of G's n elements, not again as the forced top token."""
    torch.manual_seed(3)
    v = 301
    t = torch.randn(2, v).clamp(max=1.0)
    t[:, 4::9] = 3.0  # the top group, 34 elements over 5 segments of 64
    t = t.to(dt)
    p = torch.softmax(t[0].double(), -1)
    mu = float(6.5 * p[4])  # the boundary at the 7th element of the top group
    s = (torch.randn(2, v) * 2).to(dt)
    _check(s, t, block=64, mu=mu)


@pytest.mark.parametrize("seed", range(6))
def test_random_rows_against_the_reference(seed):
    """Random rows (smooth, quantized, clustered, peaked, -inf), random mu, fp32 and bf16, odd V and blocks."""
    gen = torch.Generator().manual_seed(100 + seed)
    v = int(torch.randint(40, 700, (1,), generator=gen))
    block = [32, 64, 128][seed % 3]
    dt = (torch.float32, torch.bfloat16)[seed % 2]
    s = torch.randn(4, v, generator=gen) * 3
    t = torch.randn(4, v, generator=gen) * 3
    t[1] = torch.round(t[1] * 3) / 3
    t[2] = 1e-3 * torch.randn(v, generator=gen) + 5.0  # clustered: one or two keys in bf16
    t[3, torch.rand(v, generator=gen) < 0.2] = float("-inf")
    s[3, t[3].isneginf()] = float("-inf")
    mu = float(torch.rand(1, generator=gen)) * 0.98
    _check(s.to(dt), t.to(dt), block=block, mu=mu)


@pytest.mark.parametrize("nb", [64, 16])
def test_bf16_histogram_round_resolves(nb, monkeypatch):
    """bf16 N(0, 2²) rows at the default launch and mu: one threshold round leaves a bracket of at most AKL_NB = 64
    keys, which the histogram round (a count per key) resolves, so two rounds suffice with the whole-row fallback
    off (MAX_FALLBACK = 0: an unresolved row would take a wrong head). With 16 bins (the old narrow width) the
    second round is a threshold round and the same rows come out wrong: the test can fail."""
    from fastkd.kernels import distill_akl as KA

    monkeypatch.setattr(KA, "AKL_ROUNDS", 2)
    monkeypatch.setattr(KA, "AKL_MAX_FALLBACK", 0)
    monkeypatch.setattr(KA, "AKL_NB", nb)
    torch.manual_seed(8)
    v = 20011
    s = (torch.randn(2, v) * 2).to(torch.bfloat16)
    t = (torch.randn(2, v) * 2).to(torch.bfloat16)
    if nb == 64:
        _check(s, t, mu=0.5)  # the default mu (at 0.9 the first round's bracket spans more keys: 3 rounds)
    else:
        with pytest.raises(AssertionError):
            _check(s, t, mu=0.5)


def test_block_too_large_for_packed_counts_is_refused():
    """A histogram round packs two 16-bit per-segment counts per slot: a block of 2^16 columns is refused by name."""
    s, t = torch.randn(2, 300), torch.randn(2, 300)
    with TD.override_config(block_v=1 << 16), pytest.raises(ValueError, match="block_v"):
        fastkd.distill_loss(s, t, "akl", backend="triton")
