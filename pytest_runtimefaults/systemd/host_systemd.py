"""The host's own systemd, with the sandbox's surface, used only by consent.

(Not ``host.py``: :mod:`pytest_runtimefaults.host` is the host-plumbing
package, and two modules called ``host`` would be one too many.)

Example::

    with HostSystemd() as sd:  # --runtimefaults-host-systemd
        sd.run(["systemctl", "is-system-running"])
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence

from pytest_runtimefaults import caps
from pytest_runtimefaults.systemd.errors import SandboxError
from pytest_runtimefaults.systemd.inspector import SystemdInspector

__all__ = ["HostSystemd"]


class HostSystemd:
    """The host's own systemd, used only by consent (``--runtimefaults-host-systemd``).

    Offers the same surface as :class:`~pytest_runtimefaults.systemd.SystemdSandbox`
    where it makes sense: commands run directly, the bus is the host's system bus.
    """

    def __init__(self) -> None:
        if not caps.systemd_is_pid1():
            raise SandboxError("the host does not run systemd as PID 1")
        self.pid = 1
        self.boot_seconds = 0.0
        self.layout = {"v2": "unified", "hybrid": "hybrid", "v1": "legacy"}[caps.cgroup_layout()]

    bus_address = "unix:path=/run/dbus/system_bus_socket"
    inner_bus_address = bus_address

    def __enter__(self) -> HostSystemd:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def start(self) -> HostSystemd:
        return self

    def stop(self) -> None:
        pass

    def command(self, argv: Sequence[str]) -> list[str]:
        return list(argv)

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = 60,
        check: bool = False,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            list(argv),
            env=dict(env) if env is not None else None,
            capture_output=True,
            timeout=timeout,
            check=check,
            input=input,
        )

    def inspector(self) -> SystemdInspector:
        return SystemdInspector(self.bus_address)
