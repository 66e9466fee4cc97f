"""Sub-commands of the systemd family."""

from __future__ import annotations

from typing import Any


def register(subparsers: Any) -> None:
    """No sub-commands yet."""
