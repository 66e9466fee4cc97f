"""The one error of the systemd sandbox (its own module: every other module raises it)."""

from __future__ import annotations

__all__ = ["SandboxError"]


class SandboxError(RuntimeError):
    """The sandbox could not boot, or stopping it left something behind."""
