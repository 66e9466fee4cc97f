"""The proxy's hot-path decision: which path a chunk of bytes takes, as pure functions.

The loop in :mod:`pytest_runtimefaults.dbus.proxy` knows a few facts about one
direction of one connection when bytes arrive, and these functions turn them
into a :class:`Route`; the loop only carries it out.  No socket, no engine and
no clock here, so every combination is tested alone (tests/unit/test_dbus_routing.py).

The facts:

* *fast* / *straight*: the handshake is over (both ways / this way) and the
  framer holds no byte that was not sent (see ``_Reader`` in the proxy);
* *idle*: no rule and no engine state at all;
* *pending_fds*: file descriptors came and wait for their message;
* *queued*: the lane has writes waiting (they must go out first, in order);
* *dirty*: chunks were relayed unframed, so the framer lags behind;
* *aligned*: the framer is on a message boundary and nothing is owed;
* *prefilter*: the engine's pattern of member fields rules name (``None``:
  any message may concern a rule), tried with
  :func:`~pytest_runtimefaults.dbus.wire.whole_messages_without`.

Example::

    route = route_read(data, idle=False, dirty=False, aligned=True, prefilter=pattern)
    if route is Route.EXACT:
        ...  # frame now, through the fault engine
"""

from __future__ import annotations

import enum
import re

from pytest_runtimefaults.dbus.wire import whole_messages_without

__all__ = [
    "Delivery",
    "Route",
    "deliver",
    "may_read_fast",
    "route_read",
    "route_received",
    "route_settled",
]


class Route(enum.Enum):
    """What to do with a chunk just read."""

    #: Write it now, frame it later; the framer lags behind (the reader is dirty).
    RELAY = "relay"
    #: Write it now, frame it later; it is whole messages no rule concerns, so the
    #: framer stays on a message boundary.
    RELAY_WHOLE = "relay_whole"
    #: Frame it now and let the engine (or the handshake relay) decide.
    EXACT = "exact"


class Delivery(enum.Enum):
    """How the exact path writes the messages it framed."""

    #: One write of them all, as they came (no rule concerns them, nothing waits).
    BATCH = "batch"
    #: One write each, each with its own fds (no rule concerns them).
    EACH = "each"
    #: Through the fault engine, message by message.
    ENGINE = "engine"


def may_read_fast(fast: bool, queued: bool, pending_fds: bool) -> bool:
    """Whether the loop may read the direction itself and try :func:`route_read`.

    Else the chunk goes through the proxy's general read (``recvmsg``, the
    handshake, the exact path).
    """
    return fast and not queued and not pending_fds


def route_read(
    data: bytes, *, idle: bool, dirty: bool, aligned: bool, prefilter: re.Pattern[bytes] | None
) -> Route:
    """The route of *data*, read on the loop's fast path (:func:`may_read_fast` said so).

    With no rule at all, even a piece of a message goes straight out.  With
    rules, only whole messages the prefilter clears do, and only while the
    framer is on a boundary and up to date; the rest takes the exact path.
    """
    if idle:
        return Route.RELAY
    if dirty or not aligned or prefilter is None or not whole_messages_without(data, prefilter):
        return Route.EXACT
    return Route.RELAY_WHOLE


def route_received(*, straight: bool, idle: bool, pending_fds: bool, queued: bool) -> Route:
    """The first decision of the general read: straight out (no rule at all) or not.

    ``EXACT`` here means "look closer": the proxy settles a lagging framer, then
    asks :func:`route_settled`.
    """
    if straight and idle and not pending_fds and not queued:
        return Route.RELAY
    return Route.EXACT


def route_settled(
    data: bytes,
    *,
    in_auth: bool,
    owed: bool,
    pending_fds: bool,
    queued: bool,
    framer_pending: bool,
    prefilter: re.Pattern[bytes] | None,
) -> Route:
    """The second decision, once the framer is up to date: whole messages no rule concerns?

    Only past the handshake, with nothing owed, waiting or buffered, so the
    framer stays on a message boundary.
    """
    if (
        not in_auth
        and not owed
        and not pending_fds
        and not queued
        and not framer_pending
        and prefilter is not None
        and whole_messages_without(data, prefilter)
    ):
        return Route.RELAY_WHOLE
    return Route.EXACT


def deliver(*, unconcerned: bool, pending_fds: bool, queued: bool) -> Delivery:
    """How the exact path writes framed messages.

    *unconcerned*: the engine is idle or bypasses every one of them.
    """
    if not unconcerned:
        return Delivery.ENGINE
    if not pending_fds and not queued:
        return Delivery.BATCH
    return Delivery.EACH
