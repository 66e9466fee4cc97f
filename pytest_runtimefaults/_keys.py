"""Every ``pytest.StashKey`` of the project, in one leaf module.

State lives in ``config.stash`` and ``item.stash`` (never on private
attributes); the keys live here, so that any module can read that state
without importing the module that writes it.  This module imports nothing of
the package at run time (the value types are named in annotations, for the
type checker only), which keeps it a leaf of the import graph: ``plugin`` and ``caps``,
or ``fixtures.recovery`` and ``plugin``, no longer import each other for a key.

The old names stay importable where they were (``plugin.SEED_KEY``,
``fixtures.recovery.BUDGET_KEY``...): those modules re-export these objects.

Example::

    from pytest_runtimefaults._keys import SEED_KEY

    seed = config.stash[SEED_KEY]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pytest_runtimefaults.dbus.proxy import DBusFaultProxy
    from pytest_runtimefaults.dbus.rules import Rule
    from pytest_runtimefaults.faults import FaultRegistry
    from pytest_runtimefaults.fixtures.recovery import LeakFilter
    from pytest_runtimefaults.journal import Journal
    from pytest_runtimefaults.recovery import BudgetSpec, RecoversSpec
    from pytest_runtimefaults.report import ReportCollector, TestFigures

__all__ = [
    "BAD_MARKER_KEY",
    "BUDGET_KEY",
    "COLLECTOR_KEY",
    "ENV_KEY",
    "FAULTS_KEY",
    "FIGURES_KEY",
    "JOURNAL_KEY",
    "LEAK_FILTER_KEY",
    "PROXIES_KEY",
    "RECOVERS_KEY",
    "REPORT_PATH_KEY",
    "RULES_KEY",
    "SEED_KEY",
    "STRICT_KEY",
    "VERDICT_CALL_KEY",
]

# --- config.stash: the run ---------------------------------------------------------
#: The run's seed (``--runtimefaults-seed``, else random; xdist workers get the controller's).
SEED_KEY: pytest.StashKey[int] = pytest.StashKey()
#: ``--runtimefaults-strict``: a missing capability fails instead of skipping.
STRICT_KEY: pytest.StashKey[bool] = pytest.StashKey()
#: The crash-safe journal of this process.
JOURNAL_KEY: pytest.StashKey[Journal] = pytest.StashKey()
#: ``RUNTIMEFAULTS_STATE_DIR`` as it was before the plugin set it (None: unset).
ENV_KEY: pytest.StashKey[str | None] = pytest.StashKey()
#: Which leak checks run (``--runtimefaults-leak-checks``).
LEAK_FILTER_KEY: pytest.StashKey[LeakFilter] = pytest.StashKey()
#: Where the JSON report goes (``--runtimefaults-report``), when asked for.
REPORT_PATH_KEY: pytest.StashKey[str] = pytest.StashKey()
#: The figures of every test, gathered for the report and the terminal summary.
COLLECTOR_KEY: pytest.StashKey[ReportCollector] = pytest.StashKey()

# --- item.stash: one test ----------------------------------------------------------
#: The test's fault registry (the ``runtimefaults_faults`` fixture).
FAULTS_KEY: pytest.StashKey[FaultRegistry] = pytest.StashKey()
#: The validated ``recovers`` marker.
RECOVERS_KEY: pytest.StashKey[RecoversSpec] = pytest.StashKey()
#: The validated ``failure_budget`` marker.
BUDGET_KEY: pytest.StashKey[BudgetSpec] = pytest.StashKey()
#: The test's figures (faults, recovery time, leaks, budget) for the report.
FIGURES_KEY: pytest.StashKey[TestFigures] = pytest.StashKey()
#: A bad marker found by an xdist worker, reported at setup instead of at collection.
BAD_MARKER_KEY: pytest.StashKey[str] = pytest.StashKey()
#: The D-Bus fault proxies a test made (their traces go into a failing test's report).
PROXIES_KEY: pytest.StashKey[list[DBusFaultProxy]] = pytest.StashKey()
#: The rules of the test's ``dbus_faults`` marker, parsed at collection.
RULES_KEY: pytest.StashKey[list[Rule]] = pytest.StashKey()
#: Whether the test's call phase passed (the ``verdict`` fixture's teardown asks).
VERDICT_CALL_KEY: pytest.StashKey[bool] = pytest.StashKey()
