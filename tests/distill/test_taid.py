"""TAIDSchedule against the update rule of the official TAID code (first call records J_0 only)."""

from __future__ import annotations

import math

import pytest
import torch

import fastkd


def _official_like(losses, steps, total, t_start=0.4, t_end=1.0, alpha=5e-2, beta=0.9, adaptive=True):
    """The official update_t restated with floats: first call stores the loss and returns; then
    momentum of the relative decrease, t <- min(t_end, max(linear, t + alpha*sigmoid(m)*(1-t)))."""
    t, prev, m, out = t_start, math.inf, 0.0, []
    for loss, step in zip(losses, steps):
        if math.isinf(prev):
            prev = loss
            out.append(t)
            continue
        m = beta * m + (1 - beta) * (prev - loss) / (prev + 1e-15)
        target = t_start + (t_end - t_start) * step / total
        t = min(t_end, max(target, t + alpha / (1 + math.exp(-m)) * (1 - t))) if adaptive else target
        prev = loss
        out.append(t)
    return out


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("first_step", [1, 700])
def test_taid_schedule_matches_the_official_update_rule(adaptive, first_step):
    g = torch.Generator().manual_seed(first_step)
    losses = (5.0 * torch.exp(-0.05 * torch.arange(40)) + 0.1 * torch.rand(40, generator=g)).tolist()
    steps = list(range(first_step, first_step + 40))
    sched = fastkd.TAIDSchedule(t_start=0.4, t_end=1.0, alpha=5e-2, beta=0.9, adaptive=adaptive)
    ours = [sched.step(x, step=s, total_steps=1000) for x, s in zip(losses, steps)]
    ref = _official_like(losses, steps, 1000, alpha=5e-2, beta=0.9, adaptive=adaptive)
    assert ours == pytest.approx(ref, rel=1e-12, abs=1e-12)
    # the documented first-call rule: t unchanged even when the first call comes at a late step
    assert ours[0] == 0.4
    if first_step == 700:
        assert ours[1] >= 0.4 + 0.6 * 701 / 1000 - 1e-12  # caught up with the linear schedule at once


def test_taid_schedule_nan_keeps_state_and_state_dict_round_trips():
    sched = fastkd.TAIDSchedule(alpha=1e-2)
    sched.step(3.0, 1, 100)
    sched.step(2.0, 2, 100)
    state = sched.state_dict()
    assert sched.step(float("nan"), 3, 100) == state["t"] and sched.state_dict() == state
    other = fastkd.TAIDSchedule(alpha=1e-2)
    other.load_state_dict(state)
    assert other.step(1.5, 3, 100) == sched.step(1.5, 3, 100)
