"""The systemd family through pytest: fixtures, options and their errors (pytester)."""

from __future__ import annotations

import shutil
import sys

import pytest

from pytest_runtimefaults import caps

pytestmark = [
    pytest.mark.needs("runc"),
    pytest.mark.timeout(120),
]

USES_FIXTURES = """
import pytest

def test_runtime_in_sandbox(runtime, oci_bundle, systemd, runtimefaults_faults, request):
    assert runtime.name == request.config.getoption("--runtimefaults-runtime")
    assert runtime.cgroup_driver == "systemd"
    assert runtime.sandbox is systemd
    steps = runtime.full_lifecycle(oci_bundle)
    assert all(r.ok for r in steps.values()), {k: r.stderr for k, r in steps.items()}
    assert "runtime" in runtimefaults_faults.probes
    assert runtimefaults_faults.probes["runtime"]() is True
    assert {"units:systemd", "processes:runtime"} <= set(runtimefaults_faults.leak_checks)
    for check in runtimefaults_faults.leak_checks.values():
        assert check.leaked() == set(), check.name

def test_make_oci_bundle(runtime, make_oci_bundle):
    bundle = make_oci_bundle(["/bin/echo", "from-bundle"])
    result = runtime.run("rf-echo", bundle)
    assert result.ok, result.stderr
    assert result.stdout.strip() == "from-bundle"
"""


@pytest.mark.parametrize("name", [r for r in ("runc", "crun") if shutil.which(r)])
def test_fixtures_run_the_chosen_runtime(pytester: pytest.Pytester, name: str) -> None:
    pytester.makepyfile(USES_FIXTURES)
    result = pytester.runpytest_subprocess(
        "-p", "runtimefaults", f"--runtimefaults-runtime={name}", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=2)


def test_runtime_by_path_and_cgroupfs_driver(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_it(runtime, oci_bundle):
            assert runtime.binary == "{}"
            assert runtime.cgroup_driver == "cgroupfs"
            assert runtime.root == "/run/rf-custom-root"
            assert runtime.lifecycle(oci_bundle).ok
        """.format(shutil.which("runc"))
    )
    result = pytester.runpytest_subprocess(
        "-p",
        "runtimefaults",
        f"--runtimefaults-runtime={shutil.which('runc')}",
        "--runtimefaults-cgroup-driver=cgroupfs",
        "--runtimefaults-runtime-root=/run/rf-custom-root",
    )
    result.assert_outcomes(passed=1)


def test_bad_cgroup_driver_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "--runtimefaults-cgroup-driver=v3"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--runtimefaults-cgroup-driver must be systemd or cgroupfs*"])


@pytest.mark.skipif(shutil.which("youki") is not None, reason="youki is installed here")
def test_missing_runtime_skips_with_the_package(pytester: pytest.Pytester) -> None:
    # A known runtime this host lacks is a skip; a path that does not exist is a
    # usage error (tests/plugin/test_runtime_option.py).
    pytester.makepyfile("def test_x(runtime): pass")
    result = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "--runtimefaults-runtime=youki", "-rs"
    )
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*OCI runtime 'youki' not found*"])
    strict = pytester.runpytest_subprocess(
        "-p",
        "runtimefaults",
        "--runtimefaults-runtime=youki",
        "--runtimefaults-strict",
    )
    strict.assert_outcomes(errors=1)


@pytest.mark.skipif(caps.systemd_is_pid1(), reason="this host runs systemd as PID 1")
def test_host_systemd_opt_in_skips_where_systemd_is_not_pid1(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(systemd): pass")
    result = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "--runtimefaults-host-systemd", "-rs"
    )
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*systemd is not PID 1 on this host*"])


def test_cli_boots_runs_a_command_and_checks_the_host(pytester: pytest.Pytester) -> None:
    result = pytester.run(
        sys.executable,
        "-m",
        "pytest_runtimefaults",
        "systemd",
        "--",
        "sh",
        "-c",
        "echo inside; ls /run/systemd/system && echo sd",
    )
    assert result.ret == 0, result.stderr.str()
    result.stdout.fnmatch_lines(
        ["systemd PID * booted in *", "inside", "sd", "host cgroup mounts: unchanged"]
    )


def test_runtime_goes_through_systemd_dbus_proxy_with_marker_rules(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.dbus_faults("Delay(0.5) reply_to=StartTransientUnit")
        @pytest.mark.recovers(within=10)
        def test_it(runtime, systemd_dbus_proxy, oci_bundle, runtimefaults_faults):
            assert runtime.dbus_address == systemd_dbus_proxy.address
            result = runtime.lifecycle(oci_bundle)
            assert result.ok, result.stderr
            assert result.extra["create"] >= 0.5
            assert [e for e in systemd_dbus_proxy.trace.entries() if e.fault]
            assert any("Delay" in r.name for r in runtimefaults_faults.active)
        """
    )
    result = pytester.runpytest_subprocess("-p", "runtimefaults", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_leak_checks_catch_a_container_left_behind(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.recovers(within=10)
        def test_leaky(runtime, oci_bundle):
            assert runtime.create("left-behind", oci_bundle).ok
            assert runtime.start("left-behind").ok

        @pytest.mark.recovers(within=10)
        def test_tidy(runtime, oci_bundle):
            assert runtime.lifecycle(oci_bundle).ok
        """
    )
    result = pytester.runpytest_subprocess("-p", "runtimefaults", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "units:systemd" in out
    assert "left-behind" in out
    assert "processes:runtime" in out


@pytest.mark.parametrize(
    "layout", ["unified"] if caps.cgroup_layout() == "v2" else ["unified", "legacy"]
)
def test_cgroup_layout_option_and_ini_key_choose_the_sandbox_layout(
    pytester: pytest.Pytester, layout: str
) -> None:
    pytester.makepyfile(
        f"""
        def test_it(systemd, runtime, oci_bundle):
            assert systemd.layout == "{layout}"
            assert runtime.lifecycle(oci_bundle).ok
        """
    )
    by_option = pytester.runpytest_subprocess(
        "-p", "runtimefaults", f"--runtimefaults-cgroup-layout={layout}"
    )
    by_option.assert_outcomes(passed=1)
    pytester.makeini(f"[pytest]\nruntimefaults_cgroup_layout = {layout}\n")
    by_ini = pytester.runpytest_subprocess("-p", "runtimefaults")
    by_ini.assert_outcomes(passed=1)


def test_bad_cgroup_layout_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "--runtimefaults-cgroup-layout=v3"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--runtimefaults-cgroup-layout=v3: cgroup layout must be auto, hybrid, legacy or *"]
    )


def test_cli_cgroup_layout_unified_boots_and_leaves_the_host_unchanged(
    pytester: pytest.Pytester,
) -> None:
    result = pytester.run(
        sys.executable,
        "-m",
        "pytest_runtimefaults",
        "systemd",
        "--cgroup-layout",
        "unified",
        "--",
        "sh",
        "-c",
        "stat -f -c %T /sys/fs/cgroup; busctl call org.freedesktop.systemd1 "
        "/org/freedesktop/systemd1 org.freedesktop.DBus.Properties Get ss "
        "org.freedesktop.systemd1.Manager Version",
    )
    assert result.ret == 0, result.stderr.str()
    result.stdout.fnmatch_lines(
        [
            "systemd PID * (layout unified), booted in *",
            "cgroup controllers: *",
            "cgroup2fs",
            'v s "*"',
            "host cgroup mounts: unchanged",
        ]
    )


@pytest.mark.skipif(
    caps.cgroup_layout() == "v2", reason="the unified sandbox may have controllers on v2"
)
def test_a_test_needing_controllers_the_layout_lacks_skips_or_fails_under_strict(
    pytester: pytest.Pytester,
) -> None:
    """On this hybrid host a unified sandbox has no controllers: skip naming it."""
    pytester.makepyfile(
        """
        from pytest_runtimefaults import caps

        def test_limits(request, systemd):
            caps.require_cgroup_controllers(
                request, {"memory"}, layout=systemd.layout, available=systemd.controllers
            )
        """
    )
    args = ("-p", "runtimefaults", "--runtimefaults-cgroup-layout=unified", "-rs")
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        ["*the unified systemd sandbox has no memory cgroup controller (it has: none*"]
    )
    strict = pytester.runpytest_subprocess(*args, "--runtimefaults-strict")
    strict.assert_outcomes(failed=1)
    strict.stdout.fnmatch_lines(["*runtimefaults strict mode: the unified systemd sandbox*"])
    hybrid = pytester.runpytest_subprocess("-p", "runtimefaults", "--runtimefaults-strict")
    hybrid.assert_outcomes(passed=1)
