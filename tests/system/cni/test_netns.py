"""netns helpers against the real kernel and the real CNI plugins."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_runtimefaults.cni import CniDir
from pytest_runtimefaults.journal import Journal, reap_dead_owners
from pytest_runtimefaults.naming import unique_name
from pytest_runtimefaults.netns import (
    CniError,
    CniSandbox,
    NetNS,
    iproute,
    link_kind,
    list_links,
    netlink_socket_in,
    own_namespaces,
    snapshot_addresses,
    snapshot_ipam,
    snapshot_links,
    snapshot_namespaces,
)

pytestmark = [
    pytest.mark.needs("cni-plugins"),
    pytest.mark.timeout(60),
]


@pytest.fixture(autouse=True)
def host_unchanged() -> Iterator[None]:
    """Every test leaves the host's namespaces and root links as it found them."""
    before = (own_namespaces(), snapshot_links(None))
    yield
    deadline = time.monotonic() + 3  # another worker's podman may own a cni-* netns briefly
    while (own_namespaces(), snapshot_links(None)) != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (own_namespaces(), snapshot_links(None)) == before


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    return Journal(tmp_path / "state")


def test_netns_create_remove_journaled(journal: Journal) -> None:
    with NetNS(journal=journal) as ns:
        assert ns.path.exists()
        assert f"netns:{ns.name}" in snapshot_namespaces()
        assert [r["name"] for r in journal.live()] == [ns.name]
        kinds = {link.kind for link in list_links(ns.name)}
        assert kinds == {"loopback"}
    assert not ns.path.exists()
    assert journal.live() == []
    ns.stop()  # idempotent


def test_namespaces_and_their_sockets_come_without_forking(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pyroute2's netns.create and NetNS fork this multi-threaded process without
    # exec (a child hung for good once); ours run `ip netns add` and a thread's setns.
    def no_fork() -> int:
        raise AssertionError("os.fork called: a netns helper forked this process")

    monkeypatch.setattr(os, "fork", no_fork)
    fds = len(os.listdir("/proc/self/fd"))
    with NetNS(journal=journal) as ns:
        by_name = netlink_socket_in(ns.name)
        by_path = netlink_socket_in(str(ns.path))  # a path works as well as a name
        by_name.close()
        by_path.close()
        # The sockets are the namespace's: a bridge made through one is there, not here.
        bridge = unique_name("rfbr")
        with iproute(ns.name) as ipr:
            ipr.link("add", ifname=bridge, kind="bridge")
        assert {link.name for link in list_links(ns.name)} == {"lo", bridge}
        assert link_kind(ns.name, bridge) == "bridge"
        assert bridge not in {link.name for link in list_links(None)}
    assert len(os.listdir("/proc/self/fd")) == fds  # every socket closed with its IPRoute
    # An existing namespace only: nothing is created under a name that is not there.
    with pytest.raises(FileNotFoundError):
        netlink_socket_in(ns.name)
    assert not ns.path.exists()


def test_journal_reaps_a_netns_left_by_a_dead_owner(tmp_path: Path) -> None:
    # A journal whose owner PID is not alive: its namespace is reaped.
    state = tmp_path / "state"
    dead = Journal(state, owner_pid=2**22 + 12345)
    ns = NetNS(journal=dead).start()
    assert ns.path.exists()
    result = reap_dead_owners(state)
    assert [r["name"] for r in result.reaped] == [ns.name], result.errors
    assert not ns.path.exists()


def test_bridge_add_check_del_and_snapshots(journal: Journal) -> None:
    with CniDir(journal=journal) as cni, CniSandbox(journal=journal) as sandbox:
        conf = cni.bridge()
        ns = sandbox.container()
        result = sandbox.add(conf, ns, container_id="c1")
        assert len(result.ips) == 1
        assert result.ips[0].startswith(conf["plugins"][0]["ipam"]["subnet"].rsplit(".", 2)[0])
        assert link_kind(ns.name, "eth0") == "veth"
        bridge = conf["plugins"][0]["bridge"]
        assert f"link:{sandbox.host.name}/{bridge}:bridge" in snapshot_links(sandbox.host.name)
        assert any(a.startswith(f"addr:{ns.name}/eth0/") for a in snapshot_addresses(ns.name))
        reserved = snapshot_ipam(cni.ipam_dir)
        assert reserved == {f"ipam:{conf['name']}/{result.ips[0].split('/')[0]}=c1"}
        sandbox.check(conf, ns, result.raw, container_id="c1")
        host_veths = snapshot_links(sandbox.host.name, kinds=("veth",))
        assert len(host_veths) == 1
        sandbox.delete(conf, ns, container_id="c1")
        assert snapshot_ipam(cni.ipam_dir) == set()
        assert snapshot_links(sandbox.host.name, kinds=("veth",)) == set()
        assert link_kind(ns.name, "eth0") is None
        sandbox.delete(conf, ns, container_id="c1")  # a second DEL is fine (spec)
    assert journal.live() == []


def test_macvlan_and_ptp_link_kinds(journal: Journal) -> None:
    with CniDir(journal=journal) as cni, CniSandbox(journal=journal) as sandbox:
        master = sandbox.master_link()
        mac = cni.macvlan(master)
        ptp = cni.ptp()
        a, b = sandbox.container(), sandbox.container()
        sandbox.add(mac, a, container_id="a")
        sandbox.add(ptp, b, container_id="b")
        assert link_kind(a.name, "eth0") == "macvlan"
        assert link_kind(b.name, "eth0") == "veth"
        sandbox.delete(mac, a, container_id="a")
        sandbox.delete(ptp, b, container_id="b")
        assert snapshot_ipam(cni.ipam_dir) == set()


def test_plugin_error_is_parsed(journal: Journal) -> None:
    with CniSandbox(journal=journal) as sandbox:
        ns = sandbox.container()
        with pytest.raises(CniError) as info:
            sandbox.invoke("ADD", b'{"cniVersion": "1.0.0", "na', ns, plugin="bridge")
        assert info.value.code == 6
        assert "unexpected end of JSON input" in info.value.msg
        assert "bridge" in str(info.value)


def test_snapshot_ipam_ignores_bookkeeping(tmp_path: Path) -> None:
    net = tmp_path / "net1"
    net.mkdir()
    (net / "lock").write_text("")
    (net / "last_reserved_ip.0").write_text("10.64.0.9")
    (net / "10.64.0.9").write_text("abc\neth0")
    assert snapshot_ipam(tmp_path) == {"ipam:net1/10.64.0.9=abc"}
    assert snapshot_ipam(tmp_path / "missing") == set()
