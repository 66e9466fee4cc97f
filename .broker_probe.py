"""Probe: what dbus-broker's per-user accounting does with low limits (not a test)."""
import time
from pytest_runtimefaults.systemd import SystemdSandbox
from pytest_runtimefaults.dbus.limits import _connect, set_limit

def probe(sd, label, n=300):
    held, err = [], None
    for i in range(n):
        c, e = _connect(sd.bus_address, 5)
        if c is None:
            err = e; break
        held.append(c)
    print(f"{label}: {len(held)} connections opened, then: {err}", flush=True)
    for c in held: c.close()
    time.sleep(0.3)

with SystemdSandbox(bus_daemon="dbus-broker") as sd:
    conf = sd.workdir / "bus.conf"
    orig = conf.read_text()
    probe(sd, "defaults")
    for limits in ({"max_connections_per_user": 8},
                   {"max_connections_per_user": 8, "max_outgoing_unix_fds": 1},
                   {"max_connections_per_user": 1, "max_outgoing_unix_fds": 4},
                   {"max_connections_per_user": 1, "max_outgoing_bytes": 20000}):
        t = orig
        for k, v in limits.items(): t = set_limit(t, k, v)
        conf.write_text(t)
        sd.restart_bus()
        probe(sd, f"{limits} after restart")
    print("bus log:", sd.bus_log()[-1500:])
