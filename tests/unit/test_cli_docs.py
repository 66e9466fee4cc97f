"""docs/cli.md and the runtimefaults command agree, and every command answers --help."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_runtimefaults.__main__ import build_parser

CLI_MD = (Path(__file__).parents[2] / "docs" / "cli.md").read_text()


def _commands() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return set(sub.choices)  # type: ignore[arg-type]


def test_every_command_is_documented_and_every_documented_command_exists() -> None:
    documented = set(re.findall(r"^\| `runtimefaults (\w+)`", CLI_MD, re.M))
    assert documented == _commands()


@pytest.mark.parametrize("command", sorted(_commands()))
def test_help(command: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pytest_runtimefaults", command, "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert f"runtimefaults {command}" in r.stdout


def test_scenarios_list_collects_the_shipped_scenarios() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pytest_runtimefaults", "scenarios", "--list", "--report", ""],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "test_incident1_dbus_replies.py::test_lifecycles_survive" in r.stdout
    assert "test_stalled_systemd_fails_create_within_a_bound" in r.stdout


def test_the_proxy_help_names_every_rule_action() -> None:
    from pytest_runtimefaults.commands.dbus import RULE_HELP
    from pytest_runtimefaults.dbus.grammar import ACTIONS

    missing = [name for name in ACTIONS if f"{name}(" not in RULE_HELP]
    assert missing == [], f"runtimefaults proxy --help does not list {missing}"
