"""A crash-safe journal of the resources fixtures create.

Every resource (a process, a directory, a mount, a network namespace, a link,
a cgroup) is appended to a journal file *as it is created* and marked released
when it is removed.  A journal file belongs to one owner process (a pytest run,
an xdist worker, the CLI) and is named after its PID and start time.  When the
owner dies without cleaning up (pytest was SIGKILLed, the machine ran out of
memory), the next run, or ``runtimefaults cleanup``, replays the journals of
dead owners and undoes what they left, newest first.  Live owners' journals
are never touched.

Example::

    journal = Journal.default()
    rid = journal.add("path", path=str(tmpdir))
    ...
    journal.release(rid)

Resource kinds and how they are reaped:

========  ===================================  ===============================
kind      fields                               reaped by
========  ===================================  ===============================
process   pid, starttime                       SIGKILL, if still the same process
path      path                                 ``rm -r`` (never follows symlinks)
mount     target                               ``umount -l``
netns     name                                 ``ip netns delete``
link      name, netns (optional)               ``ip link delete``
cgroup    path                                 ``rmdir`` (deepest first)
========  ===================================  ===============================

Other modules add kinds with :func:`register_reaper`.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Journal",
    "ReapResult",
    "default_state_dir",
    "process_starttime",
    "reap_dead_owners",
    "register_reaper",
]

Reaper = Callable[[dict[str, Any]], None]
_REAPERS: dict[str, Reaper] = {}
_instances = itertools.count(1)


_REAPER_MODULES: dict[str, str] = {}


def register_reaper(kind: str, reaper: Reaper) -> None:
    """Teach the journal how to undo resources of *kind* (``reaper(record)``).

    The reaper's module is written into each record of that kind, so that a
    process that never imported it (``runtimefaults cleanup``) imports it
    before reaping.
    """
    _REAPERS[kind] = reaper
    if reaper.__module__ != __name__:
        _REAPER_MODULES[kind] = reaper.__module__


def _reaper_for(record: dict[str, Any]) -> Reaper | None:
    kind = record.get("kind", "")
    reaper = _REAPERS.get(kind)
    module = record.get("reaper_module")
    if reaper is None and isinstance(module, str) and module.startswith("pytest_runtimefaults."):
        try:
            importlib.import_module(module)
        except ImportError:
            return None
        reaper = _REAPERS.get(kind)
    return reaper


def default_state_dir() -> Path:
    """Where journals live: ``$RUNTIMEFAULTS_STATE_DIR``, else ``/run/runtimefaults``
    for root, else ``$XDG_RUNTIME_DIR/runtimefaults`` or ``/tmp/runtimefaults-UID``."""
    env = os.environ.get("RUNTIMEFAULTS_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0 and os.path.isdir("/run"):
        return Path("/run/runtimefaults")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "runtimefaults"
    return Path(f"/tmp/runtimefaults-{os.getuid()}")


def process_starttime(pid: int) -> int | None:
    """The start time of *pid* in clock ticks since boot, or None if it is gone.

    Together with the PID it names a process uniquely: a recycled PID has
    another start time, so the journal never kills a stranger.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])


def _alive(pid: int, starttime: int | None) -> bool:
    current = process_starttime(pid)
    return current is not None and (starttime is None or current == starttime)


class Journal:
    """An append-only journal of one owner's resources (thread-safe)."""

    def __init__(self, state_dir: Path | str, owner_pid: int | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.owner_pid = owner_pid if owner_pid is not None else os.getpid()
        self.owner_starttime = process_starttime(self.owner_pid)
        # One file per Journal object, not per process: pytester runs a nested
        # pytest in the same process, and a library class may make its own
        # Journal; each must be able to delete its own file when empty.
        self.path = (
            self.state_dir / f"{self.owner_pid}-{self.owner_starttime}-{next(_instances)}.jsonl"
        )
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._live: dict[int, dict[str, Any]] = {}

    @classmethod
    def default(cls) -> Journal:
        return cls(default_state_dir())

    def _append(self, entry: dict[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        line = json.dumps(entry, sort_keys=True) + "\n"
        # O_APPEND writes of one short line are atomic; fsync is not needed for
        # crash-of-pytest safety (the kernel keeps the page), only for power loss.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def add(self, kind: str, **fields: Any) -> int:
        """Record a resource that now exists; returns its id for :meth:`release`."""
        with self._lock:
            rid = next(self._ids)
            record = {"op": "add", "id": rid, "kind": kind, **fields}
            if kind in _REAPER_MODULES:
                record["reaper_module"] = _REAPER_MODULES[kind]
            self._live[rid] = record
            self._append(record)
            return rid

    def add_process(self, pid: int) -> int:
        return self.add("process", pid=pid, starttime=process_starttime(pid))

    def release(self, rid: int) -> None:
        """Record that the resource *rid* is gone (idempotent)."""
        with self._lock:
            if self._live.pop(rid, None) is None:
                return
            self._append({"op": "del", "id": rid})
            if not self._live:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()

    @contextlib.contextmanager
    def tracking(self, kind: str, **fields: Any) -> Iterator[int]:
        """``with journal.tracking("path", path=p):`` records for the block's duration."""
        rid = self.add(kind, **fields)
        try:
            yield rid
        finally:
            self.release(rid)

    def live(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._live.values())


@dataclass
class ReapResult:
    """What one reap did: resources undone and the errors met (never raised)."""

    reaped: list[dict[str, Any]]
    errors: list[str]
    journals: int


def _read_journal(path: Path) -> list[dict[str, Any]]:
    live: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by the crash itself; the rest still counts
        if entry.get("op") == "add":
            live[entry["id"]] = entry
        elif entry.get("op") == "del":
            live.pop(entry.get("id"), None)
    return sorted(live.values(), key=lambda e: e["id"], reverse=True)


def reap_dead_owners(state_dir: Path | str | None = None, *, dry_run: bool = False) -> ReapResult:
    """Undo every resource recorded by an owner that is no longer alive."""
    directory = Path(state_dir) if state_dir is not None else default_state_dir()
    result = ReapResult(reaped=[], errors=[], journals=0)
    if not directory.is_dir():
        return result
    for path in sorted(directory.glob("*.jsonl")):
        try:
            pid_s, start_s = path.stem.split("-")[:2]
            owner_pid, owner_start = int(pid_s), (None if start_s == "None" else int(start_s))
        except ValueError:
            continue
        if _alive(owner_pid, owner_start):
            continue
        try:
            lock = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue  # another reaper (a concurrent pytest run) finished it
        try:
            # Two runs starting at once must not both replay one journal.
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock)
            continue
        try:
            _reap_one(path, result, dry_run)
        finally:
            os.close(lock)
    return result


def _reap_one(path: Path, result: ReapResult, dry_run: bool) -> None:
    if not path.exists():
        return
    result.journals += 1
    for record in _read_journal(path):
        reaper = _reaper_for(record)
        if reaper is None:
            result.errors.append(f"{path.name}: no reaper for kind {record['kind']!r}")
            continue
        if not dry_run:
            try:
                reaper(record)
            except Exception as exc:  # a reap must go on past one failure
                result.errors.append(f"{record['kind']} {record}: {exc}")
                continue
        result.reaped.append(record)
    if not dry_run:
        path.unlink(missing_ok=True)


# --- built-in reapers -------------------------------------------------------


def _reap_process(record: dict[str, Any]) -> None:
    pid, starttime = int(record["pid"]), record.get("starttime")
    # Without a start time the PID may since belong to a stranger: never kill it.
    if starttime is not None and _alive(pid, starttime):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    targets = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = line.split()[4].replace("\\040", " ")
            if target == str(path) or target.startswith(prefix):
                targets.append(target)
    return targets


def _reap_path(record: dict[str, Any]) -> None:
    path = Path(record["path"])
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    # rmtree crosses mount points: a bind mount left inside the directory
    # would have its *source* emptied.  Detach mounts below it first, deepest
    # first; refuse to delete if any remain.
    for target in sorted(_mounts_under(path), key=len, reverse=True):
        _run_quiet("umount", "-l", target)
    remaining = _mounts_under(path)
    if remaining:
        raise OSError(f"not removing {path}: still mounted below it: {remaining}")
    shutil.rmtree(path, ignore_errors=True)


def _run_quiet(*argv: str) -> None:
    subprocess.run(argv, check=False, capture_output=True, timeout=30)


def _reap_mount(record: dict[str, Any]) -> None:
    _run_quiet("umount", "-l", record["target"])


def _reap_netns(record: dict[str, Any]) -> None:
    _run_quiet("ip", "netns", "delete", record["name"])


def _reap_link(record: dict[str, Any]) -> None:
    if record.get("netns"):
        _run_quiet("ip", "-n", record["netns"], "link", "delete", record["name"])
    else:
        _run_quiet("ip", "link", "delete", record["name"])


def _reap_cgroup(record: dict[str, Any]) -> None:
    root = Path(record["path"])
    if not root.is_dir():
        return
    # cgroup directories can only be removed leaf first.
    for sub in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()


for _kind, _fn in {
    "process": _reap_process,
    "path": _reap_path,
    "mount": _reap_mount,
    "netns": _reap_netns,
    "link": _reap_link,
    "cgroup": _reap_cgroup,
}.items():
    register_reaper(_kind, _fn)
