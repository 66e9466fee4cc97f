"""The cni fixtures through the plugin (pytester): faults lifted by ``recovers``,
the ``cni-configs`` probe, and leak checks that catch what a runtime left."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from pytest_runtimefaults import naming

pytestmark = pytest.mark.timeout(120)


def test_fixtures_are_listed_with_their_docstrings(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("-p", "runtimefaults", "--fixtures")
    text = result.stdout.str()
    for name in (
        "cni_dir",
        "cni_sandbox",
        "cni_half_written",
        "cni_held_half_written",
        "cni_delete_recreate",
        "cni_racing_writer",
        "cni_parallel_adds",
        "cni_torn_write_watcher",
        "cni_podman",
        "cni_containerd",
    ):
        assert re.search(rf"^{name}\b.*\n\s+\S", text, re.M), name  # listed, with a docstring
    assert (
        "--runtimefaults-cni-plugin-dir"
        in pytester.runpytest_subprocess("-p", "runtimefaults", "--help").stdout.str()
    )


def test_recovers_lifts_cni_faults_and_catches_leaks(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.recovers(within=5, probe="cni-configs")
        def test_whole_after_lift(cni_dir, cni_half_written, cni_held_half_written):
            cni_half_written("10-a.conflist", cni_dir.bridge(), mode="nul")
            cni_held_half_written("20-b.conflist", cni_dir.bridge())
            assert set(cni_dir.broken_files()) == {"10-a.conflist", "20-b.conflist"}

        @pytest.mark.recovers(within=5, probe="cni-configs")
        def test_runtime_that_never_deletes(cni_dir, cni_sandbox):
            conf = cni_dir.bridge()
            cni_dir.write(conf)
            ns = cni_sandbox.container()
            cni_sandbox.add(conf, ns, container_id="leaky")   # and no DEL

        @pytest.mark.recovers(within=5, probe="cni-configs")
        def test_runtime_that_deletes(cni_dir, cni_sandbox):
            conf = cni_dir.bridge()
            ns = cni_sandbox.container()
            cni_sandbox.add(conf, ns, container_id="tidy")
            cni_sandbox.delete(conf, ns, container_id="tidy")
            cni_sandbox.remove_container(ns)

        def test_broken_probe_without_lift(cni_dir, runtimefaults_faults):
            (cni_dir.conf_dir / "10-x.conflist").write_text('{"name": "x", "pl')
            with pytest.raises(AssertionError, match="10-x.conflist"):
                runtimefaults_faults.probes["cni-configs"]()
        """
    )
    result = pytester.runpytest_subprocess("-p", "runtimefaults", "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=1)
    out = result.stdout.str()
    failed = out[out.index("test_runtime_that_never_deletes") :]
    for kind in ("netns:cni", "links:cni", "ipam:cni"):
        assert kind in failed, out
    assert "leaky" in failed  # the IPAM reservation names the container


def test_option_sets_the_plugin_dir(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_dir(cni_dir):
            assert str(cni_dir.plugin_dir) == "/usr/lib/cni"
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "--runtimefaults-cni-plugin-dir=/usr/lib/cni"
    )
    result.assert_outcomes(passed=1)
    missing = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "--runtimefaults-cni-plugin-dir=/nonexistent/cni", "-rs"
    )
    missing.assert_outcomes(skipped=1)
    assert "no CNI plugins" in missing.stdout.str()


def test_a_fault_factory_stops_every_fault_and_raises_the_first_error(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        WHOLE = b'{"name": "a", "type": "bridge"}\\n'

        def test_writers(cni_dir, cni_racing_writer, cni_delete_recreate, runtimefaults_faults):
            # Made first, stopped last: still mid-file when stopped (5 chunks, 0.4 s apart).
            stuck = cni_racing_writer({"10-a.conflist": WHOLE}, chunk=(8, 8), pause=(0.4, 0.4))
            stuck.join_timeout = 0.1
            cni_racing_writer({"20-b.conflist": cni_dir.bridge()})
            cni_delete_recreate("30-c.conflist", cni_dir.bridge())
            assert len(runtimefaults_faults.records) == 3

        def test_newest_stopped_first(cni_dir, cni_racing_writer):
            first = cni_racing_writer({"10-a.conflist": WHOLE}, chunk=(8, 8), pause=(0.4, 0.4))
            first.join_timeout = 0.1
            second = cni_racing_writer({"20-b.conflist": WHOLE}, chunk=(8, 8), pause=(0.4, 0.4))
            second.join_timeout = 0.1
        """
    )
    result = pytester.runpytest_subprocess("-p", "runtimefaults", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=2)
    out = result.stdout.str()
    sections = dict(
        re.findall(r"_ ERROR at teardown of (\w+) _+\n(.*?)(?=\n_{5,} |\n={5,})", out, re.S)
    )
    raised = {
        test: re.findall(
            r"^E\s+\S*FaultThreadError: racing writer on (\S+): its thread is still", text, re.M
        )
        for test, text in sections.items()
    }
    # One teardown error per test, the first raised: in the first test the stuck
    # writer's (the other two faults stopped cleanly), in the second the newest's ...
    assert {test: set(names) for test, names in raised.items()} == {
        "test_writers": {"10-a.conflist"},
        "test_newest_stopped_first": {"20-b.conflist"},
    }, out
    # ... and the older writer was stopped as well, its error noted, not raised.
    assert (
        "also failed while stopping: FaultThreadError('racing writer on 10-a.conflist"
        in sections["test_newest_stopped_first"]
    )


def _rf_namespaces() -> set[str]:
    try:
        names = set(os.listdir("/var/run/netns"))
    except FileNotFoundError:
        return set()
    return {n for n in names if n.startswith(("rfh", "rfc", "cni-"))}


def _left_behind(before: set[str]) -> set[str]:
    """Namespaces new since *before* that stay: not those of a live neighbour.

    Another xdist worker (or pytest run) may be creating namespaces right now.
    Ours are named ``rfh``/``rfc`` + the owner's 5-character process tag, so one
    whose owner is alive is not the finished inner run's; a ``cni-`` namespace
    has no owner in its name, so a neighbour's must go away by itself.
    """
    deadline = time.monotonic() + 15
    while True:
        left = {
            n
            for n in _rf_namespaces() - before
            if n.startswith("cni-") or not os.path.exists(f"/proc/{naming.tag_pid(n[3:8])}")
        }
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


#: The podman test of the run below, on the backend this podman has (podman 5
#: has no CNI): a fault on its network dir, a run, then a failure.
PODMAN_ERROR_TEST = {
    "cni": """
        def test_error_in_podman(cni_dir, cni_podman, cni_delete_recreate):
            conf = cni_dir.bridge()
            cni_delete_recreate(cni_dir.filename(conf), conf)
            cni_podman.run(conf["name"], "true")
            assert False, "podman test failed"
        """,
    "netavark": """
        def test_error_in_podman(netavark_dir, podman_netavark, netavark_delete_recreate):
            net = netavark_dir.network()
            netavark_delete_recreate(netavark_dir.filename(net), net)
            podman_netavark.run(net["name"], "true")
            assert False, "podman test failed"
        """,
}


@pytest.mark.parametrize("backend", ["cni", "netavark"])
def test_nothing_left_after_failures_errors_and_timeouts(
    pytester: pytest.Pytester, backend: str
) -> None:
    from pytest_runtimefaults.cni.podman import podman_major

    major = podman_major()
    if backend == "cni" and major is not None and major >= 5:
        pytest.skip(f"podman {major} has no CNI backend (only netavark)")
    pytester.makepyfile(
        """
        import time
        import pytest

        def test_fails_mid_add(cni_dir, cni_sandbox, cni_racing_writer, cni_held_half_written):
            conf = cni_dir.bridge()
            cni_racing_writer({"10-a.conflist": conf})
            cni_held_half_written("20-b.conflist", cni_dir.bridge())
            ns = cni_sandbox.container()
            cni_sandbox.add(conf, ns, container_id="x")
            raise RuntimeError("the runtime crashed here")
        """
        + PODMAN_ERROR_TEST[backend]
        + """

        @pytest.mark.timeout(1, method="signal")
        def test_times_out(cni_dir, cni_parallel_adds):
            ops = cni_parallel_adds(cni_dir.bridge(), n=5)
            ops.add_all()
            time.sleep(5)
        """
    )
    state = pytester.path / "state"
    before = _rf_namespaces()
    result = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "-p", "no:cacheprovider", f"--runtimefaults-state-dir={state}"
    )
    result.assert_outcomes(failed=3)
    assert _left_behind(before) == set()
    # Every namespace, directory and process journaled was released: the
    # journal files are deleted when their last resource is.
    leftovers = {p.name: p.read_text() for p in state.glob("*.jsonl")} if state.exists() else {}
    assert leftovers == {}


@pytest.mark.needs("container-cgroups")
def test_a_sigkilled_run_is_reaped_by_the_journal(pytester: pytest.Pytester) -> None:
    """pytest SIGKILLed mid-test, with namespaces, podman's dir and a containerd
    with a pod up: the journal's reaper removes all of it."""
    import signal
    import subprocess
    import sys
    import time

    from pytest_runtimefaults.cni.podman import podman_major
    from pytest_runtimefaults.journal import reap_dead_owners

    # podman's private dir on the backend it has (podman 5: netavark only)
    major = podman_major()
    podman = "podman_netavark" if major is not None and major >= 5 else "cni_podman"
    marker = pytester.path / "ready"
    pytester.makepyfile(
        f"""
        import pathlib, time
        from pytest_runtimefaults.cni import wait_cri_network

        def test_hangs(cni_dir, cni_sandbox, {podman}, cni_containerd, cni_cri_pods):
            conf = cni_dir.bridge()
            cni_dir.write(conf)
            ns = cni_sandbox.container()
            cni_sandbox.add(conf, ns, container_id="killed")
            assert wait_cri_network(cni_containerd.address, lambda s: s.ready).ready
            pod = cni_cri_pods.run()
            pathlib.Path({str(marker)!r}).write_text(
                "\\n".join([cni_dir.root.as_posix(), {podman}.directory.as_posix(),
                           cni_containerd.directory.as_posix(), str(cni_containerd.pid),
                           cni_sandbox.host.name, ns.name, pod.id, cni_cri_pods.cgroup_parent])
            )
            time.sleep(120)
        """
    )
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
        assert marker.exists(), "the inner test never got its resources up"
        time.sleep(0.2)  # the marker is written in one go, but be sure it is complete
    finally:
        proc.send_signal(signal.SIGKILL)  # pytest only: its children are left as orphans
        proc.wait(10)
    fields = marker.read_text().split("\n")
    cni_root, podman_dir, ctd_dir, ctd_pid, host_ns, container_ns, pod_id, cgroup = fields
    result = reap_dead_owners(state)
    assert result.errors == []
    kinds = {r["kind"] for r in result.reaped}
    assert {"netns", "path", "containerd", "cgroup-tree"} <= kinds, result.reaped
    # The pod's pause process outlives its shim; it is found by its cgroup.
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                assert pod_id not in f.read(), f"pod process {pid} left running"
        except OSError:
            continue
    # below each v1 hierarchy, or at the root of a pure cgroup2 host's
    assert not [p for p in Path("/sys/fs/cgroup").glob(f"*/{cgroup.strip('/')}")]
    assert not Path("/sys/fs/cgroup", cgroup.strip("/")).is_dir()
    for path in (cni_root, podman_dir, ctd_dir):
        assert not os.path.exists(path), path
    for name in (host_ns, container_ns):
        assert not os.path.exists(f"/var/run/netns/{name}"), name
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{ctd_pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{ctd_pid}")  # containerd died with its parent
    assert not os.path.exists("/var/lib/cni") or "killed" not in str(list(os.walk("/var/lib/cni")))
