"""The four kinds of probe ``recovers`` accepts, each against something real."""

import os
import socket
import tempfile
import time

import pytest

SOCKET_DIR = tempfile.mkdtemp(prefix="rfprobe", dir="/tmp")
SOCKET = os.path.join(SOCKET_DIR, "api.sock")


@pytest.fixture(scope="module", autouse=True)
def api_socket():
    """A real listening Unix socket for the socket-path probe."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(SOCKET)
    server.listen(8)
    yield
    server.close()
    os.unlink(SOCKET)
    os.rmdir(SOCKET_DIR)


# 1. A Unix socket that must accept a connection (an absolute path or a Path).
@pytest.mark.recovers(within=5, probe=SOCKET)
def test_socket_probe():
    pass


# 2. A command that must exit 0 (a list of strings).
@pytest.mark.recovers(within=5, probe=["runc", "--version"])
def test_command_probe():
    pass


# 3. A callable: healthy unless it raises or returns False.
STARTED = []


def settled():
    return time.monotonic() - STARTED[0] > 0.05


@pytest.mark.recovers(within=5, probe=settled)
def test_callable_probe():
    STARTED.append(time.monotonic())


# 4. A probe a fixture registered by name (the runtime fixture registers "runtime").
@pytest.fixture
def service(runtimefaults_faults):
    runtimefaults_faults.add_probe("service", lambda: os.path.exists(SOCKET))


@pytest.mark.recovers(within=5, probe="service")
def test_registered_probe(service):
    pass
