"""Deprecated home of the D-Bus rules: every name it had, re-exported for one release.

The rules are now split by concern (docs/design.md):

* :mod:`~pytest_runtimefaults.dbus.match`: :class:`Match`, :class:`RuleError`;
* :mod:`~pytest_runtimefaults.dbus.actions`: :class:`Action`, the one-shot actions,
  :class:`Rule`, :class:`Output` and the :class:`Context` actions see;
* :mod:`~pytest_runtimefaults.dbus.serials`: :class:`Serials`, the serial rewriter;
* :mod:`~pytest_runtimefaults.dbus.grammar`: :func:`parse_rule`, :data:`ACTIONS`;
* :mod:`~pytest_runtimefaults.dbus.engine`: :class:`FaultEngine`.

Import from those (or from ``pytest_runtimefaults``); this module holds no code.

Example::

    from pytest_runtimefaults.dbus.actions import Delay  # was: ...dbus.rules import Delay
"""

from __future__ import annotations

from pytest_runtimefaults.dbus.actions import (
    Action,
    Context,
    Delay,
    Disconnect,
    Drop,
    Duplicate,
    ErrorReply,
    FlipByteOrder,
    JobResult,
    Output,
    Reorder,
    Rule,
    SignalBeforeReply,
    SplitMessage,
    StrayReply,
)
from pytest_runtimefaults.dbus.engine import SYNTH_SERIAL_BASE, FaultEngine
from pytest_runtimefaults.dbus.grammar import ACTIONS, parse_rule
from pytest_runtimefaults.dbus.match import Match, RuleError
from pytest_runtimefaults.dbus.serials import Serials

__all__ = [
    "ACTIONS",
    "SYNTH_SERIAL_BASE",
    "Action",
    "Context",
    "Delay",
    "Disconnect",
    "Drop",
    "Duplicate",
    "ErrorReply",
    "FaultEngine",
    "FlipByteOrder",
    "JobResult",
    "Match",
    "Output",
    "Reorder",
    "Rule",
    "RuleError",
    "Serials",
    "SignalBeforeReply",
    "SplitMessage",
    "StrayReply",
    "parse_rule",
]
