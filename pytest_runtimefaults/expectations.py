"""What a runtime version is known to do under a fault: facts as data.

Each row of :data:`EXPECTATIONS` says what one component (``runc``, ``crun``,
``containerd``, ``podman``, ``dbus-daemon``, ``systemd``) did under one fault,
for a range of its versions, with the evidence.  A test or scenario asks
:func:`expected` and compares it with what it observed; a version no row
covers gives ``None``: the run is judged on its own merits, never xfailed on
a guess.

Example::

    >>> from pytest_runtimefaults import expectations as ex
    >>> ex.expected("runc", "1.1.5", "systemd:serial-overflow-stall")
    <Outcome.BLOCKS: 'blocks'>
    >>> ex.expected("runc", "9.0", "systemd:serial-overflow-stall") is None
    True
    >>> ex.parse_version("runc", "runc version 1.1.5+ds1\\ncommit: 1.1.5+ds1-1+deb12u1")
    Version(parts=(1, 1, 5))

Fault ids are ``family:what``; :data:`FAULTS` lists them with a sentence each.
A version spec is a comma-separated list of clauses, all of which must hold:
``1.1.5`` (that release and any ``1.1.5.x``), ``>=1.2``, ``<2``, ``>1``, ``<=3``.
"""

from __future__ import annotations

import enum
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ACCEPTABLE",
    "EXPECTATIONS",
    "FAULTS",
    "VERSION_COMMANDS",
    "Expectation",
    "Outcome",
    "Verdict",
    "Version",
    "environment",
    "expected",
    "find",
    "installed_version",
    "judge",
    "matches",
    "parse_version",
]


class Outcome(str, enum.Enum):
    """What a component did under a fault, from the user's side."""

    #: worked as if there were no fault (or recovered by itself within the test)
    SURVIVES = "survives"
    #: refused or failed with a clear error, within a bound, leaving nothing
    FAILS_CLEANLY = "fails_cleanly"
    #: waited with no bound: killed by the test's timeout
    BLOCKS = "blocks"
    #: left something behind (a unit, a process, an IPAM reservation, a snapshot)
    LEAKS = "leaks"
    #: kept running but gave a wrong result (lost or doubled events, the wrong
    #: network, a live instance's socket taken over)
    MISBEHAVES = "misbehaves"
    #: the daemon (or the runtime) died or panicked
    CRASHES = "crashes"


#: Every fault id a row may name, with what it is.
FAULTS: dict[str, str] = {
    "dbus:signal-before-reply": "a signal (a copy, or another unit's "
    "JobRemoved) written just before the StartTransientUnit reply",
    "dbus:split-reply": "the StartTransientUnit reply split into 3 writes with pauses",
    "dbus:split-jobremoved": "JobRemoved split into 3 writes",
    "dbus:delay-reply": "the StartTransientUnit reply delayed 1 s "
    "(in order, or overtaken by JobRemoved)",
    "dbus:delay-jobremoved": "JobRemoved delayed 2 s",
    "dbus:reorder": "the StartTransientUnit reply or JobRemoved swapped with the next message",
    "dbus:stray-reply": "a METHOD_RETURN answering an earlier call (or no call) delivered "
    "before the real StartTransientUnit reply",
    "dbus:duplicate-reply": "the StartTransientUnit reply delivered twice",
    "dbus:big-endian-reply": "the StartTransientUnit reply re-encoded big-endian (legal D-Bus)",
    "systemd:serial-overflow-stall": "systemd's serial reaches 0xffffffff and "
    "it sends nothing more (incident 2)",
    "systemd:serials-cycle": "systemd's serials continue at 0x80000000 "
    "past 0xffffffff (after systemd PR 11818)",
    "systemd:serials-wrap": "systemd's serials wrap to 1 past 0xffffffff",
    "systemd:real-cookie-overflow": "the sandboxed systemd's real sd-bus cookie set to "
    "0xfffffffc (systemd/cookie.py), so that its real serials cross 0xffffffff mid-lifecycle",
    "systemd:jobremoved-never-sent": "systemd answers StartTransientUnit "
    "but never sends JobRemoved",
    "systemd:cgroup-v1": "booted on a cgroup v1 (hybrid or legacy) hierarchy",
    # The neighbours of incident 2 (issue 15; tests/system/systemd/test_neighbours.py).
    "dbus:job-removed-result": "JobRemoved of the runtime's scope says failed, timeout, "
    "canceled or dependency though systemd made the scope (runc PR 2331, crun PR 331)",
    "systemd:unit-exists": "a live scope of the name the runtime asks for is already there "
    "(runc PR 1124, podman issue 15583, crun PR 348, systemd issue 6347)",
    "systemd:reexec-mid-call": "systemd re-executes with the runtime's StartTransientUnit "
    "in its socket, unanswered (systemd issue 27204)",
    "systemd:reexec-reply-held": "`systemctl daemon-reexec` while the proxy holds systemd's "
    "StartTransientUnit reply for 2 s",
    "socket:stale": "a socket file left by a killed instance at the daemon's socket path",
    "socket:live": "another live instance listening at the daemon's socket path",
    "socket:regular-file": "a regular file at the daemon's socket path",
    "socket:directory": "a directory at the daemon's socket path",
    "socket:symlink": "a symlink to a stale socket at the daemon's socket path",
    "daemon:sigkill": "the daemon SIGKILLed while a client talks to it",
    "daemon:sigkill-mid-run-restart": "containerd SIGKILLed at a seeded moment of `ctr "
    "run`, then restarted: does it serve again within 5 s?",
    "daemon:sigkill-shim": "containerd SIGKILLed after starting a "
    "task's shim, before recording the task",
    "daemon:stale-shim-socket": "a running task's shim SIGKILLed (its socket left), then "
    "containerd restarted: does it serve, report the task and run the ID again?",
    "cni:truncated-config": "a CNI network config file truncated (also empty or NUL-padded)",
    "cni:delete-recreate": "a CNI config file deleted and recreated while pods start",
    "cni:default-gone-at-del": "the pod's network file removed before the pod is stopped",
    "cni:wrong-version-config": "a CNI config file whose cniVersion the plugins do not support",
    "cni:broken-config-at-pod-start": "the only CNI config half-written when a pod starts "
    "(RunPodSandbox fails: what is left of the failed pod?)",
    "cni:config-written-in-place": "a network config created at its "
    "final name, not renamed into place",
    "cni:config-renamed-into": "a CNI config that appears in the conf dir only by a rename "
    "from outside it (one IN_MOVED_TO; containerd issue 11715)",
    "cni:conf-dir-swapped": "the CNI conf dir deleted and recreated (a new inode) with a new "
    "config (containerd issue 6490)",
    "cni:event-storm": "a burst of inotify events in the CNI conf dir (1.5 x "
    "fs.inotify.max_queued_events) while the daemon is frozen (SIGSTOP), so its queue "
    "overflows (containerd issue 5041's family)",
    "cni:inotify-instances-exhausted": "no inotify instance left to the daemon at start (its "
    "user namespace's max_inotify_instances all held; containerd issues 10468, 10308)",
    "subscribers:churn": "event subscribers connecting and leaving while events are broadcast",
    # The scenarios of incidents 3-5 (pytest_runtimefaults/scenarios/test_incident[345]_*).
    "socket:foreign-dir": "a stale socket in a directory owned by another user",
    "socket:open-dir": "a stale socket in a directory writable by everyone",
    "socket:abstract": "the daemon's abstract socket name (@name) held by another process",
    "socket:bind-mount": "a stale socket that a client bind-mounted elsewhere (the daemon "
    "must serve; the client's mount keeps the old inode)",
    "cni:held-half-written": "a CNI config file written in place and held half-written "
    "while a pod starts",
    "cni:racing-writer": "CNI config files rewritten in place in small chunks while pods start",
    "subscribers:daemon-restart": "the event daemon SIGKILLed and restarted while a "
    "churning subscriber swarm is connected",
    # The bus restarts under the runtime (runc PRs 2923, 3475; crun `sd-bus call:
    # Transport endpoint is not connected`): tests/system/systemd/test_bus_restart.py.
    "dbus:bus-restart-mid-call": "`systemctl restart dbus` in the sandbox while the "
    "runtime waits for the StartTransientUnit reply (held 1 s by the proxy)",
    "dbus:bus-restart-before-jobremoved": "`systemctl restart dbus` in the sandbox after "
    "the StartTransientUnit reply, while the runtime waits for JobRemoved (held 2 s)",
    # A bus at its limits (pytest_runtimefaults/dbus/limits.py;
    # tests/system/systemd/test_bus_limits.py).
    "dbus:connect-eagain": "the proxy in front of systemd's bus stops accepting with its "
    "listen backlog full for 2 s as create starts: connect() gets EAGAIN (systemd < 254's "
    "backlog of 128; opencontainers/cgroups PR 45, cri-o PR 4921, youki PR 3557)",
    "dbus:connection-cap": "the sandbox's bus capped at 8 connections per user and the cap "
    "reached: dbus-daemon answers root's next Hello with LimitsExceeded, dbus-broker (its "
    "fd quota) closes the connection in the handshake (podman PR 11313)",
    # A signal flood as the runtime closes (godbus issues 94, 158): dbus/flood.py,
    # tests/system/systemd/test_signal_flood.py.
    "dbus:signal-flood-jobremoved": "5000 forged JobRemoved of other jobs, from systemd's "
    "name, behind each real JobRemoved toward the runtime (create and delete), as it closes",
    "dbus:signal-flood-propertieschanged": "5000 forged PropertiesChanged of a unit, from "
    "systemd's name, behind each real JobRemoved toward the runtime (create and delete)",
    "dbus:signal-flood-before-jobremoved": "5000 forged JobRemoved of other jobs behind the "
    "StartTransientUnit reply: the runtime reads through them to its own JobRemoved",
    # CRI GetContainerEvents (transports/cri.py; tests/system/subscribers/test_subscribers_cri.py)
    "subscribers:cri-churn": "CRI GetContainerEvents subscribers connecting and leaving "
    "while pods and containers are made through CRI",
    "subscribers:cri-fan-out": "N concurrent CRI GetContainerEvents subscribers: does each "
    "get every pod and container event (cri-o 6466, containerd 7318)?",
    "subscribers:cri-daemon-restart": "containerd SIGKILLed and restarted under N CRI "
    "GetContainerEvents subscribers (kubernetes 129827)",
    "subscribers:cri-cancelled-stream": "CRI GetContainerEvents streams cancelled by their "
    "clients while no event comes: do the daemon's goroutines for them end?",
    "subscribers:cri-event-order": "one CRI GetContainerEvents subscriber, containers made "
    "one after another: does each container's CREATED, STARTED, STOPPED, DELETED arrive "
    "in the order the calls returned?",
    # netavark create/remove races (podman issues 7807, 7808, 9472, 9041):
    # pytest_runtimefaults/cni/churn.py, tests/system/cni/test_cni_netavark_races.py
    "cni:network-churn": "K workers racing `podman network create`/`rm`, `run --network` and "
    "`network ls` on owned, stable and shared names, each round lined up by a barrier: "
    "does any op meet ENOENT, `network not found` for a network that exists, or an IPAM "
    "conflict, and do ls, the files, containers, links and firewall agree afterwards?",
}


@dataclass(frozen=True, order=True)
class Version:
    """A dotted numeric version: ``Version.parse("1.1.5+ds1")`` -> ``(1, 1, 5)``."""

    parts: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> Version:
        """The leading ``N(.N)*`` of ``text``; a ValueError names the text otherwise."""
        m = re.match(r"\s*v?(\d+(?:\.\d+)*)", text)
        if m is None:
            raise ValueError(f"not a version: {text!r} (expected digits and dots, e.g. 1.1.5)")
        return cls(tuple(int(p) for p in m.group(1).split(".")))

    def __str__(self) -> str:
        return ".".join(map(str, self.parts))


def _compare(version: Version, op: str, bound: Version) -> bool:
    if op == "":  # "1.1.5": that release, and 1.1.5.x
        return version.parts[: len(bound.parts)] == bound.parts
    # Pad with zeros so that 1.1 == 1.1.0 in ordering comparisons.
    width = max(len(version.parts), len(bound.parts))
    a = version.parts + (0,) * (width - len(version.parts))
    b = bound.parts + (0,) * (width - len(bound.parts))
    return {">=": a >= b, "<=": a <= b, ">": a > b, "<": a < b, "==": a == b}[op]


def matches(version: Version | str, spec: str) -> bool:
    """Whether ``version`` satisfies every clause of ``spec`` (see the module doc)."""
    v = version if isinstance(version, Version) else Version.parse(version)
    for clause in spec.split(","):
        m = re.fullmatch(r"\s*(>=|<=|==|>|<)?\s*(\d+(?:\.\d+)*)\s*", clause)
        if m is None:
            raise ValueError(
                f"bad version clause {clause!r} in {spec!r}: use 1.1.5, >=1.2, <2 (comma-separated)"
            )
        if not _compare(v, m.group(1) or "", Version.parse(m.group(2))):
            return False
    return True


@dataclass(frozen=True)
class Expectation:
    """One known fact: ``component`` at ``versions`` under ``fault`` gives ``outcome``."""

    component: str
    versions: str
    fault: str
    outcome: Outcome
    evidence: str
    #: other outcomes seen for the same versions in some runs (a race in the
    #: component): observing one of them matches the row too
    also: tuple[Outcome, ...] = ()

    @property
    def outcomes(self) -> frozenset[Outcome]:
        """Every outcome this row accepts: :attr:`outcome` and :attr:`also`."""
        return frozenset((self.outcome, *self.also))

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault id {self.fault!r}: add it to FAULTS first")
        matches("0", self.versions)  # a malformed spec fails at import, not at lookup


#: tests/test_sockets_real.py passed per variant on Debian 12, 13 and sid
_SOCKETS = "tests/test_sockets_real.py on containerd 1.6.20/1.7.24/2.1.9, dbus 1.14.10/1.16.2"
_SOCKET_VERSIONS = (("containerd", ">=1.6.20,<2.2"), ("dbus-daemon", ">=1.14.10,<1.17"))

_SB = Outcome.SURVIVES
_FC = Outcome.FAILS_CLEANLY
_BL = Outcome.BLOCKS
_LK = Outcome.LEAKS
_MB = Outcome.MISBEHAVES

_DBUS_MESSAGE_FAULTS = (
    "dbus:signal-before-reply",
    "dbus:split-reply",
    "dbus:split-jobremoved",
    "dbus:delay-reply",
    "dbus:delay-jobremoved",
    "dbus:reorder",
)
_RUNTIME_PROXY = "tests/test_runtime_proxy.py, docs/systemd.md (Debian 12, systemd 252)"
_TRIXIE = (
    "tests/test_runtime_proxy.py in Debian 13 (scripts/distro, systemd 257.13), docs/matrix.md"
)
_SID = (
    "tests/system/systemd/test_runtime_proxy.py in Debian sid (scripts/distro, systemd 262.1, "
    "unified layout), docs/matrix.md"
)
_SID_SCENARIOS = "`runtimefaults scenarios --matrix sid` (systemd 262.1, unified), 2026-12-01"
#: (runtime, version, evidence) of the runs through the proxy to a real systemd
_MEASURED = (
    ("runc", "1.1.5", _RUNTIME_PROXY),
    ("crun", "1.8.1", _RUNTIME_PROXY),
    ("runc", "1.1.15", _TRIXIE),
    ("crun", "1.21", _TRIXIE),
    ("runc", "1.3.6", _SID),
    ("crun", "1.28", _SID),
)

_COOKIE = "tests/system/systemd/test_cookie.py, 2026-12-01"
#: (runtime, version, where) of the runs against a real cookie overflow (systemd/cookie.py)
_COOKIE_MEASURED = (
    ("runc", "1.1.5", "Debian 12, systemd 252.39"),
    ("crun", "1.8.1", "Debian 12, systemd 252.39"),
    ("runc", "1.1.15", "Debian 13, systemd 257.13"),
    ("crun", "1.21", "Debian 13, systemd 257.13"),
    ("runc", "1.3.6", "sid, systemd 262.1, unified"),
    ("crun", "1.28", "sid, systemd 262.1, unified"),
)
_NEIGHBOURS_HOST = "tests/system/systemd/test_neighbours.py on Debian 12 (systemd 252), 2026-12-01"
_NEIGHBOURS_TRIXIE = (
    "tests/system/systemd/test_neighbours.py in Debian 13 (scripts/distro, systemd 257.13, "
    "hybrid), 2026-12-01"
)
_NEIGHBOURS_SID = (
    "tests/system/systemd/test_neighbours.py in Debian sid (scripts/distro, systemd 262.1, "
    "unified), 2026-12-01"
)
#: (runtime, version, evidence) of the runs of the neighbours of incident 2
_NEIGHBOURS = (
    ("runc", "1.1.5", _NEIGHBOURS_HOST),
    ("crun", "1.8.1", _NEIGHBOURS_HOST),
    ("runc", "1.1.15", _NEIGHBOURS_TRIXIE),
    ("crun", "1.21", _NEIGHBOURS_TRIXIE),
    ("runc", "1.3.6", _NEIGHBOURS_SID),
    ("crun", "1.28", _NEIGHBOURS_SID),
)
_MID_CALL = "dbus:bus-restart-mid-call"
_BEFORE_JOB = "dbus:bus-restart-before-jobremoved"
_BUS_RESTART = {
    "host": "tests/system/systemd/test_bus_restart.py, Debian 12 (systemd 252, dbus-daemon "
    "1.14.10 and dbus-broker 33 alike), 2026-12-01",
    "trixie": "tests/system/systemd/test_bus_restart.py in Debian 13 (scripts/distro, "
    "systemd 257.13, dbus-daemon 1.16.2 and dbus-broker 37 alike), 2026-12-01",
    "sid": "tests/system/systemd/test_bus_restart.py in Debian sid (scripts/distro, "
    "systemd 262.1, unified, dbus-daemon 1.16.2 and dbus-broker 37 alike), 2026-12-01",
}
#: what the runtimes said, and what was left (nothing: the next lifecycle worked)
_RUNC_EOF = (
    "create fails at once, not retried: `unable to apply cgroup configuration: ... read "
    "unix @->PROXY: EOF` (godbus reports io.EOF, not the dbus.ErrClosed or Disconnected error "
    "runc's retry of PR 2923 looks for); nothing left, the next lifecycle works"
)
_RUNC_LOST_JOB = (
    "does not notice the closed connection: waits its full 30 s, then `Timeout waiting for "
    "systemd to create runc-ID.scope`; nothing left, the next lifecycle works"
)
_CRUN_RESET_CALL = (
    "create fails at once: `sd-bus call: Connection reset by peer`; nothing left, the "
    "next lifecycle works"
)
_CRUN_RESET_PROCESS = (
    "create fails at once: `sd-bus process: Connection reset by peer`; nothing left, the "
    "next lifecycle works"
)

_LIMITS = {
    "host": "tests/system/systemd/test_bus_limits.py, Debian 12 (systemd 252, dbus-daemon "
    "1.14.10), 2026-12-01",
    "trixie": "tests/system/systemd/test_bus_limits.py in Debian 13 (scripts/distro, "
    "systemd 257.13, hybrid; dbus-daemon 1.16.2, and dbus-broker 37 in debian13-broker), "
    "2026-12-01",
    "sid": "tests/system/systemd/test_bus_limits.py in Debian sid (scripts/distro, "
    "systemd 262.1, unified, dbus-daemon 1.16.2), 2026-12-01",
}
_EAGAIN = "dbus:connect-eagain"
_CAP = "dbus:connection-cap"
#: runc creates through systemd's private socket when the bus refuses it
_RUNC_PRIVATE = (
    "create succeeds (0.1-0.2 s; 1.3 s once on Debian 13, still under the 2 s) without a "
    "single call through the bus: consistent with go-systemd's NewWithContext, which for "
    "root falls back to systemd's own /run/systemd/private when the system bus fails; "
    "nothing left"
)
_CRUN_EAGAIN = (
    "create fails at once (0.01-0.09 s), no retry: `cannot open sd-bus: Resource temporarily "
    "unavailable`; nothing left, the next lifecycle works"
)
_CRUN_CAP = (
    "create fails at once: `sd-bus call: No buffer space available` (podman PR 11313's "
    "words: sd-bus maps LimitsExceeded to ENOBUFS); on dbus-broker (capped through its fd "
    "quota: the connection is closed in the handshake) `sd-bus call: Transport endpoint is "
    "not connected` or `cannot open sd-bus: Broken pipe`; nothing left, the next lifecycle "
    "works"
)
_LIMITS_ROWS: tuple[tuple[str, str, str, str, Outcome, str], ...] = (
    *(
        (rt, v, src, fault, outcome, what)
        for rt, v, src in (
            ("runc", "1.1.5", "host"),
            ("crun", "1.8.1", "host"),
            ("runc", "1.1.15", "trixie"),
            ("crun", "1.21", "trixie"),
            ("runc", "1.3.6", "sid"),
            ("crun", "1.28", "sid"),
        )
        for fault, outcome, what in (
            (
                (_EAGAIN, Outcome.SURVIVES, _RUNC_PRIVATE),
                (_CAP, Outcome.SURVIVES, _RUNC_PRIVATE),
            )
            if rt == "runc"
            else (
                (_EAGAIN, Outcome.FAILS_CLEANLY, _CRUN_EAGAIN),
                (_CAP, Outcome.FAILS_CLEANLY, _CRUN_CAP),
            )
        )
    ),
)
_FLOOD_FAULTS = (
    "dbus:signal-flood-jobremoved",
    "dbus:signal-flood-propertieschanged",
    "dbus:signal-flood-before-jobremoved",
)
_FLOOD = {
    "host": "tests/system/systemd/test_signal_flood.py, Debian 12 (systemd 252), 2026-12-01",
    "trixie": "tests/system/systemd/test_signal_flood.py in Debian 13 (scripts/distro, "
    "systemd 257.13, hybrid, dbus-daemon 1.16.2 and dbus-broker 37 alike), 2026-12-01",
    "sid": "tests/system/systemd/test_signal_flood.py in Debian sid (scripts/distro, "
    "systemd 262.1, unified), 2026-12-01",
}
#: (runtime, version, where) of the runs under a signal flood (dbus/flood.py)
_FLOOD_MEASURED = (
    ("runc", "1.1.5", "host"),
    ("crun", "1.8.1", "host"),
    ("runc", "1.1.15", "trixie"),
    ("crun", "1.21", "trixie"),
    ("runc", "1.3.6", "sid"),
    ("crun", "1.28", "sid"),
)

#: The known facts.  Sources: README "What it found here", docs/systemd.md,
#: docs/sockets.md, docs/cni.md, docs/subscribers.md, ../shared/HOST.md
#: ("Version differences seen").  A row per measured version: an untested
#: version has no row on purpose.
EXPECTATIONS: tuple[Expectation, ...] = (
    *(
        Expectation(rt, v, f, _SB, f"created, state created, deleted, nothing left; {src}")
        for rt, v, src in _MEASURED
        for f in _DBUS_MESSAGE_FAULTS
    ),
    Expectation(
        "runc",
        "1.1.5",
        "systemd:serial-overflow-stall",
        _BL,
        "gets the StartTransientUnit reply; JobRemoved, systemd's next message, never comes; "
        "after its 30 s wait calls ResetFailedUnit and waits for the reply with no timeout; "
        f"killed, leaves nothing; {_RUNTIME_PROXY}",
    ),
    Expectation(
        "crun",
        "1.8.1",
        "systemd:serial-overflow-stall",
        _BL,
        "gets the StartTransientUnit reply, then waits for JobRemoved with no timeout; killed, "
        f"leaves nothing; {_RUNTIME_PROXY}",
    ),
    *(
        Expectation(rt, v, f, _SB, f"lifecycle ok; {src}")
        for rt, v, src in _MEASURED
        for f in ("systemd:serials-cycle", "systemd:serials-wrap")
    ),
    *(
        Expectation(
            rt,
            v,
            "systemd:real-cookie-overflow",
            _SB,
            "create and delete ok while systemd's real cookie crossed 0xffffffff (its replies "
            f"to the runtime from 0x80000001 on), nothing left; {_COOKIE} ({release})",
        )
        for rt, v, release in _COOKIE_MEASURED
    ),
    *(
        Expectation(
            rt,
            v,
            "systemd:serial-overflow-stall",
            _BL,
            "still waiting at the test's 35 s bound (strict xfail held); killed, it left no "
            f"unit and no process; {_TRIXIE}",
        )
        for rt, v in (("runc", "1.1.15"), ("crun", "1.21"))
    ),
    Expectation(
        "runc",
        "1.3.6",
        "systemd:serial-overflow-stall",
        _BL,
        "still waiting at the test's 35 s bound; killed, it left no unit and no process; "
        f"{_SID}; the scenario's 10 s bound too, nothing left; {_SID_SCENARIOS}",
    ),
    Expectation(
        "crun",
        "1.28",
        "systemd:serial-overflow-stall",
        _BL,
        "still waiting at the test's 35 s bound; killed, it left no unit and no process; "
        f"{_SID}; in {_SID_SCENARIOS}: blocked at the 10 s bound, a `crun` process (its "
        "container's init) left for a few seconds. (A sandbox bus socket that vanished "
        "after the kill in early runs was another run's reaper: two scripts/distro runs "
        "of sid shared the rootfs's /run and /tmp, fixed since; not crun's doing.)",
    ),
    Expectation(
        "crun",
        "1.28",
        "systemd:jobremoved-never-sent",
        _BL,
        f"waits for JobRemoved with no timeout, killed at 45 s, nothing left; {_SID}",
    ),
    Expectation(
        "crun",
        "1.21",
        "systemd:jobremoved-never-sent",
        _BL,
        f"waits for JobRemoved with no timeout (strict xfail held); {_TRIXIE}",
    ),
    Expectation(
        "runc",
        "1.1.5",
        "systemd:jobremoved-never-sent",
        _FC,
        "fails after 30.1 s: `Timeout waiting for systemd to create runc-ID.scope`, nothing "
        f"left; {_RUNTIME_PROXY}; but blocked past the 45 s bound in about 1 run of 4 "
        "(2026-12-01, loaded 2-core host): an intermittent block, like 1.1.15's",
        also=(_BL,),
    ),
    Expectation(
        "runc",
        "1.1.15",
        "systemd:jobremoved-never-sent",
        _BL,
        "blocked in 3 of 6 runs (the others failed at 30 s); HOST.md, Debian 13, systemd 257; "
        "failed at 30.1 s in 2 of 2 runs of this branch's matrix: an intermittent block",
        also=(_FC,),
    ),
    Expectation(
        "runc",
        "1.3.6",
        "systemd:jobremoved-never-sent",
        _FC,
        "fails at its 30 s timeout; HOST.md, sid, systemd 262; but blocked past the 45 s "
        f"bound in 1 of 2 sid runs here (2026-12-01): an intermittent block; {_SID}",
        also=(_BL,),
    ),
    Expectation(
        "crun",
        "1.8.1",
        "systemd:jobremoved-never-sent",
        _BL,
        f"waits for JobRemoved with no timeout, killed at 45 s, nothing left; {_RUNTIME_PROXY}",
    ),
    Expectation(
        "systemd",
        "252",
        "systemd:cgroup-v1",
        _SB,
        "boots on the hybrid layout as PID 1 of its namespaces; HOST.md",
    ),
    Expectation(
        "systemd",
        "257",
        "systemd:cgroup-v1",
        _SB,
        "boots on the hybrid layout in 0.3-0.6 s, tainted `cgroupsv1`; HOST.md",
    ),
    Expectation(
        "systemd",
        ">=258",
        "systemd:cgroup-v1",
        _FC,
        "`Detected unsupported legacy cgroup hierarchy, refusing execution` (seen on 262; v1 "
        "support was removed in 258); printed only on a tty; HOST.md",
    ),
    # The socket variants (docs/sockets.md, tests/test_sockets_real.py).
    *(
        Expectation(d, v, "socket:stale", _SB, f"serves on it; docs/sockets.md, {_SOCKETS}")
        for d, v in _SOCKET_VERSIONS
    ),
    *(
        Expectation(
            d,
            v,
            "socket:live",
            _MB,
            f"serves: steals the live instance's socket; docs/sockets.md, {_SOCKETS}",
        )
        for d, v in _SOCKET_VERSIONS
    ),
    *(
        Expectation(
            d,
            v,
            "socket:symlink",
            _MB,
            f"serves: removes the symlink (not its target); docs/sockets.md, {_SOCKETS}",
        )
        for d, v in _SOCKET_VERSIONS
    ),
    Expectation(
        "containerd",
        ">=1.6.20,<2.2",
        "socket:regular-file",
        _MB,
        f"serves: deletes the file; docs/sockets.md, {_SOCKETS}",
    ),
    Expectation(
        "dbus-daemon",
        ">=1.14.10,<1.17",
        "socket:regular-file",
        _FC,
        "refuses: `Failed to bind socket ...: Address already in use` (misleading); "
        "docs/sockets.md",
    ),
    *(
        Expectation(d, v, "socket:directory", _FC, f"refuses: {msg}; docs/sockets.md")
        for d, v, msg in (
            (
                "containerd",
                ">=1.6.20,<2",
                "`failed to get listener for main endpoint: is a directory`",
            ),
            (
                "containerd",
                "2.1",
                "`failed to get listener for main endpoint: failed to create unix socket on "
                "PATH: is a directory`",
            ),
            ("dbus-daemon", ">=1.14.10,<1.17", "`Address already in use`"),
        )
    ),
    Expectation(
        "containerd",
        "1.6.20",
        "daemon:sigkill-shim",
        _LK,
        "restarts without knowing the shim, which keeps the ID taken until killed; "
        "tests/test_sockets_real.py",
    ),
    Expectation(
        "containerd",
        "1.6.20",
        "daemon:sigkill-mid-run-restart",
        _SB,
        "serves again well under a second after every kill; "
        "tests/system/sockets/test_sockets_real.py",
    ),
    Expectation(
        "containerd",
        "1.7",
        "daemon:sigkill-mid-run-restart",
        _SB,
        "serves again under a second after most kills, but once (1 kill of 9, the CI's "
        "Debian 13 run of 2026-12-01) 10.04 s: the restart waited on the interrupted run's "
        "shim (cf. containerd issues 10192 and 11292, a slow start over stale shims)",
        also=(_MB,),
    ),
    Expectation(
        "containerd",
        "2.1",
        "daemon:sigkill-mid-run-restart",
        _SB,
        "serves again under a second after every kill; sid-hybrid (scripts/distro)",
    ),
    Expectation(
        "containerd",
        "1.6.20",
        "daemon:stale-shim-socket",
        _SB,
        "a running task's shim SIGKILLed (containerd down, or up): serves again in 0.03-0.16 s, "
        "removes the stale socket, cleans the task up, the ID runs again; "
        "tests/system/sockets/test_containerd_shims.py, 2026-12-01",
    ),
    *(
        Expectation(
            "containerd",
            version,
            "daemon:stale-shim-socket",
            _SB,
            f"as 1.6.20: serves again in {took}, removes the stale socket, cleans the task "
            f"up, the ID runs again; tests/system/sockets/test_containerd_shims.py in {where}, "
            "2026-12-01",
        )
        for version, took, where in (
            ("1.7", "0.03-0.15 s", "Debian 13 (scripts/distro)"),
            ("2.1", "0.04-0.15 s", "sid-hybrid (scripts/distro)"),
        )
    ),
    Expectation(
        "containerd",
        "2.1",
        "daemon:sigkill-shim",
        _SB,
        "restarts without knowing the shim (listed as an orphan), but the ID is free: a "
        "new task with it starts; tests/system/sockets/test_sockets_real.py in sid with "
        "v1 controllers (scripts/distro --layout hybrid sid)",
    ),
    Expectation(
        "containerd",
        "1.7",
        "daemon:sigkill",
        _FC,
        "ctr: `error reading from server: EOF: unavailable`; HOST.md (Debian 13)",
    ),
    # CNI (docs/cni.md).
    Expectation(
        "podman",
        "4.3",
        "cni:truncated-config",
        _FC,
        "skips the file with a warning naming it; run on that network: rc 125 `network not "
        "found`; docs/cni.md",
    ),
    Expectation(
        "podman",
        "4.3",
        "cni:delete-recreate",
        _FC,
        "8 runs: 3 ok, 5 `network not found` (rc 125 or 127), no leak; docs/cni.md",
    ),
    Expectation(
        "podman",
        "4.3",
        "cni:config-written-in-place",
        _MB,
        "`podman network create` writes NAME.conflist at its final name: a concurrent reader "
        "can see it empty or partial; docs/cni.md",
    ),
    Expectation(
        "containerd",
        ">=1.6.20,<1.8",
        "cni:delete-recreate",
        _MB,
        "CRI: 11 of 20 pods came up on the bridge network instead of macvlan; docs/cni.md; "
        "the same test passed on 1.7.24 (Debian 13, docs/matrix.md)",
    ),
    Expectation(
        "containerd",
        ">=1.6.20,<1.8",
        "cni:wrong-version-config",
        _MB,
        "CRI: takes the file as its pod network (status ready); "
        "tests/test_cni_containerd.py on 1.6.20 and 1.7.24",
    ),
    Expectation(
        "containerd",
        "2.1",
        "cni:wrong-version-config",
        _FC,
        "CRI: network not ready, `plugin version does not allow STATUS` (2.x calls CNI "
        "STATUS, which needs cniVersion >= 1.1.0); sid run of docs/matrix.md.  The main "
        "job's scenario judges the same run misbehaved: no pod error names the broken file "
        "(test_wrong_version_config, sid-hybrid, 2.1.9)",
        also=(_MB,),
    ),
    Expectation(
        "containerd",
        ">=1.6.20,<1.8",
        "cni:broken-config-at-pod-start",
        _LK,
        "CRI: RunPodSandbox fails with `cni plugin not initialized` (naming no file); the "
        "failed sandbox stays listed NotReady with its network namespace until "
        "RemovePodSandbox; tests/system/cni/test_cni_containerd.py on 1.6.20 and 1.7.24",
    ),
    Expectation(
        "containerd",
        "2.1",
        "cni:broken-config-at-pod-start",
        _FC,
        "CRI: RunPodSandbox fails with `cni plugin not initialized`, and the failed sandbox "
        "is not kept (nothing listed, no namespace); sid run of docs/matrix.md",
    ),
    Expectation(
        "containerd",
        ">=1.6.20,<1.8",
        "cni:default-gone-at-del",
        _LK,
        "CRI: DEL runs against the new default network; the IPAM reservation stays; docs/cni.md; "
        "the same test passed on 1.7.24 (Debian 13, docs/matrix.md)",
    ),
    Expectation(
        "containerd",
        "2.1",
        "cni:default-gone-at-del",
        _LK,
        "CRI: the pod came up on macvlan, and after its network file was removed the "
        "StopPodSandbox's DEL left the IPAM reservation (test_network_file_gone_before_delete, "
        "sid-hybrid, 2.1.9)",
    ),
    Expectation(
        "containerd",
        "2.1",
        "cni:delete-recreate",
        _MB,
        "CRI: a pod came up on the bridge (veth) network instead of the recreated macvlan one, "
        "its IPAM reservation left (test_vanishing_config, sid-hybrid, 2.1.9)",
    ),
    # CNI reload races and inotify limits (docs/cni.md, "Reload races").
    *(
        Expectation(
            "containerd",
            v,
            "cni:config-renamed-into",
            _MB,
            "CRI skips fsnotify's Create, which a rename into the dir is: the file is never "
            "loaded (`no network config found`, or the old network kept) until another change; "
            f"tests/system/cni/test_cni_reload.py on {v}",
        )
        for v in ("1.6.20", "1.7.24", "2.1.9")
    ),
    *(
        Expectation(
            "containerd",
            v,
            "cni:conf-dir-swapped",
            _MB,
            "CRI's watch dies with the old inode: never reloaded (`no network config found` "
            "from the rmtree's last event) until restarted; "
            f"tests/system/cni/test_cni_reload.py on {v}",
        )
        for v in ("1.6.20", "1.7.24")
    ),
    Expectation(
        "containerd",
        "2.1.9",
        "cni:conf-dir-swapped",
        Outcome.CRASHES,
        "containerd exits: `Failed to run CRI service` error=`cni network conf monitor error: "
        "cni conf dir is removed, stop watching` (level=fatal, PR 10646); a restart loads the "
        "new dir; tests/system/cni/test_cni_reload.py in sid",
    ),
    *(
        Expectation(
            "containerd",
            v,
            "cni:event-storm",
            Outcome.CRASHES,
            "containerd exits within 1 s of the overflow: `failed to continue sync cni conf "
            f"change` error=`{msg}`, then level=fatal `Failed to run CRI service`; a restart "
            f"recovers; tests/system/cni/test_cni_reload.py on {v}",
        )
        for v, msg in (
            ("1.6.20", "fsnotify queue overflow"),
            ("1.7.24", "fsnotify: queue or buffer overflow"),
            ("2.1.9", "fsnotify: queue or buffer overflow"),
        )
    ),
    *(
        Expectation(
            "containerd",
            v,
            "cni:inotify-instances-exhausted",
            _MB,
            "keeps running without CRI (`unknown service runtime.v1.RuntimeService`); said "
            f"once, at level=warning: `failed to load plugin` ... `{msg}`; not back when the "
            f"instances are, only after a restart; tests/system/cni/test_cni_inotify.py on {v}",
        )
        for v, msg in (
            ("1.6.20", "failed to create fsnotify watcher: too many open files"),
            ("1.7.24", "failed to create fsnotify watcher: too many open files"),
            (
                "2.1.9",
                "failed to create fsnotify watcher: couldn't initialize inotify: too many "
                "open files",
            ),
        )
    ),
    Expectation(
        "containerd",
        "1.6.20",
        "subscribers:churn",
        _MB,
        "loses and doubles events (go-events' broadcaster removes a sink while ranging over "
        "its sinks); stays alive; docs/subscribers.md",
    ),
    Expectation(
        "containerd",
        "1.7",
        "subscribers:churn",
        _MB,
        "the go-events signature: events doubled among 2394 deliveries to 20 churning "
        "subscribers; stays alive; the main job's test_churning_swarm in Debian 13 (1.7.24)",
    ),
    Expectation(
        "containerd",
        "2.1",
        "subscribers:churn",
        _MB,
        "the same go-events signature, more often: 23 events lost and 25 doubled among 22273 "
        "deliveries, every lost event delivered twice elsewhere, and even the steady witness "
        "missed 2-5 of 504 lifecycle events; stays alive; tests/system/subscribers/"
        "test_subscribers_containerd.py in sid with v1 controllers (--layout hybrid)",
    ),
    # The scenarios of incidents 3-5 (pytest_runtimefaults/scenarios/test_incident[345]_*),
    # measured on Debian 12 (containerd 1.6.20, dbus 1.14.10) unless said otherwise.
    *(
        Expectation(d, v, f, o, f"{what}; {_SOCKETS}")
        for d, v in _SOCKET_VERSIONS
        for f, o, what in (
            (
                "socket:foreign-dir",
                _MB,
                "serves: unlinks a socket in a directory another user owns",
            ),
            ("socket:open-dir", _MB, "serves: unlinks a socket in a directory anyone can write"),
            (
                "socket:bind-mount",
                _SB,
                "serves; the client's bind mount of the old socket gets ECONNREFUSED (it keeps "
                "the old inode: mount the directory, not the socket)",
            ),
        )
    ),
    Expectation(
        "containerd",
        ">=1.6.20,<2.2",
        "socket:abstract",
        _FC,
        "refuses: `failed to get listener for main ttrpc endpoint: chmod @NAME.ttrpc: no such "
        f"file or directory` (it cannot listen on an abstract name at all); {_SOCKETS}",
    ),
    Expectation(
        "dbus-daemon",
        ">=1.14.10,<1.17",
        "socket:abstract",
        _FC,
        f'refuses: `Failed to bind socket "NAME": Address already in use`; {_SOCKETS}',
    ),
    Expectation(
        "containerd",
        "1.6.20",
        "daemon:sigkill",
        _FC,
        "`ctr events` in flight: `rpc error: code = Unavailable desc = transport is closing` at "
        "once; serves again 0.03-0.05 s after the kill over its stale socket, its running "
        "container re-adopted, the next `ctr run` fine; scenarios/test_incident3_sockets.py",
    ),
    Expectation(
        "dbus-daemon",
        "1.14.10",
        "daemon:sigkill",
        _FC,
        "a connected client reads EOF at once; serves again 0.01 s after the kill over its "
        "stale socket; scenarios/test_incident3_sockets.py",
    ),
    Expectation(
        "containerd",
        "1.6.20",
        "cni:truncated-config",
        _FC,
        "CRI: the pod network goes down (`cni plugin not initialized` for each pod, naming no "
        "file) while its status and log name the file: `failed to load CNI config list file "
        "PATH: unexpected end of JSON input`; pods start once it is whole; nothing left; "
        "scenarios/test_incident4_cni.py, tests/test_cni_containerd.py",
    ),
    Expectation(
        "containerd",
        "1.6.20",
        "cni:held-half-written",
        _FC,
        "CRI: as for a truncated file while it is held (status names it); pods start once it "
        "is completed; nothing left; scenarios/test_incident4_cni.py",
    ),
    Expectation(
        "containerd",
        ">=1.6.20,<2.2",
        "cni:racing-writer",
        _LK,
        "CRI: pods get macvlan or `cni plugin not initialized` (status names the torn file), "
        "never the bridge; but a pod stopped while its file is torn keeps its host-local "
        "reservation (DEL goes to the other network, as under cni:default-gone-at-del): 3 of 5 "
        "runs of scenarios/test_incident4_cni.py on 1.6.20, the others failed cleanly; on "
        "1.7.24 and 2.1.9 it failed cleanly in most runs and leaked in 1 of 3 (Debian 13, "
        "sid-hybrid); and once on 1.7.24 no file was torn as a pod started: all 4 pods on "
        "macvlan (survived)",
        also=(_FC, _SB),
    ),
    Expectation(
        "containerd",
        "1.6.20",
        "subscribers:daemon-restart",
        _MB,
        "every stream ends with a clear error (`Stream removed (Socket closed)`, then "
        "UNAVAILABLE while it is down) and every subscriber reconnects; serves again in 0.1 s; "
        "but the churn after the restart loses and doubles events as under subscribers:churn; "
        "4 of 4 runs of scenarios/test_incident5_subscribers.py",
    ),
    Expectation(
        "containerd",
        ">=1.7,<2.2",
        "subscribers:daemon-restart",
        _MB,
        "as on 1.6.20: every subscriber reconnects after the SIGKILL, and the churn after it "
        "doubles events (go-events); the main job in Debian 13 (1.7.24) and sid-hybrid (2.1.9)",
    ),
    # The neighbours of incident 2 (issue 15), tests/system/systemd/test_neighbours.py.
    *(
        Expectation(
            rt,
            v,
            "dbus:job-removed-result",
            _FC,
            f"create fails in < 0.3 s: ``error creating systemd unit `{rt}-ID.scope`: got "
            f"`failed` `` (and `timeout`, `canceled`, `dependency`); nothing left; {src}",
        )
        for rt, v, src in _NEIGHBOURS
    ),
    *(
        Expectation(
            rt,
            v,
            "systemd:reexec-mid-call",
            _FC,
            "create fails in 0.3-0.6 s with `Message recipient disconnected from message bus "
            f"without replying`, no retry (the new systemd answered 0.1-0.3 s later); nothing "
            f"left; {src}"
            + (
                "; but in 1 of 7 runs of scenarios/test_incident2_neighbours.py the next "
                "lifecycle right after the re-exec failed: ``creating cgroup directory "
                "`/sys/fs/c...` `` (crun or systemd 257's re-exec on hybrid: not told apart)"
                if (rt, v) == ("crun", "1.21")
                else ""
            ),
            also=(_MB,) if (rt, v) == ("crun", "1.21") else (),
        )
        for rt, v, src in _NEIGHBOURS
    ),
    *(
        Expectation(
            rt, v, "systemd:reexec-reply-held", _SB, f"created in 2.1 s, nothing left; {src}"
        )
        for rt, v, src in _NEIGHBOURS
    ),
    *(
        Expectation(
            "crun",
            v,
            "systemd:unit-exists",
            _FC,
            "create fails at once: `sd-bus call: Unit crun-ID.scope was already loaded or has a "
            f"fragment file.: File exists`; the leftover and its process untouched; {src}",
        )
        for rt, v, src in _NEIGHBOURS
        if rt == "crun"
    ),
    Expectation(
        "runc",
        "1.1.5",
        "systemd:unit-exists",
        _MB,
        "create succeeds with the container's init put into the leftover scope, beside its "
        "process (UnitExists taken for its own unit, runc PR 1124); `delete` stops the scope, "
        f"killing that process; {_NEIGHBOURS_HOST}",
    ),
    Expectation(
        "runc",
        "1.1.15",
        "systemd:unit-exists",
        _MB,
        "create fails: `unable to apply cgroup configuration: Unit runc-ID.scope was already "
        "loaded or has a fragment file.`, and its cleanup stops the leftover scope, killing "
        f"its process; {_NEIGHBOURS_TRIXIE}",
    ),
    Expectation(
        "runc",
        "1.3.6",
        "systemd:unit-exists",
        _FC,
        "create fails at once: `container's cgroup is not empty: 1 process(es) found` (it "
        "takes the existing scope, then refuses its non-empty cgroup); the leftover and its "
        f"process untouched; {_NEIGHBOURS_SID}",
    ),
    # The bus restarted under the runtime (tests/system/systemd/test_bus_restart.py),
    # on dbus-daemon and dbus-broker alike.
    *(
        Expectation(rt, v, fault, outcome, f"{what}; {_BUS_RESTART[src]}")
        for rt, v, src, fault, outcome, what in (
            ("runc", "1.1.5", "host", _MID_CALL, _FC, _RUNC_EOF),
            ("runc", "1.1.5", "host", _BEFORE_JOB, _FC, _RUNC_LOST_JOB),
            ("crun", "1.8.1", "host", _MID_CALL, _FC, _CRUN_RESET_CALL),
            ("crun", "1.8.1", "host", _BEFORE_JOB, _FC, _CRUN_RESET_PROCESS),
            ("runc", "1.1.15", "trixie", _MID_CALL, _FC, _RUNC_EOF),
            ("runc", "1.1.15", "trixie", _BEFORE_JOB, _FC, _RUNC_LOST_JOB),
            ("crun", "1.21", "trixie", _MID_CALL, _FC, _CRUN_RESET_CALL),
            ("crun", "1.21", "trixie", _BEFORE_JOB, _FC, _CRUN_RESET_PROCESS),
            ("runc", "1.3.6", "sid", _MID_CALL, _FC, _RUNC_EOF),
            ("runc", "1.3.6", "sid", _BEFORE_JOB, _FC, _RUNC_LOST_JOB),
            ("crun", "1.28", "sid", _MID_CALL, _FC, _CRUN_RESET_CALL),
            ("crun", "1.28", "sid", _BEFORE_JOB, _FC, _CRUN_RESET_PROCESS),
        )
    ),
    # A bus at its limits (tests/system/systemd/test_bus_limits.py): connect() gets EAGAIN
    # for 2 s; the per-user connection cap reached (dbus-daemon only).
    *(
        Expectation(rt, v, fault, outcome, f"{what}; {_LIMITS[src]}")
        for rt, v, src, fault, outcome, what in _LIMITS_ROWS
    ),
    # A signal flood as the runtime closes (tests/system/systemd/test_signal_flood.py):
    # every version reads past 5000 forged signals, or exits with them unread, unharmed.
    *(
        Expectation(
            rt,
            v,
            fault,
            _SB,
            f"created in 0.03-0.42 s and deleted, the forged signals ignored, nothing left, "
            f"the next lifecycle ok; another client of the proxy answered in < 0.25 s "
            f"throughout; {_FLOOD[src]}",
        )
        for rt, v, src in _FLOOD_MEASURED
        for fault in _FLOOD_FAULTS
    ),
    # CRI GetContainerEvents (transports/cri.py), measured with
    # tests/system/subscribers/test_subscribers_cri.py in Debian 13 and sid-hybrid;
    # containerd 1.6 has no GetContainerEvents (UNIMPLEMENTED: the tests skip).
    Expectation(
        "containerd",
        "1.7",
        "subscribers:cri-fan-out",
        _MB,
        "one channel for every caller (containerd issue 7318, fixed by PR 9661 in 2.0): each "
        "event goes to one subscriber only; 8 subscribers + witness, 74 events made, 73-77 "
        "deliveries in all (priming included), each subscriber missing up to 66 of them",
    ),
    Expectation(
        "containerd",
        "1.7",
        "subscribers:cri-churn",
        _MB,
        "as under subscribers:cri-fan-out, and worse: an event taken by a stream being "
        "cancelled is lost for everyone; 98 events made, 36-58 deliveries in all among 21 "
        "callers; the witness and the 5 steady subscribers each miss most of them (in one "
        "run 77 of the 98 reached none of these 6)",
    ),
    Expectation(
        "containerd",
        "1.7",
        "subscribers:cri-daemon-restart",
        _MB,
        "the kill ends every stream cleanly (`UNAVAILABLE: Stream removed (Socket closed)`, "
        "then `UNAVAILABLE: failed to connect to all addresses; ... connect failed` while it "
        "is down), every subscriber reconnects and no panic; but after the restart the events "
        "are dealt out as under subscribers:cri-fan-out (each of 9 missed 33-50 of 50)",
    ),
    Expectation(
        "containerd",
        "2.1",
        "subscribers:cri-fan-out",
        _SB,
        "each of 8 subscribers and the witness got every event the daemon sent, once, in "
        "order (624-640 deliveries of 74 events made); in 2 of 3 runs 1-2 containers' "
        "STOPPED reached nobody at all (subscribers:cri-event-order)",
    ),
    Expectation(
        "containerd",
        "2.1",
        "subscribers:cri-churn",
        _SB,
        "20 subscribers, 222 connections, 202 cancels, 1770 deliveries: no gap, duplicate or "
        "reordering against the witness; the witness and the 5 steady ones got all 98 events",
    ),
    Expectation(
        "containerd",
        "2.1",
        "subscribers:cri-daemon-restart",
        _FC,
        "every stream ends with `UNAVAILABLE: Stream removed (Socket closed)`, reconnects "
        "are refused (`UNAVAILABLE: failed to connect to all addresses; ... connect failed`) "
        "until it serves again, then each of 9 subscribers got all 50 events made after it "
        "reconnected; no panic in either instance's log; but in 1 of 3 sid-hybrid runs of "
        "2026-12-01, 3 of the 9 reconnected subscribers got none of the 50 events "
        "(misbehaves, intermittent)",
        also=(_MB,),
    ),
    Expectation(
        "containerd",
        "1.7",
        "subscribers:cri-cancelled-stream",
        _LK,
        "each cancelled stream keeps its goroutine (consistent with a loop over the shared "
        "event channel that never looks at the stream's context): 50 streams cancelled, "
        "+50 goroutines 10 s later, still +42 after one pod's 12 events; each event one of "
        "them takes is lost for every live subscriber (the churn losses of "
        "subscribers:cri-churn); fds are freed",
    ),
    Expectation(
        "containerd",
        "2.1",
        "subscribers:cri-cancelled-stream",
        _LK,
        "a cancelled stream's goroutine waits for the next broadcast: 50 streams cancelled, "
        "+50 goroutines 10 s later, +0 once one pod's 12 events were sent; fds are freed "
        "at once. Bounded by the event rate, but a node with no container churn holds them",
    ),
    Expectation(
        "containerd",
        "1.7",
        "subscribers:cri-event-order",
        _MB,
        "a container's STOPPED often comes after its DELETED although StopContainer returned "
        "before RemoveContainer was called: 0-3 of 10 containers per run (2-3 in 2 of 3 runs, "
        "1 in 3 later runs), a pod sandbox's STOPPED after its DELETED too; none in some "
        "runs (consistent with the exit handler sending STOPPED after it released "
        "StopContainer's wait; not read in the source)",
        also=(_SB,),
    ),
    Expectation(
        "containerd",
        "2.1",
        "subscribers:cri-event-order",
        _MB,
        "the same race, rarer: 1 of 10 containers' STOPPED after its DELETED in 1 of 3 runs; "
        "and a container's STOPPED may never be sent: 1-2 of 18 containers in 2 of 3 fan-out "
        "runs reached none of 9 subscribers",
        also=(_SB,),
    ),
    # netavark create/remove races (docs/cni.md, "netavark create/remove races"):
    # 10 churns of 4 workers x 10 rounds per release, tests/system/cni/test_cni_netavark_races.py
    *(
        Expectation(
            "podman",
            version,
            "cni:network-churn",
            _SB,
            f"podman {version} + netavark {netavark} ({where}): no race in 400 commands "
            f"(0 ENOENT, 0 `network not found` for a network that exists, 0 IPAM conflicts), "
            f"{refused} correct refusals on the shared names, ls and files consistent and "
            "nothing left in 10 of 10 churns; a list-then-open reader of the dir failed in "
            "10 of 10, a reader taking podman's netavark.lock in none; docs/cni.md",
        )
        for version, netavark, where, refused in (
            ("4.3", "1.4.0", "Debian 12", 78),
            ("5.4", "1.14.0", "Debian 13, scripts/distro", 76),
            ("5.8", "1.17.2", "sid-hybrid, scripts/distro", 77),
        )
    ),
)


def find(component: str, version: Version | str, fault: str) -> Expectation | None:
    """The first row for ``component`` at ``version`` under ``fault``, or None.

    A fault id not in :data:`FAULTS` raises ValueError (a typo would otherwise
    read as "unknown version" forever).
    """
    if fault not in FAULTS:
        raise ValueError(f"unknown fault id {fault!r}; known: {', '.join(sorted(FAULTS))}")
    v = version if isinstance(version, Version) else Version.parse(version)
    for row in EXPECTATIONS:
        if row.component == component and row.fault == fault and matches(v, row.versions):
            return row
    return None


def expected(component: str, version: Version | str | None, fault: str) -> Outcome | None:
    """What ``component`` at ``version`` is known to do under ``fault``; None if unknown.

    ``None`` for the version (it could not be read) is unknown too.
    """
    if version is None:
        return None
    row = find(component, version, fault)
    return row.outcome if row is not None else None


@dataclass(frozen=True)
class Verdict:
    """What :func:`judge` concluded about one observation."""

    component: str
    version: Version | None
    fault: str
    observed: Outcome
    row: Expectation | None
    ok: bool
    message: str

    def as_dict(self) -> dict[str, str | bool | None]:
        """For a report: plain strings."""
        return {
            "component": self.component,
            "version": str(self.version) if self.version is not None else None,
            "fault": self.fault,
            "observed": self.observed.value,
            "expected": self.row.outcome.value if self.row is not None else None,
            "ok": self.ok,
            "message": self.message,
        }


#: What an unknown version must do to pass on its own merits: recover, or fail
#: within a bound leaving nothing behind.
ACCEPTABLE = frozenset({Outcome.SURVIVES, Outcome.FAILS_CLEANLY})


def judge(
    component: str, version: Version | str | None, fault: str, observed: Outcome, detail: str = ""
) -> Verdict:
    """Compare what a run observed with what the table knows.

    * a row covers the version: ``ok`` when the observation is one of the
      row's outcomes (a known defect seen again is a finding, not a failure);
      otherwise the component changed: ``ok`` is False and the message says
      to update the row;
    * no row: judged on its own merits, ``ok`` only for
      :data:`ACCEPTABLE` outcomes.

    Example::

        >>> judge("runc", "1.1.5", "systemd:serial-overflow-stall", Outcome.BLOCKS).ok
        True
        >>> judge("runc", "9.0", "systemd:serial-overflow-stall", Outcome.BLOCKS).ok
        False
    """
    v = version if isinstance(version, Version) or version is None else Version.parse(version)
    row = find(component, v, fault) if v is not None else None
    name = f"{component} {v if v is not None else '(version unknown)'}"
    tail = f": {detail}" if detail else ""
    if row is not None:
        ok = observed in row.outcomes
        known = "/".join(sorted(o.value for o in row.outcomes))
        if ok:
            message = f"{name} {observed.value} under {fault}, as known ({row.evidence}){tail}"
        else:
            message = (
                f"{name} {observed.value} under {fault}, but it is known to {known} "
                f"({row.evidence}){tail}: if the component changed, update its row in "
                "pytest_runtimefaults/expectations.py"
            )
    else:
        ok = observed in ACCEPTABLE
        message = (
            f"{name} {observed.value} under {fault} (no row in expectations: judged on its "
            f"own merits, which asks survives or fails_cleanly){tail}"
        )
    return Verdict(component, v, fault, observed, row, ok, message)


#: How to ask each component its version.
VERSION_COMMANDS: dict[str, list[str]] = {
    "runc": ["runc", "--version"],
    "crun": ["crun", "--version"],
    "containerd": ["containerd", "--version"],
    "podman": ["podman", "--version"],
    "systemd": ["systemctl", "--version"],
    "dbus-daemon": ["dbus-daemon", "--version"],
}

#: A pattern per component over its ``--version`` output; group 1 is the version.
_VERSION_PATTERNS: dict[str, str] = {
    # "runc version 1.1.5+ds1"
    "runc": r"^runc version v?(\d+(?:\.\d+)+)",
    # "crun version 1.8.1"
    "crun": r"^crun version (\d+(?:\.\d+)+)",
    # "containerd github.com/containerd/containerd/v2 2.1.9~ds1 2.1.9~ds1-1"
    "containerd": r"^containerd \S+ v?(\d+(?:\.\d+)+)",
    # "podman version 4.3.1"
    "podman": r"^podman version (\d+(?:\.\d+)+)",
    # "systemd 252 (252.39-1~deb12u1)": the full version in brackets when given
    "systemd": r"^systemd (?:\d+ \((\d+(?:\.\d+)*)|(\d+))",
    # "D-Bus Message Bus Daemon 1.14.10"
    "dbus-daemon": r"^D-Bus Message Bus Daemon (\d+(?:\.\d+)+)",
}


def parse_version(component: str, output: str) -> Version | None:
    """The version in ``component``'s ``--version`` output, or None if it has none.

    An unknown component raises ValueError naming the known ones.
    """
    try:
        pattern = _VERSION_PATTERNS[component]
    except KeyError:
        raise ValueError(
            f"no version parser for {component!r}; known: {', '.join(sorted(_VERSION_PATTERNS))}"
        ) from None
    m = re.search(pattern, output, re.MULTILINE)
    if m is None:
        return None
    return Version.parse(next(g for g in m.groups() if g))


def installed_version(component: str, executable: str | None = None) -> Version | None:
    """Run ``component``'s version command (or ``executable --version``) and parse it.

    None if the program is not installed or prints no version.
    """
    argv = [executable, "--version"] if executable else VERSION_COMMANDS[component]
    if shutil.which(argv[0]) is None:
        return None
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_version(component, res.stdout + res.stderr)


def environment() -> dict[str, str | None]:
    """The versions of every component here, for the JSON report's ``environment``.

    ``{"runc": "1.1.5", "systemd": "252.39", ..., "python": "3.11.2",
    "kernel": "6.1.0-...", "distro": "trixie"}``; None for a component not
    installed.  ``distro`` is ``RUNTIMEFAULTS_DISTRO`` (set by scripts/distro)
    or the host's ``VERSION_CODENAME``.
    """
    env: dict[str, str | None] = {}
    for component in VERSION_COMMANDS:
        version = installed_version(component)
        env[component] = str(version) if version is not None else None
    env["python"] = platform.python_version()
    env["kernel"] = platform.release()
    env["distro"] = os.environ.get("RUNTIMEFAULTS_DISTRO") or _codename()
    return env


def _codename() -> str | None:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return None
    m = re.search(r"^VERSION_CODENAME=\"?([^\"\n]*)", text, re.MULTILINE)
    return m.group(1) if m and m.group(1) else None
