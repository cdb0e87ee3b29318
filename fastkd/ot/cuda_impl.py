"""``cuda`` backend of ``sinkhorn``: batched small-problem log-domain Sinkhorn (csrc/sinkhorn.cu).

One CUDA block per problem keeps f, g, log a, log b in shared memory and runs whole segments of
iterations per launch (a block barrier per half-iteration); the host launches one segment per tolerance
check, so ``n_iter``, the ε-annealing schedule and the stopping rule are those of the torch backend
(:func:`fastkd.ot.torch_impl.run_iterations`): check every ``check_every`` iterations once ε has
reached its final value, stop when max error < tol, and measure the error after the last iteration.
Point clouds are turned into a cost with :func:`fastkd.ot.sinkhorn.pairwise_cost` (small problems only).
``grad="unroll"`` (autograd through iterations) is left to the torch backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fastkd.core.registry import register

if TYPE_CHECKING:
    from fastkd.ot.sinkhorn import SinkhornParams

SUPPORTED_DTYPES = (torch.float32, torch.float64)
MAX_POINTS = {torch.float32: 200 * 1024 // 8, torch.float64: 200 * 1024 // 16}  # n + m per block (smem)
MAX_COST_ELEMS = 1 << 26  # points are turned into a stored (B, n, m) cost up to this size


def _is_check(it: int, params: SinkhornParams) -> bool:
    return params.tol > 0 and it % params.check_every == 0 and params.eps_at(it - 1) == params.eps


def sinkhorn_cuda(a, b, cost, x, y, params: SinkhornParams):
    """Backend entry point (op ``sinkhorn``): (f (B, n), g (B, m), n_iter, error (B,)), see the docstring.

    a (B, n), b (B, m), cost (B, n, m) or points x (B, n, d), y (B, m, d); one dtype (fp32 or fp64), CUDA.
    """
    from fastkd import _cpp_lib
    from fastkd.ot.sinkhorn import pairwise_cost

    lib = _cpp_lib.lib()
    if cost is None:
        cost = pairwise_cost(x, y, params.metric)
    cost = cost.contiguous()
    a = a.contiguous()
    b = b.contiguous()
    bsz, n, m = cost.shape
    dev, dt = cost.device, cost.dtype
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    f_next = torch.empty_like(a)
    err = torch.empty(bsz, dtype=dt, device=dev)
    code = _cpp_lib.dtype_code(dt)
    it = 0
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        while True:
            stop = it + 1
            while stop < params.max_iter and not _is_check(stop, params):
                stop += 1
            stop = min(stop, params.max_iter)
            eps = torch.tensor([params.eps_at(i - 1) for i in range(it + 1, stop + 1)] or [params.eps],
                               dtype=dt).to(dev, non_blocking=True)
            lib.sinkhorn(a.data_ptr(), b.data_ptr(), cost.data_ptr(), f.data_ptr(), g.data_ptr(),
                         f_next.data_ptr(), err.data_ptr(), eps.data_ptr(), bsz, n, m, stop - it,
                         float(params.eps_at(stop - 1)), code, stream)
            it = stop
            if it >= params.max_iter or (_is_check(it, params) and bool(err.amax() < params.tol)):
                break
    return f, g, it, err


def _limits(a=None, cost=None, x=None, params=None, **kw) -> list[str]:
    y = kw.get("y")
    ref = cost if cost is not None else x
    reasons = []
    if params is not None and params.unroll:
        reasons.append("grad='unroll' (autograd through the iterations) needs the torch backend")
    if ref is not None and ref.dtype in SUPPORTED_DTYPES and ref.dim() == 3:
        n = ref.shape[1]
        m = cost.shape[2] if cost is not None else (y.shape[1] if y is not None else 0)
        if n + m > MAX_POINTS[ref.dtype]:
            reasons.append(f"n + m = {n + m} exceeds {MAX_POINTS[ref.dtype]} (one block per problem "
                           f"keeps the potentials in shared memory)")
        if cost is None and ref.shape[0] * n * m > MAX_COST_ELEMS:
            reasons.append(f"points problem of {ref.shape[0]}×{n}×{m} is too large to store its cost "
                           f"(limit {MAX_COST_ELEMS} elements); the torch backend tiles it")
    return reasons


IMPL = register("sinkhorn", "cuda", sinkhorn_cuda, _limits, requires="cuda_ext", tensors=("a", "cost", "x", "y"),
                dtypes=SUPPORTED_DTYPES, dtype_inputs=("cost", "x"))
sinkhorn_reasons = IMPL.not_supported_reasons  # why the cuda backend cannot run some inputs ([] = it can)
