"""The package's public surface: light to import, every exported name resolves."""

from __future__ import annotations

import subprocess
import sys

import pytest_runtimefaults


def test_every_exported_name_resolves() -> None:
    for name in pytest_runtimefaults.__all__:
        assert getattr(pytest_runtimefaults, name) is not None, name


def test_importing_the_package_and_plugin_stays_light() -> None:
    # pyroute2, pystemd, grpc and jeepney load only in the fixtures that need them.
    code = (
        "import sys, pytest_runtimefaults, pytest_runtimefaults.plugin\n"
        "heavy = [m for m in ('pyroute2', 'pystemd', 'grpc', 'jeepney', 'containerd')"
        " if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]"
