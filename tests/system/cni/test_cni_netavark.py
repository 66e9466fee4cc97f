"""podman's netavark backend (podman 4.3 + netavark 1.4 here; podman 5 has nothing else)
facing half-written, held, vanishing and racing network files.

Incident 4 of the fault catalog on the directory podman 5 reads: one JSON file
per network.  The first tests need no podman: the validator, the file faults
and the watcher on a :class:`NetavarkDir`, each catching a susceptible reader
or writer and passing a correct one.  The rest run the real podman with
``--network-backend netavark`` inside the harness's own network namespace,
and check after every test that the host's links, firewall rules,
``ip_forward`` and ``/run/containers`` are what they were.  The outcomes are
tabled in docs/cni.md.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from netavark_host import host_unchanged_fixture  # noqa: F401 - autouse: pytest finds it here

from pytest_runtimefaults.cni import (
    DeleteRecreate,
    HalfWritten,
    HeldHalfWritten,
    NetavarkDir,
    NetavarkPodman,
    RacingWriter,
    host_network_state,
    netavark_network,
    next_subnet,
    validate_network,
)
from pytest_runtimefaults.cni.config import encode
from pytest_runtimefaults.faults import FaultRegistry

pytestmark = pytest.mark.timeout(180)

root_only = pytest.mark.needs("root")  # tests/system/ needs it anyway: said here for the reader

NOT_FOUND = "network not found"


def ipv4(stdout: str) -> list[str]:
    return re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", stdout)


def subnet_of(net: dict[str, Any]) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(net["subnets"][0]["subnet"])


def in_subnet(address: str, net: dict[str, Any]) -> bool:
    return ipaddress.IPv4Address(address) in subnet_of(net)


def outcome(result: Any) -> str:
    if result.returncode == 0:
        return "ok"
    return f"rc {result.returncode}: " + (
        NOT_FOUND if NOT_FOUND in result.stderr else result.stderr.strip()[-200:]
    )


# --- readers to judge the faults with (no podman needed) --------------------


def naive_load(directory: Path) -> dict[str, dict[str, Any]]:
    """A susceptible loader: lists, then reads each file once, aborting on the first error."""
    out = {}
    for path in sorted(directory.glob("*.json")):
        net = json.loads(path.read_bytes())
        out[net["name"]] = net
    return out


def careful_load(directory: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """A correct loader: a vanished file is gone, a broken one is named and skipped."""
    nets: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        why = validate_network(data, path.name)
        if why is not None:
            errors[path.name] = why
            continue
        net, _ = json.JSONDecoder().raw_decode(data.decode())
        nets[net["name"]] = net
    return nets, errors


# --- the validator ------------------------------------------------------------


def test_a_built_network_is_valid_and_shaped_as_podman_writes_it() -> None:
    net = netavark_network()
    assert validate_network(encode(net), f"{net['name']}.json") is None
    assert set(net) == {
        "name",
        "id",
        "driver",
        "network_interface",
        "created",
        "subnets",
        "ipv6_enabled",
        "internal",
        "dns_enabled",
        "ipam_options",
    }
    assert len(net["network_interface"]) <= 15
    (subnet,) = net["subnets"]
    assert ipaddress.ip_address(subnet["gateway"]) in ipaddress.ip_network(subnet["subnet"])


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda n: n.update(name="bad name"), "invalid network name"),
        (lambda n: n.update(id="xyz"), "invalid network id"),
        (lambda n: n.update(driver="nope"), "unknown driver"),
        (lambda n: n.pop("network_interface"), "without network_interface"),
        (lambda n: n["subnets"][0].update(gateway="192.0.2.1"), "is not in subnet"),
        (lambda n: n["subnets"][0].update(subnet="10.1.2"), "invalid subnet"),
        (lambda n: n.update(internal="no"), "internal is not a boolean"),
    ],
)
def test_validate_network_names_what_is_wrong(mutate: Any, reason: str) -> None:
    net = netavark_network()
    mutate(net)
    why = validate_network(encode(net))
    assert why is not None
    assert reason in why, why


def test_validate_network_follows_podman_on_bytes() -> None:
    net = netavark_network()
    data = encode(net)
    assert validate_network(b"") == "empty file"
    assert (validate_network(data[: len(data) // 2]) or "").startswith("invalid JSON")
    # Go's json.Decoder reads the first value and ignores what follows: podman loads it.
    assert validate_network(data + b"\0" * 64) is None
    assert "does not match the file name" in (validate_network(data, "other.json") or "")


# --- the faults and the watcher on a netavark dir ---------------------------


@pytest.mark.parametrize("mode", ["truncate", "empty"])
def test_half_written_network_breaks_a_naive_loader_not_a_careful_one(
    netavark_dir: NetavarkDir, netavark_half_written: Any, mode: str
) -> None:
    good = netavark_dir.network()
    netavark_dir.write(good)
    bad = netavark_dir.network("aa-broken")
    fault = netavark_half_written("aa-broken.json", bad, mode=mode)
    with pytest.raises(json.JSONDecodeError):
        naive_load(netavark_dir.conf_dir)
    nets, errors = careful_load(netavark_dir.conf_dir)
    assert list(nets) == [good["name"]]
    assert set(errors) == {"aa-broken.json"}
    assert set(netavark_dir.broken_files()) == {"aa-broken.json"}
    fault.lift()
    assert netavark_dir.broken_files() == {}


def test_held_half_written_network_is_whole_after_release(netavark_dir: NetavarkDir) -> None:
    net = netavark_dir.network()
    with HeldHalfWritten(netavark_dir, netavark_dir.filename(net), net) as held:
        assert set(netavark_dir.broken_files()) == {netavark_dir.filename(net)}
        with pytest.raises(json.JSONDecodeError):
            naive_load(netavark_dir.conf_dir)
        held.release()
        assert held.completed.is_set()
    assert netavark_dir.broken_files() == {}
    assert naive_load(netavark_dir.conf_dir) == {net["name"]: net}


def test_delete_recreate_network_catches_list_then_open(netavark_dir: NetavarkDir) -> None:
    net = netavark_dir.network()
    vanished = kept = 0
    with DeleteRecreate(netavark_dir, netavark_dir.filename(net), net, gap=0.002) as flap:
        deadline = time.monotonic() + 5
        while vanished == 0 and time.monotonic() < deadline:
            try:
                naive_load(netavark_dir.conf_dir)
            except FileNotFoundError:
                vanished += 1
            nets, errors = careful_load(netavark_dir.conf_dir)
            assert errors == {}
            kept += len(nets)
    assert vanished > 0
    assert flap.count > 0
    assert netavark_dir.broken_files() == {}


def test_racing_writer_on_networks_is_caught_and_lifted_whole(netavark_dir: NetavarkDir) -> None:
    a, b = netavark_dir.network(), netavark_dir.network()
    files = {netavark_dir.filename(a): a, netavark_dir.filename(b): b}
    torn = 0
    with RacingWriter(netavark_dir, files) as writer:
        deadline = time.monotonic() + 5
        while (torn < 3 or writer.rounds < 3) and time.monotonic() < deadline:
            nets, errors = careful_load(netavark_dir.conf_dir)
            torn += len(errors)
            # Never the other network under this name, whatever was read.
            for name, net in nets.items():
                assert net == files[f"{name}.json"]
    assert torn >= 3
    assert writer.rounds >= 3
    assert netavark_dir.broken_files() == {}


def test_watcher_flags_an_in_place_network_writer_not_an_atomic_one(
    netavark_dir: NetavarkDir,
) -> None:
    in_place, atomic = netavark_dir.network(), netavark_dir.network()
    with netavark_dir.watcher() as watcher:
        with open(netavark_dir.path(netavark_dir.filename(in_place)), "w") as f:
            json.dump(in_place, f)
        netavark_dir.write(atomic)
        (netavark_dir.conf_dir / "netavark.lock").touch()  # podman's lock file: not a network
    assert watcher.files() == {netavark_dir.filename(in_place)}, watcher.report()
    assert {t.event for t in watcher.torn} >= {"IN_CREATE", "IN_MODIFY"}


def test_fault_files_are_not_flagged_by_the_watcher(
    netavark_dir: NetavarkDir, netavark_torn_write_watcher: Any, netavark_racing_writer: Any
) -> None:
    net = netavark_dir.network()
    writer = netavark_racing_writer({netavark_dir.filename(net): net})
    while writer.rounds < 2:
        time.sleep(0.01)
    writer.lift()
    netavark_torn_write_watcher.stop()
    assert netavark_torn_write_watcher.torn == []
    assert netavark_torn_write_watcher.events > 0


# --- the capability check ----------------------------------------------------

CAPS_CONFTEST = """
import pytest
from pytest_runtimefaults.cni import netavark

@pytest.fixture(autouse=True)
def _no_netavark(monkeypatch):
    monkeypatch.setattr(netavark, "find_netavark", lambda: None)
"""
CAPS_TEST = """
def test_needs_netavark(podman_netavark):
    pass
"""


@root_only
def test_podman_netavark_skips_naming_the_package_and_fails_under_strict(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(CAPS_CONFTEST)
    pytester.makepyfile(test_caps=CAPS_TEST)
    result = pytester.runpytest_subprocess("-p", "runtimefaults", "-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*netavark not found*apt-get install netavark*"])
    strict = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "--runtimefaults-strict", "-p", "no:cacheprovider"
    )
    strict.assert_outcomes(errors=1)
    strict.stdout.fnmatch_lines(["*strict mode: netavark not found*apt-get install netavark*"])


# --- the real podman + netavark ----------------------------------------------


@root_only
def test_podman_netavark_stays_in_its_namespace(
    netavark_dir: NetavarkDir, podman_netavark: NetavarkPodman
) -> None:
    net = netavark_dir.network()
    netavark_dir.write(net)
    host_before = host_network_state()
    # Nothing yet, so the check below sees netavark's own rules: iptables chains
    # NETAVARK_* (netavark 1.4) or nftables' `table inet netavark` (1.14).
    assert "netavark" not in podman_netavark.firewall().lower()
    bridge = f"{net['network_interface']}:bridge"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(podman_netavark.run, net["name"], "sleep", "3")
        # While the container runs: its bridge and veth are in the harness's
        # namespace, netavark's chains in its firewall, and the host unchanged.
        deadline = time.monotonic() + 20
        while bridge not in podman_netavark.links() and time.monotonic() < deadline:
            time.sleep(0.05)
        links = podman_netavark.links()
        assert bridge in links
        assert any(link.endswith(":veth") for link in links), links
        assert "netavark" in podman_netavark.firewall().lower()
        assert host_network_state() == host_before
        assert running.result().returncode == 0, running.result().stderr
    result = podman_netavark.run(net["name"], "ip", "-4", "addr", "show", "eth0")
    assert result.returncode == 0, result.stderr
    (address,) = ipv4(result.stdout)
    assert in_subnet(address, net)
    assert podman_netavark.ipam_db.exists()
    assert podman_netavark.leaked_links() == set()
    assert host_network_state() == host_before


@root_only
@pytest.mark.parametrize(
    ("mode", "warning"),
    [("truncate", "unexpected EOF"), ("empty", "EOF")],
)
def test_podman_netavark_names_a_broken_file_and_refuses_only_that_network(
    netavark_dir: NetavarkDir,
    podman_netavark: NetavarkPodman,
    netavark_half_written: Any,
    runtimefaults_faults: FaultRegistry,
    mode: str,
    warning: str,
) -> None:
    good, bad = netavark_dir.network(), netavark_dir.network()
    netavark_dir.write(good)
    fault: HalfWritten = netavark_half_written(netavark_dir.filename(bad), bad, mode=mode)
    expected = f'Error reading network config file \\"{fault.path}\\": {warning}"'
    result = podman_netavark.run(good["name"], "true")
    assert result.returncode == 0, result.stderr
    assert expected in result.stderr
    result = podman_netavark.run(bad["name"], "true")
    assert outcome(result) == f"rc 125: {NOT_FOUND}", result.stderr
    assert expected in result.stderr
    runtimefaults_faults.lift_all()
    result = podman_netavark.run(bad["name"], "true")
    assert result.returncode == 0, result.stderr
    assert podman_netavark.leaked_links() == set()


@root_only
def test_podman_netavark_loads_a_nul_padded_file(
    netavark_dir: NetavarkDir, podman_netavark: NetavarkPodman, netavark_half_written: Any
) -> None:
    # A finding: podman decodes the first JSON value and ignores the rest,
    # so a file extended with NULs before its data is flushed loads silently.
    net = netavark_dir.network()
    netavark_half_written(netavark_dir.filename(net), net, mode="nul")
    result = podman_netavark.run(net["name"], "ip", "-4", "addr", "show", "eth0")
    assert result.returncode == 0, result.stderr
    assert "Error reading network config file" not in result.stderr
    assert in_subnet(ipv4(result.stdout)[0], net)


@root_only
@pytest.mark.parametrize(
    ("case", "mutate", "filename", "message"),
    [
        (
            "gateway outside the subnet",
            lambda n: n["subnets"][0].update(gateway="192.0.2.1"),
            None,
            "could not be parsed, skipping: gateway 192.0.2.1 not in subnet",
        ),
        (
            "invalid id",
            lambda n: n.update(id="xyz"),
            None,
            'could not be parsed, skipping: invalid network ID \\"xyz\\"',
        ),
        (
            "name is not the file's",
            lambda n: None,
            "other.json",
            'does not match file name \\"other.json\\", skipping',
        ),
    ],
)
def test_podman_netavark_skips_an_invalid_network_naming_the_file(
    netavark_dir: NetavarkDir,
    podman_netavark: NetavarkPodman,
    case: str,
    mutate: Any,
    filename: str | None,
    message: str,
) -> None:
    net = netavark_dir.network()
    mutate(net)
    path = netavark_dir.write(net, filename)
    assert validate_network(path.read_bytes(), path.name) is not None
    result = podman_netavark.run(net["name"], "true")
    assert outcome(result) == f"rc 125: {NOT_FOUND}", result.stderr
    assert message in result.stderr
    assert path.name in result.stderr


@root_only
def test_podman_netavark_defers_an_unknown_driver_to_run(
    netavark_dir: NetavarkDir, podman_netavark: NetavarkPodman
) -> None:
    # A finding: podman loads the file; only netavark, at setup, refuses it
    # (the error does not name the file), as containerd defers a wrong cniVersion.
    net = netavark_dir.network()
    net["driver"] = "nope"
    path = netavark_dir.write(net)
    assert validate_network(path.read_bytes(), path.name) == "unknown driver 'nope'"
    listed = podman_netavark.podman("network", "ls", "--format", "{{.Name}}")
    assert net["name"] in listed.stdout.split()
    result = podman_netavark.run(net["name"], "true")
    assert result.returncode == 126, result.stderr
    # netavark 1.14 quotes the name: unknown network driver "nope"
    assert re.search(r'netavark: unknown network driver "?nope"?', result.stderr), result.stderr
    assert str(path) not in result.stderr
    assert podman_netavark.leaked_links() == set()


@root_only
def test_podman_netavark_held_half_written_until_released(
    netavark_dir: NetavarkDir, podman_netavark: NetavarkPodman, netavark_held_half_written: Any
) -> None:
    net = netavark_dir.network()
    held = netavark_held_half_written(netavark_dir.filename(net), net, at=0.5)
    result = podman_netavark.run(net["name"], "true")
    assert outcome(result) == f"rc 125: {NOT_FOUND}", result.stderr
    assert f'Error reading network config file \\"{held.path}\\": unexpected EOF' in result.stderr
    held.release()
    result = podman_netavark.run(net["name"], "true")
    assert result.returncode == 0, result.stderr


@root_only
def test_podman_netavark_delete_and_recreate_fails_cleanly(
    netavark_dir: NetavarkDir,
    podman_netavark: NetavarkPodman,
    netavark_delete_recreate: Any,
    runtimefaults_faults: FaultRegistry,
    record_property: Any,
) -> None:
    net = netavark_dir.network()
    flap = netavark_delete_recreate(netavark_dir.filename(net), net, gap=0.02, period=(0.005, 0.02))
    outcomes = Counter(outcome(podman_netavark.run(net["name"], "true")) for _ in range(8))
    record_property("outcomes", dict(outcomes))
    assert flap.count > 0
    # Recovered means: a clear error or success, never another failure.
    assert set(outcomes) <= {"ok", f"rc 125: {NOT_FOUND}", f"rc 127: {NOT_FOUND}"}, outcomes
    runtimefaults_faults.lift_all()
    assert podman_netavark.run(net["name"], "true").returncode == 0
    assert podman_netavark.leaked_links() == set()


@root_only
def test_podman_netavark_macvlan_never_comes_up_as_bridge_under_the_racing_writer(
    netavark_dir: NetavarkDir,
    podman_netavark: NetavarkPodman,
    netavark_racing_writer: Any,
    runtimefaults_faults: FaultRegistry,
    record_property: Any,
) -> None:
    mac = netavark_dir.macvlan(podman_netavark.master_link())
    bridge = netavark_dir.network()
    writer = netavark_racing_writer(
        {netavark_dir.filename(mac): mac, netavark_dir.filename(bridge): bridge}
    )
    seen: Counter[str] = Counter()
    for _ in range(8):
        result = podman_netavark.run(mac["name"], "ip", "-4", "addr", "show", "eth0")
        if result.returncode == 0:
            (address,) = ipv4(result.stdout)
            seen["macvlan subnet" if in_subnet(address, mac) else address] += 1
        else:
            seen[outcome(result)] += 1
    record_property("outcomes", dict(seen))
    assert writer.rounds > 0
    assert set(seen) <= {"macvlan subnet", f"rc 125: {NOT_FOUND}", f"rc 127: {NOT_FOUND}"}, seen
    runtimefaults_faults.lift_all()
    result = podman_netavark.run(mac["name"], "ip", "-4", "addr", "show", "eth0")
    assert result.returncode == 0, result.stderr
    assert in_subnet(ipv4(result.stdout)[0], mac)
    assert podman_netavark.leaked_links() == set()


@root_only
def test_podman_netavark_ten_parallel_runs_get_distinct_addresses_then_free_them(
    netavark_dir: NetavarkDir, podman_netavark: NetavarkPodman
) -> None:
    # A /28: the gateway and 13 addresses.  podman's IPAM hands them out in
    # turn, so 13 more runs after the 10 succeed only if all 10 were freed.
    base = next_subnet().rsplit(".", 1)[0]
    net = netavark_dir.network(subnet=f"{base}.0/28")
    netavark_dir.write(net)
    with ThreadPoolExecutor(10) as pool:
        results = list(
            pool.map(
                lambda _: podman_netavark.run(net["name"], "ip", "-4", "addr", "show", "eth0"),
                range(10),
            )
        )
    assert [r.returncode for r in results] == [0] * 10, [r.stderr for r in results]
    addresses = [a for r in results for a in ipv4(r.stdout)]
    assert len(set(addresses)) == 10, addresses
    assert all(in_subnet(a, net) for a in addresses)
    for i in range(13):
        result = podman_netavark.run(net["name"], "true")
        assert result.returncode == 0, (i, result.stderr)
    assert podman_netavark.leaked_links() == set()


@root_only
def test_podman_netavark_network_create_writes_its_file_in_place(
    netavark_dir: NetavarkDir,
    podman_netavark: NetavarkPodman,
    netavark_torn_write_watcher: Any,
) -> None:
    # A real finding, not a wish: podman 4.3.1's netavark backend creates
    # NAME.json at its final name (IN_CREATE, then IN_MODIFY) instead of
    # renaming a whole temp file into place; podman serialises itself with
    # netavark.lock, but any other reader of the directory can see the file
    # empty or partial.  If a newer podman writes atomically this test fails:
    # update docs/cni.md.
    names = [f"rfnvw{next_subnet().split('.')[2]}x{i}" for i in range(3)]
    for name in names:
        result = podman_netavark.podman(
            "network", "create", "--disable-dns", "--subnet", next_subnet(), name
        )
        assert result.returncode == 0, result.stderr
    netavark_torn_write_watcher.stop()
    assert netavark_torn_write_watcher.files() == {f"{n}.json" for n in names}, (
        netavark_torn_write_watcher.report()
    )
    assert {t.event for t in netavark_torn_write_watcher.torn} >= {"IN_CREATE"}
    assert netavark_dir.broken_files() == {}
    for name in names:
        assert podman_netavark.podman("network", "rm", name).returncode == 0
    assert not any(p.suffix == ".json" for p in netavark_dir.conf_dir.iterdir())


KILLED_TEST = """
import pathlib, threading, time

def test_hangs(netavark_dir, podman_netavark):
    net = netavark_dir.network()
    netavark_dir.write(net)
    threading.Thread(
        target=podman_netavark.run, args=(net["name"], "sleep", "120"), daemon=True
    ).start()
    bridge = net["network_interface"] + ":bridge"
    while bridge not in podman_netavark.links():
        time.sleep(0.05)
    pathlib.Path({marker!r}).write_text(
        "\\n".join([netavark_dir.root.as_posix(), podman_netavark.directory.as_posix(),
                   podman_netavark.netns.name, podman_netavark.cgroup_parent])
    )
    time.sleep(120)
"""


@root_only
def test_a_sigkilled_run_with_a_running_container_is_reaped(pytester: pytest.Pytester) -> None:
    """pytest SIGKILLed while a netavark container runs: the journal's reaper
    ends podman, conmon and the container, removes the harness's namespace
    (its bridge, veth and firewall rules with it) and both directories."""
    import signal
    import subprocess
    import sys

    from pytest_runtimefaults.journal import reap_dead_owners

    marker = pytester.path / "ready"
    pytester.makepyfile(test_killed=KILLED_TEST.format(marker=str(marker)))
    state = pytester.path / "state"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "runtimefaults",
            "-p",
            "no:cacheprovider",
            f"--runtimefaults-state-dir={state}",
            "-q",
            str(pytester.path),
        ],
        cwd=pytester.path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert marker.exists(), "the inner test never got its container up"
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)  # pytest only: podman and conmon are left as orphans
        proc.wait(10)
    nv_root, podman_dir, netns_name, cgroup = marker.read_text().split("\n")
    result = reap_dead_owners(state)
    assert result.errors == []
    kinds = {r["kind"] for r in result.reaped}
    assert {"netns", "path", "containerd", "cgroup-tree"} <= kinds, result.reaped
    for path in (nv_root, podman_dir):
        assert not os.path.exists(path), path
    assert not os.path.exists(f"/var/run/netns/{netns_name}")
    assert not list(Path("/sys/fs/cgroup").glob(f"*/{cgroup.strip('/')}"))
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert podman_dir.encode() not in cmdline, f"process {pid} left: {cmdline[:200]!r}"
