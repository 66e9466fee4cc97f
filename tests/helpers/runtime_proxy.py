"""runc or crun talking to a sandboxed systemd through the D-Bus fault proxy.

The setup that tests/system/systemd/test_runtime_proxy.py, test_neighbours.py
and test_bus_restart.py share, as pytest fixtures and one function:

* ``sandbox`` (function): a :class:`SystemdSandbox`; the host's cgroup state
  must be as before once it is stopped;
* ``proxy`` (function): a :class:`DBusFaultProxy` in front of the sandbox's
  bus; it must have had no errors of its own at teardown.  Depends on ``sandbox``;
* ``rootfs`` (module): a busybox rootfs; ``bundle`` (function): an OCI
  bundle running ``/bin/sleep 600`` in it;
* :func:`runtime_through`: the runtime with the systemd cgroup driver, its
  systemd the sandbox's, its bus the proxy.

A test module uses them by importing them: pytest finds fixtures among a
module's names, by the fixture's name, not the one it is imported as (the
functions are ``*_fixture`` so that a test's ``sandbox`` parameter does not
shadow an import)::

    from runtime_proxy import proxy_fixture, runtime_through, sandbox_fixture  # noqa: F401

    def test_x(sandbox, proxy, bundle):
        rt = runtime_through("runc", sandbox, proxy, timeout=35)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_runtimefaults.dbus.proxy import DBusFaultProxy
from pytest_runtimefaults.rootfs import build_bundle, build_rootfs
from pytest_runtimefaults.runtime import Runtime
from pytest_runtimefaults.systemd import SystemdSandbox, host_cgroup_state

__all__ = [
    "bundle_fixture",
    "proxy_fixture",
    "rootfs_fixture",
    "runtime_through",
    "sandbox_fixture",
]


@pytest.fixture(scope="module", name="rootfs")
def rootfs_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox rootfs for the module's bundles (module scope)."""
    return build_rootfs(tmp_path_factory.mktemp("rootfs") / "rootfs")


@pytest.fixture(name="bundle")
def bundle_fixture(rootfs: Path, tmp_path: Path) -> Path:
    """An OCI bundle running ``/bin/sleep 600`` (function scope). Depends on ``rootfs``."""
    return build_bundle(tmp_path / "bundle", ["/bin/sleep", "600"], rootfs=rootfs)


@pytest.fixture(name="sandbox")
def sandbox_fixture() -> Iterator[SystemdSandbox]:
    """A sandboxed systemd (function scope); the host's cgroups as before after it."""
    before = host_cgroup_state()
    with SystemdSandbox() as sd:
        yield sd
    assert host_cgroup_state() == before


@pytest.fixture(name="proxy")
def proxy_fixture(sandbox: SystemdSandbox) -> Iterator[DBusFaultProxy]:
    """The fault proxy in front of the sandbox's bus (function scope); no proxy
    errors at teardown.  Depends on ``sandbox``."""
    with DBusFaultProxy(sandbox.bus_address, directory=sandbox.workdir) as p:
        yield p
        assert not p.errors, p.errors


def runtime_through(
    name: str, sandbox: SystemdSandbox, proxy: DBusFaultProxy, **kwargs: Any
) -> Runtime:
    """Runtime *name* (``runc``, ``crun``) with the systemd cgroup driver, in
    *sandbox*, its D-Bus traffic through *proxy*; *kwargs* go to :class:`Runtime`
    (``timeout=``...)."""
    return Runtime(
        name, cgroup_driver="systemd", sandbox=sandbox, dbus_address=proxy.address, **kwargs
    )
