"""``DistillationTrainer``: a ``transformers.Trainer`` that distills a student from a teacher through
fastkd's fused LM-head loss — hidden states in, never the (tokens × vocabulary) logits.

Per batch (causal LM, labels shifted by one as HF does)::

    h_s = student body(input_ids)[:, :-1]        h_t = teacher body(input_ids)[:, :-1]   (no grad)
    loss = fused_linear_distill_loss(h_s, W_s, h_t, W_t, labels=labels[:, 1:], divergence, temperature,
                                     ce_weight, beta, ..., softcap, num_items_in_batch)

The models are run through their normal forward with ``logits_to_keep=<no positions>`` while a forward
hook on the decoder body (``get_decoder()`` / ``.model``) captures ``last_hidden_state``, so wrappers
such as DDP keep working and the LM head computes nothing; models whose forward has no
``logits_to_keep`` have their body called directly. Each model's own logit post-processing (read by
:func:`logit_options`: a logit scale, then ``final_logit_softcapping``) goes to the loss per side, so a student
and a teacher may scale and cap differently.

Gradient accumulation: when Trainer passes ``num_items_in_batch`` (the number of target tokens over all
accumulated micro-batches) the loss is sum / num_items_in_batch, exactly HF's convention for its own
causal-LM loss; otherwise it is the mean over this micro-batch and Trainer divides by the number of
accumulation steps.

Offline mode (no teacher forward): batches that carry the teacher's sparse targets — ``teacher_ids``
(B, T, K), ``teacher_values`` (B, T, K) and optionally ``teacher_tail`` (B, T), as produced by
:class:`fastkd.cache.TeacherCacheDataset` — are distilled with
:func:`fastkd.fused_linear_sparse_distill_loss` (entry i is the teacher's distribution at position i, so
entries 0..T−2 pair with the shifted labels). Pass ``teacher_cache=<TeacherCache or its directory>``
and no ``train_dataset`` to train on the cache itself (labels = the cached input_ids). ``sparse`` holds
options for the sparse loss (``mode``, ``values``, ...; default from the cache: "topk_tail" with a
stored tail, "topk" without, "sampled" for count caches). A cache built with ``temperatures=`` is read at the
trainer's ``temperature`` (exact re-tempered log-probs and tail, :mod:`fastkd.cache.temper`). A hidden-state
cache (``values="hidden"``) gives batches with ``teacher_hidden`` (B, T, H): the loss is the dense
:func:`fastkd.fused_linear_distill_loss` against the cache's stored LM head (``cache.lm_head()``, × its
``logit_scale``, its ``softcap``), i.e. online distillation up to the rounding of the stored hidden states.

Statistics: with ``log_stats=True`` (default) every loss call also returns its per-token stats
(:mod:`fastkd.core.stats`, computed in the loss's own kernel passes; the loss is bitwise unchanged) and the
trainer logs their masked means through ``Trainer.log``: ``teacher_entropy``, ``student_entropy``,
``top1_agree`` and ``kl`` (``eval_``-prefixed during evaluation), each the mean over the kept target tokens
of every micro-batch since the previous log on this process (token-weighted, not averaged across ranks); with
a token selection in ``loss_kwargs`` (``select=`` / ``token_weight=``, :mod:`fastkd.core.selection`) the mean
over the selected tokens.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from fastkd.core.sharding import call_with_head, engine_of, gathered_head, is_dtensor, keep_in_graph, shard_teacher
from fastkd.core.stats import STATS_KEYS
from fastkd.distill.fused import fused_linear_distill_loss

__all__ = ["DistillationTrainer", "lm_head_of", "body_of", "hidden_states", "logit_options"]

_MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "token_type_ids")


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, DataParallel, ...
        model = model.module
    return model


def lm_head_of(model: nn.Module) -> nn.Linear:
    """The model's output projection (``get_output_embeddings()``)."""
    head = _unwrap(model).get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(_unwrap(model)).__name__} has no output embeddings (LM head) to fuse")
    return head


def body_of(model: nn.Module) -> nn.Module:
    """The decoder body that returns the final (normed) hidden states."""
    inner = _unwrap(model)
    body = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    if body is None or body is inner:
        prefix = getattr(inner, "base_model_prefix", "model")
        body = getattr(inner, prefix, None) or getattr(inner, "model", None)
    if not isinstance(body, nn.Module):
        raise TypeError(f"cannot find the decoder body of {type(inner).__name__} "
                        f"(tried get_decoder() and .model)")
    return body


@contextlib.contextmanager
def _capture(body: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    box: dict[str, torch.Tensor] = {}

    def hook(_mod: nn.Module, _args: Any, out: Any) -> None:
        box["h"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    handle = body.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def hidden_states(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """Final hidden states (B, T, H) of a causal LM without computing its logits."""
    inner = _unwrap(model)
    body = body_of(model)
    kw = {k: v for k, v in inputs.items() if k in _MODEL_KEYS and v is not None}
    if "logits_to_keep" in inspect.signature(inner.forward).parameters:
        device = next(iter(kw.values())).device
        head = inner.get_output_embeddings()
        # a tensor-parallel head (DTensor weight) cannot view an empty logits slice: keep one position
        keep = 1 if is_dtensor(getattr(head, "weight", None)) else torch.empty(0, dtype=torch.long, device=device)
        with _capture(body) as box:
            out = model(**kw, logits_to_keep=keep, use_cache=False)
        # FSDP hooks its root's backward on the model's output: keep that output in the loss's graph
        return keep_in_graph(box["h"], out) if engine_of(model) in ("fsdp1", "fsdp2") else box["h"]
    out = body(**kw, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _config_value(model: nn.Module, *names: str) -> float | None:
    cfg = getattr(_unwrap(model), "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return float(value)
    return None


def logit_options(model: nn.Module) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` of a causal LM's logits, ``softcap(scale · (h W.T + b))``, from its (text) config:
    the scale is ``logit_scale`` (Cohere), ``output_multiplier`` or ``lm_head_multiplier`` (Falcon-H1), else
    ``1 / logits_scaling`` (Granite, MiniCPM3; HyperCLOVA X multiplies by it), else 1.0 — the fields TRL's
    DistillationTrainer reads; the softcap is ``final_logit_softcapping`` (Gemma 2) or None."""
    scale = _config_value(model, "logit_scale", "output_multiplier", "lm_head_multiplier")
    if scale is None:
        inv = _config_value(model, "logits_scaling")
        if inv is not None:
            scale = inv if getattr(_unwrap(model).config, "model_type", None) == "hyperclovax" else 1 / inv
    return (1.0 if scale is None else scale), _config_value(model, "final_logit_softcapping")


def _check_vocabularies(model: nn.Module | None, teacher_model: nn.Module | None, cache: Any,
                        vocab_size: int | None) -> None:
    """At construction: both models have an LM head, and the teacher's (or the cache's) vocabulary matches the
    student's — or only pads it when ``loss_kwargs["vocab_size"]`` says so. TypeError / ValueError naming the
    argument, instead of a failure inside the first training step."""
    if model is None:  # model_init: checked by the loss itself
        return
    try:
        v_s = int(lm_head_of(model).weight.shape[0])
    except TypeError as exc:
        raise TypeError(f"model: {exc}") from None
    if teacher_model is not None:
        try:
            v_t = int(lm_head_of(teacher_model).weight.shape[0])
        except TypeError as exc:
            raise TypeError(f"teacher_model: {exc}") from None
        if v_t != v_s and vocab_size is None:
            raise ValueError(f"teacher_model's vocabulary ({v_t}) differs from the model's ({v_s}); if they differ "
                             f"only by padding columns, pass loss_kwargs={{'vocab_size': <real vocabulary size>}}")
    if cache is not None:
        v_c = cache.index.get("vocab_size")
        hidden = cache.values_kind == "hidden"
        if v_c is not None and (v_c > v_s or (hidden and v_c != v_s and vocab_size is None)):
            raise ValueError(f"teacher_cache holds a teacher vocabulary of {v_c} ids but the model's LM head has "
                             f"{v_s} rows" + ("; pass loss_kwargs={'vocab_size': ...} if they differ only by "
                                              "padding columns" if hidden and v_c < v_s else ""))


class DistillationTrainer(Trainer):
    """``Trainer`` whose loss is a fastkd divergence between the student (``model``) and ``teacher_model``.

    Args:
        model: the student causal LM (trained). teacher_model: the teacher causal LM (frozen, eval mode;
            may live on another device or dtype — its hidden states are moved / cast to the student's).
        divergence, temperature, scale_by_t2, beta, alpha, mu, t, ce_weight: as :func:`fastkd.distill_loss`
            (``ce_weight`` adds that multiple of the student's cross-entropy on the labels).
        chunk_size: tokens per fused chunk (None = automatic).
        loss_kwargs: further keywords for the loss function (e.g. ``backend``, ``vocab_size``).
        teacher_cache, sparse: offline mode, see the module docstring; ``sparse`` is a dict of
            :func:`fastkd.fused_linear_sparse_distill_loss` options.
        log_stats: log the masked means of the loss's per-token statistics (module docstring); False for
            a backend without statistics (``loss_kwargs={"backend": "cuda"}``).
        shard_teacher: when the student is sharded (FSDP2, FSDP1, DeepSpeed ZeRO-3) and the teacher is not,
            shard the teacher with the same engine at the first loss call
            (:func:`fastkd.core.sharding.shard_teacher`); False keeps it whole on every rank.
        Everything else goes to ``transformers.Trainer``.
    """

    def __init__(self, model: nn.Module | None = None, teacher_model: nn.Module | None = None, *args: Any,
                 divergence: str = "fkl", temperature: float = 1.0, scale_by_t2: bool = False,
                 beta: float | None = None, alpha: float | None = None, mu: float | None = None,
                 t: float | None = None,
                 ce_weight: float = 0.0, chunk_size: int | None = None,
                 loss_kwargs: dict[str, Any] | None = None, teacher_cache: Any = None,
                 sparse: dict[str, Any] | None = None, log_stats: bool = True, shard_teacher: bool = True,
                 **kwargs: Any) -> None:
        if teacher_model is None and teacher_cache is None:
            raise ValueError("DistillationTrainer needs teacher_model (online) or teacher_cache (offline)")
        sparse_defaults: dict[str, Any] = {}
        hidden_cache = None
        if teacher_cache is not None:
            from fastkd.cache import TeacherCache, TeacherCacheDataset

            cache = teacher_cache if isinstance(teacher_cache, TeacherCache) else TeacherCache(teacher_cache)
            if cache.values_kind == "hidden":
                hidden_cache = cache
            elif cache.values_kind == "counts":
                sparse_defaults = {"values": "counts", "mode": "sampled"}
            else:
                sparse_defaults = {"values": "logprobs",
                                   "mode": "topk_tail" if cache.index.get("store_tail") else "topk"}
            if kwargs.get("train_dataset") is None:
                ds = TeacherCacheDataset(cache, temperature=temperature if cache.temperatures else None)
                kwargs["train_dataset"] = ds
                kwargs.setdefault("data_collator", _CacheCollator(ds))
        _check_vocabularies(model, teacher_model, cache if teacher_cache is not None else None,
                            (loss_kwargs or {}).get("vocab_size"))
        if ce_weight and teacher_model is None and hidden_cache is None:
            raise ValueError("ce_weight is not supported in offline (teacher_cache) mode: the sparse loss "
                             "has no cross-entropy term")
        super().__init__(model, *args, **kwargs)
        # the loss is normalised by num_items_in_batch itself: ask Trainer to count the target tokens
        self.model_accepts_loss_kwargs = True
        self.teacher_model = teacher_model
        if teacher_model is not None:
            teacher_model.eval()
            teacher_model.requires_grad_(False)
        self.sparse_options = {**sparse_defaults, **(sparse or {})}
        self.distill_options: dict[str, Any] = dict(
            divergence=divergence, temperature=temperature, scale_by_t2=scale_by_t2, beta=beta, alpha=alpha,
            mu=mu, t=t, ce_weight=ce_weight, chunk_size=chunk_size, **(loss_kwargs or {}))
        self._teacher_head_cache: tuple[tuple[Any, ...], torch.Tensor, torch.Tensor | None] | None = None
        self._hidden_cache = hidden_cache
        self.log_stats = bool(log_stats)
        self.shard_teacher = bool(shard_teacher)
        # "train" / "eval" -> {stat name: sum over kept tokens, "_count": kept tokens}, device tensors (no sync
        # per step); turned into means and cleared by log()
        self._stats_sums: dict[str, dict[str, torch.Tensor]] = {}

    def _set_signature_columns_if_needed(self) -> None:
        # keep the teacher's cached targets when Trainer drops the columns the model's forward does not take
        super()._set_signature_columns_if_needed()
        for key in ("teacher_ids", "teacher_values", "teacher_tail", "teacher_hidden", "hidden", "mask"):
            if key not in self._signature_columns:
                self._signature_columns.append(key)

    # ---- helpers ---------------------------------------------------------------------------------------
    def _teacher_head(self, device: torch.device,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher LM-head weight/bias on the student's device and dtype (cast once, cached)."""
        head = lm_head_of(self.teacher_model)
        w, b = head.weight.detach(), None if getattr(head, "bias", None) is None else head.bias.detach()
        if w.device == device and w.dtype == dtype:
            return w, b
        key = (w.data_ptr(), w._version, device, dtype)
        if self._teacher_head_cache is None or self._teacher_head_cache[0] != key:
            self._teacher_head_cache = (key, w.to(device, dtype), None if b is None else b.to(device, dtype))
        return self._teacher_head_cache[1], self._teacher_head_cache[2]

    @staticmethod
    def _labels(inputs: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Shifted (labels, mask) for positions 0..T-2 (HF causal-LM shift); mask from attention_mask
        when there are no labels."""
        if inputs.get("shift_labels") is not None:
            return inputs["shift_labels"][:, :-1], None
        if inputs.get("labels") is not None:
            return inputs["labels"][:, 1:], None
        am = inputs.get("attention_mask")
        return None, None if am is None else am[:, 1:].bool()

    def _scale_for_devices(self, loss: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor:
        # mirror Trainer.compute_loss: tokens are averaged across devices, so undo DDP's gradient mean
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            scale = self.accelerator.num_processes // tp
            loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return loss

    # ---- the loss --------------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        labels, mask = self._labels(inputs)
        h_s = hidden_states(model, inputs)[:, :-1]
        head = lm_head_of(model)
        scale, softcap = logit_options(model)
        n_items = num_items_in_batch
        if isinstance(n_items, torch.Tensor):
            n_items = n_items.to(h_s.device)
        common = dict(labels=labels, mask=mask, num_items_in_batch=n_items)
        heads = dict(softcap=softcap, scale=scale)
        if self.log_stats:
            common["return_stats"] = True
        if inputs.get("teacher_hidden") is not None:
            with self._loss_autocast():
                loss = self._cached_hidden_loss(inputs, h_s, head, heads, common)
        elif inputs.get("teacher_ids") is not None:
            with self._loss_autocast():
                loss = self._offline_loss(inputs, h_s, head, heads, common)
        elif self.teacher_model is None:
            raise ValueError("offline mode: the batch has no 'teacher_ids' (use "
                             "fastkd.cache.TeacherCacheDataset and its collate, or pass teacher_model)")
        else:
            if not getattr(self, "_teacher_placed", False):  # once, on the prepared (engine-wrapped) student
                self.teacher_model = shard_teacher(self.teacher_model, model,
                                                   shard=getattr(self, "shard_teacher", True))
                self._teacher_placed = True
            t_inputs = self._to_teacher(inputs)
            with torch.no_grad():
                h_t = hidden_states(self.teacher_model, t_inputs)[:, :-1]
            t_scale, t_softcap = logit_options(self.teacher_model)
            h_t = h_t.to(h_s.device, h_s.dtype)
            # sharded heads (FSDP1 / ZeRO-3): the teacher's gathered around the loss, the student's loss run as
            # its unit's forward so the engine gathers it for forward and backward (fastkd.core.sharding)
            with gathered_head(self.teacher_model), self._loss_autocast():
                w_t, b_t = self._teacher_head(h_s.device, h_s.dtype)
                loss = call_with_head(
                    model, lambda w, b, h, ht: fused_linear_distill_loss(
                        h, w, ht, w_t, student_bias=b, teacher_bias=b_t, softcap=(softcap, t_softcap),
                        logit_scale=(scale, t_scale), **common, **self.distill_options), h_s, h_t)
        if self.log_stats:
            loss, stats = loss
            self._record_stats(stats, labels, mask)
        loss = self._scale_for_devices(loss, num_items_in_batch)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _loss_autocast(self) -> contextlib.AbstractContextManager:
        """The run's autocast (``bf16=True`` / ``fp16=True``) for the loss as well: Accelerate wraps only the
        models' forwards, so without it the fused loss would run in the hidden states' dtype (AMP contract of
        :func:`fastkd.fused_linear_distill_loss`: bf16/fp16 GEMMs, fp32 weight-gradient accumulation)."""
        accelerator = getattr(self, "accelerator", None)
        if accelerator is None or getattr(accelerator, "mixed_precision", "no") not in ("bf16", "fp16"):
            return contextlib.nullcontext()
        return accelerator.autocast()

    def _record_stats(self, stats: dict[str, torch.Tensor], labels: torch.Tensor | None,
                      mask: torch.Tensor | None) -> None:
        """Add one micro-batch's stats sums and kept-token count (the stats are 0 on excluded tokens); with a
        token selection (``loss_kwargs`` select= / token_weight=) the count is that of the selected tokens."""
        keep = None if labels is None else labels != self.distill_options.get("ignore_index", -100)
        if mask is not None:
            keep = mask if keep is None else keep & mask
        if "selected" in stats:  # a selected fused loss has stats only there: average over the selected tokens
            keep = stats["selected"] != 0
            stats = {k: torch.where(keep, v, 0.0) for k, v in stats.items()}
        count = keep.sum() if keep is not None else torch.tensor(next(iter(stats.values())).numel())
        acc = self._stats_sums.setdefault("train" if self.model.training else "eval", {})
        for name in (*STATS_KEYS, "_count"):
            value = (count if name == "_count" else stats[name].sum()).detach().to(torch.float64)
            acc[name] = value if name not in acc else acc[name] + value.to(acc[name].device)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """``Trainer.log`` plus the masked means of the loss statistics since the previous log."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        acc = self._stats_sums.pop(mode, None)
        if acc:
            count = float(acc["_count"])
            if count > 0:
                prefix = "eval_" if mode == "eval" else ""
                logs = {**logs, **{prefix + name: float(acc[name]) / count for name in STATS_KEYS}}
        super().log(logs, *args, **kwargs)

    def _to_teacher(self, inputs: dict[str, Any]) -> dict[str, Any]:
        device = next(self.teacher_model.parameters()).device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()
                if k in _MODEL_KEYS}

    def _cached_hidden_loss(self, inputs: dict[str, Any], h_s: torch.Tensor, head: nn.Module,
                            heads: dict[str, Any], common: dict[str, Any]) -> torch.Tensor:
        """Dense loss against a hidden-state cache: its stored head (× its logit scale, its softcap) recomputes
        the teacher logits chunk-wise."""
        cache = self._hidden_cache
        if cache is None:
            raise ValueError("the batch carries teacher_hidden but the trainer has no hidden-state teacher_cache "
                             "(pass teacher_cache=<its directory> for the stored LM head)")
        t_softcap, t_scale = cache.index["softcap"], cache.index["logit_scale"]
        h_t = inputs["teacher_hidden"][:, : h_s.shape[1]].to(h_s.device, h_s.dtype)
        key = (h_s.device, h_s.dtype)
        if getattr(self, "_cached_head", (None,))[0] != key:
            w, b = cache.lm_head()
            self._cached_head = (key, w.to(h_s.device, h_s.dtype), None if b is None else b.to(h_s.device, h_s.dtype))
        return fused_linear_distill_loss(
            h_s, head.weight, h_t, self._cached_head[1], student_bias=getattr(head, "bias", None),
            teacher_bias=self._cached_head[2], softcap=(heads["softcap"], t_softcap),
            logit_scale=(heads["scale"], 1.0 if t_scale is None else float(t_scale)), **common, **self.distill_options)

    def _offline_loss(self, inputs: dict[str, Any], h_s: torch.Tensor, head: nn.Module, heads: dict[str, Any],
                      common: dict[str, Any]) -> torch.Tensor:
        from fastkd.sparse.op import fused_linear_sparse_distill_loss

        t = h_s.shape[1]
        ids = inputs["teacher_ids"][:, :t].to(h_s.device)
        vals = inputs["teacher_values"][:, :t].to(h_s.device)
        tail = inputs.get("teacher_tail")
        opts = {k: self.distill_options[k] for k in ("divergence", "temperature", "scale_by_t2", "beta",
                                                      "chunk_size")}
        if opts["beta"] is None:  # None = the divergence's default (from the divergence table)
            del opts["beta"]
        opts.update(self.sparse_options)
        if tail is not None and opts.get("mode") == "topk_tail":
            opts["teacher_tail"] = tail[:, :t].to(h_s.device)
        extra = {k: v for k, v in self.distill_options.items() if k in ("backend",)}
        return fused_linear_sparse_distill_loss(h_s, head.weight, ids, vals,
                                                student_bias=getattr(head, "bias", None),
                                                softcap=heads["softcap"], logit_scale=heads["scale"], **common,
                                                **opts, **extra)


class _CacheCollator:
    """TeacherCacheDataset.collate plus causal-LM labels (input_ids, −100 on padding) and attention_mask."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        out = self.dataset.collate(rows)
        if "input_ids" not in out:
            raise ValueError("the teacher cache stores no input_ids; pass your own train_dataset whose "
                             "batches carry input_ids, labels and the teacher_* tensors")
        out["attention_mask"] = out.pop("mask").long()
        out["labels"] = out["input_ids"].masked_fill(out["attention_mask"] == 0, -100)
        return out
