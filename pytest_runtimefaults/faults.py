"""The registry of active faults.

Every fault a fixture injects is registered here, so that the ``recovers``
marker can lift them all before probing the runtime, and so that the report
can say which faults a test applied.  A fault is a
:class:`~pytest_runtimefaults.core.Fault`; lifting is idempotent.

Example::

    registry = FaultRegistry()
    registry.register(fault)        # any core.Fault: name, start, lift, stop, applied
    ...
    registry.lift_all()
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from pytest_runtimefaults.core.fault import Fault, describe
from pytest_runtimefaults.core.log import logger

_F = TypeVar("_F", bound=Fault)

__all__ = ["FaultRecord", "FaultRegistry", "LeakCheck"]


class FaultRecord:
    """One injected fault: its name, when it started and whether it was lifted.

    ``applied`` is read from the fault itself when it was registered with
    :meth:`FaultRegistry.register`, else it is whatever the owner set.
    """

    def __init__(
        self, name: str, lift: Callable[[], None] | None, fault: Fault | None = None
    ) -> None:
        self.name = name
        self.lift = lift
        self.fault = fault
        self.started = time.monotonic()
        self.lifted_at: float | None = None
        self._applied = 0

    @property
    def applied(self) -> int:
        """How many times the fault actually fired (0 when unknown)."""
        return self.fault.applied if self.fault is not None else self._applied

    @applied.setter
    def applied(self, value: int) -> None:
        self._applied = value

    @property
    def active(self) -> bool:
        return self.lifted_at is None

    def __repr__(self) -> str:
        return f"<FaultRecord {self.name!r} active={self.active} applied={self.applied}>"


@dataclass
class LeakCheck:
    """A snapshot of some host state, taken before the test and compared after.

    ``snapshot()`` returns a set of strings naming resources (PIDs, unit names,
    mount points, links...).  Whatever is in the after-snapshot and not in the
    baseline is a leak.
    """

    name: str
    snapshot: Callable[[], set[str]]
    baseline: set[str] = field(default_factory=set)

    def start(self) -> None:
        self.baseline = self.snapshot()

    def leaked(self) -> set[str]:
        return self.snapshot() - self.baseline


class FaultRegistry:
    """Faults active in one test, in the order they were injected.

    Also holds what recovery needs to know about the test: the health probes
    fixtures offer (``probes``: name -> callable raising on failure) and the
    leak checks they register (``leak_checks``).
    """

    def __init__(self) -> None:
        self.records: list[FaultRecord] = []
        self.probes: dict[str, Callable[[], object]] = {}
        self.leak_checks: dict[str, LeakCheck] = {}

    def add_probe(self, name: str, probe: Callable[[], object]) -> None:
        """Offer a health probe (raises, or returns False, while unhealthy)."""
        self.probes[name] = probe

    def add_leak_check(self, name: str, snapshot: Callable[[], set[str]]) -> LeakCheck:
        """Register a leak check and take its baseline now.

        *name* is ``KIND`` or ``KIND:DETAIL`` (see :mod:`pytest_runtimefaults.leaks`);
        a name already taken (two fixtures of one kind in a test) gets ``#2``,
        ``#3``... so that no check replaces another.
        """
        unique, n = name, 1
        while unique in self.leak_checks:
            n += 1
            unique = f"{name}#{n}"
        check = LeakCheck(unique, snapshot)
        check.start()
        self.leak_checks[unique] = check
        return check

    def register(self, fault: _F, *, name: str | None = None) -> _F:
        """Hand a :class:`~pytest_runtimefaults.core.Fault` to the test; return it.

        The one way a fixture or a test registers a fault: the registry lifts it
        before recovery probes and at teardown, and the report reads its
        ``applied`` count.  Starting and stopping stay with the caller.
        """
        record = FaultRecord(name or describe(fault), fault.lift, fault)
        self.records.append(record)
        return fault

    def add(self, name: str, lift: Callable[[], None] | None = None) -> FaultRecord:
        """Record a fault that is not a :class:`~pytest_runtimefaults.core.Fault`.

        *lift* undoes it (called at most once).  Prefer :meth:`register`.
        """
        record = FaultRecord(name=name, lift=lift)
        self.records.append(record)
        return record

    def lift(self, record: FaultRecord) -> None:
        if record.lifted_at is not None:
            return
        record.lifted_at = time.monotonic()
        if record.lift is not None:
            record.lift()

    def lift_all(self) -> list[str]:
        """Lift every active fault, newest first; return their names.

        Every lift is attempted even if one raises; the first error is re-raised
        after the others were lifted.
        """
        lifted: list[str] = []
        first_error: BaseException | None = None
        for record in reversed(self.records):
            if not record.active:
                continue
            try:
                self.lift(record)
            except BaseException as exc:
                logger.debug("lifting %s failed", record.name, exc_info=True)
                first_error = first_error or exc
            lifted.append(record.name)
        if first_error is not None:
            raise first_error
        return lifted

    @property
    def active(self) -> list[FaultRecord]:
        return [r for r in self.records if r.active]

    def __len__(self) -> int:
        return len(self.records)
