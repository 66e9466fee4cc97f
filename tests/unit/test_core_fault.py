"""The one fault shape: idempotent start/lift/stop, threads that must stop, one registration."""

from __future__ import annotations

import threading

import pytest

from pytest_runtimefaults.core import Fault, FaultBase, ThreadedFault
from pytest_runtimefaults.core.fault import FaultThreadError
from pytest_runtimefaults.faults import FaultRegistry


class Counting(FaultBase):
    name = "counting"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def _start(self) -> None:
        self.calls.append("start")
        self._fired(2)

    def _lift(self) -> None:
        self.calls.append("lift")

    def _stop(self) -> None:
        self.calls.append("stop")


def test_start_lift_stop_are_idempotent_and_ordered() -> None:
    fault = Counting()
    assert isinstance(fault, Fault)
    assert fault.start() is fault
    fault.start()
    fault.lift()
    fault.lift()
    fault.stop()
    fault.stop()
    assert fault.calls == ["start", "lift", "stop"]
    assert fault.applied == 2


def test_a_failed_start_releases_what_it_held() -> None:
    class Broken(Counting):
        def _start(self) -> None:
            super()._start()
            raise OSError("no")

    fault = Broken()
    with pytest.raises(OSError, match="no"):
        fault.start()
    assert fault.calls == ["start", "stop"]


def test_the_registry_lifts_a_registered_fault_and_reads_its_count() -> None:
    registry = FaultRegistry()
    fault = registry.register(Counting().start())
    assert registry.records[0].name == "counting"
    assert registry.records[0].applied == 2
    assert registry.lift_all() == ["counting"]
    assert fault.calls == ["start", "lift"]
    assert not registry.active


def test_a_thread_error_is_raised_by_stop() -> None:
    class Failing(ThreadedFault):
        name = "failing"

        def _run(self) -> None:
            raise ValueError("boom in the thread")

    fault = Failing().start()
    with pytest.raises(FaultThreadError, match="boom in the thread") as info:
        fault.stop()
    assert isinstance(info.value.__cause__, ValueError)


def test_a_thread_that_does_not_stop_is_an_error() -> None:
    release = threading.Event()

    class Stuck(ThreadedFault):
        name = "stuck"
        join_timeout = 0.1

        def _run(self) -> None:
            release.wait(10)  # ignores self.stopping on purpose

    fault = Stuck().start()
    try:
        with pytest.raises(FaultThreadError, match="still running"):
            fault.stop()
    finally:
        release.set()
        fault.join(5)


def test_a_well_behaved_thread_stops_when_lifted() -> None:
    class Ticking(ThreadedFault):
        name = "ticking"

        def _run(self) -> None:
            while not self.stopping.wait(0.01):
                self._fired()

    with Ticking() as fault:
        while fault.applied < 3:
            threading.Event().wait(0.01)
    assert not fault.active
