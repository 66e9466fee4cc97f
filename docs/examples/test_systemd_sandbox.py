"""The sandboxed systemd itself: its bus, commands inside it, leftovers found and reset."""

import subprocess


def test_transient_units_are_found_and_reset(systemd):
    inspector = systemd.inspector()
    baseline = inspector.scopes_and_slices()
    assert inspector.system_state() == "running"

    # Commands that hand PIDs to systemd must run in its namespaces.
    systemd.run(["systemd-run", "--unit=flaky", "/bin/false"], check=True)
    held = subprocess.Popen(
        systemd.command(["systemd-run", "--scope", "--slice=left", "sleep", "30"]),
        stdout=subprocess.DEVNULL,
    )
    try:
        names = set()
        for _ in range(100):
            names = {u.name for u in inspector.leftovers(baseline)}
            if "flaky.service" in names and "left.slice" in names:
                break
            subprocess.run(["sleep", "0.05"])
        assert {"flaky.service", "left.slice"} <= names
        for name in names:
            inspector.reset(name)
        assert inspector.wait_gone(names) == set()
    finally:
        held.kill()
        held.wait()
