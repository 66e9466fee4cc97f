"""scripts/matrix-table: cells judged from reports, junit messages and fault rows."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    path = str(REPO / "scripts" / "matrix-table")
    loader = importlib.machinery.SourceFileLoader("rf_matrix_table", path)
    spec = importlib.util.spec_from_loader("rf_matrix_table", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["rf_matrix_table"] = module  # dataclasses look their module up
    loader.exec_module(module)
    return module


mt = _load()
P = "tests/test_runtime_proxy.py::"
SPLIT = "SplitMessage(3) on JobRemoved"


def _results(tmp_path: Path, name: str, env: dict[str, str], tests: dict[str, str]) -> Path:
    d = tmp_path / name
    d.mkdir()
    report = {
        "environment": {**env, "distro": name},
        "tests": [{"nodeid": n, "outcome": o} for n, o in tests.items()],
    }
    (d / "runtimefaults.json").write_text(json.dumps(report))
    return d


def test_cells_from_outcomes_fault_rows_and_junit(tmp_path: Path) -> None:
    old = _results(
        tmp_path,
        "bookworm",
        {"runc": "1.1.5", "crun": "1.8.1", "systemd": "252.39", "containerd": "1.6.20"},
        {
            f"{P}test_runtime_survives_fault[runc-{SPLIT}]": "passed",
            f"{P}test_runtime_survives_fault[crun-{SPLIT}]": "passed",
            f"{P}test_systemd_serial_overflow_stall_is_bounded_and_leaves_nothing[runc]": "xfailed",
            f"{P}test_systemd_serial_overflow_stall_is_bounded_and_leaves_nothing[crun]": "xfailed",
            "tests/test_sockets_real.py::test_containerd_per_variant[live]": "passed",
        },
    )
    new = _results(
        tmp_path,
        "trixie",
        {"runc": "1.1.15", "crun": "1.21", "systemd": "257.13", "containerd": "1.7.24"},
        {
            f"{P}test_runtime_survives_fault[runc-{SPLIT}]": "failed",
            f"{P}test_systemd_serial_overflow_stall_is_bounded_and_leaves_nothing[runc]": "failed",
            f"{P}test_jobremoved_never_sent_fails_within_runcs_timeout[runc]": "failed",
            "tests/test_sockets_real.py::test_containerd_per_variant[live]": "failed",
        },
    )
    old_rows = [
        {"case": "stall", "runtime": "runc", "create_rc": None, "timed_out": True,
         "units_left": ["runc-x.scope"], "processes_left": ["42:runc:[2:INIT]"]},
    ]  # fmt: skip
    (old / "fault-table.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old_rows))
    rows = [
        {"case": "fault", "runtime": "runc", "fault": SPLIT, "create_rc": 1, "units_left": []},
        {"case": "no-jobremoved", "runtime": "runc", "create_rc": None, "units_left": []},
    ]
    (new / "fault-table.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (new / "junit.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_runtime_proxy" '
        'name="test_systemd_serial_overflow_stall_is_bounded_and_leaves_nothing[runc]">'
        '<failure message="[XPASS(strict)] runc 1.1.5 waits" /></testcase>'
        '<testcase classname="tests.test_sockets_real" name="test_containerd_per_variant[live]">'
        '<failure message="AssertionError: refused: connection refused" /></testcase>'
        "</testsuite></testsuites>"
    )
    text = mt.build([mt.load_run(old), mt.load_run(new)])
    assert "| fault | runc 1.1.5 / systemd 252.39 (bookworm) | crun 1.8.1 / systemd 252.39 " in text
    assert "runc 1.1.15 / systemd 257.13 (trixie) |\n" in text
    assert "crun 1.21 / systemd" not in text  # no test of crun in that run: no column
    lines = {line.split(" | ")[0].removeprefix("| "): line for line in text.splitlines()}
    # survived on 1.1.5; on 1.1.15 the row says it failed (rc 1, nothing left); crun: no test
    assert lines[SPLIT] == f"| {SPLIT} | survived | survived | failed cleanly |"
    # xfailed -> blocked; a strict XPASS is the bounded failure the test asks for
    stall = "serial overflow: systemd stalls at 0xffffffff"
    # killed at the bound, runc left its scope and a frozen init: both are the outcome
    leaked = "blocked, then leaked: runc-x.scope, runc:[2:INIT]"
    assert lines[stall] == f"| {stall} | {leaked} | blocked | failed cleanly |"
    # killed at the bound: no return code
    assert lines["JobRemoved never sent"] == "| JobRemoved never sent |  |  | blocked |"
    live = "socket path: live (served over it)"
    assert lines[live] == f"| {live} | misbehaved | differs: refused: connection refused |"


def test_a_dir_without_a_report_names_what_to_pass(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "matrix-table"), str(tmp_path), "-o", "-"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode != 0
    assert "runtimefaults.json not found: pass the --results dir of scripts/distro" in res.stderr
