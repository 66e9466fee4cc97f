"""The ``pytest_runtimefaults`` logger, and the one way to swallow an error.

Best-effort cleanup must not fail a test for something it could not undo, but
it must not hide it either: :func:`swallowed` logs what it caught at debug
level, with the traceback, so pytest's captured-log section shows it under a
failing test (and ``--log-level=DEBUG`` shows it always).

Example::

    with swallowed(OSError, "removing %s", path):
        path.unlink()
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["logger", "swallowed"]

logger = logging.getLogger("pytest_runtimefaults")


@contextmanager
def swallowed(
    exceptions: type[BaseException] | tuple[type[BaseException], ...] = Exception,
    what: str = "best-effort step",
    *args: object,
) -> Iterator[None]:
    """Like :func:`contextlib.suppress`, but logs what it suppressed (debug, traceback).

    *what* and *args* are a ``%``-format message naming the step, evaluated only
    when the record is emitted.
    """
    try:
        yield
    except exceptions:
        logger.debug("swallowed an error in " + what, *args, exc_info=True)
