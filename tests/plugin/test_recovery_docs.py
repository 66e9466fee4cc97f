"""The CI example of docs/recovery.md is real: its tox commands run, its YAML is valid."""

from __future__ import annotations

import configparser
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

PAGE = Path(__file__).parents[2] / "docs" / "recovery.md"


def _block(language: str) -> str:
    match = re.search(rf"```{language}\n(.*?)```", PAGE.read_text(), re.S)
    assert match, f"docs/recovery.md has no {language} block"
    return match.group(1)


@pytest.mark.needs("root")  # the gate runs doctor --strict, which wants root
def test_tox_gate_commands_run(pytester: pytest.Pytester) -> None:
    ini = configparser.ConfigParser()
    ini.read_string(_block("ini"))
    commands = [
        line.strip()
        for line in ini["testenv:gate"]["commands"].replace("\\\n", " ").splitlines()
        if line.strip()
    ]
    assert [c.split()[0] for c in commands] == ["runtimefaults", "pytest"]
    doctor = subprocess.run(
        [sys.executable, "-m", "pytest_runtimefaults", *shlex.split(commands[0])[1:]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # doctor --strict refuses a host that lacks something (sid in a container
    # here: no cgroup controllers), naming exactly what the probes say is missing.
    from pytest_runtimefaults import caps

    missing = sorted(c.name for c in caps.probe_all() if not c.ok)
    named = sorted(re.findall(r"^MISSING\s+(\S+)", doctor.stdout, re.M))
    assert doctor.returncode == (1 if missing else 0), doctor.stdout + doctor.stderr
    assert named == missing, doctor.stdout
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.recovers(within=5, probe=["true"])
        def test_gate():
            pass
        """
    )
    work = pytester.path / "toxwork"
    args = shlex.split(commands[1].replace("{toxworkdir}", str(work)).replace("{posargs}", ""))
    result = pytester.runpytest_subprocess(*args[1:])
    result.assert_outcomes(passed=1)
    assert (work / "runtimefaults.json").exists()
    assert (work / "junit.xml").exists()


def test_github_actions_matrix_is_valid_yaml() -> None:
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load(_block("yaml"))
    job = workflow["jobs"]["gate"]
    assert job["strategy"]["matrix"]["runtime"] == ["runc", "crun"]
    runs = " ".join(str(step.get("run", "")) for step in job["steps"])
    assert "tox -e gate -- --runtimefaults-runtime=${{ matrix.runtime }}" in runs
    assert "runtimefaults cleanup" in runs
    uploads = [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/upload")]
    assert "runtimefaults.json" in uploads[0]["with"]["path"]
