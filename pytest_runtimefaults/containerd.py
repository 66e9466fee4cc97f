"""A private containerd: root, state, socket and CNI directory in a temp dir.

The real containerd (Debian's ``containerd`` package), run on the
:class:`~pytest_runtimefaults.daemon.Daemon` harness, so a test can SIGKILL it
mid-operation, restart it over its stale socket and measure how long it takes
to serve again, without touching the host's containerd (``/run/containerd``,
``/var/lib/containerd``) or its CNI configuration (``/etc/cni/net.d``).

containerd and its shims put shim sockets (``/run/containerd/s``), ``ctr``'s
FIFOs (``/run/containerd/fifo``) and runc's state (``/run/containerd/runc``)
under ``/run/containerd`` whatever the config says, and a SIGKILLed shim leaves
its socket there forever.  So containerd, its shims and every ``ctr`` run in a
mount namespace of the instance's own, kept across restarts (bound to
``<dir>/ns/mnt``, as ``ip netns`` keeps network namespaces), where ``/run`` is a
private tmpfs and ``/run/containerd`` is ``<dir>/run``: what a killed shim
leaves stays where a restart finds it, as on a real host, and goes with the
directory.

Everything lives under one private directory::

    <dir>/config.toml       generated (plus your extra TOML text)
    <dir>/root, <dir>/state containerd's root and state
    <dir>/containerd.sock   the gRPC socket (:attr:`Containerd.address`)
    <dir>/debug.sock        the debug socket: pprof, for :meth:`Containerd.goroutines`
    <dir>/net.d             the CNI conf dir of the CRI plugin (when enabled)
    <dir>/run               /run/containerd in its mount namespace (shim sockets...)
    <dir>/ns/mnt            that mount namespace (its nsfs file bound there,
                            on a private bind mount of <dir>/ns)
    <dir>/containerd.log    output of every instance

The CRI plugin is disabled unless ``cri=True``: it is slow to start and most
tests only need the core services (images, containers, tasks, events).

:meth:`Containerd.stop` stops containerd, then ends what it left: shims
(``containerd-shim-runc-v2 ... -address <dir>/containerd.sock``) and their
containers' processes, mounts under ``<dir>`` (rootfs overlays), and the
directory.  The same cleanup is journaled (kind ``containerd``) so the next
run does it if this one was killed.

Example::

    from pytest_runtimefaults.containerd import Containerd

    with Containerd() as ctd:
        print(ctd.ctr("version").stdout)
        seconds = ctd.crash_restart()       # SIGKILL, restart over the stale socket
        ctd.ctr("namespaces", "ls")
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_runtimefaults.core.log import logger, swallowed
from pytest_runtimefaults.daemon import Daemon
from pytest_runtimefaults.host import cgroups
from pytest_runtimefaults.host import proc as host_proc
from pytest_runtimefaults.host.mounts import mount_table
from pytest_runtimefaults.host.rootfs import busybox_image_tar
from pytest_runtimefaults.journal import Journal, RefusedToReap, check_owned_path
from pytest_runtimefaults.naming import unique_name

if TYPE_CHECKING:
    from pytest_runtimefaults.faults import FaultRegistry

__all__ = [
    "CRI_PLUGIN",
    "Containerd",
    "CtrError",
    "busybox_oci_tar",
    "cleanup_containerd_dir",
    "kill_namespace_processes",
    "remove_namespace_cgroups",
]

#: The CRI plugin's id in containerd 1.6 config (``plugins."<id>"``).
CRI_PLUGIN = "io.containerd.grpc.v1.cri"

# Snapshotters that only log errors on a plain host: disabled to keep logs clean.
_NOISY_PLUGINS = (
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
)


class CtrError(subprocess.CalledProcessError):
    """``ctr`` failed; the message includes its stderr (``connection refused``...)."""

    def __str__(self) -> str:
        return f"{super().__str__()}: {str(self.stderr or '').strip()}"


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket (containerd's debug socket)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("containerd", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


_GOROUTINE_TOTAL = re.compile(rb"^goroutine profile: total (\d+)", re.MULTILINE)


def _toml_str(value: str | os.PathLike[str]) -> str:
    # JSON string escaping is valid TOML basic-string escaping for paths.
    return json.dumps(os.fspath(value))


def _pids_mentioning(needle: str) -> list[int]:
    """PIDs whose command line contains *needle* (a unique private path)."""
    return host_proc.pids_with_arg(needle)


def _mounts_under(directory: str) -> list[str]:
    """Mount points at or below *directory* in this mount namespace, deepest first."""
    prefix = directory.rstrip("/") + "/"
    found = {
        m.target for m in mount_table() if m.target == directory or m.target.startswith(prefix)
    }
    return sorted(found, key=lambda t: -t.count("/"))


def _children_of(pids: Sequence[int]) -> list[int]:
    """All descendants of *pids* (the processes of containers a shim runs)."""
    return [child for pid in pids for child in host_proc.children(pid, recursive=True)]


def _comm(pid: int) -> str:
    return host_proc.comm(pid)


def _alive(pid: int) -> bool:
    """True if *pid* exists and is not a zombie (dead, its parent not yet waiting)."""
    return host_proc.alive(pid)


def cleanup_containerd_dir(directory: str, *, remove: bool = True) -> list[int]:
    """End every process that names *directory* (shims) and its descendants
    (container processes), unmount what is mounted below it, remove it.

    Returns the PIDs killed.  Safe to call twice; used by
    :meth:`Containerd.stop` and by the journal reaper.
    """
    killed: list[int] = []
    spared = host_proc.ancestors()
    for _ in range(3):  # a shim may spawn while we look; go round until none is left
        named = _pids_mentioning(directory)
        victims = [p for p in [*_children_of(named), *named] if p not in spared and _alive(p)]
        if not victims:
            break
        for pid in victims:
            with swallowed(ProcessLookupError, "killing %d", pid):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        for pid in victims:
            # Wait (briefly) for each to go, so its mounts and files can be removed.
            for _wait in range(200):
                if not _alive(pid):
                    break
                time.sleep(0.005)
    for target in _mounts_under(directory):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True, timeout=30)
    if remove:
        with swallowed(OSError, "removing %s", directory):
            shutil.rmtree(directory)
    return killed


_MS_BIND = 4096
_MS_PRIVATE = 1 << 18


def _mount(source: str | None, target: str, flags: int) -> None:
    """The ``mount(2)`` call (a bind, a propagation change), or RuntimeError.

    The classic call, not ``mount --bind``: util-linux 2.41 binds through the
    new mount API (``open_tree`` + ``move_mount``), which says ELOOP where the
    kernel refuses a namespace file, instead of mount(2)'s EINVAL.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    src = source.encode() if source is not None else None
    if libc.mount(src, target.encode(), None, flags, None) != 0:
        errno = ctypes.get_errno()
        raise RuntimeError(
            f"cannot keep containerd's mount namespace at {target}: "
            f"mount({source}, {target}, flags {flags:#x}): {os.strerror(errno)}"
        )


def _namespace_cgroups(namespace: str) -> list[Path]:
    if not namespace or "/" in namespace or namespace in (".", ".."):
        return []
    found = []
    for mount in cgroups.cgroup_mounts():
        top = Path(mount) / namespace
        if top.is_dir() and not top.is_symlink():
            found.append(top)
    return found


def kill_namespace_processes(namespace: str) -> list[int]:
    """SIGKILL every process in runc's cgroups for *namespace* (``/<namespace>/...``).

    Finds container processes whatever happened to their shim: after a shim
    dies its containers are reparented to PID 1 and nothing else names them.
    Only call it for a namespace name that is private to us.
    """
    pids = cgroups.kill_tree(_namespace_cgroups(namespace), timeout=1.0)
    for pid in pids:
        for _ in range(200):
            if not _alive(pid):
                break
            time.sleep(0.005)
    return pids


def remove_namespace_cgroups(namespace: str) -> None:
    """Kill what is left in runc's cgroups for *namespace* and remove them, in
    every v1 hierarchy and in cgroup2.  Only for a namespace name private to us."""
    kill_namespace_processes(namespace)
    for top in _namespace_cgroups(namespace):
        # A killed task leaves its cgroup a moment later: remove_tree retries.
        cgroups.remove_tree(top, timeout=0.5)


def remove_host_runc_state(namespace: str) -> None:
    """Remove ``/run/containerd/runc/<namespace>``, which a shim of a containerd
    outside its own mount namespace leaves (see ``Containerd.private_run``).
    Only for a namespace name this project makes (``rfns...``): ours alone."""
    if not namespace.startswith("rfns") or "/" in namespace:
        return
    state = Path("/run/containerd/runc") / namespace
    if state.is_dir() and not state.is_symlink():
        with swallowed(OSError, "removing runc state %s", state):
            shutil.rmtree(state)


def _is_our_containerd_dir(directory: str) -> bool:
    # The config we generate names the directory's own root: a directory
    # holding it is one a Containerd of ours made (the user's own included).
    try:
        text = (Path(directory) / "config.toml").read_text()
    except OSError:
        return False
    return f"root = {_toml_str(Path(directory) / 'root')}" in text.splitlines()


def _reap_containerd(record: dict[str, Any]) -> None:
    """Journal reaper for kind ``containerd``: what a killed run's containerd left.

    Refused unless the directory is recognisably ours: a name the project makes
    under a temporary directory, or a directory holding the config.toml we
    write.  Kills every process naming it, so a crafted ``/`` would be the host.
    """
    directory = record.get("dir")
    if not isinstance(directory, str) or directory.count("/") < 2:
        raise RefusedToReap(f"dir {directory!r} is not a containerd directory of ours")
    try:
        check_owned_path(directory)
        generated_name = True
    except RefusedToReap:
        generated_name = False
    if not generated_name and not _is_our_containerd_dir(directory):
        raise RefusedToReap(
            f"{directory} is neither a directory this project names nor one holding "
            "the config.toml a Containerd writes"
        )
    cleanup_containerd_dir(directory, remove=generated_name and bool(record.get("remove", True)))
    namespace = record.get("namespace")
    if namespace:
        if not isinstance(namespace, str) or not namespace.startswith("rfns"):
            raise RefusedToReap(f"namespace {namespace!r} is not one this project makes")
        remove_namespace_cgroups(namespace)
        remove_host_runc_state(namespace)


def busybox_oci_tar(busybox: str = "/bin/busybox", tag: str = "latest") -> bytes:
    """An OCI image layout (as tar bytes) of a busybox rootfs, tagged *tag*.

    Kept for compatibility: built by the one builder,
    :func:`pytest_runtimefaults.host.rootfs.busybox_image_tar`.
    """
    return busybox_image_tar(busybox, ref=f"localhost/runtimefaults/busybox:{tag}")


class Containerd:
    """containerd with a private root, state, socket and CNI conf dir.

    *directory*: where everything lives (default: a new temp dir, removed on
    :meth:`stop`; keep the path short, a Unix socket path has at most 107
    bytes).  *socket_path*: the gRPC socket (default ``<dir>/containerd.sock``;
    ``@name`` for an abstract socket); the ttrpc socket is next to it.
    *cri*: enable the CRI plugin, with its CNI ``conf_dir`` at
    :attr:`cni_conf_dir` (default ``<dir>/net.d``) and ``bin_dir`` at
    *cni_bin_dir*.  *extra_config*: TOML text appended to the generated
    config; it may only hold tables (``[plugins."..."]``), since top-level
    keys must come first in TOML; for the CRI plugin's own table use
    *cri_config* (lines added to ``[plugins."io.containerd.grpc.v1.cri"]``).
    *disabled_plugins* is added to the plugins disabled by default.

    *log_level* is containerd's (``debug`` shows every event and CNI reload).
    *namespace*: the containerd namespace ``ctr`` uses (default: a unique
    name, so runc's cgroups ``/<namespace>/<id>`` are ours to remove; with a
    name given, its cgroups are left alone).
    :meth:`import_busybox` and :meth:`run` give a test containers to run.
    *netns*: a network namespace (a path) to run containerd in (the CNI
    fixtures' sandbox).  containerd, its shims and :meth:`ctr` run in the
    instance's own mount namespace (:attr:`mount_ns_path`), where
    ``/run/containerd`` is :attr:`run_dir` (see the module doc).
    *ready_timeout*, *journal*, *registry*: as for
    :class:`~pytest_runtimefaults.daemon.Daemon` (:attr:`daemon`).
    """

    def __init__(
        self,
        *,
        directory: str | os.PathLike[str] | None = None,
        socket_path: str | os.PathLike[str] | None = None,
        cri: bool = False,
        cni_conf_dir: str | os.PathLike[str] | None = None,
        cni_bin_dir: str | os.PathLike[str] = "/usr/lib/cni",
        cri_config: str = "",
        extra_config: str = "",
        disabled_plugins: Sequence[str] = (),
        log_level: str = "debug",
        binary: str = "containerd",
        ctr_binary: str = "ctr",
        namespace: str | None = None,
        netns: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 20.0,
        journal: Journal | None = None,
        registry: FaultRegistry | None = None,
    ) -> None:
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="rfctd-"))
        self.cri = cri
        self.cni_conf_dir = Path(cni_conf_dir) if cni_conf_dir else self.directory / "net.d"
        self.cni_bin_dir = Path(cni_bin_dir)
        self.cri_config = cri_config
        self.extra_config = extra_config
        self.disabled_plugins = list(disabled_plugins)
        self.log_level = log_level
        self.binary = binary
        self.ctr_binary = ctr_binary
        # A namespace of our own: runc's cgroups are /<namespace>/<id>, so a
        # unique name keeps them apart from anyone else's and easy to remove.
        self.namespace = namespace or unique_name("rfns")
        # Only a name we made up is ours: "k8s.io" cgroups may be a host's.
        self._own_namespace = namespace is None
        # Journaled by default (the journal `runtimefaults cleanup` reads).
        self.journal = journal if journal is not None else Journal.default()
        self._journal_id: int | None = None
        self.root = self.directory / "root"
        self.state = self.directory / "state"
        self.address = os.fspath(socket_path or self.directory / "containerd.sock")
        self.config_path = self.directory / "config.toml"
        self.run_dir = self.directory / "run"
        self.mount_ns = self.directory / "ns" / "mnt"
        self.netns = os.fspath(netns) if netns is not None else None
        # pprof over a Unix socket: how goroutine leaks are seen (goroutines()).
        self.debug_address = os.fspath(self.directory / "debug.sock")
        if len(self.address.encode()) > 107:
            raise ValueError(
                f"socket path {self.address!r} is longer than 107 bytes: use a shorter directory"
            )
        self._command = [binary, "--config", str(self.config_path)]
        #: False where the kernel refused to keep the mount namespace (see
        #: :meth:`prepare`): containerd then uses the host's /run/containerd.
        self.private_run = True
        # The process that keeps the namespace where the kernel refused the
        # bind of its file (see _ensure_mount_namespace), else None.
        self._holder: subprocess.Popen[str] | None = None
        self.daemon = Daemon(
            self._enter_argv() + self._command,
            exec_argv=self._command,
            env=env,
            socket_path=self.address,
            # Both: a socket that accepts may be someone else's (a stale_socket
            # "live" variant); the log line is this instance's own word.
            ready_log=r"containerd successfully booted",
            ready_timeout=ready_timeout,
            name="containerd",
            log_path=self.directory / "containerd.log",
            journal=self.journal,
            registry=registry,
        )

    # -- configuration ---------------------------------------------------------

    def config_text(self) -> str:
        """The config.toml this instance runs with (version 2 schema)."""
        disabled = [*_NOISY_PLUGINS, *self.disabled_plugins]
        if not self.cri:
            disabled.append(CRI_PLUGIN)
        lines = [
            "version = 2",
            f"root = {_toml_str(self.root)}",
            f"state = {_toml_str(self.state)}",
            "disabled_plugins = [" + ", ".join(_toml_str(p) for p in disabled) + "]",
            "",
            "[grpc]",
            f"  address = {_toml_str(self.address)}",
            "",
            "[ttrpc]",
            f"  address = {_toml_str(self.address + '.ttrpc')}",
            "",
            "[debug]",
            f"  address = {_toml_str(self.debug_address)}",
            f"  level = {_toml_str(self.log_level)}",
            "",
            "[metrics]",
            '  address = ""',
            "",
        ]
        if self.cri:
            lines += [
                f'[plugins."{CRI_PLUGIN}"]',
                *(f"  {line.strip()}" for line in self.cri_config.splitlines() if line.strip()),
                "",
                f'[plugins."{CRI_PLUGIN}".cni]',
                f"  bin_dir = {_toml_str(self.cni_bin_dir)}",
                f"  conf_dir = {_toml_str(self.cni_conf_dir)}",
                "",
            ]
        if self.extra_config.strip():
            lines += ["# extra_config", self.extra_config.strip(), ""]
        return "\n".join(lines)

    # -- lifecycle -----------------------------------------------------------------

    def __enter__(self) -> Containerd:
        # __exit__ is not called when __enter__ raises: clean up here.
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def prepare(self) -> None:
        """Create the directories and write the config, without starting.

        For tests that start :attr:`daemon` themselves (e.g. through
        :meth:`~pytest_runtimefaults.sockets.StaleSocket.judge`).
        """
        if self._journal_id is None:
            # Recorded first, reaped last: after the daemon itself.
            self._journal_id = self.journal.add(
                "containerd",
                dir=str(self.directory),
                namespace=self.namespace if self._own_namespace else "",
                remove=self._own_dir,
            )
        for d in (self.directory, self.root, self.state, self.cni_conf_dir, self.run_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o711)
        self.config_path.write_text(self.config_text())
        if self.private_run:
            try:
                self._ensure_mount_namespace()
            except RuntimeError as exc:
                # The namespace could not be made at all (no unshare, no root):
                # run as before this harness had it, and say so.
                logger.warning("%s: containerd runs in this mount namespace", exc)
                self.private_run = False
        self.daemon.argv = self._enter_argv() + self._command

    def _enter_argv(self) -> list[str]:
        """The ``nsenter`` before containerd: its mount namespace, the CNI
        sandbox's network namespace (every file is opened before any is
        entered: the network namespace's path is the host's, and the mount
        namespace hides /run)."""
        enter = [f"--mount={self.mount_ns_path}"] if self.private_run else []
        enter += [f"--net={self.netns}"] if self.netns is not None else []
        return ["nsenter", *enter] if enter else []

    @property
    def mount_ns_path(self) -> str:
        """The file that names containerd's mount namespace: :attr:`mount_ns`,
        or ``/proc/PID/ns/mnt`` of the process that keeps it where the kernel
        refused to bind the namespace onto :attr:`mount_ns`."""
        if self._holder is not None and self._holder.poll() is None:
            return f"/proc/{self._holder.pid}/ns/mnt"
        return str(self.mount_ns)

    @property
    def shim_socket_dir(self) -> Path:
        """Where this containerd's shims have their sockets (``/run/containerd/s``
        as containerd sees it)."""
        return self.run_dir / "s" if self.private_run else Path("/run/containerd/s")

    def _ensure_mount_namespace(self) -> None:
        """Make :attr:`mount_ns` (once; it outlives containerd's restarts).

        A holder process unshares the namespace and sets its mounts up; this
        process binds the holder's ``/proc/PID/ns/mnt`` onto :attr:`mount_ns`
        once the holder says so, checks that it is another namespace than its
        own, then lets the holder go.  (``unshare --mount=FILE`` does the same
        from a forked child, which in util-linux 2.41 sometimes bound before the
        parent had unshared: the kernel refused, EINVAL, in Debian 13 runs.)

        Where the kernel refuses the bind (EINVAL, seen now and then in the
        Debian 13 and sid containers of the matrix, cause not found; and
        always where the namespace file's directory propagates into the new
        namespace), the holder is kept instead, until :meth:`stop`, and
        :attr:`mount_ns_path` names its namespace: containerd still gets a
        private /run.  It waits on a pipe from this process, so it ends with it.
        """
        if self._holder is not None and self._holder.poll() is None:
            return
        targets = {m.target for m in mount_table()}
        if str(self.mount_ns) in targets:
            return
        # The file goes on a private mount of its own (as ``ip netns`` does):
        # on a shared one (/tmp in some containers) the bind would propagate
        # into the namespace itself, which the kernel refuses (EINVAL).
        nsdir = self.mount_ns.parent
        nsdir.mkdir(mode=0o700, exist_ok=True)
        if str(nsdir) not in targets:
            _mount(str(nsdir), str(nsdir), _MS_BIND)
            _mount(None, str(nsdir), _MS_PRIVATE)
        self.mount_ns.touch(mode=0o600)
        # slave: the host's mounts come in, none of containerd's go out.  The
        # holder waits on its stdin: if this process dies, so does the holder.
        script = (
            "mount -t tmpfs -o mode=0755 rfrun /run"
            " && mkdir -p /run/containerd /run/netns"
            ' && mount --bind "$0" /run/containerd'
            " && echo ready && read _"
        )
        holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "slave", "sh", "-c", script, str(self.run_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None
            ready, _, _ = select.select([holder.stdout], [], [], 30)
            said = holder.stdout.readline() if ready else ""
            if said.strip() != "ready":
                holder.kill()
                _, err = holder.communicate(timeout=10)
                raise RuntimeError(
                    f"cannot make containerd's mount namespace for {self.directory}: "
                    f"{err.strip() or 'unshare gave no answer in 30 s'} (needs root and "
                    "util-linux's unshare)"
                )
            theirs = f"/proc/{holder.pid}/ns/mnt"
            if os.stat(theirs).st_ino == os.stat("/proc/self/ns/mnt").st_ino:
                raise RuntimeError(f"unshare --mount left PID {holder.pid} in our namespace")
            try:
                _mount(theirs, str(self.mount_ns), _MS_BIND)
            except RuntimeError as exc:
                logger.info("%s: the namespace is kept by PID %d instead", exc, holder.pid)
                self._holder = holder
        finally:
            if self._holder is not holder:
                self._release_holder(holder)

    @staticmethod
    def _release_holder(holder: subprocess.Popen[str]) -> None:
        """Let a namespace holder go (it exits on a line or EOF), or kill it."""
        if holder.poll() is None:
            with swallowed((OSError, subprocess.TimeoutExpired), "letting the ns holder go"):
                holder.communicate(input="\n", timeout=10)
        if holder.poll() is None:
            holder.kill()
            holder.wait()

    def start(self) -> float:
        """Write the config and start containerd; returns seconds until it serves."""
        self.prepare()
        if self.daemon.running:
            return 0.0
        seconds = self.daemon.start()
        assert seconds is not None
        return seconds

    def stop(self) -> None:
        """Stop containerd and remove everything it left (idempotent).

        While it still serves, its tasks and containers are deleted through
        ``ctr`` (so runc removes their cgroups and state); then containerd is
        stopped and anything left (shims, container processes, mounts,
        cgroups, the directory) is removed by force.
        """
        try:
            if self.daemon.running:
                with swallowed(Exception, "removing containerd's containers through ctr"):
                    self.remove_all_containers(timeout=10)
            # Containers and shims first, while the shims are still their
            # parents (the daemon's stop kills its session, shims included,
            # and orphaned containers would be reparented out of reach).
            if self._own_namespace:
                kill_namespace_processes(self.namespace)
            cleanup_containerd_dir(str(self.directory), remove=False)
            self.daemon.stop()
        finally:
            cleanup_containerd_dir(str(self.directory), remove=self._own_dir)
            if self._own_namespace:
                remove_namespace_cgroups(self.namespace)
                if not self.private_run:
                    remove_host_runc_state(self.namespace)
            if self._holder is not None:
                self._release_holder(self._holder)
                self._holder = None
            if self._journal_id is not None:
                self.journal.release(self._journal_id)
                self._journal_id = None

    def kill(self, sig: int = signal.SIGKILL) -> int | None:
        """Kill containerd itself (not its shims), as an OOM kill would."""
        return self.daemon.kill(sig)

    def restart(self) -> float:
        """Start containerd again (stopping it first if it runs); seconds to ready."""
        return self.daemon.restart()

    def crash_restart(self, sig: int = signal.SIGKILL) -> float:
        """Kill with *sig*, restart over the stale socket; seconds from kill to serving."""
        return self.daemon.crash_restart(sig)

    @property
    def running(self) -> bool:
        return self.daemon.running

    @property
    def pid(self) -> int | None:
        return self.daemon.pid

    @property
    def logs(self) -> str:
        return self.daemon.logs

    def fatal_errors(self) -> list[str]:
        return self.daemon.fatal_errors()

    def goroutines(self, timeout: float = 5.0) -> int:
        """How many goroutines containerd runs now, from pprof on its debug socket.

        For leak checks: ``subscribers.watch(ctd.pid, log, goroutines=ctd.goroutines)``
        fails when the count does not come back to its baseline.  Raises
        :class:`RuntimeError` naming the socket if containerd does not answer.
        """
        conn = _UnixHTTPConnection(self.debug_address, timeout)
        try:
            conn.request("GET", "/debug/pprof/goroutine?debug=1")
            response = conn.getresponse()
            body = response.read()
        except OSError as exc:
            raise RuntimeError(
                f"containerd's debug socket {self.debug_address} did not answer ({exc}): "
                "is containerd running?"
            ) from exc
        finally:
            conn.close()
        match = _GOROUTINE_TOTAL.search(body)
        if response.status != 200 or match is None:
            raise RuntimeError(
                f"containerd's debug socket {self.debug_address}: HTTP {response.status}, "
                f"no goroutine total in {body[:120]!r}"
            )
        return int(match.group(1))

    # -- clients ---------------------------------------------------------------------

    def ctr_argv(self, *args: str) -> list[str]:
        """``ctr -a <socket> -n <namespace> args...`` as an argv list, run in
        containerd's mount namespace (its FIFOs go to :attr:`run_dir`)."""
        mounted = self.private_run and (self._holder is not None or self.mount_ns.exists())
        enter = ["nsenter", f"--mount={self.mount_ns_path}"] if mounted else []
        return [*enter, self.ctr_binary, "-a", self.address, "-n", self.namespace, *args]

    def ctr(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 60.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr -a <socket> -n <namespace> args...``; raise with its stderr on failure."""
        argv = self.ctr_argv(*args)
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, input=input, check=False
        )
        if check and result.returncode != 0:
            raise CtrError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def run_argv(
        self, image: str, container_id: str, *command: str, rm: bool = True, detach: bool = False
    ) -> list[str]:
        """``ctr run`` of *image* as *container_id*, runc's state kept in our directory."""
        flags = ["--runc-root", str(self.directory / "runc")]
        flags += ["--rm"] if rm and not detach else []
        flags += ["--detach"] if detach else []
        return self.ctr_argv("run", *flags, image, container_id, *command)

    def run(
        self,
        image: str,
        container_id: str,
        *command: str,
        detach: bool = False,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run a container (``--rm`` unless *detach*) and return ctr's result."""
        argv = self.run_argv(image, container_id, *command, detach=detach)
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if result.returncode != 0:
            raise CtrError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def import_busybox(
        self, ref: str = "localhost/runtimefaults/busybox:latest", busybox: str = "/bin/busybox"
    ) -> str:
        """Import a one-layer image holding a static busybox; returns its reference.

        Needs ``busybox-static`` (a dynamically linked busybox would miss its
        libraries in the container).
        """
        tar = self.directory / "busybox-oci.tar"
        tar.write_bytes(busybox_image_tar(busybox, ref=ref))
        base = ref.rsplit(":", 1)[0]
        self.ctr("images", "import", "--base-name", base, str(tar))
        tar.unlink()
        return ref

    def remove_all_containers(self, timeout: float = 30.0) -> None:
        """Kill and delete every task and container of :attr:`namespace`."""
        tasks = self.ctr("tasks", "ls", "-q", timeout=timeout).stdout.split()
        for task in tasks:
            self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False, timeout=timeout)
        for task in tasks:
            for _ in range(50):
                if self.ctr("tasks", "delete", task, check=False, timeout=timeout).returncode == 0:
                    break
                time.sleep(0.05)
        for container in self.ctr("containers", "ls", "-q", timeout=timeout).stdout.split():
            self.ctr("containers", "delete", container, check=False, timeout=timeout)

    def remove_orphan_snapshots(self, timeout: float = 30.0) -> list[str]:
        """Remove active snapshots no container uses (left by a run that was
        interrupted: ``snapshot "ID": already exists`` on the next run)."""
        containers = set(self.ctr("containers", "ls", "-q", timeout=timeout).stdout.split())
        removed = []
        for line in self.ctr("snapshots", "ls", timeout=timeout).stdout.splitlines()[1:]:
            fields = line.split()
            orphan = len(fields) >= 3 and fields[2] == "Active" and fields[0] not in containers
            if orphan and self.ctr("snapshots", "rm", fields[0], check=False).returncode == 0:
                removed.append(fields[0])
        return removed

    def shim_pids(self) -> list[int]:
        """PIDs of the shims of this containerd (they name its socket)."""
        return [p for p in _pids_mentioning(self.address) if p != self.pid]

    def shims(self) -> dict[str, int]:
        """Task ID -> PID of each shim of this containerd (its ``-id`` argument)."""
        found: dict[str, int] = {}
        for pid in self.shim_pids():
            argv = host_proc.cmdline(pid) or []
            if "-id" in argv[:-1]:
                found[argv[argv.index("-id") + 1]] = pid
        return found

    def orphan_shims(self, timeout: float = 30.0) -> dict[str, int]:
        """Shims serving a task containerd does not list (ID -> PID).

        Measured on containerd 1.6.20: SIGKILLed while ``ctr run`` creates a
        task, containerd can restart without knowing the shim it had just
        started; the shim lives on and the ID cannot be used again
        (``task ID: already exists``), even after more restarts, until the shim
        is killed.
        """
        tasks = set(self.ctr("tasks", "ls", "-q", timeout=timeout).stdout.split())
        return {tid: pid for tid, pid in self.shims().items() if tid not in tasks}

    def orphan_bundles(self, timeout: float = 30.0) -> list[str]:
        """Task bundle directories with no listed task and no shim (IDs).

        Measured on containerd 1.6.20: SIGKILLed between creating a task's
        bundle and starting its shim, containerd leaves the directory and the
        next task with that ID fails with ``failed to start shim: mkdir
        .../<id>: file exists``.
        """
        bundles = self.state / "io.containerd.runtime.v2.task" / self.namespace
        if not bundles.is_dir():
            return []
        tasks = set(self.ctr("tasks", "ls", "-q", timeout=timeout).stdout.split())
        shims = self.shims()
        return sorted(p.name for p in bundles.iterdir() if p.name not in tasks | set(shims))

    def remove_orphan_bundles(self) -> list[str]:
        """Unmount and remove :meth:`orphan_bundles`; returns their IDs."""
        removed = self.orphan_bundles()
        for tid in removed:
            bundle = self.state / "io.containerd.runtime.v2.task" / self.namespace / tid
            for target in _mounts_under(str(bundle)):
                subprocess.run(["umount", "-l", target], check=False, capture_output=True)
            with swallowed(OSError, "removing the orphan bundle %s", bundle):
                shutil.rmtree(bundle)
        return removed

    def orphans(self) -> set[str]:
        """Everything an interrupted operation left that containerd does not
        clean up by itself: shims, bundles and processes (in runc's cgroups) of
        unknown tasks, active snapshots of no container.  Used as the
        containerd fixture's leak check."""
        containers = set(self.ctr("containers", "ls", "-q").stdout.split())
        found = {f"shim of unknown task {t} (pid {p})" for t, p in self.orphan_shims().items()}
        tasks = set(self.ctr("tasks", "ls", "-q").stdout.split())
        for cid, pids in self.cgroup_processes().items():
            if cid not in tasks:
                found |= {f"process of unknown task {cid} (pid {p}: {_comm(p)})" for p in pids}
        found |= {f"task bundle without shim: {t}" for t in self.orphan_bundles()}
        for line in self.ctr("snapshots", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "Active" and fields[0] not in containers:
                found.add(f"active snapshot of no container: {fields[0]}")
        return found

    def remove_orphans(self) -> None:
        """Remove all :meth:`orphans` (shims first, then bundles and snapshots)."""
        self.kill_orphan_shims()
        self.kill_orphan_processes()
        time.sleep(0.1)  # containerd reaps a dead shim's task
        self.remove_orphan_bundles()
        self.remove_orphan_snapshots()

    def cgroup_processes(self) -> dict[str, set[int]]:
        """Container ID -> PIDs in runc's cgroups ``/<namespace>/<id>`` (all hierarchies)."""
        found: dict[str, set[int]] = {}
        for top in _namespace_cgroups(self.namespace):
            for sub in top.iterdir():
                if not sub.is_dir():
                    continue
                pids = cgroups.tasks([sub])
                if pids:
                    found.setdefault(sub.name, set()).update(pids)
        return found

    def kill_orphan_processes(self) -> list[int]:
        """SIGKILL processes in the cgroups of containers with no listed task
        (a ``runc init`` left waiting by an interrupted create)."""
        tasks = set(self.ctr("tasks", "ls", "-q").stdout.split())
        victims = [p for cid, ps in self.cgroup_processes().items() if cid not in tasks for p in ps]
        for pid in victims:
            with swallowed(ProcessLookupError, "killing orphan %d", pid):
                os.kill(pid, signal.SIGKILL)
        return victims

    def kill_orphan_shims(self) -> dict[str, int]:
        """SIGKILL :meth:`orphan_shims` (and their containers); returns what was killed."""
        orphans = self.orphan_shims()
        for pid in [*_children_of(list(orphans.values())), *orphans.values()]:
            with swallowed(ProcessLookupError, "killing orphan shim %d", pid):
                os.kill(pid, signal.SIGKILL)
        return orphans
