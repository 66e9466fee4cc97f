"""Types of the compiled part of the D-Bus proxy's relay (_fastpath.c)."""

from array import array

from pytest_runtimefaults.dbus.wire import Message

def relay(src: int, dst: int, want_fds: bool, /) -> tuple[bytes, int, list[int], bool] | None: ...
def loop(
    epfd: int,
    wake_fd: int,
    table: array[int],
    gen: array[int],
    seen: int,
    limit: int,
    stamp: array[int],
    arena: bytearray,
    members: bytes,
    /,
) -> tuple[
    int,
    list[tuple[float | None, int, bytes]],
    tuple[int, bytes, int, list[int], bool, float | None] | None,
]: ...
def frame(data: bytes, cls: type[Message], /) -> tuple[list[Message], int, int]: ...
