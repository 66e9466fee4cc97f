"""CNI configuration files: writing them whole or broken, judging them, a private dir.

What every other module of :mod:`pytest_runtimefaults.cni` builds on: the file
names a CNI loader reads (:data:`CONFIG_SUFFIXES`), an atomic writer
(:func:`write_atomic`: temp file, fsync, rename, fsync of the directory), the
broken forms a reader meets in the wild (:func:`broken_bytes`), libcni's
verdict on a file (:func:`validate_config`), unique subnets
(:func:`next_subnet`) and :class:`CniDir`, a private conf dir with builders
for bridge, macvlan and ptp conflists.

Example::

    with CniDir() as cni:
        conf = cni.bridge()                     # unique name, bridge and subnet
        path = cni.write(conf)                  # temp + fsync + rename
        assert validate_config(path.read_bytes()) is None
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pytest_runtimefaults import naming
from pytest_runtimefaults.core.log import logger, swallowed

if TYPE_CHECKING:
    from pytest_runtimefaults.journal import Journal

__all__ = [
    "BROKEN_MODES",
    "CONFIG_SUFFIXES",
    "BrokenMode",
    "CniDir",
    "Content",
    "broken_bytes",
    "encode",
    "next_subnet",
    "validate_config",
    "whole_files",
    "write_atomic",
]

#: What a config can be given as: raw bytes, text, or a JSON object.
Content = bytes | str | Mapping[str, Any]

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


def encode(content: Content) -> bytes:
    """*content* as the bytes of a file (a mapping as indented JSON and a newline)."""
    if isinstance(content, bytes):
        return content
    if isinstance(content, str):
        return content.encode()
    return (json.dumps(content, indent=2) + "\n").encode()


def write_atomic(path: Path | str, content: Content) -> Path:
    """Write *path* as a careful runtime does: temp file, fsync, rename, fsync dir.

    The temporary name starts with a dot and ends in ``.tmp``, so no CNI
    loader ever reads it; a reader sees the old file or the new one, whole.
    """
    path = Path(path)
    data = encode(content)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
    except BaseException:
        # The caller sees the write's own error, not one from removing the temp file.
        with swallowed(OSError, "removing the temporary file %s", tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path


def broken_bytes(content: Content, mode: str, at: float = 0.5) -> bytes:
    """*content* made broken in one of the ways a reader meets in the wild.

    ``truncate``: the first *at* of it (a fraction, or a byte count if > 1);
    ``empty``: nothing; ``nul``: whole, then NUL padding (a file extended
    before its data was flushed); ``wrong-version``: whole JSON with a
    ``cniVersion`` no plugin supports.
    """
    data = encode(content)
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
        return encode(obj)
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


def _remove_tree(path: Path) -> None:
    """``rm -r`` *path*, going on past what cannot be removed and logging it (debug)."""

    def log(function: Any, failed: str, error: Any) -> None:
        # onerror passes an exc_info triple, onexc (3.12+) the exception itself.
        logger.debug(
            "could not remove %s (%s)",
            failed,
            getattr(function, "__name__", function),
            exc_info=error,
        )

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=log)
    else:
        shutil.rmtree(path, onerror=log)


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
        self.journal = journal if journal is not None else _default_journal()
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
            _remove_tree(self.root)
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
        """Remove a config file if it is there."""
        self.path(filename).unlink(missing_ok=True)

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


def whole_files(files: Iterable[Path]) -> dict[str, str | None]:
    """Each file's :func:`validate_config` verdict (None: loadable)."""
    out: dict[str, str | None] = {}
    for path in files:
        try:
            out[path.name] = validate_config(path.read_bytes())
        except OSError as exc:
            out[path.name] = str(exc)
    return out


def _default_journal() -> Journal:
    """The default journal (``runtimefaults cleanup`` reads it): classes journal
    what they create even when no fixture handed them one."""
    from pytest_runtimefaults.journal import Journal

    return Journal.default()
