"""Integration: the markers against a real runc in a real (sandboxed) systemd, under xdist.

The fault is one runc really fails on: its state directory (``--root``) is put
below a regular file, so ``runc create`` fails with ``not a directory``;
lifting it restores the directory.  The ``runtime`` fixture's own probe (a
create/delete lifecycle) judges recovery.  The inner suite runs with
``pytest -n 2``.
"""

from __future__ import annotations

import json

import pytest

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.needs("runc"),
]

INNER = """
import pytest

def _break(runtime, faults, tmp_path, restores):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    original = runtime.root
    runtime.root = str(blocker / "state")
    restore = (lambda: setattr(runtime, "root", original)) if restores else None
    faults.add("runtime state dir unusable", lift=restore)
    return runtime

@pytest.fixture
def broken_root(runtime, runtimefaults_faults, tmp_path):
    return _break(runtime, runtimefaults_faults, tmp_path, restores=True)

@pytest.fixture
def stuck_root(runtime, runtimefaults_faults, tmp_path):
    return _break(runtime, runtimefaults_faults, tmp_path, restores=False)

@pytest.mark.recovers(within=30)
def test_recovers(broken_root, oci_bundle):
    result = broken_root.lifecycle(oci_bundle)
    assert not result.ok, "the fault must really break runc"
    assert "not a directory" in result.stderr

@pytest.mark.recovers(within=1)
def test_stays_broken(stuck_root, oci_bundle):
    pass

@pytest.mark.failure_budget(runs=8, max_rate=0.0)
def test_lifecycle_budget(runtime, oci_bundle):
    runtime.lifecycle(oci_bundle).check()

@pytest.mark.failure_budget(runs=8, max_rate=0.1)
def test_flaky_budget(runtime, oci_bundle, runtimefaults_rng, tmp_path):
    original = runtime.root
    if runtimefaults_rng.random() < 0.5:
        (tmp_path / "f").write_text("")
        runtime.root = str(tmp_path / "f" / "state")
    try:
        runtime.lifecycle(oci_bundle).check()
    finally:
        runtime.root = original
"""


def test_markers_against_real_runc_under_xdist(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_runtime_inner=INNER)
    result = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "-n", "2", "--runtimefaults-seed=5",
        "--runtimefaults-report=report.json", "--runtimefaults-strict",
    )  # fmt: skip
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(
        [
            "recovers: the runtime did not recover within 1 s (waited *); last error: runtime: "
            "*not a directory* (faults lifted: runtime state dir unusable)",
        ]
    )
    report = json.loads((pytester.path / "report.json").read_text())
    tests = {t["nodeid"].split("::")[1]: t for t in report["tests"]}
    assert tests["test_recovers"]["recovery"]["ok"] is True
    assert 0 < tests["test_recovers"]["recovery"]["seconds"] < 30
    assert tests["test_recovers"]["faults"][0]["name"] == "runtime state dir unusable"
    assert tests["test_stays_broken"]["recovery"]["ok"] is False
    assert tests["test_lifecycle_budget"]["budget"]["failures"] == 0
    flaky = tests["test_flaky_budget"]["budget"]
    assert flaky["passed"] is False
    assert flaky["failures"] >= 2
    assert "not a directory" in flaky["first_failures"][0]
    # The runtime's own leak check ran and found nothing.
    assert tests["test_recovers"]["leaks"] == {}
