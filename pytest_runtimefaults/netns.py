"""Network namespaces, CNI plugin calls and network-state snapshots, on pyroute2.

A container runtime sets up a container's network by creating a network
namespace and running CNI plugins (``bridge``, ``macvlan``, ``ptp``...) with
``CNI_COMMAND=ADD`` and the network configuration on stdin.  This module does
the same, so tests can drive the *real* plugins the way a runtime does, and it
keeps the host untouched: :class:`CniSandbox` owns a private "host" namespace
in which the plugins run (bridges, macvlan masters and host-side veths live
there, never in the machine's root namespace) and creates one namespace per
container.  Everything is journaled as it is created and removed on ``stop()``.

Snapshots for leak checks (``FaultRegistry.add_leak_check``) return sets of
strings: namespaces, links (with their kind), addresses and host-local IPAM
reservations.

Example::

    with CniSandbox() as sandbox:
        ns = sandbox.container("c1")
        result = sandbox.add(conflist, ns, container_id="c1")
        print(result.ips)                      # ['10.64.0.2/24']
        print(link_kind(ns.name, "eth0"))      # 'veth'
        sandbox.delete(conflist, ns, container_id="c1")
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_runtimefaults import naming
from pytest_runtimefaults.core.log import swallowed

if TYPE_CHECKING:
    from pytest_runtimefaults.journal import Journal

__all__ = [
    "NETNS_DIR",
    "CniError",
    "CniResult",
    "CniSandbox",
    "LinkInfo",
    "NetNS",
    "invoke_plugin",
    "iproute",
    "link_kind",
    "list_links",
    "netlink_socket_in",
    "own_namespaces",
    "snapshot_addresses",
    "snapshot_ipam",
    "snapshot_links",
    "snapshot_namespaces",
]

NETNS_DIR = Path("/var/run/netns")
DEFAULT_CNI_PATH = "/usr/lib/cni"


class NetNS:
    """A named network namespace (``/var/run/netns/NAME``) owned by the caller.

    ``start()`` journals it and creates it (``ip netns add``); ``stop()`` removes
    it, which also destroys every link inside it (a veth whose peer lives
    elsewhere disappears with its peer).  Both are idempotent.  Without a
    *journal*, the default one (:meth:`Journal.default
    <pytest_runtimefaults.journal.Journal.default>`, read by ``runtimefaults
    cleanup``) records it, so a killed script's namespace is reaped too.
    """

    def __init__(self, name: str | None = None, *, journal: Journal | None = None) -> None:
        from pytest_runtimefaults.journal import Journal

        self.name = name or naming.unique_name("rfns")
        self.journal = journal if journal is not None else Journal.default()
        self._rid: int | None = None
        self._created = False

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    def start(self) -> NetNS:
        if self._created:
            return self
        # Journaled first: a kill between the two steps leaves a record of a
        # namespace that may not exist (harmless) rather than the reverse.
        self._rid = self.journal.add("netns", name=self.name)
        try:
            # iproute2's `ip netns add`, not pyroute2's netns.create: that forks
            # this (multi-threaded) process without exec, and a forked child can
            # hang for good on a lock another thread held (see netlink_socket_in).
            res = subprocess.run(
                ["ip", "netns", "add", self.name],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if res.returncode != 0:
                raise OSError(
                    f"ip netns add {self.name} exited {res.returncode}: "
                    f"{res.stderr.strip() or res.stdout.strip()}"
                )
        except BaseException:
            self.journal.release(self._rid)
            self._rid = None
            raise
        self._created = True
        return self

    def stop(self) -> None:
        if not self._created:
            return
        from pyroute2 import netns

        with swallowed(OSError, "removing netns %s", self.name):
            netns.remove(self.name)
        self._created = False
        if self._rid is not None:
            self.journal.release(self._rid)
            self._rid = None

    def __enter__(self) -> NetNS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"NetNS({self.name!r})"


@dataclass(frozen=True)
class LinkInfo:
    """One link as pyroute2 reports it."""

    name: str
    kind: str  # 'veth', 'bridge', 'macvlan', 'loopback'... ('' when the kernel gives none)
    index: int
    master: int | None
    addresses: tuple[str, ...] = ()


_CLONE_NEWNET = 0x40000000


def _enter_netns(path: str) -> None:
    """Move the calling *thread* into the network namespace at *path* (setns(2))."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns = getattr(os, "setns", None)  # Python 3.12 and later
        if setns is not None:
            setns(fd, _CLONE_NEWNET)
            return
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into the network namespace {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def netlink_socket_in(netns: str, proto: int = 0) -> socket.socket:
    """A netlink socket (*proto*: ``NETLINK_ROUTE`` by default) of the namespace *netns*.

    *netns* is a name under :data:`NETNS_DIR` or a path to a namespace file;
    an existing one only (``FileNotFoundError`` otherwise: never creates one).
    A socket stays in the namespace it was made in, and setns(2) moves only
    the calling thread: a thread of its own enters the namespace, makes the
    socket and ends.  pyroute2's ``NetNS`` instead forks this process without
    exec to do the same; in a process full of threads (the D-Bus proxy's
    loop, gRPC's, pytest-timeout's) the child can deadlock on a lock a thread
    held at the fork (Python 3.12 warns "use of fork() may lead to deadlocks";
    a CRI scenario's child hung for good once), and the fork copies the whole
    process for one socket.
    """
    path = netns if "/" in netns else str(NETNS_DIR / netns)
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            _enter_netns(path)
            made.append(socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, proto))
        except BaseException as exc:  # handed to the caller's thread
            failed.append(exc)

    worker = threading.Thread(target=run, name="rf-netns-socket", daemon=True)
    worker.start()
    worker.join()
    if failed:
        raise failed[0]
    return made[0]


def iproute(netns: str | None) -> Any:
    """A pyroute2 ``IPRoute`` on this process's namespace (None) or on the existing *netns*.

    *netns* is a name or a path, as for :func:`netlink_socket_in`, through
    which the socket is opened: nothing forks.  Use it as a context manager.
    """
    from pyroute2 import IPRoute

    if netns is None:
        return IPRoute()
    fd = netlink_socket_in(netns).detach()  # the IPRoute's from here (it closes it)
    try:
        return IPRoute(fileno=fd)
    except BaseException:
        os.close(fd)
        raise


def list_links(netns: str | None = None) -> list[LinkInfo]:
    """Every link of *netns* (None: the root namespace of this process)."""
    with iproute(netns) as ipr:
        addrs: dict[int, list[str]] = {}
        for msg in ipr.get_addr():
            addrs.setdefault(msg["index"], []).append(
                f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}"
            )
        out = []
        for msg in ipr.get_links():
            info = msg.get_attr("IFLA_LINKINFO")
            kind = (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or ""
            if msg.get_attr("IFLA_IFNAME") == "lo":
                kind = kind or "loopback"
            out.append(
                LinkInfo(
                    name=msg.get_attr("IFLA_IFNAME"),
                    kind=kind,
                    index=msg["index"],
                    master=msg.get_attr("IFLA_MASTER"),
                    addresses=tuple(sorted(addrs.get(msg["index"], []))),
                )
            )
        return out


def link_kind(netns: str | None, ifname: str) -> str | None:
    """The kind of link *ifname* in *netns* ('macvlan', 'veth', 'bridge'...), or None."""
    for link in list_links(netns):
        if link.name == ifname:
            return link.kind
    return None


def snapshot_namespaces() -> set[str]:
    """Named network namespaces (``ip netns list``), as ``netns:NAME``."""
    try:
        return {f"netns:{name}" for name in os.listdir(NETNS_DIR)}
    except FileNotFoundError:
        return set()


def own_namespaces() -> set[str]:
    """Namespaces this process created (named by :func:`naming.unique_name`) and
    those runtimes name ``cni-*`` (podman, containerd), as ``netns:NAME``.

    Namespaces of other xdist workers or other programs are left out, so a
    leak check is not fooled by a neighbour's test.
    """
    tag = naming.process_tag()
    return {
        entry
        for entry in snapshot_namespaces()
        if entry.startswith("netns:cni-") or (entry.startswith("netns:rf") and tag in entry)
    }


def snapshot_links(netns: str | None = None, kinds: Iterable[str] | None = None) -> set[str]:
    """Links of *netns* as ``link:NS/NAME:KIND`` (bridges, veths, macvlans...),
    only those of *kinds* if given."""
    where = netns or "-"
    wanted = set(kinds) if kinds is not None else None
    return {
        f"link:{where}/{link.name}:{link.kind}"
        for link in list_links(netns)
        if wanted is None or link.kind in wanted
    }


def snapshot_addresses(netns: str | None = None) -> set[str]:
    """Addresses of *netns* as ``addr:NS/IFNAME/ADDR/PREFIX``."""
    where = netns or "-"
    return {
        f"addr:{where}/{link.name}/{addr}" for link in list_links(netns) for addr in link.addresses
    }


def snapshot_ipam(data_dir: Path | str) -> set[str]:
    """host-local IPAM reservations under *data_dir* as ``ipam:NETWORK/IP=CONTAINERID``.

    host-local keeps one file per reserved address (named after the address,
    holding the container id and interface); ``lock`` and ``last_reserved_ip.*``
    are bookkeeping, not reservations.
    """
    root = Path(data_dir)
    out: set[str] = set()
    if not root.is_dir():
        return out
    for network in root.iterdir():
        if not network.is_dir():
            continue
        for entry in network.iterdir():
            if entry.name == "lock" or entry.name.startswith("last_reserved_ip"):
                continue
            try:
                owner = entry.read_text().split()[0] if entry.is_file() else ""
            except (OSError, IndexError):
                owner = ""
            out.add(f"ipam:{network.name}/{entry.name}={owner}")
    return out


class CniError(Exception):
    """A CNI plugin failed: its exit status and its own error object (CNI spec)."""

    def __init__(self, plugin: str, command: str, returncode: int, stdout: bytes, stderr: bytes):
        self.plugin = plugin
        self.command = command
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.code: int | None = None
        self.msg = ""
        self.details = ""
        try:
            obj = json.loads(stdout)
            self.code = int(obj.get("code")) if obj.get("code") is not None else None
            self.msg = str(obj.get("msg", ""))
            self.details = str(obj.get("details", ""))
        except (ValueError, AttributeError, TypeError):
            self.msg = (stdout or stderr).decode(errors="replace").strip()
        super().__init__(
            f"CNI plugin {plugin} {command} failed (rc {returncode}, code {self.code}): "
            f"{self.msg}" + (f": {self.details}" if self.details else "")
        )


@dataclass
class CniResult:
    """The result a plugin printed on ADD (the CNI result JSON), parsed."""

    raw: dict[str, Any]
    duration: float = 0.0

    @property
    def ips(self) -> list[str]:
        return [str(ip["address"]) for ip in self.raw.get("ips", [])]

    @property
    def interfaces(self) -> list[dict[str, Any]]:
        return list(self.raw.get("interfaces", []))


def invoke_plugin(
    command: str,
    config: bytes | Mapping[str, Any],
    *,
    plugin: str | None = None,
    netns: Path | str | None = None,
    ifname: str = "eth0",
    container_id: str = "rf",
    cni_path: str = DEFAULT_CNI_PATH,
    run_in_netns: Path | str | None = None,
    timeout: float = 30.0,
) -> CniResult:
    """Run one CNI plugin as a runtime does; raise :class:`CniError` on failure.

    *config* is the plugin's network configuration, a dict or raw bytes (raw
    bytes are passed as they are, so a truncated file reaches the plugin
    untouched, as it would from a runtime that does not parse it first).
    *plugin* defaults to the config's ``type``.  *run_in_netns* is the
    namespace the plugin itself runs in (where it creates bridges and
    host-side veths); None means this process's namespace.
    """
    data = config if isinstance(config, bytes) else json.dumps(config).encode()
    if plugin is None:
        if isinstance(config, bytes):
            raise ValueError("plugin= is required when config is raw bytes")
        plugin = str(config["type"])
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_IFNAME": ifname,
        "CNI_PATH": cni_path,
    }
    if netns is not None:
        env["CNI_NETNS"] = str(netns)
    binary = os.path.join(cni_path.split(":")[0], plugin)
    argv = [binary]
    if run_in_netns is not None:
        argv = ["nsenter", f"--net={run_in_netns}", binary]
    start = time.monotonic()
    proc = subprocess.run(argv, input=data, env=env, capture_output=True, timeout=timeout)
    duration = time.monotonic() - start
    if proc.returncode != 0:
        raise CniError(plugin, command, proc.returncode, proc.stdout, proc.stderr)
    raw: dict[str, Any] = {}
    if proc.stdout.strip():
        try:
            raw = json.loads(proc.stdout)
        except ValueError:
            raw = {"output": proc.stdout.decode(errors="replace")}
    return CniResult(raw=raw, duration=duration)


@dataclass
class CniSandbox:
    """A private "host" namespace where CNI plugins run, and container namespaces.

    The real plugins create bridges, macvlan masters' children and host-side
    veths in the namespace they run in; running them here keeps all of that
    off the machine's root namespace.  ``stop()`` deletes every namespace it
    created (and so every link in them).
    """

    cni_path: str = DEFAULT_CNI_PATH
    journal: Journal | None = None
    host: NetNS = field(init=False)
    containers: dict[str, NetNS] = field(init=False, default_factory=dict)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _masters: dict[str, str] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.host = NetNS(naming.unique_name("rfh"), journal=self.journal)

    def start(self) -> CniSandbox:
        self.host.start()
        return self

    def stop(self) -> None:
        with self._lock:
            namespaces = list(self.containers.values())
            self.containers.clear()
        for ns in namespaces:
            ns.stop()
        self.host.stop()

    def __enter__(self) -> CniSandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def container(self, key: str | None = None) -> NetNS:
        """A new container namespace (created now, removed by ``stop()``)."""
        ns = NetNS(naming.unique_name("rfc"), journal=self.journal).start()
        with self._lock:
            self.containers[key or ns.name] = ns
        return ns

    def remove_container(self, ns: NetNS) -> None:
        with self._lock:
            for key, value in list(self.containers.items()):
                if value is ns:
                    del self.containers[key]
        ns.stop()

    def master_link(self, name: str | None = None) -> str:
        """A link in the sandbox's host namespace to serve as a macvlan/ipvlan master.

        A veth pair (no dummy driver is needed), both ends up; removed with the
        namespace.
        """
        name = name or naming.unique_name("rfm")
        if name in self._masters:
            return name
        peer = f"{name}p"[:15]
        with iproute(self.host.name) as ipr:
            ipr.link("add", ifname=name, kind="veth", peer=peer)
            for ifname in (name, peer):
                idx = ipr.link_lookup(ifname=ifname)[0]
                ipr.link("set", index=idx, state="up")
        self._masters[name] = peer
        return name

    def invoke(
        self,
        command: str,
        config: bytes | Mapping[str, Any],
        netns: NetNS | None,
        *,
        plugin: str | None = None,
        ifname: str = "eth0",
        container_id: str = "rf",
    ) -> CniResult:
        """Run one plugin in the sandbox for container namespace *netns*."""
        return invoke_plugin(
            command,
            config,
            plugin=plugin,
            netns=netns.path if netns is not None else None,
            ifname=ifname,
            container_id=container_id,
            cni_path=self.cni_path,
            run_in_netns=self.host.path,
        )

    def _plugin_confs(self, conflist: Mapping[str, Any]) -> list[dict[str, Any]]:
        if "plugins" not in conflist:  # a single-plugin .conf
            return [dict(conflist)]
        confs = []
        for plugin in conflist["plugins"]:
            conf = dict(plugin)
            conf["name"] = conflist["name"]
            conf["cniVersion"] = conflist["cniVersion"]
            confs.append(conf)
        return confs

    def add(
        self,
        conflist: Mapping[str, Any],
        netns: NetNS,
        *,
        container_id: str = "rf",
        ifname: str = "eth0",
    ) -> CniResult:
        """ADD a network (a conflist or single conf) as libcni does: plugins in
        order, each given the previous one's result as ``prevResult``."""
        prev: dict[str, Any] | None = None
        result = CniResult(raw={})
        for conf in self._plugin_confs(conflist):
            if prev is not None:
                conf["prevResult"] = prev
            result = self.invoke("ADD", conf, netns, container_id=container_id, ifname=ifname)
            prev = result.raw
        return result

    def check(
        self,
        conflist: Mapping[str, Any],
        netns: NetNS,
        prev_result: Mapping[str, Any],
        *,
        container_id: str = "rf",
        ifname: str = "eth0",
    ) -> None:
        """CHECK a network (CNI >= 0.4.0) against the ADD result."""
        for conf in self._plugin_confs(conflist):
            conf["prevResult"] = dict(prev_result)
            self.invoke("CHECK", conf, netns, container_id=container_id, ifname=ifname)

    def delete(
        self,
        conflist: Mapping[str, Any],
        netns: NetNS | None,
        *,
        container_id: str = "rf",
        ifname: str = "eth0",
    ) -> None:
        """DEL a network: plugins in reverse order (DEL is idempotent by spec)."""
        for conf in reversed(self._plugin_confs(conflist)):
            self.invoke("DEL", conf, netns, container_id=container_id, ifname=ifname)

    def leaked_links(self) -> set[str]:
        """Veths, macvlans and ipvlans in the sandbox's host namespace, but not its
        own macvlan masters: what a DEL must remove.  (Bridges are not counted:
        the bridge plugin never deletes them; they go with the namespace.)"""
        return {
            entry
            for entry in snapshot_links(self.host.name, kinds=("veth", "macvlan", "ipvlan"))
            if entry.split("/", 1)[1].split(":")[0] not in self._all_masters()
        }

    def leaked_addresses(self) -> set[str]:
        """Addresses in the sandbox's host namespace that a DEL must remove:
        not the bridges' gateway addresses, not IPv6 link-local ones, not on
        the sandbox's own masters."""
        masters = self._all_masters()
        return {
            f"addr:{self.host.name}/{link.name}/{addr}"
            for link in list_links(self.host.name)
            if link.kind not in ("bridge", "loopback") and link.name not in masters
            for addr in link.addresses
            if not addr.startswith("fe80:")
        }

    def _all_masters(self) -> set[str]:
        return set(self._masters) | set(self._masters.values())
