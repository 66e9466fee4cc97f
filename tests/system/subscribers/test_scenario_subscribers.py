"""The subscribers scenario's judge (incident 5) comes out differently with the daemon.

The scenario's :func:`swarm_outcome`, over the same churn, against the
test-only broadcaster of :mod:`pytest_runtimefaults.transports.broadcaster`:
correct, it survives; with containerd 1.6's go-events defect it misbehaves
(events lost and doubled); with CRI-O's double ``Done`` it crashes.  What
containerd itself gets is the scenario's own verdict (``runtimefaults
scenarios --only subscribers``).
"""

from __future__ import annotations

import pytest

from pytest_runtimefaults.expectations import Outcome
from pytest_runtimefaults.scenarios.test_incident5_subscribers import CHURN, swarm_outcome
from pytest_runtimefaults.subscribers import DaemonWatch, Swarm, first_events
from pytest_runtimefaults.transports.broadcaster import Broadcaster

pytestmark = pytest.mark.timeout(60)


def judge(bug: str | None, seed: int = 3) -> tuple[Outcome, str]:
    with Broadcaster(bug=bug) as server:
        watch = DaemonWatch(pid=server.pid, log_path=server.log_path)
        watch.baseline()
        transport = server.transport()
        with Swarm(transport, subscribers=20, seed=seed, churn=CHURN) as swarm:
            swarm.prime(lambda: server.publish(1))
            if server.alive():
                # The buggy broadcaster may die mid-burst: that is its verdict.
                try:
                    server.publish(300, burst=20, pause=0.005)
                except OSError:
                    pass
            swarm.drain(timeout=10)
        report = swarm.report()
        alive = watch.alive()
        leaked: str | None = None
        new: str | None = None
        if alive:
            try:
                watch.check(settle=5)
            except AssertionError as exc:
                leaked = str(exc)
            try:
                first_events(transport, lambda: server.publish(1))
            except AssertionError as exc:
                new = str(exc)
        return swarm_outcome(
            report, panics=watch.panics(), alive=alive, leaked=leaked, new_subscriber=new
        )


def test_a_correct_broadcaster_survives() -> None:
    outcome, evidence = judge(None)
    assert outcome is Outcome.SURVIVES, evidence


def test_go_events_remove_while_ranging_misbehaves() -> None:
    outcome, evidence = judge("remove-while-ranging")
    assert outcome is Outcome.MISBEHAVES, evidence
    assert "gap" in evidence or "duplicate" in evidence, evidence


def test_cri_o_double_done_crashes() -> None:
    outcome, evidence = judge("double-done")
    assert outcome is Outcome.CRASHES, evidence
    assert "negative WaitGroup counter" in evidence, evidence
