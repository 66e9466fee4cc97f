"""The table of known runtime behaviour: lookups, version ranges, version parsing."""

from __future__ import annotations

import json

import pytest

from pytest_runtimefaults import expectations as ex
from pytest_runtimefaults.expectations import Outcome, Version

# Real first lines of `--version` of the releases in ../shared/HOST.md.
VERSION_TEXTS = [
    ("runc", "runc version 1.1.5+ds1\ncommit: 1.1.5+ds1-1+deb12u1\nspec: 1.0.2-dev", "1.1.5"),
    ("runc", "runc version 1.3.6+ds1\ncommit: v1.3.6\nspec: 1.2.1", "1.3.6"),
    ("crun", "crun version 1.8.1\ncommit: f8a096be060b22ccd3d5f3ebe44108517fbf6c30", "1.8.1"),
    ("crun", "crun version 1.21\ncommit: 10269840aa07fb7e6b7e1acff6198692d8ff5c88", "1.21"),
    (
        "containerd",
        "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3",
        "1.6.20",
    ),
    ("containerd", "containerd github.com/containerd/containerd/v2 2.1.9~ds1 2.1.9~ds1-1", "2.1.9"),
    ("podman", "podman version 5.4.2", "5.4.2"),
    ("systemd", "systemd 252 (252.39-1~deb12u2)\n+PAM +AUDIT +SELINUX", "252.39"),
    ("systemd", "systemd 262 (262.1-1)\n+PAM", "262.1"),
    ("systemd", "systemd 257\n+PAM", "257"),
    ("dbus-daemon", "D-Bus Message Bus Daemon 1.16.2\nCopyright (C) 2002", "1.16.2"),
]


@pytest.mark.parametrize(("component", "text", "version"), VERSION_TEXTS)
def test_parse_version_of_each_component(component: str, text: str, version: str) -> None:
    assert str(ex.parse_version(component, text)) == version


def test_parse_version_without_a_version_and_of_an_unknown_component() -> None:
    assert ex.parse_version("runc", "bash: runc: command not found") is None
    with pytest.raises(ValueError, match=r"no version parser for 'youki'; known: .*runc"):
        ex.parse_version("youki", "youki version 0.3.0")


@pytest.mark.parametrize(
    ("version", "spec", "ok"),
    [
        ("1.1.5", "1.1.5", True),
        ("1.1.5.2", "1.1.5", True),
        ("1.1.15", "1.1.5", False),
        ("1.1", "1.1.0", False),  # "1.1.0" asks for three parts; 1.1 has two
        ("252.39", "252", True),
        ("262.1", ">=258", True),
        ("257.13", ">=258", False),
        ("1.2", ">=1.1.5,<1.3", True),
        ("1.3", ">=1.1.5,<1.3", False),
        ("1.1", "==1.1.0", True),
        ("2", ">1.9", True),
    ],
)
def test_version_specs(version: str, spec: str, ok: bool) -> None:
    assert ex.matches(version, spec) is ok


def test_bad_specs_and_versions_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"bad version clause '~1.1' in '~1.1'"):
        ex.matches("1.1", "~1.1")
    with pytest.raises(ValueError, match=r"not a version: 'abc'"):
        Version.parse("abc")


def test_known_facts_and_unknown_versions() -> None:
    assert ex.expected("runc", "1.1.5", "systemd:serial-overflow-stall") is Outcome.BLOCKS
    assert ex.expected("runc", "1.1.5", "systemd:jobremoved-never-sent") is Outcome.FAILS_CLEANLY
    assert ex.expected("runc", "1.1.15", "systemd:jobremoved-never-sent") is Outcome.BLOCKS
    assert ex.expected("crun", "1.8.1", "dbus:split-reply") is Outcome.SURVIVES
    assert ex.expected("systemd", "262.1", "systemd:cgroup-v1") is Outcome.FAILS_CLEANLY
    assert ex.expected("systemd", "257.13", "systemd:cgroup-v1") is Outcome.SURVIVES
    # Unknown: judged on its own merits, never a guess.
    assert ex.expected("runc", "1.2.0", "systemd:serial-overflow-stall") is None
    assert ex.expected("youki", "0.3.0", "dbus:split-reply") is None
    assert ex.expected("runc", None, "dbus:split-reply") is None


def test_an_unknown_fault_id_is_an_error_not_an_unknown_version() -> None:
    with pytest.raises(ValueError, match=r"unknown fault id 'dbus:splitreply'"):
        ex.expected("runc", "1.1.5", "dbus:splitreply")
    with pytest.raises(ValueError, match=r"unknown fault id 'nope'"):
        ex.Expectation("runc", "1", "nope", Outcome.SURVIVES, "")


def test_every_row_is_well_formed_and_unambiguous() -> None:
    seen: dict[tuple[str, str, str], Outcome] = {}
    for row in ex.EXPECTATIONS:
        assert row.fault in ex.FAULTS
        assert row.evidence, row
        key = (row.component, row.versions, row.fault)
        assert key not in seen, f"two rows for {key}"
        seen[key] = row.outcome
    assert {r.outcome for r in ex.EXPECTATIONS} >= {
        Outcome.SURVIVES,
        Outcome.FAILS_CLEANLY,
        Outcome.BLOCKS,
        Outcome.LEAKS,
    }


def test_installed_version_of_this_machine() -> None:
    """The host's own binaries parse (whatever release this runs on)."""
    for component in ("runc", "crun", "containerd", "podman", "systemd", "dbus-daemon"):
        if ex.shutil.which(ex.VERSION_COMMANDS[component][0]) is None:
            continue
        version = ex.installed_version(component)
        assert version is not None, component
        assert version.parts[0] >= 1, component
    assert ex.installed_version("runc", "/nonexistent/runc") is None


def test_the_json_report_names_the_versions_that_ran(pytester: pytest.Pytester) -> None:
    """The report's ``environment`` block: what scripts/matrix-table keys its columns on."""
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "runtimefaults", "--runtimefaults-report=r.json")
    result.assert_outcomes(passed=1)
    report = json.loads((pytester.path / "r.json").read_text())
    env = report["environment"]
    assert env == ex.environment()
    assert set(env) >= {"runc", "crun", "containerd", "podman", "systemd", "python", "distro"}


def test_the_matrix_rows_of_debian_13() -> None:
    """What the Debian 13 run measured (docs/matrix.md): runc 1.1.15 and crun 1.21."""
    for rt, v in (("runc", "1.1.15"), ("crun", "1.21")):
        assert ex.expected(rt, v, "dbus:reorder") is Outcome.SURVIVES
        assert ex.expected(rt, v, "systemd:serial-overflow-stall") is Outcome.BLOCKS
    assert ex.expected("containerd", "1.7.24", "socket:live") is Outcome.MISBEHAVES
    assert ex.expected("containerd", "2.1.9", "socket:directory") is Outcome.FAILS_CLEANLY
    assert ex.expected("containerd", "1.7.24", "cni:wrong-version-config") is Outcome.MISBEHAVES
    assert ex.expected("containerd", "2.1.9", "cni:wrong-version-config") is Outcome.FAILS_CLEANLY
    # an unmeasured version has no row: judged on its merits
    assert ex.expected("runc", "1.2.0", "dbus:reorder") is None


def test_the_matrix_rows_of_sid() -> None:
    """What the sid run measured (unified layout, systemd 262): runc 1.3.6 and crun 1.28."""
    for rt, v in (("runc", "1.3.6"), ("crun", "1.28")):
        assert ex.expected(rt, v, "dbus:reorder") is Outcome.SURVIVES
        assert ex.expected(rt, v, "systemd:serials-wrap") is Outcome.SURVIVES
        assert ex.expected(rt, v, "systemd:serial-overflow-stall") is Outcome.BLOCKS
    assert ex.expected("runc", "1.3.6", "systemd:jobremoved-never-sent") is Outcome.FAILS_CLEANLY
    assert ex.expected("crun", "1.28", "systemd:jobremoved-never-sent") is Outcome.BLOCKS
    assert ex.expected("containerd", "2.1.9", "cni:broken-config-at-pod-start") is (
        Outcome.FAILS_CLEANLY
    )
    assert ex.expected("containerd", "1.6.20", "cni:broken-config-at-pod-start") is Outcome.LEAKS


# --- judge: the table decides, an unknown version is judged on its merits ---------


def test_a_known_defect_seen_again_is_a_finding_not_a_failure() -> None:
    verdict = ex.judge("runc", "1.1.5", "systemd:serial-overflow-stall", ex.Outcome.BLOCKS)
    assert verdict.ok
    assert "as known" in verdict.message
    assert verdict.as_dict()["expected"] == "blocks"


def test_a_component_that_changed_fails_and_says_which_row_to_update() -> None:
    verdict = ex.judge("crun", "1.8.1", "systemd:serial-overflow-stall", ex.Outcome.FAILS_CLEANLY)
    assert not verdict.ok
    assert "known to blocks" in verdict.message
    assert "pytest_runtimefaults/expectations.py" in verdict.message


def test_an_unknown_version_must_recover_or_fail_cleanly() -> None:
    fault = "systemd:serial-overflow-stall"
    assert not ex.judge("runc", "9.0", fault, ex.Outcome.BLOCKS).ok
    assert not ex.judge("runc", "9.0", fault, ex.Outcome.LEAKS).ok
    assert ex.judge("runc", "9.0", fault, ex.Outcome.FAILS_CLEANLY).ok
    assert ex.judge("runc", None, fault, ex.Outcome.SURVIVES).ok  # version unreadable


def test_an_intermittent_row_accepts_each_outcome_it_names() -> None:
    fault = "systemd:jobremoved-never-sent"
    row = ex.find("runc", "1.1.5", fault)
    assert row is not None
    assert row.outcomes == {ex.Outcome.FAILS_CLEANLY, ex.Outcome.BLOCKS}
    assert ex.judge("runc", "1.1.5", fault, ex.Outcome.BLOCKS).ok
    assert not ex.judge("runc", "1.1.5", fault, ex.Outcome.LEAKS).ok
