"""``runtimefaults scenarios`` end to end: a real sandboxed systemd, a real runtime, the gate.

The stall scenario (incident 2) is the one whose verdict differs between
runtimes: runc 1.1.5 blocks (a defect the expectations table knows), and a
runtime that enforces a deadline on its D-Bus calls fails cleanly.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_runtimefaults import expectations

pytestmark = [pytest.mark.timeout(400), pytest.mark.needs("systemd", "busybox-static")]

STALL = "test_incident2_systemd_stall.py::test_stalled_systemd_fails_create_within_a_bound"

#: crun behind a wrapper that gives up after 3 s: a runtime with a D-Bus timeout.
#: It names itself in --version, so the table has no row for it.
DEADLINE_RUNTIME = """#!/usr/bin/python3
import subprocess, sys
argv = sys.argv[1:]
if argv == ["--version"]:
    print("crun-deadline version 0.1 (crun with a 3 s deadline)")
    sys.exit(0)
try:
    sys.exit(subprocess.run(["/usr/bin/crun", *argv], timeout=3).returncode)
except subprocess.TimeoutExpired:  # run() has killed crun
    print("crun-deadline: systemd did not answer within 3 s, gave up", file=sys.stderr)
    sys.exit(1)
"""


def _scenarios(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_runtimefaults", "scenarios", "--only", "serials",
         "-k", "stalled", "--report", "r.json", *args],
        capture_output=True, text=True, cwd=cwd, timeout=300,
    )  # fmt: skip


def _verdict(cwd: Path) -> dict[str, object]:
    (test,) = json.loads((cwd / "r.json").read_text())["tests"]
    assert test["outcome"] == "passed", test
    return dict(test["verdict"])


@pytest.mark.needs("runc")
def test_runc_blocks_known_by_the_table_then_a_baseline_round_trip(tmp_path: Path) -> None:
    version = expectations.installed_version("runc")
    if expectations.expected("runc", version, "systemd:serial-overflow-stall") is None:
        pytest.skip(f"no expectations row for runc {version} under the stall")
    r = _scenarios(tmp_path, "--junitxml", "j.xml")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    v = _verdict(tmp_path)
    assert (v["outcome"], v["expected"], v["scenario"]) == ("blocks", "blocks", STALL), v
    assert "known (table)" in r.stdout
    assert f"runtime runc {version} (" in r.stdout
    assert "runtimefaults_verdict" in (tmp_path / "j.xml").read_text()
    # Without the table the same defect is new: exit 1; written to a baseline...
    r = _scenarios(tmp_path, "--no-expectations", "--write-baseline", "known.jsonl")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"NEW defect: {STALL}: runc {version} blocked" in r.stdout
    lines = (tmp_path / "known.jsonl").read_text().splitlines()
    assert sum(1 for line in lines if not line.startswith("#")) == 1
    # ...it is known: exit 0; with its line removed: new again, exit 1.
    r = _scenarios(tmp_path, "--no-expectations", "--baseline", "known.jsonl")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "known (baseline)" in r.stdout
    (tmp_path / "known.jsonl").write_text("".join(f"{x}\n" for x in lines if x.startswith("#")))
    r = _scenarios(tmp_path, "--no-expectations", "--baseline", "known.jsonl")
    assert r.returncode == 1, r.stdout + r.stderr


@pytest.mark.needs("crun")
def test_a_runtime_with_a_deadline_fails_cleanly(tmp_path: Path) -> None:
    wrapper = tmp_path / "crun-deadline"
    wrapper.write_text(DEADLINE_RUNTIME)
    os.chmod(wrapper, 0o755)
    r = _scenarios(tmp_path, "--runtime", str(wrapper))
    assert r.returncode == 0, r.stdout + r.stderr
    v = _verdict(tmp_path)
    assert (v["outcome"], v["component"], v["version"]) == ("fails_cleanly", "crun-deadline", None)
    # The evidence quotes the last line of stderr: the wrapper's, or (Debian 13's
    # crun 1.21 on the unified layout) its killed child's `read from sync socket`.
    assert re.search(r"failed in 3\.\d+ s", str(v["evidence"])), v["evidence"]
    assert v["leftovers"] == []
