"""The runtime under test, in a real systemd: the OCI lifecycle, and nothing left behind."""


def test_lifecycle_leaves_no_scope(runtime, oci_bundle, systemd):
    inspector = systemd.inspector()
    before = inspector.scopes_and_slices()

    assert runtime.create("web", oci_bundle).ok
    assert runtime.state("web").json()["status"] == "created"
    # With the systemd cgroup driver the container lives in a transient scope.
    assert any("web" in u.name for u in inspector.leftovers(before))
    assert runtime.start("web").ok
    assert runtime.kill("web", "KILL").ok
    deleted = runtime.delete("web", force=True)
    assert deleted.ok, deleted.stderr
    print(f"delete took {deleted.duration:.3f} s")

    assert inspector.wait_gone({u.name for u in inspector.leftovers(before)}) == set()


def test_run_gives_output_and_exit_code(runtime, make_oci_bundle):
    bundle = make_oci_bundle(["/bin/sh", "-c", "echo hello; exit 3"])
    result = runtime.run("hello", bundle)
    assert result.returncode == 3
    assert result.stdout.strip() == "hello"
