"""containerd's events service (gRPC ``containerd.services.events.v1.Events``).

Each subscription is its own gRPC channel to containerd's socket and one
``Subscribe`` stream on it, so the daemon sees N separate clients, as it
would with N kubelets or N ``ctr events``.  The client is the ``containerd``
package on PyPI (containerd's generated Python stubs) over ``grpcio``: a
maintained, complete set of stubs for the exact API, so no protos are vendored
here; it needs ``protobuf<4`` (the stubs predate protobuf 4's generated code).

An event's key is namespace + topic + the exchange's timestamp (ns) + a digest
of the payload: every subscriber gets the same envelope for one broadcast.

A broken stream (containerd killed: ``UNAVAILABLE``) is a
:class:`~pytest_runtimefaults.subscribers.SubscriptionError` naming the status
code; a cancelled one ends quietly.

:meth:`ContainerdEvents.publish` posts an event through the same service
(``Events.Publish``): a cheap, real broadcast to prime a swarm.

Example::

    transport = ContainerdEvents(ctd.address)
    with Swarm(transport, subscribers=50, seed=1) as swarm:
        swarm.prime(transport.publish)
        ...  # ctr run --rm ...
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Callable, Sequence
from typing import Any

from pytest_runtimefaults.core.log import logger
from pytest_runtimefaults.subscribers import (
    Event,
    Subscription,
    SubscriptionError,
    ThreadedSubscription,
)

__all__ = ["MARKER_TOPIC", "ContainerdEvents", "require_client"]

MARKER_TOPIC = "/runtimefaults/marker"


def require_client() -> str | None:
    """None if the gRPC client imports, else why not (for a skip message)."""
    try:
        import grpc  # noqa: F401
        from containerd.services.events.v1 import events_pb2_grpc  # noqa: F401
    except Exception as exc:  # ImportError, or protobuf>=4 refusing old stubs
        logger.debug("containerd's gRPC client does not import", exc_info=True)
        return (
            f"containerd's gRPC client does not import ({exc}): "
            "pip install grpcio containerd 'protobuf<4'"
        )
    return None


class ContainerdEvents:
    """Subscribe to containerd's events over gRPC (see module doc).

    *address*: containerd's socket path; *filters*: containerd event filters
    (``topic~="/tasks/"``); *namespace*: used for :meth:`publish` only (a
    subscription sees every namespace).
    """

    def __init__(
        self,
        address: str,
        *,
        filters: Sequence[str] = (),
        namespace: str = "default",
        name: str = "containerd grpc",
    ) -> None:
        self.address = address
        self.filters = list(filters)
        self.namespace = namespace
        self.name = name
        self._marks = itertools.count(1)
        self._publisher: Any = None
        self._lock = threading.Lock()

    def _channel(self) -> Any:
        import grpc

        return grpc.insecure_channel(
            f"unix://{self.address}",
            options=[
                # A dead daemon should fail the call, not queue it until it is back.
                ("grpc.enable_retries", 0),
                # Without this, grpcio shares one connection among all channels to
                # the same socket: the daemon would see one client, not N.
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )

    def subscribe(self) -> Subscription:
        import grpc
        from containerd.services.events.v1 import events_pb2, events_pb2_grpc

        channel = self._channel()
        stub = events_pb2_grpc.EventsStub(channel)
        call = stub.Subscribe(events_pb2.SubscribeRequest(filters=self.filters))

        def pump(put: Callable[[Event], None], cancelled: Callable[[], bool]) -> None:
            try:
                for env in call:
                    ts = env.timestamp
                    digest = hashlib.blake2b(env.event.value, digest_size=6).hexdigest()
                    put(
                        Event(
                            key=f"{env.namespace}{env.topic}@{ts.seconds}.{ts.nanos:09d}#{digest}",
                            topic=env.topic,
                            data=env.event.type_url,
                        )
                    )
                if not cancelled():
                    raise SubscriptionError(f"containerd at {self.address} ended the stream")
            except grpc.RpcError as exc:
                if cancelled():
                    return
                code = exc.code() if hasattr(exc, "code") else None
                details = exc.details() if hasattr(exc, "details") else str(exc)
                raise SubscriptionError(
                    f"containerd at {self.address}: {getattr(code, 'name', code)}: {details}"
                ) from exc
            finally:
                channel.close()

        def cancel() -> None:
            call.cancel()

        return ThreadedSubscription(pump, on_cancel=cancel, name="containerd-events")

    def publish(self, topic: str = MARKER_TOPIC, label: str | None = None) -> None:
        """Broadcast one event through containerd (``Events.Publish``).

        The payload is a ``containerd.events.NamespaceUpdate`` (a type every
        containerd client decodes, ``ctr events`` included) whose labels carry
        a counter, so each marker is a distinct event.
        """
        from containerd.events import namespace_pb2
        from containerd.services.events.v1 import events_pb2, events_pb2_grpc
        from google.protobuf import any_pb2

        payload = namespace_pb2.NamespaceUpdate(
            name=self.namespace,
            labels={"runtimefaults.marker": label or str(next(self._marks))},
        )
        event = any_pb2.Any(
            type_url="containerd.events.NamespaceUpdate", value=payload.SerializeToString()
        )
        with self._lock:
            if self._publisher is None:
                self._publisher = self._channel()
            stub = events_pb2_grpc.EventsStub(self._publisher)
        stub.Publish(
            events_pb2.PublishRequest(topic=topic, event=event),
            metadata=(("containerd-namespace", self.namespace),),
            timeout=10,
        )

    def close(self) -> None:
        """Close the publishing channel (subscriptions close their own)."""
        with self._lock:
            if self._publisher is not None:
                self._publisher.close()
                self._publisher = None
