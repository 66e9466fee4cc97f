"""scripts/distro's pure parts: releases, the archive URI, the cache, podman's argv.

The builds and runs themselves take minutes (debootstrap, a 1 GB rootfs, the
whole suite): they are exercised by `scripts/distro debian13|sid` (tox envs
debian13, sid; .ci/run with RUNTIMEFAULTS_MATRIX), not here.
"""

from __future__ import annotations

import datetime as dt
import importlib.machinery
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("rf_distro", str(REPO / "scripts" / "distro"))
    spec = importlib.util.spec_from_loader("rf_distro", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


distro = _load()

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian-security/20250520T000000Z
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm

Types: deb
URIs: http://archive.example/debian
  http://second.example/debian
Suites: bookworm bookworm-updates
Components: main
"""


def test_releases_and_their_default_layouts() -> None:
    assert distro.resolve_release("debian13") == ("trixie", "hybrid")
    assert distro.resolve_release("Bookworm") == ("bookworm", "hybrid")
    assert distro.resolve_release("sid") == ("sid", "unified")
    with pytest.raises(distro.DistroError, match=r"unknown release 'debian14': use one of"):
        distro.resolve_release("debian14")


def test_the_archive_uri_comes_from_apts_sources(tmp_path: Path) -> None:
    assert distro.mirror_from_deb822(DEB822) == "http://archive.example/debian"
    one_line = (
        "# deb http://old/ x main\ndeb [arch=amd64] http://one.example/debian/ bookworm main\n"
    )
    assert distro.mirror_from_one_line(one_line) == "http://one.example/debian/"
    sources = tmp_path / "debian.sources"
    sources.write_text(DEB822.replace("archive.example/debian", "archive.example/debian/"))
    assert distro.configured_mirror([sources]) == "http://archive.example/debian"
    with pytest.raises(distro.DistroError, match=r"no Debian archive URI found in .*--mirror"):
        distro.configured_mirror([tmp_path / "missing.sources"])


def test_the_package_list_is_shared_with_scripts_setup() -> None:
    pkgs = distro.read_packages()
    assert {"runc", "crun", "containerd", "podman", "systemd", "debootstrap"} <= set(pkgs)
    assert all(" " not in p and "#" not in p for p in pkgs)
    # scripts/setup reads the same file (with sed): the same list comes out.
    out = subprocess.run(
        ["bash", "-c", f"sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' {distro.PACKAGES_FILE}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == pkgs
    assert "scripts/debian-packages" in (REPO / "scripts" / "setup").read_text()


def _entry(cache: Path, name: str, complete: bool = True) -> Path:
    (cache / name / "rootfs").mkdir(parents=True)
    if complete:
        (cache / name / distro.STAMP).write_text("x\n")
    return cache / name


def test_cache_entries_fresh_stale_and_half_built(tmp_path: Path) -> None:
    today = dt.date(2026, 12, 1)
    _entry(tmp_path, "trixie-20261120")
    newest = _entry(tmp_path, "trixie-20261128")
    _entry(tmp_path, "trixie-20261130", complete=False)  # half-built: no stamp
    _entry(tmp_path, "sid-20261201")
    assert distro.entry_name("trixie", today) == "trixie-20261201"
    assert [p for _, p in distro.cached_entries(tmp_path, "trixie")] == [
        newest,
        tmp_path / "trixie-20261120",
    ]
    assert distro.fresh_entry(tmp_path, "trixie", today, max_age_days=7) == newest
    assert distro.fresh_entry(tmp_path, "trixie", today, max_age_days=2) is None  # stale
    assert distro.fresh_entry(tmp_path, "bookworm", today, max_age_days=7) is None


def test_leftover_build_dirs_of_dead_builders_only(tmp_path: Path) -> None:
    me = distro.process_start(distro.os.getpid())
    assert me is not None
    mine = tmp_path / distro.build_dir_name("sid", distro.os.getpid(), me)
    mine.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = tmp_path / distro.build_dir_name("sid", dead.pid, "1")
    gone.mkdir()
    # Our PID but another start time: a reused PID, so that builder is dead.
    reused = tmp_path / distro.build_dir_name("trixie", distro.os.getpid(), str(int(me) + 1))
    reused.mkdir()
    # A run's copy of the tree, left by a SIGKILLed run, goes the same way.
    run_left = tmp_path / f".run-sid-{dead.pid}-1"
    run_left.mkdir()
    assert sorted(distro.dead_build_dirs(tmp_path)) == sorted([gone, reused, run_left])


def test_remove_tree_refuses_a_tree_with_a_mount_below(tmp_path: Path) -> None:
    assert distro.mounts_under(tmp_path) == []
    (tmp_path / "a" / "b").mkdir(parents=True)
    distro.remove_tree(tmp_path / "a")
    assert not (tmp_path / "a").exists()
    # /proc is a mount point: removing a tree "at" it is refused before any unlink.
    with pytest.raises(distro.DistroError, match=r"not removing /proc: still mounted below it"):
        distro.remove_tree(Path("/proc"))


def test_podman_argv_follows_the_recipe(tmp_path: Path) -> None:
    argv = distro.podman_argv(
        storage=tmp_path / "podman",
        rootfs=tmp_path / "trixie-20261201" / "rootfs",
        layout="unified",
        command=[".venv/bin/pytest", "-x"],
        binds=[(tmp_path / "src", "/src")],
        env={"RUNTIMEFAULTS_SEED": "1"},
        name="n",
    )
    assert argv[:3] == ["podman", "--root", str(tmp_path / "podman" / "root")]
    for flag in (
        "--cgroup-manager=cgroupfs",
        "--events-backend=file",
        "--privileged",
        "--cgroupns=private",
        "--network=none",
        "nofile=20000:20000",
        "nproc=32768:32768",
    ):
        assert flag in argv
    assert argv[argv.index("--runtime") + 1] == "runc"
    # /run, /tmp and /var/tmp private to this run: two runs of one release share
    # the rootfs, and one's reaper took the other's journaled sockets for a dead run's.
    mounted = [argv[i + 1].split(":")[0] for i, a in enumerate(argv) if a == "--tmpfs"]
    assert mounted == ["/run", "/tmp", "/var/tmp"]
    # --rootfs last before the command: every flag after it would be the command.
    at = argv.index("--rootfs")
    assert argv[at + 1] == str(tmp_path / "trixie-20261201" / "rootfs")
    assert argv[at + 2 : at + 4] == ["/bin/sh", "-c"]
    script = argv[at + 4]
    assert script.startswith("touch /dev/console; umount -R /sys/fs/cgroup && mount -t cgroup2")
    assert argv[at + 5 :] == ["sh", ".venv/bin/pytest", "-x"]
    assert "--network" not in argv  # only the =none form: never the default network
    # Network state private: never /etc/containers/networks or /run/containers on the host.
    assert argv[argv.index("--network-config-dir") + 1] == str(tmp_path / "podman" / "networks")
    if distro.host_podman_major() == 4:
        assert argv[argv.index("--network-backend") + 1] == "cni"


def test_usage_errors_exit_2_with_a_message() -> None:
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "distro"), "debian99"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 2
    assert "unknown release 'debian99'" in res.stderr


def _ci_tree(tmp_path: Path, host_rc: int, distro_rcs: dict[str, int]) -> Path:
    """A copy of .ci/run beside stub setup/pytest/distro scripts that exit as told."""
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".ci" / "run").write_text((REPO / ".ci" / "run").read_text())
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "setup").write_text("exit 0\n")
    cases = "".join(f"  *' {r}') exit {rc} ;;\n" for r, rc in distro_rcs.items())
    distro_stub = tmp_path / "scripts" / "distro"
    distro_stub.write_text(
        f'#!/bin/sh\necho "distro $*" >> calls\ncase " $*" in\n{cases}esac\nexit 0\n'
    )
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    pytest_stub = tmp_path / ".venv" / "bin" / "pytest"
    pytest_stub.write_text(f"#!/bin/sh\necho host >> calls\nexit {host_rc}\n")
    for stub in (distro_stub, pytest_stub):
        stub.chmod(0o755)
    return tmp_path


def _ci(tree: Path, matrix: str | None, main: str | None = "") -> tuple[int, list[str], str]:
    """Run the copy of .ci/run; *matrix*/*main*: RUNTIMEFAULTS_MATRIX(_MAIN), None unset."""
    # What the calling run set must not leak into the stubs' view of .ci/run.
    unset = (
        "RUNTIMEFAULTS_MATRIX",
        "RUNTIMEFAULTS_MATRIX_MAIN",
        "PYTEST_ADDOPTS",
        "RUNTIMEFAULTS_FAULT_TABLE",
    )
    env = {k: v for k, v in distro.os.environ.items() if k not in unset}
    if matrix is not None:
        env["RUNTIMEFAULTS_MATRIX"] = matrix
    if main is not None:
        env["RUNTIMEFAULTS_MATRIX_MAIN"] = main
    res = subprocess.run(
        ["bash", str(tree / ".ci" / "run")], env=env, capture_output=True, text=True, check=False
    )
    calls = (tree / "calls").read_text().splitlines() if (tree / "calls").exists() else []
    return res.returncode, calls, res.stderr


def test_ci_runs_the_host_then_each_release_and_fails_if_any_fails(tmp_path: Path) -> None:
    tree = _ci_tree(tmp_path, 0, {"sid": 1})
    rc, calls, err = _ci(tree, "debian13,sid")
    assert rc == 1
    assert calls == [
        "host",
        "distro --results build/matrix/debian13 debian13",
        "distro --results build/matrix/sid sid",
    ]
    assert "CI: failed: sid (exit 1)" in err


def test_ci_keeps_the_host_runs_reports_and_runs_the_readme_command(tmp_path: Path) -> None:
    tree = _ci_tree(tmp_path, 0, {})
    stub = tree / ".venv" / "bin" / "pytest"
    stub.write_text(
        '#!/bin/sh\necho "host $* | $PYTEST_ADDOPTS | $RUNTIMEFAULTS_FAULT_TABLE" >> calls\n'
    )
    rc, calls, _err = _ci(tree, "")
    assert rc == 0
    # No argument: the README's command itself; the reports come through the environment.
    assert calls == [
        "host  | -o runtimefaults_report=build/matrix/host/runtimefaults.json "
        "--junitxml=build/matrix/host/junit.xml | build/matrix/host/fault-table.jsonl"
    ]
    assert (tree / "build" / "matrix" / "host").is_dir()


def test_ci_runs_the_main_job_after_the_suite_of_the_releases_it_names(tmp_path: Path) -> None:
    m = re.search(r"^RUNTIMEFAULTS_MATRIX_MAIN=\$\{RUNTIMEFAULTS_MATRIX_MAIN-([^}]*)\}$",
                  (REPO / ".ci" / "run").read_text(), re.MULTILINE)  # fmt: skip
    assert m is not None, "the main-job line of .ci/run changed shape"
    assert m.group(1) == "debian13,sid-hybrid"
    main_job = ".venv/bin/python -m pytest_runtimefaults scenarios"
    tree = _ci_tree(tmp_path, 0, {"scenarios": 1})  # every main job fails
    rc, calls, err = _ci(tree, "debian13,sid,sid-hybrid", main=None)  # the default
    assert rc == 1
    assert calls == [
        "host",
        "distro --results build/matrix/debian13 debian13",
        f"distro debian13 {main_job}",
        "distro --results build/matrix/sid sid",
        "distro --results build/matrix/sid-hybrid sid-hybrid",
        f"distro sid-hybrid {main_job}",
    ]
    assert "CI: failed: debian13 main job (exit 1) sid-hybrid main job (exit 1)" in err


@pytest.mark.parametrize(("host_rc", "distro_rc"), [(5, 0), (0, 5)])
def test_ci_fails_when_a_suite_collects_nothing(
    tmp_path: Path, host_rc: int, distro_rc: int
) -> None:
    tree = _ci_tree(tmp_path, host_rc, {"debian13": distro_rc})
    rc, _calls, err = _ci(tree, "debian13")
    assert rc == 1
    assert "collected no tests" in err


def test_ci_matrix_default_and_green_when_all_pass(tmp_path: Path) -> None:
    """The default is the one line ``RUNTIMEFAULTS_MATRIX=${RUNTIMEFAULTS_MATRIX-...}``."""

    m = re.search(r"^RUNTIMEFAULTS_MATRIX=\$\{RUNTIMEFAULTS_MATRIX-([^}]*)\}$",
                  (REPO / ".ci" / "run").read_text(), re.MULTILINE)  # fmt: skip
    assert m is not None, "the default line of .ci/run changed shape"
    default = [r for r in m.group(1).split(",") if r]
    tree = _ci_tree(tmp_path, 0, {})
    expected = ["host", *(f"distro --results build/matrix/{r} {r}" for r in default)]
    assert _ci(tree, None)[:2] == (0, expected)
    (tree / "calls").unlink()
    assert _ci(tree, "")[:2] == (0, ["host"])  # an empty variable turns it off
    (tree / "calls").unlink()
    assert _ci(tree, "debian13,sid")[:2] == (
        0,
        [
            "host",
            "distro --results build/matrix/debian13 debian13",
            "distro --results build/matrix/sid sid",
        ],
    )


def test_an_entry_made_from_another_pyproject_is_stale(tmp_path: Path) -> None:
    today = dt.date(2026, 12, 1)
    entry = _entry(tmp_path, "sid-20261201")
    here = distro.pyproject_hash()
    (entry / "build.json").write_text(distro.json.dumps({"pyproject_sha256": here}))
    assert distro.fresh_entry(tmp_path, "sid", today, 7, here) == entry
    (entry / "build.json").write_text(distro.json.dumps({"pyproject_sha256": "0" * 64}))
    assert distro.fresh_entry(tmp_path, "sid", today, 7, here) is None
    # made by an older scripts/distro, which recorded no hash: its venv may lack
    # a dependency added since (seen: inotify_simple), so it is stale too
    (entry / "build.json").write_text("{}")
    assert distro.fresh_entry(tmp_path, "sid", today, 7, here) is None
    (entry / "build.json").unlink()
    assert distro.fresh_entry(tmp_path, "sid", today, 7, here) is None


def test_an_entry_built_from_another_package_list_is_stale(tmp_path: Path) -> None:
    today = dt.date(2026, 12, 1)
    entry = _entry(tmp_path, "sid-20261201")
    here = distro.pyproject_hash()
    built = {
        "pyproject_sha256": here,
        "packages": ["runc", "crun"],
        "packages_missing_in_release": ["containernetworking-plugins"],
    }
    (entry / "build.json").write_text(distro.json.dumps(built))
    same = ["crun", "runc", "containernetworking-plugins"]
    assert distro.fresh_entry(tmp_path, "sid", today, 7, here, same) == entry
    # a package added to scripts/debian-packages (dbus-broker): its rootfs lacks it
    assert distro.fresh_entry(tmp_path, "sid", today, 7, here, [*same, "dbus-broker"]) is None
    # one taken out is stale too: the rootfs would test with more than the list says
    assert distro.fresh_entry(tmp_path, "sid", today, 7, here, ["runc"]) is None
    assert distro.fresh_entry(tmp_path, "sid", today, 7, here) == entry  # no list: not checked


def test_dbus_broker_goes_into_the_rootfs_only() -> None:
    # Debian's dbus-broker aliases itself to dbus.service: on the host that would
    # switch the system bus at the next boot, so only the rootfs gets it.
    assert "dbus-broker" in distro.ROOTFS_EXTRA
    assert "dbus-broker" not in distro.read_packages()


def test_every_ci_matrix_entry_is_a_release_scripts_distro_knows() -> None:
    m = re.search(r"^RUNTIMEFAULTS_MATRIX=\$\{RUNTIMEFAULTS_MATRIX-([^}]*)\}$",
                  (REPO / ".ci" / "run").read_text(), re.MULTILINE)  # fmt: skip
    assert m is not None
    for name in filter(None, m.group(1).split(",")):
        assert name in distro.RELEASES, name
    # the dbus-broker entry runs the systemd and D-Bus families on the other bus
    assert distro.DEFAULT_ARGS["debian13-broker"] == [
        "--runtimefaults-bus-daemon=dbus-broker",
        "tests/system/systemd",
        "tests/system/dbus",
    ]


def test_the_host_reports_options_do_not_break_a_nested_run_without_the_plugin(
    tmp_path: Path,
) -> None:
    # The suite's nested pytest runs inherit .ci/run's PYTEST_ADDOPTS; one with -p
    # no:runtimefaults refused --runtimefaults-report (a CI run failed on it).
    m = re.search(r'PYTEST_ADDOPTS="\$\{PYTEST_ADDOPTS:\+\$PYTEST_ADDOPTS \}([^"]+)"',
                  (REPO / ".ci" / "run").read_text())  # fmt: skip
    assert m is not None, "the host step of .ci/run changed shape"
    env = {**distro.os.environ, "PYTEST_ADDOPTS": m.group(1)}
    for plugin in (["-p", "no:runtimefaults"], []):
        res = subprocess.run(
            [sys.executable, "-m", "pytest", *plugin, "--markers"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=60,
            check=False,
        )
        assert res.returncode == 0, (plugin, res.stderr[-2000:])
        assert "@pytest.mark.skip" in res.stdout
