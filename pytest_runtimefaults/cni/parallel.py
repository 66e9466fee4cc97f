"""N concurrent CNI ADDs (and DELs) of one network, as a busy node does.

Example::

    ops = ParallelAdds(sandbox, cni.bridge(), n=20)
    results = ops.add_all()                 # a CniResult or the error, per ADD
    assert len(set(ops.addresses())) == 20
    assert ops.delete_all() == [None] * 20
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from pytest_runtimefaults import naming

if TYPE_CHECKING:
    from pytest_runtimefaults.netns import CniResult, CniSandbox, NetNS

__all__ = ["ParallelAdds"]


class ParallelAdds:
    """N concurrent ADDs (and then DELs) of one network.

    Each ADD gets its own container namespace in *sandbox*; :meth:`add_all`
    runs them on N threads at once and returns the results in order (an
    ``Exception`` in place of a failed ADD's result); :meth:`delete_all`
    removes them the same way and returns each DEL's error or None.
    """

    def __init__(self, sandbox: CniSandbox, conflist: Mapping[str, Any], n: int = 20) -> None:
        self.sandbox = sandbox
        self.conflist = conflist
        self.n = n
        self.ids = [naming.unique_name("rfid", maxlen=40) for _ in range(n)]
        self.namespaces: list[NetNS] = []
        self.results: list[CniResult | Exception] = []

    def add_all(self) -> list[CniResult | Exception]:
        self.namespaces = [self.sandbox.container(cid) for cid in self.ids]
        with ThreadPoolExecutor(self.n) as pool:
            futures = [
                pool.submit(self.sandbox.add, self.conflist, ns, container_id=cid)
                for ns, cid in zip(self.namespaces, self.ids, strict=True)
            ]
            self.results = [_outcome(f) for f in futures]
        return self.results

    def delete_all(self) -> list[Exception | None]:
        with ThreadPoolExecutor(self.n) as pool:
            futures = [
                pool.submit(self.sandbox.delete, self.conflist, ns, container_id=cid)
                for ns, cid in zip(self.namespaces, self.ids, strict=True)
            ]
            errors = [_error(f) for f in futures]
        for ns in self.namespaces:
            self.sandbox.remove_container(ns)
        return errors

    @property
    def added(self) -> bool:
        """Whether any of the container namespaces still exists (not yet deleted)."""
        return any(ns.path.exists() for ns in self.namespaces)

    def addresses(self) -> list[str]:
        from pytest_runtimefaults.netns import CniResult

        return [ip for r in self.results if isinstance(r, CniResult) for ip in r.ips]


def _error(future: Future[Any]) -> Exception | None:
    """The error a call raised (None if it returned); anything else than an
    ``Exception`` (KeyboardInterrupt...) propagates."""
    error = future.exception()
    if error is None or isinstance(error, Exception):
        return error
    raise error


def _outcome(future: Future[Any]) -> Any:
    """A call's result, or the ``Exception`` it raised in its place."""
    error = _error(future)
    return future.result() if error is None else error
