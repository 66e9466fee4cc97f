"""CNI configuration faults against the real plugins, each shown to catch a bug class.

Every fault has a susceptible test-only runtime that the fault catches and a
correct one that passes.  The runtimes are small on purpose: each reproduces
one documented behaviour (fatal on any bad file, first-valid default network,
list-then-open, in-place config writes) and drives the *real* bridge/macvlan
plugins in a private namespace.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_runtimefaults.cni import (
    CniDir,
    TornWriteWatcher,
    broken_bytes,
    next_subnet,
    validate_config,
    write_atomic,
)
from pytest_runtimefaults.faults import FaultRegistry
from pytest_runtimefaults.netns import (
    CniError,
    CniResult,
    CniSandbox,
    NetNS,
    link_kind,
    own_namespaces,
    snapshot_ipam,
    snapshot_links,
)

ROOT = os.geteuid() == 0 and Path("/usr/lib/cni/bridge").exists()
needs_root = pytest.mark.needs("root", "cni-plugins")


@pytest.fixture(autouse=True)
def host_unchanged() -> Iterator[None]:
    """Whatever the outcome, no namespace or root-namespace link is left behind."""
    if not ROOT:
        yield
        return
    before = (own_namespaces(), snapshot_links(None))
    yield
    deadline = time.monotonic() + 3
    while (own_namespaces(), snapshot_links(None)) != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (own_namespaces(), snapshot_links(None)) == before


def assert_no_leaks(registry: FaultRegistry, settle: float = 3.0) -> None:
    """No leak check finds anything left, allowing *settle* seconds: another
    xdist worker's podman may own a ``cni-*`` namespace for a moment."""
    deadline = time.monotonic() + settle
    while True:
        leaks = {name: check.leaked() for name, check in registry.leak_checks.items()}
        if not any(leaks.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not any(leaks.values()), leaks


# --- pure parts --------------------------------------------------------------


def test_broken_bytes_modes() -> None:
    conf = {"cniVersion": "1.0.0", "name": "n", "type": "bridge"}
    whole = json.dumps(conf, indent=2).encode() + b"\n"
    assert broken_bytes(conf, "truncate", 0.5) == whole[: len(whole) // 2]
    assert broken_bytes(conf, "truncate", 7) == whole[:7]
    assert broken_bytes(conf, "empty") == b""
    assert broken_bytes(conf, "nul").endswith(b"\0" * 64)
    assert json.loads(broken_bytes(conf, "wrong-version"))["cniVersion"] == "9.9.9"
    with pytest.raises(ValueError, match="truncate"):
        broken_bytes(conf, "sideways")


def test_validate_config() -> None:
    assert validate_config(b'{"name": "n", "type": "bridge"}') is None
    assert validate_config(b'{"name": "n", "plugins": [{"type": "bridge"}]}') is None
    assert validate_config(b"") == "empty file"
    assert "invalid JSON" in str(validate_config(b'{"name": "n", "ty'))
    assert validate_config(b'{"name": "n", "plugins": []}') == "no plugins"
    assert validate_config(b'{"type": "bridge"}') == "no network name"


def test_subnets_unique_and_private() -> None:
    subnets = [next_subnet() for _ in range(50)]
    assert len(set(subnets)) == 50
    assert all(s.startswith("10.") and s.endswith(".0/24") for s in subnets)


def test_write_atomic_never_shows_a_partial_file(tmp_path: Path) -> None:
    with TornWriteWatcher(tmp_path) as watcher:
        for i in range(20):
            write_atomic(tmp_path / "10-x.conflist", {"name": f"n{i}", "type": "bridge"})
    assert watcher.torn == [], watcher.report()
    assert watcher.events > 0
    assert [p.name for p in tmp_path.iterdir()] == ["10-x.conflist"]


# --- test-only runtimes --------------------------------------------------------


class FileRuntime:
    """Brings up every ``.conf`` network in a conf dir for one container.

    It hands each file's bytes to the bridge plugin as they are (it only runs
    bridge networks), like a runtime that leaves parsing to the plugin.
    ``fatal=True``: any failing file aborts the whole setup (the bug);
    ``fatal=False``: the failing file is reported by name and the others
    come up.
    """

    def __init__(self, cni: CniDir, sandbox: CniSandbox, *, fatal: bool) -> None:
        self.cni = cni
        self.sandbox = sandbox
        self.fatal = fatal
        self.errors: dict[str, str] = {}

    def up(self, ns: NetNS, cid: str) -> dict[str, CniResult]:
        results: dict[str, CniResult] = {}
        self.errors = {}
        for i, path in enumerate(self.cni.files()):
            try:
                results[path.name] = self.sandbox.invoke(
                    "ADD",
                    path.read_bytes(),
                    ns,
                    plugin="bridge",
                    ifname=f"eth{i}",
                    container_id=cid,
                )
            except CniError as exc:
                if self.fatal:
                    self.down(ns, cid)
                    raise RuntimeError(f"network setup failed: {exc.msg}") from exc
                self.errors[str(path)] = f"{path}: {exc.msg}"
        return results

    def down(self, ns: NetNS, cid: str) -> None:
        for i, path in enumerate(self.cni.files()):
            data = path.read_bytes()
            if validate_config(data) is None:
                self.sandbox.invoke(
                    "DEL", data, ns, plugin="bridge", ifname=f"eth{i}", container_id=cid
                )


def problems_with_per_file_recovery(
    runtime: FileRuntime, ns: NetNS, broken: Path, good: set[str]
) -> list[str]:
    """What a runtime did wrong facing one broken file among good ones."""
    try:
        results = runtime.up(ns, "c1")
    except Exception as exc:
        return [f"setup aborted for every network: {exc}"]
    problems = []
    if set(results) != good:
        problems.append(f"networks up: {sorted(results)}, expected {sorted(good)}")
    if not any(
        str(broken) in e and "unexpected end of JSON input" in e for e in runtime.errors.values()
    ):
        problems.append(f"no error naming {broken}: {runtime.errors}")
    runtime.down(ns, "c1")
    return problems


@needs_root
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("mode", "code", "message"),
    [
        ("truncate", 6, "unexpected end of JSON input"),
        ("empty", 6, "unexpected end of JSON input"),
        ("nul", 6, "invalid character '\\x00' after top-level value"),
        ("wrong-version", 1, 'incompatible CNI versions: config is "9.9.9"'),
    ],
)
def test_bridge_plugin_own_error_for_each_broken_mode(
    cni_dir: CniDir,
    cni_sandbox: CniSandbox,
    cni_half_written: Any,
    runtimefaults_faults: FaultRegistry,
    mode: str,
    code: int,
    message: str,
) -> None:
    conf = cni_dir.single(cni_dir.bridge())
    fault = cni_half_written("10-broken.conf", conf, mode=mode)
    ns = cni_sandbox.container()
    with pytest.raises(CniError) as info:
        cni_sandbox.invoke("ADD", fault.path.read_bytes(), ns, plugin="bridge")
    assert (info.value.code, message in str(info.value)) == (code, True), info.value
    runtimefaults_faults.lift_all()  # the file is whole again: ADD works, DEL frees
    cni_sandbox.invoke("ADD", fault.path.read_bytes(), ns, plugin="bridge")
    cni_sandbox.invoke("DEL", fault.path.read_bytes(), ns, plugin="bridge")
    cni_sandbox.remove_container(ns)
    assert_no_leaks(runtimefaults_faults)


@needs_root
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("fatal", "caught"), [(True, True), (False, False)], ids=["fatal", "per-file"]
)
def test_truncated_config_catches_a_runtime_that_gives_up_on_every_network(
    cni_dir: CniDir,
    cni_sandbox: CniSandbox,
    cni_half_written: Any,
    runtimefaults_faults: FaultRegistry,
    fatal: bool,
    caught: bool,
) -> None:
    good = set()
    for prio in (20, 30):
        conf = cni_dir.single(cni_dir.bridge())
        good.add(cni_dir.write(conf, priority=prio).name)
    fault = cni_half_written("10-broken.conf", cni_dir.single(cni_dir.bridge()), mode="truncate")
    runtime = FileRuntime(cni_dir, cni_sandbox, fatal=fatal)
    ns = cni_sandbox.container()
    problems = problems_with_per_file_recovery(runtime, ns, fault.path, good)
    assert bool(problems) == caught, problems
    cni_sandbox.remove_container(ns)
    assert_no_leaks(runtimefaults_faults)


@needs_root
@pytest.mark.timeout(60)
def test_held_half_written_file_is_an_error_until_released(
    cni_dir: CniDir,
    cni_sandbox: CniSandbox,
    cni_held_half_written: Any,
    runtimefaults_faults: FaultRegistry,
) -> None:
    held = cni_held_half_written("10-held.conf", cni_dir.single(cni_dir.bridge()), at=0.4)
    runtime = FileRuntime(cni_dir, cni_sandbox, fatal=False)
    ns = cni_sandbox.container()
    assert runtime.up(ns, "c1") == {}
    assert str(held.path) in runtime.errors
    assert "unexpected end of JSON input" in runtime.errors[str(held.path)]
    assert not held.completed.is_set()
    held.release()
    assert held.completed.is_set()
    assert set(runtime.up(ns, "c1")) == {"10-held.conf"}
    assert runtime.errors == {}
    runtime.down(ns, "c1")
    cni_sandbox.remove_container(ns)
    assert_no_leaks(runtimefaults_faults)


def load_with_retry(path: Path, *, retry_for: float) -> bytes:
    """Read a config, re-reading while it does not parse (the careful reader)."""
    deadline = time.monotonic() + retry_for
    while True:
        data = path.read_bytes()
        if validate_config(data) is None or time.monotonic() > deadline:
            return data
        time.sleep(0.01)


@needs_root
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("retry_for", "caught"), [(0.0, True), (5.0, False)], ids=["once", "retry"]
)
def test_held_for_a_time_catches_a_reader_that_never_rereads(
    cni_dir: CniDir,
    cni_sandbox: CniSandbox,
    cni_held_half_written: Any,
    retry_for: float,
    caught: bool,
) -> None:
    ns = cni_sandbox.container()  # before the hold starts: it must not eat into it
    held = cni_held_half_written("10-held.conf", cni_dir.single(cni_dir.bridge()), hold=2.0)
    data = load_with_retry(held.path, retry_for=retry_for)
    error = ""
    try:
        cni_sandbox.invoke("ADD", data, ns, plugin="bridge")
        cni_sandbox.invoke("DEL", data, ns, plugin="bridge")
    except CniError as exc:
        error = exc.msg
    assert ("unexpected end of JSON input" in error) == caught, error


def list_then_open(cni: CniDir, *, tolerate_vanished: bool) -> list[str]:
    """A runtime's directory walk: list, do some work, then open each file."""
    paths = cni.files()
    time.sleep(0.004)  # the work between the walk and the reads
    names = []
    for path in paths:
        try:
            names.append(json.loads(path.read_bytes())["name"])
        except FileNotFoundError:
            if not tolerate_vanished:
                raise
    return names


@needs_root
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("tolerant", "caught"), [(False, True), (True, False)], ids=["naive", "tolerant"]
)
def test_delete_and_recreate_catches_list_then_open(
    cni_dir: CniDir, cni_delete_recreate: Any, tolerant: bool, caught: bool
) -> None:
    stable = cni_dir.bridge()
    cni_dir.write(stable, priority=20)
    flapping = cni_delete_recreate("10-flap.conflist", cni_dir.bridge(), gap=0.004)
    errors: list[BaseException] = []
    deadline = time.monotonic() + 10.0
    attempts = 0
    while time.monotonic() < deadline and not errors and attempts < 1000:
        attempts += 1
        try:
            assert stable["name"] in list_then_open(cni_dir, tolerate_vanished=tolerant)
        except FileNotFoundError as exc:
            errors.append(exc)
    assert bool(errors) == caught, (attempts, flapping.count, errors)
    assert flapping.count > 0


class DefaultNetworkRuntime:
    """Brings up one network for a container, as CRI does with its conf dir.

    ``first_valid=True`` (the bug): the default network is the first file
    that parses, so while the wanted file is torn another network's file is
    used.  ``first_valid=False``: the network is looked up by name and a
    torn file is re-read, never substituted.
    """

    def __init__(self, cni: CniDir, sandbox: CniSandbox, *, first_valid: bool) -> None:
        self.cni = cni
        self.sandbox = sandbox
        self.first_valid = first_valid

    def pick(self, want: str) -> dict[str, Any]:
        deadline = time.monotonic() + 5
        while True:
            for path in self.cni.files():
                data = path.read_bytes()
                if validate_config(data) is not None:
                    continue
                conf: dict[str, Any] = json.loads(data)
                if self.first_valid or conf["name"] == want:
                    return conf
            if time.monotonic() > deadline:
                raise LookupError(f"network {want} not found in {self.cni.conf_dir}")
            time.sleep(0.001)

    def run(self, want: str, ns: NetNS, cid: str) -> str | None:
        conf = self.pick(want)
        self.sandbox.add(conf, ns, container_id=cid)
        kind = link_kind(ns.name, "eth0")
        self.sandbox.delete(conf, ns, container_id=cid)
        return kind


@needs_root
@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("first_valid", "caught"), [(True, True), (False, False)], ids=["first-valid", "by-name"]
)
def test_macvlan_stays_macvlan_under_the_racing_writer(
    cni_dir: CniDir,
    cni_sandbox: CniSandbox,
    cni_racing_writer: Any,
    runtimefaults_faults: FaultRegistry,
    first_valid: bool,
    caught: bool,
) -> None:
    master = cni_sandbox.master_link()
    mac = cni_dir.macvlan(master)
    bridge = cni_dir.bridge()
    writer = cni_racing_writer({"10-mac.conflist": mac, "20-bridge.conflist": bridge})
    runtime = DefaultNetworkRuntime(cni_dir, cni_sandbox, first_valid=first_valid)
    ns = cni_sandbox.container()
    kinds: list[str | None] = []
    deadline = time.monotonic() + 60  # 25 runs on a loaded machine, under the timeout
    while len(kinds) < 25 and time.monotonic() < deadline:
        kinds.append(runtime.run(mac["name"], ns, f"c{len(kinds)}"))
        if caught and kinds[-1] != "macvlan":
            break
    assert writer.rounds > 0
    wrong = [k for k in kinds if k != "macvlan"]
    assert bool(wrong) == caught, kinds
    if not caught:
        assert len(kinds) == 25
    runtimefaults_faults.lift_all()
    cni_sandbox.remove_container(ns)
    assert_no_leaks(runtimefaults_faults)


@needs_root
@pytest.mark.timeout(60)
def test_twenty_concurrent_adds_get_distinct_addresses_and_del_frees_them(
    cni_dir: CniDir,
    cni_parallel_adds: Any,
    runtimefaults_faults: FaultRegistry,
) -> None:
    conf = cni_dir.bridge()
    ops = cni_parallel_adds(conf, n=20)
    results = ops.add_all()
    assert [r for r in results if isinstance(r, BaseException)] == []
    addresses = ops.addresses()
    assert len(addresses) == 20
    assert len(set(addresses)) == 20, sorted(addresses)
    assert len(snapshot_ipam(cni_dir.ipam_dir)) == 20
    assert all(link_kind(ns.name, "eth0") == "veth" for ns in ops.namespaces)
    assert ops.delete_all() == [None] * 20
    assert snapshot_ipam(cni_dir.ipam_dir) == set()
    assert_no_leaks(runtimefaults_faults)


class ConfigWriter:
    """A runtime's ``network create``: in place (the bug) or temp + fsync + rename."""

    def __init__(self, cni: CniDir, *, atomic: bool) -> None:
        self.cni = cni
        self.atomic = atomic

    def create(self, conf: dict[str, Any]) -> Path:
        path = self.cni.path(self.cni.filename(conf))
        if self.atomic:
            return write_atomic(path, conf)
        with open(path, "w") as f:
            json.dump(conf, f)
        return path


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("atomic", "caught"), [(False, True), (True, False)], ids=["in-place", "atomic"]
)
def test_torn_write_watcher_flags_only_the_in_place_writer(
    cni_dir: CniDir,
    cni_torn_write_watcher: TornWriteWatcher,
    cni_half_written: Any,
    atomic: bool,
    caught: bool,
) -> None:
    # A fault's own broken file is not the runtime's doing: never flagged.
    cni_half_written("05-fault.conflist", cni_dir.bridge(), mode="truncate")
    writer = ConfigWriter(cni_dir, atomic=atomic)
    created = {writer.create(cni_dir.bridge()).name for _ in range(5)}
    cni_torn_write_watcher.stop()
    assert bool(cni_torn_write_watcher.torn) == caught, cni_torn_write_watcher.report()
    if caught:
        assert cni_torn_write_watcher.files() == created
        assert {t.how for t in cni_torn_write_watcher.torn} >= {"in-place"}
    assert "05-fault.conflist" not in cni_torn_write_watcher.files()
