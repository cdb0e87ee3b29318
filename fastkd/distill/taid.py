"""TAID's adaptive interpolation schedule (Shing et al., ICLR 2025, arXiv 2501.16937).

``distill_loss(..., divergence="taid", t=schedule.t)`` distils towards r = softmax((1−t)·stopgrad(z_s) + t·z_t).
The paper moves t from ``t_start`` to ``t_end`` adaptively: with the relative decrease of the objective
δ_n = (J_{n−1} − J_n) / J_{n−1}, a momentum m_n = β·m_{n−1} + (1−β)·δ_n and
    t_{n+1} = min(t_end, max(t_linear(n), t_n + α·sigmoid(m_n)·(1 − t_n))),
where t_linear is the linear schedule from t_start to t_end over the run, so t never lags behind it.

First call: like the official ``TAID.update_t`` (SakanaAI's code), the first :meth:`TAIDSchedule.step` only
records the objective (J_0) and returns t unchanged, whatever ``step`` it is given: a run resumed at step
5000 without ``load_state_dict`` keeps t = ``t_start`` for that one call and catches up with the linear
schedule on the next. With ``adaptive=False`` later calls set t to the linear schedule (as the official
``disable_adaptive``). A NaN objective leaves the state unchanged (the official code would propagate it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class TAIDSchedule:
    """Stateful schedule for TAID's interpolation parameter ``t``; call :meth:`step` once per update."""

    t_start: float = 0.4
    t_end: float = 1.0
    alpha: float = 5e-4
    beta: float = 0.99
    adaptive: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.t_start < 1.0:
            raise ValueError(f"t_start must be in [0, 1), got {self.t_start}")
        if not self.t_start < self.t_end <= 1.0:
            raise ValueError(f"t_end must be in (t_start, 1], got {self.t_end}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {self.beta}")
        self.t = self.t_start
        self.momentum = 0.0
        self.prev_loss: float | None = None

    def linear(self, step: int, total_steps: int) -> float:
        frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
        return self.t_start + (self.t_end - self.t_start) * frac

    def step(self, loss: float | torch.Tensor, step: int, total_steps: int) -> float:
        """Update t from this step's objective value; returns the new t.

        The first call only records ``loss`` (t unchanged, as the official ``update_t``); NaN losses leave
        the state unchanged."""
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if math.isnan(value):
            return self.t
        if self.prev_loss is None:
            self.prev_loss = value
            return self.t
        target = self.linear(step, total_steps)
        if self.adaptive:
            rel = (self.prev_loss - value) / (self.prev_loss + 1e-15)
            self.momentum = self.beta * self.momentum + (1 - self.beta) * rel
            delta = self.alpha / (1 + math.exp(-self.momentum)) * (1 - self.t)
            self.t = min(self.t_end, max(target, self.t + delta))
        else:
            self.t = target
        self.prev_loss = value
        return self.t

    def state_dict(self) -> dict[str, float | None]:
        return {"t": self.t, "momentum": self.momentum, "prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.t, self.momentum, self.prev_loss = state["t"], state["momentum"], state["prev_loss"]
