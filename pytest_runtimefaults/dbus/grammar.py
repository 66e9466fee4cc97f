"""The text form of rules, used by the ``dbus_faults`` marker and ``runtimefaults proxy --rule``.

This module owns :func:`parse_rule` and :data:`ACTIONS` (the action names the
text form knows).  Every mistake in a rule's text is a
:class:`~pytest_runtimefaults.dbus.match.RuleError` whose one-line message
quotes the rule and names the bad word, never another exception: the marker
turns it into a usage error naming the test, the command into exit status 2.
It imports the actions, :mod:`~pytest_runtimefaults.dbus.serials`,
:mod:`~pytest_runtimefaults.dbus.flood` and
:mod:`~pytest_runtimefaults.dbus.match`.

Example::

    parse_rule("SignalBeforeReply('JobRemoved') reply_to=StartTransientUnit times=1")
"""

from __future__ import annotations

import ast
import math
import shlex
from typing import Any

from pytest_runtimefaults.dbus.actions import (
    Action,
    Delay,
    Disconnect,
    Drop,
    Duplicate,
    ErrorReply,
    FlipByteOrder,
    JobResult,
    Reorder,
    Rule,
    SignalBeforeReply,
    SplitMessage,
    StrayReply,
)
from pytest_runtimefaults.dbus.flood import SignalFlood
from pytest_runtimefaults.dbus.match import RuleError, match_from_kwargs
from pytest_runtimefaults.dbus.serials import Serials

__all__ = ["ACTIONS", "as_rule", "parse_rule"]

#: every action the text form knows, by class name
ACTIONS: dict[str, type[Action]] = {
    cls.__name__: cls
    for cls in (
        Delay,
        Reorder,
        SignalBeforeReply,
        SplitMessage,
        StrayReply,
        FlipByteOrder,
        Drop,
        Duplicate,
        ErrorReply,
        Disconnect,
        JobResult,
        Serials,
        SignalFlood,
    )
}


def parse_rule(text: str) -> Rule:
    """Parse the text form of a rule (CLI ``--rule``, marker strings).

    ``ACTION(ARGS) [FIELD=VALUE ...]`` where ACTION is one of :data:`ACTIONS`,
    ARGS are Python literals, and FIELD is a :class:`Match` field,
    ``reply_to=MEMBER`` / ``reply_to.FIELD=VALUE`` (replies to matching calls),
    ``times=N``, ``every=N`` or ``probability=P``.  Examples::

        Delay(0.5) reply_to=StartTransientUnit
        SignalBeforeReply('JobRemoved') reply_to.member=StartTransientUnit times=1
        Serials(0xfffffff0, on_overflow='stall') direction=to_client sender=org.freedesktop.systemd1
        JobResult('failed', unit='runc-*.scope') member=JobRemoved times=1
        SignalFlood(2000, 'PropertiesChanged') member=RemoveMatch times=1
    """
    if not isinstance(text, str):
        raise RuleError(f"a rule's text form must be a string, got {text!r}")
    stripped = text.strip()
    if not stripped:
        raise RuleError("empty rule")
    head_end = _action_end(stripped, text)
    try:
        words = shlex.split(stripped[head_end:])
    except ValueError as exc:
        raise RuleError(f"rule {text!r}: {exc}") from None
    action = _parse_action(stripped[:head_end], text)
    return _apply_words(action, words, text)


def _action_end(stripped: str, text: str) -> int:
    """Where the action ends: it may hold spaces and quotes inside its parentheses."""
    head_end = len(stripped.split(None, 1)[0])
    paren = stripped.find("(")
    if 0 <= paren < head_end:
        depth = 0
        for i, ch in enumerate(stripped[paren:], paren):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return i + 1
        raise RuleError(f"rule {text!r}: unbalanced parentheses in the action")
    return head_end


def _apply_words(action: Action, words: list[str], text: str) -> Rule:
    """The rule with its FIELD=VALUE words: match fields first, then the limits."""
    match: dict[str, Any] = {}
    reply: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            raise RuleError(f"rule {text!r}: expected FIELD=VALUE, got {word!r}")
        if key in ("times", "every"):
            try:
                limits[key] = int(value, 0)
            except ValueError:
                raise RuleError(f"rule {text!r}: {key} needs an integer, got {value!r}") from None
        elif key == "probability":
            limits[key] = _probability(value, text)
        elif key == "reply_to":
            reply["member"] = value
        elif key.startswith("reply_to."):
            reply[key.split(".", 1)[1]] = value
        else:
            match[key] = value
    if reply:
        match["reply_to"] = reply
    try:
        rule = Rule(action, match_from_kwargs(match))
        if "times" in limits:
            rule = rule.times(limits["times"])
        if "every" in limits:
            rule = rule.every(limits["every"])
        if "probability" in limits:
            rule = rule.probability(limits["probability"])
    except RuleError as exc:
        raise RuleError(f"rule {text!r}: {exc}") from None
    return rule


def _probability(value: str, text: str) -> float:
    try:
        p = float(value)
    except ValueError:
        p = math.nan
    if not 0.0 <= p <= 1.0:  # also NaN
        raise RuleError(f"rule {text!r}: probability needs a number in [0, 1], got {value!r}")
    return p


def _parse_action(word: str, text: str) -> Action:
    try:
        node = ast.parse(word if "(" in word else word + "()", mode="eval").body
    except SyntaxError:
        raise RuleError(f"rule {text!r}: cannot parse action {word!r}") from None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise RuleError(f"rule {text!r}: action must look like Name(args), got {word!r}")
    cls = ACTIONS.get(node.func.id)
    if cls is None:
        raise RuleError(
            f"rule {text!r}: unknown action {node.func.id!r}; known: {', '.join(ACTIONS)}"
        )
    try:
        args = [ast.literal_eval(a) for a in node.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise RuleError(f"rule {text!r}: arguments must be literals") from None
    if any(k.arg is None for k in node.keywords):
        raise RuleError(f"rule {text!r}: arguments must be literals, not **mappings")
    try:
        return cls(*args, **kwargs)
    except RuleError as exc:
        raise RuleError(f"rule {text!r}: {exc}") from None
    except (TypeError, ValueError, OverflowError) as exc:
        # A wrong argument count or keyword: the constructor's own words say which.
        raise RuleError(f"rule {text!r}: {exc}") from None


def as_rule(obj: Rule | Action | str) -> Rule:
    """*obj* as a :class:`Rule`: a rule as it is, an action for every message, or text.

    Anything else is a :class:`RuleError` saying what was given.
    """
    if isinstance(obj, Rule):
        return obj
    if isinstance(obj, Action):
        return obj.always()
    if isinstance(obj, str):
        return parse_rule(obj)
    raise RuleError(f"{obj!r} is not a rule (a Rule, an Action or a string)")
