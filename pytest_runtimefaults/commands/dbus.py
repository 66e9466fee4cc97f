"""``runtimefaults bus`` and ``runtimefaults proxy``: the D-Bus pieces, by hand."""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from pytest_runtimefaults.core.log import swallowed

RULE_HELP = """\
rules (--rule, repeatable) are ACTION(ARGS) [FIELD=VALUE ...]:
  actions: Delay(seconds, ordered=True)  Reorder(after=1)  SignalBeforeReply(signal='copy')
           SplitMessage(parts=2, pause=0.02)  StrayReply(answer='none')  FlipByteOrder()
           Drop()  Duplicate()  ErrorReply(name, text)  Disconnect(mid_message=False)
           Serials(start=0xfffffff0, on_overflow='stall'|'wrap'|'cycle', cycle_to=0x80000000)
           JobResult(result='failed', unit=None)
           SignalFlood(count=1000, signal='PropertiesChanged'|'JobRemoved'|'UnitNew', sender=None)
  fields:  direction=to_bus|to_client type=method_call|method_return|error|signal
           path= interface= member= error_name= sender= destination=
           reply_to=MEMBER (replies to calls of MEMBER), reply_to.FIELD=VALUE
           times=N  every=N  probability=P
  checks:  every time is seconds in [0, 86400]; probability in [0, 1]; a bad rule, an
           unwritable --pcap or an unreachable --upstream exits 2 with one line at start
examples:
  runtimefaults proxy --upstream unix:path=/tmp/b/bus --rule "Delay(0.5) reply_to=GetId"
  runtimefaults proxy --upstream ADDR --rule "SignalBeforeReply('JobRemoved') \\
      reply_to=StartTransientUnit" --pcap trace.pcap
"""


def register(subparsers: Any) -> None:
    bus = subparsers.add_parser(
        "bus", help="start a private dbus-daemon, print its address, run until interrupted"
    )
    bus.add_argument("--dir", default=None, help="parent directory of the bus's private dir")
    bus.set_defaults(func=_bus)
    proxy = subparsers.add_parser(
        "proxy",
        help="run the D-Bus fault proxy in front of ADDRESS until interrupted",
        epilog=RULE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    proxy.add_argument(
        "--upstream",
        required=True,
        metavar="ADDRESS",
        help="the D-Bus address to relay to (unix:path=... or unix:abstract=...)",
    )
    proxy.add_argument(
        "--listen",
        default=None,
        metavar="PATH",
        help="socket path to listen on (default: in a new private directory)",
    )
    proxy.add_argument(
        "--pcap",
        default=None,
        metavar="FILE",
        help="write every message relayed to FILE at exit (tshark -r FILE)",
    )
    proxy.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="RULE",
        help="a fault rule in text form (repeatable; see below)",
    )
    proxy.add_argument("--seed", type=int, default=0, help="seed of the rules' random choices")
    proxy.add_argument(
        "--allow-host-bus", action="store_true", help="allow fronting the host's system bus"
    )
    proxy.add_argument("--trace", action="store_true", help="print the whole trace at exit")
    proxy.set_defaults(func=_proxy)


def _stop_event() -> threading.Event:
    """An event set by SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _bus(args: argparse.Namespace) -> int:
    from pytest_runtimefaults.dbus.bus import BusError, PrivateBus

    stop = _stop_event()
    try:
        with PrivateBus(directory=args.dir) as bus:
            print(bus.address, flush=True)
            while not stop.wait(0.2):
                died = bus.exit_report()
                if died is not None:
                    # Running on without a daemon would leave the user's clients
                    # failing with no word of why.
                    print(f"runtimefaults bus: {died}", file=sys.stderr)
                    return 1
    except BusError as exc:
        print(f"runtimefaults bus: {exc}", file=sys.stderr)
        return 1
    return 0


def _refuse(message: str) -> int:
    print(f"runtimefaults proxy: {message}", file=sys.stderr)
    return 2


def _writable(path: str) -> str | None:
    """Why *path* cannot be written at exit, or None: checked at start, not at the end."""
    target = Path(path)
    existed = target.exists()
    try:
        with open(target, "ab"):
            pass
    except OSError as exc:
        return f"--pcap {path}: cannot write it: {exc.strerror or exc}"
    if not existed:
        with swallowed(OSError, "removing the probe of %s", target):
            target.unlink()
    return None


def _reachable(address: str) -> str | None:
    """Why the upstream *address* cannot be reached, or None (one probe connection)."""
    from pytest_runtimefaults.dbus.proxy import ProxyError, parse_address

    try:
        family, target = parse_address(address)
    except ProxyError as exc:
        return f"--upstream: {exc}"
    with socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(5)
        try:
            probe.connect(target)
        except OSError as exc:
            return f"--upstream {address}: cannot reach the bus: {exc.strerror or exc}"
    return None


def _proxy(args: argparse.Namespace) -> int:
    from pytest_runtimefaults.dbus.grammar import parse_rule
    from pytest_runtimefaults.dbus.match import RuleError
    from pytest_runtimefaults.dbus.proxy import DBusFaultProxy, ProxyError

    try:
        rules = [parse_rule(text) for text in args.rule]
    except RuleError as exc:
        return _refuse(str(exc))
    problem = (_writable(args.pcap) if args.pcap else None) or _reachable(args.upstream)
    if problem:
        return _refuse(problem)
    try:
        # The pcap is written here at exit, not by the proxy's stop(): a failed write
        # must not lose the summary or the trace.
        proxy = DBusFaultProxy(
            args.upstream,
            listen=args.listen,
            rules=rules,
            seed=args.seed,
            allow_host_bus=args.allow_host_bus,
        )
        proxy.start()
    except ProxyError as exc:
        return _refuse(str(exc))
    stop = _stop_event()
    told = 0  # errors already printed
    try:
        print(proxy.address, flush=True)
        for rule in proxy.rules:
            print(f"rule: {rule.describe()}", file=sys.stderr)
        while not stop.wait(0.2):
            told = _tell_errors(proxy.errors, told)
    finally:
        proxy.stop()
    status = 0
    if args.trace:
        print(proxy.trace.tail(len(proxy.trace)), file=sys.stderr)
    wrote = ""
    if args.pcap:
        try:
            proxy.trace.write_pcap(args.pcap)
            wrote = f", wrote {args.pcap}"
        except OSError as exc:
            print(f"runtimefaults proxy: cannot write {args.pcap}: {exc}", file=sys.stderr)
            status = 1
    # Faults the rules applied (each rule counts its own), not trace entries: errors
    # and rewriting notes are in the trace too.
    applied = sum(rule.applied for rule in proxy.rules)
    print(
        f"relayed {len(proxy.trace.messages())} messages, applied {applied} faults{wrote}",
        file=sys.stderr,
    )
    _tell_errors(proxy.errors, told)
    return status


def _tell_errors(errors: list[str], told: int) -> int:
    """Print the errors from index *told* on, as they happen; return how many were told."""
    for error in errors[told:]:
        print(f"error: {error}", file=sys.stderr, flush=True)
    return max(told, len(errors))
