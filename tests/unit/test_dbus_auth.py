"""The SASL relay finds where each direction's handshake ends, however it is chunked."""

from __future__ import annotations

import pytest

from pytest_runtimefaults.dbus.auth import AuthError, SaslRelay

HELLO = b"l\x01\x00\x01" + b"\x00" * 12  # only the first bytes of a message matter here


def test_sd_bus_pipelined_handshake_and_first_message() -> None:
    relay = SaslRelay()
    text, binary = relay.client_data(
        b"\0AUTH EXTERNAL 30\r\nNEGOTIATE_UNIX_FD\r\nBEGIN\r\n" + HELLO
    )
    assert text.endswith(b"BEGIN\r\n")
    assert binary == HELLO
    assert relay.client_done
    assert not relay.server_done
    text, binary = relay.server_data(b"OK 1234\r\nAGREE_UNIX_FD\r\n" + b"l\x02")
    assert text == b"OK 1234\r\nAGREE_UNIX_FD\r\n"
    assert binary == b"l\x02"
    assert relay.server_done
    assert relay.unix_fds_agreed
    assert relay.authenticated
    assert relay.mechanisms == ["EXTERNAL"]


def test_byte_by_byte_with_data_exchange() -> None:
    relay = SaslRelay()
    client = b"\0AUTH EXTERNAL\r\nDATA\r\nBEGIN\r\n"
    server = [b"DATA\r\n", b"OK abc\r\n"]
    forwarded = b""
    for i in range(len(b"\0AUTH EXTERNAL\r\n")):
        forwarded += relay.client_data(client[i : i + 1])[0]
    for ch in server[0]:
        assert relay.server_data(bytes([ch]))[1] == b""
    rest = client[len(b"\0AUTH EXTERNAL\r\n") :]
    _text, binary = relay.client_data(rest)
    assert binary == b""
    assert relay.client_done
    _text, binary = relay.server_data(server[1] + HELLO)
    assert binary == HELLO
    assert relay.server_done


def test_rejected_then_retry() -> None:
    relay = SaslRelay()
    relay.client_data(b"\0AUTH\r\n")
    assert relay.server_data(b"REJECTED EXTERNAL ANONYMOUS\r\n")[1] == b""
    relay.client_data(b"AUTH ANONYMOUS\r\nBEGIN\r\n")
    assert not relay.server_done
    assert relay.server_data(b"OK 1\r\n" + HELLO)[1] == HELLO


def test_missing_nul_byte_is_an_error() -> None:
    with pytest.raises(AuthError, match="NUL credentials byte"):
        SaslRelay().client_data(b"AUTH EXTERNAL 30\r\n")


def test_line_without_cr_is_an_error() -> None:
    with pytest.raises(AuthError, match="does not end with"):
        SaslRelay().client_data(b"\0AUTH EXTERNAL 30\n")


def test_unsolicited_server_line_is_an_error() -> None:
    with pytest.raises(AuthError, match="no client command"):
        SaslRelay().server_data(b"OK 1\r\n")


def test_runaway_line_is_an_error() -> None:
    relay = SaslRelay()
    with pytest.raises(AuthError, match="longer than"):
        relay.client_data(b"\0AUTH " + b"A" * 20000)
