"""The run's report: header, terminal summary, JSON, JUnit properties, under pytest-xdist too."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from pytest_runtimefaults.recovery import BudgetResult, wilson_interval
from pytest_runtimefaults.report import TestFigures

pytestmark = pytest.mark.timeout(180)

SUITE = """
import os, pathlib, socket, tempfile
import pytest

@pytest.fixture
def listener(runtimefaults_faults):
    d = tempfile.mkdtemp(prefix="rfr", dir="/tmp")
    path = os.path.join(d, "s.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen(4)
    runtimefaults_faults.add_probe("runtime", lambda: socket.socket(socket.AF_UNIX).connect(path))
    yield path
    s.close()
    os.unlink(path)
    os.rmdir(d)

@pytest.mark.recovers(within=5)
def test_recovers(listener, runtimefaults_faults):
    fault = runtimefaults_faults.add("delay StartTransientUnit", lift=lambda: None)
    fault.applied = 3

@pytest.mark.failure_budget(runs=40, max_rate=0.1)
def test_budget():
    pass

def test_seed(runtimefaults_seed, runtimefaults_rng, record_property):
    record_property("seed", runtimefaults_seed)
    record_property("draw", runtimefaults_rng.random())

@pytest.mark.parametrize("i", range(4))
def test_plain(i):
    pass
"""


def _properties(xml_path: str) -> dict[str, dict[str, str]]:
    root = ET.parse(xml_path).getroot()
    out: dict[str, dict[str, str]] = {}
    for case in root.iter("testcase"):
        props = {p.get("name", ""): p.get("value", "") for p in case.iter("property")}
        out[case.get("name", "")] = props
    return out


@pytest.mark.needs("root")  # the report records root: uid 0
@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_json_and_junit_report(pytester: pytest.Pytester, xdist: list[str]) -> None:
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "--runtimefaults-report=out/report.json", "--junitxml=junit.xml",
        "--runtimefaults-seed=4242", *xdist,
    )  # fmt: skip
    result.assert_outcomes(passed=7)
    result.stdout.fnmatch_lines(
        [
            "*- runtimefaults -*",
            "faults injected: 1 (delay StartTransientUnit x1)",
            "recoveries: 1 of 1 ok; median * s",
            "  worst * s: test_suite.py::test_recovers",
            "failure budget ok: test_suite.py::test_budget: 0/40 failed (0.0%, 95 % CI 0.0%-8.8%;"
            " max 10.0%)",
            "report written to out/report.json",
        ]
    )
    report = json.loads((pytester.path / "out" / "report.json").read_text())
    assert report["seed"] == 4242
    assert report["capabilities"]["root"] == {"ok": True, "detail": "uid 0"}
    assert report["version"]
    tests = {t["nodeid"].split("::")[1]: t for t in report["tests"]}
    assert len(tests) == 7, "every test is in the report"
    recovered = tests["test_recovers"]
    assert recovered["outcome"] == "passed"
    assert recovered["faults"] == [
        {"name": "delay StartTransientUnit", "applied": 3, "lifted": True}
    ]
    assert recovered["recovery"]["ok"] is True
    assert 0 <= recovered["recovery"]["seconds"] < 5
    assert recovered["recovery"]["probes"] == ["runtime"]
    budget = tests["test_budget"]["budget"]
    assert (budget["runs"], budget["failures"], budget["passed"]) == (40, 0, True)
    assert budget["ci95"][1] == pytest.approx(0.0876, abs=1e-3)
    assert tests["test_plain[0]"]["recovery"] is None
    assert report["summary"]["faults_injected"] == 1
    assert report["summary"]["recoveries"] == 1

    props = _properties(str(pytester.path / "junit.xml"))
    assert props["test_recovers"]["runtimefaults.recovered"] == "true"
    assert props["test_recovers"]["runtimefaults.faults"] == "delay StartTransientUnit"
    assert float(props["test_recovers"]["runtimefaults.recovery_seconds"]) >= 0
    assert json.loads(props["test_recovers"]["runtimefaults"])["faults"][0]["applied"] == 3
    assert props["test_budget"]["runtimefaults.budget_failures"] == "0"
    assert props["test_budget"]["runtimefaults.budget_runs"] == "40"
    # Every worker used the controller's seed, and the seeded draws replay.
    assert props["test_seed"]["seed"] == "4242"
    draw = props["test_seed"]["draw"]
    again = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "--runtimefaults-seed=4242", "--junitxml=again.xml", "-k", "seed"
    )
    again.assert_outcomes(passed=1)
    assert _properties(str(pytester.path / "again.xml"))["test_seed"]["draw"] == draw


@pytest.mark.needs("root")  # the header says root uid 0
def test_header_has_seed_and_capabilities(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest("-p", "runtimefaults", "--runtimefaults-seed=7")
    result.stdout.fnmatch_lines(
        [
            "runtimefaults: seed 7 (replay with --runtimefaults-seed=7)",
            "runtimefaults: root uid 0, dbus-daemon *, systemd * sandboxable *, cgroups *, "
            "cni * plugins in /usr/lib/cni, runtimes runc crun*",
        ]
    )
    # No summary section when nothing was injected or measured.
    result.stdout.no_fnmatch_line("*- runtimefaults -*")


def test_seed_from_ini_and_a_bad_one(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(runtimefaults_seed):\n    assert runtimefaults_seed == 99\n")
    pytester.makeini("[pytest]\nruntimefaults_seed = 99\n")
    pytester.runpytest("-p", "runtimefaults").assert_outcomes(passed=1)
    pytester.makeini("[pytest]\nruntimefaults_seed = abc\n")
    result = pytester.runpytest("-p", "runtimefaults")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ini runtimefaults_seed must be an integer, got 'abc'*"])


def test_missing_capability_skips_with_package_or_fails_when_strict(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        from pytest_runtimefaults import caps

        def test_needs_tool(request):
            caps.require_command(request, "no-such-runtime-xyz", package="no-such-package")
        """
    )
    result = pytester.runpytest("-p", "runtimefaults", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        ["SKIPPED * no-such-runtime-xyz not found on PATH (apt-get install no-such-package)"]
    )
    result = pytester.runpytest("-p", "runtimefaults", "--runtimefaults-strict")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*runtimefaults strict mode: no-such-runtime-xyz not found*"])


def test_wilson_interval_known_values() -> None:
    # Reference values (Wilson score, z = 1.96): 0/1000 and 30/1000 (youki's ~3 %).
    assert wilson_interval(0, 1000) == pytest.approx((0.0, 0.003827), abs=1e-5)
    low, high = wilson_interval(30, 1000)
    assert (low, high) == pytest.approx((0.02108, 0.04254), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(5, 5)[1] == 1.0


def test_budget_result_and_figures_roundtrip() -> None:
    result = BudgetResult(runs=10, max_rate=0.1)
    for run in range(1, 11):
        result.record(run, RuntimeError(f"boom {run}\nsecond line") if run in (3, 7) else None)
    assert not result.passed
    assert result.first_failures == [
        "run 3: RuntimeError: boom 3 second line",
        "run 7: RuntimeError: boom 7 second line",
    ]
    long = BudgetResult(runs=1, max_rate=0.0)
    long.record(1, RuntimeError("runc --root " + "x" * 1000 + " failed: not a directory"))
    assert len(long.first_failures[0]) < 420
    assert long.first_failures[0].endswith("failed: not a directory")
    assert " ... " in long.first_failures[0]
    figures = TestFigures(budget=result.as_dict())
    assert TestFigures.from_properties(figures.properties()) == figures


def test_xdist_workers_use_the_controllers_random_seed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("i", range(6))
        def test_seed(i, runtimefaults_seed, record_property):
            record_property("seed", runtimefaults_seed)
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "-n", "2", "--junitxml=j.xml", "--runtimefaults-report=r.json"
    )
    result.assert_outcomes(passed=6)
    seed = json.loads((pytester.path / "r.json").read_text())["seed"]
    seeds = {p["seed"] for p in _properties(str(pytester.path / "j.xml")).values()}
    assert seeds == {str(seed)}
    result.stdout.fnmatch_lines([f"runtimefaults: seed {seed} (replay with *"])
