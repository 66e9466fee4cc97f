"""A real cookie overflow in a real systemd: find sd-bus's ``cookie`` by value and set it.

Incident 2 (FAULTS.md) was found by pushing systemd's ``bus->cookie`` near
0xffffffff with gdb.  No debug symbols are reachable here, but the cookie is a
``uint64_t`` in systemd's memory that holds the serial of the last message
systemd sealed on that connection, so it can be found by value:

1. a client on the sandbox's system bus calls systemd and reads the serial *s*
   of its reply: that connection's cookie is now *s*;
2. every 8-byte aligned word equal to *s* in systemd's writable mappings
   (``/proc/PID/maps``, read through ``/proc/PID/mem``) is a candidate;
3. rounds of calls follow, each chosen to shake off one kind of impostor:
   plain calls (words that do not advance), a different method (stale copies
   of the last cookie on systemd's stack), and calls flagged
   NO_REPLY_EXPECTED before one that is answered (counters of *received*
   messages); after each round only the words equal to the new last reply
   serial stay;
4. when exactly one word is left it is the cookie of the ``sd_bus`` of
   systemd's connection to the system bus (the one clients see).  Its other
   connections (``/run/systemd/private``, one ``sd_bus`` each) have cookies
   of their own that our calls do not move.

Nothing is stopped: every read happens between our own calls, while systemd
waits for the next message, and the only write is the one 8-byte word found,
in the process of a :class:`~pytest_runtimefaults.systemd.SystemdSandbox`
the caller owns (never the host's PID 1, never a process outside a PID
namespace of its own).

What systemd does past 0xffffffff (systemd PR 11818, in every release of the
matrix: 252, 257, 262), read in its sd-bus.c: ``cookie_inc()`` returns
0x80000000 for any cookie >= 0xffffffff, and once the high bit is set
``next_cookie()`` skips cookies that one of systemd's *own* method calls on
that connection still awaits a reply for (its ``reply_callbacks``).  So the
serials a client sees are ``..., 0xfffffffe, 0xffffffff, 0x80000000,
0x80000001, ...``: the same sequence as ``Serials(on_overflow="cycle")``.
The pre-fix failure (``sd_bus_message_seal()`` -> EOPNOTSUPP, the stall) can
not be had from these releases by any value: ``cookie_inc()`` clamps even a
value past 2^32.  ``Serials(on_overflow="stall")`` stays the way to
reproduce it.

Example::

    with SystemdSandbox() as sd, RealCookieOverflow(sd) as fault:
        ...  # systemd's next reply serials: 0xfffffff1 ... 0xffffffff, 0x80000000 ...
        print(fault.word)
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pytest_runtimefaults.core.fault import FaultBase
from pytest_runtimefaults.core.log import logger, swallowed
from pytest_runtimefaults.systemd.errors import SandboxError

if TYPE_CHECKING:
    from jeepney.io.blocking import DBusConnection
    from jeepney.low_level import Message

    from pytest_runtimefaults.systemd.sandbox import SystemdSandbox

__all__ = [
    "COOKIE_CYCLED",
    "CookieNotFound",
    "CookieWord",
    "RealCookieOverflow",
    "find_cookie",
    "next_cookie",
]

COOKIE_CYCLED = 0x80000000
"""Where systemd's cookie continues past 0xffffffff (sd-bus's ``COOKIE_CYCLED``)."""

UINT32_MAX = 0xFFFFFFFF
DEFAULT_VALUE = 0xFFFFFFF0  # the next message gets 0xfffffff1: 15 more before the boundary
SYSTEMD1 = "org.freedesktop.systemd1"
_PATH = "/org/freedesktop/systemd1"
_MAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \d+\s*(.*)$")
_CHUNK = 1 << 20  # bytes read at once from /proc/PID/mem


class CookieNotFound(SandboxError):
    """The finder could not narrow systemd's memory down to one cookie word."""


def next_cookie(cookie: int, in_use: frozenset[int] | set[int] = frozenset()) -> int:
    """The cookie systemd's sd-bus (PR 11818 and later) gives the message after *cookie*.

    *in_use*: cookies of systemd's own method calls on that connection still
    awaiting a reply; skipped once the high bit is set, as sd-bus does.
    A model of systemd's arithmetic, for comparing it with what the real one
    sends (the tests do).

    >>> hex(next_cookie(0xFFFFFFFE)), hex(next_cookie(0xFFFFFFFF))
    ('0xffffffff', '0x80000000')
    >>> hex(next_cookie(0xFFFFFFFF, {0x80000000}))
    '0x80000001'
    """

    def inc(c: int) -> int:
        return COOKIE_CYCLED if c >= UINT32_MAX else c + 1

    new = inc(cookie)
    if new & COOKIE_CYCLED:
        for _ in range(COOKIE_CYCLED):
            if new not in in_use:
                return new
            new = inc(new)
        raise RuntimeError("every cycled cookie is in use")  # sd-bus: -EBUSY
    return new


@dataclass(frozen=True)
class Region:
    """One writable mapping of a process."""

    start: int
    end: int
    name: str


@dataclass
class CookieWord:
    """Where systemd keeps the cookie of its system-bus connection, and what the finder saw."""

    pid: int
    address: int
    region: str
    """The mapping it lies in (``[heap]`` in every boot seen so far)."""
    value: int
    """Its value when it was found (the serial of systemd's last reply to the finder)."""
    rounds: list[int] = field(default_factory=list)
    """Candidates left after the first scan and after each round."""
    seconds: float = 0.0

    def __str__(self) -> str:
        left = " -> ".join(map(str, self.rounds))
        return (
            f"systemd {self.pid}: cookie at {self.address:#x} ({self.region}) = {self.value:#x}; "
            f"candidates {left}; found in {self.seconds * 1000:.1f} ms"
        )


# -- the process: checks, maps, reads and the one write ---------------------------------------


def _ns(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def check_sandbox_systemd(sandbox: SystemdSandbox) -> int:
    """The host PID of *sandbox*'s systemd, after checking that it is one.

    Refuses (:class:`SandboxError`) anything but a running
    :class:`~pytest_runtimefaults.systemd.SystemdSandbox` whose PID 1 is a
    ``systemd`` in a PID namespace other than ours: the host's systemd (or a
    ``HostSystemd``) is never read or written.
    """
    from pytest_runtimefaults.host import proc
    from pytest_runtimefaults.systemd.sandbox import SystemdSandbox

    if not isinstance(sandbox, SystemdSandbox):
        raise SandboxError(
            f"the cookie of {sandbox!r} is not ours to touch: RealCookieOverflow works "
            "only on a SystemdSandbox (never the host's systemd)"
        )
    pid = sandbox.pid
    if pid is None or not sandbox.running:
        raise SandboxError("the systemd sandbox is not running: start it first")
    if pid in (1, os.getpid()):
        raise SandboxError(f"refusing to touch PID {pid}: not a sandboxed systemd")
    if _ns(pid, "pid") == _ns("self", "pid"):
        raise SandboxError(f"PID {pid} shares our PID namespace: it is not a sandbox's PID 1")
    if proc.comm(pid) != "systemd":
        raise SandboxError(f"PID {pid} is {proc.comm(pid)!r}, not systemd")
    # NSpid's last field is the PID inside the innermost namespace: the sandbox's init is 1 there.
    with open(f"/proc/{pid}/status") as f:
        nspid = [line.split()[1:] for line in f if line.startswith("NSpid:")]
    if not nspid or nspid[0][-1] != "1":
        raise SandboxError(f"PID {pid} is not PID 1 of its namespace (NSpid {nspid})")
    return pid


def writable_regions(pid: int) -> list[Region]:
    """The private writable mappings of *pid* (heap, stacks, data and bss, anonymous)."""
    regions = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            m = _MAPS_LINE.match(line)
            # "rw-p": private and writable; shared mappings and [vvar] & co. cannot hold it.
            if m is None or not m.group(3).startswith("rw") or m.group(3)[3] != "p":
                continue
            name = m.group(4).strip()
            if name.startswith("[v"):  # [vvar], [vdso], [vsyscall]
                continue
            regions.append(Region(int(m.group(1), 16), int(m.group(2), 16), name))
    return regions


def _scan(mem: int, regions: list[Region], value: int) -> dict[int, str]:
    """Every 8-byte aligned address in *regions* whose word is *value* -> its region."""
    needle = value.to_bytes(8, "little")
    found: dict[int, str] = {}
    for region in regions:
        pos = region.start
        while pos < region.end:
            size = min(_CHUNK, region.end - pos)
            try:
                data = os.pread(mem, size, pos)
            except OSError:
                # A mapping that went away or cannot be read (a guard page): nothing there.
                logger.debug("reading %#x+%d of systemd's memory", pos, size, exc_info=True)
                break
            i = data.find(needle)
            while i >= 0:
                if (pos + i) % 8 == 0:
                    found[pos + i] = region.name or "anonymous"
                i = data.find(needle, i + 1)
            pos += size
    return found


def _word(mem: int, address: int) -> int | None:
    try:
        data = os.pread(mem, 8, address)
    except OSError:
        return None
    return int.from_bytes(data, "little") if len(data) == 8 else None


# -- the client ---------------------------------------------------------------------------------


class _Client:
    """A jeepney connection to the sandbox's bus that calls systemd and notes reply serials."""

    def __init__(self, address: str, timeout: float) -> None:
        from jeepney.io.blocking import open_dbus_connection

        self.timeout = timeout
        self.conn: DBusConnection = open_dbus_connection(bus=address)
        self.last = 0  # serial of systemd's last reply to us

    def close(self) -> None:
        with swallowed(OSError, "closing the cookie finder's connection"):
            self.conn.close()

    def _call(
        self, member: str, interface: str, signature: str = "", body: tuple[object, ...] = ()
    ) -> Message:
        from jeepney import DBusAddress, new_method_call

        addr = DBusAddress(_PATH, bus_name=SYSTEMD1, interface=interface)
        return new_method_call(addr, member, signature or None, body)

    def _reply(self, msg: Message) -> int:
        from jeepney.low_level import MessageType

        reply = self.conn.send_and_get_reply(msg, timeout=self.timeout)
        if reply.header.message_type != MessageType.method_return:
            raise SandboxError(f"systemd answered {msg.header.fields} with {reply.body!r}")
        self.last = reply.header.serial
        return self.last

    def ping(self) -> int:
        """``Peer.Ping``: answered by sd-bus itself; the serial of the reply."""
        return self._reply(self._call("Ping", "org.freedesktop.DBus.Peer"))

    def get_unit(self) -> int:
        """``Manager.GetUnit("init.scope")``: answered by systemd's own code."""
        return self._reply(
            self._call("GetUnit", "org.freedesktop.systemd1.Manager", "s", ("init.scope",))
        )

    def get_property(self) -> int:
        """``Properties.Get(Manager, "Version")``: another path through sd-bus's stack."""
        return self._reply(
            self._call(
                "Get",
                "org.freedesktop.DBus.Properties",
                "ss",
                ("org.freedesktop.systemd1.Manager", "Version"),
            )
        )

    def unanswered(self, n: int) -> None:
        """*n* pings flagged NO_REPLY_EXPECTED: systemd receives them and sends nothing."""
        from jeepney.low_level import MessageFlag

        for _ in range(n):
            msg = self._call("Ping", "org.freedesktop.DBus.Peer")
            msg.header.flags |= MessageFlag.no_reply_expected
            self.conn.send(msg)


def _plain(client: _Client) -> None:
    # Words that do not advance with the replies (constants, other connections' cookies).
    for _ in range(3):
        client.get_unit()


def _received(client: _Client) -> None:
    # Counters of received messages: they move by 6 here, the cookie by 1.
    client.unanswered(5)
    client.ping()


def _other_path(client: _Client) -> None:
    # Stale copies of the last cookie on systemd's stack: another call overwrites them.
    for _ in range(2):
        client.get_property()


# Each round moves the cookie by a known amount and some impostors differently.
_ROUNDS: tuple[Callable[[_Client], None], ...] = (_plain, _received, _other_path)


def find_cookie(
    sandbox: SystemdSandbox,
    *,
    address: str | None = None,
    max_rounds: int = 12,
    attempts: int = 3,
    timeout: float = 5.0,
) -> CookieWord:
    """Find the cookie of *sandbox*'s systemd's connection to its system bus.

    *address*: the bus to talk to systemd on (default the sandbox's own,
    ``sandbox.bus_address``; a proxy in front of it does as well: dbus-daemon
    forwards systemd's serials unchanged).  At most *max_rounds* rounds per
    attempt and *attempts* attempts (a message systemd sends to someone else
    between our calls moves the cookie: that attempt loses the cookie and the
    next starts over).  Reads only; raises :class:`CookieNotFound` when no
    single word is left, naming what was left.
    """
    pid = check_sandbox_systemd(sandbox)
    client = _Client(address or sandbox.bus_address, timeout)
    problems: list[str] = []
    try:
        mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        try:
            for attempt in range(1, attempts + 1):
                word = _attempt(pid, mem, client, max_rounds)
                if isinstance(word, CookieWord):
                    return word
                problems.append(f"attempt {attempt}: {word}")
        finally:
            os.close(mem)
    finally:
        client.close()
    raise CookieNotFound(f"no single cookie word in systemd {pid}'s memory: " + "; ".join(problems))


def _attempt(pid: int, mem: int, client: _Client, max_rounds: int) -> CookieWord | str:
    t0 = time.monotonic()
    client.get_unit()
    candidates = _scan(mem, writable_regions(pid), client.last)
    rounds = [len(candidates)]
    for i in range(max_rounds):
        if len(candidates) <= 1:
            break
        _ROUNDS[i % len(_ROUNDS)](client)
        candidates = {a: r for a, r in candidates.items() if _word(mem, a) == client.last}
        rounds.append(len(candidates))
    seconds = time.monotonic() - t0
    if len(candidates) != 1:
        where = ", ".join(f"{a:#x} ({r})" for a, r in sorted(candidates.items())[:8])
        return f"{len(candidates)} left after {len(rounds) - 1} rounds {rounds}: {where}"
    ((address, region),) = candidates.items()
    # One more answered call: the survivor must follow it, or it was luck.
    client.ping()
    if _word(mem, address) != client.last:
        return f"the survivor at {address:#x} did not follow the next reply"
    return CookieWord(pid, address, region, client.last, rounds, seconds)


# -- the fault ----------------------------------------------------------------------------------


class RealCookieOverflow(FaultBase):
    """Set a sandboxed systemd's real sd-bus cookie just below 2^32 (incident 2, for real).

    ``start()`` finds the cookie of systemd's system-bus connection
    (:func:`find_cookie`) and writes *value* into it (default 0xfffffff0: the
    next message systemd sends there gets 0xfffffff1, the 16th crosses the
    boundary).  What follows is what the real systemd does: every release
    here carries systemd PR 11818, so past 0xffffffff it continues at
    0x80000000 (``..., 0xffffffff, 0x80000000, 0x80000001, ...``), skipping
    cookies its own pending calls hold, and keeps answering.

    ``lift()`` and ``stop()`` write nothing back: the overflow is a state, not
    an ongoing action (the real systemd never returns below 0x80000000 once it
    has cycled, and a second write into a process we do not stop could lose
    one of its own increments and reuse a serial).  The sandbox's stop is what
    undoes it.  ``applied`` is 1 once the word is written.

    Args:
        sandbox: a running :class:`~pytest_runtimefaults.systemd.SystemdSandbox`
            (never the host's systemd: refused).
        value: what to write, ``1 <= value <= 0xffffffff``.
        address: the bus to find it through (default the sandbox's).

    Example::

        with RealCookieOverflow(sandbox) as fault:
            assert fault.word is not None
    """

    def __init__(
        self, sandbox: SystemdSandbox, value: int = DEFAULT_VALUE, *, address: str | None = None
    ) -> None:
        super().__init__()
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= UINT32_MAX:
            raise ValueError(
                f"RealCookieOverflow value {value!r}: give an integer in 1..0xffffffff "
                "(sd-bus clamps anything above to 0x80000000 anyway)"
            )
        self.sandbox = sandbox
        self.value = value
        self.address = address
        self.word: CookieWord | None = None
        """Where the cookie was found (after ``start()``)."""
        self.before: int | None = None
        """The cookie's value just before the write."""

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"real cookie overflow (systemd cookie := {self.value:#x})"

    def _start(self) -> None:
        word = find_cookie(self.sandbox, address=self.address)
        with _mem(word.pid, os.O_RDWR) as mem:
            # Checked again at the last moment: the same process, the word still where it was.
            if check_sandbox_systemd(self.sandbox) != word.pid:
                raise SandboxError("the sandbox's systemd changed while its cookie was found")
            current = _word(mem, word.address)
            if current != word.value:
                raise CookieNotFound(
                    f"systemd's cookie moved from {word.value:#x} to {current!r} before the write"
                )
            self.before = current
            written = os.pwrite(mem, self.value.to_bytes(8, "little"), word.address)
            if written != 8:
                raise SandboxError(f"wrote {written} of 8 bytes of systemd's cookie")
        self.word = word
        self._fired()
        logger.debug("%s: %#x -> %#x", word, current, self.value)

    def read(self) -> int | None:
        """The cookie's value now (None before ``start()`` or once systemd is gone)."""
        if self.word is None:
            return None
        try:
            with _mem(self.word.pid, os.O_RDONLY) as mem:
                return _word(mem, self.word.address)
        except OSError:
            return None


@contextmanager
def _mem(pid: int, flags: int) -> Iterator[int]:
    fd = os.open(f"/proc/{pid}/mem", flags)
    try:
        yield fd
    finally:
        os.close(fd)
