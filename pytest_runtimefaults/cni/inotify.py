"""No inotify instance left: a user namespace whose limit the fault holds.

``fs.inotify.max_user_instances`` counts per user *per user namespace*
(kernel ucounts, since 4.11): a child user namespace has its own limit,
``/proc/sys/user/max_inotify_instances`` as seen from inside it, and every
instance is charged at each level up to the host.  :class:`InotifyInstancesHeld`
makes a user namespace (uid and gid maps the identity, so a daemon inside is
root as before and sees no remapping), sets that namespace's limit to
*limit* and opens *limit* instances itself: whatever runs in the namespace
as root then gets ``EMFILE`` ("too many open files") from
``inotify_init``, as containerd did in its issues 10468 and 10308 and podman
in 10686.  The host's sysctl is not touched, and the host's root is charged
only the *limit* instances held (a handful).  ``lift()`` closes them; the
namespace stays, so a daemon started in it keeps running.

Start a program in the namespace with :attr:`InotifyInstancesHeld.argv`
(``nsenter --user=...``); join other namespaces (a network namespace) first,
since after the user namespace this process no longer has the host's
privileges.

Example::

    with InotifyInstancesHeld(limit=4) as held:
        subprocess.run([*held.argv, "inotifywait", "/tmp"])   # fails: EMFILE
        held.lift()                                         # instances back
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pytest_runtimefaults.core.fault import FaultBase
from pytest_runtimefaults.core.log import swallowed

__all__ = ["InotifyInstancesHeld", "inotify_instances"]

# Run by the holder process.  It unshares its user namespace itself (a fresh
# single-threaded interpreter may; this process, with its threads, may not),
# waits for the parent to write the identity maps, sets the namespace's limit
# and opens the instances.  Protocol on stdin/stdout, a line each:
# "mapped" -> "held N"; "release" -> "held 0"; end of input -> exit.
_HOLDER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER = 0x10000000
if libc.unshare(CLONE_NEWUSER) != 0:
    print("error unshare(CLONE_NEWUSER): " + os.strerror(ctypes.get_errno()), flush=True)
    sys.exit(1)
print("unshared", flush=True)
sys.stdin.readline()
limit = int(sys.argv[1])
with open("/proc/sys/user/max_inotify_instances", "w") as f:
    f.write(str(limit))
fds = []
while len(fds) < limit:
    fd = libc.inotify_init1(os.O_CLOEXEC)
    if fd < 0:
        break  # the host's own limit for root came first: hold what we got
    fds.append(fd)
print("held %d" % len(fds), flush=True)
for line in sys.stdin:
    if line.strip() == "release":
        for fd in fds:
            os.close(fd)
        fds = []
        print("held 0", flush=True)
"""


def inotify_instances(pid: int) -> int:
    """How many inotify instances process *pid* has open (its fds on ``anon_inode:inotify``)."""
    count = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        with swallowed(OSError, "reading fd %s of %d", fd, pid):
            if os.readlink(fd_dir / fd) == "anon_inode:inotify":
                count += 1
    return count


class InotifyInstancesHeld(FaultBase):
    """A user namespace with *limit* inotify instances, all held by the fault.

    :attr:`held` is how many the holder has open (``applied`` counts the
    times it filled the namespace); :attr:`userns` the namespace's path;
    :attr:`argv` the prefix that runs a command in it (as its root).
    Needs root (the identity maps) and a kernel with per-namespace ucounts.
    """

    def __init__(self, *, limit: int = 4, timeout: float = 10.0) -> None:
        super().__init__()
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self.limit = limit
        self.timeout = timeout
        self.held = 0
        self._proc: subprocess.Popen[str] | None = None
        self.name = f"inotify instances exhausted (a user namespace limited to {limit}, all held)"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self.name}: not started")
        return self._proc.pid

    @property
    def userns(self) -> str:
        return f"/proc/{self.pid}/ns/user"

    @property
    def argv(self) -> list[str]:
        """``nsenter`` into the namespace, as its root (uid and gid 0)."""
        return ["nsenter", f"--user={self.userns}"]

    def _line(self) -> str:
        assert self._proc is not None
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()
        if not line or line.startswith("error"):
            self._proc.wait(self.timeout)
            err = self._proc.stderr.read() if self._proc.stderr else ""
            raise RuntimeError(
                f"{self.name}: the holder failed ({line or 'no output'}; {err.strip()[-500:]}); "
                "it needs root and user namespaces (kernel >= 4.11, "
                "user.max_user_namespaces > 0)"
            )
        return line

    def _say(self, text: str) -> str:
        assert self._proc is not None
        assert self._proc.stdin is not None
        self._proc.stdin.write(text + "\n")
        self._proc.stdin.flush()
        return self._line()

    def _start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(self.limit)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if self._line() != "unshared":
            raise RuntimeError(f"{self.name}: unexpected word from the holder")
        # The identity: root inside is root outside, every other id too.
        for kind in ("uid_map", "gid_map"):
            Path(f"/proc/{self.pid}/{kind}").write_text("0 0 4294967295\n")
        self.held = int(self._say("mapped").split()[1])
        if self.held < self.limit:
            raise RuntimeError(
                f"{self.name}: only {self.held} instances could be opened (the host's "
                "fs.inotify.max_user_instances for root is nearly used up): not exhausting "
                "the host's; retry later"
            )
        self._fired()

    def _lift(self) -> None:
        self.held = int(self._say("release").split()[1])

    def release(self) -> None:
        """Give the instances back now (``lift()``); the namespace stays."""
        self.lift()

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with swallowed(OSError, "closing the inotify holder's stdin"):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(self.timeout)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
