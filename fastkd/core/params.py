"""Frozen parameter records that travel from the ops layer to a backend.

Hyperparameters come from the divergence table (:mod:`fastkd.core.divergences`): a field left ``None``
takes the chosen divergence's default, a given one is validated against the divergence's range (a clear
ValueError naming it) in ``__post_init__``, so every record that exists is valid. The hyperparameter fields
of :class:`DistillParams` are exactly :data:`fastkd.core.divergences.HYPER_NAMES` (tested); the custom op
``fastkd::distill_rows`` and the kernels receive them in that order (:meth:`DistillParams.hyper_values`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from fastkd.core import checks as C
from fastkd.core.divergences import (
    BY_NAME,
    CODES,
    FAMILIES,
    HYPER_NAMES,
    HYPERS,
    check_divergence,
    effective,
    resolve_hyper,
)

# Kept for importers of the old name; the codes live in the divergence table.
DIVERGENCE_CODES: dict[str, int] = CODES


@dataclass(frozen=True)
class DivergenceParams:
    """What every distillation loss shares: the divergence, its temperature and jsd's β."""

    divergence: str = "fkl"
    temperature: float = 1.0
    scale_by_t2: bool = False
    beta: float | None = None  # None: the divergence's default (table)

    def __post_init__(self) -> None:
        if self.divergence not in BY_NAME:
            raise ValueError(f"divergence must be one of {tuple(BY_NAME)}, got {self.divergence!r}")
        given = {f.name: getattr(self, f.name) for f in fields(self) if f.name in HYPERS}
        for name, value in resolve_hyper(self.divergence, given).items():
            object.__setattr__(self, name, value)

    @property
    def kd_scale(self) -> float:
        return self.temperature**2 if self.scale_by_t2 else 1.0

    @property
    def hyper(self) -> dict[str, float]:
        """The resolved hyperparameters of this record, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in HYPERS}

    @property
    def effective(self) -> str:
        """The divergence actually computed (endpoint rules of the table: jsd at β = 0 is fkl, ...)."""
        return effective(self.divergence, self.hyper)


def _table_hypers(cls: type) -> type:
    """Declare ``name: float | None = None`` (None: the divergence's default) for every hyperparameter of the
    divergence table that ``cls`` and its bases do not declare; applied under ``@dataclass``, so a hyperparameter
    added to the table is a field of the record (and a scalar of the custom op) with no edit here."""
    declared = set(cls.__dict__.get("__annotations__", {}))
    for base in cls.__mro__[1:]:
        declared |= set(getattr(base, "__dataclass_fields__", {}))
    if "__annotations__" not in cls.__dict__:
        cls.__annotations__ = {}
    for name in HYPER_NAMES:
        if name not in declared:
            cls.__annotations__[name] = "float | None"
            setattr(cls, name, None)
    return cls


@dataclass(frozen=True)
@_table_hypers
class DistillParams(DivergenceParams):
    """Everything but tensors that defines one divergence loss on logits.

    The per-token loss a backend computes is
        loss_i = kd_scale · D(softmax(t_i / T) , softmax(s_i / T)) + ce_weight · CE(s_i, label_i)
    with kd_scale = T² when ``scale_by_t2`` else 1 and CE on the un-tempered student logits. Besides ``beta``
    every hyperparameter of the table is a field (``alpha``: skl / srkl skew, ab's exponent of p; ``mu``: akl's
    head mass; ``t``: taid's interpolation), declared by :func:`_table_hypers`.
    """

    ce_weight: float = 0.0
    chunk_size: int | None = None  # rows per chunk (torch backend / fused path); None = automatic
    softcap: float | None = None  # fused path only: cap·tanh(z / cap) on both sides

    @property
    def code(self) -> int:
        """Kernel / C++ code of the divergence actually computed."""
        return CODES[self.effective]

    def hyper_values(self) -> tuple[float, ...]:
        """Hyperparameter values in :data:`~fastkd.core.divergences.HYPER_NAMES` order (kernel arguments)."""
        return tuple(float(getattr(self, name)) for name in HYPERS)


@dataclass(frozen=True)
class SparseParams(DivergenceParams):
    """Non-tensor arguments of one sparse loss (fastkd.sparse.op): top-k / top-k + tail / sampled."""

    mode: str = "topk"
    chunk_size: int | None = None
    softcap: float | None = None


__all__ = ["DIVERGENCE_CODES", "FAMILIES", "DivergenceParams", "DistillParams", "SparseParams", "make_params",
           "op_fields", "op_schema"]

# Custom-op schema types of the field annotations a record may use (a new kind of field needs an entry here).
_SCHEMA_TYPES = {"str": "str", "float": "float", "int": "int", "bool": "bool", "float | None": "float?",
                 "int | None": "int?"}


def op_fields(record: type, exclude: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The fields of ``record`` (a params dataclass) that a custom op takes as scalars, in field order."""
    return tuple(f.name for f in fields(record) if f.name not in exclude)


def op_schema(record: type, head: str, exclude: tuple[str, ...] = (), rename: dict[str, str] | None = None) -> str:
    """A ``torch.library`` schema: the arguments ``head`` (tensors, ...), then the fields of ``record`` but
    ``exclude`` as typed scalars (``rename``: schema names for fields whose name the dispatcher reserves)."""
    types = {f.name: str(f.type) for f in fields(record)}
    names = op_fields(record, exclude)
    unknown = [n for n in names if types[n] not in _SCHEMA_TYPES]
    if unknown:
        raise TypeError(f"{record.__name__} fields {unknown} have no custom-op schema type")
    rename = rename or {}
    scalars = ", ".join(f"{_SCHEMA_TYPES[types[n]]} {rename.get(n, n)}" for n in names)
    return f"({head}, {scalars}) -> Tensor"


def make_params(
    divergence: str,
    *,
    temperature: float,
    scale_by_t2: bool,
    ce_weight: float = 0.0,
    chunk_size: int | None = None,
    softcap: float | None = None,
    family: str = "logits",
    **hyper: float | None,
) -> DistillParams:
    """Validate the non-tensor arguments of a dense loss and pack them (hyperparameters: table-driven).

    ``divergence`` must be supported by ``family`` (a row's ``families`` in the table); ``hyper`` holds the
    table's hyperparameters by name (``beta``, ``alpha``, ...), None or absent taking the divergence's defaults.
    Raises ValueError / TypeError naming the argument.
    """
    unknown = sorted(set(hyper) - set(HYPER_NAMES))
    if unknown:
        raise TypeError(f"make_params got unknown hyperparameters {unknown}; the table's are {HYPER_NAMES}")
    check_divergence(divergence, family)
    C.check_positive("temperature", temperature)
    C.check_range("ce_weight", ce_weight, 0.0, math.inf)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if softcap is not None:
        C.check_positive("softcap", softcap)
    return DistillParams(
        divergence=divergence, temperature=float(temperature), scale_by_t2=bool(scale_by_t2),
        ce_weight=float(ce_weight), chunk_size=chunk_size, softcap=None if softcap is None else float(softcap),
        **hyper,
    )
