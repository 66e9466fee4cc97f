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


N = "tests/system/systemd/"
#: the runtime tests of issue 15's families, a row each (parameters after the runtime)
ISSUE15 = {
    "test_neighbours.py::test_runtime_under_a_job_that_ended_badly[{rt}-failed]": (
        "a job that ends badly: JobRemoved says failed"
    ),
    "test_neighbours.py::test_runtime_meets_a_leftover_scope_of_its_name[{rt}]": (
        "unit already exists: a leftover scope of its name"
    ),
    "test_neighbours.py::test_runtime_when_systemd_reexecutes_mid_call[{rt}]": (
        "systemd re-executes mid-call"
    ),
    "test_neighbours.py::test_runtime_when_systemd_reexecutes_while_its_reply_is_held[{rt}]": (
        "daemon-reexec while the reply is held"
    ),
    "test_bus_restart.py::test_runtime_and_a_bus_restart_during_create[{rt}-mid-call]": (
        "bus restart: mid-call"
    ),
    "test_cookie.py::test_runtime_lifecycle_across_the_real_boundary[{rt}]": (
        "real cookie overflow: systemd's own serials past 0xffffffff"
    ),
    "test_bus_daemon.py::test_runtime_lifecycles_on_dbus_broker_leave_nothing[{rt}-proxy]": (
        "lifecycles on dbus-broker (proxy)"
    ),
    "test_bus_limits.py::test_runtime_when_connect_gets_eagain[{rt}]": (
        "connect() gets EAGAIN (the bus's backlog full)"
    ),
    "test_bus_limits.py::test_runtime_past_the_per_user_connection_cap[{rt}]": (
        "the per-user connection cap reached"
    ),
    "test_signal_flood.py::test_runtime_under_a_signal_flood_as_it_closes[{rt}-jobremoved]": (
        "signal flood as it closes: jobremoved"
    ),
}


def _junit(d: Path, observed: dict[str, str]) -> None:
    """junit.xml with the outcome property judged tests record, per node id."""
    cases = []
    for nodeid, outcome in observed.items():
        path, name = nodeid.split("::")
        classname = path.removesuffix(".py").replace("/", ".")
        cases.append(
            f'<testcase classname="{classname}" name="{name}"><properties>'
            f'<property name="runtimefaults_verdict.outcome" value="{outcome}" />'
            "</properties></testcase>"
        )
    (d / "junit.xml").write_text(
        '<testsuites><testsuite name="pytest">' + "".join(cases) + "</testsuite></testsuites>"
    )


def _same_machine(d: Path, **env: str) -> None:
    """Make the results dir *d* a run of release ``env["distro"]`` (as two dirs of one are)."""
    report = json.loads((d / "runtimefaults.json").read_text())
    report["environment"].update(env)
    (d / "runtimefaults.json").write_text(json.dumps(report))


def test_issue15_families_get_a_cell_per_runtime_version(tmp_path: Path) -> None:
    env = {"runc": "1.1.15", "crun": "1.21", "systemd": "257.13"}
    tests = {N + t.format(rt=rt): "passed" for t in ISSUE15 for rt in ("runc", "crun")}
    tests[N + "test_neighbours.py::test_runtime_meets_a_leftover_scope_of_its_name[crun]"] = (
        "failed"
    )
    daemon = _results(tmp_path, "debian13", env, tests)
    # what runc observed where the table knows a defect: the cell says it, not the default
    leftover = N + "test_neighbours.py::test_runtime_meets_a_leftover_scope_of_its_name[runc]"
    _junit(daemon, {leftover: "misbehaved"})
    # the same release and layout with the other bus: told apart by its results dir
    broker = _results(tmp_path, "debian13-broker", env, tests)
    for d in (daemon, broker):
        _same_machine(d, distro="trixie", layout="hybrid")
    out = tmp_path / "matrix.md"
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "matrix-table"), str(daemon), str(broker),
         "-o", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    assert "| runc 1.1.15 / systemd 257.13 (trixie-hybrid, debian13) |" in text
    assert "| crun 1.21 / systemd 257.13 (trixie-hybrid, debian13-broker) |" in text
    lines = {line.split(" | ")[0].removeprefix("| "): line for line in text.splitlines()}
    words = {
        "a job that ends badly: JobRemoved says failed": "failed cleanly",
        "systemd re-executes mid-call": "failed cleanly",
        "daemon-reexec while the reply is held": "survived",
        "bus restart: mid-call": "failed cleanly",
        "real cookie overflow: systemd's own serials past 0xffffffff": "survived",
        "lifecycles on dbus-broker (proxy)": "survived",
        "signal flood as it closes: jobremoved": "survived",
        "connect() gets EAGAIN (the bus's backlog full)": "failed cleanly",
        "the per-user connection cap reached": "failed cleanly",
    }
    for label, word in words.items():
        assert lines[label] == f"| {label} |" + f" {word} |" * 4, lines.get(label)
    unit = "unit already exists: a leftover scope of its name"
    assert (
        lines[unit]
        == f"| {unit} | misbehaved | differs: failed | failed cleanly | differs: failed |"
    )


def test_a_targeted_run_joins_its_machines_column(tmp_path: Path) -> None:
    env = {"runc": "1.1.5", "crun": "1.8.1", "systemd": "252.39"}
    whole = _results(
        tmp_path, "host", env, {f"{P}test_runtime_survives_fault[runc-{SPLIT}]": "passed"}
    )
    flood = (
        N + "test_signal_flood.py::test_runtime_under_a_signal_flood_as_it_closes[runc-jobremoved]"
    )
    targeted = _results(tmp_path, "host-issue15", env, {flood: "passed"})
    for d in (whole, targeted):
        _same_machine(d, distro="bookworm")
    text = mt.build([mt.load_runs(f"{whole}+{targeted}")])
    assert text.count("runc 1.1.5 / systemd 252.39 (bookworm) |") == 1
    assert f"| {SPLIT} | survived |" in text
    assert "| signal flood as it closes: jobremoved | survived |" in text
    other = _results(tmp_path, "other", {**env, "runc": "1.1.15"}, {flood: "passed"})
    _same_machine(other, distro="bookworm")
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "matrix-table"), f"{whole}+{other}", "-o", "-"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode != 0
    assert "is not a run of the same versions as" in res.stderr
    assert "runc 1.1.5 != 1.1.15" in res.stderr
