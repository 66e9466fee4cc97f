"""Every fixture, marker, option and ini key the plugin declares is in docs/."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = "\n".join(p.read_text() for p in (Path(__file__).parents[2] / "docs").rglob("*.md"))


def _pytest_output(tmp_path: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "runtimefaults", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    return result.stdout


def test_every_fixture_is_documented(tmp_path: Path) -> None:
    out = _pytest_output(tmp_path, "--fixtures", "-v")
    names = set()
    for line in out.splitlines():
        m = re.match(r"^(\w+)(?: \[\w+ scope\])?(?: --)? \S*pytest_runtimefaults/", line)
        if m:
            names.add(m.group(1))
    assert len(names) > 20, out[-2000:]
    missing = sorted(n for n in names if f"`{n}`" not in DOCS)
    assert missing == [], f"fixtures not in docs/: {missing}"


def test_every_option_and_ini_key_is_documented(tmp_path: Path) -> None:
    out = _pytest_output(tmp_path, "--help")
    options = set(re.findall(r"(--runtimefaults-[\w-]+)", out))
    inis = set(re.findall(r"^\s+(runtimefaults_\w+)", out, re.M))
    assert len(options) > 10
    assert len(inis) > 5
    missing = sorted(n for n in options | inis if n not in DOCS)
    assert missing == [], f"options or ini keys not in docs/: {missing}"


def test_every_marker_is_documented(tmp_path: Path) -> None:
    marks = re.compile(r"^@pytest\.mark\.(\w+)", re.M)
    with_plugin = set(marks.findall(_pytest_output(tmp_path, "--markers")))
    without = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:runtimefaults", "--markers"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    ).stdout
    ours = with_plugin - set(marks.findall(without))
    assert {"recovers", "failure_budget", "dbus_faults"} <= ours
    missing = sorted(m for m in ours if f"mark.{m}" not in DOCS)
    assert missing == [], f"markers not in docs/: {missing}"


@pytest.mark.parametrize(
    "module",
    [
        "plugin",
        "fixtures.dbus",
        "fixtures.systemd",
        "fixtures.recovery",
        "fixtures.sockets",
        "fixtures.cni",
        "fixtures.subscribers",
    ],
)
def test_fixture_modules_have_docstrings(module: str) -> None:
    import importlib

    mod = importlib.import_module(f"pytest_runtimefaults.{module}")
    assert mod.__doc__
    assert len(mod.__doc__) > 40
