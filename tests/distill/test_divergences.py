"""The divergence table drives every layer; the ABKD α-β divergence ``ab`` on every backend and family.

Table checks: public names, codes of the Triton kernel and of csrc/fastkd.h (parsed), hyperparameter order
of DistillParams / the Triton kernel / the C++ ``enum Hyper``, the reference and torch dispatch tables,
validation messages. ``ab`` checks: float64 reference on the torch and Triton (interpreter) backends in
fp32 / bf16 / fp16, −inf logits with α, β > 0, masked rows, gradcheck, the fused LM-head path, known limits.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastkd
from fastkd import reference as R
from fastkd.core import divergences as DV
from fastkd.core.params import DistillParams, SparseParams, make_params
from fastkd.distill import op as distill_op
from fastkd.distill import reference as ref_distill
from fastkd.distill import torch_impl
from fastkd.distill import triton_impl as TD

ROOT = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(TD._IMPORT_ERROR is not None, reason=f"no triton: {TD._IMPORT_ERROR}")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]
AB_PARAMS = [(0.8, 0.3), (0.5, 0.5), (1.5, -0.4), (-0.3, 1.2), (0.2, 0.7)]


# ---- the table --------------------------------------------------------------------------------------------

def test_public_names_and_codes():
    assert fastkd.DIVERGENCES == DV.DIVERGENCES
    assert "ab" in fastkd.DIVERGENCES and "zero" not in fastkd.DIVERGENCES
    assert len(set(DV.CODES.values())) == len(DV.CODES)  # codes unique
    assert sorted(DV.CODES.values()) == list(range(len(DV.TABLE)))
    for d in DV.TABLE:
        assert d.families <= set(DV.FAMILIES)
        for e in d.endpoints:
            assert e.becomes in DV.BY_NAME and d.hyper(e.hyper) is not None
            assert d.hyper(e.hyper).contains(e.value)
    assert DV.names("sparse") == ("fkl", "rkl", "jsd")
    assert DV.names("vocab_parallel") == ("fkl", "rkl", "jsd")
    assert "ab" in DV.names("fused") and "ab" in DV.names("logits")


def test_params_fields_are_the_table_hyperparameters():
    hyper_fields = [f.name for f in dataclasses.fields(DistillParams) if f.name in DV.HYPERS]
    assert sorted(hyper_fields) == sorted(DV.HYPER_NAMES)
    p = DistillParams(divergence="jsd", beta=0.25, alpha=0.3, mu=0.6, t=0.7)
    assert p.hyper_values() == (0.25, 0.3, 0.6, 0.7) and DV.HYPER_NAMES == ("beta", "alpha", "mu", "t")


def test_defaults_come_from_the_row():
    assert (DistillParams(divergence="ab").alpha, DistillParams(divergence="ab").beta) == (0.8, 0.3)
    assert (DistillParams().alpha, DistillParams().beta, DistillParams().mu, DistillParams().t) == (0.1, 0.5, 0.5, 0.5)
    assert make_params("ab", temperature=1.0, scale_by_t2=False, beta=-0.2).beta == -0.2
    assert SparseParams(divergence="jsd").beta == 0.5


@pytest.mark.parametrize(("div", "kw", "effective"), [
    ("jsd", {"beta": 0.0}, "fkl"), ("jsd", {"beta": 1.0}, "rkl"), ("jsd", {"beta": 0.3}, "jsd"),
    ("skl", {"alpha": 0.0}, "fkl"), ("skl", {"alpha": 1.0}, "zero"), ("srkl", {"alpha": 0.0}, "rkl"),
    ("srkl", {"alpha": 1.0}, "zero"), ("ab", {"alpha": 1.0, "beta": 1.0}, "ab")])
def test_endpoint_rules(div, kw, effective):
    p = DistillParams(divergence=div, **kw)
    assert p.effective == effective and p.code == DV.CODES[effective]


def test_triton_codes_and_arguments_are_the_table():
    from fastkd.kernels import distill as K

    for name, code in DV.CODES.items():
        assert getattr(K, name.upper()).value == code
    kernel = K._distill_kernel
    hyper_args = [a for a in kernel.arg_names if a.startswith("h_")]
    assert hyper_args == [f"h_{n}" for n in DV.HYPER_NAMES]
    src = (ROOT / "kernels" / "distill.py").read_text()
    assert not re.search(r"DIV\s*==\s*\d", src), "kernels/distill.py compares DIV against a literal"
    assert "_P_BITS_HI" not in src


def test_ticket_magic_divides_every_int32_ticket():
    """The split kernel's divmod(u, S) by a multiply and a shift is exact for every int32 ticket u and segment
    count S (edges, powers of two and their neighbours, random draws), with u·M inside int64."""
    import random

    from fastkd.kernels import distill_split as KS

    rng = random.Random(0)
    counts = list(range(1, 600)) + [2**k + d for k in range(10, 21) for d in (-1, 0, 1)]
    for s_count in counts:
        m, k = KS.ticket_magic(s_count)
        assert (2**31 - 1) * m < 2**63
        tickets = [0, 1, s_count - 1, s_count, s_count + 1, 2**31 - 2, 2**31 - 1]
        tickets += [rng.randrange(2**31) for _ in range(30)]
        for u in tickets:
            assert (u * m) >> k == u // s_count, (s_count, u)


def test_triton_schedule_is_the_table():
    """The kernels' mixture set, the split schedule's lags, launch configurations and codes are the table's
    (no code lists in the kernel files), and a row cannot declare a mixture without the mid phase."""
    from fastkd.kernels import distill as K
    from fastkd.kernels import distill_split as KS

    assert K.MIX_CODES == tuple(d.code for d in DV.TABLE if d.mixture) == (2, 4, 5, 6, 9)
    assert set(KS.SPLIT_CODES) == set(DV.CODES.values()) - {DV.CODES["akl"]}
    for d in DV.TABLE:
        assert bool((K.MIX_SET.value >> d.code) & 1) == d.mixture, d.name
        if d.split_launch is None:
            assert d.code not in KS.SPLIT_CODES
            with pytest.raises(ValueError, match="own split kernel"):
                KS.launch_config(d.code)
            continue
        assert KS.lag(d.code) == d.lag == (2 if d.mixture or d.name == "taid" else 1), d.name
        bv, nw = KS.launch_config(d.code)
        assert (bv, nw) == d.split_launch and bv & (bv - 1) == 0 and nw in (4, 8, 16)
        b4, w4 = d.split_heavy or (bv, nw)
        assert KS.launch_config(d.code, 4) == (b4 // 2 if b4 > 2048 else b4, w4)  # fp32: the bytes of bf16's
        assert KS.launch_config(d.code, heavy=True) == d.split_heavy or (bv // 2 if bv > 4096 else bv, nw)
    for name in ("distill.py", "distill_split.py"):
        src = (ROOT / "kernels" / name).read_text()
        assert not re.search(r"DIV\s*[!=]=\s*\d", src), f"kernels/{name} compares DIV against a literal"
        assert not re.search(r"(\(DIV == \w+\)\s*\|\s*){2}", src), f"kernels/{name} lists codes (use MIX_SET)"
        body = re.sub(r'^[A-Z]+ = tl\.constexpr\(CODES\["\w+"\]\).*$', "", src, flags=re.M)
        assert "CODES[" not in body, f"kernels/{name} reads a code other than as its DIV constant"
    split_src = (ROOT / "kernels" / "distill_split.py").read_text()
    assert not re.search(r"(wp \+|_slots\(ws_row,|_merge\(ws_row,) \d", split_src), "workspace slot by number"
    with pytest.raises(ValueError, match="lag"):
        DV.Divergence("x", 99, "", mixture=True, lag=1)


def test_cpp_enums_are_the_table():
    header = (ROOT / "csrc" / "fastkd.h").read_text()
    cu = (ROOT / "csrc" / "distill.cu").read_text()
    block = cu.split("enum Divergence")[1].split("};")[0]
    enum = {k.lower(): int(v) for k, v in re.findall(r"k(\w+) = (\d+)", block)}
    assert enum == DV.CODES
    for key in re.findall(r"k(\w+) = ", block):  # every code has a launch case
        assert f"case k{key}: return launch_typed<T, k{key}>" in cu
    block = header.split("enum Hyper")[1].split("};")[0]
    hyper = {k.lower(): int(v) for k, v in re.findall(r"k(\w+) = (\d+)", block)}
    assert hyper == {**{n: i for i, n in enumerate(DV.HYPER_NAMES)}, "numhyper": len(DV.HYPER_NAMES)}


def test_reference_and_torch_dispatch_cover_the_table():
    assert set(ref_distill.FORMULAS) == set(DV.CODES)
    assert set(torch_impl.TERMS) | {"taid"} == set(DV.CODES)


def test_custom_op_arguments_are_the_dataclass_fields(monkeypatch):
    """fastkd::distill_rows takes the DistillParams fields (but softcap) as typed scalars, in field order, and the
    backend receives the record unchanged: int / bool / None survive the op boundary."""
    schema = distill_op.distill_rows._opoverload._schema
    scalars = [a for a in schema.arguments if a.name in distill_op.OP_FIELDS]
    assert [a.name for a in scalars] == [f.name for f in dataclasses.fields(DistillParams) if f.name != "softcap"]
    kinds = {a.name: str(a.type) for a in scalars}
    assert (kinds["divergence"], kinds["temperature"], kinds["scale_by_t2"], kinds["chunk_size"]) == (
        "str", "float", "bool", "Optional[int]")
    seen = []
    real = distill_op.select
    monkeypatch.setattr(distill_op, "select", lambda op, backend, **kw: seen.append(kw["params"]) or real(
        op, backend, **kw))
    s, t = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    labels, w = torch.tensor([0, 4, 2]), torch.ones(3, dtype=torch.float64)
    p = DistillParams(divergence="ab", temperature=1.7, scale_by_t2=True, alpha=1.25, beta=-0.5, ce_weight=0.2,
                      chunk_size=7)
    distill_op.backend_fn("torch")(s, t, labels, w, None, p)
    distill_op.backend_fn("torch")(s, t, None, w, None, DistillParams())
    q = seen[0]
    assert q == dataclasses.replace(p, softcap=None)
    assert isinstance(q.chunk_size, int) and isinstance(q.scale_by_t2, bool)
    assert seen[1].chunk_size is None


# ---- validation -------------------------------------------------------------------------------------------

BAD = [
    ("ab", dict(alpha=0.0), ValueError, r"alpha must be a finite number != 0 for divergence='ab'"),
    ("ab", dict(beta=0.0), ValueError, r"beta must be a finite number != 0 for divergence='ab'"),
    ("ab", dict(alpha=0.4, beta=-0.4), ValueError, r"alpha \+ beta must be != 0"),
    ("ab", dict(alpha=math.inf), ValueError, "alpha"),
    ("ab", dict(beta=math.nan), ValueError, "beta"),
    ("ab", dict(alpha="1"), TypeError, "alpha"),
    ("ab", dict(alpha=torch.tensor(0.5)), TypeError, "alpha"),
    ("jsd", dict(beta=1.5), ValueError, r"beta must be in \[0, 1\]"),
    ("fkl", dict(alpha=-0.1), ValueError, "alpha"),  # an unused hyperparameter is still checked
    ("skl", dict(alpha=2.0), ValueError, r"alpha must be in \[0, 1\] for divergence='skl'"),
    ("akl", dict(mu=1.1), ValueError, "mu"),
    ("abkd", {}, ValueError, "divergence must be one of"),
]


@pytest.mark.parametrize(("div", "kw", "exc", "match"), BAD)
def test_bad_hyperparameters(div, kw, exc, match):
    s, t = torch.randn(3, 10), torch.randn(3, 10)
    with pytest.raises(exc, match=match):
        fastkd.distill_loss(s, t, div, **kw)
    with pytest.raises(exc, match=match):
        fastkd.fused_linear_distill_loss(torch.randn(3, 4), torch.randn(10, 4), teacher_logits=t, divergence=div,
                                         **kw)


def test_family_support_comes_from_the_table():
    s, ids, vals = torch.randn(2, 10), torch.tensor([[0, 1], [2, 3]]), torch.log(torch.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="divergence must be one of"):
        fastkd.sparse_distill_loss(s, ids, vals, divergence="ab")
    with pytest.raises(ValueError, match="divergence must be one of"):
        make_params("ab", temperature=1.0, scale_by_t2=False, family="vocab_parallel")


# ---- ab on every backend ----------------------------------------------------------------------------------

def _loss_grad(s, t, backend, **kw):
    x = s.detach().clone().requires_grad_()
    if backend == "triton":
        with TD.override_config(block_v=32):
            out = fastkd.distill_loss(x, t, "ab", backend=backend, **kw)
    else:
        out = fastkd.distill_loss(x, t, "ab", backend=backend, **kw)
    (g,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), g


def _ref_loss_grad(s, t, **kw):
    x = s.detach().double().requires_grad_()
    out = R.distill_loss(x, t.double(), "ab", **kw)
    (g,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("alpha", "beta"), AB_PARAMS)
def test_ab_fp32_matches_reference(backend, alpha, beta):
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(5, 131, generator=g) * 2, torch.randn(5, 131, generator=g) * 2
    labels = torch.tensor([3, -100, 7, 130, -100])
    kw = dict(alpha=alpha, beta=beta, temperature=1.5, labels=labels, ce_weight=0.3, reduction="none")
    out, grad = _loss_grad(s, t, backend, **kw)
    ref, rgrad = _ref_loss_grad(s, t, **kw)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad.double(), rgrad, rtol=2e-4, atol=2e-6)
    assert out[1] == 0 and out[4] == 0 and (grad[1] == 0).all() and (grad[4] == 0).all()  # masked rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_ab_low_precision_no_worse_than_pytorch(backend, dtype):
    g = torch.Generator().manual_seed(12)
    s = (torch.randn(6, 97, generator=g) * 3).to(dtype)
    t = (torch.randn(6, 97, generator=g) * 3).to(dtype)
    out, grad = _loss_grad(s, t, backend, reduction="none")
    assert out.dtype == torch.float32 and grad.dtype == dtype
    ref, rgrad = _ref_loss_grad(s, t, reduction="none")
    x = s.detach().clone().requires_grad_()  # PyTorch's own computation of the formula in the dtype
    low = R.distill_loss(x, t, "ab", reduction="none")
    (lg,) = torch.autograd.grad(low.sum(), x)
    val_err = (low.double() - ref).abs().max().item()
    grad_err = (lg.double() - rgrad).abs().max().item()
    assert (out.double() - ref).abs().max().item() <= val_err + 1e-4 * (1 + ref.abs().max().item())
    eps = torch.finfo(dtype).eps
    assert (grad.double() - rgrad).abs().max().item() <= grad_err + eps * rgrad.abs().max().item() + 1e-7


@pytest.mark.parametrize("backend", BACKENDS)
def test_ab_neg_inf_logits_finite(backend):
    g = torch.Generator().manual_seed(13)
    s, t = torch.randn(4, 67, generator=g), torch.randn(4, 67, generator=g)
    s[:, 5] = t[:, 5] = -math.inf  # masked vocabulary entry on both sides
    t[1, ::4] = -math.inf  # teacher only
    s[2, 1::5] = -math.inf  # student only: finite for ab (unlike fkl)
    for alpha, beta in [(0.8, 0.3), (0.5, 1.5)]:
        out, grad = _loss_grad(s, t, backend, alpha=alpha, beta=beta, reduction="none")
        ref, rgrad = _ref_loss_grad(s, t, alpha=alpha, beta=beta, reduction="none")
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-6)
        finite = torch.isfinite(rgrad)  # autograd of the reference can be NaN at −inf entries
        torch.testing.assert_close(grad.double()[finite], rgrad[finite], rtol=2e-4, atol=2e-6)
        assert (grad[:, 5] == 0).all()


def test_ab_gradcheck_float64():
    g = torch.Generator().manual_seed(14)
    s = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    for alpha, beta in [(0.8, 0.3), (1.5, -0.4)]:
        f = lambda x: fastkd.distill_loss(x, t, "ab", alpha=alpha, beta=beta, temperature=1.3,  # noqa: B023
                                          reduction="none", backend="torch")
        assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-6)


def test_ab_limits_and_known_values():
    """α = β = ½ is 4(1 − Σ√(pq)) (squared Hellinger ×4); α = 1, β → 0 tends to forward KL."""
    g = torch.Generator().manual_seed(15)
    s, t = torch.randn(3, 29, generator=g), torch.randn(3, 29, generator=g)
    half = fastkd.distill_loss(s, t, "ab", alpha=0.5, beta=0.5, reduction="none", backend="torch")
    lp, lq = F.log_softmax(t.double(), -1), F.log_softmax(s.double(), -1)
    torch.testing.assert_close(half.double(), 4 * (1 - ((lp + lq) / 2).exp().sum(-1)), rtol=1e-5, atol=1e-6)
    near_fkl = fastkd.distill_loss(s.double(), t.double(), "ab", alpha=1.0, beta=1e-7, reduction="none")
    fkl = fastkd.distill_loss(s.double(), t.double(), "fkl", reduction="none")
    torch.testing.assert_close(near_fkl, fkl, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ab_fused_linear_path(backend):
    g = torch.Generator().manual_seed(16)
    h = torch.randn(7, 16, generator=g)
    w = torch.randn(75, 16, generator=g) * 0.3
    th, tw = torch.randn(7, 12, generator=g), torch.randn(75, 12, generator=g) * 0.3
    labels = torch.tensor([1, -100, 3, 4, 5, 6, 74])
    kw = dict(alpha=0.6, beta=0.9, temperature=1.2, labels=labels)
    hx, wx = h.clone().requires_grad_(), w.clone().requires_grad_()
    with TD.override_config(block_v=32):
        out = fastkd.fused_linear_distill_loss(hx, wx, th, tw, divergence="ab", chunk_size=3, backend=backend, **kw)
    out.backward()
    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    ref = R.fused_linear_distill_loss(hr, wr, th.double(), tw.double(), divergence="ab", **kw)
    ref.backward()
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(hx.grad.double(), hr.grad, rtol=2e-4, atol=2e-6)
    torch.testing.assert_close(wx.grad.double(), wr.grad, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div", ["fkl", "skl", "ab"])
def test_fused_nan_teacher_gives_nan(backend, div):
    """Issue 13 item 2 on the fused path: the per-chunk backends propagate a NaN teacher logit."""
    h, w = torch.randn(4, 8), torch.randn(40, 8)
    t = torch.randn(4, 40)
    t[2, 3] = math.nan
    with TD.override_config(block_v=32):
        out = fastkd.fused_linear_distill_loss(h, w, teacher_logits=t, divergence=div, reduction="none",
                                               backend=backend)
    assert torch.isnan(out[2]) and torch.isfinite(out[[0, 1, 3]]).all()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 4), v=st.integers(1, 90),
       alpha=st.sampled_from([-1.5, -0.5, 0.25, 0.8, 1.0, 2.0]), beta=st.sampled_from([-0.7, 0.3, 0.5, 1.0, 1.8]),
       temp=st.sampled_from([0.7, 1.0, 2.0]), seed=st.integers(0, 2**16))
def test_ab_property_random_shapes_and_exponents(rows, v, alpha, beta, temp, seed):
    """ab on random shapes and exponents of both signs: torch vs float64 reference, Triton vs torch."""
    if alpha + beta == 0:
        return
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(rows, v, generator=g) * 1.5, torch.randn(rows, v, generator=g) * 1.5
    kw = dict(alpha=alpha, beta=beta, temperature=temp, reduction="none")
    out, grad = _loss_grad(s, t, "torch", **kw)
    ref, rgrad = _ref_loss_grad(s, t, **kw)
    scale = 1 + ref.abs().max().item()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-3, atol=1e-5 * (1 + rgrad.abs().max().item()))
    if TD._IMPORT_ERROR is None:
        tout, tgrad = _loss_grad(s, t, "triton", **kw)
        torch.testing.assert_close(tout, out, rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(tgrad, grad, rtol=1e-3, atol=1e-5 * (1 + grad.abs().max().item()))
