"""Arguments that used to be taken silently: a bool ``num_items_in_batch`` (Python's ``True == 1``) and a
``teacher_tail`` log mass above 0 (a mass above 1) for ``mode="topk_tail"``."""

from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd.core import checks as C
from fastkd.distill import triton_impl as TD

needs_triton = pytest.mark.skipif(TD._IMPORT_ERROR is not None, reason=f"no triton: {TD._IMPORT_ERROR}")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


def _data(seed: int):
    torch.manual_seed(seed)
    s = torch.randn(4, 37) * 2
    t = torch.randn(4, 37) * 2
    ids = torch.topk(t, 5).indices
    vals = torch.log_softmax(t, -1).gather(-1, ids)
    h = torch.randn(4, 8)
    w = torch.randn(37, 8)
    return s, t, ids, vals, h, w


ENTRY_POINTS = {
    "distill_loss": lambda s, t, ids, vals, h, w, **kw: fastkd.distill_loss(s, t, **kw),
    "fused_linear_distill_loss": lambda s, t, ids, vals, h, w, **kw: fastkd.fused_linear_distill_loss(
        h, w, teacher_logits=t, **kw),
    "sparse_distill_loss": lambda s, t, ids, vals, h, w, **kw: fastkd.sparse_distill_loss(s, ids, vals, **kw),
    "fused_linear_sparse_distill_loss": lambda s, t, ids, vals, h, w, **kw:
        fastkd.fused_linear_sparse_distill_loss(h, w, ids, vals, **kw),
    "DistillLoss": lambda s, t, ids, vals, h, w, **kw: fastkd.nn.DistillLoss()(s, t, **kw),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize("seed", [1, 2])
def test_bool_num_items_in_batch_is_rejected(entry, value, seed):
    with pytest.raises(TypeError, match="num_items_in_batch must be a number, not a bool"):
        ENTRY_POINTS[entry](*_data(seed), num_items_in_batch=value)


def test_bool_positive_numbers_are_rejected():
    s, t, *_ = _data(1)
    with pytest.raises(TypeError, match="temperature must be a number, not a bool"):
        fastkd.distill_loss(s, t, temperature=True)
    with pytest.raises(TypeError, match="ce_weight must be a number, not a bool"):
        C.check_range("ce_weight", True, 0.0, 1.0)


def test_int_and_tensor_num_items_in_batch_still_work():
    s, t, *_ = _data(1)
    total = fastkd.distill_loss(s, t, reduction="sum")
    torch.testing.assert_close(fastkd.distill_loss(s, t, num_items_in_batch=3), total / 3)
    torch.testing.assert_close(fastkd.distill_loss(s, t, num_items_in_batch=torch.tensor(3)), total / 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("seed", [1, 2])
def test_teacher_tail_above_zero_is_rejected(backend, fused, seed):
    s, t, ids, vals, h, w = _data(seed)
    for bad in (torch.full((4,), 0.5), torch.tensor([-1.0, -2.0, 2e-3, -0.5])):
        with pytest.raises(ValueError, match="teacher_tail"):
            if fused:
                fastkd.fused_linear_sparse_distill_loss(h, w, ids, vals, mode="topk_tail", teacher_tail=bad,
                                                        backend=backend)
            else:
                fastkd.sparse_distill_loss(s, ids, vals, mode="topk_tail", teacher_tail=bad, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_tail_rounding_noise_is_clamped(backend):
    """A log tail in (0, 1e-3] is rounding noise of a mass ≈ 1: taken as 0 (docs/DESIGN.md)."""
    s, t, ids, vals, *_ = _data(1)
    noisy = torch.tensor([5e-4, -1.0, 1e-3, -0.2])
    clean = noisy.clamp_max(0.0)
    got = fastkd.sparse_distill_loss(s, ids, vals, mode="topk_tail", teacher_tail=noisy, backend=backend)
    want = fastkd.sparse_distill_loss(s, ids, vals, mode="topk_tail", teacher_tail=clean, backend=backend)
    assert torch.equal(got, want)


def test_teacher_tail_unchecked_without_value_checks():
    s, t, ids, vals, *_ = _data(1)
    C.set_input_checks(False)
    try:
        out = fastkd.sparse_distill_loss(s, ids, vals, mode="topk_tail", teacher_tail=torch.full((4,), 0.5),
                                         backend="torch")
    finally:
        C.set_input_checks(None)
    assert torch.isfinite(out)
