"""Plain, readable float64-friendly formulas: the test oracle for every op (never a backend).

One module per op family; this package re-exports their public names.
"""

from fastkd.reference import ot  # noqa: F401  (fastkd.reference.ot.sinkhorn, .sinkd_loss, .uld_per_token)
from fastkd.reference.distill import (  # noqa: F401
    DIVERGENCES,
    akl_weights,
    apply_softcap,
    distill_loss,
    fused_linear_distill_loss,
    per_token,
)
from fastkd.reference.sparse import sparse_distill_loss, teacher_log_values  # noqa: F401
