"""CNI configuration faults: half-written, held, vanishing and racing config files.

Incident 4 of the fault catalog: runtimes that walk the CNI configuration
directory without a lock, and tools that write configs in place, let a reader
see a truncated file (``unexpected end of JSON input``), a file that vanished
between listing and opening, or one network's file while another is written
(a macvlan network brought up as a bridge).  This module gives a private CNI
directory (:class:`CniDir`), writers that produce each of those states on
demand, and a :class:`TornWriteWatcher` that catches a runtime's own
non-atomic writes.

Example::

    with CniDir() as cni:
        conf = cni.bridge()                     # unique name, bridge and subnet
        cni.write(conf)                         # temp + fsync + rename
        with HalfWritten(cni, "10-broken.conflist", conf, mode="truncate"):
            ...                                 # run the runtime against cni.conf_dir
        with TornWriteWatcher(cni.conf_dir) as watcher:
            ...                                 # the runtime writes its configs
        assert not watcher.torn, watcher.report()

Every fault is a context manager with idempotent ``start()``/``stop()`` and a
``lift()`` (used by the ``recovers`` marker) that leaves the files whole.
Timing choices (chunk sizes, pauses) come from a seeded ``random.Random``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import itertools
import json
import os
import random
import select
import shlex
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pytest_runtimefaults import naming

if TYPE_CHECKING:
    from pytest_runtimefaults.journal import Journal
    from pytest_runtimefaults.netns import CniResult, CniSandbox

__all__ = [
    "CONFIG_SUFFIXES",
    "CniDir",
    "CniPodman",
    "CriNetworkStatus",
    "CriPod",
    "CriPods",
    "DeleteRecreate",
    "HalfWritten",
    "HeldHalfWritten",
    "ParallelAdds",
    "RacingWriter",
    "TornWrite",
    "TornWriteWatcher",
    "broken_bytes",
    "busybox_rootfs",
    "containerd_in_sandbox",
    "cri_network_status",
    "decode_protobuf",
    "next_subnet",
    "validate_config",
    "wait_cri_network",
    "write_atomic",
]

#: File names libcni (and so containerd, podman, nerdctl) loads from a conf dir.
CONFIG_SUFFIXES = (".conf", ".conflist", ".json")

BrokenMode = Literal["truncate", "empty", "nul", "wrong-version"]
BROKEN_MODES: tuple[str, ...] = ("truncate", "empty", "nul", "wrong-version")

# --- subnets ---------------------------------------------------------------

_subnet_counter = itertools.count()
_subnet_lock = threading.Lock()


def next_subnet() -> str:
    """A /24 unique in this process and xdist worker: ``10.{64+worker}.{n}.0/24``.

    Workers 0..63 get disjoint /16s of 10.64.0.0/10; each process hands out
    256 /24s before wrapping.  The addresses only ever exist inside namespaces
    the fixtures create, and no packet is sent to any other address.
    """
    with _subnet_lock:
        n = next(_subnet_counter) % 256
    return f"10.{64 + naming.worker_index() % 64}.{n}.0/24"


# --- writing ---------------------------------------------------------------


def _encode(content: bytes | str | Mapping[str, Any]) -> bytes:
    if isinstance(content, bytes):
        return content
    if isinstance(content, str):
        return content.encode()
    return (json.dumps(content, indent=2) + "\n").encode()


def write_atomic(path: Path | str, content: bytes | str | Mapping[str, Any]) -> Path:
    """Write *path* as a careful runtime does: temp file, fsync, rename, fsync dir.

    The temporary name starts with a dot and ends in ``.tmp``, so no CNI
    loader ever reads it; a reader sees the old file or the new one, whole.
    """
    path = Path(path)
    data = _encode(content)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path


def broken_bytes(content: bytes | str | Mapping[str, Any], mode: str, at: float = 0.5) -> bytes:
    """*content* made broken in one of the ways a reader meets in the wild.

    ``truncate``: the first *at* of it (a fraction, or a byte count if > 1);
    ``empty``: nothing; ``nul``: whole, then NUL padding (a file extended
    before its data was flushed); ``wrong-version``: whole JSON with a
    ``cniVersion`` no plugin supports.
    """
    data = _encode(content)
    if mode == "truncate":
        cut = int(at) if at > 1 else int(len(data) * at)
        return data[: max(1, min(cut, len(data) - 1))]
    if mode == "empty":
        return b""
    if mode == "nul":
        return data + b"\0" * 64
    if mode == "wrong-version":
        obj = json.loads(data)
        obj["cniVersion"] = "9.9.9"
        return _encode(obj)
    raise ValueError(f"unknown broken mode {mode!r}; use one of {', '.join(BROKEN_MODES)}")


def validate_config(data: bytes) -> str | None:
    """Why *data* is not a loadable CNI config (None if it is), as libcni decides.

    Checks JSON syntax, a ``name``, and a ``type`` (single conf) or a
    non-empty ``plugins`` list each with a ``type`` (conflist).
    """
    if not data.strip():
        return "empty file"
    try:
        obj = json.loads(data)
    except ValueError as exc:
        return f"invalid JSON: {exc}"
    if not isinstance(obj, dict):
        return "not a JSON object"
    if not obj.get("name"):
        return "no network name"
    if "plugins" in obj:
        plugins = obj["plugins"]
        if not isinstance(plugins, list) or not plugins:
            return "no plugins"
        if not all(isinstance(p, dict) and p.get("type") for p in plugins):
            return "a plugin without type"
    elif not obj.get("type"):
        return "no plugin type"
    return None


# --- the directory ---------------------------------------------------------


class CniDir:
    """A private CNI setup: a config dir, an IPAM data dir and the plugin path.

    Point the runtime under test at :attr:`conf_dir` (``--network-config-dir``,
    containerd's ``conf_dir``...); configs built here put host-local
    reservations under :attr:`ipam_dir`.  Names of networks and bridges are
    unique on the host, subnets per test and per xdist worker.
    """

    def __init__(
        self,
        root: Path | str | None = None,
        *,
        plugin_dir: Path | str = "/usr/lib/cni",
        cni_version: str = "1.0.0",
        journal: Journal | None = None,
    ) -> None:
        self._given_root = Path(root) if root is not None else None
        self.plugin_dir = Path(plugin_dir)
        self.cni_version = cni_version
        self.journal = journal
        self.root = self._given_root or Path("/nonexistent")
        self._rid: int | None = None
        self._started = False
        #: file names written by faults, not by the runtime (the watcher ignores them)
        self.fault_files: set[str] = set()

    @property
    def conf_dir(self) -> Path:
        return self.root / "net.d"

    @property
    def ipam_dir(self) -> Path:
        return self.root / "ipam"

    def start(self) -> CniDir:
        if self._started:
            return self
        if self._given_root is None:
            self.root = Path(tempfile.mkdtemp(prefix="rfcni-"))
            if self.journal is not None:
                self._rid = self.journal.add("path", path=str(self.root))
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        self.ipam_dir.mkdir(parents=True, exist_ok=True)
        self._started = True
        return self

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        if self._given_root is None:
            shutil.rmtree(self.root, ignore_errors=True)
            if self.journal is not None and self._rid is not None:
                self.journal.release(self._rid)
                self._rid = None

    def __enter__(self) -> CniDir:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # configs ------------------------------------------------------------

    def _ipam(self, subnet: str) -> dict[str, Any]:
        return {"type": "host-local", "subnet": subnet, "dataDir": str(self.ipam_dir)}

    def _wrap(self, name: str, plugin: dict[str, Any]) -> dict[str, Any]:
        return {"cniVersion": self.cni_version, "name": name, "plugins": [plugin]}

    def bridge(
        self, name: str | None = None, *, subnet: str | None = None, bridge: str | None = None
    ) -> dict[str, Any]:
        """A bridge + host-local conflist (no masquerade: no iptables rule anywhere)."""
        return self._wrap(
            name or naming.unique_name("rfnet"),
            {
                "type": "bridge",
                "bridge": bridge or naming.unique_name("rfbr"),
                "isGateway": True,
                "ipMasq": False,
                "ipam": self._ipam(subnet or next_subnet()),
            },
        )

    def macvlan(
        self, master: str, name: str | None = None, *, subnet: str | None = None
    ) -> dict[str, Any]:
        """A macvlan conflist on *master* (a link in the namespace the plugin runs in)."""
        return self._wrap(
            name or naming.unique_name("rfnet"),
            {
                "type": "macvlan",
                "master": master,
                "mode": "bridge",
                "ipam": self._ipam(subnet or next_subnet()),
            },
        )

    def ptp(self, name: str | None = None, *, subnet: str | None = None) -> dict[str, Any]:
        """A ptp (veth pair, no bridge) conflist."""
        return self._wrap(
            name or naming.unique_name("rfnet"),
            {"type": "ptp", "ipMasq": False, "ipam": self._ipam(subnet or next_subnet())},
        )

    @staticmethod
    def single(conflist: Mapping[str, Any]) -> dict[str, Any]:
        """The one-plugin ``.conf`` form of a one-plugin conflist."""
        (plugin,) = conflist["plugins"]
        return {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **plugin}

    def path(self, filename: str) -> Path:
        return self.conf_dir / filename

    def filename(self, conf: Mapping[str, Any], priority: int = 10) -> str:
        suffix = ".conflist" if "plugins" in conf else ".conf"
        return f"{priority:02d}-{conf['name']}{suffix}"

    def write(
        self,
        conf: Mapping[str, Any] | bytes,
        filename: str | None = None,
        *,
        priority: int = 10,
    ) -> Path:
        """Write a whole config atomically; the name defaults to ``NN-NAME.conflist``."""
        if filename is None:
            if isinstance(conf, bytes):
                raise ValueError("filename is required for raw bytes")
            filename = self.filename(conf, priority)
        return write_atomic(self.path(filename), conf)

    def remove(self, filename: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(filename).unlink()

    def files(self) -> list[Path]:
        """The files a libcni reader would load, in its (sorted) order."""
        return sorted(p for p in self.conf_dir.iterdir() if p.suffix in CONFIG_SUFFIXES)

    def broken_files(self) -> dict[str, str]:
        """Files that do not parse as CNI configs now, with the reason."""
        return {name: why for name, why in whole_files(self.files()).items() if why is not None}

    def check_whole(self) -> None:
        """Raise while any config file is broken (a health probe for ``recovers``)."""
        broken = self.broken_files()
        if broken:
            raise AssertionError(f"broken CNI configs in {self.conf_dir}: {broken}")


# --- faults ----------------------------------------------------------------


class _Fault:
    """start/stop/lift plumbing shared by the file faults."""

    name = "cni fault"

    def __init__(self) -> None:
        self._started = False
        self._stopped = False
        self.error: BaseException | None = None

    def _start(self) -> None:
        raise NotImplementedError

    def _stop(self) -> None:
        raise NotImplementedError

    def start(self) -> Any:
        if not self._started:
            self._started = True
            self._start()
        return self

    def stop(self) -> None:
        if self._started and not self._stopped:
            self._stopped = True
            self._stop()
        if self.error is not None:
            error, self.error = self.error, None
            raise RuntimeError(f"{self.name}: background writer failed: {error}") from error

    def lift(self) -> None:
        self.stop()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class HalfWritten(_Fault):
    """A config file left broken in the conf dir (truncated, empty, NUL-padded,
    wrong cniVersion).  ``lift()`` replaces it with the whole content, or
    removes it with ``restore=False``.
    """

    def __init__(
        self,
        cni: CniDir,
        filename: str,
        content: bytes | str | Mapping[str, Any],
        *,
        mode: BrokenMode = "truncate",
        at: float = 0.5,
        restore: bool = True,
    ) -> None:
        super().__init__()
        if mode not in BROKEN_MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(BROKEN_MODES)}")
        self.cni = cni
        self.filename = filename
        self.content = _encode(content)
        self.mode = mode
        self.restore = restore
        self.broken = broken_bytes(self.content, mode, at)
        self.name = f"half-written {filename} ({mode})"

    @property
    def path(self) -> Path:
        return self.cni.path(self.filename)

    def _start(self) -> None:
        self.cni.fault_files.add(self.filename)
        # Written atomically: the fault is the broken *content*, not the write.
        write_atomic(self.path, self.broken)

    def _stop(self) -> None:
        if self.restore:
            write_atomic(self.path, self.content)
        else:
            self.cni.remove(self.filename)


class HeldHalfWritten(_Fault):
    """A file written in place up to *at*, then held there until released.

    ``start()`` returns once the partial content is on disk (fsynced) at the
    final name; the rest is written when :meth:`release` is called, when
    *hold* seconds have passed, or at ``stop()``, whichever comes first.
    :attr:`completed` is set when the file is whole.
    """

    def __init__(
        self,
        cni: CniDir,
        filename: str,
        content: bytes | str | Mapping[str, Any],
        *,
        at: float = 0.5,
        hold: float | None = None,
    ) -> None:
        super().__init__()
        self.cni = cni
        self.filename = filename
        self.content = _encode(content)
        self.head = broken_bytes(self.content, "truncate", at)
        self.hold = hold
        self._release = threading.Event()
        self.completed = threading.Event()
        self._thread: threading.Thread | None = None
        self.name = f"held half-written {filename} ({len(self.head)}/{len(self.content)} bytes)"

    @property
    def path(self) -> Path:
        return self.cni.path(self.filename)

    def _start(self) -> None:
        self.cni.fault_files.add(self.filename)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self._fd, self.head)
        os.fsync(self._fd)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._release.wait(self.hold)
            os.write(self._fd, self.content[len(self.head) :])
            os.fsync(self._fd)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
        finally:
            os.close(self._fd)
            self.completed.set()

    def release(self) -> None:
        """Write the rest now (returns when the file is whole)."""
        self._release.set()
        self.completed.wait(10)

    def _stop(self) -> None:
        self._release.set()
        if self._thread is not None:
            self._thread.join(10)


class DeleteRecreate(_Fault):
    """Delete a config file and recreate it (atomically), again and again.

    Each cycle: unlink, wait *gap* seconds (the file is absent), recreate,
    wait a pause drawn from *rng* in *period*.  A runtime that lists the
    directory and opens files later meets ``no such file or directory``.
    """

    def __init__(
        self,
        cni: CniDir,
        filename: str,
        content: bytes | str | Mapping[str, Any],
        *,
        gap: float = 0.005,
        period: tuple[float, float] = (0.001, 0.01),
        cycles: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__()
        self.cni = cni
        self.filename = filename
        self.content = _encode(content)
        self.gap = gap
        self.period = period
        self.cycles = cycles
        self.rng = rng or random.Random(0)
        self.count = 0
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self.name = f"delete-and-recreate {filename}"

    def _start(self) -> None:
        self.cni.fault_files.add(self.filename)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        path = self.cni.path(self.filename)
        try:
            while not self._halt.is_set() and (self.cycles is None or self.count < self.cycles):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                self._halt.wait(self.gap)
                write_atomic(path, self.content)
                self.count += 1
                self._halt.wait(self.rng.uniform(*self.period))
        except BaseException as exc:
            self.error = exc
        finally:
            with contextlib.suppress(OSError):
                write_atomic(path, self.content)

    def _stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(10)


class RacingWriter(_Fault):
    """Rewrite config files in place, in small chunks, at a seeded rhythm.

    Each round picks a file, truncates it and writes its content back in
    chunks of *chunk* bytes (drawn from *rng*), pausing *pause* seconds
    between chunks, so a reader sees it empty or partial most of the time.
    ``stop()`` leaves every file whole.
    """

    def __init__(
        self,
        cni: CniDir,
        files: Mapping[str, bytes | str | Mapping[str, Any]],
        *,
        chunk: tuple[int, int] = (8, 48),
        pause: tuple[float, float] = (0.0005, 0.003),
        rng: random.Random | None = None,
    ) -> None:
        super().__init__()
        if not files:
            raise ValueError("RacingWriter needs at least one file")
        self.cni = cni
        self.files = {name: _encode(c) for name, c in files.items()}
        self.chunk = chunk
        self.pause = pause
        self.rng = rng or random.Random(0)
        self.rounds = 0
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self.name = f"racing writer on {', '.join(sorted(self.files))}"

    def _start(self) -> None:
        self.cni.fault_files.update(self.files)
        for name, data in self.files.items():
            write_atomic(self.cni.path(name), data)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        names = sorted(self.files)
        try:
            while not self._halt.is_set():
                name = self.rng.choice(names)
                data = self.files[name]
                fd = os.open(self.cni.path(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    pos = 0
                    while pos < len(data):
                        n = self.rng.randint(*self.chunk)
                        os.write(fd, data[pos : pos + n])
                        pos += n
                        # Not _halt.wait(): a stop mid-file must still finish it.
                        time.sleep(self.rng.uniform(*self.pause))
                finally:
                    os.close(fd)
                self.rounds += 1
        except BaseException as exc:
            self.error = exc

    def _stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(10)
        for name, data in self.files.items():
            write_atomic(self.cni.path(name), data)


class ParallelAdds:
    """N concurrent ADDs (and then DELs) of one network, as a busy node does.

    Each ADD gets its own container namespace in *sandbox*; :meth:`add_all`
    runs them on N threads at once and returns the results in order;
    :meth:`delete_all` removes them the same way.
    """

    def __init__(self, sandbox: CniSandbox, conflist: Mapping[str, Any], n: int = 20) -> None:
        from pytest_runtimefaults.netns import NetNS

        self.sandbox = sandbox
        self.conflist = conflist
        self.n = n
        self.ids = [naming.unique_name("rfid", maxlen=40) for _ in range(n)]
        self.namespaces: list[NetNS] = []
        self.results: list[CniResult | BaseException] = []

    def add_all(self) -> list[CniResult | BaseException]:
        self.namespaces = [self.sandbox.container(cid) for cid in self.ids]
        with ThreadPoolExecutor(self.n) as pool:
            futures = [
                pool.submit(self.sandbox.add, self.conflist, ns, container_id=cid)
                for ns, cid in zip(self.namespaces, self.ids, strict=True)
            ]
            self.results = [_outcome(f) for f in futures]
        return self.results

    def delete_all(self) -> list[BaseException | None]:
        with ThreadPoolExecutor(self.n) as pool:
            futures = [
                pool.submit(self.sandbox.delete, self.conflist, ns, container_id=cid)
                for ns, cid in zip(self.namespaces, self.ids, strict=True)
            ]
            errors = [_error(f) for f in futures]
        for ns in self.namespaces:
            self.sandbox.remove_container(ns)
        return errors

    def addresses(self) -> list[str]:
        from pytest_runtimefaults.netns import CniResult

        return [ip for r in self.results if isinstance(r, CniResult) for ip in r.ips]


def _outcome(future: Any) -> Any:
    try:
        return future.result()
    except Exception as exc:
        return exc


def _error(future: Any) -> BaseException | None:
    try:
        future.result()
    except Exception as exc:
        return exc
    return None


# --- the torn-write watcher ------------------------------------------------

# inotify(7) through ctypes: four libc calls and a fixed event layout.  A PyPI
# binding (inotify_simple, watchdog) would add a dependency for ~40 lines, and
# watchdog's thread-and-callback model coalesces events, which would hide the
# very moments this watcher exists to see.
IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_MOVED_FROM = 0x00000040
IN_Q_OVERFLOW = 0x00004000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")

_libc: Any = None


def _inotify_libc() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.inotify_init1.argtypes = [ctypes.c_int]
        _libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    return _libc


@dataclass(frozen=True)
class TornWrite:
    """One moment a config file was visible incomplete or invalid.

    *how*: ``in-place`` (the file was created or modified at its final name,
    so a reader could open it before the last byte was written) or ``invalid``
    (the watcher read it and it did not parse).  *content* is what was read.
    """

    filename: str
    how: str
    event: str
    reason: str
    content: bytes
    at: float


@dataclass
class TornWriteWatcher:
    """Watch a CNI conf dir with inotify and record every torn write.

    A careful writer makes a config appear at its final name only by
    ``rename`` (``IN_MOVED_TO``), whole.  Every ``IN_CREATE``/``IN_MODIFY``
    of a name a CNI loader reads is a moment the file was visible
    incomplete; the watcher also reads the file at each event and records
    content that does not parse.  Files written by faults
    (``CniDir.fault_files``) or matched by *ignore* are not the runtime's
    and are skipped.
    """

    directory: Path | str
    ignore: Callable[[str], bool] | None = None
    fault_files: set[str] = field(default_factory=set)
    torn: list[TornWrite] = field(default_factory=list)
    events: int = 0
    overflowed: bool = False

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self._fd = -1
        self._pipe: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.error: BaseException | None = None

    @classmethod
    def for_dir(cls, cni: CniDir) -> TornWriteWatcher:
        """A watcher on *cni*'s conf dir that skips the files its faults write."""
        return cls(cni.conf_dir, fault_files=cni.fault_files)

    def start(self) -> TornWriteWatcher:
        if self._thread is not None:
            return self
        libc = _inotify_libc()
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        mask = IN_CREATE | IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE
        if libc.inotify_add_watch(fd, str(self.directory).encode(), mask) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {self.directory}: {os.strerror(err)}")
        self._fd = fd
        self._pipe = os.pipe()
        self._thread = threading.Thread(target=self._run, name="torn-write watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None or self._pipe is None:
            return
        # Drain what the kernel already queued before stopping, so a write
        # that finished just before stop() is still judged.
        time.sleep(0.02)
        os.write(self._pipe[1], b"x")
        self._thread.join(10)
        for fd in (*self._pipe, self._fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._thread = None
        self._pipe = None
        if self.error is not None:
            error, self.error = self.error, None
            raise RuntimeError(f"torn-write watcher failed: {error}") from error

    def __enter__(self) -> TornWriteWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _skipped(self, name: str) -> bool:
        if not name.endswith(CONFIG_SUFFIXES):
            return True
        if name in self.fault_files:
            return True
        return self.ignore is not None and self.ignore(name)

    def _run(self) -> None:
        assert self._pipe is not None
        try:
            while True:
                ready, _, _ = select.select([self._fd, self._pipe[0]], [], [])
                if self._fd in ready:
                    self._drain()
                if self._pipe[0] in ready:
                    self._drain()
                    return
        except BaseException as exc:
            self.error = exc

    def _drain(self) -> None:
        try:
            buf = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        pos = 0
        while pos < len(buf):
            _wd, mask, _cookie, length = _EVENT.unpack_from(buf, pos)
            raw = buf[pos + _EVENT.size : pos + _EVENT.size + length]
            pos += _EVENT.size + length
            self.events += 1
            if mask & IN_Q_OVERFLOW:
                self.overflowed = True
                continue
            name = raw.rstrip(b"\0").decode(errors="replace")
            if not name or self._skipped(name):
                continue
            self._judge(name, mask)

    def _judge(self, name: str, mask: int) -> None:
        event = _event_name(mask)
        now = time.monotonic()
        try:
            content = (Path(self.directory) / name).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            content = None
        with self._lock:
            if mask & (IN_CREATE | IN_MODIFY):
                self.torn.append(
                    TornWrite(
                        name, "in-place", event, "written at its final name", content or b"", now
                    )
                )
            if content is not None and mask & (
                IN_CREATE | IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO
            ):
                reason = validate_config(content)
                if reason is not None:
                    self.torn.append(TornWrite(name, "invalid", event, reason, content, now))

    def files(self) -> set[str]:
        """Names of files seen torn."""
        with self._lock:
            return {t.filename for t in self.torn}

    def report(self) -> str:
        """A readable list of the torn moments, for an assertion message."""
        with self._lock:
            if not self.torn:
                return "no torn writes"
            lines = [f"{len(self.torn)} torn write(s) in {self.directory}:"]
            for t in self.torn[:20]:
                lines.append(
                    f"  {t.filename}: {t.how} on {t.event}: {t.reason} ({len(t.content)} bytes: "
                    f"{t.content[:40]!r})"
                )
            return "\n".join(lines)


def _event_name(mask: int) -> str:
    names = [
        (IN_CREATE, "IN_CREATE"),
        (IN_MODIFY, "IN_MODIFY"),
        (IN_CLOSE_WRITE, "IN_CLOSE_WRITE"),
        (IN_MOVED_TO, "IN_MOVED_TO"),
        (IN_MOVED_FROM, "IN_MOVED_FROM"),
        (IN_DELETE, "IN_DELETE"),
    ]
    return "|".join(n for bit, n in names if mask & bit) or hex(mask)


def whole_files(files: Iterable[Path]) -> dict[str, str | None]:
    """Each file's :func:`validate_config` verdict (None: loadable)."""
    out: dict[str, str | None] = {}
    for path in files:
        try:
            out[path.name] = validate_config(path.read_bytes())
        except OSError as exc:
            out[path.name] = str(exc)
    return out


# --- podman on a private CNI directory -----------------------------------------

_BUSYBOX_APPLETS = ("sh", "true", "false", "ip", "cat", "ls", "sleep", "ifconfig", "hostname")


def busybox_rootfs(directory: Path | str, busybox: str = "/bin/busybox") -> Path:
    """A minimal root filesystem: busybox-static and a symlink per applet used here."""
    root = Path(directory)
    (root / "bin").mkdir(parents=True, exist_ok=True)
    for sub in ("proc", "sys", "dev", "etc", "tmp"):
        (root / sub).mkdir(exist_ok=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in _BUSYBOX_APPLETS:
        link = root / "bin" / applet
        if not link.is_symlink():
            link.symlink_to("busybox")
    return root


CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_dirs(parent: str) -> list[Path]:
    """*parent* (``/rfpodXYZ``) in every mounted hierarchy (v1 controllers, cgroup2)."""
    rel = parent.strip("/")
    out = []
    with contextlib.suppress(OSError):
        for hierarchy in sorted(CGROUP_ROOT.iterdir()):
            if hierarchy.is_dir() and not hierarchy.is_symlink():
                out.append(hierarchy / rel)
    if (CGROUP_ROOT / "cgroup.controllers").exists():  # a pure cgroup2 host
        out.append(CGROUP_ROOT / rel)
    return [d for d in out if d.is_dir()]


def kill_cgroup_tree(parent: str, timeout: float = 5.0) -> list[int]:
    """SIGKILL every process under cgroup *parent* in every hierarchy, wait for
    them to go, remove the cgroups (deepest first).  Returns the PIDs killed.

    The runtimes under test put containers under a cgroup parent that the
    fixtures name uniquely (``--cgroup-parent``, CRI ``cgroup_parent``), so
    this ends exactly their processes: pause and container processes a
    SIGKILLed run left behind, whose shims are gone.
    """
    import signal

    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        pids: set[int] = set()
        for root in _cgroup_dirs(parent):
            for procs in root.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    pids.update(int(x) for x in procs.read_text().split())
        pids.discard(os.getpid())
        if not pids or time.monotonic() > deadline:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.05)
    for root in _cgroup_dirs(parent):
        subs = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for sub in [*subs, root]:
            with contextlib.suppress(OSError):
                sub.rmdir()
    return sorted(set(killed))


def _reap_cgroup_tree(record: dict[str, Any]) -> None:
    kill_cgroup_tree(str(record["parent"]))


def _register_reaper() -> None:
    from pytest_runtimefaults.journal import register_reaper

    register_reaper("cgroup-tree", _reap_cgroup_tree)


_register_reaper()


def private_state_argv(netns_path: Path | str) -> list[str]:
    """An argv prefix: network namespace *netns_path*, then a private mount
    namespace with a tmpfs on ``/var/lib`` and on ``/run/netns``, then the
    command that follows.

    libcni (in podman and in containerd's CRI) caches every ADD result under
    ``/var/lib/cni/results`` on the host, with no option to move it; and the
    runtimes mount their containers' network namespaces under
    ``/run/netns``.  Here both live in memory, in a mount namespace that dies
    with the runtime, so even a SIGKILLed run leaves neither on the host
    (``slave`` propagation: the host's mounts come in, none go out).  Reach
    such a namespace from outside through ``/proc/PID/root/run/netns/NAME``.
    """
    script = (
        "mount -t tmpfs -o mode=0755 rfvarlib /var/lib"
        " && mount -t tmpfs -o mode=0755 rfnetns /run/netns"
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
        "sh",
    ]


class CniPodman:
    """podman with the CNI backend on a :class:`CniDir`, in private storage.

    Every call runs ``podman --root/--runroot/--tmpdir`` under a private temp
    dir, ``--network-config-dir`` = ``cni.conf_dir``, inside the sandbox's
    host namespace (so the bridges it makes never reach the machine's root
    namespace).  Containers run from a busybox rootfs (``--rootfs``): no image,
    no registry.  ``stop()`` ends what podman left (conmon, mounts) and
    removes the directory.

    Example::

        with CniDir() as cni, CniSandbox() as sb, CniPodman(cni, sb) as podman:
            cni.write(cni.bridge("net1"))
            print(podman.run("net1", "ip", "-4", "addr").stdout)
    """

    # podman needs both raised: root here lacks CAP_SYS_RESOURCE (HOST.md).
    ULIMITS = ("--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768")

    def __init__(
        self,
        cni: CniDir,
        sandbox: CniSandbox,
        *,
        binary: str = "podman",
        runtime: str = "runc",
        journal: Journal | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.cni = cni
        self.sandbox = sandbox
        self.binary = binary
        self.runtime = runtime
        self.journal = journal
        self.timeout = timeout
        self.directory = Path("/nonexistent")
        #: every container's cgroup goes under this unique parent (removed on stop)
        self.cgroup_parent = "/" + naming.unique_name("rfpodcg", maxlen=40)
        self._rid: int | None = None
        self._cg_rid: int | None = None
        self._started = False

    @property
    def rootfs(self) -> Path:
        return self.directory / "rootfs"

    def start(self) -> CniPodman:
        if self._started:
            return self
        self.directory = Path(tempfile.mkdtemp(prefix="rfpod-"))
        if self.journal is not None:
            # The containerd kind ends processes naming the dir, unmounts, removes.
            self._rid = self.journal.add("containerd", dir=str(self.directory))
        if self.journal is not None:
            self._cg_rid = self.journal.add("cgroup-tree", parent=self.cgroup_parent)
        for sub in ("root", "runroot", "tmp"):
            (self.directory / sub).mkdir()
        busybox_rootfs(self.rootfs)
        self._started = True
        return self

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        from pytest_runtimefaults.containerd import cleanup_containerd_dir

        with contextlib.suppress(Exception):
            self.podman("rm", "--all", "--force", timeout=30)
        cleanup_containerd_dir(str(self.directory))
        kill_cgroup_tree(self.cgroup_parent)
        if self.journal is not None:
            for rid in (self._rid, self._cg_rid):
                if rid is not None:
                    self.journal.release(rid)
            self._rid = self._cg_rid = None

    def __enter__(self) -> CniPodman:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def argv(self, *args: str) -> list[str]:
        d = self.directory
        return [
            *private_state_argv(self.sandbox.host.path),
            self.binary,
            "--root",
            str(d / "root"),
            "--runroot",
            str(d / "runroot"),
            "--tmpdir",
            str(d / "tmp"),
            "--network-config-dir",
            str(self.cni.conf_dir),
            "--network-backend",
            "cni",
            "--cgroup-manager",
            "cgroupfs",
            "--runtime",
            self.runtime,
            "--events-backend",
            "none",
            "--storage-driver",
            "vfs",
            *args,
        ]

    def podman(self, *args: str, timeout: float | None = None) -> Any:
        """Run ``podman args...``; returns the CompletedProcess (text), never raises on rc."""
        import subprocess

        return subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            timeout=timeout or self.timeout,
            check=False,
        )

    def run(self, network: str, *command: str) -> Any:
        """``podman run --rm --network NETWORK --rootfs ROOTFS command...``."""
        return self.podman(
            "run",
            "--rm",
            *self.ULIMITS,
            "--cgroup-parent",
            self.cgroup_parent,
            "--network",
            network,
            "--rootfs",
            str(self.rootfs),
            *command,
        )


# --- containerd's CRI view of the CNI directory ----------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def decode_protobuf(buf: bytes) -> dict[int, list[Any]]:
    """Fields of one protobuf message: number -> values (ints or raw bytes).

    Just enough of the wire format to read CRI ``StatusResponse`` without the
    CRI stubs (which containerd's Python client does not ship).
    """
    out: dict[int, list[Any]] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.setdefault(number, []).append(value)
    return out


@dataclass(frozen=True)
class CriNetworkStatus:
    """What containerd's CRI plugin says about its CNI configuration.

    *ready*/*reason*/*message*: the ``NetworkReady`` condition; *networks*:
    the loaded networks as ``(name, (plugin types...))`` (loopback excluded);
    *last_load*: the last config load status containerd reports.
    """

    ready: bool
    reason: str
    message: str
    networks: tuple[tuple[str, tuple[str, ...]], ...]
    last_load: str

    @property
    def plugin_types(self) -> tuple[str, ...]:
        return tuple(t for _, types in self.networks for t in types)


def cri_network_status(address: str, timeout: float = 5.0) -> CriNetworkStatus:
    """Ask containerd's CRI ``RuntimeService/Status`` (verbose) over *address*."""
    import grpc

    with grpc.insecure_channel(f"unix://{address}") as channel:
        call = channel.unary_unary(
            "/runtime.v1.RuntimeService/Status",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        raw: bytes = call(b"\x08\x01", timeout=timeout)  # StatusRequest{verbose: true}
    top = decode_protobuf(raw)
    ready, reason, message = False, "", ""
    for cond in decode_protobuf(top[1][0]).get(1, []) if 1 in top else []:
        fields = decode_protobuf(cond)
        if fields[1][0] == b"NetworkReady":
            ready = bool(fields.get(2, [0])[0])
            reason = fields.get(3, [b""])[0].decode()
            message = fields.get(4, [b""])[0].decode()
    info: dict[str, str] = {}
    for entry in top.get(2, []):
        fields = decode_protobuf(entry)
        info[fields[1][0].decode()] = fields.get(2, [b""])[0].decode()
    networks: list[tuple[str, tuple[str, ...]]] = []
    with contextlib.suppress(ValueError, KeyError, TypeError):
        for net in json.loads(info.get("cniconfig", "{}")).get("Networks") or []:
            config = net["Config"]
            if config["Name"] == "cni-loopback":
                continue
            types = tuple(str(p["Network"]["type"]) for p in config["Plugins"])
            networks.append((str(config["Name"]), types))
    return CriNetworkStatus(
        ready, reason, message, tuple(networks), info.get("lastCNILoadStatus", "")
    )


def wait_cri_network(
    address: str, predicate: Callable[[CriNetworkStatus], bool], timeout: float = 5.0
) -> CriNetworkStatus:
    """Poll :func:`cri_network_status` until *predicate* holds; return the last status.

    containerd reloads the CNI config on inotify events, asynchronously, so
    a test waits for the reload instead of sleeping a guessed time.
    """
    deadline = time.monotonic() + timeout
    while True:
        status = cri_network_status(address)
        if predicate(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.02)


def _pb_field(number: int, payload: bytes | str) -> bytes:
    """One length-delimited protobuf field (strings and sub-messages)."""
    data = payload.encode() if isinstance(payload, str) else payload
    out = bytearray([(number << 3) | 2])
    length = len(data)
    while True:
        byte, length = length & 0x7F, length >> 7
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out) + data


@dataclass(frozen=True)
class CriPod:
    """A pod sandbox created through CRI: its id, IP and network namespace.

    *netns* is the path containerd gave it; *netns_path* the same namespace
    as this process can open it (through ``/proc/PID/root`` when containerd
    runs in its own mount namespace), for :func:`~pytest_runtimefaults.netns.link_kind`.
    """

    id: str
    ip: str
    netns: str
    netns_path: str


class CriPods:
    """``RunPodSandbox``/``StopPodSandbox``/``RemovePodSandbox`` over CRI's gRPC socket.

    What a kubelet does to give a pod its network, with no CRI stubs: the few
    fields needed are encoded by hand.  Each pod is a sandbox only (no
    containers), which is where CNI ADD and DEL happen.
    """

    def __init__(
        self,
        address: str,
        *,
        mount_pid: int | None = None,
        timeout: float = 30.0,
        journal: Journal | None = None,
    ) -> None:
        self.address = address
        self.mount_pid = mount_pid
        self.timeout = timeout
        self.pods: list[str] = []
        #: every pod's cgroups go under this unique parent (see :func:`kill_cgroup_tree`)
        self.cgroup_parent = "/" + naming.unique_name("rfcricg", maxlen=40)
        self.journal = journal
        self._rid = (
            journal.add("cgroup-tree", parent=self.cgroup_parent) if journal is not None else None
        )

    def _reach(self, path: str) -> str:
        if not path or self.mount_pid is None:
            return path
        # /var/run is a symlink to /run: an absolute symlink met under
        # /proc/PID/root resolves against *our* root, so resolve it first.
        return f"/proc/{self.mount_pid}/root{os.path.realpath(path)}"

    def _call(self, method: str, request: bytes) -> bytes:
        import grpc

        with grpc.insecure_channel(f"unix://{self.address}") as channel:
            stub = channel.unary_unary(
                f"/runtime.v1.RuntimeService/{method}",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            response: bytes = stub(request, timeout=self.timeout)
            return response

    def run(self, name: str | None = None, log_dir: str = "/tmp") -> CriPod:
        """Create a pod sandbox; raises ``grpc.RpcError`` with containerd's message."""
        name = name or naming.unique_name("rfpod", maxlen=40)
        metadata = _pb_field(1, name) + _pb_field(2, f"uid-{name}") + _pb_field(3, "rf")
        linux = _pb_field(1, self.cgroup_parent)  # LinuxPodSandboxConfig.cgroup_parent
        config = (
            _pb_field(1, metadata)
            + _pb_field(2, name[:63])
            + _pb_field(3, log_dir)
            + _pb_field(8, linux)
        )
        pod_id = decode_protobuf(self._call("RunPodSandbox", _pb_field(1, config)))[1][0].decode()
        self.pods.append(pod_id)
        return self.status(pod_id)

    def status(self, pod_id: str) -> CriPod:
        raw = self._call("PodSandboxStatus", _pb_field(1, pod_id) + b"\x10\x01")  # verbose
        top = decode_protobuf(raw)
        status = decode_protobuf(top[1][0])
        ip = ""
        if 5 in status:  # PodSandboxStatus.network -> PodSandboxNetworkStatus.ip
            ip = decode_protobuf(status[5][0]).get(1, [b""])[0].decode()
        netns = ""
        for entry in top.get(2, []):
            fields = decode_protobuf(entry)
            if fields[1][0] == b"info":
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    spec = json.loads(fields[2][0])["runtimeSpec"]
                    for ns in spec["linux"]["namespaces"]:
                        if ns["type"] == "network":
                            netns = str(ns.get("path", ""))
        return CriPod(pod_id, ip, netns, self._reach(netns))

    def remove(self, pod_id: str) -> None:
        """Stop (CNI DEL) and remove a pod sandbox."""
        self._call("StopPodSandbox", _pb_field(1, pod_id))
        self._call("RemovePodSandbox", _pb_field(1, pod_id))
        if pod_id in self.pods:
            self.pods.remove(pod_id)

    def namespaces(self) -> set[str]:
        """Pod network namespaces containerd has mounted, as ``netns:cri/NAME``
        (a leak check: ``registry.add_leak_check("netns:cri", pods.namespaces)``)."""
        where = self._reach("/run/netns")
        try:
            return {f"netns:cri/{name}" for name in os.listdir(where)}
        except OSError:
            return set()

    def list_ids(self) -> list[str]:
        """Ids of every pod sandbox CRI knows, ready or not (failed runs included)."""
        top = decode_protobuf(self._call("ListPodSandbox", b""))
        return [decode_protobuf(item)[1][0].decode() for item in top.get(1, [])]

    def remove_all(self) -> list[str]:
        """Stop and remove every pod CRI lists, and delete a pod's network
        namespace if containerd left it; returns the namespaces it had to delete."""
        left: list[str] = []
        for pod_id in self.list_ids():
            netns = ""
            with contextlib.suppress(Exception):
                netns = self.status(pod_id).netns
            with contextlib.suppress(Exception):
                self.remove(pod_id)
            if netns and os.path.exists(self._reach(netns)):
                import subprocess

                enter = ["nsenter", "-t", str(self.mount_pid), "-m"] if self.mount_pid else []
                subprocess.run(
                    [*enter, "ip", "netns", "delete", os.path.basename(netns)],
                    check=False,
                    capture_output=True,
                    timeout=30,
                )
                left.append(os.path.basename(netns))
        kill_cgroup_tree(self.cgroup_parent)
        if self.journal is not None and self._rid is not None:
            self.journal.release(self._rid)
            self._rid = None
        return left


def containerd_in_sandbox(
    cni: CniDir,
    sandbox: CniSandbox,
    *,
    journal: Journal | None = None,
    registry: Any = None,
) -> Any:
    """A private containerd with CRI on *cni*'s conf dir, running inside *sandbox*.

    The CRI plugin runs the CNI plugins from containerd's own network
    namespace, so containerd is started through :func:`private_state_argv`
    (a two-line wrapper script): pod bridges and veths stay in the sandbox,
    libcni's result cache and the pods' namespace mounts in containerd's own
    mount namespace (reach them with ``CriPods(address, mount_pid=ctd.pid)``).
    Its ``sandbox_image`` is a busybox-static image (``sleep``) imported
    into the private store, so pods need no registry.  Returns a started
    :class:`~pytest_runtimefaults.containerd.Containerd`; :func:`CriPods`
    talks to it.
    """
    from pytest_runtimefaults.containerd import Containerd
    from pytest_runtimefaults.rootfs import build_image_tar, build_rootfs

    ref = "localhost/runtimefaults/pause:latest"
    wrapper = cni.root / f"containerd-in-{sandbox.host.name}"
    prefix = " ".join(shlex.quote(a) for a in private_state_argv(sandbox.host.path))
    wrapper.write_text(f'#!/bin/sh\nexec {prefix} containerd "$@"\n')
    wrapper.chmod(0o755)
    ctd = Containerd(
        binary=str(wrapper),
        cri=True,
        cni_conf_dir=cni.conf_dir,
        cni_bin_dir=cni.plugin_dir,
        namespace="k8s.io",
        log_level="info",
        # restrict_oom_score_adj: the sandbox's -998 needs CAP_SYS_RESOURCE,
        # which root lacks on this kind of host (runc init dies otherwise).
        cri_config=f'enable_cdi = false\nrestrict_oom_score_adj = true\nsandbox_image = "{ref}"',
        journal=journal,
        registry=registry,
    )
    try:
        ctd.start()
        build_rootfs(ctd.directory / "pause-rootfs")
        tar = build_image_tar(
            ctd.directory / "pause-rootfs",
            ctd.directory / "pause.tar",
            ref=ref,
            cmd=("/bin/sleep", "86400"),
        )
        ctd.ctr("image", "import", str(tar))
    except BaseException:
        ctd.stop()
        raise
    return ctd
