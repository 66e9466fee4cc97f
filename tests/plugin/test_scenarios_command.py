"""``runtimefaults scenarios`` as a CI job meets it, without booting anything.

--list and --only collect only; a run that selects nothing is pytest's exit 5,
which the command turns into a failure but still reports (summary files).
The real runs (a systemd boots) are in tests/system/systemd/test_scenarios_gate.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)


def _scenarios(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_runtimefaults", "scenarios", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=150,
        env={**os.environ, **(env or {})},
    )


def test_list_names_incident_family_and_what_each_checks(tmp_path: Path) -> None:
    r = _scenarios("--list", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    i = lines.index(
        "test_incident2_systemd_stall.py::test_stalled_systemd_fails_create_within_a_bound"
    )
    assert lines[i + 1] == (
        "    incident 2, family serials: systemd stalls at serial 0xffffffff: create must fail "
        "within 10 s and leave nothing."
    )
    assert any(line.startswith("    incident 1, family dbus: ") for line in lines)
    assert not any("(no docstring" in line for line in lines), "every scenario says what it checks"
    assert not (tmp_path / "runtimefaults-scenarios.json").exists(), "nothing ran"


def test_only_selects_families(tmp_path: Path) -> None:
    r = _scenarios("--list", "--only", "dbus", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    listed = [line for line in r.stdout.splitlines() if "::" in line]
    assert listed
    assert all(line.startswith("test_incident1_") for line in listed)
    both = _scenarios("--list", "--only", "dbus,serials", cwd=tmp_path)
    assert len([line for line in both.stdout.splitlines() if "::" in line]) > len(listed)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--only", "dbus,bogus"], "--only dbus,bogus: unknown family bogus; choose among dbus, "
         "serials, sockets, cni, subscribers"),
        (["--baseline", "/nonexistent/known.jsonl"], "--baseline /nonexistent/known.jsonl: "
         "cannot read it: No such file or directory"),
        (["--summary", "/nonexistent/dir/s.md"], "--summary /nonexistent/dir/s.md: its "
         "directory does not exist"),
    ],
)  # fmt: skip
def test_bad_arguments_exit_2_before_running(tmp_path: Path, args: list[str], message: str) -> None:
    r = _scenarios(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == f"runtimefaults scenarios: {message}"
    assert "pytest" not in r.stdout


@pytest.mark.needs("root")  # the plugin's journal lives in /run/runtimefaults
def test_no_scenario_is_a_failure_still_reported(tmp_path: Path) -> None:
    step = tmp_path / "step.md"
    r = _scenarios(
        "-k", "no_such_scenario", "--summary", "s.md", "--junitxml", "j.xml",
        cwd=tmp_path, env={"GITHUB_STEP_SUMMARY": str(step)},
    )  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    assert "no scenario ran (exit 5): that is a failure" in r.stderr
    summary = (tmp_path / "s.md").read_text()
    assert summary.startswith("## ❌ runtimefaults scenarios: runtime runc")
    assert "**exit 1**: 0 verdict(s)" in summary
    assert step.read_text() == summary, "GITHUB_STEP_SUMMARY honoured"
    assert (tmp_path / "j.xml").exists()
    assert (tmp_path / "runtimefaults-scenarios.json").exists()


@pytest.mark.needs("root")  # the plugin's journal lives in /run/runtimefaults
def test_a_checkouts_own_tests_conftest_is_not_loaded(tmp_path: Path) -> None:
    """Run from a repository (scripts/setup does), pytest would load ./tests/conftest.py."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "conftest.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('LOADED').write_text('yes')\n"
    )
    listed = _scenarios("--list", "--only", "serials", cwd=tmp_path)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    ran = _scenarios("-k", "no_such_scenario", "--report", "", cwd=tmp_path)
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert not (tmp_path / "tests" / "LOADED").exists()
