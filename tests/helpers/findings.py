"""A test's finding about an installed component, judged by the expectations table.

Tests that pin a version's behaviour observe an outcome, ask the table whether
it is the known one for the installed version, and record it for
docs/matrix.md (``scripts/matrix-table`` reads the JUnit property, as it does
the ``verdict`` fixture's).
"""

from __future__ import annotations

from collections.abc import Callable

from pytest_runtimefaults import expectations as ex
from pytest_runtimefaults.verdicts import DISPLAY, PROPERTY


def judged(
    record_property: Callable[[str, object], None],
    component: str,
    fault: str,
    observed: ex.Outcome,
    detail: str,
) -> ex.Verdict:
    """``expectations.judge`` for the installed *component*, its outcome recorded."""
    verdict = ex.judge(component, ex.installed_version(component), fault, observed, detail=detail)
    record_property(f"{PROPERTY}.outcome", DISPLAY[observed])
    return verdict
