"""AMP: every fused entry point under ``torch.autocast("cpu", dtype=torch.bfloat16)`` with fp32 weights and bf16 /
fp32 hidden states computes in bf16, returns fp32 weight gradients accumulated in fp32 (not rounded to bf16) and
stays within the error of plain PyTorch autocast (bf16 logits) of the float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import reference as R

BF16 = torch.bfloat16
AMP = dict(device_type="cpu", dtype=BF16)


def _heads(n=37, h=16, ht=12, v=67, hidden_dtype=BF16, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(student_hidden=r(n, h).to(hidden_dtype), student_weight=r(v, h) * 0.4, student_bias=r(v) * 0.1,
                teacher_hidden=r(n, ht).to(hidden_dtype), teacher_weight=r(v, ht) * 0.4)


def _leaves(prob):
    return {k: prob[k].detach().clone().requires_grad_() for k in ("student_hidden", "student_weight",
                                                                    "student_bias")}


def _run(fn, prob, go, **kw):
    leaves = _leaves(prob)
    out = fn(**{**prob, **leaves}, **kw)
    grads = torch.autograd.grad(out, list(leaves.values()), go)
    return out.detach(), dict(zip(leaves, grads))


def _err(x, ref):
    return (x.double() - ref).abs().max().item()


def _check_against(out, g, ref, gref, amp_out, amp_g, prob):
    """fastkd's error of the float64 reference ≤ 2 × plain autocast's + a margin; fp32 grads of the params."""
    assert out.dtype == torch.float32
    assert _err(out, ref) <= 2 * _err(amp_out, ref) + 1e-3 * ref.abs().max().item() + 1e-4
    for k in g:
        assert g[k].dtype == prob[k].dtype, k
        scale = gref[k].abs().max().item()
        assert _err(g[k], gref[k]) <= 2 * _err(amp_g[k], gref[k]) + 2e-2 * scale, k
    gw = g["student_weight"]  # accumulated in fp32: not the bf16 rounding of an fp32 value
    assert gw.dtype == torch.float32 and (gw != gw.to(BF16).float()).any()


@pytest.mark.parametrize("hidden_dtype", [BF16, torch.float32])
@pytest.mark.parametrize("opts", [dict(divergence="fkl"), dict(divergence="jsd", beta=0.3, temperature=1.7,
                                                                   softcap=(3.0, None), logit_scale=(1.2, 0.8))])
def test_fused_linear_distill_loss_under_autocast(hidden_dtype, opts):
    prob = _heads(hidden_dtype=hidden_dtype)
    labels = torch.randint(0, 67, (37,))
    labels[::5] = -100
    go = torch.tensor(1.3)
    s_scale, t_scale = opts.get("logit_scale", (1.0, 1.0))
    s_cap, t_cap = opts.get("softcap", (None, None))
    kw = {k: v for k, v in opts.items() if k not in ("softcap", "logit_scale")}

    def side(h, w, b, scale, cap):
        z = F.linear(h, w, b) * scale
        return z if cap is None else cap * torch.tanh(z / cap)

    def plain(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight):
        zs = side(student_hidden, student_weight, student_bias, s_scale, s_cap)
        zt = side(teacher_hidden, teacher_weight, None, t_scale, t_cap)
        return R.distill_loss(zs.double(), zt.double(), labels=labels, **kw)

    with torch.autocast(**AMP):
        out, g = _run(fastkd.fused_linear_distill_loss, prob, go, labels=labels, chunk_size=8, **opts)
        amp_out, amp_g = _run(plain, prob, go.double())
    ref, gref = _run(plain, {k: v.double() for k, v in prob.items()}, go.double())
    _check_against(out, g, ref, gref, amp_out, amp_g, prob)


def test_fused_linear_distill_loss_autocast_teacher_logits_and_none_reduction():
    prob = _heads()
    t_logits = F.linear(prob.pop("teacher_hidden").float(), prob.pop("teacher_weight"))  # fp32 logits
    go = torch.randn(37)
    with torch.autocast(**AMP):
        out, g = _run(fastkd.fused_linear_distill_loss, {**prob, "teacher_logits": t_logits}, go, reduction="none",
                      chunk_size=8, divergence="rkl")
        amp_out, amp_g = _run(lambda **a: R.distill_loss(F.linear(a["student_hidden"], a["student_weight"],
                                                                  a["student_bias"]).double(), t_logits.double(),
                                                         divergence="rkl", reduction="none"), prob, go.double())
    ref, gref = _run(lambda **a: R.distill_loss(F.linear(a["student_hidden"], a["student_weight"],
                                                         a["student_bias"]), t_logits.double(),
                                                divergence="rkl", reduction="none"),
                     {k: v.double() for k, v in prob.items()}, go.double())
    _check_against(out, g, ref, gref, amp_out, amp_g, prob)


def test_without_autocast_mixed_dtypes_still_raise():
    prob = _heads()
    with pytest.raises(TypeError, match="student_weight dtype"):
        fastkd.fused_linear_distill_loss(**prob)


@pytest.mark.parametrize("mode", ["topk", "topk_tail"])
def test_fused_linear_sparse_distill_loss_under_autocast(mode):
    prob = _heads()
    del prob["teacher_hidden"], prob["teacher_weight"]
    g = torch.Generator().manual_seed(3)
    t_lp = torch.log_softmax(torch.randn(37, 67, generator=g) * 2, -1)
    vals, ids = t_lp.topk(5, dim=-1)
    ids[::7, -1] = -1
    go = torch.tensor(0.9)
    kw = dict(mode=mode, divergence="fkl", temperature=1.3)

    def plain(student_hidden, student_weight, student_bias):
        z = F.linear(student_hidden, student_weight, student_bias)
        return fastkd.sparse_distill_loss(z.double(), ids, vals.double(), **kw)

    with torch.autocast(**AMP):
        out, gr = _run(fastkd.fused_linear_sparse_distill_loss, {**prob, "teacher_ids": ids, "teacher_values": vals},
                       go, chunk_size=8, **kw)
        amp_out, amp_g = _run(plain, prob, go.double())
    ref, gref = _run(plain, {k: v.double() for k, v in prob.items()}, go.double())
    _check_against(out, gr, ref, gref, amp_out, amp_g, prob)


def test_student_topk_from_hidden_under_autocast():
    prob = _heads()
    h, w, b = prob["student_hidden"], prob["student_weight"], prob["student_bias"]
    with torch.autocast(**AMP):
        ids, lp = fastkd.student_topk_from_hidden(h, w, 6, student_bias=b, chunk_size=8, temperature=1.5)
        z = F.linear(h, w, b)  # plain autocast: bf16 logits
    assert z.dtype == BF16
    ref_ids, ref_lp = fastkd.student_topk(z, 6, temperature=1.5)
    lp64 = torch.log_softmax(F.linear(h.double(), w.double(), b.double()) / 1.5, -1)
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=2e-2)
    # log-probs at the chosen ids within bf16 rounding of the float64 values there
    torch.testing.assert_close(lp.double(), lp64.gather(-1, ids), rtol=0, atol=5e-2)
    assert (ids == ref_ids).float().mean() > 0.9  # ties of bf16 logits may reorder a few


def test_hf_distillation_trainer_bf16():
    """DistillationTrainer(bf16=True) on CPU: the training loop runs the loss under autocast (fp32 weights, the
    body's hidden states as autocast leaves them); loss within bf16 error of the float64 unfused loss, fp32 grads."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    import fastkd.integrations.hf
    from fastkd.integrations.hf import DistillationTrainer

    def tiny(hidden, layers, seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=hidden, intermediate_size=2 * hidden,
                                            num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                            max_position_embeddings=32, tie_word_embeddings=False))

    student, teacher = tiny(16, 1, 0), tiny(24, 1, 1)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (3, 9), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    args = TrainingArguments(output_dir="/tmp/fastkd_amp_test", report_to=[], use_cpu=True, bf16=True,
                             save_strategy="no", per_device_train_batch_size=3, disable_tqdm=True,
                             max_steps=2, learning_rate=1e-2, logging_steps=1)
    rows = [dict(input_ids=ids[i], attention_mask=torch.ones_like(ids[i]), labels=labels[i]) for i in range(3)]
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                             divergence="jsd")
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    seen = []
    fused = fastkd.integrations.hf.fused_linear_distill_loss

    def spy(*a, **k):  # the loss itself runs under the run's autocast (Accelerate wraps only the forwards)
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == BF16)
        return fused(*a, **k)

    fastkd.integrations.hf.fused_linear_distill_loss = spy
    try:
        loss = tr.compute_loss(student, inputs)
    finally:
        fastkd.integrations.hf.fused_linear_distill_loss = fused
    assert seen == [True]
    loss.backward()
    assert student.lm_head.weight.grad.dtype == torch.float32
    with torch.no_grad():
        ls = student(input_ids=ids).logits[:, :-1].double()
        lt = teacher(input_ids=ids).logits[:, :-1].double()
    ref = R.distill_loss(ls, lt, "jsd", labels=labels[:, 1:])
    assert abs(loss.item() - ref.item()) <= 2e-2 * abs(ref.item()) + 1e-3
    out = tr.train()
    assert torch.isfinite(torch.tensor(out.training_loss))


@pytest.mark.parametrize("amp", [False, True])
def test_compute_dtype_of_every_fused_head(head_compute_dtypes, amp):
    """Without autocast a bf16 head computes in bf16 (no fp32 copy); under autocast an fp32 head computes in bf16."""
    seen = head_compute_dtypes
    prob = _heads()
    wdt = torch.float32 if amp else BF16
    h, w = prob["student_hidden"].requires_grad_(), prob["student_weight"].to(wdt).requires_grad_()
    th, tw = prob["teacher_hidden"], prob["teacher_weight"].to(wdt)
    ids = torch.randn(37, 67).topk(4, dim=-1).indices  # distinct ids per token
    vals = torch.log_softmax(torch.randn(37, 4), -1)
    with torch.autocast("cpu", dtype=BF16, enabled=amp):
        fastkd.fused_linear_distill_loss(h, w, th, tw, chunk_size=8).backward()
        fastkd.fused_linear_sparse_distill_loss(h, w, ids, vals, chunk_size=8).backward()
    assert seen and all(d == BF16 for d in seen), seen
