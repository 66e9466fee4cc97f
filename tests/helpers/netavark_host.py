"""The host check of the netavark tests: what podman and netavark could change.

tests/system/cni/test_cni_netavark.py and test_cni_netavark_races.py import
the autouse fixture ``host_unchanged`` (pytest finds it among the module's
names)::

    from netavark_host import host_unchanged_fixture  # noqa: F401
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from pytest_runtimefaults.cni import host_network_state

__all__ = ["host_unchanged_fixture"]


@pytest.fixture(autouse=True, name="host_unchanged")
def host_unchanged_fixture() -> Iterator[None]:
    """The host's root-namespace links, firewall, ip_forward and /run/containers
    are as before the test (netavark's teardown may take a moment: 3 s)."""
    before = host_network_state()
    yield
    deadline = time.monotonic() + 3
    while host_network_state() != before and time.monotonic() < deadline:
        time.sleep(0.1)
    after = host_network_state()
    assert after == before, {"appeared": after - before, "vanished": before - after}
