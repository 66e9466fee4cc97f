"""The one shape every fault has, and a base for faults that run a thread.

A fault is a library object first (usable without pytest, as a context
manager) and a registry entry second:

* ``name``: what the report calls it;
* ``start() -> Self``: inject it (idempotent), returns the fault itself;
* ``lift()``: stop injecting, so that the runtime can recover (idempotent;
  the ``recovers`` marker calls it before probing);
* ``stop()``: lift and release everything the fault holds (idempotent);
* ``applied``: how many times it actually fired (0 when unknown).

A test hands a fault to its registry in exactly one way,
``runtimefaults_faults.register(fault)``; the registry lifts it before
recovery probes and at teardown.

:class:`ThreadedFault` is the base for faults that work in a background
thread: ``stop()`` joins it, raises if the thread is still alive after the
join timeout (a thread that does not stop when asked is an error) and
re-raises the thread's own exception, so a background failure surfaces in the
test that caused it.

Example::

    class Truncate(FaultBase):
        name = "truncate x.conflist"

        def _start(self) -> None:
            path.write_text("{")

        def _lift(self) -> None:
            path.write_text(whole)

    with Truncate() as fault:
        ...
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Fault", "FaultBase", "FaultThreadError", "ThreadedFault", "describe"]


@runtime_checkable
class Fault(Protocol):
    """What every fault of every family implements (see the module docstring)."""

    @property
    def name(self) -> str: ...

    @property
    def applied(self) -> int: ...

    def start(self) -> Self: ...

    def lift(self) -> None: ...

    def stop(self) -> None: ...


class FaultThreadError(RuntimeError):
    """A fault's background thread failed or did not stop when asked."""


class FaultBase:
    """Idempotent ``start``/``lift``/``stop`` around three hooks; a context manager.

    Subclasses set ``name`` (or a property) and implement ``_start()``, and
    ``_lift()`` and/or ``_stop()`` as needed.  ``stop()`` lifts first.
    ``applied`` counts what :meth:`_fired` recorded.
    """

    name: str = "fault"

    def __init__(self) -> None:
        self._started = False
        self._lifted = False
        self._stopped = False
        self._applied = 0
        self._applied_lock = threading.Lock()

    # --- what subclasses implement -------------------------------------------------
    def _start(self) -> None:
        """Inject the fault (called once)."""

    def _lift(self) -> None:
        """Stop injecting it (called at most once, after a successful start)."""

    def _stop(self) -> None:
        """Release what the fault holds (called at most once, after ``_lift``)."""

    # --- the protocol ----------------------------------------------------------------
    @property
    def applied(self) -> int:
        return self._applied

    def _fired(self, n: int = 1) -> None:
        with self._applied_lock:
            self._applied += n

    @property
    def active(self) -> bool:
        return self._started and not self._lifted

    def start(self) -> Self:
        if not self._started:
            self._started = True
            try:
                self._start()
            except BaseException:
                # Release whatever the failed start left; the caller sees its error.
                self._lifted = True
                self.stop()
                raise
        return self

    def lift(self) -> None:
        if self._started and not self._lifted:
            self._lifted = True
            self._lift()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            self.lift()
        finally:
            self._stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "active" if self.active else ("lifted" if self._started else "new")
        return f"<{type(self).__name__} {self.name!r} {state} applied={self.applied}>"


class ThreadedFault(FaultBase):
    """A fault whose work runs in one background thread.

    Subclasses implement ``_run()`` and check ``self.stopping`` (an
    :class:`threading.Event`, set by ``lift()``) to end it.  ``stop()`` joins
    the thread within ``join_timeout`` seconds; a thread still alive is a
    :class:`FaultThreadError`, and an exception raised by ``_run()`` is
    re-raised by ``stop()`` (chained), in the test that owns the fault.
    """

    join_timeout: float = 10.0

    def __init__(self) -> None:
        super().__init__()
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _run(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _body(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self._error = exc

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._body, name=f"rf-{self.name}", daemon=True)
        self._thread.start()

    def _lift(self) -> None:
        self.stopping.set()

    def _stop(self) -> None:
        self.join()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread; raise if it is still alive or if it failed."""
        thread = self._thread
        if thread is not None:
            thread.join(self.join_timeout if timeout is None else timeout)
            if thread.is_alive():
                raise FaultThreadError(
                    f"{self.name}: its thread is still running {self.join_timeout:g} s "
                    "after it was asked to stop"
                )
        if self._error is not None:
            error, self._error = self._error, None
            raise FaultThreadError(f"{self.name}: its thread failed: {error!r}") from error

    @property
    def error(self) -> BaseException | None:
        """The exception the thread raised, if any (not yet re-raised)."""
        return self._error


def describe(fault: Any) -> str:
    """A fault's name for reports, whatever object it is."""
    return str(getattr(fault, "name", None) or type(fault).__name__)
