"""Parallel ``podman network create`` / ``rm`` / ``run`` on netavark (podman
issues 7807, 7808, 9472, 9041): :class:`~pytest_runtimefaults.cni.NetworkChurn`.

The first tests need no podman: :func:`classify` on the error texts of the
upstream issues and of podman 4.3/5, and the seeded schedule.  The rest run
the real podman with ``--network-backend netavark`` in the harness's own
network namespace (host checked unchanged after every test): the churn is
judged against the expectations table (``cni:network-churn``), and it makes
a susceptible reader of the network dir (list, then open each file without
handling ENOENT, as podman's old libpod did) fail while a correct one
(podman's own ``netavark.lock``, shared) never does.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from findings import judged
from netavark_host import host_unchanged_fixture  # noqa: F401 - autouse: pytest finds it here

from pytest_runtimefaults.cni import (
    NetavarkDir,
    NetavarkPodman,
    NetworkChurn,
    classify,
    error_line,
    validate_network,
)

pytestmark = pytest.mark.timeout(240)

root_only = pytest.mark.needs("root")

FAULT = "cni:network-churn"


# --- the clients of the network dir that the churn judges ---------------------


def list_then_open(conf_dir: Path) -> dict[str, Any]:
    """A susceptible reader, as podman's old libpod read its CNI dir: list the
    directory, then read and parse each file, with no lock and no handling
    of a file that vanished (ENOENT) or is being written.  The pause stands
    for the per-file parsing and validation libpod did between the two."""
    nets = {}
    for path in sorted(conf_dir.glob("*.json")):
        time.sleep(0.002)
        net = json.loads(path.read_bytes())
        nets[net["name"]] = net
    return nets


def locked_reader(podman: NetavarkPodman, sizes: list[int]) -> Callable[[Path], dict[str, Any]]:
    """A correct reader: takes podman's own network lock shared (an fcntl
    lock, as podman's lockfile is; :attr:`NetavarkPodman.network_lock`), so no
    create or remove is half done while it reads; a vanished file is skipped
    anyway, and a file that is not a whole network is an error (it must never
    be seen under the lock).  Appends the number of networks read to *sizes*."""

    def read(conf_dir: Path) -> dict[str, Any]:
        lock = podman.network_lock
        nets: dict[str, Any] = {}
        fd = os.open(lock, os.O_RDONLY)  # missing: FileNotFoundError, a failure
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH)
            for path in sorted(conf_dir.glob("*.json")):
                time.sleep(0.002)  # the same pause as the susceptible reader
                try:
                    data = path.read_bytes()
                except FileNotFoundError:
                    continue
                why = validate_network(data, path.name)
                if why is not None:
                    raise ValueError(f"{path.name} read under {lock}: {why}")
                net, _ = json.JSONDecoder().raw_decode(data.decode())
                nets[net["name"]] = net
        finally:
            os.close(fd)  # closing releases the fcntl lock
        sizes.append(len(nets))
        return nets

    return read


# --- classify and the schedule (no podman) -------------------------------------

CONF = "/etc/cni/net.d"


@pytest.mark.parametrize(
    ("kind", "rc", "stderr", "contended", "expected"),
    [
        # podman 7807 / 9041: ENOENT on another network's file, in create and rm
        (
            "create",
            125,
            f"Error: in {CONF}/testNetTwoCNI2.conflist: error reading {CONF}/testNetTwoCNI2"
            f".conflist: open {CONF}/testNetTwoCNI2.conflist: no such file or directory",
            False,
            ("race", "enoent"),
        ),
        # podman 7808: run right after a create that returned
        (
            "run",
            127,
            'Error: error configuring network namespace for container 8efd: CNI network "t" '
            "not found",
            False,
            ("race", "not-found"),
        ),
        # podman 4.3/5 on a name another worker removed: a correct refusal
        (
            "run",
            125,
            "Error: unable to find network with name or ID b: network not found",
            True,
            ("refused", "not-found"),
        ),
        (
            "rm",
            1,
            "Error: unable to find network with name or ID b: network not found",
            True,
            ("refused", "not-found"),
        ),
        (
            "create",
            125,
            "Error: network name b already used: network already exists",
            True,
            ("refused", "exists"),
        ),
        (
            "create",
            125,
            "Error: network name b already used: network already exists",
            False,
            ("race", "exists"),
        ),
        (
            "rm",
            2,
            'level=error msg="Joining network namespace ... failed to Statfs \\"/run/netns/x'
            '\\": no such file or directory"\nError: "b" has associated containers with it. '
            "Use -f to forcibly delete containers and pods: network is being used",
            True,
            ("refused", "in-use"),
        ),
        (
            "run",
            126,
            "Error: netavark: IPAM error: failed to allocate address",
            True,
            ("race", "ipam"),
        ),
        ("ls", 0, "", False, ("ok", "")),
        ("run", None, "", False, ("timeout", "timeout")),
        ("run", 126, "Error: OCI runtime error: boom", True, ("other", "other")),
    ],
)
def test_classify_tells_the_race_from_a_refusal(
    kind: str, rc: int | None, stderr: str, contended: bool, expected: tuple[str, str]
) -> None:
    assert classify(kind, rc, error_line(stderr), contended=contended, conf_dir=CONF) == expected


def test_error_line_is_the_error_not_a_log_before_it() -> None:
    stderr = 'time="x" level=error msg="a log"\nError: the reason\n'
    assert error_line(stderr) == "Error: the reason"
    assert error_line("only this\n\n") == "only this"
    assert error_line("") == ""


def _roles(churn: NetworkChurn) -> list[list[tuple[str, str]]]:
    """The plan with names replaced by their role, so two churns compare."""
    role = {n: f"own{i}" for i, n in enumerate(churn.owned)}
    role |= {n: f"stable{i}" for i, n in enumerate(churn.stable)}
    role |= {n: f"shared{i}" for i, n in enumerate(churn.shared)}
    role[""] = ""
    return [[(kind, role[name]) for kind, name in row] for row in churn.plan]


def test_the_schedule_is_seeded_and_toggles_each_own_network() -> None:
    podman = NetavarkPodman(NetavarkDir())  # not started: the plan needs no podman
    a = NetworkChurn(podman, workers=3, rounds=12, seed=7)
    b = NetworkChurn(podman, workers=3, rounds=12, seed=7)
    c = NetworkChurn(podman, workers=3, rounds=12, seed=8)
    assert _roles(a) == _roles(b)
    assert _roles(a) != _roles(c)
    assert len(a.plan) == 12
    assert all(len(row) == 3 for row in a.plan)
    for own in a.owned:
        toggles = [kind for row in a.plan for kind, name in row if name == own and kind != "run"]
        assert toggles == ["create", "rm"] * (len(toggles) // 2) + ["create"] * (len(toggles) % 2)
    assert {k for row in a.plan for k, _ in row} <= {"create", "rm", "run", "ls"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"workers": 0}, "workers >= 1"),
        ({"stable": 0}, "stable >= 1"),
        ({"mix": {"own": 1, "nope": 1}}, "use the kinds"),
        ({"mix": {"own": 0}}, "at least one above 0"),
    ],
)
def test_bad_churn_arguments_say_what_to_do(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NetworkChurn(NetavarkPodman(NetavarkDir()), **kwargs)


# --- the real podman + netavark ----------------------------------------------------


@root_only
def test_podman_netavark_network_churn(
    podman_netavark: NetavarkPodman,
    netavark_network_churn: Callable[..., NetworkChurn],
    record_property: Any,
) -> None:
    """4 workers x 10 rounds of create/rm/run/ls on owned, stable and shared
    names: every outcome is a success or a correct refusal, and podman's
    view, the files, containers, links and firewall agree afterwards."""
    started = time.monotonic()
    churn = netavark_network_churn(workers=4, rounds=10).wait()
    problems = churn.check_state()
    observed = churn.outcome(problems)
    record_property("ops", len(churn.ops))
    record_property("ops_per_second", round(churn.ops_per_second, 1))
    record_property("categories", dict(churn.by_category()))
    record_property("seconds", round(time.monotonic() - started, 2))
    assert len(churn.ops) == 40, churn.report()
    # The contended names were contended: some refusals, which are correct.
    assert churn.by_category()["ok"] > 0, churn.report()
    verdict = judged(
        record_property, "podman", FAULT, observed, f"{churn.report(10)}\nstate: {problems}"
    )
    assert verdict.ok, verdict.message


@root_only
def test_churn_breaks_a_list_then_open_reader_not_a_locked_one(
    podman_netavark: NetavarkPodman,
    netavark_network_churn: Callable[..., NetworkChurn],
    record_property: Any,
) -> None:
    """The susceptible reader meets a vanished (ENOENT) or half-written file;
    the reader that takes podman's netavark.lock never does."""
    sizes: list[int] = []
    # Mostly creates and removes, so the files come and go; the churn goes on
    # (at most 200 rounds or 30 s) until the susceptible reader has failed
    # 3 times in at least 8 rounds: 1-4 times per 40 commands were measured.
    churn = netavark_network_churn(
        workers=3,
        rounds=200,
        duration=30,
        mix={"own": 3, "ls": 1},
        readers={
            "list-then-open": list_then_open,
            "locked": locked_reader(podman_netavark, sizes),
        },
        until=lambda c: c.rounds_run >= 8 and c.readers["list-then-open"].failed >= 3,
    ).wait()
    record_property("rounds", churn.rounds_run)
    assert len(churn.ops) == 3 * churn.rounds_run  # whole rounds only
    assert churn.rounds_run >= 8, churn.report()
    naive, locked = churn.readers["list-then-open"], churn.readers["locked"]
    record_property("naive", f"{naive.failed}/{naive.calls} {dict(naive.failures)}")
    record_property("locked", f"{locked.failed}/{locked.calls}")
    assert naive.calls > 10, churn.report()
    assert locked.calls > 10, churn.report()
    assert max(sizes) > 0, "the locked reader never read a network"
    assert naive.failed > 0, churn.report()
    assert set(naive.failures) <= {"FileNotFoundError", "JSONDecodeError"}, churn.report()
    assert locked.failed == 0, churn.report()
    assert churn.check_state() == [], churn.report()


@root_only
def test_churn_cleans_up_every_network_it_made(
    netavark_dir: NetavarkDir, podman_netavark: NetavarkPodman
) -> None:
    with NetworkChurn(podman_netavark, workers=2, rounds=3, seed=5, mix={"own": 1}) as churn:
        churn.wait()
        assert {p.stem for p in netavark_dir.files()} >= set(churn.stable)
    assert [p.name for p in netavark_dir.files()] == []
    assert churn.rounds_run == 3
    assert [op.category for op in churn.ops] == ["ok"] * 6, churn.report()


@root_only
def test_podman_waits_for_the_network_lock_the_correct_reader_takes(
    netavark_dir: NetavarkDir, podman_netavark: NetavarkPodman
) -> None:
    """The lock the correct reader takes is the one podman serialises its
    network changes with, shared by every call of the harness (podman 5: a
    private /run/lock per call would let this create through at once)."""
    assert podman_netavark.podman("network", "ls").returncode == 0
    lock = podman_netavark.network_lock
    assert lock.exists(), lock
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        with ThreadPoolExecutor(1) as pool:
            create = pool.submit(podman_netavark.podman, "network", "create", "rfchlk")
            time.sleep(1.5)
            assert not create.done(), create.result().stderr
            os.close(fd)  # releases the lock
            fd = -1
            assert create.result().returncode == 0, create.result().stderr
    finally:
        if fd >= 0:
            os.close(fd)
    assert [p.stem for p in netavark_dir.files()] == ["rfchlk"]


@root_only
def test_a_worker_that_fails_ends_the_churn_with_its_error(
    podman_netavark: NetavarkPodman, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that raises (here: building its command) must not leave the
    others waiting at the barrier: wait() raises its error at once."""
    from pytest_runtimefaults.core.fault import FaultThreadError

    churn = NetworkChurn(podman_netavark, workers=3, rounds=4, seed=2).start()

    def broken(*args: str) -> list[str]:
        raise OSError("no podman today")

    monkeypatch.setattr(podman_netavark, "argv", broken)
    started = time.monotonic()
    try:
        with pytest.raises(FaultThreadError, match="a worker failed") as caught:
            churn.wait(60)
        assert "no podman today" in repr(caught.value.__cause__.__cause__)
        assert time.monotonic() - started < 30
    finally:
        monkeypatch.undo()
        churn.stop()
