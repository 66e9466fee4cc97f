"""The shipped fault scenarios: pytest tests that ``runtimefaults scenarios`` runs.

They are the main job of a fresh installation and a template for your own
tests: each reproduces an incident of the catalogue (docs/incidents.md)
against a real runtime, with the embedded defaults (a sandboxed systemd with
its own dbus-daemon, the D-Bus fault proxy, runc), and asserts what
"recovered" means.  A runtime defect that the scenario exposes is an
``xfail(strict=True)`` naming the defect, so the job stays green while the
defect is there and turns red once it is fixed (time to drop the xfail).

Run them with ``runtimefaults scenarios`` (or ``pytest -p runtimefaults
--pyargs pytest_runtimefaults.scenarios``).
"""
