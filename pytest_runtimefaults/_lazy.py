"""Lazy re-exports for a package (PEP 562), from one table of its modules' names.

A leaf module: it imports nothing of the package, so a package's
``__init__`` may use it and still load none of its own modules.

Example (in a package's ``__init__.py``)::

    _MODULES = {"faults": ("HalfWritten", "RenamedInto"), "inotify": ("InotifyInstancesHeld",)}
    _LAZY, __getattr__, __dir__ = lazy_exports(__name__, _MODULES)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, modules: Mapping[str, tuple[str, ...]]
) -> tuple[dict[str, str], Callable[[str], Any], Callable[[], list[str]]]:
    """The name -> module table of *modules* (submodule -> names) of *package*,
    and the package's ``__getattr__`` and ``__dir__``: a name is imported from
    its module when first used, then kept on the package."""
    table = {name: f"{package}.{module}" for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return table, __getattr__, __dir__
