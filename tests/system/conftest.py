"""Every test under ``tests/system/`` runs real binaries as root.

So each one gets ``@pytest.mark.needs("root")`` here, and a file adds only what
else it needs (``@pytest.mark.needs("runc")``).  The marker is applied in a hook
because ``pytestmark`` in a conftest applies to nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees every item of the session, not only those below this directory.
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.needs("root"))
