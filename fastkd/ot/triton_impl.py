"""``triton`` backend of ``sinkhorn`` (kernels/sinkhorn.py), fp32.

* n, m ≤ ``SMALL_MAX`` and no ε annealing: one program per problem runs ``check_every`` iterations per
  launch (all ``max_iter`` in one launch when tol=0) with the cost and potentials on chip; the host reads
  the batch's marginal error between launches for the batch-wide stop.
* otherwise: two tiled log-sum-exp launches per iteration (f, then g), the cost loaded through strides or
  computed from points on the fly, driven by the torch backend's loop (annealing and tolerance included).

Envelope gradients only (the op computes them from the returned potentials); ``grad="unroll"`` needs the
torch backend.
"""

from __future__ import annotations

import torch

from fastkd.core.registry import register
from fastkd.ot.sinkhorn import SinkhornParams

SMALL_MAX = 64


class _TiledTriton:
    def __init__(self, a, b, cost, x, y, metric):
        from fastkd.kernels import sinkhorn as K

        self.K = K
        self.log_a, self.log_b = a.log().contiguous(), b.log().contiguous()
        self.cost, self.x, self.y, self.metric = cost, x, y, metric

    def f_step(self, g, f_prev, eps):
        out = torch.empty_like(self.log_a)
        self.K.half_step(out, g.contiguous(), self.log_b, self.cost, self.x, self.y, eps, self.metric, False)
        return out

    def g_step(self, f, g_prev, eps):
        out = torch.empty_like(self.log_b)
        self.K.half_step(out, f.contiguous(), self.log_a, self.cost, self.x, self.y, eps, self.metric, True)
        return out


def sinkhorn_triton(a, b, cost, x, y, params: SinkhornParams):
    """Batched log-domain Sinkhorn with Triton kernels (see the module docstring)."""
    from fastkd.kernels import sinkhorn as K
    from fastkd.ot.torch_impl import run_iterations

    bsz, n = a.shape
    m = b.shape[1]
    if max(n, m) <= SMALL_MAX and params.eps_scaling is None:
        f = torch.zeros_like(a)
        g = torch.zeros_like(b)
        err = torch.empty(bsz, dtype=a.dtype, device=a.device)
        log_a, log_b = a.log().contiguous(), b.log().contiguous()
        step = params.max_iter if params.tol == 0 else params.check_every
        done = 0
        while done < params.max_iter:
            k = min(step, params.max_iter - done)
            K.small_solve(f, g, err, log_a, log_b, cost, x, y, params.eps, params.metric, k)
            done += k
            if params.tol > 0 and bool(err.amax() < params.tol):
                break
        return f, g, done, err
    return run_iterations(_TiledTriton(a, b, cost, x, y, params.metric), a, b, params)


def _limits(params=None, **_) -> list[str]:
    if params is not None and params.unroll:
        return ["grad='unroll' needs autograd through the iterations (use backend='torch')"]
    return []


IMPL = register("sinkhorn", "triton", sinkhorn_triton, _limits, requires="triton", tensors=("a", "cost", "x"),
                dtypes=(torch.float32,), dtype_inputs=("a",))
_reasons = IMPL.not_supported_reasons
