"""Helpers shared by the D-Bus tests: the test service as a fixture-friendly context."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

SERVICE = str(Path(__file__).with_name("dbus_service.py"))
NAME = "org.example.RuntimeFaults"
PATH = "/org/example/RuntimeFaults"


@contextlib.contextmanager
def service(address: str, name: str = NAME) -> Iterator[subprocess.Popen[str]]:
    """Run tests/helpers/dbus_service.py on *address* until the block ends (killed by PID)."""
    proc = subprocess.Popen(
        [sys.executable, SERVICE, address, name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"test service did not start: {line!r} {proc.stderr.read()}")
        yield proc
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def run(argv: list[str], timeout: float = 20, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload,no-any-return]
