"""The pytest plugin: options, ini keys, hooks and the core fixtures.

Loaded with ``pytest -p runtimefaults`` (the ``pytest11`` entry point), disabled
with ``-p no:runtimefaults``.  This module holds no logic of its own: each fault
family declares its fixtures, options and markers in a module of
:mod:`pytest_runtimefaults.fixtures`, listed in ``pytest_plugins`` below.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest

from pytest_runtimefaults import caps

# The stash keys live in the leaf module _keys; re-exported here, where they were.
from pytest_runtimefaults._keys import ENV_KEY, FAULTS_KEY, JOURNAL_KEY, SEED_KEY, STRICT_KEY
from pytest_runtimefaults.faults import FaultRegistry
from pytest_runtimefaults.fixtures._common import option, option_int
from pytest_runtimefaults.journal import (
    Journal,
    StateDirError,
    default_state_dir,
    reap_dead_owners,
)

pytest_plugins = [
    "pytest_runtimefaults.fixtures.dbus",
    "pytest_runtimefaults.fixtures.systemd",
    "pytest_runtimefaults.fixtures.recovery",
    "pytest_runtimefaults.fixtures.sockets",
    "pytest_runtimefaults.fixtures.cni",
    "pytest_runtimefaults.fixtures.subscribers",
    "pytest_runtimefaults.fixtures.verdicts",
]

__all__ = [
    "ENV_KEY",
    "FAULTS_KEY",
    "JOURNAL_KEY",
    "SEED_KEY",
    "STRICT_KEY",
    "runtimefaults_faults",
    "runtimefaults_journal",
    "runtimefaults_rng",
    "runtimefaults_seed",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("runtimefaults", "fault injection for container runtimes")
    group.addoption(
        "--runtimefaults-seed",
        type=int,
        default=None,
        metavar="N",
        help="seed of every random choice a fault makes (default: ini "
        "runtimefaults_seed, else random; printed in the header to replay a run)",
    )
    parser.addini("runtimefaults_seed", "default for --runtimefaults-seed", default="")
    group.addoption(
        "--runtimefaults-strict",
        action="store_true",
        default=None,
        help="fail, instead of skipping, tests whose capability the host lacks",
    )
    parser.addini(
        "runtimefaults_strict", "default for --runtimefaults-strict", type="bool", default=False
    )
    group.addoption(
        "--runtimefaults-state-dir",
        default=None,
        metavar="DIR",
        help="where the cleanup journal lives (default /run/runtimefaults as root)",
    )
    group.addoption(
        "--runtimefaults-no-reap",
        action="store_true",
        default=False,
        help="do not reap resources left by earlier, killed runs at session start",
    )


def _seed(config: pytest.Config) -> int:
    seed = option_int(config, "seed")
    if seed is not None:
        return seed
    # xdist workers must agree with the controller: it hands its seed down.
    workerinput = getattr(config, "workerinput", None)
    if workerinput and "runtimefaults_seed" in workerinput:
        return int(workerinput["runtimefaults_seed"])
    return random.SystemRandom().randrange(2**32)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # tryfirst: the families' pytest_configure use the seed, strictness and journal.
    config.stash[SEED_KEY] = _seed(config)
    config.stash[STRICT_KEY] = bool(option(config, "strict"))
    state_dir = config.option.runtimefaults_state_dir  # no ini key: a command-line choice
    if state_dir:
        # Library classes that make their own Journal.default() (and the
        # processes fixtures start) must use the same directory; restored in
        # pytest_unconfigure.
        config.stash[ENV_KEY] = os.environ.get("RUNTIMEFAULTS_STATE_DIR")
        os.environ["RUNTIMEFAULTS_STATE_DIR"] = str(state_dir)
    journal = Journal(state_dir or default_state_dir())
    config.stash[JOURNAL_KEY] = journal
    if not _is_worker(config) and not config.option.runtimefaults_no_reap:
        try:
            _reap(config, journal, "killed run(s)")
        except StateDirError as exc:
            # A UsageError raised in pytest_configure is shown as a traceback;
            # pytest.exit prints the one line and exits with the usage code.
            del config.stash[JOURNAL_KEY]  # nor reaped again at unconfigure
            pytest.exit(str(exc), returncode=pytest.ExitCode.USAGE_ERROR)


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _reap(config: pytest.Config, journal: Journal, whose: str) -> None:
    result = reap_dead_owners(journal.state_dir)
    if result.reaped or result.errors or result.warnings:
        message = (
            f"runtimefaults reaped {len(result.reaped)} resource(s) left by "
            f"{result.journals} {whose} (journals in {journal.state_dir})"
            + (f"; errors: {result.errors[:3]}" if result.errors else "")
            + (f"; warnings: {result.warnings[:3]}" if result.warnings else "")
        )
        config.issue_config_time_warning(pytest.PytestWarning(message), stacklevel=2)


def pytest_unconfigure(config: pytest.Config) -> None:
    if ENV_KEY in config.stash:
        previous = config.stash[ENV_KEY]
        if previous is None:
            os.environ.pop("RUNTIMEFAULTS_STATE_DIR", None)
        else:
            os.environ["RUNTIMEFAULTS_STATE_DIR"] = previous
    journal = config.stash.get(JOURNAL_KEY, None)
    if journal is not None and not _is_worker(config) and not config.option.runtimefaults_no_reap:
        # Workers that died mid-run (pytest-timeout's thread method calls
        # os._exit, xdist replaces crashed workers) left journals: reap them now
        # rather than at the next run.
        result = reap_dead_owners(journal.state_dir)
        if result.reaped:
            tr = config.pluginmanager.get_plugin("terminalreporter")
            if tr is not None:
                tr.write_line(
                    f"runtimefaults: reaped {len(result.reaped)} resource(s) left by "
                    f"{result.journals} dead worker(s)"
                )


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: object) -> None:
    """pytest-xdist: give each worker the controller's seed."""
    config = getattr(node, "config")  # noqa: B009
    getattr(node, "workerinput")["runtimefaults_seed"] = config.stash[SEED_KEY]  # noqa: B009


def pytest_report_header(config: pytest.Config) -> list[str]:
    seed = config.stash[SEED_KEY]
    return [
        f"runtimefaults: seed {seed} (replay with --runtimefaults-seed={seed})",
        f"runtimefaults: {caps.header_line()}",
    ]


@pytest.fixture(scope="session")
def runtimefaults_seed(pytestconfig: pytest.Config) -> int:
    """The run's seed, an ``int`` (session scope, no dependencies).

    Printed in the report header; set it with ``--runtimefaults-seed`` or the
    ini key ``runtimefaults_seed``; pytest-xdist workers get the controller's.
    """
    return pytestconfig.stash[SEED_KEY]


@pytest.fixture
def runtimefaults_rng(request: pytest.FixtureRequest, runtimefaults_seed: int) -> random.Random:
    """A ``random.Random`` seeded from the run's seed and the test's node id.

    Function scope; depends on ``runtimefaults_seed``.  Every random choice a
    fault makes comes from here, so a test replays identically with the same
    ``--runtimefaults-seed`` whatever else runs, in whatever order.
    """
    return random.Random(f"{runtimefaults_seed}:{request.node.nodeid}")


@pytest.fixture
def runtimefaults_faults(request: pytest.FixtureRequest) -> Iterator[FaultRegistry]:
    """The test's :class:`~pytest_runtimefaults.faults.FaultRegistry` (function scope).

    Fault fixtures hand it every fault they inject (``register(fault)``, any
    :class:`~pytest_runtimefaults.core.Fault`), the
    health probes they offer (``add_probe(name, fn)``) and their leak checks
    (``add_leak_check(name, snapshot)``).  The ``recovers`` marker lifts every
    fault before probing; the report lists them; faults still active at
    teardown are lifted.  No dependencies.
    """
    registry = request.node.stash.setdefault(FAULTS_KEY, FaultRegistry())
    yield registry
    registry.lift_all()


@pytest.fixture(scope="session")
def runtimefaults_journal(pytestconfig: pytest.Config) -> Journal:
    """The crash-safe :class:`~pytest_runtimefaults.journal.Journal` (session scope).

    Record each resource as you create it (``rid = journal.add("path",
    path=...)``, ``journal.add_process(pid)``) and ``journal.release(rid)``
    once removed: what a killed pytest leaves is reaped by the next run or by
    ``runtimefaults cleanup``.  One journal per process (xdist worker); no
    dependencies.
    """
    return pytestconfig.stash[JOURNAL_KEY]
