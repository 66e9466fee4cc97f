"""``runtimefaults bus`` and ``runtimefaults proxy``: the D-Bus pieces, by hand."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

RULE_HELP = """\
rules (--rule, repeatable) are ACTION(ARGS) [FIELD=VALUE ...]:
  actions: Delay(seconds, ordered=True)  Reorder(after=1)  SignalBeforeReply(signal='copy')
           SplitMessage(parts=2, pause=0.02)  StrayReply(answer='none')  FlipByteOrder()
           Drop()  Duplicate()  ErrorReply(name, text)  Disconnect(mid_message=False)
           Serials(start=0xfffffff0, on_overflow='stall'|'wrap'|'cycle')
  fields:  direction=to_bus|to_client type=method_call|method_return|error|signal
           path= interface= member= error_name= sender= destination=
           reply_to=MEMBER (replies to calls of MEMBER), reply_to.FIELD=VALUE
           times=N  every=N  probability=P
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


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass


def _bus(args: argparse.Namespace) -> int:
    from pytest_runtimefaults.dbus.bus import BusError, PrivateBus

    try:
        with PrivateBus(directory=args.dir) as bus:
            print(bus.address, flush=True)
            _wait_for_signal()
    except BusError as exc:
        print(f"runtimefaults bus: {exc}", file=sys.stderr)
        return 1
    return 0


def _proxy(args: argparse.Namespace) -> int:
    from pytest_runtimefaults.dbus.proxy import DBusFaultProxy, ProxyError
    from pytest_runtimefaults.dbus.rules import RuleError, parse_rule

    try:
        rules = [parse_rule(text) for text in args.rule]
        proxy = DBusFaultProxy(
            args.upstream,
            listen=args.listen,
            rules=rules,
            seed=args.seed,
            allow_host_bus=args.allow_host_bus,
            pcap=args.pcap,
        )
        proxy.start()
    except (RuleError, ProxyError) as exc:
        print(f"runtimefaults proxy: {exc}", file=sys.stderr)
        return 2
    try:
        print(proxy.address, flush=True)
        for rule in proxy.rules:
            print(f"rule: {rule.describe()}", file=sys.stderr)
        _wait_for_signal()
    finally:
        proxy.stop()
    if args.trace:
        print(proxy.trace.tail(len(proxy.trace)), file=sys.stderr)
    faults = proxy.trace.faults()
    print(
        f"relayed {len(proxy.trace.messages())} messages, applied {len(faults)} faults"
        + (f", wrote {args.pcap}" if args.pcap else ""),
        file=sys.stderr,
    )
    for error in proxy.errors:
        print(f"error: {error}", file=sys.stderr)
    return 0
