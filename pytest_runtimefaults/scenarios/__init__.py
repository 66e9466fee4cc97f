"""The shipped fault scenarios: pytest tests that ``runtimefaults scenarios`` runs.

They are the main job of a fresh installation and a template for your own
tests: each reproduces an incident of the catalogue (docs/incidents.md)
against real software with the embedded defaults (a sandboxed systemd with
its own dbus-daemon, the D-Bus fault proxy, runc) and ends in a **verdict**
(the ``verdict`` fixture): survived, failed cleanly, blocked, leaked,
misbehaved or crashed, with the evidence.  A scenario passes once it reached
a verdict, whatever the verdict; it fails only when it could not reach one.
Whether a verdict is acceptable is decided afterwards, from data: the
expectations table (:mod:`pytest_runtimefaults.expectations`) and the
user's baseline (``runtimefaults scenarios --baseline FILE``).

Each module is ``test_incidentN_*.py`` (incident N of docs/incidents.md) and
its tests carry ``@pytest.mark.family(NAME, incident=N)``; the first line of
a test's docstring says what it checks (``runtimefaults scenarios --list``).

Run them with ``runtimefaults scenarios`` (or ``pytest -p runtimefaults
--pyargs pytest_runtimefaults.scenarios``).

This module also holds what the runtime scenarios share: who the runtime is
(:func:`runtime_identity`), what a run left (:func:`leftovers`) and the
verdict of a series of lifecycles (:func:`lifecycle_outcome`).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from typing import Any

from pytest_runtimefaults import expectations
from pytest_runtimefaults.core.log import swallowed
from pytest_runtimefaults.expectations import Outcome

__all__ = [
    "DaemonGone",
    "daemon_gone",
    "leftovers",
    "lifecycle_outcome",
    "observe",
    "runtime_identity",
]


class DaemonGone(RuntimeError):
    """The sandboxed systemd or its bus went away during the scenario."""


def daemon_gone(systemd: Any) -> str | None:
    """Why the sandbox's systemd or its dbus-daemon cannot be reached any more, or None."""
    if getattr(systemd, "running", True) is False:
        return "the sandbox's systemd exited"
    path = getattr(systemd, "bus_path", None) if hasattr(systemd, "workdir") else None
    if path is not None and not os.path.exists(path):
        return f"the sandbox's bus went away (its dbus-daemon's socket {path} is gone)"
    return None


def runtime_identity(runtime: Any) -> tuple[str, str | None]:
    """``(component, version)`` of a :class:`~pytest_runtimefaults.runtime.Runtime`.

    The component is what its ``--version`` says it is (``runc``, ``crun``),
    so a runtime given by path (``/usr/local/bin/crun``) is looked up in the
    expectations table under its real name; otherwise its file name, with
    version None (judged on its own merits).
    """
    name = str(runtime.name)
    try:
        res = subprocess.run(
            [runtime.binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return name, None
    text = res.stdout + res.stderr
    for component in dict.fromkeys((name, "runc", "crun")):
        try:
            version = expectations.parse_version(component, text)
        except ValueError:  # no parser for that name
            continue
        if version is not None:
            return component, str(version)
    return name, None


def leftovers(
    systemd: Any, runtime: Any, units_before: set[str], *, grace: float = 5.0
) -> list[str]:
    """What a run left once its containers were deleted: units, processes, containers.

    Scopes, slices and failed units that were not there before
    (``units_before``: ``inspector.scopes_and_slices()`` taken first),
    processes in the sandbox other than systemd and dbus-daemon, and
    containers the runtime still lists.  Asked again for up to *grace*
    seconds, since systemd removes a stopped scope asynchronously.
    """
    inspector = systemd.inspector()
    deadline = time.monotonic() + grace
    while True:
        try:
            units = inspector.leftovers(units_before)
        except Exception as exc:
            gone = daemon_gone(systemd)
            if gone is None:
                raise
            raise DaemonGone(gone) from exc
        found = [f"unit {u.name} ({u.active_state})" for u in units]
        if hasattr(systemd, "processes"):  # a sandbox: its cgroups say what still runs
            found += [f"process {p}" for p in sorted(systemd.processes())]
        with swallowed(Exception, "listing the containers of %s", runtime):
            found += [f"container {c.get('id')}" for c in runtime.containers()]
        if not found or time.monotonic() >= deadline:
            return sorted(found)
        time.sleep(0.1)


def observe(systemd: Any, runtime: Any, units_before: set[str]) -> tuple[list[str], str | None]:
    """:func:`leftovers`, and whether the sandbox's systemd or bus went away meanwhile.

    ``(left, gone)``: *gone* is None while the daemons are there; otherwise it
    says what went (and *left* could not be read).
    """
    try:
        left = leftovers(systemd, runtime, units_before)
    except DaemonGone as exc:
        return [], str(exc)
    return left, daemon_gone(systemd)


def _crashed(result: Any) -> bool:
    # Killed by a signal it did not get from us (SIGSEGV, SIGABRT), or a Go panic.
    if result.timed_out:
        return False
    return (result.returncode is not None and result.returncode < 0) or "panic:" in result.stderr


_VERBS = ("create", "delete", "start", "run", "state", "kill", "lifecycle")


def _verb(result: Any) -> str:
    return next((a for a in result.argv if a in _VERBS), "command")


def _error(result: Any) -> str:
    text = result.stderr.strip().splitlines()
    return text[-1][:300] if text else ""


def lifecycle_outcome(
    under_fault: Sequence[Any],
    after: Any | None,
    left: Sequence[str],
    *,
    bound: float,
    gone: str | None = None,
) -> tuple[Outcome, str]:
    """The verdict of runtime commands run under a fault, and its evidence.

    *under_fault* are the results (:class:`~pytest_runtimefaults.runtime.RuntimeResult`)
    of the commands run while the fault was on, each with a timeout of
    *bound* seconds; *after* the lifecycle run once the fault was lifted;
    *left* what :func:`leftovers` found; *gone* what :func:`observe` says went
    away (the sandbox's systemd or bus).  In order of gravity:

    * **crashes**: a command died of a signal or panicked, or the daemons it
      talked to went away;
    * **blocks**: a command was still running at the bound (then killed);
    * **leaks**: something was left once the fault was lifted and the
      containers deleted;
    * **misbehaves**: a command failed without an error message, or the
      next lifecycle failed once the fault was lifted;
    * **fails_cleanly**: a command failed with an error, nothing was left
      and the next lifecycle worked;
    * **survives**: every command worked.
    """
    timing = f"{sum(r.duration for r in under_fault):.2f} s under the fault"
    crashed = [r for r in under_fault if _crashed(r)]
    if crashed:
        r = crashed[0]
        how = f"exit {r.returncode}" if r.returncode >= 0 else f"signal {-r.returncode}"
        return Outcome.CRASHES, f"{_verb(r)}: {how}: {_error(r) or 'no output'}"
    blocked = [r for r in under_fault if r.timed_out]
    if gone is not None:
        before = (
            f"; {_verb(blocked[0])} was still running at the {bound:g} s bound" if blocked else ""
        )
        return Outcome.CRASHES, f"{gone}{before}"
    if blocked:
        r = blocked[0]
        tail = f"; left: {', '.join(left)}" if left else "; nothing left"
        return (
            Outcome.BLOCKS,
            f"{_verb(r)} still running at the {bound:g} s bound, killed{tail}",
        )
    failed = [r for r in under_fault if not r.ok]
    if left:
        return Outcome.LEAKS, f"left: {', '.join(left)} ({timing})"
    if after is not None and not after.ok:
        return (
            Outcome.MISBEHAVES,
            f"the next lifecycle failed once the fault was lifted: {_error(after) or 'no output'}",
        )
    if failed:
        r = failed[0]
        message = _error(r)
        if not message:
            return Outcome.MISBEHAVES, f"exit {r.returncode} with no error message ({timing})"
        return (
            Outcome.FAILS_CLEANLY,
            f"{len(failed)} of {len(under_fault)} failed in {r.duration:.2f} s: {message}; "
            "nothing left, the next lifecycle worked",
        )
    return Outcome.SURVIVES, f"{len(under_fault)} of {len(under_fault)} ok, {timing}; nothing left"
