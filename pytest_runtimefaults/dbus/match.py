"""Which messages a rule applies to: :class:`Match`, and :class:`RuleError`.

This module owns matching only: the fields a rule may name, their validation
(every bad field is a :class:`RuleError` naming it and the fields there are),
and the test of one decoded message against them.  It imports only the codec
(:mod:`~pytest_runtimefaults.dbus.wire`) and the direction names; every other
rule module imports it.  :class:`RuleError` lives here because it is the
lowest module of the rules.

Example::

    m = Match(direction="to_client", reply_to=Match(member="StartTransientUnit"))
    m.reply_to.matches("to_bus", call)  # a call whose reply m applies to
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from typing import Any

from pytest_runtimefaults.dbus.trace import TO_BUS, TO_CLIENT
from pytest_runtimefaults.dbus.wire import HeaderField, Message

__all__ = ["DIRECTIONS", "MESSAGE_TYPES", "Match", "RuleError", "match_from_kwargs"]

#: message type names a rule may use, and their wire codes
MESSAGE_TYPES = {"method_call": 1, "method_return": 2, "error": 3, "signal": 4}
#: direction names a rule may use (``in``/``out`` as seen by the client)
DIRECTIONS = {TO_BUS: TO_BUS, TO_CLIENT: TO_CLIENT, "in": TO_CLIENT, "out": TO_BUS}
_STRING_FIELDS = {
    "path": (HeaderField.PATH, "o"),
    "interface": (HeaderField.INTERFACE, "s"),
    "member": (HeaderField.MEMBER, "s"),
    "error_name": (HeaderField.ERROR_NAME, "s"),
    "destination": (HeaderField.DESTINATION, "s"),
    "sender": (HeaderField.SENDER, "s"),
}


class RuleError(ValueError):
    """A rule that cannot work: unknown action or field, bad argument; says which."""


@dataclass(frozen=True)
class Match:
    """Which messages a rule applies to; ``None`` fields match anything.

    ``reply_to`` matches replies (METHOD_RETURN or ERROR) to a call that matched
    it, since a reply carries no member of its own.  String fields are compared
    exactly; the proxy first looks for the encoded field in the header bytes
    (a C-speed ``bytes.find``), so rules that match nothing cost little.
    """

    direction: str | None = None
    type: str | None = None
    path: str | None = None
    interface: str | None = None
    member: str | None = None
    error_name: str | None = None
    destination: str | None = None
    sender: str | None = None
    reply_to: Match | None = None

    def __post_init__(self) -> None:
        if self.direction is not None and self.direction not in DIRECTIONS:
            raise RuleError(f"direction {self.direction!r}: use {TO_BUS!r} or {TO_CLIENT!r}")
        if self.direction is not None:
            object.__setattr__(self, "direction", DIRECTIONS[self.direction])
        if self.type is not None and self.type not in MESSAGE_TYPES:
            raise RuleError(f"message type {self.type!r}: use one of {sorted(MESSAGE_TYPES)}")
        if self.reply_to is not None and not isinstance(self.reply_to, Match):
            raise RuleError(f"reply_to must be a Match, got {self.reply_to!r}")
        needles: list[tuple[str, str, tuple[bytes, bytes]]] = []
        for name, (code, sig) in _STRING_FIELDS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise RuleError(f"{name} must be a string, got {value!r}")
            encoded = value.encode()
            head = bytes([code, 1, ord(sig), 0])
            needles.append(
                (
                    name,
                    value,
                    (
                        head + struct.pack("<I", len(encoded)) + encoded + b"\0",
                        head + struct.pack(">I", len(encoded)) + encoded + b"\0",
                    ),
                )
            )
        object.__setattr__(self, "_needles", tuple(needles))
        object.__setattr__(self, "_type", MESSAGE_TYPES[self.type] if self.type else None)

    def matches(self, direction: str, msg: Message) -> bool:
        """Whether *msg* travelling in *direction* matches (ignoring ``reply_to``)."""
        if self.direction is not None and direction != self.direction:
            return False
        want_type: int | None = self._type  # type: ignore[attr-defined]
        if want_type is not None and msg.type != want_type:
            return False
        needles: tuple[tuple[str, str, tuple[bytes, bytes]], ...] = self._needles  # type: ignore[attr-defined]
        if needles:
            raw = msg.raw
            end = msg.header_end + 1
            which = 1 if msg.big_endian else 0
            for _name, _value, pair in needles:
                if raw.find(pair[which], 16, end) < 0:
                    return False
            for name, value, _pair in needles:  # confirm on the decoded fields
                if getattr(msg, name) != value:
                    return False
        return True

    def describe(self) -> str:
        parts = [
            f"{k}={v}"
            for k, v in (
                ("direction", self.direction),
                ("type", self.type),
                ("path", self.path),
                ("interface", self.interface),
                ("member", self.member),
                ("error_name", self.error_name),
                ("destination", self.destination),
                ("sender", self.sender),
            )
            if v is not None
        ]
        if self.reply_to is not None:
            parts.append(f"reply_to=({self.reply_to.describe()})")
        return " ".join(parts) or "any message"


_FIELDS = tuple(f.name for f in dataclasses.fields(Match))


def _checked(fields: dict[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(fields) - set(_FIELDS))
    if unknown:
        raise RuleError(
            f"unknown match field {where + unknown[0]!r}; match fields are: {', '.join(_FIELDS)}"
        )
    return fields


def match_from_kwargs(kwargs: dict[str, Any]) -> Match:
    """A :class:`Match` from keywords, ``reply_to`` given as a member name, dict or Match.

    Raises :class:`RuleError` naming an unknown field (also inside ``reply_to``).
    """
    kwargs = dict(kwargs)
    reply = kwargs.pop("reply_to", None)
    if isinstance(reply, str):
        reply = Match(member=reply)
    elif isinstance(reply, dict):
        reply = Match(**_checked(reply, "reply_to."))
    return Match(reply_to=reply, **_checked(kwargs, ""))
