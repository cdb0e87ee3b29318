"""The float64 test oracle of every op family, in one namespace (never a backend).

Each family keeps its formulas next to its op (``fastkd.distill.reference``, ``fastkd.sparse.reference``,
``fastkd.ot.reference``); this module re-exports their public names so tests and ``fastkd check`` can say
``R.distill_loss``, ``R.sparse_distill_loss``, ``R.ot.sinkhorn``.
"""

from fastkd.distill.reference import (  # noqa: F401
    DIVERGENCES,
    akl_weights,
    apply_softcap,
    distill_loss,
    distill_stats,
    fused_linear_distill_loss,
    per_token,
)
from fastkd.ot import reference as ot  # noqa: F401  (ot.sinkhorn, ot.sinkd_loss, ot.uld_per_token)
from fastkd.sparse.reference import sparse_distill_loss, sparse_stats, teacher_log_values  # noqa: F401
