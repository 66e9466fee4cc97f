"""The gate of ``runtimefaults scenarios``: known by table, by baseline, new, fixed, changed."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pytest

from pytest_runtimefaults.commands import scenarios as cmd
from pytest_runtimefaults.expectations import Outcome
from pytest_runtimefaults.runtime import RuntimeResult
from pytest_runtimefaults.scenarios import lifecycle_outcome
from pytest_runtimefaults.verdicts import (
    Baseline,
    BaselineError,
    Finding,
    VerdictRecorder,
    family_of,
    findings_from_report,
    gate,
)

STALL = "test_incident2_systemd_stall.py::test_stalled_systemd_fails_create_within_a_bound"
SPLIT = "test_incident1_dbus_replies.py::test_lifecycles_survive[SplitMessage(3)]"


def _finding(
    outcome: str,
    *,
    scenario: str = STALL,
    version: str | None = "1.1.5",
    component: str = "runc",
    fault: str = "systemd:serial-overflow-stall",
) -> Finding:
    # Through the recorder, so that the table's row is looked up as in a real run.
    return VerdictRecorder(scenario, family="serials", incident=2).record(
        outcome, component=component, version=version, fault=fault, evidence="seen", seconds=1.0
    )


def test_a_defect_the_table_knows_is_known() -> None:
    f = _finding("blocks")
    assert (f.expected, f.defect, f.ok) == (Outcome.BLOCKS, True, True)
    result = gate([f])
    assert result.known_by_table == [f]
    assert result.ok


def test_the_same_defect_of_an_unknown_version_is_new() -> None:
    f = _finding("blocks", version="9.9")
    assert f.expected is None
    result = gate([f])
    assert result.new == [f]
    assert not result.ok


def test_without_the_table_only_the_baseline_knows() -> None:
    f = _finding("blocks")
    assert gate([f], use_table=False).new == [f]
    known = gate([f], Baseline.from_findings([f]), use_table=False)
    assert known.known_by_baseline == [f]
    assert known.ok


def test_a_baseline_entry_with_another_outcome_does_not_make_a_defect_known() -> None:
    baseline = Baseline.from_findings([_finding("blocks", version="9.9")])
    leaks = _finding("leaks", version="9.9")
    result = gate([leaks], baseline)
    assert result.new == [leaks]
    assert "the baseline knows it blocked, this run it leaked" in result.notes[0]
    assert [e.outcome for e in result.unseen] == [Outcome.BLOCKS]


def test_a_baseline_entry_not_seen_any_more_is_listed_only_if_its_scenario_ran() -> None:
    baseline = Baseline.from_findings([_finding("blocks", version="9.9")])
    fixed = _finding("fails_cleanly", version="9.9")
    assert [e.scenario for e in gate([fixed], baseline).unseen] == [STALL]
    other = _finding("survives", scenario=SPLIT, fault="dbus:split-reply")
    assert gate([other], baseline).unseen == []  # --only dbus: the stall did not run
    assert len(gate([other], baseline, ran=[STALL]).unseen) == 1  # ran, but no verdict


def test_a_row_the_run_contradicts_with_an_acceptable_outcome_is_changed_not_new() -> None:
    f = _finding("fails_cleanly")  # runc 1.1.5's row says blocks
    result = gate([f])
    assert result.changed == [f]
    assert result.fine == [f]
    assert result.ok
    # A regression (its row says survives, it blocked) is new.
    worse = _finding("blocks", scenario=SPLIT, fault="dbus:split-reply")
    assert gate([worse]).new == [worse]


def test_baseline_round_trip(tmp_path: Path) -> None:
    findings = [
        _finding("blocks", version="9.9"),
        _finding("leaks", scenario=SPLIT, fault="dbus:split-reply", version="9.9"),
        _finding("survives", scenario=SPLIT + "x", fault="dbus:split-reply"),
    ]
    path = Baseline.from_findings(findings).write(tmp_path / "known.jsonl")
    text = path.read_text()
    assert text == Baseline.load(path).dumps(), "stable: written, read and written again"
    entries = [line for line in text.splitlines() if not line.startswith("#")]
    assert len(entries) == 2, "defects only, one line each"
    assert json.loads(entries[0])["scenario"] == SPLIT, "sorted by key"
    assert gate(findings, Baseline.load(path), use_table=False).ok
    # Remove a line: that defect is new again.
    path.write_text("\n".join(line for line in text.splitlines() if "dbus:split" not in line))
    result = gate(findings, Baseline.load(path), use_table=False)
    assert [f.scenario for f in result.new] == [SPLIT]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"scenario": "x"}\n', r"known\.jsonl:1: not a baseline entry \(missing 'component'\)"),
        ("# c\nnot json\n", r"known\.jsonl:2: not a baseline entry"),
        (
            '{"scenario": "s", "component": "c", "fault": "f", "outcome": "boom"}',
            r"unknown outcome 'boom'",
        ),
    ],
)
def test_a_bad_baseline_names_the_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "known.jsonl").write_text(text)
    with pytest.raises(BaselineError, match=message):
        Baseline.load(tmp_path / "known.jsonl")
    with pytest.raises(BaselineError, match="cannot read it"):
        Baseline.load(tmp_path / "absent")


def test_family_of_marker_then_module_name() -> None:
    assert family_of("a/test_incident5_swarm.py::t") == ("subscribers", 5)
    assert family_of("a/test_mine.py::t") == (None, None)
    assert family_of("a/test_mine.py::t", ("cni", None)) == ("cni", 4)
    assert family_of("a/test_mine.py::t", ("mine", 7)) == ("mine", 7)


def _result(
    rc: int | None,
    stderr: str = "",
    *,
    duration: float = 0.1,
    timed_out: bool = False,
    verb: str = "create",
) -> RuntimeResult:
    return RuntimeResult(["runc", "--root", "/r", verb, "x"], rc, "", stderr, duration, timed_out)


@pytest.mark.parametrize(
    ("under", "after", "left", "outcome", "evidence"),
    [
        ([_result(0)] * 3, _result(0), [], Outcome.SURVIVES, "3 of 3 ok"),
        ([_result(1, "Timeout waiting for systemd")], _result(0), [], Outcome.FAILS_CLEANLY,
         "1 of 1 failed in 0.10 s: Timeout waiting for systemd"),
        ([_result(1, "")], _result(0), [], Outcome.MISBEHAVES, "no error message"),
        ([_result(0)], _result(1, "boom"), [], Outcome.MISBEHAVES, "the next lifecycle failed"),
        ([_result(1, "x")], _result(0), ["unit a.scope"], Outcome.LEAKS, "left: unit a.scope"),
        ([_result(None, timed_out=True, duration=10)], _result(0), ["unit a.scope"],
         Outcome.BLOCKS, "create still running at the 10 s bound, killed; left: unit a.scope"),
        ([_result(-11)], _result(0), [], Outcome.CRASHES, "create: signal 11"),
        ([_result(2, "panic: sync: negative WaitGroup counter", verb="delete")], _result(0), [],
         Outcome.CRASHES, "delete: exit 2: panic"),
    ],
)  # fmt: skip
def test_lifecycle_outcome(
    under: list[RuntimeResult],
    after: RuntimeResult,
    left: list[str],
    outcome: Outcome,
    evidence: str,
) -> None:
    got, text = lifecycle_outcome(under, after, left, bound=10.0)
    assert got is outcome
    assert evidence in text


# --- the command's decision and reports, from a report as pytest writes it -------------


def test_daemons_gone_is_a_crash_even_when_the_runtime_blocked_first() -> None:
    gone = "the sandbox's bus went away (its dbus-daemon's socket /tmp/x/bus is gone)"
    blocked = _result(None, timed_out=True, duration=10)
    outcome, evidence = lifecycle_outcome([blocked], _result(1, "x"), [], bound=10, gone=gone)
    assert outcome is Outcome.CRASHES
    assert evidence == gone + "; create was still running at the 10 s bound"


def _report(*findings: Finding, extra: list[dict[str, Any]] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    tests = [{"nodeid": f.scenario, "outcome": "passed", "verdict": f.as_dict()} for f in findings]
    return {"tests": tests + list(extra), "environment": {"systemd": "252.39"}}


def _args(tmp_path: Path, **kw: Any) -> argparse.Namespace:
    base = {"summary": None, "write_baseline": None, "runtime": "runc"}
    return argparse.Namespace(**{**base, **kw})


def test_exit_status_of_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    known, new = (
        _finding("blocks"),
        _finding("leaks", scenario=SPLIT, version="9.9", fault="dbus:split-reply"),
    )
    assert findings_from_report(_report(known, new)) == [known, new]
    run = cmd.Run(_report(known), 0, "h")
    run.decide(None)
    assert run.exit_code == 0
    run = cmd.Run(_report(known, new), 0, "h")
    run.decide(None)
    assert run.exit_code == 1
    errored = cmd.Run(_report(known, extra=[{"nodeid": "t::x", "outcome": "failed"}]), 1, "h")
    errored.decide(None)
    assert errored.exit_code == 1
    assert "ERROR: t::x: failed without recording a verdict" in cmd.table_lines(errored)
    silent = cmd.Run(_report(known, extra=[{"nodeid": "t::z", "outcome": "passed"}]), 0, "h")
    silent.decide(None)
    assert silent.exit_code == 1, "a scenario must record a verdict"
    skipped = cmd.Run(_report(known, extra=[{"nodeid": "t::y", "outcome": "skipped"}]), 0, "h")
    skipped.decide(None)
    assert skipped.exit_code == 0
    empty = cmd.Run({"tests": []}, 5, "h")  # pytest's "no tests ran" is a failure
    empty.decide(None)
    assert empty.exit_code == 1
    interrupted = cmd.Run(_report(known), 2, "h")
    interrupted.decide(None)
    assert interrupted.exit_code == 2


def test_table_summary_and_baseline_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    known = _finding("blocks")
    changed = _finding("fails_cleanly", scenario=STALL + "2")
    new = _finding("leaks", scenario=SPLIT, version="9.9", fault="dbus:split-reply")
    gone = Baseline.from_findings([_finding("blocks", scenario=STALL + "2", version="9.9")])
    step = tmp_path / "step.md"
    step.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    args = _args(tmp_path, summary=str(tmp_path / "s.md"), write_baseline=str(tmp_path / "b"))
    run = cmd.Run(_report(known, changed, new), 0, "runtime runc 1.1.5 · systemd 252.39")
    assert cmd._finish(args, run, gone) == 1
    out = capsys.readouterr().out
    assert "runtime runc 1.1.5 · systemd 252.39" in out
    assert re.search(
        r"test_stalled_systemd_fails_create_within_a_bound +serials +blocked +"
        r"known \(table\) +1\.0 s +seen",
        out,
    )
    assert "NEW defect: " + SPLIT + ": runc 9.9 leaked under dbus:split-reply" in out
    assert (
        "changed: runc 1.1.5 failed cleanly under systemd:serial-overflow-stall, but its "
        "expectations row says blocks: update the expectations row" in out
    )
    assert (
        f"baseline: {STALL}2 | runc | systemd:serial-overflow-stall (blocks) was not seen "
        "any more: fixed? update your baseline" in out
    )
    assert (
        "exit 1: 3 verdict(s), 1 acceptable, 1 known defect(s), 1 new, 1 changed row(s), "
        "1 baseline entry not seen" in out
    )
    summary = (tmp_path / "s.md").read_text()
    assert summary.startswith("## ❌ runtimefaults scenarios: runtime runc 1.1.5")
    assert "| `test_lifecycles_survive[SplitMessage(3)]` | serials | leaked | NEW |" in summary
    assert step.read_text() == "earlier step\n" + summary, "appended to $GITHUB_STEP_SUMMARY"
    written = Baseline.load(tmp_path / "b")
    assert sorted(e.outcome.value for e in written.entries.values()) == ["blocks", "leaks"]


def test_matrix_table_has_a_column_per_distro_and_runtime_version() -> None:
    bookworm = cmd.Run(_report(_finding("blocks")), 0, "debian12")
    bookworm.decide(None)
    sid = cmd.Run(
        _report(
            _finding("fails_cleanly", version="9.9"),
            extra=[{"nodeid": "t::other", "outcome": "skipped"}],
        ),
        0,
        "sid",
    )
    sid.decide(None)
    columns = [
        cmd.Column("debian12", 0, bookworm, cmd._column_label("debian12", bookworm, {}, "runc")),
        cmd.Column("sid", 0, sid, cmd._column_label("sid", sid, {}, "runc")),
        cmd.Column("debian13", 125, None, cmd._column_label("debian13", None, {"runc": "1.1.15"},
                                                             "runc")),
    ]  # fmt: skip
    lines = cmd.matrix_lines(columns)
    assert lines[0] == "| scenario | debian12: runc 1.1.5 | sid: runc 9.9 | debian13: runc 1.1.15 |"
    assert lines[2] == (
        "| `test_stalled_systemd_fails_create_within_a_bound` | blocked (known (table)) "
        "| failed cleanly |  |"
    )
    assert lines[3] == "| `other` |  | skipped |  |"
    assert lines[-1] == "| **exit** | 0 | 0 | no report (exit 125) |"


def test_matrix_refuses_unknown_distros(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(matrix="debian12,fedora", list=False, baseline=None)
    assert cmd._matrix(args) == 2
    assert (
        "--matrix debian12,fedora: unknown distro fedora; choose among debian12, debian13, sid"
        in capsys.readouterr().err
    )
