"""podman's netavark backend: its network files, its verdict on them, podman on it.

podman 5 has no CNI at all (``cni support is not enabled in this build, only
netavark``); podman 4 can use netavark too.  Either reads its networks from
one directory, one JSON file per network (``NAME.json``: name, id, driver,
network_interface, subnets with gateways, ipv6_enabled, internal,
dns_enabled, ipam_options).  The file faults of :mod:`~pytest_runtimefaults.cni.faults`
work on this directory unchanged (a :class:`NetavarkDir` has the same
``path()``/``remove()``/``fault_files`` as a :class:`~pytest_runtimefaults.cni.CniDir`).

* :func:`netavark_network` builds a network's JSON, :func:`validate_network`
  says why a file would not load (None if it would);
* :class:`NetavarkDir` is a private network config dir (and the watcher on it);
* :class:`NetavarkPodman` runs podman with ``--network-backend netavark`` in
  private storage, **inside a network namespace it owns and a private mount
  namespace**: netavark's bridges, veths, sysctls and iptables rules land in
  that namespace, and podman's IPAM database (always
  ``/run/containers/networks/ipam.db``, no option moves it) is a directory of
  the harness bind-mounted there;
* :func:`host_network_state` is what the host must still look like afterwards
  (root-namespace links, ``iptables-save``/``ip6tables-save``, ``nft list
  ruleset`` where nft is installed, ``/run/containers``).

Example::

    with NetavarkDir() as nv, NetavarkPodman(nv) as podman:
        net = nv.network()
        nv.write(net)                           # NAME.json, temp + fsync + rename
        print(podman.run(net["name"], "ip", "-4", "addr").stdout)
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_runtimefaults import naming
from pytest_runtimefaults.cni.busybox import busybox_rootfs
from pytest_runtimefaults.cni.cgroups import kill_cgroup_tree
from pytest_runtimefaults.cni.config import Content, _remove_tree, encode, next_subnet, write_atomic
from pytest_runtimefaults.cni.podman import private_podman_argv
from pytest_runtimefaults.containerd import cleanup_containerd_dir
from pytest_runtimefaults.core.log import logger, swallowed

if TYPE_CHECKING:
    from pytest_runtimefaults.cni.watcher import TornWriteWatcher
    from pytest_runtimefaults.journal import Journal
    from pytest_runtimefaults.netns import NetNS

__all__ = [
    "HELPER_DIRS",
    "NETAVARK_SUFFIXES",
    "NetavarkDir",
    "NetavarkPodman",
    "find_netavark",
    "host_network_state",
    "netavark_network",
    "netavark_state_argv",
    "validate_network",
]

#: The only files podman's netavark backend loads from its config dir.
NETAVARK_SUFFIXES = (".json",)

#: Where podman looks for netavark (containers.conf ``helper_binaries_dir``).
HELPER_DIRS = (
    "/usr/local/libexec/podman",
    "/usr/local/lib/podman",
    "/usr/libexec/podman",
    "/usr/lib/podman",
)

#: podman's rule for network names (libnetwork's NameRegex).
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
_ID_RE = re.compile(r"^[0-9a-f]{64}$")
_DRIVERS = ("bridge", "macvlan", "ipvlan")


def find_netavark() -> Path | None:
    """netavark's path in podman's helper dirs (or on PATH), None if not installed."""
    for directory in HELPER_DIRS:
        candidate = Path(directory) / "netavark"
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("netavark")
    return Path(found) if found else None


# --- the network file ------------------------------------------------------


def netavark_network(
    name: str | None = None,
    *,
    subnet: str | None = None,
    interface: str | None = None,
    driver: str = "bridge",
    internal: bool = False,
    dns_enabled: bool = False,
) -> dict[str, Any]:
    """A network as podman writes it to ``NAME.json`` (bridge, host-local IPAM).

    The name, the bridge (``network_interface``) and the /24 are unique (see
    :func:`~pytest_runtimefaults.cni.next_subnet`); the id is the sha256 of
    the name, so a rewritten file keeps it.  DNS is off by default: no
    aardvark-dns is started.
    """
    name = name or naming.unique_name("rfnv")
    net = ipaddress.ip_network(subnet or next_subnet())
    return {
        "name": name,
        "id": hashlib.sha256(name.encode()).hexdigest(),
        "driver": driver,
        "network_interface": interface or naming.unique_name("rfnb"),
        "created": datetime.now(timezone.utc).isoformat(),
        "subnets": [{"subnet": str(net), "gateway": str(next(net.hosts()))}],
        "ipv6_enabled": False,
        "internal": internal,
        "dns_enabled": dns_enabled,
        "ipam_options": {"driver": "host-local"},
    }


def validate_network(data: bytes, filename: str | None = None) -> str | None:
    """Why *data* is not a network podman + netavark can use (None if it is).

    As podman 4.3 and 5 judge it: the first JSON value of the file is decoded
    and what follows it is ignored (Go's ``json.Decoder``: a NUL-padded file
    loads); it must be an object with a valid ``name`` (the file's stem when
    *filename* is given: podman skips a file whose name differs), a 64-hex
    ``id`` and subnets whose gateways lie inside them.  A ``driver``
    netavark does not know is loaded by podman and fails at ``run``; it is
    reported here too.
    """
    text = data.decode("utf-8", "replace").lstrip()
    if not text:
        return "empty file"
    try:
        obj, _end = json.JSONDecoder().raw_decode(text)
    except ValueError as exc:
        return f"invalid JSON: {exc}"
    if not isinstance(obj, dict):
        return "not a JSON object"
    name = obj.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        return f"invalid network name {name!r}"
    if filename is not None and Path(filename).stem != name:
        return f"network name {name!r} does not match the file name {filename!r}"
    if not isinstance(obj.get("id"), str) or not _ID_RE.match(obj["id"]):
        return f"invalid network id {obj.get('id')!r}"
    if obj.get("driver") not in _DRIVERS:
        return f"unknown driver {obj.get('driver')!r}"
    if obj["driver"] == "bridge" and not obj.get("network_interface"):
        return "a bridge network without network_interface"
    for entry in obj.get("subnets") or []:
        try:
            net = ipaddress.ip_network(entry["subnet"])
            gateway = entry.get("gateway")
            if gateway is not None and ipaddress.ip_address(gateway) not in net:
                return f"gateway {gateway} is not in subnet {net}"
        except (KeyError, TypeError, ValueError) as exc:
            return f"invalid subnet {entry!r}: {exc}"
    for key in ("ipv6_enabled", "internal", "dns_enabled"):
        if not isinstance(obj.get(key, False), bool):
            return f"{key} is not a boolean"
    return None


# --- the directory ---------------------------------------------------------


class NetavarkDir:
    """A private netavark network config dir (``--network-config-dir``).

    The same shape as :class:`~pytest_runtimefaults.cni.CniDir` where the file
    faults and the watcher need it (``conf_dir``, ``path()``, ``remove()``,
    ``fault_files``), so ``HalfWritten(nv, "X.json", net)`` and the others
    work on it unchanged.
    """

    def __init__(self, root: Path | str | None = None, *, journal: Journal | None = None) -> None:
        self._given_root = Path(root) if root is not None else None
        self.journal = journal
        self.root = self._given_root or Path("/nonexistent")
        self._rid: int | None = None
        self._started = False
        #: file names written by faults, not by podman (the watcher ignores them)
        self.fault_files: set[str] = set()

    @property
    def conf_dir(self) -> Path:
        return self.root / "networks"

    def start(self) -> NetavarkDir:
        if self._started:
            return self
        if self._given_root is None:
            self.root = Path(tempfile.mkdtemp(prefix="rfnv-"))
            if self.journal is not None:
                self._rid = self.journal.add("path", path=str(self.root))
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        self._started = True
        return self

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        if self._given_root is None:
            _remove_tree(self.root)
            if self.journal is not None and self._rid is not None:
                self.journal.release(self._rid)
                self._rid = None

    def __enter__(self) -> NetavarkDir:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def network(self, name: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """A bridge network (see :func:`netavark_network` for the keywords)."""
        return netavark_network(name, **kwargs)

    def macvlan(self, master: str, name: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """A macvlan network on *master* (a link in the namespace podman runs in:
        :meth:`NetavarkPodman.master_link`)."""
        return netavark_network(name, driver="macvlan", interface=master, **kwargs)

    @staticmethod
    def filename(net: Mapping[str, Any]) -> str:
        """``NAME.json``: podman loads a file only if its name is the network's."""
        return f"{net['name']}.json"

    def path(self, filename: str) -> Path:
        return self.conf_dir / filename

    def write(self, net: Content, filename: str | None = None) -> Path:
        """Write a network atomically; the name defaults to ``NAME.json``."""
        if filename is None:
            if not isinstance(net, Mapping):
                raise ValueError("filename is required for raw bytes or text")
            filename = self.filename(net)
        return write_atomic(self.path(filename), encode(net))

    def remove(self, filename: str) -> None:
        """Remove a network file if it is there."""
        self.path(filename).unlink(missing_ok=True)

    def files(self) -> list[Path]:
        """The files podman would load, sorted (``netavark.lock`` is not one)."""
        return sorted(p for p in self.conf_dir.iterdir() if p.suffix in NETAVARK_SUFFIXES)

    def broken_files(self) -> dict[str, str]:
        """Files podman would not load now, with the reason."""
        return {name: why for name, why in whole_networks(self.files()).items() if why is not None}

    def check_whole(self) -> None:
        """Raise while any network file is broken (a health probe for ``recovers``)."""
        broken = self.broken_files()
        if broken:
            raise AssertionError(f"broken netavark networks in {self.conf_dir}: {broken}")

    def watcher(self) -> TornWriteWatcher:
        """A (not yet started) torn-write watcher on :attr:`conf_dir` that judges
        files as podman does and skips the files the faults write."""
        from pytest_runtimefaults.cni.watcher import TornWriteWatcher

        return TornWriteWatcher(
            self.conf_dir,
            fault_files=self.fault_files,
            validate=validate_network,
            suffixes=NETAVARK_SUFFIXES,
        )


def whole_networks(files: Iterable[Path]) -> dict[str, str | None]:
    """Each file's :func:`validate_network` verdict (None: podman loads it)."""
    out: dict[str, str | None] = {}
    for path in files:
        try:
            out[path.name] = validate_network(path.read_bytes(), path.name)
        except OSError as exc:
            out[path.name] = str(exc)
    return out


# --- podman on netavark ----------------------------------------------------


def netavark_state_argv(
    netns_path: Path | str, state_dir: Path | str, lock_dir: Path | str | None = None
) -> list[str]:
    """An argv prefix: network namespace *netns_path*, then a private mount
    namespace where ``/var/lib`` and ``/run`` are tmpfs and *state_dir* is
    ``/run/containers/networks`` (and *lock_dir*, if given, ``/run/lock``),
    then the command that follows.

    podman (4.3 and 5) keeps netavark's IPAM database and aardvark-dns's
    config in ``/run/containers/networks`` with no option to move it; bound
    here from *state_dir*, it is shared by every call of one harness (so
    concurrent runs see one another's reservations) and never reaches the
    host.  podman 5 as root serialises its network operations with
    ``/run/lock/netavark.lock`` (podman 4.3 with ``netavark.lock`` in the
    config dir): without a shared *lock_dir* each call would lock a file of
    its own and concurrent calls would not exclude one another as they do on
    a host.  ``/run`` as a whole is private too (runc's state, the
    containers' namespace mounts under ``/run/netns``).
    """
    lock = ' && mount --bind "$1" /run/lock && shift' if lock_dir is not None else ""
    script = (
        "mount -t tmpfs -o mode=0755 rfvarlib /var/lib"
        " && mount -t tmpfs -o mode=0755 rfrun /run"
        " && mkdir -p /run/netns /run/lock /run/containers/networks"
        ' && mount --bind "$0" /run/containers/networks'
        f"{lock}"
        ' && exec "$@"'
    )
    return [
        "nsenter",
        f"--net={netns_path}",
        "unshare",
        "--mount",
        "--propagation",
        "slave",
        "sh",
        "-c",
        script,
        str(state_dir),
        *([str(lock_dir)] if lock_dir is not None else []),
    ]


class NetavarkPodman:
    """podman with ``--network-backend netavark`` on a :class:`NetavarkDir`.

    Every call runs ``podman --root/--runroot/--tmpdir`` under a private temp
    dir, ``--network-config-dir`` = ``nv.conf_dir``, inside a network
    namespace this harness creates (and removes) and a private mount
    namespace (:func:`netavark_state_argv`).  Containers run from a busybox
    rootfs (``--rootfs``); each goes under a unique ``--cgroup-parent``.
    ``stop()`` ends what podman left (conmon, mounts), removes the namespace
    (and with it every bridge, veth and iptables rule netavark made) and the
    directory.

    The mount namespace is **one per harness**, held by a process started at
    ``start()`` (:attr:`holder`), and every call enters it: concurrent podman
    calls then share ``/run`` as they do on a host, so one call sees the
    network namespace (``/run/netns/netns-*``) of a container another call
    runs, and podman 5's ``/run/lock/netavark.lock`` serialises them.  With a
    private ``/run`` per call, another call's ``podman network rm`` logged
    ``Joining network namespace for container ...: failed to Statfs``, podman
    dropped the running container's namespace from its state, and its
    teardown left netavark's firewall rules behind: a harness artefact, not
    podman's behaviour.
    """

    ULIMITS = ("--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768")

    def __init__(
        self,
        nv: NetavarkDir,
        *,
        binary: str = "podman",
        runtime: str = "runc",
        journal: Journal | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.nv = nv
        self.binary = binary
        self.runtime = runtime
        self.journal = journal
        self.timeout = timeout
        self.directory = Path("/nonexistent")
        self.netns: NetNS | None = None
        self.cgroup_parent = "/" + naming.unique_name("rfnvcg", maxlen=40)
        self._rid: int | None = None
        self._cg_rid: int | None = None
        self._started = False
        self._masters: set[str] = set()
        #: the process holding the harness's mount namespace (None until started)
        self.holder: subprocess.Popen[str] | None = None

    @property
    def rootfs(self) -> Path:
        return self.directory / "rootfs"

    @property
    def state_dir(self) -> Path:
        """What podman sees as ``/run/containers/networks`` (``ipam.db``)."""
        return self.directory / "netavark-state"

    @property
    def lock_dir(self) -> Path:
        """What podman sees as ``/run/lock``: shared by every call of this
        harness, so podman 5's ``/run/lock/netavark.lock`` serialises them."""
        return self.directory / "run-lock"

    @property
    def network_lock(self) -> Path:
        """The lock file podman takes around its network operations:
        ``netavark.lock`` in the config dir (podman 4) or in :attr:`lock_dir`
        (podman 5 as root); the first that exists, else podman 5's."""
        for path in (self.nv.conf_dir / "netavark.lock", self.lock_dir / "netavark.lock"):
            if path.exists():
                return path
        return self.lock_dir / "netavark.lock"

    def start(self) -> NetavarkPodman:
        if self._started:
            return self
        from pytest_runtimefaults.netns import NetNS

        self.directory = Path(tempfile.mkdtemp(prefix="rfnvpod-"))
        if self.journal is not None:
            # The containerd kind ends processes naming the dir, unmounts, removes.
            self._rid = self.journal.add("containerd", dir=str(self.directory))
            self._cg_rid = self.journal.add("cgroup-tree", parent=self.cgroup_parent)
        self._started = True
        try:
            for sub in ("root", "runroot", "tmp", "netavark-state", "run-lock"):
                (self.directory / sub).mkdir()
            busybox_rootfs(self.rootfs)
            self.netns = NetNS(naming.unique_name("rfnvh"), journal=self.journal).start()
            self._start_holder()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_holder(self) -> None:
        """Start the process that holds the harness's mount namespace: the
        mounts of :func:`netavark_state_argv`, then a shell that waits on its
        stdin (its command line names :attr:`directory`, so the journal's
        reaper of that directory ends it after a crash)."""
        assert self.netns is not None
        holder = subprocess.Popen(
            [
                *netavark_state_argv(self.netns.path, self.state_dir, self.lock_dir),
                "sh",
                "-c",
                'echo ready; read -r _ || :; echo "$0" >/dev/null',
                str(self.directory),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.holder = holder
        assert holder.stdout is not None
        line = holder.stdout.readline()
        if line.strip() != "ready":
            holder.kill()
            _out, err = holder.communicate(timeout=10)
            raise RuntimeError(
                f"NetavarkPodman: the mount namespace holder failed (rc {holder.returncode}): "
                f"{err.strip()}"
            )

    def _stop_holder(self) -> None:
        holder, self.holder = self.holder, None
        if holder is None:
            return
        with swallowed(Exception, "ending the mount namespace holder %s", holder.pid):
            if holder.poll() is None:
                assert holder.stdin is not None
                holder.stdin.close()  # its `read` returns: the shell exits
                try:
                    holder.wait(10)
                except subprocess.TimeoutExpired:
                    holder.kill()
                    holder.wait(10)
            for stream in (holder.stdout, holder.stderr):
                if stream is not None:
                    stream.close()

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        if self.netns is not None and self.holder is not None:
            # Best effort: what podman cannot remove, the directory cleanup below ends.
            with swallowed(Exception, "podman rm --all in %s", self.directory):
                done = self.podman("rm", "--all", "--force", timeout=30)
                if done.returncode != 0:
                    logger.debug(
                        "podman rm --all in %s: rc %d: %s",
                        self.directory,
                        done.returncode,
                        done.stderr.strip(),
                    )
        self._stop_holder()
        cleanup_containerd_dir(str(self.directory))
        kill_cgroup_tree(self.cgroup_parent)
        if self.netns is not None:
            self.netns.stop()
            self.netns = None
        if self.journal is not None:
            for rid in (self._rid, self._cg_rid):
                if rid is not None:
                    self.journal.release(rid)
            self._rid = self._cg_rid = None

    def __enter__(self) -> NetavarkPodman:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def argv(self, *args: str) -> list[str]:
        if self.netns is None or self.holder is None:
            raise RuntimeError("NetavarkPodman is not started: call start() first")
        return [
            # The harness's namespaces: its network namespace, and the mount
            # namespace its holder keeps (shared by every call, see the class doc).
            "nsenter",
            f"--net={self.netns.path}",
            f"--mount=/proc/{self.holder.pid}/ns/mnt",
            *private_podman_argv(
                self.binary,
                self.directory,
                self.nv.conf_dir,
                backend="netavark",
                runtime=self.runtime,
            ),
            *args,
        ]

    def podman(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``podman args...``; returns the CompletedProcess (text), never raises on rc."""
        return subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            timeout=timeout or self.timeout,
            check=False,
        )

    def run(self, network: str, *command: str) -> subprocess.CompletedProcess[str]:
        """``podman run --rm --network NETWORK --rootfs ROOTFS command...``."""
        return self.podman(*self.run_args(network, *command))

    def run_args(self, network: str, *command: str) -> list[str]:
        """The podman arguments of :meth:`run` (for callers that run them themselves)."""
        return [
            "run",
            "--rm",
            *self.ULIMITS,
            "--cgroup-parent",
            self.cgroup_parent,
            # No pids limit in the spec (podman's default is 2048): nothing here
            # needs one, and a cgroup2 without the pids controller (a sandbox on
            # a v1/hybrid host) has no pids.max for runc to write.  0 leaves it
            # out; -1 still makes runc 1.3 write "max" there and fail.
            "--pids-limit=0",
            "--network",
            network,
            "--rootfs",
            str(self.rootfs),
            *command,
        ]

    def master_link(self, name: str | None = None) -> str:
        """A veth pair in the harness's namespace, both ends up, to be a macvlan
        master (no ``dummy`` driver is assumed); removed with the namespace."""
        if self.netns is None:
            raise RuntimeError("NetavarkPodman is not started: call start() first")
        name = name or naming.unique_name("rfnm")
        peer = f"{name}p"[:15]
        ns = self.netns.name
        for argv in (
            ["ip", "-n", ns, "link", "add", name, "type", "veth", "peer", "name", peer],
            ["ip", "-n", ns, "link", "set", name, "up"],
            ["ip", "-n", ns, "link", "set", peer, "up"],
        ):
            subprocess.run(argv, check=True, capture_output=True, timeout=30)
        self._masters.add(name)
        self._masters.add(peer)
        return name

    def links(self) -> set[str]:
        """Links in the harness's namespace (``NAME:KIND``): bridges, veths."""
        from pytest_runtimefaults.netns import list_links

        if self.netns is None:
            return set()
        return {f"{link.name}:{link.kind}" for link in list_links(self.netns.name)}

    def leaked_links(self) -> set[str]:
        """veths left in the harness's namespace (a removed container leaves none;
        bridges stay until their namespace goes, as netavark leaves them)."""
        return {
            link
            for link in self.links()
            if link.endswith(":veth") and link.split(":")[0] not in self._masters
        }

    def firewall(self) -> str:
        """The firewall of the harness's namespace, where netavark's rules land:
        ``iptables-save``/``ip6tables-save`` (netavark 1.4's ``NETAVARK_*``
        chains) and ``nft list ruleset`` (1.14's ``table inet netavark``)."""
        if self.netns is None:
            return ""
        return _firewall_dump(["nsenter", f"--net={self.netns.path}"])

    @property
    def ipam_db(self) -> Path:
        """podman's IPAM database (bolt) for this harness: every reservation."""
        return self.state_dir / "ipam.db"


# --- the host --------------------------------------------------------------


def _firewall_dump(prefix: list[str]) -> str:
    """iptables-save, ip6tables-save and nft (where installed), counters dropped."""
    out: list[str] = []
    for tool in (["iptables-save"], ["ip6tables-save"], ["nft", "list", "ruleset"]):
        if shutil.which(tool[0]) is None:
            continue
        done = subprocess.run(
            [*prefix, *tool], capture_output=True, text=True, timeout=30, check=False
        )
        for line in done.stdout.splitlines():
            # Comments carry a timestamp, chain headers packet counters: neither is state.
            if line.startswith("#"):
                continue
            out.append(re.sub(r"\[\d+:\d+\]", "", line))
    return "\n".join(out)


def host_network_state() -> set[str]:
    """What netavark could change on the host, as strings to compare before and after.

    Root-namespace links (``link:NAME``), firewall rules (``fw:LINE`` from
    ``iptables-save``/``ip6tables-save``, and ``nft list ruleset`` if nft is
    installed), ``net.ipv4.ip_forward`` and whether ``/run/containers``
    exists (podman's default IPAM database lives below it).
    """
    from pytest_runtimefaults.netns import list_links

    state = {f"link:{link.name}" for link in list_links(None)}
    state |= {f"fw:{line}" for line in _firewall_dump([]).splitlines() if line.strip()}
    with swallowed(OSError, "reading net.ipv4.ip_forward"):
        state.add("ip_forward:" + Path("/proc/sys/net/ipv4/ip_forward").read_text().strip())
    state.add(f"/run/containers exists: {os.path.exists('/run/containers')}")
    return state
