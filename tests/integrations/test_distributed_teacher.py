"""DistillationTrainer shards a plain teacher with the student's engine (fastkd.core.sharding.shard_teacher):
FSDP2, FSDP1 and DeepSpeed ZeRO-3 on 2 gloo processes on CPU.

For each engine: the teacher's parameter bytes per rank (its local shards, plus anything left gathered) drop to
about half and the per-rank peak around a teacher forward (those bytes + the peak of what the forward allocates,
from the profiler's memory events) drops below the unsharded teacher's; the teacher's hidden states are
unchanged; ``compute_loss`` with the teacher sharded by the trainer equals one process (loss and every student
gradient, fp32 tolerance; setup, models and reference from test_distributed_engines). Bad teacher / student
pairs raise ValueError naming ``teacher_model``. Every process group has a timeout, so a stuck rank fails the
test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import traceback

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import WORLD, init, run_cases, spawn
from test_distributed_engines import (
    TOL,
    B,
    _fsdp1,
    _fsdp1_grads,
    _fsdp2,
    _fsdp2_grads,
    _trainer,
    batch,
    check,
    n_items,
    reference,
    rows,
    tiny_llama,
)

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo needed")
DEEP_VOCAB = 512


def deep_teacher(seed: int = 1) -> torch.nn.Module:
    """A teacher whose memory is mostly its 8 decoder layers (as in real models), for the memory figures."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=DEEP_VOCAB, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float().requires_grad_(False)


def resident_bytes(model: torch.nn.Module) -> int:
    """Parameter bytes this rank holds: local shards plus any unit left gathered (FSDP1's unsharded flat
    parameter, a ZeRO-3 parameter still available)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from fastkd.core.sharding import engine_of

    engine = engine_of(model)
    if engine == "fsdp2":
        return sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    if engine == "fsdp1":
        total = 0
        for unit in FSDP.fsdp_modules(model):
            if unit._handle is None:
                continue
            fp = unit._handle.flat_param
            total += fp._local_shard.numel() * fp.element_size()
            if hasattr(fp, "_full_param_padded"):
                total += fp._full_param_padded.untyped_storage().size()
        return total
    if engine == "zero3":
        return sum(p.ds_tensor.numel() * p.ds_tensor.element_size()
                   + (p.numel() * p.element_size() if p.ds_status.name == "AVAILABLE" else 0)
                   for p in model.parameters())
    return sum(p.numel() * p.element_size() for p in model.parameters())


def forward_peak_bytes(fn, *args) -> int:
    """The peak of the bytes ``fn(*args)`` allocates above what was allocated when it started (CPU allocator
    events recorded by the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = top = 0
    for e in events:
        now += e.nbytes()
        top = max(top, now)
    return top


def teacher_hidden(teacher, data):
    from fastkd.integrations.hf import hidden_states

    with torch.no_grad():
        return hidden_states(teacher, data)


def memory_case(name: str, student, rank: int, out_dir: str) -> None:
    """Plain vs sharded by shard_teacher(like=student), bytes and forward peak per rank, for the deep teacher
    and for the 2-layer test teacher (mostly embeddings: its bytes halve, its peak is only recorded)."""
    from fastkd.core.sharding import engine_of, shard_teacher

    figures = {}
    for kind, make, vocab in (("deep", deep_teacher, DEEP_VOCAB),
                              ("tiny", lambda: tiny_llama(1).requires_grad_(False), 2048)):
        data = {"input_ids": rows(batch(), rank)["input_ids"] % vocab}
        plain = make()
        want = teacher_hidden(plain, data)
        plain_bytes = resident_bytes(plain)
        plain_peak = plain_bytes + forward_peak_bytes(teacher_hidden, plain, data)
        teacher = shard_teacher(make(), like=student)
        assert engine_of(teacher) == engine_of(student), (engine_of(teacher), engine_of(student))
        torch.testing.assert_close(teacher_hidden(teacher, data), want, **TOL)  # the first forward: warm-up
        sharded_bytes = resident_bytes(teacher)
        sharded_peak = sharded_bytes + forward_peak_bytes(teacher_hidden, teacher, data)
        assert resident_bytes(teacher) == sharded_bytes  # nothing left gathered after the forward
        f = figures[kind] = dict(full_bytes=plain_bytes, plain_peak=plain_peak, sharded_bytes=sharded_bytes,
                                 sharded_peak=sharded_peak)
        assert sharded_bytes <= plain_bytes / WORLD * 1.01, (kind, f)  # padding, FSDP1's root norm: under 1 %
        if kind == "deep":
            assert sharded_peak < 0.9 * plain_peak, (kind, f)
    with open(os.path.join(out_dir, f"memory_{name}.{rank}.json"), "w") as f:
        json.dump(figures, f)


def trainer_case(name: str, student, teacher, grads, rank: int, ref, engine: str, step=None):
    """compute_loss (no_grad evaluation, then training) with the trainer sharding ``teacher``; returns the
    teacher it ends up with."""
    from fastkd.core.sharding import engine_of

    data = batch()
    tr = _trainer(student, teacher)
    tr.shard_teacher = True
    with torch.no_grad():  # evaluation first: the trainer shards the teacher at its first loss call
        eval_loss = tr.compute_loss(student, rows(data, rank), num_items_in_batch=n_items(data))
    assert engine_of(tr.teacher_model) == engine, (name, engine_of(tr.teacher_model))
    loss = tr.compute_loss(student, rows(data, rank), num_items_in_batch=n_items(data))
    torch.testing.assert_close(eval_loss, loss.detach(), **TOL, msg=f"{name}: eval loss")
    (step or (lambda x: x.backward()))(loss)
    check(name, loss, grads(student), ref)
    return tr.teacher_model


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (WORLD,))


# ---- FSDP2 / FSDP1 ------------------------------------------------------------------------------------------
def _fsdp_cases(out_dir: str):
    from torch.distributed.fsdp import FSDPModule

    from fastkd.core.sharding import is_dtensor, shard_teacher

    def memory_fsdp2(rank, ref):
        memory_case("fsdp2", _fsdp2(tiny_llama(0), _mesh(), head_unit=True, reshard_root=True), rank, out_dir)

    def memory_fsdp1(rank, ref):
        memory_case("fsdp1", _fsdp1(tiny_llama(0), use_orig_params=True), rank, out_dir)

    def trainer_fsdp2(rank, ref):
        full = resident_bytes(tiny_llama(1))
        teacher = tiny_llama(1)
        s = _fsdp2(tiny_llama(0), _mesh(), head_unit=True, reshard_root=True)
        out = trainer_case("trainer fsdp2 (teacher sharded by the trainer)", s, teacher, _fsdp2_grads, rank, ref,
                           "fsdp2")
        assert out is teacher and all(is_dtensor(p) for p in teacher.parameters())  # resharded after use
        assert resident_bytes(teacher) <= full / WORLD * 1.01

    def trainer_fsdp1(rank, ref):
        full = resident_bytes(tiny_llama(1))
        for orig in (True, False):
            out = trainer_case(f"trainer fsdp1 (use_orig_params={orig}, teacher sharded by the trainer)",
                               _fsdp1(tiny_llama(0), orig), tiny_llama(1), _fsdp1_grads, rank, ref, "fsdp1")
            assert out._use_orig_params is orig
            assert resident_bytes(out) <= full / WORLD * 1.01

    def trainer_shard_off(rank, ref):  # shard_teacher=False: the teacher stays whole, the loss the same
        teacher = tiny_llama(1)
        s = _fsdp2(tiny_llama(0), _mesh(), head_unit=True, reshard_root=True)
        tr, data = _trainer(s, teacher), batch()
        tr.shard_teacher = False
        loss = tr.compute_loss(s, rows(data, rank), num_items_in_batch=n_items(data))
        loss.backward()
        check("trainer fsdp2, shard_teacher=False", loss, _fsdp2_grads(s), ref)
        assert tr.teacher_model is teacher and not any(is_dtensor(p) for p in teacher.parameters())

    def already_sharded_left_alone(rank, ref):
        mesh = _mesh()
        s = _fsdp2(tiny_llama(0), mesh, head_unit=True, reshard_root=True)
        t = _fsdp2(tiny_llama(1), mesh, head_unit=False, reshard_root=True)
        units = [m for m in t.modules() if isinstance(m, FSDPModule)]
        assert shard_teacher(t, like=s) is t
        assert [m for m in t.modules() if isinstance(m, FSDPModule)] == units
        plain = tiny_llama(1)
        assert shard_teacher(plain, like=tiny_llama(0)) is plain  # student not sharded: nothing to do
        assert not any(is_dtensor(p) for p in plain.parameters())

    def bad_combinations(rank, ref):
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import Shard, distribute_tensor
        from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

        import fastkd

        mesh = _mesh()
        other = DeviceMesh.from_group(dist.new_group([0, 1]), "cpu", mesh_dim_names=("other",))
        # mixed engines: an FSDP1 student with an FSDP2 teacher
        with pytest.raises(ValueError, match="teacher_model is sharded with fsdp2 but the model with fsdp1"):
            shard_teacher(_fsdp2(tiny_llama(1), mesh, head_unit=False, reshard_root=True),
                          like=_fsdp1(tiny_llama(0), True))
        # a teacher sharded on another mesh than the student's
        s = _fsdp2(tiny_llama(0), mesh, head_unit=True, reshard_root=True)
        with pytest.raises(ValueError, match="teacher_model has DTensor parameters on mesh.*student's mesh"):
            shard_teacher(_fsdp2(tiny_llama(1), other, head_unit=False, reshard_root=True), like=s)
        tr = _trainer(s, _fsdp2(tiny_llama(1), other, head_unit=False, reshard_root=True))
        tr.shard_teacher = False  # checked also when the trainer is told not to shard
        with pytest.raises(ValueError, match="teacher_model has DTensor parameters on mesh"):
            tr.compute_loss(s, rows(batch(), rank), num_items_in_batch=n_items(batch()))
        # a row-parallel (Shard(1)) teacher head
        rowwise = parallelize_module(tiny_llama(1), mesh, {"lm_head": RowwiseParallel()})
        with pytest.raises(ValueError, match="teacher_model's LM head weight is sharded on dim 1"):
            shard_teacher(rowwise, like=s)
        # the same at the loss: FSDP (per-rank hidden states) and TP (replicated) student heads
        g = torch.Generator().manual_seed(5)
        h, w, wt = torch.randn(6, 8, generator=g), torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
        w_dt = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_()
        for hs, match in ((h + rank, "teacher_weight is sharded on dim 1"), (h, "teacher_weight has placement")):
            with pytest.raises(ValueError, match=match):
                fastkd.fused_linear_distill_loss(hs, w_dt, h, distribute_tensor(wt, mesh, [Shard(1)]))
        with pytest.raises(ValueError, match="teacher_weight is a DTensor on mesh"):
            fastkd.fused_linear_distill_loss(h + rank, w_dt, h, distribute_tensor(wt, other, [Shard(0)]))

    return [memory_fsdp2, memory_fsdp1, trainer_fsdp2, trainer_fsdp1, trainer_shard_off, already_sharded_left_alone,
            bad_combinations]


CASE_NAMES = ["memory_fsdp2", "memory_fsdp1", "trainer_fsdp2", "trainer_fsdp1", "trainer_shard_off",
              "already_sharded_left_alone", "bad_combinations"]


def _worker(rank: int, port: int, out_dir: str) -> None:
    run_cases(rank, port, out_dir, _fsdp_cases(out_dir), setup=lambda: (reference(),))


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    """Every FSDP case in one 2-process spawn (process start and imports are most of the time)."""
    out = tmp_path_factory.mktemp("teacher")
    spawn(_worker, str(out))
    return out


def _report(out, name: str) -> None:
    for kind, f in json.loads((out / f"memory_{name}.0.json").read_text()).items():
        print(f"\n{name}, {kind} teacher ({WORLD} ranks, rank 0): parameter bytes {f['full_bytes']} -> "
              f"{f['sharded_bytes']}, per-rank peak around its forward {f['plain_peak']} -> {f['sharded_peak']}")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASE_NAMES)
def test_sharded_teacher_matches_single_process(fsdp_results, case):
    for rank in range(WORLD):
        path = fsdp_results / f"{case}.{rank}"
        assert path.exists(), f"{case} did not run on rank {rank}"
        result = path.read_text()
        assert result == "ok", f"rank {rank}:\n{result}"
    if case.startswith("memory_"):
        _report(fsdp_results, case.removeprefix("memory_"))


# ---- DeepSpeed ZeRO-3 (CPU accelerator) -----------------------------------------------------------------------
ZERO3 = {"train_micro_batch_size_per_gpu": B, "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
         "zero_allow_untested_optimizer": True,
         # every parameter partitioned; no prefetch / reuse window (its defaults exceed these tiny models)
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0,
                               "stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0}}


def _zero3_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    init(rank, port, timeout_s=90)
    result = "ok"
    try:
        import deepspeed
        from deepspeed.utils import safe_get_full_grad

        from fastkd.core.sharding import shard_teacher

        ref = reference()
        student = deepspeed.initialize(model=tiny_llama(0), config=ZERO3)[0]
        memory_case("zero3", student, rank, out_dir)
        full = resident_bytes(tiny_llama(1))
        teacher = trainer_case("trainer zero3 (teacher sharded by the trainer)", student, tiny_llama(1),
                               lambda s: {n: safe_get_full_grad(p) for n, p in s.module.named_parameters()}, rank,
                               ref, "zero3", step=student.backward)
        assert isinstance(teacher, deepspeed.DeepSpeedEngine)
        assert resident_bytes(teacher) <= full / WORLD * 1.01
        student.optimizer.zero_grad()
        # mixed engines: a ZeRO-3 student with an FSDP2 teacher
        from torch.distributed.device_mesh import init_device_mesh

        fsdp2_teacher = _fsdp2(tiny_llama(1), init_device_mesh("cpu", (WORLD,)), head_unit=False, reshard_root=True)
        with pytest.raises(ValueError, match="teacher_model is sharded with fsdp2 but the model with zero3"):
            shard_teacher(fsdp2_teacher, like=student)
        dist.barrier()
    except Exception:
        result = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"zero3.{rank}"), "w") as f:
            f.write(result)
        dist.destroy_process_group()


@pytest.mark.slow
def test_zero3_sharded_teacher_matches_single_process(tmp_path):
    """A plain teacher with a ZeRO-3 student becomes a ZeRO-3 inference engine: half the bytes per rank, a lower
    per-rank peak around its forward, compute_loss equal to one process; a ZeRO-3 student with an FSDP2 teacher
    is refused."""
    pytest.importorskip("deepspeed", reason="deepspeed not installed (pip install deepspeed; CPU accelerator)")
    spawn(_zero3_worker, str(tmp_path))
    for rank in range(WORLD):
        result = (tmp_path / f"zero3.{rank}").read_text()
        assert result == "ok", f"rank {rank}:\n{result}"
    _report(tmp_path, "zero3")
