"""Frozen parameter records that travel from the ops layer to a backend (STYLE.md item 4)."""

from __future__ import annotations

from dataclasses import dataclass

# Divergence codes shared by every backend (Triton constexpr switch, CUDA enum, torch dispatch).
DIVERGENCE_CODES: dict[str, int] = {
    "fkl": 0, "rkl": 1, "jsd": 2, "symkl": 3, "skl": 4, "srkl": 5, "tvd": 6, "akl": 7, "taid": 8,
}


@dataclass(frozen=True)
class DivergenceParams:
    """What every distillation loss shares: the divergence, its temperature and jsd's β."""

    divergence: str = "fkl"
    temperature: float = 1.0
    scale_by_t2: bool = False
    beta: float = 0.5  # jsd, symkl

    @property
    def kd_scale(self) -> float:
        return self.temperature**2 if self.scale_by_t2 else 1.0

    @property
    def effective(self) -> str:
        """The divergence actually computed: jsd's β endpoints are fkl / rkl exactly (TRL convention)."""
        if self.divergence == "jsd" and self.beta in (0.0, 1.0):
            return "fkl" if self.beta == 0.0 else "rkl"
        return self.divergence


@dataclass(frozen=True)
class DistillParams(DivergenceParams):
    """Everything but tensors that defines one divergence loss on logits.

    The per-token loss a backend computes is
        loss_i = kd_scale · D(softmax(t_i / T) , softmax(s_i / T)) + ce_weight · CE(s_i, label_i)
    with kd_scale = T² when ``scale_by_t2`` else 1 and CE on the un-tempered student logits.
    """

    alpha: float = 0.1  # skl, srkl
    mu: float = 0.5  # akl head mass
    t: float = 0.5  # taid interpolation
    ce_weight: float = 0.0
    chunk_size: int | None = None  # rows per chunk (torch backend / fused path); None = automatic
    softcap: float | None = None  # fused path only: cap·tanh(z / cap) on both sides

    @property
    def code(self) -> int:
        return DIVERGENCE_CODES[self.divergence]


@dataclass(frozen=True)
class SparseParams(DivergenceParams):
    """Non-tensor arguments of one sparse loss (fastkd.sparse.op): top-k / top-k + tail / sampled."""

    mode: str = "topk"
    chunk_size: int | None = None
    softcap: float | None = None
