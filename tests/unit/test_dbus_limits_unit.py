"""The pure parts of pytest_runtimefaults.dbus.limits: config text and argument checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_runtimefaults.dbus.limits import CapError, ConnectBacklogFull, ConnectionCap, set_limit

CONF = '<busconfig>\n  <limit name="max_connections_per_user">9</limit>\n</busconfig>'


def test_set_limit_replaces_an_existing_limit() -> None:
    out = set_limit(CONF, "max_connections_per_user", 3)
    assert out.count("max_connections_per_user") == 1
    assert '<limit name="max_connections_per_user">3</limit>' in out


def test_set_limit_adds_a_missing_limit_last() -> None:
    out = set_limit(CONF, "max_outgoing_unix_fds", 1)
    assert out.endswith('  <limit name="max_outgoing_unix_fds">1</limit>\n</busconfig>')
    assert '">9<' in out


@pytest.mark.parametrize(
    ("config", "name", "error"),
    [("<x/>", "max_connections_per_user", "no </busconfig>"), (CONF, "max x", "not a bus limit")],
)
def test_set_limit_refuses_what_it_cannot_write(config: str, name: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        set_limit(config, name, 3)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_per_user": 0}, "max_per_user must be an int >= 1"),
        ({"max_per_user": 4, "leave": 4}, r"leave must be an int in \[0, max_per_user\)"),
        ({"max_per_user": 4, "leave": -1}, "leave must be"),
    ],
)
def test_connection_cap_checks_its_arguments(kwargs: dict[str, int], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        ConnectionCap("bus.conf", "unix:path=/nonexistent", **kwargs)


def test_connection_cap_of_something_without_a_config(tmp_path: Path) -> None:
    with pytest.raises(CapError, match="no bus configuration of ours"):
        ConnectionCap.of(object(), max_per_user=4)


@pytest.mark.parametrize("duration", [0, -1.0])
def test_backlog_full_needs_a_positive_duration(duration: float) -> None:
    with pytest.raises(ValueError, match="duration must be > 0 seconds"):
        ConnectBacklogFull(object(), duration=duration)  # type: ignore[arg-type]
