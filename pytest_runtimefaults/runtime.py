"""The OCI runtime under test: runc, crun, youki or any OCI runtime CLI by path.

A :class:`Runtime` runs the OCI lifecycle commands (``create``, ``start``,
``state``, ``kill``, ``delete``, ``run``) and returns a :class:`RuntimeResult`
for each: exit code, stdout, stderr and duration.  It never raises on a failed
command (tests assert on results); :meth:`RuntimeResult.check` raises with the
runtime's own error message when a test wants that.

Where it runs: with a *sandbox* (a :class:`~pytest_runtimefaults.systemd.SystemdSandbox`)
every command is run inside the sandbox's PID, mount and cgroup namespaces,
because systemd resolves the PIDs a runtime hands it (``StartTransientUnit``
with ``PIDs``) in its own PID namespace.  Its D-Bus traffic goes to
*dbus_address* (passed as ``DBUS_SYSTEM_BUS_ADDRESS`` through ``env=``, never
through ``os.environ``): point it at a
:class:`~pytest_runtimefaults.dbus.proxy.DBusFaultProxy` whose listening socket
lives in a directory the sandbox can see (anything under ``/tmp`` is; ``/run``
is the sandbox's own).

Container stdio goes to files, never pipes: ``create`` leaves a container
process holding the runtime's stdout and stderr, and a pipe would keep the
caller waiting for an EOF that never comes.

Example::

    with SystemdSandbox() as sd:
        rt = Runtime("crun", cgroup_driver="systemd", sandbox=sd)
        result = rt.lifecycle(bundle)       # create + delete --force
        assert result.ok, result.stderr
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pytest_runtimefaults.core.log import swallowed
from pytest_runtimefaults.host import proc as host_proc
from pytest_runtimefaults.journal import Journal
from pytest_runtimefaults.naming import unique_name

__all__ = [
    "KNOWN_RUNTIMES",
    "CommandRunner",
    "Runtime",
    "RuntimeCommandError",
    "RuntimeNotFound",
    "RuntimeResult",
    "resolve_runtime",
]

KNOWN_RUNTIMES = ("runc", "crun", "youki")
CGROUP_DRIVERS = ("cgroupfs", "systemd")


class CommandRunner(Protocol):
    """Where commands run: a sandbox's namespaces (``SystemdSandbox``) or the host."""

    def command(self, argv: Sequence[str]) -> list[str]: ...


class RuntimeCommandError(RuntimeError):
    """A runtime command failed; the message carries the runtime's stderr."""

    def __init__(self, result: RuntimeResult) -> None:
        self.result = result
        super().__init__(
            f"{' '.join(result.argv)} exited {result.returncode} after "
            f"{result.duration:.3f} s: {result.stderr.strip()[-2000:]}"
        )


@dataclass
class RuntimeResult:
    """What one runtime command did."""

    argv: list[str]
    returncode: int | None  # None: killed by the caller's timeout
    stdout: str
    stderr: str
    duration: float
    timed_out: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def check(self) -> RuntimeResult:
        """Return self, or raise :class:`RuntimeCommandError` if the command failed."""
        if not self.ok:
            raise RuntimeCommandError(self)
        return self

    def json(self) -> Any:
        """stdout parsed as JSON (``state``, ``list --format json``)."""
        return json.loads(self.stdout)


class RuntimeNotFound(FileNotFoundError):
    """The runtime a user asked for is not there; :attr:`kind` says how.

    * ``"missing"``: a known name (:data:`KNOWN_RUNTIMES`) that is not
      installed: a missing capability (tests skip, saying :attr:`remedy`);
    * ``"path"``: a path that does not exist or is not an executable file;
    * ``"unknown"``: a name that is not known and not on ``PATH`` (a typo?).

    The last two are the user's mistake: the plugin makes them a usage error.
    """

    def __init__(self, spec: str, kind: str, message: str, remedy: str = "") -> None:
        super().__init__(message)
        self.spec = spec
        self.kind = kind
        self.remedy = remedy

    @property
    def usage_error(self) -> bool:
        """True when what was typed is wrong (not a runtime this host lacks)."""
        return self.kind in ("path", "unknown")


#: How to get each known runtime (what a skipped test says).
RUNTIME_REMEDIES = {
    "runc": "apt-get install runc",
    "crun": "apt-get install crun",
    "youki": "youki is not packaged for Debian: install a release binary and give its path",
}


def resolve_runtime(spec: str) -> str:
    """``runc``/``crun``/``youki``, any name on ``PATH``, or a path -> the absolute path.

    Raises :class:`RuntimeNotFound` (a ``FileNotFoundError``) naming what
    was wrong: a known runtime that is not installed (and how to install it),
    a path that does not exist or cannot be run, or an unknown name (and
    which names are known).
    """
    if not spec or not spec.strip():
        raise RuntimeNotFound(
            spec,
            "unknown",
            f"no OCI runtime given: name one of {', '.join(KNOWN_RUNTIMES)} "
            "or give the path of an OCI runtime CLI",
        )
    if os.sep in spec:
        if not os.path.exists(spec):
            raise RuntimeNotFound(
                spec, "path", f"OCI runtime {spec!r} not found: no such file (check the path)"
            )
        if not os.path.isfile(spec) or not os.access(spec, os.X_OK):
            raise RuntimeNotFound(
                spec, "path", f"OCI runtime {spec!r} is not an executable file (check the path)"
            )
        return os.path.abspath(spec)
    path = shutil.which(spec)
    if path is not None:
        return os.path.abspath(path)
    if spec in KNOWN_RUNTIMES:
        remedy = RUNTIME_REMEDIES[spec]
        raise RuntimeNotFound(
            spec, "missing", f"OCI runtime {spec!r} not found on PATH ({remedy})", remedy
        )
    raise RuntimeNotFound(
        spec,
        "unknown",
        f"unknown OCI runtime {spec!r}: not on PATH and not one of the known names "
        f"{', '.join(KNOWN_RUNTIMES)}; give one of those or the path of an OCI runtime CLI",
    )


class Runtime:
    """An OCI runtime CLI, run with its own state directory.

    Args:
        binary: ``runc``, ``crun``, ``youki`` or a path to any OCI runtime CLI.
        cgroup_driver: ``cgroupfs`` or ``systemd`` (``--systemd-cgroup``).
        root: the runtime's state directory (``--root``); a fresh one under
            ``/run`` by default, inside the sandbox when there is one.
        sandbox: where commands run (anything with ``command(argv)``), or None
            for the host.
        dbus_address: the system bus the runtime uses (``DBUS_SYSTEM_BUS_ADDRESS``).
        env: extra environment for every command.
        timeout: seconds before a command is killed (its result has
            ``timed_out`` set and ``returncode`` None).
        journal: records the state directory when it is on the host.
    """

    def __init__(
        self,
        binary: str = "runc",
        *,
        cgroup_driver: str = "cgroupfs",
        root: str | None = None,
        sandbox: CommandRunner | None = None,
        dbus_address: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        journal: Journal | None = None,
    ) -> None:
        if cgroup_driver not in CGROUP_DRIVERS:
            raise ValueError(f"cgroup_driver must be cgroupfs or systemd, not {cgroup_driver!r}")
        self.binary = resolve_runtime(binary)
        self.name = os.path.basename(self.binary)
        self.cgroup_driver = cgroup_driver
        self.sandbox = sandbox
        self.dbus_address = dbus_address
        self.extra_env = dict(env or {})
        self.timeout = timeout
        self.journal = journal if journal is not None else Journal.default()
        self._rid: int | None = None
        # Inside a SystemdSandbox /run is the sandbox's own tmpfs: the state goes with it.
        self._host_root = not getattr(sandbox, "private_run", False)
        if root is None:
            root = f"/run/runtimefaults-{unique_name('rt')}"
            if self._host_root:
                self._rid = self.journal.add("path", path=root)
        else:
            self._host_root = False  # the user's directory: never removed
        self.root = root

    def __repr__(self) -> str:
        where = "sandbox" if self.sandbox is not None else "host"
        return f"Runtime({self.name}, {self.cgroup_driver}, {where}, root={self.root})"

    # -- plumbing

    def env(self) -> dict[str, str]:
        """The environment every runtime command gets."""
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        if self.dbus_address:
            env["DBUS_SYSTEM_BUS_ADDRESS"] = self.dbus_address
        env.update(self.extra_env)
        return env

    def argv(self, *args: str) -> list[str]:
        """The runtime's command line for *args* (before any sandbox wrapping)."""
        argv = [self.binary, "--root", self.root]
        if self.cgroup_driver == "systemd":
            argv.append("--systemd-cgroup")
        return [*argv, *args]

    def exec(self, *args: str, timeout: float | None = None) -> RuntimeResult:
        """Run ``RUNTIME --root R [--systemd-cgroup] ARGS...`` and collect its result."""
        argv = self.argv(*args)
        full = self.sandbox.command(argv) if self.sandbox is not None else argv
        limit = self.timeout if timeout is None else timeout
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            t0 = time.monotonic()
            proc = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self.env(),
                start_new_session=True,
            )
            timed_out = False
            try:
                returncode: int | None = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                timed_out = True
                returncode = None
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            duration = time.monotonic() - t0
            out.seek(0)
            err.seek(0)
            stdout = out.read().decode(errors="replace")
            stderr = err.read().decode(errors="replace")
        if timed_out:
            stderr += f"\n[runtimefaults: killed after the {limit} s timeout]"
        return RuntimeResult(argv, returncode, stdout, stderr, duration, timed_out)

    # -- the OCI lifecycle

    def create(
        self, container_id: str, bundle: str | os.PathLike[str], *, timeout: float | None = None
    ) -> RuntimeResult:
        return self.exec("create", "--bundle", str(bundle), container_id, timeout=timeout)

    def start(self, container_id: str) -> RuntimeResult:
        return self.exec("start", container_id)

    def state(self, container_id: str) -> RuntimeResult:
        """``state ID``; ``result.json()`` is the OCI state (``status``, ``pid``...)."""
        return self.exec("state", container_id)

    def kill(self, container_id: str, sig: str = "KILL", *, all: bool = False) -> RuntimeResult:
        args = ["kill", *(["--all"] if all else []), container_id, sig]
        return self.exec(*args)

    def delete(self, container_id: str, *, force: bool = False) -> RuntimeResult:
        return self.exec("delete", *(["--force"] if force else []), container_id)

    def run(
        self,
        container_id: str,
        bundle: str | os.PathLike[str],
        *,
        detach: bool = False,
        timeout: float | None = None,
    ) -> RuntimeResult:
        args = ["run", "--bundle", str(bundle), *(["--detach"] if detach else []), container_id]
        return self.exec(*args, timeout=timeout)

    def containers(self) -> list[dict[str, Any]]:
        """The containers the runtime knows (``list --format json``)."""
        result = self.exec("list", "--format", "json")
        if not result.ok or not result.stdout.strip():
            return []
        data = result.json()
        return list(data) if data else []

    def lifecycle(
        self, bundle: str | os.PathLike[str], container_id: str | None = None
    ) -> RuntimeResult:
        """``create`` then ``delete --force``: the churn of incident 2.

        Returns the first failing step's result, else a result whose
        ``duration`` is the whole cycle and ``extra`` holds each step's time.
        """
        cid = container_id or unique_name("rfc", maxlen=40)
        created = self.create(cid, bundle)
        if not created.ok:
            self.delete(cid, force=True)
            return created
        deleted = self.delete(cid, force=True)
        if not deleted.ok:
            return deleted
        return RuntimeResult(
            ["lifecycle", cid],
            0,
            "",
            created.stderr + deleted.stderr,
            created.duration + deleted.duration,
            extra={"create": created.duration, "delete": deleted.duration},
        )

    def full_lifecycle(
        self, bundle: str | os.PathLike[str], container_id: str | None = None
    ) -> dict[str, RuntimeResult]:
        """create, state, start, state, kill, delete: every step's result by name."""
        cid = container_id or unique_name("rfc", maxlen=40)
        steps: dict[str, RuntimeResult] = {"create": self.create(cid, bundle)}
        if steps["create"].ok:
            steps["state-created"] = self.state(cid)
            steps["start"] = self.start(cid)
            steps["state-running"] = self.state(cid)
            steps["kill"] = self.kill(cid)
        steps["delete"] = self.delete(cid, force=True)
        return steps

    def probe(self, bundle: str | os.PathLike[str]) -> bool:
        """Health probe: a trivial lifecycle succeeds (raises with stderr if not)."""
        self.lifecycle(bundle).check()
        return True

    def cleanup(self) -> list[str]:
        """``delete --force`` every container this runtime still knows; their ids."""
        ids = [str(c.get("id")) for c in self.containers() if c.get("id")]
        for cid in ids:
            self.delete(cid, force=True)
        return ids

    def close(self) -> None:
        """Delete leftover containers and the state directory (host runs)."""
        with swallowed(Exception, "deleting the leftover containers of %s", self.root):
            self.cleanup()
        if self._host_root:
            with swallowed(OSError, "removing the runtime state directory %s", self.root):
                shutil.rmtree(self.root)
        if self._rid is not None and self.journal is not None:
            self.journal.release(self._rid)
            self._rid = None

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def host_processes(self) -> set[str]:
        """``PID:cmdline`` of host processes mentioning this runtime's state directory."""
        found: set[str] = set()
        for pid in host_proc.pids_with_arg(str(self.root)):
            text = " ".join(host_proc.cmdline(pid) or [])
            found.add(f"{pid}:{text[:120]}")
        return found
