"""The divergence table: what each divergence *is*, written once; every layer derives from it.

One :class:`Divergence` row per divergence holds its name, its integer code, its hyperparameters (each a
:class:`Hyper` with default and valid range), its endpoint rules (hyperparameter values at which it *is*
another divergence, computed as that one), a formula for humans, and the op families that support it:

- ``logits``: :func:`fastkd.distill_loss` (torch, Triton, CUDA backends);
- ``fused``: :func:`fastkd.fused_linear_distill_loss` (the same backends on LM-head chunks);
- ``sparse``: :func:`fastkd.sparse_distill_loss` / its fused form (top-k / tail / sampled teachers);
- ``vocab_parallel``: :mod:`fastkd.integrations.distributed` (vocabulary split across ranks).

What derives from it: ``fastkd.DIVERGENCES`` (public names), the argument validation of every family
(:func:`resolve_hyper`, used by :class:`fastkd.core.params.DivergenceParams`), the reference dispatch
(``fastkd.distill.reference.per_token``), the torch backend's dispatch, the Triton constexpr codes
(``fastkd.kernels.distill``: ``FKL = tl.constexpr(CODES["fkl"])``, ...) and their schedule (the
:attr:`Divergence.mixture` set, the split schedule's :attr:`Divergence.lag` and
:attr:`Divergence.split_launch`, read by ``fastkd.kernels.distill`` / ``distill_split``), the kernels' hyperparameter
arguments (in :data:`HYPER_NAMES` order) and the C++ ``enum Divergence`` (``csrc/distill.cu``) and
``enum Hyper`` (``csrc/fastkd.h``); tests/distill/test_divergences.py parses both and asserts equality with this table.

Notation: p = teacher, q = student, both softmax of the tempered logits.

Hyperparameters: each name has one *canonical* spec (:data:`HYPERS`) that the classic divergences share
(``beta`` in [0, 1] default 0.5, ``alpha`` in [0, 1] default 0.1, ...). A row may carry its own spec
under the same name: ``ab`` uses ``alpha``/``beta`` as exponents (any nonzero real, defaults
α = 0.8, β = 0.3, the setting shown in the ABKD authors' README for their classification example,
α + β = 1.1; at α = 1, β → 0 it tends to forward KL). A hyperparameter that the chosen divergence does
not use is still checked against its canonical spec when given (a typo-level mistake such as
``beta=1.5`` is an error whatever the divergence) and otherwise takes the canonical default.

Adding a divergence = one row here + its math in the reference, the torch backend, the Triton kernel and
the CUDA kernel (five files). Adding a hyperparameter = one :class:`Hyper` in :data:`HYPERS` (the field of
:class:`fastkd.core.params.DistillParams`, the dense losses' keyword parameter and its documentation, the
custom-op and kernel arguments are all derived from it, in :data:`HYPER_NAMES` order) and its use in the kernels
(and the C++ ``enum Hyper``); tests/core/test_keywords.py makes that one edit in a copy of the package.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from numbers import Number

FAMILIES: tuple[str, ...] = ("logits", "fused", "sparse", "vocab_parallel")


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter: its default and valid range ``lo ≤ x ≤ hi`` (ends open when ``open_*``).

    ``nonzero`` excludes 0 from the range (ab's exponents).
    """

    name: str
    default: float
    lo: float = -math.inf
    hi: float = math.inf
    open_lo: bool = False
    open_hi: bool = False
    nonzero: bool = False
    doc: str = ""

    def describe(self) -> str:
        """The valid range as words, e.g. ``in [0, 1]`` or ``a finite number != 0``."""
        if self.lo == -math.inf and self.hi == math.inf:
            return "a finite number" + (" != 0" if self.nonzero else "")
        rng = f"{'(' if self.open_lo else '['}{self.lo:g}, {self.hi:g}{')' if self.open_hi else ']'}"
        return "in " + rng + (" and != 0" if self.nonzero else "")

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if value < self.lo or (self.open_lo and value == self.lo):
            return False
        if value > self.hi or (self.open_hi and value == self.hi):
            return False
        return not (self.nonzero and value == 0.0)

    def check(self, value: object, divergence: str | None = None) -> float:
        """``value`` as a float, or TypeError / ValueError naming the hyperparameter (and the divergence)."""
        if isinstance(value, bool) or not isinstance(value, Number) or hasattr(value, "dtype"):
            raise TypeError(f"{self.name} must be a Python number, got {type(value).__name__}")
        v = float(value)
        if not self.contains(v):
            where = f" for divergence={divergence!r}" if divergence else ""
            raise ValueError(f"{self.name} must be {self.describe()}{where}, got {value!r}")
        return v


@dataclass(frozen=True)
class Endpoint:
    """At ``hyper == value`` the divergence is exactly ``becomes`` (computed as that one by every backend)."""

    hyper: str
    value: float
    becomes: str


@dataclass(frozen=True)
class Divergence:
    """One divergence: everything about it that is not its math."""

    name: str
    code: int  # the Triton constexpr switch value and the C++ enum value
    formula: str
    hypers: tuple[Hyper, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    families: frozenset[str] = frozenset({"logits", "fused"})
    public: bool = True  # False: an internal target of endpoint rules only
    # joint constraint on the resolved hyperparameters: returns an error message or None
    joint: Callable[[Mapping[str, float]], str | None] | None = field(default=None, compare=False)
    # How the Triton kernels schedule it (their math is in the kernels):
    # mixture: the gradient needs S = Σ q·∂D/∂q, a reduction over the row once its log-normalisers are known
    # (one more pass over the logits: jsd, skl, srkl, tvd, ab); lag: phases of the split-row kernel after its
    # statistics phase (2: a mid phase over the row, for a mixture or for taid's interpolated logits);
    # split_launch: that kernel's default (BLOCK_V, num_warps), chosen to compile for sm_90 without register
    # spills on the oldest and newest supported Triton (docs/DESIGN.md); None: the divergence has its own split
    # kernel (akl: fastkd.kernels.distill_akl).
    mixture: bool = False
    lag: int = 1
    split_launch: tuple[int, int] | None = (8192, 8)
    # split_heavy: its configuration for a heavy launch (STATS or the raw-logit cross-entropy) and for 4-byte
    # logits; None: the plain one with half of a block above 4096 (kernels/distill_split.launch_config)
    split_heavy: tuple[int, int] | None = None
    # split_sub: the sub-block of that kernel's mid and final phases when a segment is larger (they loop over
    # the segment's sub-blocks: the registers of a sub-block, the per-segment fixed work over the whole segment);
    # None: the whole segment at once
    split_sub: int | None = None
    # split_unaligned: its configuration for rows that are not vector-loadable (V or a row stride not a multiple
    # of 16: element-wise loads and masks), where the plain one spilled on sm_90; None: the plain one
    split_unaligned: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.lag not in (1, 2) or (self.mixture and self.lag != 2):
            raise ValueError(f"divergence {self.name!r}: lag must be 1 or 2, and 2 for a mixture, got {self.lag}")

    def hyper(self, name: str) -> Hyper | None:
        for h in self.hypers:
            if h.name == name:
                return h
        return None


# Canonical specs, shared by the classic divergences (and the defaults of unused hyperparameters).
BETA = Hyper("beta", 0.5, 0.0, 1.0, doc="jsd / symkl mixing weight")
ALPHA = Hyper("alpha", 0.1, 0.0, 1.0, doc="skl / srkl skew")
MU = Hyper("mu", 0.5, 0.0, 1.0, doc="akl head mass")
T = Hyper("t", 0.5, 0.0, 1.0, doc="taid interpolation")
HYPERS: dict[str, Hyper] = {h.name: h for h in (BETA, ALPHA, MU, T)}
# The order in which kernels and the C++ ``enum Hyper`` receive hyperparameter values.
HYPER_NAMES: tuple[str, ...] = tuple(HYPERS)

_ALL = frozenset(FAMILIES)


def _ab_joint(h: Mapping[str, float]) -> str | None:
    if h["alpha"] + h["beta"] == 0.0:
        return f"alpha + beta must be != 0 for divergence='ab', got alpha={h['alpha']!r}, beta={h['beta']!r}"
    return None


TABLE: tuple[Divergence, ...] = (
    Divergence("fkl", 0, "Σ p (log p − log q)", families=_ALL),
    Divergence("rkl", 1, "Σ q (log q − log p)", families=_ALL),
    Divergence("jsd", 2, "β KL(p‖m) + (1−β) KL(q‖m), m = βp + (1−β)q", (BETA,),
               (Endpoint("beta", 0.0, "fkl"), Endpoint("beta", 1.0, "rkl")), families=_ALL,
               mixture=True, lag=2, split_launch=(8192, 8), split_sub=4096,
               split_unaligned=(4096, 8)),
    Divergence("symkl", 3, "β fkl + (1−β) rkl", (BETA,),
               (Endpoint("beta", 0.0, "rkl"), Endpoint("beta", 1.0, "fkl"))),
    Divergence("skl", 4, "KL(p ‖ αp + (1−α)q)", (ALPHA,),
               (Endpoint("alpha", 0.0, "fkl"), Endpoint("alpha", 1.0, "zero")),
               mixture=True, lag=2, split_launch=(4096, 8)),
    Divergence("srkl", 5, "KL(q ‖ (1−α)p + αq)", (ALPHA,),
               (Endpoint("alpha", 0.0, "rkl"), Endpoint("alpha", 1.0, "zero")),
               mixture=True, lag=2, split_launch=(8192, 8)),
    Divergence("tvd", 6, "½ Σ |p − q|", mixture=True, lag=2, split_launch=(8192, 4), split_sub=4096,
               split_heavy=(4096, 16), split_unaligned=(8192, 8)),
    # akl at μ = 1: every token is in the head (the cumulative mass of a distribution never exceeds 1), which a
    # rounded running sum of p could otherwise contradict for the last tokens
    Divergence("akl", 7, "(g_H fkl + g_T rkl)/(g_H + g_T), head H = top tokens with mass ≤ μ", (MU,),
               (Endpoint("mu", 1.0, "fkl"),), split_launch=None),
    # taid at t = 1: r = p, forward KL (at t = 0, r = stopgrad(q): every backend then ignores the teacher, as the
    # reference does, so no endpoint rule: ``zero`` would read a NaN teacher)
    Divergence("taid", 8, "KL(r ‖ q), r = softmax((1−t) stopgrad(z_s) + t z_t)", (T,),
               (Endpoint("t", 1.0, "fkl"),), lag=2, split_launch=(8192, 8), split_unaligned=(4096, 8)),
    Divergence("ab", 9, "−1/(αβ) Σ (p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β))  (ABKD, Wang et al. 2025)",
               (Hyper("alpha", 0.8, nonzero=True, doc="ab: exponent of the teacher"),
                Hyper("beta", 0.3, nonzero=True, doc="ab: exponent of the student")),
               joint=_ab_joint, mixture=True, lag=2, split_launch=(1024, 4)),
    Divergence("zero", 10, "0 (skl / srkl at α = 1: KL(x‖x)); NaN inputs still give NaN", public=False),
)

BY_NAME: dict[str, Divergence] = {d.name: d for d in TABLE}
BY_CODE: dict[int, Divergence] = {d.code: d for d in TABLE}
CODES: dict[str, int] = {d.name: d.code for d in TABLE}
MIXTURE_CODES: tuple[int, ...] = tuple(d.code for d in TABLE if d.mixture)
DIVERGENCES: tuple[str, ...] = tuple(d.name for d in TABLE if d.public)


def names(family: str) -> tuple[str, ...]:
    """Public divergences supported by ``family`` (one of :data:`FAMILIES`)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return tuple(d.name for d in TABLE if d.public and family in d.families)


def check_divergence(divergence: object, family: str = "logits") -> Divergence:
    """The row of a public divergence supported by ``family``, or ValueError naming ``divergence``."""
    allowed = names(family)
    if not isinstance(divergence, str) or divergence not in allowed:
        raise ValueError(f"divergence must be one of {allowed}, got {divergence!r}")
    return BY_NAME[divergence]


def resolve_hyper(divergence: str, given: Mapping[str, object | None]) -> dict[str, float]:
    """Validated values of the hyperparameters in ``given`` (None = default) for ``divergence``.

    A hyperparameter the divergence uses is checked against the row's spec and defaults to the row's
    default; any other is checked against its canonical spec (:data:`HYPERS`) and defaults to that.
    Raises ValueError / TypeError naming the hyperparameter.
    """
    row = BY_NAME[divergence]
    out: dict[str, float] = {}
    for name, value in given.items():
        spec = row.hyper(name) or HYPERS[name]
        out[name] = spec.default if value is None else spec.check(value, divergence if row.hyper(name) else None)
    if row.joint is not None and all(h.name in out for h in row.hypers):
        msg = row.joint(out)
        if msg:
            raise ValueError(msg)
    return out


def effective(divergence: str, hyper: Mapping[str, float]) -> str:
    """The divergence actually computed: the first endpoint rule that matches, else ``divergence``."""
    for e in BY_NAME[divergence].endpoints:
        if hyper.get(e.hyper) == e.value:
            return e.becomes
    return divergence
