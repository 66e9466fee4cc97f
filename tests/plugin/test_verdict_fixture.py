"""The ``verdict`` fixture as a user meets it: findings in the JSON report and JUnit XML."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

pytestmark = pytest.mark.timeout(180)

SUITE = """
import pytest

@pytest.mark.family("serials", incident=2)
def test_blocks_known(verdict):
    verdict.record("blocks", component="runc", version="1.1.5",
                   fault="systemd:serial-overflow-stall",
                   evidence="create still running at the 10 s bound", seconds=10.0123,
                   leftovers=["runc-x.scope", "1:runc:[2:INIT]"])

def test_blocks_unknown_version(verdict):
    f = verdict.record("blocks", component="runc", version="9.9",
                       fault="systemd:serial-overflow-stall", evidence="still running")
    assert f.ok is False and f.expected is None

def test_crashes(verdict):
    verdict.record("crashes", component="containerd", version="1.6.20",
                   fault="daemon:sigkill", evidence="panic: sync: negative WaitGroup counter")

def test_forgot(verdict):
    pass

def test_infrastructure_error(verdict):
    raise RuntimeError("the sandbox did not boot")

def test_twice(verdict):
    verdict.record("survives", component="runc", version="1.1.5",
                   fault="dbus:split-reply", evidence="ok")
    verdict.record("survives", component="runc", version="1.1.5",
                   fault="dbus:split-reply", evidence="ok")

def test_bad_fault(verdict):
    verdict.record("survives", component="runc", fault="dbus:nope", evidence="ok")

def test_bad_outcome(verdict):
    verdict.record("exploded", component="runc", fault="dbus:split-reply", evidence="ok")
"""


def _properties(xml_path: str) -> dict[str, dict[str, str]]:
    root = ET.parse(xml_path).getroot()
    return {
        case.get("name", ""): {p.get("name", ""): p.get("value", "") for p in case.iter("property")}
        for case in root.iter("testcase")
    }


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_findings_reach_the_report_and_junit(pytester: pytest.Pytester, xdist: list[str]) -> None:
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "--runtimefaults-report=r.json", "--junitxml=j.xml",
        "--runtimefaults-no-reap", "--runtimefaults-state-dir", str(pytester.path / "state"),
        *xdist,
    )  # fmt: skip
    # A verdict, whatever it is, passes; no verdict (or no reachable one) does not.
    result.assert_outcomes(passed=4, failed=4, errors=1)
    out = result.stdout.str()
    assert "test_forgot used the `verdict` fixture but recorded no verdict" in out
    assert "a verdict was already recorded (survived under dbus:split-reply)" in out
    assert "unknown fault id 'dbus:nope'" in out
    assert "unknown outcome 'exploded'" in out
    report = json.loads((pytester.path / "r.json").read_text())
    tests = {t["nodeid"].split("::")[1]: t for t in report["tests"]}
    known = tests["test_blocks_known"]["verdict"]
    assert known == {
        "scenario": "test_suite.py::test_blocks_known",
        "family": "serials",
        "incident": 2,
        "outcome": "blocks",
        "component": "runc",
        "version": "1.1.5",
        "fault": "systemd:serial-overflow-stall",
        "evidence": "create still running at the 10 s bound",
        "seconds": 10.012,
        "leftovers": ["1:runc:[2:INIT]", "runc-x.scope"],
        "expected": "blocks",
        "known": ["blocks"],
        "ok": True,
        "message": known["message"],
    }
    assert "as known" in known["message"]
    assert tests["test_blocks_unknown_version"]["verdict"]["expected"] is None
    assert tests["test_crashes"]["verdict"]["outcome"] == "crashes"
    assert tests["test_forgot"]["verdict"] is None
    assert tests["test_forgot"]["outcome"] == "error"
    assert tests["test_infrastructure_error"]["outcome"] == "failed"
    # The first of two records is kept (the second raised).
    assert tests["test_twice"]["verdict"]["fault"] == "dbus:split-reply"
    assert report["summary"]["verdicts"] == {"blocks": 2, "crashes": 1, "survives": 1}
    props = _properties(str(pytester.path / "j.xml"))
    assert json.loads(props["test_blocks_known"]["runtimefaults_verdict"])["outcome"] == "blocks"
    assert props["test_blocks_known"]["runtimefaults_verdict.outcome"] == "blocked"
    assert props["test_crashes"]["runtimefaults_verdict.outcome"] == "crashed"
    assert props["test_crashes"]["runtimefaults_verdict.component"] == "containerd 1.6.20"


def test_family_marker_is_validated_at_collection(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.family(3)
        def test_x(verdict):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "runtimefaults", "--runtimefaults-no-reap")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_x: bad @pytest.mark.family: the name must be*got 3*"])


def test_family_from_the_module_name(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_incident4_cni_x="""
        def test_x(verdict):
            verdict.record("fails_cleanly", component="containerd", version="2.1.9",
                           fault="cni:wrong-version-config", evidence="network not ready")
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "--runtimefaults-no-reap", "--runtimefaults-report=r.json"
    )
    result.assert_outcomes(passed=1)
    (test,) = json.loads((pytester.path / "r.json").read_text())["tests"]
    assert (test["verdict"]["family"], test["verdict"]["incident"]) == ("cni", 4)
    assert test["verdict"]["ok"] is True


FAMILIES_SUITE = {
    "test_incident1_x": "def test_a():\n    pass\n",
    "test_mine": (
        "import pytest\n\n"
        "@pytest.mark.family('mine')\n"
        "def test_b():\n    pass\n\n"
        "def test_c():\n    pass\n"
    ),
}


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_families_option_selects(pytester: pytest.Pytester, xdist: list[str]) -> None:
    pytester.makepyfile(**FAMILIES_SUITE)
    result = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "--runtimefaults-no-reap", "--runtimefaults-families=dbus,mine",
        "-v", *xdist,
    )  # fmt: skip
    # Under xdist the workers deselect, and the controller does not count it.
    result.assert_outcomes(passed=2, deselected=0 if xdist else 1)
    passed = [line for line in result.stdout.lines if "PASSED" in line]
    assert any("test_a" in line for line in passed)
    assert any("test_b" in line for line in passed)
    assert not any("test_c" in line for line in passed)
    none = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "--runtimefaults-no-reap", "--runtimefaults-families=cni"
    )
    assert none.ret == pytest.ExitCode.NO_TESTS_COLLECTED  # a shipped family with no test here


def test_families_option_refuses_a_family_no_test_has(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(**FAMILIES_SUITE)
    result = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "--runtimefaults-no-reap", "--runtimefaults-families=mien"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--runtimefaults-families: no test of the family mien; families here: dbus, mine*"]
    )
