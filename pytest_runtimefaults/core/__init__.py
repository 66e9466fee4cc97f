"""The plugin's core: the one :class:`Fault` shape, the threaded-fault base and logging.

Every fault of every family implements :class:`~pytest_runtimefaults.core.fault.Fault`
and reaches a test's registry one way: ``registry.register(fault)``.
"""

from __future__ import annotations

from pytest_runtimefaults.core.fault import Fault, FaultBase, ThreadedFault
from pytest_runtimefaults.core.log import logger, swallowed

__all__ = ["Fault", "FaultBase", "ThreadedFault", "logger", "swallowed"]
