"""Our D-Bus proxy vs xdg-dbus-proxy vs a minimal C relay (the floor), side by side.

Latency: a client process makes round trips of ``org.freedesktop.DBus.GetId``
to a private dbus-daemon: directly, through :class:`DBusFaultProxy` (in this
process, as in a pytest run, with its trace on), through DBusFaultProxy with
20 rules that match nothing, through ``xdg-dbus-proxy`` (C, GLib), and through
the *C floor*: a minimal relay (one ``recvmsg`` and one ``sendmsg`` per read,
fds passed on) that this bench compiles with gcc into a temp dir at run time.
Each path runs with a client that does not negotiate Unix fd passing and with
one that does (as sd-bus and godbus clients do: busctl, systemd-run, crun,
runc); a client negotiating fds makes a proxy read with ``recvmsg``.

Pinned and unpinned: "pinned" puts every process (the bench and its proxy
thread, dbus-daemon, xdg-dbus-proxy, the C relay, the clients) on one CPU, as
``taskset -a -p -c CPU`` does, which shows pure CPU cost and repeats within a
microsecond or two; "unpinned" lets the scheduler place them, as a test run
does, and swings by tens of microseconds with vCPU wake-ups on a VM.  Rounds
alternate the modes and the paths so that machine noise hits all of them
alike; each figure is the median over rounds of each round's median, with the
spread (min-max over rounds) of the paired ratios.

Throughput (``--throughput``): N client processes keep M calls in flight each
for a fixed window, through each path, to the real dbus-daemon and to a *fast
upstream*: a minimal C peer (compiled here too) that answers every method call
with an empty reply at once, so the proxy, not the bus, is what limits.  The
CPU each proxy and upstream used in the window is read from /proc.

Every ratio of issue 17's goal is printed, with the goal.  Needs gcc and
xdg-dbus-proxy (Debian packages ``gcc``, ``xdg-dbus-proxy``).

    python benchmarks/bench_dbus_proxy.py [--rounds 8] [--calls 400]
        [--pin | --no-pin] [--cpu 0] [--throughput] [--clients 8] [--inflight 64]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from pytest_runtimefaults.dbus.bus import PrivateBus
from pytest_runtimefaults.dbus.proxy import DBusFaultProxy, parse_address
from pytest_runtimefaults.dbus.rules import Delay

HERE = Path(__file__).parent
PING = str(HERE / "_dbus_pingclient.py")
LOAD = str(HERE / "_dbus_loadclient.py")
TICK = os.sysconf("SC_CLK_TCK")

# The floor: what any relay in user space must pay at least.
RELAY_C = r"""
/* The floor: a minimal D-Bus relay.  relay LISTEN UPSTREAM; prints "ready".
 * One thread, epoll; per readable event one recvmsg and sendmsg of what it
 * read, with any SCM_RIGHTS fds passed on (then closed here).  No framing. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAXFD 65536
static int peer[MAXFD];

static int unix_socket(const char *path, struct sockaddr_un *sa) {
    memset(sa, 0, sizeof *sa);
    sa->sun_family = AF_UNIX;
    strncpy(sa->sun_path, path, sizeof sa->sun_path - 1);
    return socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
}

static void drop(int ep, int fd) {
    int other = peer[fd];
    peer[fd] = -1;
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    if (other >= 0) {
        peer[other] = -1;
        epoll_ctl(ep, EPOLL_CTL_DEL, other, NULL);
        close(other);
    }
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: relay LISTEN UPSTREAM\n"); return 2; }
    struct sockaddr_un la, ua;
    int lfd = unix_socket(argv[1], &la);
    unix_socket(argv[2], &ua);
    if (bind(lfd, (struct sockaddr *)&la, sizeof la) || listen(lfd, 128)) {
        perror("listen");
        return 1;
    }
    for (int i = 0; i < MAXFD; i++) peer[i] = -1;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd}, evs[64];
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    printf("ready\n");
    fflush(stdout);
    static char buf[65536];
    static char cbuf[CMSG_SPACE(253 * sizeof(int))];
    for (;;) {
        int n = epoll_wait(ep, evs, 64, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
                if (c < 0) continue;
                int u = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
                if (c >= MAXFD || u < 0 || u >= MAXFD
                    || connect(u, (struct sockaddr *)&ua, sizeof ua)) {
                    close(c);
                    if (u >= 0) close(u);
                    continue;
                }
                peer[c] = u;
                peer[u] = c;
                ev.data.fd = c;
                epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
                ev.data.fd = u;
                epoll_ctl(ep, EPOLL_CTL_ADD, u, &ev);
                continue;
            }
            if (peer[fd] < 0) continue; /* closed earlier in this batch */
            struct iovec iov = {buf, sizeof buf};
            struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                               .msg_controllen = sizeof cbuf};
            ssize_t r = recvmsg(fd, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (r <= 0) { drop(ep, fd); continue; }
            struct msghdr o = {.msg_iov = &iov, .msg_iovlen = 1};
            if (m.msg_controllen) { o.msg_control = cbuf; o.msg_controllen = m.msg_controllen; }
            ssize_t off = 0;
            while (off < r) { /* blocking writes: the floor needs no queue */
                iov.iov_base = buf + off;
                iov.iov_len = (size_t)(r - off);
                ssize_t w = sendmsg(peer[fd], &o, MSG_NOSIGNAL);
                if (w < 0) { if (errno == EINTR) continue; break; }
                off += w;
                o.msg_control = NULL;
                o.msg_controllen = 0;
            }
            for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
                if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                    int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                    int *fds = (int *)CMSG_DATA(c);
                    for (int j = 0; j < k; j++) close(fds[j]);
                }
            if (off < r) drop(ep, fd);
        }
    }
}
"""

# A fast upstream for the throughput mode.
ECHO_C = r"""
/* A fast upstream: a minimal D-Bus peer.  echo LISTEN; prints "ready".
 * Answers the SASL handshake (any AUTH is OK, NEGOTIATE_UNIX_FD agreed) and
 * every METHOD_CALL that expects a reply with an empty METHOD_RETURN (24
 * bytes: REPLY_SERIAL only), at once.  No bus semantics: no names, no routing. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAXFD 65536
struct conn { int open, auth; char *buf; size_t len, cap; uint32_t serial; };
static struct conn conns[MAXFD];

static uint32_t u32(const unsigned char *p, int big) {
    return big ? ((uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3])
               : ((uint32_t)p[3] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[1] << 8 | p[0]);
}

static int send_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) { if (errno == EINTR) continue; return -1; }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static void put32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); } /* x86: little-endian */

/* Consume what can be consumed of c->buf; return -1 to close. */
static int serve(int fd, struct conn *c) {
    static char out[1 << 20];
    size_t o = 0, pos = 0;
    while (c->auth) {
        char *nl = memmem(c->buf + pos, c->len - pos, "\r\n", 2);
        if (!nl) break;
        char *line = c->buf + pos;
        size_t n = (size_t)(nl - line);
        pos += n + 2;
        if (n && line[0] == '\0') { line++; n--; }
        const char *reply = "ERROR\r\n";
        if (n >= 4 && !memcmp(line, "AUTH", 4)) reply = "OK 0123456789abcdef0123456789abcdef\r\n";
        else if (n == 17 && !memcmp(line, "NEGOTIATE_UNIX_FD", 17)) reply = "AGREE_UNIX_FD\r\n";
        else if (n == 5 && !memcmp(line, "BEGIN", 5)) { c->auth = 0; reply = ""; }
        if (send_all(fd, reply, strlen(reply))) return -1;
    }
    while (!c->auth && c->len - pos >= 16) {
        const unsigned char *m = (const unsigned char *)c->buf + pos;
        int big = m[0] == 'B';
        if (!big && m[0] != 'l') return -1;
        uint64_t total = 16 + (((uint64_t)u32(m + 12, big) + 7) & ~(uint64_t)7) + u32(m + 4, big);
        if (total > 128u << 20) return -1;
        if (c->len - pos < total) break;
        if (m[1] == 1 && !(m[2] & 1)) {
            unsigned char *r = (unsigned char *)out + o;
            r[0] = 'l'; r[1] = 2; r[2] = 1; r[3] = 1;
            put32(r + 4, 0);
            put32(r + 8, ++c->serial);
            put32(r + 12, 8);
            r[16] = 5; r[17] = 1; r[18] = 'u'; r[19] = 0;
            put32(r + 20, u32(m + 8, big));
            o += 24;
            if (o + 24 > sizeof out) { if (send_all(fd, out, o)) return -1; o = 0; }
        }
        pos += total;
    }
    memmove(c->buf, c->buf + pos, c->len - pos);
    c->len -= pos;
    return o ? send_all(fd, out, o) : 0;
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: echo LISTEN\n"); return 2; }
    struct sockaddr_un la = {.sun_family = AF_UNIX};
    strncpy(la.sun_path, argv[1], sizeof la.sun_path - 1);
    int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (bind(lfd, (struct sockaddr *)&la, sizeof la) || listen(lfd, 128)) {
        perror("listen");
        return 1;
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd}, evs[64];
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        int n = epoll_wait(ep, evs, 64, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
                if (c < 0) continue;
                if (c >= MAXFD) { close(c); continue; }
                conns[c] = (struct conn){.open = 1, .auth = 1, .cap = 1 << 16};
                conns[c].buf = malloc(conns[c].cap);
                ev.data.fd = c;
                epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
                continue;
            }
            struct conn *c = &conns[fd];
            if (!c->open) continue;
            if (c->cap - c->len < 65536) { c->cap *= 2; c->buf = realloc(c->buf, c->cap); }
            ssize_t r = recv(fd, c->buf + c->len, c->cap - c->len, MSG_DONTWAIT);
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (r > 0) c->len += (size_t)r;
            if (r <= 0 || serve(fd, c)) {
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                close(fd);
                free(c->buf);
                *c = (struct conn){0};
            }
        }
    }
}
"""


def build(tmp: str) -> tuple[str, str]:
    """Compile the C relay and the echo peer into *tmp*; return their paths."""
    gcc = shutil.which("gcc")
    if gcc is None:
        sys.exit("gcc not found (it builds the C floor): apt-get install gcc")
    out = []
    for name, source in (("relay", RELAY_C), ("echo", ECHO_C)):
        c = os.path.join(tmp, f"{name}.c")
        Path(c).write_text(source)
        exe = os.path.join(tmp, name)
        done = subprocess.run([gcc, "-O2", "-o", exe, c], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"gcc could not build the {name} of the benchmark:\n{done.stderr}")
        out.append(exe)
    return out[0], out[1]


def start_ready(argv: list[str]) -> subprocess.Popen[str]:
    """Start a C helper and wait for its ``ready`` line."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError(f"{argv[0]} did not start (exit {proc.wait()})")
    return proc


def start_xdg(upstream: str, path: str) -> subprocess.Popen[bytes]:
    """Start xdg-dbus-proxy on *path*; its stderr goes to *path*.log (read at the end).

    It warns ``Error writing credentials to socket ... Broken pipe`` now and then
    as clients come and go: kept out of the figures, counted at the end.
    """
    with open(path + ".log", "wb") as log:
        proc = subprocess.Popen(["xdg-dbus-proxy", upstream, path], stderr=log)
    deadline = time.monotonic() + 10
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"xdg-dbus-proxy did not start (exit {proc.returncode})")
        time.sleep(0.005)
    return proc


@contextmanager
def running(proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> Iterator[None]:
    try:
        yield
    finally:
        proc.terminate()
        proc.wait()


def set_cpus(pids: list[int], cpus: set[int]) -> None:
    """Put every thread of every process of *pids* on *cpus* (as ``taskset -a -p``)."""
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except ProcessLookupError:
                pass  # a thread that just ended


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (all its threads) or of one thread, in seconds."""
    where = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    fields = Path(where).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def ping(address: str, calls: int, fds: bool) -> float:
    """Median round trip (us) of *calls* GetId calls by a fresh client process."""
    out = subprocess.run(
        [sys.executable, PING, address, str(calls), *(["fds"] if fds else [])],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return statistics.median(float(x) for x in out.stdout.split())


def load(
    path: str,
    clients: int,
    inflight: int,
    seconds: float,
    fds: bool,
    watch: dict[str, tuple[int, int | None]],
) -> tuple[float, dict[str, float]]:
    """Calls answered per second by *clients* x *inflight*, and the cores each of *watch* used."""
    t0 = time.monotonic() + 0.5 + 0.05 * clients  # every client connected and warm by then
    t1 = t0 + seconds
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                LOAD,
                path,
                repr(t0),
                repr(t1),
                str(inflight),
                *(["fds"] if fds else []),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(clients)
    ]
    time.sleep(max(0.0, t0 - time.monotonic()))
    before = {k: cpu_seconds(*v) for k, v in watch.items()}
    time.sleep(max(0.0, t1 - time.monotonic()))
    after = {k: cpu_seconds(*v) for k, v in watch.items()}
    total = 0
    for p in procs:
        out, _ = p.communicate(timeout=60)
        if p.returncode:
            raise RuntimeError(f"a load client on {path} failed (exit {p.returncode})")
        total += int(out)
    return total / seconds, {k: (after[k] - before[k]) / seconds for k in watch}


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):5.2f} [{min(xs):.2f}-{max(xs):.2f}]"


def startup_times(n: int) -> list[float]:
    """Seconds from nothing to a proxied bus that answered a call."""
    from jeepney import DBusAddress, new_method_call
    from jeepney.io.blocking import open_dbus_connection

    target = DBusAddress("/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus")
    times = []
    for _ in range(n):
        t = time.perf_counter()
        with PrivateBus() as bus, DBusFaultProxy(upstream=bus.address) as proxy:
            conn = open_dbus_connection(bus=proxy.address)
            conn.send_and_get_reply(new_method_call(target, "GetId"))
            times.append(time.perf_counter() - t)
            conn.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="latency rounds (default 8)")
    parser.add_argument("--calls", type=int, default=400, help="round trips per client")
    pin = parser.add_mutually_exclusive_group()
    pin.add_argument("--pin", action="store_true", help="pinned only (default: both)")
    pin.add_argument("--no-pin", action="store_true", help="unpinned only")
    parser.add_argument("--cpu", type=int, default=0, help="the CPU to pin to (default 0)")
    parser.add_argument("--throughput", action="store_true", help="also measure throughput")
    parser.add_argument("--clients", type=int, default=8, help="throughput: client processes")
    parser.add_argument("--inflight", type=int, default=64, help="throughput: calls in flight each")
    parser.add_argument("--seconds", type=float, default=1.0, help="throughput: window length")
    parser.add_argument("--tp-rounds", type=int, default=3, help="throughput rounds")
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up timing")
    args = parser.parse_args()
    if not shutil.which("xdg-dbus-proxy"):
        sys.exit("xdg-dbus-proxy not found: apt-get install xdg-dbus-proxy")
    all_cpus = os.sched_getaffinity(0)
    if args.cpu not in all_cpus:
        sys.exit(f"--cpu {args.cpu}: not one of this process's CPUs {sorted(all_cpus)}")
    modes = ["pinned"] if args.pin else ["unpinned"] if args.no_pin else ["pinned", "unpinned"]

    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-dbus-"))
        relay_exe, echo_exe = build(tmp)
        bus = stack.enter_context(PrivateBus())
        echo_path = os.path.join(tmp, "echo.sock")
        echo = start_ready([echo_exe, echo_path])
        stack.enter_context(running(echo))
        echo_address = f"unix:path={echo_path}"
        children: list[int] = [echo.pid]
        assert bus.pid is not None
        children.append(bus.pid)
        # Each upstream gets its own of every proxy: (address, process watched for CPU).
        paths: dict[str, dict[str, tuple[str, tuple[int, int | None]]]] = {}
        proxies: list[DBusFaultProxy] = []
        for up_name, up_address, up_pid in (
            ("bus", bus.address, bus.pid),
            ("echo", echo_address, echo.pid),
        ):
            ours = stack.enter_context(DBusFaultProxy(upstream=up_address))
            ours.trace.enabled = True  # as in a pytest run
            proxies.append(ours)
            loop_tid = ours.threads[0].native_id  # the proxy's loop: its CPU is watched
            assert loop_tid is not None
            xdg_path = os.path.join(tmp, f"xdg-{up_name}")
            xdg = start_xdg(up_address, xdg_path)
            stack.enter_context(running(xdg))
            c_path = os.path.join(tmp, f"relay-{up_name}")
            _, up_path = parse_address(up_address)
            if not isinstance(up_path, str):
                sys.exit(f"the C floor relays to a unix:path= bus only, not {up_address}")
            c_relay = start_ready([relay_exe, c_path, up_path])
            stack.enter_context(running(c_relay))
            children += [xdg.pid, c_relay.pid]
            paths[up_name] = {
                "direct": (up_address, (up_pid, None)),
                "ours": (ours.address, (os.getpid(), loop_tid)),
                "xdg": (f"unix:path={xdg_path}", (xdg.pid, None)),
                "C floor": (f"unix:path={c_path}", (c_relay.pid, None)),
            }
        ruled = stack.enter_context(DBusFaultProxy(upstream=bus.address))
        for i in range(20):  # rules that never match: the cost of checking them
            ruled.add(Delay(1).on(member=f"NoSuchMember{i}"))
        ruled.trace.enabled = True
        bus_paths = {k: v[0] for k, v in paths["bus"].items()}
        bus_paths["ours+20 rules"] = ruled.address
        everyone = [os.getpid(), *children]

        def mode(name: str) -> None:
            set_cpus(everyone, {args.cpu} if name == "pinned" else all_cpus)

        # -- latency ------------------------------------------------------------
        lat: dict[tuple[str, str, bool], list[float]] = {}
        cases = [
            (p, fds)
            for fds in (False, True)
            for p in bus_paths
            if not (fds and p == "ours+20 rules")
        ]
        for r in range(args.rounds):
            for m in modes if r % 2 == 0 else modes[::-1]:
                mode(m)
                for p, fds in cases if r % 2 == 0 else cases[::-1]:
                    lat.setdefault((m, p, fds), []).append(ping(bus_paths[p], args.calls, fds))
        mode("unpinned")

        def added(m: str, p: str, fds: bool) -> list[float]:
            return [x - d for x, d in zip(lat[(m, p, fds)], lat[(m, "direct", fds)], strict=True)]

        def ratio(m: str, a: str, b: str, fds: bool) -> tuple[float, list[float]]:
            """The ratio of median added latencies, and the ratio within each round."""
            xa, xb = added(m, a, fds), added(m, b, fds)
            per_round = [x / y for x, y in zip(xa, xb, strict=True) if y > 0.5]
            return statistics.median(xa) / statistics.median(xb), per_round

        print(
            f"latency: GetId round trip, median of {args.rounds} rounds x {args.calls} calls (us);"
            " added = over direct"
        )
        for m in modes:
            print(f"  {m}:{'no fd':>27}{'fds negotiated':>28}")
            for p in bus_paths:
                cells = ""
                for fds in (False, True):
                    if (m, p, fds) not in lat:
                        continue
                    med = statistics.median(lat[(m, p, fds)])
                    add = (
                        "" if p == "direct" else f"added {statistics.median(added(m, p, fds)):5.1f}"
                    )
                    cells += f"  {med:7.1f} {add:>17}"
                print(f"    {p:14}{cells}")
        print("ratios of added latency (median over rounds of each round's ratio [min-max]):")
        goal_xdg = {"pinned": 0.5, "unpinned": 0.8}
        for m in modes:
            for fds in (False, True):
                fd = "fds  " if fds else "no fd"
                q, per = ratio(m, "ours", "xdg", fds)
                print(
                    f"  {m:8} {fd} ours/xdg      {q:5.2f}   per round {spread(per)}"
                    f"   (goal <= {goal_xdg[m]})"
                )
                q, per = ratio(m, "ours", "C floor", fds)
                print(
                    f"  {m:8} {fd} ours/C floor  {q:5.2f}   per round {spread(per)}   (goal <= 2)"
                )
                q, per = ratio(m, "xdg", "C floor", fds)
                print(f"  {m:8} {fd} xdg/C floor   {q:5.2f}   per round {spread(per)}")
            q, per = ratio(m, "ours+20 rules", "ours", False)
            print(
                f"  {m:8} no fd 20 rules/none {q:5.2f}   per round {spread(per)}   (goal <= 1.10)"
            )

        # -- throughput ---------------------------------------------------------
        if args.throughput:
            print(
                f"throughput: {args.clients} clients x {args.inflight} GetId calls in flight, "
                f"{args.seconds:g} s windows, median of {args.tp_rounds} rounds "
                "(calls answered per second; each is 2 messages through a proxy)"
            )
            tp: dict[tuple[str, str, str, bool], list[tuple[float, dict[str, float]]]] = {}
            tcases = [(u, p, fds) for u in paths for fds in (False, True) for p in paths[u]]
            for r in range(args.tp_rounds):
                for m in modes if r % 2 == 0 else modes[::-1]:
                    mode(m)
                    for u, p, fds in tcases if r % 2 == 0 else tcases[::-1]:
                        address, watched = paths[u][p]
                        watch = {"upstream": paths[u]["direct"][1]}
                        if p != "direct":
                            watch["proxy"] = watched
                        tp.setdefault((m, u, p, fds), []).append(
                            load(
                                str(parse_address(address)[1]),
                                args.clients,
                                args.inflight,
                                args.seconds,
                                fds,
                                watch,
                            )
                        )
            mode("unpinned")
            for m in modes:
                print(f"  {m}:")
                for u in paths:
                    for fds in (False, True):
                        rates = {}
                        for p in paths[u]:
                            runs = tp[(m, u, p, fds)]
                            rate = statistics.median(x for x, _ in runs)
                            rates[p] = rate
                            cores = {
                                k: statistics.median(c[k] for _, c in runs) for k in runs[0][1]
                            }
                            use = ", ".join(f"{k} {v:.2f} core" for k, v in cores.items())
                            print(
                                f"    {u:4} {'fds  ' if fds else 'no fd'} {p:8} "
                                f"{rate:10.0f} calls/s [{min(x for x, _ in runs):.0f}-"
                                f"{max(x for x, _ in runs):.0f}]  ({use})"
                            )
                        goal = "   (goal >= 5)" if u == "echo" else ""
                        print(
                            f"    {u:4} {'fds  ' if fds else 'no fd'} ours/xdg "
                            f"{rates['ours'] / rates['xdg']:.2f}, ours/direct "
                            f"{rates['ours'] / rates['direct']:.2f}, ours/C floor "
                            f"{rates['ours'] / rates['C floor']:.2f}{goal}"
                        )
        for proxy in proxies:
            if proxy.errors:
                print(f"our proxy's errors: {proxy.errors}")
        for up_name in paths:
            lines = Path(tmp, f"xdg-{up_name}.log").read_text(errors="replace").split("\n")
            warned = sorted(
                {re.sub(r".*WARNING \*\*: [\d:.]+: ", "", x) for x in lines if "WARNING" in x}
            )
            if warned:
                print(f"xdg-dbus-proxy ({up_name}) warned {len(warned)} kind(s): {warned}")
    if not args.no_startup:
        st = startup_times(20)
        print(
            f"PrivateBus + proxy start to first reply:  median {statistics.median(st) * 1000:.1f}"
            f" ms, max {max(st) * 1000:.1f} ms   (goal: median < 100 ms)"
        )


if __name__ == "__main__":
    main()
