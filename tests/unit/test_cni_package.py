"""The cni package's shape: old names importable, one Fault shape, threads that
must stop, the CRI message subset on the wire, one reaper, nothing swallowed
silently.  Plain files in a temp dir: no root, no plugins, seconds."""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_runtimefaults import cni
from pytest_runtimefaults.cni import (
    CniDir,
    DeleteRecreate,
    HalfWritten,
    HeldHalfWritten,
    RacingWriter,
    TornWriteWatcher,
    validate_config,
)
from pytest_runtimefaults.core import Fault
from pytest_runtimefaults.core.fault import FaultThreadError

PACKAGE = Path(cni.__file__).parent
FIXTURES = PACKAGE.parent / "fixtures" / "cni.py"

#: every public name of the old single-module cni.py
OLD_NAMES = [
    "BROKEN_MODES",
    "CGROUP_ROOT",
    "CONFIG_SUFFIXES",
    "IN_CLOEXEC",
    "IN_CLOSE_WRITE",
    "IN_CREATE",
    "IN_DELETE",
    "IN_MODIFY",
    "IN_MOVED_FROM",
    "IN_MOVED_TO",
    "IN_NONBLOCK",
    "IN_Q_OVERFLOW",
    "BrokenMode",
    "CniDir",
    "CniPodman",
    "CriNetworkStatus",
    "CriPod",
    "CriPods",
    "DeleteRecreate",
    "HalfWritten",
    "HeldHalfWritten",
    "ParallelAdds",
    "RacingWriter",
    "TornWrite",
    "TornWriteWatcher",
    "broken_bytes",
    "busybox_rootfs",
    "containerd_in_sandbox",
    "cri_network_status",
    "decode_protobuf",
    "kill_cgroup_tree",
    "next_subnet",
    "private_state_argv",
    "validate_config",
    "wait_cri_network",
    "whole_files",
    "write_atomic",
]

#: names added since: the file faults' directory protocol, podman's netavark
#: backend, the reload races and the inotify fault
NEW_NAMES = [
    "ConfDirSwap",
    "ConfigDir",
    "EventStorm",
    "InotifyInstancesHeld",
    "RenamedInto",
    "inotify_instances",
    "NETAVARK_SUFFIXES",
    "NetavarkDir",
    "NetavarkPodman",
    "find_netavark",
    "host_network_state",
    "netavark_network",
    "netavark_state_argv",
    "validate_network",
    # the netavark create/remove races (cni/churn.py)
    "ChurnOp",
    "NetworkChurn",
    "ReaderTally",
    "classify",
    "error_line",
]

CONF = {"cniVersion": "1.0.0", "name": "n", "type": "bridge"}


@pytest.fixture
def cni_tmp(tmp_path: Path) -> Iterator[CniDir]:
    with CniDir(tmp_path) as d:
        yield d


def test_every_old_name_is_importable_from_the_package() -> None:
    for name in OLD_NAMES:
        assert getattr(cni, name) is not None, name
    assert sorted(cni.__all__) == sorted(OLD_NAMES + NEW_NAMES)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        cni.nothing  # noqa: B018


def test_importing_the_package_loads_none_of_its_modules() -> None:
    code = (
        "import sys, pytest_runtimefaults.cni\n"
        "print(sorted(m for m in sys.modules if m.startswith('pytest_runtimefaults.cni.')"
        " or m.split('.')[0] in ('grpc', 'inotify_simple') or m.startswith('google.protobuf')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_the_cgroup_tree_reaper_is_in_the_journals_table_and_nowhere_else() -> None:
    # Resolved from the table in a fresh process that imported nothing of the
    # CNI family: no module has to be imported for its side effect.
    code = (
        "from pytest_runtimefaults import journal\n"
        "fn = journal._reaper_for('cgroup-tree')\n"
        "print(fn.__module__, fn.__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["pytest_runtimefaults.cni.cgroups", "_reap_cgroup_tree"]
    sources = [*PACKAGE.glob("*.py"), FIXTURES]
    assert not [p for p in sources if "register_reaper(" in p.read_text()]


# --- one fault shape -------------------------------------------------------------


def test_each_file_fault_is_a_core_fault_and_lifting_leaves_files_whole(cni_tmp: CniDir) -> None:
    faults = [
        HalfWritten(cni_tmp, "10-a.conflist", CONF, mode="nul"),
        HeldHalfWritten(cni_tmp, "20-b.conflist", CONF),
        DeleteRecreate(cni_tmp, "30-c.conflist", CONF, cycles=3),
        RacingWriter(cni_tmp, {"40-d.conflist": CONF}),
    ]
    for fault in faults:
        assert isinstance(fault, Fault)
        assert fault.start() is fault
        assert fault.start() is fault  # idempotent
    time.sleep(0.1)
    assert "10-a.conflist" in cni_tmp.broken_files()
    assert "20-b.conflist" in cni_tmp.broken_files()
    for fault in faults:
        fault.lift()
    assert cni_tmp.broken_files() == {}
    assert [p.name for p in cni_tmp.files()] == [
        "10-a.conflist",
        "20-b.conflist",
        "30-c.conflist",
        "40-d.conflist",
    ]
    for fault in faults:
        fault.stop()
        fault.stop()
        assert fault.applied > 0, fault
    assert faults[2].applied == 3


def test_half_written_without_restore_is_removed_when_lifted(cni_tmp: CniDir) -> None:
    with HalfWritten(cni_tmp, "10-a.conflist", CONF, restore=False) as fault:
        assert fault.path.read_bytes() == fault.broken
    assert not fault.path.exists()


def test_held_half_written_is_whole_after_release(cni_tmp: CniDir) -> None:
    held = HeldHalfWritten(cni_tmp, "10-a.conf", CONF, at=0.3).start()
    assert held.path.read_bytes() == held.head
    held.release()
    assert held.completed.is_set()
    assert json.loads(held.path.read_bytes()) == CONF
    held.stop()


def test_a_racing_writer_still_writing_after_the_join_is_an_error(cni_tmp: CniDir) -> None:
    # Four chunks 0.5 s apart: the thread is mid-file for ~2 s after it is asked to stop.
    content = b'{"name": "n", "type": "bridge"}\n'
    writer = RacingWriter(cni_tmp, {"10-a.conflist": content}, chunk=(8, 8), pause=(0.5, 0.5))
    writer.join_timeout = 0.2
    writer.start()
    path = cni_tmp.path("10-a.conflist")
    deadline = time.monotonic() + 5
    while path.read_bytes() == content and time.monotonic() < deadline:
        time.sleep(0.01)  # until the first round has truncated it
    with pytest.raises(FaultThreadError, match="still running"):
        writer.lift()
    # Not rewritten behind the thread's back: it is still the thread's partial file.
    assert path.read_bytes() != content
    assert validate_config(path.read_bytes()) is not None
    writer.join(timeout=10)  # it ends by itself, the round finished
    writer.stop()
    assert path.read_bytes() == content


def test_a_racing_writer_thread_error_is_raised_by_lift(
    cni_tmp: CniDir, caplog: pytest.LogCaptureFixture
) -> None:
    writer = RacingWriter(cni_tmp, {"10-a.conflist": CONF}, pause=(0.0, 0.001)).start()
    cni_tmp.conf_dir.rename(cni_tmp.root / "moved")  # the next round's open fails: ENOENT
    deadline = time.monotonic() + 5
    while writer.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    caplog.set_level(logging.DEBUG, logger="pytest_runtimefaults")
    with pytest.raises(FaultThreadError, match="its thread failed") as info:
        writer.lift()
    assert isinstance(info.value.__cause__, FileNotFoundError)
    # Restoring could not work either (the directory is gone): logged, not hidden.
    assert any("restoring the files of racing writer" in r.message for r in caplog.records)
    writer.stop()  # the error was raised once; stop does not raise it again


def test_a_delete_recreate_thread_error_is_raised_by_stop(cni_tmp: CniDir) -> None:
    fault = DeleteRecreate(cni_tmp, "10-a.conflist", CONF, gap=0.001, period=(0.0, 0.001))
    fault.start()
    cni_tmp.conf_dir.rename(cni_tmp.root / "moved")  # recreating fails: ENOENT
    deadline = time.monotonic() + 5
    while fault.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(FaultThreadError) as info:
        fault.stop()
    assert isinstance(info.value.__cause__, FileNotFoundError)


# --- the torn-write watcher's thread -------------------------------------------


class BlockingWatcher(TornWriteWatcher):
    """A watcher whose judging blocks until released: a thread that will not stop."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.release = threading.Event()
        self.judging = threading.Event()

    def _judge(self, name: str, mask: int) -> None:
        self.judging.set()
        self.release.wait(10)
        super()._judge(name, mask)


def test_a_watcher_whose_thread_does_not_stop_raises(tmp_path: Path) -> None:
    watcher = BlockingWatcher(tmp_path, join_timeout=0.2).start()
    (tmp_path / "10-a.conflist").write_text("{")
    assert watcher.judging.wait(5)
    with pytest.raises(RuntimeError, match="still running"):
        watcher.stop()
    watcher.release.set()
    watcher.stop()  # now it ends, and its descriptors are closed
    assert watcher.files() == {"10-a.conflist"}
    watcher.stop()


def test_a_watcher_thread_error_is_raised_by_stop(tmp_path: Path) -> None:
    class Failing(TornWriteWatcher):
        def _judge(self, name: str, mask: int) -> None:
            raise ValueError(f"cannot judge {name}")

    watcher = Failing(tmp_path).start()
    (tmp_path / "10-a.conflist").write_text("{")
    with pytest.raises(RuntimeError, match=r"watcher failed: cannot judge 10-a\.conflist"):
        watcher.stop()


# --- the CRI message subset --------------------------------------------------------


def test_cri_messages_have_the_field_numbers_of_cri_api_proto() -> None:
    from pytest_runtimefaults.cni.cri import cri_message, decode_protobuf

    request = cri_message(
        "RunPodSandboxRequest",
        config=cri_message(
            "PodSandboxConfig",
            metadata=cri_message("PodSandboxMetadata", name="p", uid="uid-p", namespace="rf"),
            hostname="p",
            log_directory="/tmp",
            linux=cri_message("LinuxPodSandboxConfig", cgroup_parent="/cg"),
        ),
    )
    # config=1 { metadata=1 {name=1 uid=2 namespace=3} hostname=2 log_directory=3 linux=8 {1} }
    wire = b"\n\x20\n\x0e\n\x01p\x12\x05uid-p\x1a\x02rf\x12\x01p\x1a\x04/tmpB\x05\n\x03/cg"
    assert request.SerializeToString() == wire
    assert cri_message("StatusRequest", verbose=True).SerializeToString() == b"\x08\x01"
    status = cri_message("PodSandboxStatusRequest", pod_sandbox_id="x", verbose=True)
    assert status.SerializeToString() == b"\n\x01x\x10\x01"
    assert decode_protobuf(wire)[1] == [wire[2:]]
    assert decode_protobuf(b"\x08\x96\x01\x1d\x01\x02\x03\x04") == {
        1: [150],
        3: [b"\x01\x02\x03\x04"],
    }


def test_cri_responses_parse_with_unknown_fields_ignored() -> None:
    from pytest_runtimefaults.cni.cri import cri_message

    response = cri_message("StatusResponse")
    response.status.conditions.add(type="RuntimeReady", status=True)
    response.status.conditions.add(type="NetworkReady", status=False, reason="NoCni")
    response.info["lastCNILoadStatus"] = "ok"
    # A field the subset does not declare (RuntimeStatus has none at 9) is kept aside.
    wire = response.SerializeToString() + b"\x48\x01"
    parsed = type(response).FromString(wire)
    assert [(c.type, c.status, c.reason) for c in parsed.status.conditions] == [
        ("RuntimeReady", True, ""),
        ("NetworkReady", False, "NoCni"),
    ]
    assert dict(parsed.info) == {"lastCNILoadStatus": "ok"}
    with pytest.raises(ValueError, match="no CRI message 'Nope'"):
        cri_message("Nope")


# --- nothing swallowed silently ------------------------------------------------------


def _silent_handlers(path: Path) -> list[str]:
    """``suppress(...)`` calls, and broad ``except`` blocks that neither raise,
    log, nor keep the error, in *path*."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name == "suppress":
                found.append(f"{path.name}:{node.lineno}: suppress")
        if isinstance(node, ast.ExceptHandler):
            broad = node.type is None or (
                isinstance(node.type, ast.Name) and node.type.id in ("Exception", "BaseException")
            )
            keeps = any(
                isinstance(n, ast.Raise | ast.Assign)
                or (isinstance(n, ast.Attribute) and n.attr in ("debug", "error", "warning"))
                for n in ast.walk(node)
            )
            if broad and not keeps:
                found.append(f"{path.name}:{node.lineno}: silent broad except")
    return found


def test_no_silent_suppress_or_broad_except_in_the_cni_code() -> None:
    found = [s for p in [*sorted(PACKAGE.glob("*.py")), FIXTURES] for s in _silent_handlers(p)]
    assert found == []


def test_one_cri_table_serves_the_pod_client_and_the_event_transport() -> None:
    from pytest_runtimefaults import cri_api
    from pytest_runtimefaults.cni import cri as pods_client
    from pytest_runtimefaults.transports import cri as events

    # The old import paths name the shared builders, not copies.
    assert pods_client.cri_message is cri_api.cri_message
    assert pods_client.cri_message_classes is cri_api.cri_message_classes
    assert events._message is cri_api.cri_message
    # container_id=1, container_event_type=2 (STARTED), created_at=3 (api.proto)
    event = cri_api.cri_message(
        "ContainerEventResponse", container_id="c", container_event_type=1, created_at=5
    )
    assert event.SerializeToString() == b"\n\x01c\x10\x01\x18\x05"
    # A host-network pod (the transport's) and a cgroup parent (the pod client's) in one config.
    linux = cri_api.cri_message(
        "LinuxPodSandboxConfig",
        cgroup_parent="/cg",
        security_context=cri_api.cri_message(
            "LinuxSandboxSecurityContext",
            namespace_options=cri_api.cri_message("NamespaceOption", network=2),
        ),
    )
    assert linux.SerializeToString() == b"\n\x03/cg\x12\x04\n\x02\x08\x02"
