"""The sockets scenarios (incident 3) come out differently with a different daemon.

``runtimefaults scenarios --only sockets --daemon CMD`` runs
the shipped scenarios against the test-only demo daemon of
:mod:`pytest_runtimefaults.sockets` under each of its bind policies: the
correct one survives a stale socket and refuses every look-alike (exit 0);
the naive one refuses a stale socket, its own after a SIGKILL included (the
Dragonfly crash-loop); the always-unlink one steals a live socket and
deletes a file (exit 1: new defects, no table row knows this daemon).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_runtimefaults.sockets import VARIANTS

pytestmark = [pytest.mark.timeout(240), pytest.mark.needs("root")]

SERVES = {"stale", "bind-mount"}


def _run(cwd: Path, policy: str) -> tuple[int, dict[str, str], str]:
    """Run the sockets family against the demo daemon; (exit, test id -> outcome, output)."""
    cmd = (
        f"{sys.executable} -m pytest_runtimefaults.sockets demo-daemon --policy {policy} {{socket}}"
    )
    r = subprocess.run(
        [sys.executable, "-m", "pytest_runtimefaults", "scenarios", "--only", "sockets",
         "--report", "r.json", "--daemon", cmd],
        capture_output=True, text=True, cwd=cwd, timeout=200,
    )  # fmt: skip
    tests = json.loads((cwd / "r.json").read_text())["tests"]
    outcomes = {}
    for test in tests:
        name = test["nodeid"].split("::")[-1]
        if name.startswith("test_containerd_restart_over_a_killed_shims_socket"):
            # containerd's own scenario: skipped when --daemon names another daemon
            assert test["outcome"] == "skipped", test
            continue
        assert test["outcome"] == "passed", test
        outcomes[name] = test["verdict"]["outcome"]
    return r.returncode, outcomes, r.stdout + r.stderr


def _variant(outcomes: dict[str, str], variant: str) -> str:
    (found,) = [o for n, o in outcomes.items() if n.endswith(f"-{variant}]") and "variant" in n]
    return found


def _sigkill(outcomes: dict[str, str]) -> str:
    (found,) = [o for n, o in outcomes.items() if n.startswith("test_daemon_sigkill")]
    return found


def test_a_correct_daemon_survives_and_refuses_cleanly(tmp_path: Path) -> None:
    rc, outcomes, out = _run(tmp_path, "correct")
    assert len(outcomes) == len(VARIANTS) + 1, out
    for variant in VARIANTS:
        wanted = "survives" if variant in SERVES else "fails_cleanly"
        assert _variant(outcomes, variant) == wanted, (variant, out)
    assert _sigkill(outcomes) == "fails_cleanly", out
    assert rc == 0, out


def test_a_naive_daemon_refuses_a_stale_socket(tmp_path: Path) -> None:
    rc, outcomes, out = _run(tmp_path, "naive")
    assert _variant(outcomes, "stale") == "misbehaves", out
    assert _sigkill(outcomes) == "misbehaves", out  # it cannot restart over its own socket
    assert _variant(outcomes, "directory") == "fails_cleanly", out
    assert rc == 1, out


def test_an_always_unlink_daemon_steals_and_deletes(tmp_path: Path) -> None:
    rc, outcomes, out = _run(tmp_path, "always-unlink")
    assert _variant(outcomes, "stale") == "survives", out
    assert _variant(outcomes, "live") == "misbehaves", out
    assert _variant(outcomes, "file") == "misbehaves", out
    assert rc == 1, out


def test_a_daemon_command_without_the_socket_is_a_usage_error(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pytest_runtimefaults", "scenarios", "--only", "sockets",
         "--report", "", "--", "--runtimefaults-daemon=mydaemon --listen /tmp/x.sock"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0
    assert "with {socket} where the socket path goes" in r.stdout + r.stderr
