"""DTensor and sharded-parameter inputs: one place that turns what a distributed engine hands the loss into
plain tensors (or a vocabulary shard) for the engines below.

:func:`resolve_heads` is the public helper: the fused entry points call it (through :func:`sharded_entry`)
before the LM-head engine, and trainers may call it themselves. What it does with each kind of input:

* **Tensor-parallel head** — a student weight that is a DTensor ``Shard(0)`` on a 1-D mesh whose hidden
  states are the same on every rank of the mesh (a ``Replicate`` DTensor, or plain tensors that compare
  equal across the mesh: one all_gather of 4 float64 checksums): the head stays local and the loss goes to
  the vocabulary-parallel engine (:mod:`fastkd.distill.vocab_parallel`) with the mesh's process group and the
  shard's vocabulary offset from the DTensor. A teacher weight / bias / logits on the same mesh stays local
  too; a plain full teacher head is sliced to the student's rows.
* **FSDP2-sharded head** (``Shard(0)`` with hidden states that differ across ranks: the data-parallel
  case) — the weight is gathered, ``full_tensor(grad_placements=[Partial("avg")])``: its backward is a
  reduce-scatter that averages the ranks' gradients into the shard, as FSDP does for every other parameter
  (the default grad placement, ``Replicate``, would keep each rank's own un-reduced gradient). Mixed
  precision (hidden states narrower than the shard, e.g. bf16 under FSDP2's ``MixedPrecisionPolicy``): the
  shard is cast to the hidden states' dtype before the gather, as FSDP's unshard does, and the gradient is
  cast back to the shard's dtype before the reduce-scatter (the reduction runs in the parameter's dtype).
* **Teacher DTensors** are gathered plainly (``full_tensor()``, no gradient); ``Replicate`` DTensors
  become their local tensor.
* **Flat shards** — FSDP1 (``use_orig_params=True`` outside forward: shape ``(0,)``; flat 1-D parameters)
  and DeepSpeed ZeRO-3 partitioned parameters (``ds_status`` not available) — cannot be gathered from
  the tensor alone: ValueError naming the fixes (the module form :func:`call_as_forward` /
  ``fastkd.nn.FusedLinearDistillLoss.through``, ``FSDP.summon_full_params``,
  ``deepspeed.zero.GatheredParameters``).
* **Bad combinations** — ``Shard(1)`` (row-parallel) heads, ``Partial`` or multi-dimensional meshes, a
  teacher DTensor on another mesh than the student's, hidden states on another mesh, DTensors mixed with
  flat shards: ValueError naming the argument.

Which gather moves fewer bytes (FSDP, world size R, student head V×H, N tokens per rank): gathering the
weight moves (R−1)/R·V·H elements in (forward) and as many out (the gradient's reduce-scatter); computing
on the local vocabulary slice instead would all-gather every rank's hidden states and the teacher's,
(R−1)·N·(H + Ht) elements in, and reduce-scatter (R−1)·N·H of hidden-state gradients out, plus per-chunk
statistics. The weight gather is the one implemented (docs/DESIGN.md gives the figures for typical shapes).

:func:`call_as_forward` is the module form: it runs a function as a module's forward, so the hooks FSDP2,
FSDP1 and ZeRO-3 put on that module gather its parameters for the call and reshard them after.
:func:`call_with_head` picks that module for a model's LM head; :func:`gathered_head` gathers a frozen
(teacher) head around a block and reshards an FSDP2 teacher after it; :func:`keep_in_graph` ties hidden
states captured inside a forward to the model's output for FSDP's backward hooks.

:func:`shard_teacher` shards a plain frozen teacher with the student's engine (FSDP2 on the student's mesh,
FSDP1 with the student's process group and strategy, a ZeRO-3 inference engine from the student's DeepSpeed
config), so the teacher's parameter memory per rank drops as the student's does; it also rejects teacher /
student combinations the loss cannot run (another engine, another mesh, a row-parallel teacher head).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Partial, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # a torch without distributed: nothing here can be a DTensor
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["VocabShard", "Heads", "resolve_heads", "resolve_logits", "sharded_entry", "call_as_forward", "head_in",
           "engine_of", "keep_in_graph", "is_dtensor", "call_with_head", "gathered_head", "shard_teacher",
           "check_teacher"]

_FLAT_FIX = ("compute the loss inside the module's forward so the engine gathers the head itself "
             "(fastkd.nn.FusedLinearDistillLoss(...).through(unit, ...) or fastkd.core.sharding.call_as_forward), "
             "or gather it around the loss and its backward (FSDP1: FullyShardedDataParallel.summon_full_params; "
             "DeepSpeed: deepspeed.zero.GatheredParameters)")


@dataclass(frozen=True)
class VocabShard:
    """This rank's vocabulary columns [vocab_start, vocab_start + size) of a head sharded over ``group``."""

    group: Any
    vocab_start: int
    size: int


@dataclass
class Heads:
    """Plain tensors for the engines; ``vocab_shard`` is set when the student head stays a local TP shard."""

    student_hidden: torch.Tensor
    student_weight: torch.Tensor
    student_bias: torch.Tensor | None = None
    teacher_hidden: torch.Tensor | None = None
    teacher_weight: torch.Tensor | None = None
    teacher_bias: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None
    vocab_shard: VocabShard | None = None


def is_dtensor(x: Any) -> bool:
    return DTensor is not None and isinstance(x, DTensor)


def _check_not_flat(name: str, x: torch.Tensor | None, dims: int) -> None:
    """FSDP1 flat shards and ZeRO-3 partitions carry no shape to gather from: fail with the fixes."""
    if x is None or is_dtensor(x):
        return
    status = getattr(x, "ds_status", None)
    if status is not None and getattr(status, "name", str(status)) != "AVAILABLE":
        raise ValueError(f"{name} is a DeepSpeed ZeRO-3 partitioned parameter (shape {tuple(x.shape)}, full "
                         f"shape {tuple(getattr(x, 'ds_shape', ()))}): {_FLAT_FIX}")
    if x.dim() < dims or (x.numel() == 0 and x.dim() == 1):
        raise ValueError(f"{name} has shape {tuple(x.shape)}: a flat shard (FSDP1's FlatParameter / "
                         f"use_orig_params view outside forward), not the ({'V, H' if dims == 2 else 'V'}) "
                         f"tensor: {_FLAT_FIX}")


def _mesh_dim0(name: str, x: torch.Tensor) -> Any:
    """The placement of a DTensor on a 1-D mesh (ValueError for anything else)."""
    if x.device_mesh.ndim != 1:
        raise ValueError(f"{name} is a DTensor on a {x.device_mesh.ndim}-D mesh {tuple(x.device_mesh.shape)}; "
                         "fastkd takes 1-D meshes (pass the TP or FSDP dimension's tensors, e.g. to_local() of "
                         "the other dimension)")
    (p,) = x.placements
    if p.is_partial():
        raise ValueError(f"{name} is a Partial DTensor; reduce it (redistribute to Replicate) first")
    if p.is_shard() and not isinstance(p, Shard):  # _StridedShard and friends
        raise ValueError(f"{name} has placement {p}; only Shard(0) and Replicate heads are supported")
    return p


def _same_mesh(name: str, x: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if x.device_mesh != ref.device_mesh:
        raise ValueError(f"{name} is a DTensor on mesh {x.device_mesh} but {ref_name} is on "
                         f"{ref.device_mesh}; put both on one mesh (or pass {name} as a plain tensor)")


def _offset(x: torch.Tensor, dim: int) -> int:
    _, off = compute_local_shape_and_global_offset(x.shape, x.device_mesh, x.placements)
    return int(off[dim])


def _replicated(x: torch.Tensor, group: Any) -> bool:
    """True when plain ``x`` holds the same values on every rank of ``group`` (4 float64 checksums)."""
    x = x.detach()  # strided reductions: no copy of a sliced (non-contiguous) hidden-state view
    sums = torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device),
                        x.sum(dtype=torch.float64), torch.linalg.vector_norm(x, dtype=torch.float64),
                        x[..., 0].sum(dtype=torch.float64)])
    parts = [torch.empty_like(sums) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, sums, group=group)
    return all(torch.equal(parts[0], p) for p in parts[1:])


def _plain(name: str, x: torch.Tensor | None, *, ref: torch.Tensor | None = None,
           ref_name: str = "", grad: bool = False) -> torch.Tensor | None:
    """A non-head DTensor (hidden states, teacher tensors) as a plain tensor: Replicate → local, Shard →
    gathered (teacher: no gradient)."""
    if not is_dtensor(x):
        return x
    p = _mesh_dim0(name, x)
    if ref is not None:
        _same_mesh(name, x, ref, ref_name)
    if p.is_replicate():
        return x.to_local()
    if not grad:
        return x.detach().full_tensor()
    return x.full_tensor()


class _GatherNarrow(torch.autograd.Function):
    """An FSDP2 ``Shard(0)`` weight cast to a narrower ``dtype`` before its all-gather (as FSDP's mixed-precision
    unshard casts, so the gather moves the narrow bytes); the backward casts the gradient back to the shard's
    dtype before the averaging reduce-scatter, so the reduction runs in the parameter's (wider) dtype."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.spec = (x.device_mesh, x.placements, x.shape, x.stride(), x.dtype)
        return x.detach().to(dtype).full_tensor()

    @staticmethod
    def backward(ctx, grad):
        mesh, placements, shape, stride, dtype = ctx.spec
        partial = DTensor.from_local(grad.to(dtype).contiguous(), mesh, [Partial("avg")], run_check=False,
                                     shape=shape, stride=stride)
        return partial.redistribute(mesh, placements), None


def _gather_head(name: str, x: torch.Tensor | None, grad_avg: bool, dtype: torch.dtype) -> torch.Tensor | None:
    if not is_dtensor(x):
        return x
    p = _mesh_dim0(name, x)
    # mixed precision (hidden states narrower than the shard): cast the shard first, gather the narrow bytes
    narrow = x.is_floating_point() and x.dtype != dtype and dtype.itemsize < x.dtype.itemsize
    if p.is_replicate():
        full = x.to_local()
    elif p.dim != 0:
        raise ValueError(f"{name} is sharded on dim {p.dim} (a row-parallel head); the loss needs the "
                         "vocabulary dimension 0 sharded (ColwiseParallel) or replicated")
    elif not x.requires_grad:
        full = (x.detach().to(dtype) if narrow else x.detach()).full_tensor()
    elif grad_avg and narrow:
        full = _GatherNarrow.apply(x, dtype)
    else:
        full = x.full_tensor(grad_placements=[Partial("avg")] if grad_avg else None)
    return full if full.dtype == dtype or not full.is_floating_point() else full.to(dtype)


def _rows_of(name: str, x: torch.Tensor | None, shard: VocabShard, ref: torch.Tensor, dim: int = 0
             ) -> torch.Tensor | None:
    """The student shard's vocabulary rows (``dim``) of a teacher tensor: local when it is a DTensor on the
    student's mesh with the same shard, sliced when it is plain and full."""
    if x is None:
        return None
    if is_dtensor(x):
        _same_mesh(name, x, ref, "student_weight")
        p = _mesh_dim0(name, x)
        d = dim % x.dim()
        if not (p.is_shard() and p.dim == d) or _offset(x, d) != shard.vocab_start:
            raise ValueError(f"{name} has placement {p} but the student head is Shard(0) at vocabulary offset "
                             f"{shard.vocab_start}; shard both heads the same way")
        return x.to_local().detach()
    full = shard.size * dist.get_world_size(shard.group)
    if x.shape[dim] == shard.size:
        return x
    if x.shape[dim] < shard.vocab_start + shard.size:
        raise ValueError(f"{name} has {x.shape[dim]} vocabulary entries; the student's TP shard needs columns "
                         f"[{shard.vocab_start}, {shard.vocab_start + shard.size}) of ~{full}")
    return x.narrow(dim, shard.vocab_start, shard.size)


def resolve_heads(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                  student_bias: torch.Tensor | None = None, *, teacher_hidden: Any = None, teacher_weight: Any = None,
                  teacher_bias: Any = None, teacher_logits: Any = None, vocab_parallel: bool = True) -> Heads:
    """Plain tensors (or a local TP shard) for the LM-head engine from what a distributed engine passed.

    Args: the fused loss's tensors, any of them a DTensor (see the module docstring for each case).
        vocab_parallel: keep a TP student head local and report its :class:`VocabShard` (False: gather it,
            with each rank keeping its own gradient slice, for losses without a vocabulary-parallel engine).

    Returns: :class:`Heads`. Raises ValueError for flat shards and bad combinations, naming the argument.
    """
    for name, x, dims in (("student_weight", student_weight, 2), ("student_bias", student_bias, 1),
                          ("teacher_weight", teacher_weight, 2), ("teacher_bias", teacher_bias, 1)):
        if isinstance(x, torch.Tensor):
            _check_not_flat(name, x, dims)
    tensors = [student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
               teacher_logits]
    if not any(is_dtensor(x) for x in tensors):
        return Heads(*tensors)
    if isinstance(teacher_weight, (list, tuple)) or isinstance(teacher_hidden, (list, tuple)):
        raise ValueError("several teachers with DTensor heads are not supported; pass plain tensors")
    w = student_weight
    dtype = _plain("student_hidden", student_hidden).dtype if is_dtensor(student_hidden) else student_hidden.dtype
    if is_dtensor(w):
        p = _mesh_dim0("student_weight", w)
        if is_dtensor(student_bias):
            _same_mesh("student_bias", student_bias, w, "student_weight")
        tp = False
        if p.is_shard():
            if p.dim != 0:
                raise ValueError(f"student_weight is sharded on dim {p.dim} (a row-parallel head); the loss needs "
                                 "the vocabulary dimension 0 sharded (ColwiseParallel) or replicated")
            group = w.device_mesh.get_group()
            if is_dtensor(student_hidden):
                _same_mesh("student_hidden", student_hidden, w, "student_weight")
                tp = _mesh_dim0("student_hidden", student_hidden).is_replicate()
                if not tp:
                    raise ValueError("student_hidden is a sharded DTensor with a Shard(0) student_weight; "
                                     "pass replicated hidden states (tensor parallel) or plain per-rank ones (FSDP)")
            else:
                tp = _replicated(student_hidden, group)
        if tp:
            shard = VocabShard(group, _offset(w, 0), w.to_local().shape[0])
            if not vocab_parallel:
                return Heads(_plain("student_hidden", student_hidden, grad=True),
                             w.full_tensor(), _gather_head("student_bias", student_bias, False, dtype),
                             _plain("teacher_hidden", teacher_hidden, ref=w, ref_name="student_weight"),
                             _gather_head("teacher_weight", teacher_weight, False, dtype),
                             _gather_head("teacher_bias", teacher_bias, False, dtype),
                             _plain("teacher_logits", teacher_logits, ref=w, ref_name="student_weight"))
            bias = student_bias.to_local() if is_dtensor(student_bias) else _rows_of(
                "student_bias", student_bias, shard, w)
            return Heads(_plain("student_hidden", student_hidden, grad=True), w.to_local(), bias,
                         _plain("teacher_hidden", teacher_hidden, ref=w, ref_name="student_weight"),
                         _rows_of("teacher_weight", teacher_weight, shard, w),
                         _rows_of("teacher_bias", teacher_bias, shard, w),
                         _rows_of("teacher_logits", teacher_logits, shard, w, dim=-1), shard)
    for name, x in (("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias),
                    ("teacher_logits", teacher_logits), ("teacher_hidden", teacher_hidden)):
        if is_dtensor(x) and is_dtensor(w):
            _same_mesh(name, x, w, "student_weight")
    return Heads(_plain("student_hidden", student_hidden, grad=True),
                 _gather_head("student_weight", w, True, dtype),
                 _gather_head("student_bias", student_bias, True, dtype),
                 _plain("teacher_hidden", teacher_hidden), _gather_head("teacher_weight", teacher_weight, False, dtype),
                 _gather_head("teacher_bias", teacher_bias, False, dtype), _plain("teacher_logits", teacher_logits))


def resolve_logits(student_logits: torch.Tensor, teacher_logits: Any = None
                   ) -> tuple[torch.Tensor, Any, VocabShard | None]:
    """Logits DTensors → plain tensors: ``Shard(-1)`` student logits (a ColwiseParallel head's output) give
    their local columns and the :class:`VocabShard`; the teacher's must be sharded the same way (or plain and
    full: sliced). ``Replicate`` → local tensors. Other placements: ValueError."""
    s = student_logits
    if not is_dtensor(s):
        if is_dtensor(teacher_logits):
            return s, _plain("teacher_logits", teacher_logits), None
        return s, teacher_logits, None
    p = _mesh_dim0("student_logits", s)
    if p.is_replicate():
        return s.to_local(), _plain("teacher_logits", teacher_logits, ref=s, ref_name="student_logits"), None
    if p.dim != s.dim() - 1:
        raise ValueError(f"student_logits is sharded on dim {p.dim}; fastkd takes vocabulary-sharded "
                         f"(Shard({s.dim() - 1})) or replicated logits DTensors")
    local = s.to_local()
    shard = VocabShard(s.device_mesh.get_group(), _offset(s, s.dim() - 1), local.shape[-1])
    t = teacher_logits
    if is_dtensor(t):
        _same_mesh("teacher_logits", t, s, "student_logits")
        if t.placements != s.placements or t.shape != s.shape:
            raise ValueError(f"teacher_logits placement {t.placements} / shape {tuple(t.shape)} differ from "
                             f"student_logits' {s.placements} / {tuple(s.shape)}")
        t = t.to_local()
    elif isinstance(t, torch.Tensor) and t.shape[-1] != local.shape[-1]:
        t = t.narrow(-1, shard.vocab_start, shard.size)
    return local, t, shard


_FUSED_NAMES = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight",
                "teacher_bias", "teacher_logits")
_LOGITS_NAMES = ("student_logits", "teacher_logits")


def _is_default(value: Any, default: Any) -> bool:
    if value is None or value is default:
        return True
    if isinstance(value, torch.Tensor) or isinstance(default, torch.Tensor):
        return False
    try:
        return bool(value == default)
    except (TypeError, ValueError, RuntimeError):
        return False


def sharded_entry(kind: str, vocab_parallel: str | None = None,
                  shard_only: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a public loss: resolve its DTensor / sharded inputs before the engine runs.

    ``kind``: "fused" (the arguments of :func:`resolve_heads`) or "logits" (``student_logits``,
    ``teacher_logits``: :func:`resolve_logits`). ``vocab_parallel``: "module:function" of the
    vocabulary-parallel loss a TP shard goes to (imported on the first such call) when the divergence is in
    that module's ``VP_DIVERGENCES`` and every other option the call sets is a parameter of that function;
    otherwise the TP head (or logits) is gathered, each rank keeping its slice of the gradient. Calls without
    DTensors or flat shards pass through unchanged. ``shard_only``: the decorated function *is* the
    vocabulary-parallel loss: DTensors must give a vocabulary shard (group and offset from the DTensor).
    """
    names = _FUSED_NAMES if kind == "fused" else _LOGITS_NAMES

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not _needs_resolving(kind, args, kwargs):
                return fn(*args, **kwargs)
            outer = {k: kwargs.pop(k) for k in ("token_weight", "select", "fraction") if k in kwargs}
            a = sig.bind(*args, **kwargs).arguments
            set_options = {k for k, v in a.items()
                           if k not in names and k != "divergence" and not _is_default(v, sig.parameters[k].default)}
            divergence = a.get("divergence", sig.parameters["divergence"].default)
            vp = None
            if vocab_parallel is not None and all(v is None for v in outer.values()):
                module, name = vocab_parallel.split(":")
                vp_module = importlib.import_module(module)
                vp = getattr(vp_module, name)
                if not (set_options <= set(inspect.signature(vp).parameters)
                        and divergence in vp_module.VP_DIVERGENCES):
                    vp = None
            routable = vp is not None or shard_only
            if kind == "fused":
                heads = resolve_heads(*(a.get(k) for k in names[:3]), **{k: a.get(k) for k in names[3:]},
                                      vocab_parallel=routable)
                tensors = {k: getattr(heads, k) for k in names}
                shard = heads.vocab_shard
            else:
                s, t, shard = resolve_logits(a["student_logits"], a.get("teacher_logits"))
                if shard is not None and not routable:  # no VP engine for these options: gather the logits
                    s, t, shard = a["student_logits"].full_tensor(), a.get("teacher_logits"), None
                    t = t.detach().full_tensor() if is_dtensor(t) else t
                tensors = {"student_logits": s, "teacher_logits": t}
            a.update({k: v for k, v in tensors.items() if k in a or v is not None})
            if shard_only:
                if shard is None:
                    raise ValueError(f"{fn.__name__} needs a vocabulary-sharded (tensor-parallel) head or logits; "
                                     "these DTensors are data-parallel shards: call the dense loss instead")
                if set_options & {"group", "vocab_start"}:
                    raise ValueError("group and vocab_start come from the DTensor inputs; do not pass them")
                return fn(**a, **outer, group=shard.group, vocab_start=shard.vocab_start)
            if shard is None:
                return fn(**a, **outer)
            keep = {k: v for k, v in a.items()
                    if v is not None and (k in names or k == "divergence" or k in set_options)}
            return vp(**keep, group=shard.group, vocab_start=shard.vocab_start)

        return wrapper

    return deco


def _needs_resolving(kind: str, args: tuple, kwargs: dict) -> bool:
    values = list(args) + list(kwargs.values())
    for x in values:
        if is_dtensor(x):
            return True
    if kind == "fused":  # a flat shard where a head goes: let resolve_heads raise its message
        for x in values:
            if isinstance(x, torch.Tensor) and (getattr(x, "ds_status", None) is not None
                                                or (x.dim() == 1 and x.numel() == 0)):
                return True
        for i, name in ((1, "student_weight"), (3, "teacher_weight")):
            x = kwargs.get(name, args[i] if len(args) > i else None)
            if isinstance(x, torch.Tensor) and x.dim() == 1:
                return True
    return False


@contextlib.contextmanager
def _forward_replaced(module: torch.nn.Module, fn: Callable[..., Any]) -> Iterator[None]:
    inner = module
    while hasattr(inner, "_fsdp_wrapped_module"):  # FSDP1 calls the wrapped module's forward
        inner = inner._fsdp_wrapped_module
    had = "forward" in inner.__dict__
    old = inner.__dict__.get("forward")
    inner.forward = fn
    try:
        yield
    finally:
        if had:
            inner.forward = old
        else:
            del inner.forward


def call_as_forward(module: torch.nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` run as ``module``'s forward (``module(*args, **kwargs)`` with its forward
    swapped for ``fn`` during the call), so the engine's hooks on ``module`` — FSDP2's and FSDP1's unit
    pre/post-forward (and the pre-backward hooks on the result), ZeRO-3's parameter fetch and release —
    gather its parameters for ``fn`` and reshard them after, in forward and in backward.

    ``module``: the FSDP unit (or ZeRO-3 module) that owns the LM head — the head itself when it is its own
    unit, else the model. Inside ``fn``, read the parameters from the module (e.g. ``head.weight``): they are
    the gathered ones only during the call. Tensors that need gradients must be passed in ``args`` /
    ``kwargs`` (FSDP2 hooks its post-backward on them).
    """
    with _forward_replaced(module, fn):
        return module(*args, **kwargs)


def engine_of(model: torch.nn.Module) -> str | None:
    """"fsdp2", "fsdp1", "zero3" or None: the sharding engine whose hooks manage ``model``'s parameters."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:
        return None
    for m in model.modules():
        if isinstance(m, FSDPModule):
            return "fsdp2"
        if isinstance(m, FullyShardedDataParallel):
            return "fsdp1"
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return "zero3"
    return None


class _KeepInGraph(torch.autograd.Function):
    """Returns ``x``; its backward also sends zero gradients to ``others``, so their grad_fns (and the
    hooks the sharding engine registered on them) run in the backward pass."""

    @staticmethod
    def forward(ctx, x, *others):
        ctx.shapes = [(o.shape, o.dtype, o.device) for o in others]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.shapes))


def keep_in_graph(x: torch.Tensor, output: Any) -> torch.Tensor:
    """``x`` (e.g. hidden states captured inside a model's forward) tied to the tensors of ``output`` (the
    model's return value) that need gradients: FSDP2 / FSDP1 register their pre-backward hooks (re-gather
    the root's parameters, enter the backward state) on the model's outputs, so a loss that reads only
    ``x`` would otherwise back-propagate into freed parameters (FSDP2) or an IDLE FSDP1 state."""
    values = output.values() if hasattr(output, "values") else (output if isinstance(output, (list, tuple))
                                                                 else [output])
    others = [t for t in values if isinstance(t, torch.Tensor) and t.requires_grad]
    if not others or not torch.is_grad_enabled():
        return x
    return _KeepInGraph.apply(x, *others)


def head_in(unit: torch.nn.Module) -> torch.nn.Module:
    """The LM head inside ``unit``: ``unit`` itself when it is a linear layer, else its (wrapped) model's
    ``get_output_embeddings()``."""
    inner = unit
    while True:
        if hasattr(inner, "_fsdp_wrapped_module"):
            inner = inner._fsdp_wrapped_module
        elif isinstance(getattr(inner, "module", None), torch.nn.Module):
            inner = inner.module
        else:
            break
    if isinstance(getattr(inner, "weight", None), torch.Tensor) and not hasattr(inner, "get_output_embeddings"):
        return inner
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(inner).__name__} is neither an LM head nor a model with output embeddings")
    return head


def _head_unit(model: torch.nn.Module, head: torch.nn.Module) -> torch.nn.Module:
    """The innermost FSDP1 wrapper whose subtree holds ``head`` (the unit that owns its flat parameter)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    unit = model
    for m in model.modules():
        if isinstance(m, FullyShardedDataParallel) and any(x is head for x in m.modules()):
            unit = m
    return unit


def call_with_head(model: torch.nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(weight, bias, *args, **kwargs)`` with ``model``'s LM head usable: as the forward of the FSDP1 unit
    or the ZeRO-3 head that owns it (:func:`call_as_forward`, so the engine gathers it for forward and
    backward), or directly (plain models, DDP, FSDP2: a DTensor head is gathered by the loss itself)."""
    head = head_in(model)
    engine = engine_of(model)
    if engine not in ("fsdp1", "zero3"):
        return fn(head.weight, getattr(head, "bias", None), *args, **kwargs)
    unit = _head_unit(model, head) if engine == "fsdp1" else head

    def forward(*a: Any, **k: Any) -> Any:
        return fn(head.weight, getattr(head, "bias", None), *a, **k)

    return call_as_forward(unit, forward, *args, **kwargs)


@contextlib.contextmanager
def gathered_head(model: torch.nn.Module) -> Iterator[None]:
    """A frozen (teacher) model's LM head gathered for the body of the ``with`` (no gradients): FSDP1
    ``summon_full_params`` of the head's unit, ZeRO-3 ``GatheredParameters`` of the head; FSDP2 and plain
    models need nothing (a DTensor head is gathered by the loss). On exit an FSDP2 model is resharded
    (``reshard()``: the root unit stays gathered after its forward otherwise)."""
    engine = engine_of(model)
    head = head_in(model)
    if engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        ctx = FullyShardedDataParallel.summon_full_params(_head_unit(model, head), recurse=False, writeback=False)
    elif engine == "zero3":
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=None)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        yield
    if engine == "fsdp2":
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def _meshes(model: torch.nn.Module) -> list[Any]:
    """The distinct device meshes of ``model``'s DTensor parameters."""
    out: list[Any] = []
    for p in model.parameters():
        if is_dtensor(p) and not any(p.device_mesh == m for m in out):
            out.append(p.device_mesh)
    return out


def check_teacher(teacher: torch.nn.Module, like: torch.nn.Module) -> None:
    """ValueError, naming ``teacher_model``, for a teacher the trainer cannot pair with the student ``like``:
    sharded by another engine than the student, DTensor parameters on a mesh the student does not use, or a
    DTensor LM head sharded on another dimension than the vocabulary."""
    engine_t, engine_s = engine_of(teacher), engine_of(like)
    if engine_t is not None and engine_s is not None and engine_t != engine_s:
        raise ValueError(f"teacher_model is sharded with {engine_t} but the model with {engine_s}; shard both "
                         "with one engine, or pass the teacher unsharded (the trainer then shards it like the model)")
    t_meshes, s_meshes = _meshes(teacher), _meshes(like)
    if t_meshes and s_meshes and not all(any(m == s for s in s_meshes) for m in t_meshes):
        raise ValueError(f"teacher_model has DTensor parameters on mesh {t_meshes[0]} but the model's are on "
                         f"{s_meshes[0]}; shard the teacher on the student's mesh (or pass it unsharded)")
    try:
        w = head_in(teacher).weight
    except TypeError:
        return
    if is_dtensor(w):
        p = _mesh_dim0("teacher_model's LM head weight", w)
        if p.is_shard() and p.dim != 0:
            raise ValueError(f"teacher_model's LM head weight is sharded on dim {p.dim} (a row-parallel head); "
                             "the loss needs the vocabulary dimension 0 sharded (ColwiseParallel) or replicated")


def _base_class(module: torch.nn.Module) -> type:
    """The module's own class (FSDP2 swaps in a subclass named FSDP<cls>)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def _teacher_units(teacher: torch.nn.Module, student_layers: set[type]) -> list[torch.nn.Module]:
    """The teacher submodules that become their own units: its blocks (the classes the student's non-leaf units
    have, else the model's ``_no_split_modules``, i.e. its decoder layers) and, when they are not tied, its
    input and output embeddings (so the root that stays gathered holds little more than the final norm)."""
    classes = {c for c in student_layers if any(type(m) is c for m in teacher.modules())}
    if not classes:
        names = set(getattr(teacher, "_no_split_modules", None) or ())
        classes = {type(m) for m in teacher.modules() if type(m).__name__ in names}
    units = [m for m in teacher.modules() if type(m) in classes and m is not teacher]
    get_in, get_out = getattr(teacher, "get_input_embeddings", None), getattr(teacher, "get_output_embeddings", None)
    emb, head = (get_in() if get_in else None), (get_out() if get_out else None)
    tied = emb is not None and head is not None and getattr(emb, "weight", None) is getattr(head, "weight", 0)
    inside = {id(x) for u in units for x in u.modules()}
    if not tied:
        units += [m for m in (emb, head) if isinstance(m, torch.nn.Module) and id(m) not in inside]
    return units


def _reshard_all(module: torch.nn.Module, *_: Any) -> None:
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _shard_fsdp2(teacher: torch.nn.Module, like: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import FSDPModule, fully_shard

    (mesh, *_) = _meshes(like)
    layers = {_base_class(m) for m in like.modules()
              if isinstance(m, FSDPModule) and m is not like and next(m.children(), None) is not None}
    for unit in _teacher_units(teacher, layers):
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    fully_shard(teacher, mesh=mesh, reshard_after_forward=True)
    # no backward runs through the teacher, and nothing else would free a unit left gathered after its forward
    teacher.register_forward_hook(_reshard_all)
    return teacher


def _shard_fsdp1(teacher: torch.nn.Module, like: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import CustomPolicy

    units = FSDP.fsdp_modules(like)
    root = next(u for u in units if u._is_root) if any(getattr(u, "_is_root", False) for u in units) else units[0]
    layers = {type(u.module) for u in units if u is not root and next(u.module.children(), None) is not None}
    ids = {id(m) for m in _teacher_units(teacher, layers)}
    group: Any = root.process_group
    if root.sharding_strategy in (ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2):
        group = (root.process_group, root._inter_node_pg)
    return FSDP(teacher, process_group=group, sharding_strategy=root.sharding_strategy,
                use_orig_params=root._use_orig_params, device_id=root.compute_device,
                auto_wrap_policy=CustomPolicy(lambda m: id(m) in ids))


def _shard_zero3(teacher: torch.nn.Module, like: torch.nn.Module, ds_config: dict[str, Any] | None
                 ) -> torch.nn.Module:
    import deepspeed

    own = getattr(getattr(like, "_config", None), "_param_dict", None)  # the student's DeepSpeedEngine config
    cfg = copy.deepcopy(ds_config if ds_config is not None else own if own is not None
                        else {"train_micro_batch_size_per_gpu": 1})
    for key in ("optimizer", "scheduler"):  # an inference engine: no optimizer state for the frozen teacher
        cfg.pop(key, None)
    zero = dict(cfg.get("zero_optimization") or {})
    zero.pop("offload_optimizer", None)
    zero["stage"] = 3
    cfg["zero_optimization"] = zero
    engine, *_ = deepspeed.initialize(model=teacher, config=cfg)
    engine.eval()
    return engine


def shard_teacher(teacher: torch.nn.Module, like: torch.nn.Module, *, shard: bool = True,
                  ds_config: dict[str, Any] | None = None) -> torch.nn.Module:
    """``teacher`` (frozen) sharded with the engine that shards the student ``like``; returns the module to
    run as the teacher from then on (a DeepSpeed engine under ZeRO-3, the FSDP1 wrapper, or ``teacher``
    itself, sharded in place under FSDP2).

    * FSDP2: ``fully_shard`` of the teacher's blocks (the student's unit classes, else its decoder layers),
      its untied input / output embeddings, and the root, on the student's mesh; every unit is resharded
      after the teacher's forward (no backward runs through the teacher to do it).
    * FSDP1: wrapped with the student's process group, sharding strategy, ``use_orig_params`` and device,
      one unit per block and untied embedding.
    * ZeRO-3: ``deepspeed.initialize`` of the teacher as an inference engine (no optimizer) with the student
      engine's config (or ``ds_config``), stage 3.

    A teacher that is already sharded, a student that is not sharded (plain, DDP, tensor parallel), or
    ``shard=False``: the teacher is returned as it is. In every case the pair is checked first
    (:func:`check_teacher`: ValueError for mixed engines, another mesh, a row-parallel teacher head).
    The teacher's LM head is then gathered for the loss by :func:`gathered_head` / the loss itself.
    """
    check_teacher(teacher, like)
    engine = engine_of(like)
    if not shard or engine is None or engine_of(teacher) is not None or _meshes(teacher):
        return teacher
    teacher.requires_grad_(False)
    if engine == "fsdp2":
        return _shard_fsdp2(teacher, like)
    if engine == "fsdp1":
        return _shard_fsdp1(teacher, like)
    return _shard_zero3(teacher, like, ds_config)
