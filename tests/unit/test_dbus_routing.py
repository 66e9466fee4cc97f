"""The proxy's hot-path routing decision, alone: every combination of the facts."""

from __future__ import annotations

import itertools

import pytest
from jeepney import DBusAddress, new_method_call

from pytest_runtimefaults.dbus.routing import (
    Delivery,
    Route,
    deliver,
    may_read_fast,
    route_read,
    route_received,
    route_settled,
)
from pytest_runtimefaults.dbus.wire import member_pattern

TARGET = DBusAddress("/o", "org.example.S", "org.example.I")
PING = bytes(new_method_call(TARGET, "Ping").serialise(serial=1))
STOP = bytes(new_method_call(TARGET, "StopUnit", "s", ("a",)).serialise(serial=2))
RULES_ON_STOP = member_pattern({b"StopUnit"})
ANY_MESSAGE = None  # the engine's prefilter when any message may concern a rule

BOOLS = (False, True)


@pytest.mark.parametrize(("fast", "queued", "fds"), list(itertools.product(BOOLS, repeat=3)))
def test_the_loop_reads_itself_only_when_fast_with_nothing_waiting(
    fast: bool, queued: bool, fds: bool
) -> None:
    assert may_read_fast(fast, queued, fds) is (fast and not queued and not fds)


@pytest.mark.parametrize(("dirty", "aligned"), list(itertools.product(BOOLS, repeat=2)))
def test_with_no_rule_every_chunk_is_relayed_even_a_piece(dirty: bool, aligned: bool) -> None:
    for data in (PING, PING[:5], PING + STOP[:20]):
        route = route_read(data, idle=True, dirty=dirty, aligned=aligned, prefilter=ANY_MESSAGE)
        assert route is Route.RELAY


def test_with_rules_only_whole_unconcerned_messages_on_a_boundary_are_relayed() -> None:
    def route(data: bytes, **facts: object) -> Route:
        kw: dict[str, object] = {"dirty": False, "aligned": True, "prefilter": RULES_ON_STOP}
        kw.update(facts)
        return route_read(data, idle=False, **kw)  # type: ignore[arg-type]

    assert route(PING) is Route.RELAY_WHOLE
    assert route(PING + PING) is Route.RELAY_WHOLE
    assert route(STOP) is Route.EXACT  # a member a rule names
    assert route(PING + STOP) is Route.EXACT
    assert route(PING[:-1]) is Route.EXACT  # a piece of a message
    assert route(PING + STOP[:3]) is Route.EXACT
    assert route(PING, dirty=True) is Route.EXACT  # the framer lags behind
    assert route(PING, aligned=False) is Route.EXACT  # owed bytes or a partial message
    assert route(PING, prefilter=ANY_MESSAGE) is Route.EXACT  # any message may concern a rule


@pytest.mark.parametrize(
    ("straight", "idle", "fds", "queued"), list(itertools.product(BOOLS, repeat=4))
)
def test_the_general_read_relays_at_once_only_with_no_rule_and_nothing_waiting(
    straight: bool, idle: bool, fds: bool, queued: bool
) -> None:
    route = route_received(straight=straight, idle=idle, pending_fds=fds, queued=queued)
    relay = straight and idle and not fds and not queued
    assert route is (Route.RELAY if relay else Route.EXACT)


@pytest.mark.parametrize(
    ("in_auth", "owed", "fds", "queued", "buffered"), list(itertools.product(BOOLS, repeat=5))
)
def test_settled_whole_messages_are_relayed_only_with_nothing_in_the_way(
    in_auth: bool, owed: bool, fds: bool, queued: bool, buffered: bool
) -> None:
    facts = {
        "in_auth": in_auth,
        "owed": owed,
        "pending_fds": fds,
        "queued": queued,
        "framer_pending": buffered,
    }
    clear = not any(facts.values())
    assert route_settled(PING, prefilter=RULES_ON_STOP, **facts) is (
        Route.RELAY_WHOLE if clear else Route.EXACT
    )
    # Whatever else holds: a concerned member, a piece, or no prefilter is the exact path.
    assert route_settled(STOP, prefilter=RULES_ON_STOP, **facts) is Route.EXACT
    assert route_settled(PING[:9], prefilter=RULES_ON_STOP, **facts) is Route.EXACT
    assert route_settled(PING, prefilter=ANY_MESSAGE, **facts) is Route.EXACT


@pytest.mark.parametrize(("unconcerned", "fds", "queued"), list(itertools.product(BOOLS, repeat=3)))
def test_delivery_batches_only_unconcerned_messages_with_nothing_waiting(
    unconcerned: bool, fds: bool, queued: bool
) -> None:
    got = deliver(unconcerned=unconcerned, pending_fds=fds, queued=queued)
    if not unconcerned:
        assert got is Delivery.ENGINE
    elif fds or queued:
        assert got is Delivery.EACH  # fds go with their own message; order behind the queue
    else:
        assert got is Delivery.BATCH
