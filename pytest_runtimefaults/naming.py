"""Unique, short names for resources, per process and per xdist worker.

Kernel names are short (a network interface name has at most 15 bytes), so
names are built from a prefix, the PID in base 36 padded to five characters
(:func:`process_tag`) and a counter.  Two pytest runs, or two xdist workers,
never produce the same name: with the tag of fixed width, the same prefix and
a different PID differ in the tag itself.

Example::

    unique_name("rfbr")   # 'rfbr000k31', unique on this host while the process lives
"""

from __future__ import annotations

import itertools
import os
import threading

__all__ = ["process_tag", "tag_pid", "unique_name", "worker_index"]

_counter = itertools.count(1)
_lock = threading.Lock()
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
# Linux's PID_MAX_LIMIT is 2**22 (4194304, '2hwcg' in base 36): five characters.
_TAG_WIDTH = 5


def _b36(n: int) -> str:
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = _ALPHABET[r] + out
        if n == 0:
            return out


def worker_index() -> int:
    """The pytest-xdist worker number (``gw3`` -> 3), or 0 without xdist."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    digits = "".join(ch for ch in worker if ch.isdigit())
    return int(digits) if digits else 0


def process_tag() -> str:
    """The part of every :func:`unique_name` that names this process.

    Its PID in base 36, zero-padded to five characters: of fixed width, so
    that no PID's tag followed by a counter can spell another PID's tag
    followed by another counter (unpadded, PID 46 with counter ``23`` and PID
    1658 with counter ``3`` both gave ``…1a23``).  Leak checks use it to tell
    this process's resources from those of other pytest runs or xdist workers
    sharing the host: ``process_tag() in name``.
    """
    return _b36(os.getpid()).rjust(_TAG_WIDTH, "0")


def tag_pid(tag: str) -> int:
    """The PID a :func:`process_tag` names (``tag_pid(process_tag()) == os.getpid()``)."""
    return int(tag, 36)


def unique_name(prefix: str, maxlen: int = 15) -> str:
    """``prefix`` + :func:`process_tag` + counter, at most *maxlen* characters.

    The PID makes names unique between processes alive at the same time (each
    xdist worker is its own process); a name left by a dead run is reaped by
    the journal before its PID can come back.
    """
    with _lock:
        n = next(_counter)
    name = f"{prefix}{process_tag()}{_b36(n)}"
    if len(name) > maxlen:
        raise ValueError(f"name {name!r} is longer than {maxlen}: use a shorter prefix")
    return name
