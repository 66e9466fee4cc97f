"""The package's public surface: light to import, every exported name resolves."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys

import pytest

#: the packages that re-export their modules' names
PACKAGES = [
    "pytest_runtimefaults",
    "pytest_runtimefaults.cni",
    "pytest_runtimefaults.systemd",
    "pytest_runtimefaults.transports",
]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_resolves(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"
        # ``from package import name`` is what users write: the same object.
        scope: dict[str, object] = {}
        exec(f"from {package} import {name} as _imported", scope)
        assert scope["_imported"] is getattr(module, name), f"{package}.{name}"


@pytest.mark.parametrize("package", PACKAGES[1:])
def test_every_public_class_of_a_family_module_is_exported_by_its_package(package: str) -> None:
    # A fault or a transport added to a module but not to its package's table
    # is only importable by its module path (issue 16: RenamedInto, EventStorm,
    # InotifyInstancesHeld, CriEvents... were).
    module = importlib.import_module(package)
    missing = []
    for info in pkgutil.iter_modules(module.__path__):
        sub = importlib.import_module(f"{package}.{info.name}")
        for name in getattr(sub, "__all__", ()):
            value = getattr(sub, name)
            defined_here = inspect.isclass(value) and value.__module__ == sub.__name__
            if defined_here and (name not in module.__all__ or getattr(module, name) is not value):
                missing.append(f"{sub.__name__}.{name}")
    assert missing == [], f"not exported by {package}: {missing}"


def test_importing_the_package_and_plugin_stays_light() -> None:
    # pyroute2, pystemd, grpc and jeepney load only in the fixtures that need them;
    # the transports package's table loads none of its transports.
    code = (
        "import sys, pytest_runtimefaults, pytest_runtimefaults.plugin\n"
        "import pytest_runtimefaults.transports\n"
        "heavy = [m for m in ('pyroute2', 'pystemd', 'grpc', 'jeepney', 'containerd')"
        " if m in sys.modules]\n"
        "heavy += [m for m in sys.modules if m.startswith('pytest_runtimefaults.transports.')]\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]"


def test_every_top_level_name_is_in_the_references_row() -> None:
    # docs/reference.md's "Library API" table lists the top-level names in one row;
    # a name exported but not listed there is undocumented.
    from pathlib import Path

    import pytest_runtimefaults

    reference = Path(__file__).resolve().parents[2] / "docs" / "reference.md"
    row = next(
        line
        for line in reference.read_text().splitlines()
        if line.startswith("| `pytest_runtimefaults` (the top level")
    )
    missing = [
        n for n in pytest_runtimefaults.__all__ if n != "__version__" and f"`{n}`" not in row
    ]
    assert missing == [], f"top-level names missing from docs/reference.md: {missing}"
