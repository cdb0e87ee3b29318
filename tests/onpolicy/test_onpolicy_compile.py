"""logprobs_from_hidden and on_policy_distill_loss under torch.compile (CPU, inductor, tiny shapes; with and without
fullgraph) match eager, and any fastkd:: op they reach passes torch.library.opcheck."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastkd

pytestmark = pytest.mark.host_device  # real work on the default device (see tests/conftest.py)

# ---- torch.compile ----------------------------------------------------------------------------------------------
def _inputs():
    g = torch.Generator().manual_seed(0)
    n, v, h = 7, 37, 8
    return dict(h=torch.randn(n, h, generator=g), w=torch.randn(v, h, generator=g) * 0.5,
                b=torch.randn(v, generator=g) * 0.1, ids=torch.randint(0, v, (n,), generator=g),
                ids2=torch.randint(0, v, (n, 3), generator=g), t=-torch.rand(n, generator=g) * 3,
                s=-torch.rand(n, generator=g) * 3, mask=torch.arange(n) != 2)


def _logprobs(h, w, b, ids, ids2, t, s, mask):
    out = fastkd.logprobs_from_hidden(h, w, ids2, bias=b, temperature=1.3, softcap=5.0, return_entropy=True,
                                      chunk_size=3)
    return (out.logprobs * torch.linspace(0.5, 1.5, 3)).sum() + 0.7 * out.entropy.sum()


def _advantage(h, w, b, ids, ids2, t, s, mask):
    return fastkd.on_policy_distill_loss(h, w, ids, t, bias=b, sampling_logprobs=s, clip=(0.2, 0.28), mask=mask,
                                         chunk_size=3)


def _k3_none(h, w, b, ids, ids2, t, s, mask):
    per = fastkd.on_policy_distill_loss(h, w, ids, t, bias=b, estimator="k3", reduction="none", mask=mask,
                                        chunk_size=3)
    return (per * torch.linspace(-1.0, 2.0, per.shape[0])).sum()


LOSSES = [_logprobs, _advantage, _k3_none]


def _run_compiled(fn, compiled: bool, fullgraph: bool):
    x = _inputs()
    for k in ("h", "w", "b"):
        x[k].requires_grad_()
    f = torch.compile(fn, fullgraph=fullgraph, backend="inductor") if compiled else fn
    out = f(**x)
    (out * 1.7).backward()
    return out.detach(), [x[k].grad for k in ("h", "w", "b")]


@pytest.mark.parametrize("fullgraph", [False, True])
@pytest.mark.parametrize("fn", LOSSES, ids=lambda f: f.__name__.strip("_"))
def test_compile_matches_eager(fn, fullgraph):
    torch._dynamo.reset()
    ref, g_ref = _run_compiled(fn, False, False)
    out, g = _run_compiled(fn, True, fullgraph)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, g_ref, strict=True):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


class _Recorder(TorchDispatchMode):
    """Every op that reaches the dispatcher (fastkd:: ones with copies of their arguments)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()
        self.calls: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.names.add(func.namespace)
        if func.namespace == "fastkd":
            self.calls.append((func, *torch.utils._pytree.tree_map_only(torch.Tensor, lambda x: x.detach().clone(),
                                                                        (args, kwargs))))
        return func(*args, **kwargs)


def test_opcheck_of_reached_fastkd_ops():
    """The on-policy paths are aten ops only today (the recorder sees aten and no fastkd:: op, so fullgraph above is
    the whole check); any fastkd:: op they come to reach must pass torch.library.opcheck."""
    rec = _Recorder()
    with rec:
        for fn in LOSSES:
            _run_compiled(fn, False, False)
    assert "aten" in rec.names  # the recorder sees the calls
    seen = set()
    for op, args, kwargs in rec.calls:
        if op not in seen:
            seen.add(op)
            torch.library.opcheck(op, args, kwargs)
