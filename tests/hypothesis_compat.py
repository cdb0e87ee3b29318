"""hypothesis when it is installed; otherwise stand-ins that skip each property test, so that a module holding
property tests and gpu tests still runs its gpu tests on a machine without hypothesis (`make gpu-check`)."""

from __future__ import annotations

import functools
from typing import Any

import pytest

try:
    from hypothesis import HealthCheck, assume, given, settings
    from hypothesis import strategies as st

    HAVE_HYPOTHESIS = True
except ImportError:
    HAVE_HYPOTHESIS = False

    class _Anything:
        """Absorbs strategy construction (st.integers(1, 5).map(...)) and HealthCheck members at import time."""

        def __getattr__(self, name: str) -> _Anything:
            return self

        def __call__(self, *args: Any, **kwargs: Any) -> _Anything:
            return self

    st = HealthCheck = _Anything()

    def assume(condition: Any) -> bool:
        return True

    def given(*args: Any, **kwargs: Any):
        def wrap(fn):
            @functools.wraps(fn)
            def skipped() -> None:
                pytest.skip("needs hypothesis (pip install hypothesis)")

            del skipped.__wrapped__  # pytest must not see the property test's arguments as fixtures
            return skipped

        return wrap

    def settings(*args: Any, **kwargs: Any):
        return lambda fn: fn

__all__ = ["HAVE_HYPOTHESIS", "HealthCheck", "assume", "given", "settings", "st"]
