"""torch.compile (CPU, inductor, tiny shapes) through the public losses matches eager, and fastkd's
custom ops (``torch.ops.fastkd.*``) pass ``torch.library.opcheck``.

fullgraph=True needs the ops registered with torch.library (STYLE.md item 6); while no ``fastkd::`` op is
registered the fullgraph cases are expected to fail (xfail, non-strict) and the graph-break-tolerant
compile must still match eager. Once ops exist, the xfail marker disappears and fullgraph is enforced."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastkd
import fastkd.distill.fused  # noqa: F401
import fastkd.distill.op  # noqa: F401  (registers its ops, if any)
import fastkd.sparse.op  # noqa: F401

pytestmark = pytest.mark.host_device  # real work on the default device (see tests/conftest.py)


def _fastkd_ops() -> list[str]:
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastkd::"))


HAS_OPS = bool(_fastkd_ops())
fullgraph_xfail = pytest.mark.xfail(
    not HAS_OPS, strict=False,
    reason="no torch.ops.fastkd custom ops registered: dynamo cannot trace the backend registry's imports")


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, v, h = 7, 37, 8
    labels = torch.randint(0, v, (n,), generator=g)
    labels[2] = -100
    return dict(
        s=torch.randn(n, v, generator=g), t=torch.randn(n, v, generator=g), labels=labels,
        h=torch.randn(n, h, generator=g), w=torch.randn(v, h, generator=g) * 0.5,
        th=torch.randn(n, 2 * h, generator=g), tw=torch.randn(v, 2 * h, generator=g) * 0.5)


def _distill(s, t, labels, h, w, th, tw):
    return fastkd.distill_loss(s, t, "jsd", labels=labels, ce_weight=0.5, temperature=2.0, backend="torch")


def _fused(s, t, labels, h, w, th, tw):
    return fastkd.fused_linear_distill_loss(h, w, th, tw, divergence="rkl", labels=labels, temperature=1.5,
                                            backend="torch")


def _sparse(s, t, labels, h, w, th, tw):
    vals, ids = torch.log_softmax(t, -1).topk(5, dim=-1)
    return fastkd.sparse_distill_loss(s, ids, vals, mode="topk_tail", divergence="jsd", labels=labels,
                                      backend="torch")


def _fused_sparse(s, t, labels, h, w, th, tw):
    vals, ids = torch.log_softmax(t, -1).topk(5, dim=-1)
    return fastkd.fused_linear_sparse_distill_loss(h, w, ids, vals, mode="topk", labels=labels, backend="torch")


LOSSES = [_distill, _fused, _sparse, _fused_sparse]
LOSS_IDS = ["distill_loss", "fused_linear_distill_loss", "sparse_distill_loss", "fused_linear_sparse_distill_loss"]


def _run(fn, compiled: bool, fullgraph: bool = False):
    x = _inputs()
    for k in ("s", "h", "w"):
        x[k].requires_grad_()
    f = torch.compile(fn, fullgraph=fullgraph, backend="inductor") if compiled else fn
    out = f(**x)
    (out * 1.7).backward()
    return out.detach(), [x[k].grad for k in ("s", "h", "w")]


def _compare(fn, fullgraph: bool) -> None:
    torch._dynamo.reset()
    ref, g_ref = _run(fn, False)
    out, g = _run(fn, True, fullgraph)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, g_ref, strict=True):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fn", LOSSES, ids=LOSS_IDS)
def test_compile_matches_eager(fn):
    _compare(fn, fullgraph=False)


@fullgraph_xfail
@pytest.mark.parametrize("fn", LOSSES, ids=LOSS_IDS)
def test_compile_fullgraph_matches_eager(fn):
    _compare(fn, fullgraph=True)


class _Recorder(TorchDispatchMode):
    """Records each fastkd:: op call (op, args, kwargs) that reaches the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch._ops.OpOverload, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastkd":
            saved = torch.utils._pytree.tree_map_only(torch.Tensor, lambda x: x.detach().clone(),
                                                      (args, kwargs))
            self.calls.append((func, *saved))
        return func(*args, **kwargs)


@pytest.mark.skipif(not HAS_OPS, reason="no torch.ops.fastkd custom ops registered yet")
def test_opcheck_custom_ops():
    """Every fastkd:: op that the public losses reach passes torch.library.opcheck on real arguments."""
    rec = _Recorder()
    with rec:
        for fn in LOSSES:
            _run(fn, False)
    assert rec.calls, f"registered ops {_fastkd_ops()} were never reached by distill_loss / fused loss"
    seen = set()
    for op, args, kwargs in rec.calls:
        if op in seen:
            continue
        seen.add(op)
        torch.library.opcheck(op, args, kwargs)
