"""Ask a systemd, over any bus address, what units it has (pystemd).

:class:`SystemdInspector` lists units and finds what a runtime left behind:
transient scopes, slices such as
``libcontainer_*_systemd_test_default.slice``, failed units.  pystemd is
imported inside the methods that need it, so importing this module stays
cheap.  (The module is not called ``inspect``: that would shadow the
standard library's module for a reader, if not for Python.)

Example::

    inspector = SystemdInspector("unix:path=/proc/1234/root/run/dbus/system_bus_socket")
    for unit in inspector.leftovers(baseline):
        inspector.reset(unit.name)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pytest_runtimefaults.core.log import swallowed

__all__ = ["SystemdInspector", "UnitInfo"]


@dataclass(frozen=True)
class UnitInfo:
    """One row of ``ListUnits``."""

    name: str
    description: str
    load_state: str
    active_state: str
    sub_state: str
    object_path: str

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def _typed(signature: bytes, args: Sequence[Any]) -> list[Any]:
    from pystemd.dbuslib import apply_signature

    return list(apply_signature(signature, list(args))) if signature else []


def _s(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class SystemdInspector:
    """Ask a systemd, over any bus address, what units it has (pystemd).

    Each call opens its own short connection, so an inspector is cheap, is safe
    from any thread, and never keeps a fault proxy busy between calls.

    Example::

        inspector = SystemdInspector("unix:path=/proc/1234/root/run/dbus/system_bus_socket")
        for unit in inspector.leftovers(baseline):
            inspector.reset(unit.name)
    """

    DESTINATION = b"org.freedesktop.systemd1"
    PATH = b"/org/freedesktop/systemd1"
    MANAGER = b"org.freedesktop.systemd1.Manager"

    def __init__(self, address: str | None = None, *, timeout: float = 10.0) -> None:
        self.address = address
        self.timeout = timeout

    @contextlib.contextmanager
    def _bus(self) -> Any:
        from pystemd.dbuslib import DBus, DBusAddress

        bus = DBusAddress(self.address.encode()) if self.address else DBus(system=True)
        with bus:
            yield bus

    def _call(self, method: bytes, signature: bytes = b"", args: Sequence[Any] = ()) -> Any:
        typed = _typed(signature, args)
        with self._bus() as bus:
            return bus.call_method(self.DESTINATION, self.PATH, self.MANAGER, method, typed).body

    def _get(self, prop: bytes, rtype: bytes = b"s") -> Any:
        with self._bus() as bus:
            return bus.get_property(self.DESTINATION, self.PATH, self.MANAGER, prop, rtype)

    def unique_name(self) -> str:
        """systemd's unique connection name on the bus (``:1.0``): the ``sender`` of
        its messages, for fault rules aimed at systemd alone."""
        with self._bus() as bus:
            reply = bus.call_method(
                b"org.freedesktop.DBus",
                b"/org/freedesktop/DBus",
                b"org.freedesktop.DBus",
                b"GetNameOwner",
                _typed(b"s", [self.DESTINATION]),
            ).body
        return _s(reply[0] if isinstance(reply, (tuple, list)) else reply)

    def system_state(self) -> str:
        """``initializing``, ``starting``, ``running``, ``degraded``..."""
        return _s(self._get(b"SystemState"))

    def version(self) -> str:
        return _s(self._get(b"Version"))

    def units(self) -> list[UnitInfo]:
        """Every unit systemd has loaded (``ListUnits``)."""
        rows = self._call(b"ListUnits")
        if isinstance(rows, tuple) and len(rows) == 1:
            rows = rows[0]
        return [UnitInfo(_s(r[0]), _s(r[1]), _s(r[2]), _s(r[3]), _s(r[4]), _s(r[6])) for r in rows]

    def unit_names(self, kinds: Iterable[str] | None = None) -> set[str]:
        wanted = set(kinds) if kinds is not None else None
        return {u.name for u in self.units() if wanted is None or u.kind in wanted}

    def scopes_and_slices(self) -> set[str]:
        """Names of every scope and slice (the units runtimes create)."""
        return self.unit_names(("scope", "slice"))

    def failed(self) -> set[str]:
        return {u.name for u in self.units() if u.active_state == "failed"}

    def leftovers(self, baseline: Iterable[str] = ()) -> list[UnitInfo]:
        """Scopes, slices and failed units not in *baseline*: what a runtime left.

        Typical finds: ``libcontainer_*_systemd_test_default.slice`` (runc before
        PR 2117), the ``*.scope`` of a deleted container, a failed transient unit.
        """
        base = set(baseline)
        return [
            u
            for u in self.units()
            if u.name not in base and (u.kind in ("scope", "slice") or u.active_state == "failed")
        ]

    def reset(self, name: str) -> None:
        """Stop unit *name* (if active) and clear its failed state, so it is unloaded."""
        from pystemd.dbusexc import DBusBaseError

        for method, sig, args in (
            (b"StopUnit", b"ss", [name.encode(), b"replace"]),
            (b"ResetFailedUnit", b"s", [name.encode()]),
        ):
            # An inactive unit refuses StopUnit, one that never failed ResetFailedUnit.
            with swallowed(DBusBaseError, "%s of %s", method.decode(), name):
                self._call(method, sig, args)

    def wait_gone(self, names: Iterable[str], timeout: float = 5.0) -> set[str]:
        """Wait until none of *names* is loaded; return those still there."""
        pending = set(names)
        deadline = time.monotonic() + timeout
        while pending:
            pending &= self.unit_names()
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return pending

    def snapshot_fn(self, kinds: Iterable[str] = ("scope", "slice")) -> Callable[[], set[str]]:
        """A leak-check snapshot: the names of units of *kinds*, plus failed units."""
        wanted = tuple(kinds)

        def snapshot() -> set[str]:
            return {u.name for u in self.units() if u.kind in wanted or u.active_state == "failed"}

        return snapshot
