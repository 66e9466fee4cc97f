"""The journal trusts nothing it reads: crafted journals, hostile state dirs, bad lines.

Reaping kills processes, deletes paths, unmounts and removes namespaces, so a
record is acted on only if it names something this project made.  Each test
here writes a crafted journal of a dead owner into a private state directory,
runs ``runtimefaults cleanup`` as a real subprocess, and checks that the
victim is still there and that the output says why it was refused.  The
attacker scenario runs a second, real uid (``os.setuid`` in a subprocess).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_runtimefaults import naming
from pytest_runtimefaults.host import proc
from pytest_runtimefaults.journal import (
    REAPERS,
    Journal,
    StateDirError,
    _reaper_for,
    reap_dead_owners,
    register_reaper,
)

pytestmark = pytest.mark.timeout(120)

CLI = [sys.executable, "-m", "pytest_runtimefaults"]


def _dead_pid() -> int:
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


def _dead_journal(state: Path) -> Journal:
    """A journal whose owner is dead: the next reap replays it."""
    state.mkdir(mode=0o700, exist_ok=True)
    return Journal(state, owner_pid=_dead_pid())


def _cleanup(state: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "cleanup", f"--state-dir={state}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


@pytest.fixture
def victims() -> Iterator[Callable[..., Path]]:
    """Make directories with a file in them, outside pytest's tmp_path; removed after."""
    made: list[Path] = []

    def make(where: str, prefix: str = "victim") -> Path:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=where))
        (path / "precious").write_text("x")
        made.append(path)
        return path

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


# --- paths ------------------------------------------------------------------------


def _case_var_tmp(v: Callable[..., Path], cwd: Path) -> tuple[str, Path]:
    # Issue 11: "a crafted entry deleted /var/tmp/...".  Even an rf name is not enough.
    victim = v("/var/tmp")
    inner = victim / "rfdata"
    inner.mkdir()
    (inner / "precious").write_text("x")
    return str(inner), inner


def _case_empty(v: Callable[..., Path], cwd: Path) -> tuple[str, Path]:
    # Issue 11: `path: ""` emptied the current directory of whoever ran cleanup.
    (cwd / "precious").write_text("x")
    return "", cwd


def _case_relative(v: Callable[..., Path], cwd: Path) -> tuple[str, Path]:
    (cwd / "rfrel").mkdir()
    (cwd / "rfrel" / "precious").write_text("x")
    return "rfrel", cwd / "rfrel"


def _case_tmp_not_ours(v: Callable[..., Path], cwd: Path) -> tuple[str, Path]:
    victim = v("/tmp")  # named victim*, not rf*
    return str(victim), victim


def _case_symlinked_parent(v: Callable[..., Path], cwd: Path) -> tuple[str, Path]:
    outside = v("/var/tmp")
    (outside / "rfvictim").mkdir()
    (outside / "rfvictim" / "precious").write_text("x")
    link = v("/tmp", "rflinkparent") / "rfto"  # removed after, like the victims
    link.symlink_to(outside)
    return str(link / "rfvictim"), outside / "rfvictim"


def _case_dotdot(v: Callable[..., Path], cwd: Path) -> tuple[str, Path]:
    victim = v("/var/tmp")
    return f"/tmp/rfx/../..{victim}", victim


def _case_state_dir(v: Callable[..., Path], cwd: Path) -> tuple[str, Path]:
    # Set by the test below: the journal directory being reaped, named by a record.
    return "STATE", Path("STATE")


def _case_other_uid(v: Callable[..., Path], cwd: Path) -> tuple[str, Path]:
    victim = v("/tmp", "rfforeign")  # the project's prefix, another user's directory
    os.chown(victim, 65534, 65534)
    return str(victim), victim


PATH_CASES = {
    "under /var/tmp": _case_var_tmp,
    "empty path": _case_empty,
    "relative path": _case_relative,
    "/tmp, not the project's prefix": _case_tmp_not_ours,
    "parent is a symlink out of /tmp": _case_symlinked_parent,
    "not normalised (..)": _case_dotdot,
    "owned by another uid": _case_other_uid,
    "the state directory itself": _case_state_dir,
}


@pytest.mark.parametrize("case", PATH_CASES, ids=list(PATH_CASES))
def test_a_crafted_path_entry_is_refused(
    case: str, tmp_path: Path, victims: Callable[..., Path]
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    text, victim = PATH_CASES[case](victims, cwd)
    if text == "STATE":
        # An rf-named state directory below /tmp: only its being the journal's own saves it.
        state_dir = Path(victims("/tmp", "rfstate"))
        text, victim = str(state_dir), state_dir
    else:
        state_dir = tmp_path / "state"
    legit = Path(tempfile.mkdtemp(prefix="rflegit", dir="/tmp"))
    try:
        journal = _dead_journal(state_dir)
        journal.add("path", path=text)
        journal.add("path", path=str(legit))  # newest: reaped first
        done = _cleanup(state_dir, cwd=cwd)
        print(done.stdout)
        assert (victim / "precious").exists(), f"cleanup deleted {victim}: {done.stdout}"
        assert "refused to reap path" in done.stdout, done.stdout
        assert done.returncode == 1, "a refusal is an error: exit 1"
        # The same journal's own directory was reaped: trust is per record.
        assert not legit.exists(), done.stdout
    finally:
        shutil.rmtree(legit, ignore_errors=True)


def test_a_dry_run_shows_the_refusal(tmp_path: Path, victims: Callable[..., Path]) -> None:
    victim = victims("/var/tmp")
    _dead_journal(tmp_path / "state").add("path", path=str(victim))
    done = _cleanup(tmp_path / "state", "--dry-run")
    assert "refused to reap path" in done.stdout, done.stdout
    assert "would reap" not in done.stdout, done.stdout


# --- cgroups, mounts, netns, links --------------------------------------------------


def test_a_cgroup_entry_must_be_below_a_cgroup_mount_and_carry_the_prefix(
    tmp_path: Path,
) -> None:
    hierarchy = next(
        (
            Path(m)
            for m in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup")
            if Path(m, "cgroup.procs").exists()
        ),
        None,
    )
    if hierarchy is None:
        pytest.skip("no writable cgroup hierarchy")
    parent = hierarchy / naming.unique_name("rftrust")
    not_ours = parent / "victim"
    not_cgroup = Path(tempfile.mkdtemp(prefix="rfnotcg", dir="/tmp"))
    (not_cgroup / "sub").mkdir()
    not_ours.mkdir(parents=True)
    try:
        journal = _dead_journal(tmp_path / "state")
        journal.add("cgroup", path=str(not_ours))
        journal.add("cgroup", path=str(not_cgroup))
        done = _cleanup(tmp_path / "state")
        assert not_ours.is_dir(), "a cgroup without the project's prefix was removed"
        assert (not_cgroup / "sub").is_dir(), "a directory outside cgroupfs was rmdir'ed"
        assert done.stdout.count("refused to reap cgroup") == 2, done.stdout
        assert "not a cgroup below a cgroup mount" in done.stdout
        assert "not a name this project makes" in done.stdout
    finally:
        for d in (not_ours, parent):
            if d.is_dir():
                d.rmdir()
        shutil.rmtree(not_cgroup, ignore_errors=True)


def test_a_cgroup_tree_entry_with_an_empty_parent_is_refused(tmp_path: Path) -> None:
    """cni's reaper kills every task below ``/<parent>``: "" would be the whole host."""
    journal = _dead_journal(tmp_path / "state")
    journal.add("cgroup-tree", parent="")
    result = reap_dead_owners(tmp_path / "state", dry_run=True)
    assert result.reaped == []
    assert "is not a cgroup this project makes" in result.errors[0]


def test_a_mount_entry_is_undone_only_for_a_mount_the_project_makes(tmp_path: Path) -> None:
    """In a private mount namespace: a tmpfs not of ours stays mounted, one of ours goes."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare not found (apt-get install util-linux)")
    script = tmp_path / "mounts.py"
    base = Path(tempfile.mkdtemp(prefix="mnt", dir="/tmp"))  # not a name of ours
    script.write_text(
        textwrap.dedent(
            f"""
            import os, subprocess
            from pytest_runtimefaults.journal import Journal, reap_dead_owners
            from pytest_runtimefaults.leaks import mount_table
            ours, theirs = {str(base / "rfmine")!r}, {str(base / "users")!r}
            for d in (ours, theirs):
                os.makedirs(d)
                subprocess.run(["mount", "-t", "tmpfs", "none", d], check=True)
            dead = subprocess.Popen(["true"]); dead.wait()
            os.makedirs({str(tmp_path / "state")!r}, mode=0o700)
            j = Journal({str(tmp_path / "state")!r}, owner_pid=dead.pid)
            j.add("mount", target=theirs)
            j.add("mount", target="/")
            j.add("mount", target=ours)
            result = reap_dead_owners({str(tmp_path / "state")!r})
            targets = {{m.target for m in mount_table()}}
            print(ours in targets, theirs in targets, "/" in targets, len(result.errors))
            """
        )
    )
    try:
        done = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.split() == ["False", "True", "True", "2"], done.stdout
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_netns_and_link_entries_need_the_projects_names(tmp_path: Path) -> None:
    foreign = f"xv{naming.process_tag()}{os.getpid() % 1000}"
    ours = naming.unique_name("rftr")
    subprocess.run(["ip", "netns", "add", foreign], check=True)
    subprocess.run(["ip", "netns", "add", ours], check=True)
    try:
        subprocess.run(
            ["ip", "-n", ours, "link", "add", "xveth0", "type", "veth", "peer", "name", "xveth1"],
            check=True,
        )
        journal = _dead_journal(tmp_path / "state")
        journal.add("netns", name=foreign)
        journal.add("link", name="xveth0", netns=ours)
        journal.add("link", name="lo")
        done = _cleanup(tmp_path / "state")
        assert done.stdout.count("refused to reap") == 3, done.stdout
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert foreign in listed, "a namespace without the project's prefix was deleted"
        links = subprocess.run(
            ["ip", "-n", ours, "-o", "link"], capture_output=True, text=True
        ).stdout
        assert "xveth0" in links, "a link without the project's prefix was deleted"
    finally:
        for name in (foreign, ours):
            subprocess.run(["ip", "netns", "delete", name], check=False)


# --- processes -------------------------------------------------------------------


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive(pid):
            return True
        time.sleep(0.02)
    return False


def test_a_process_running_another_command_is_not_killed(tmp_path: Path) -> None:
    """Same PID and start time but not the recorded command line: not ours any more."""
    victim = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        journal = _dead_journal(tmp_path / "state")
        journal.add(
            "process",
            pid=victim.pid,
            starttime=proc.starttime(victim.pid),
            cmdline=["sleep", "299"],
        )
        done = _cleanup(tmp_path / "state")
        assert "now runs ['sleep', '300']" in done.stdout, done.stdout
        time.sleep(0.2)
        assert victim.poll() is None, "a process that is not ours was killed"
    finally:
        victim.kill()
        victim.wait()


def test_a_process_that_is_ours_is_killed(tmp_path: Path) -> None:
    """The control: recorded by add_process, still the same, it is reaped."""
    victim = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        _dead_journal(tmp_path / "state").add_process(victim.pid)
        done = _cleanup(tmp_path / "state")
        assert done.returncode == 0, done.stdout
        assert victim.wait(timeout=10) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()


@pytest.mark.parametrize("execs", ["recorded", "another"])
def test_a_shell_that_execs_its_recorded_command_is_killed(tmp_path: Path, execs: str) -> None:
    """The sandbox's launcher on cgroup v2: ``sh -c '...; exec unshare ...'``, recorded
    before its exec, outside any cgroup of ours by the time it is reaped.  Known by
    the command it was recorded to exec (``then``); any other exec is refused."""
    then = ["sleep", "301"]
    run = then if execs == "recorded" else ["sleep", "302"]
    go_read, go = os.pipe()
    victim = subprocess.Popen(
        ["/bin/sh", "-c", f"read line; exec {' '.join(run)}"], stdin=go_read, start_new_session=True
    )
    os.close(go_read)
    try:
        _dead_journal(tmp_path / "state").add_process(victim.pid, then=then)
        os.write(go, b"go\n")
        deadline = time.monotonic() + 5
        while proc.cmdline(victim.pid) != run and time.monotonic() < deadline:
            time.sleep(0.01)
        done = _cleanup(tmp_path / "state")
        if execs == "recorded":
            assert done.returncode == 0, done.stdout
            assert victim.wait(timeout=10) == -signal.SIGKILL
        else:
            assert "now runs ['sleep', '302']" in done.stdout, done.stdout
            time.sleep(0.2)
            assert victim.poll() is None, "a process that exec'd something else was killed"
    finally:
        os.close(go)
        if victim.poll() is None:
            victim.kill()
            victim.wait()


def test_pid_1_is_never_killed(tmp_path: Path) -> None:
    journal = _dead_journal(tmp_path / "state")
    journal.add("process", pid=1, starttime=proc.starttime(1), cmdline=proc.cmdline(1))
    result = reap_dead_owners(tmp_path / "state")
    assert result.reaped == []
    assert "PID 1 or an ancestor" in result.errors[0]


def test_the_reapers_own_ancestor_is_never_killed(tmp_path: Path) -> None:
    """A parent journals itself (exactly: PID, start time, command line), then runs
    cleanup as its child; it must survive."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    parent = textwrap.dedent(
        f"""
        import os, subprocess, sys
        from pytest_runtimefaults.journal import Journal
        j = Journal({str(state)!r}, owner_pid={_dead_pid()})
        j.add_process(os.getpid())
        done = subprocess.run([sys.executable, "-m", "pytest_runtimefaults", "cleanup",
                               "--state-dir={state}"], capture_output=True, text=True)
        print(done.stdout)
        print("survived")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", parent], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"the reaper killed its parent: {done.returncode}"
    assert "survived" in done.stdout
    assert "PID 1 or an ancestor of this process" in done.stdout, done.stdout


# --- malformed lines ---------------------------------------------------------------

BAD_LINES = [b'{"op": "add"}', b"[1, 2]", b"\xff\xfe not utf-8", b'{"op": "add", "id": "1"}']


def _journal_with_bad_lines(state: Path) -> tuple[Path, Path]:
    legit = Path(tempfile.mkdtemp(prefix="rfbadlines", dir="/tmp"))
    journal = _dead_journal(state)
    journal.add("path", path=str(legit))
    with open(journal.path, "ab") as f:
        for line in BAD_LINES:
            f.write(line + b"\n")
    return journal.path, legit


def test_malformed_lines_are_skipped_with_a_warning_naming_file_and_line(tmp_path: Path) -> None:
    path, legit = _journal_with_bad_lines(tmp_path / "state")
    try:
        done = _cleanup(tmp_path / "state")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        for number in (2, 3, 4, 5):
            assert f"warning: {path}:{number}: skipped a malformed journal line" in done.stdout
        assert "not UTF-8" in done.stdout
        assert "a JSON list" in done.stdout
        assert not legit.exists(), "the journal's good line was not reaped"
    finally:
        shutil.rmtree(legit, ignore_errors=True)


def test_malformed_lines_do_not_break_doctor(tmp_path: Path) -> None:
    path, legit = _journal_with_bad_lines(tmp_path / "state")
    try:
        done = subprocess.run(
            [*CLI, "doctor"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "RUNTIMEFAULTS_STATE_DIR": str(tmp_path / "state")},
        )
        assert "Traceback" not in done.stderr, done.stderr
        assert f"warning: {path}:2: skipped a malformed journal line" in done.stdout
        assert "1 resource(s) left by 1 killed run(s)" in done.stdout, done.stdout
        assert legit.exists(), "doctor only looks"
    finally:
        shutil.rmtree(legit, ignore_errors=True)


def test_malformed_lines_do_not_break_a_pytest_run(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    _path, legit = _journal_with_bad_lines(tmp_path / "state")
    try:
        pytester.makepyfile(test_fine="def test_fine():\n    pass\n")
        result = pytester.runpytest_subprocess(
            "-p", "runtimefaults", f"--runtimefaults-state-dir={tmp_path / 'state'}"
        )
        assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
        result.assert_outcomes(passed=1, warnings=1)
        result.stdout.fnmatch_lines(["*reaped 1 resource(s)*skipped a malformed journal line*"])
    finally:
        shutil.rmtree(legit, ignore_errors=True)


# --- the state directory -------------------------------------------------------------


def test_a_state_dir_others_can_write_is_refused(
    tmp_path: Path, victims: Callable[..., Path], pytester: pytest.Pytester
) -> None:
    state = tmp_path / "shared"
    victim = victims("/tmp")
    _dead_journal(state).add("path", path=str(victim))
    os.chmod(state, 0o777)
    done = _cleanup(state)
    assert done.returncode == 2, done.stdout
    assert f"chmod 700 {state}" in done.stdout, done.stdout
    assert victim.exists()
    with pytest.raises(StateDirError, match="mode 0777"):
        Journal(state).add("path", path="/tmp/rfx")
    pytester.makepyfile(test_fine="def test_fine():\n    pass\n")
    result = pytester.runpytest_subprocess(
        "-p", "runtimefaults", f"--runtimefaults-state-dir={state}"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*journal directory*has mode 0777*"])


ATTACKER = """
import json, os, subprocess, sys
os.setgid(65534); os.setuid(65534)
state = sys.argv[1]
os.mkdir(state, 0o777); os.chmod(state, 0o777)
dead = subprocess.Popen(["true"]); dead.wait()
with open(os.path.join(state, f"{dead.pid}-1-1.jsonl"), "w") as f:
    f.write(json.dumps({"op": "add", "id": 1, "kind": "path", "path": sys.argv[2]}) + "\\n")
os.chmod(os.path.join(state, f"{dead.pid}-1-1.jsonl"), 0o666)
"""

VICTIM = """
import os, sys
from pytest_runtimefaults.commands import core
from pytest_runtimefaults import journal
uid = int(sys.argv[1])
os.setgid(uid); os.setuid(uid)
for key in ("RUNTIMEFAULTS_STATE_DIR", "XDG_RUNTIME_DIR"):
    os.environ.pop(key, None)
print("state dir:", journal.default_state_dir())
try:
    journal.Journal.default().add("path", path="/tmp/rfmine")
    print("journal written")
except journal.StateDirError as exc:
    print("journal refused:", exc)
import argparse
sys.exit(core._cleanup(argparse.Namespace(state_dir=None, dry_run=False)))
"""


def test_a_second_user_cannot_plant_a_journal_for_a_non_root_user(tmp_path: Path) -> None:
    """uid 65534 pre-creates the victim's predictable ``/tmp/runtimefaults-UID`` (0777)
    with a journal naming the victim's directory; the victim's cleanup must refuse."""
    victim_uid = 65533
    state = Path(f"/tmp/runtimefaults-{victim_uid}")
    if state.exists():
        pytest.skip(f"{state} exists already: not ours to remove")
    precious = Path(tempfile.mkdtemp(prefix="rfvictimdata", dir="/tmp"))
    (precious / "thesis.tex").write_text("x")
    os.chown(precious, victim_uid, victim_uid)
    os.chown(precious / "thesis.tex", victim_uid, victim_uid)
    try:
        subprocess.run(
            [sys.executable, "-c", ATTACKER, str(state), str(precious)], check=True, timeout=60
        )
        assert state.stat().st_uid == 65534
        done = subprocess.run(
            [sys.executable, "-c", VICTIM, str(victim_uid)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        print(done.stdout, done.stderr)
        assert (precious / "thesis.tex").exists(), (
            "the attacker's journal deleted the victim's file"
        )
        assert f"state dir: {state}" in done.stdout
        assert "journal refused: journal directory" in done.stdout
        assert "belongs to uid 65534" in done.stdout
        assert done.returncode == 2
        assert not [p for p in state.iterdir() if p.stat().st_uid == victim_uid], (
            "the victim wrote its journal into the attacker's directory"
        )
    finally:
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(precious, ignore_errors=True)


# --- the reaper table -------------------------------------------------------------------


def test_every_kind_in_the_reaper_table_resolves_without_import_side_effects() -> None:
    code = (
        "from pytest_runtimefaults.journal import REAPERS, _reaper_for\n"
        "import sys\n"
        "print(sorted(k for k in REAPERS if not callable(_reaper_for(k))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
    assert set(REAPERS) >= {"process", "path", "mount", "netns", "link", "cgroup", "daemon"}


def test_register_reaper_still_works_for_a_kind_of_your_own(tmp_path: Path) -> None:
    seen: list[dict[str, object]] = []
    register_reaper("test-own-kind", seen.append)
    assert _reaper_for("test-own-kind") is not None
    _dead_journal(tmp_path / "state").add("test-own-kind", thing=1)
    result = reap_dead_owners(tmp_path / "state")
    assert [r["thing"] for r in seen] == [1], result


def test_the_journal_file_is_not_written_through_a_planted_symlink(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    journal = Journal(state)
    target = tmp_path / "elsewhere"
    journal.path.symlink_to(target)
    with pytest.raises(OSError):
        journal.add("path", path="/tmp/rfx")
    assert not target.exists()


# --- kinds reaped by other modules ------------------------------------------------------


@pytest.mark.parametrize("directory", ["/", "/tmp", "/var/tmp/rfctd-x", "relative/rfctd-x"])
def test_a_containerd_entry_for_a_directory_not_of_ours_is_refused(
    directory: str, tmp_path: Path
) -> None:
    """The containerd reaper kills every process naming its directory: ``/`` would be all."""
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        _dead_journal(tmp_path / "state").add("containerd", dir=directory, namespace="")
        result = reap_dead_owners(tmp_path / "state")
        assert result.reaped == []
        assert "refused to reap containerd" in result.errors[0], result.errors
        time.sleep(0.2)
        assert bystander.poll() is None, "the containerd reaper killed a bystander"
    finally:
        bystander.kill()
        bystander.wait()


def test_a_containerd_entry_for_a_users_directory_is_reaped_but_kept(tmp_path: Path) -> None:
    """A directory the user gave (not a name of ours) holding the config.toml a
    Containerd writes is recognisably ours: its processes go, the directory stays."""
    from pytest_runtimefaults.containerd import Containerd

    users = tmp_path / "my-containerd"
    ctd = Containerd(directory=users, journal=_dead_journal(tmp_path / "state"))
    ctd.prepare()  # writes config.toml and journals the directory (never started)
    shim = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)", str(users / "containerd.sock")]
    )
    try:
        # Popen returns once execve began; /proc/PID/cmdline is empty for a moment
        # after (seen in the Debian 13 run): the reaper finds shims by their argv.
        deadline = time.monotonic() + 5
        while str(users) not in " ".join(proc.cmdline(shim.pid) or []):
            assert time.monotonic() < deadline, "the stand-in shim never showed its argv"
            time.sleep(0.01)
        result = reap_dead_owners(tmp_path / "state")
        assert result.errors == [], result.errors
        assert shim.wait(timeout=10) == -signal.SIGKILL
        assert (users / "config.toml").exists(), "the user's directory was removed"
    finally:
        if shim.poll() is None:
            shim.kill()
            shim.wait()


def test_a_daemon_entry_whose_pid_runs_another_command_is_refused(tmp_path: Path) -> None:
    """The daemon reaper kills a whole session: only while the leader is still the daemon."""
    leader = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        _dead_journal(tmp_path / "state").add(
            "daemon",
            name="containerd",
            pid=leader.pid,
            starttime=proc.starttime(leader.pid),
            cmdline=["containerd", "--config", "/tmp/rfctd-x/config.toml"],
        )
        result = reap_dead_owners(tmp_path / "state")
        assert "now runs ['sleep', '300']" in result.errors[0], result.errors
        time.sleep(0.2)
        assert leader.poll() is None, "a session that is not ours was killed"
    finally:
        leader.kill()
        leader.wait()
