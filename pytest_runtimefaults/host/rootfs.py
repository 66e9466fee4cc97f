"""A busybox root filesystem, OCI bundles around it, and an OCI image tar of it.

Runtimes under test need something real to run, and a test suite must not pull
images from the internet.  ``busybox-static`` is one self-contained binary, so
a root filesystem is that binary plus a symlink per applet: built in a few
milliseconds, identical every time.

* :func:`build_rootfs` writes the tree;
* :func:`build_bundle` writes an OCI runtime bundle (``config.json`` +
  ``rootfs``) that runc, crun and youki accept;
* :func:`build_image_tar` packs the tree as an OCI image layout tar that
  ``ctr image import`` (containerd) and ``podman load`` accept;
  :func:`busybox_image_tar` does both at once and returns the tar's bytes.

The one builder of the project: ``pytest_runtimefaults.rootfs`` re-exports it,
and ``containerd.busybox_oci_tar`` is a thin wrapper around it.

Example::

    rootfs = build_rootfs("/tmp/x/rootfs")
    bundle = build_bundle("/tmp/x", args=["/bin/true"])
    build_image_tar(rootfs, "/tmp/busybox.tar", ref="localhost/runtimefaults/busybox:latest")
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_ENV",
    "build_bundle",
    "build_image_tar",
    "build_rootfs",
    "bundle_config",
    "busybox_image_tar",
    "find_busybox",
]

DEFAULT_ENV = ("PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root")
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
# A fixed timestamp: the same rootfs gives the same image digest on every run.
EPOCH = 1_600_000_000


def find_busybox() -> Path | None:
    """A statically linked busybox (Debian's ``busybox-static``), or None."""
    for candidate in (shutil.which("busybox"), *BUSYBOX_CANDIDATES):
        if candidate and os.access(candidate, os.X_OK):
            path = Path(candidate).resolve()
            if _is_static(path):
                return path
    return None


def _is_static(path: Path) -> bool:
    # A dynamic ELF has a PT_INTERP program header naming its loader.
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    return head[:4] == b"\x7fELF" and b"/ld-linux" not in head and b"ld-musl" not in head


def _applets(busybox: Path) -> list[str]:
    out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)
    return sorted(name for name in out.stdout.split() if name and "/" not in name)


def build_rootfs(
    dest: str | os.PathLike[str], busybox: str | os.PathLike[str] | None = None
) -> Path:
    """Write a busybox root filesystem at *dest* (created; must not exist or be empty)."""
    bb = Path(busybox) if busybox is not None else find_busybox()
    if bb is None:
        raise FileNotFoundError(
            "no statically linked busybox found (apt-get install busybox-static)"
        )
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "root",
        "run",
        "var/tmp",
    ):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    shutil.copy2(bb, root / "bin" / "busybox")
    for applet in _applets(bb):
        link = root / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    (root / "etc" / "hostname").write_text("runtimefaults\n")
    return root


CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]


def bundle_config(
    args: Sequence[str] = ("/bin/true",),
    *,
    env: Sequence[str] = DEFAULT_ENV,
    cgroups_path: str = "",
    hostname: str = "runtimefaults",
    network: bool = False,
    readonly: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An OCI runtime-spec 1.0 ``config.json`` for a busybox rootfs.

    *network* False keeps the host's network namespace (no veth, faster);
    *cgroups_path* is left empty by default so that each runtime picks its
    own per-container default (runc: ``system.slice:runc:ID`` with systemd).
    """
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if network:
        namespaces.append({"type": "network"})
    linux: dict[str, Any] = {
        "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        "namespaces": namespaces,
        "maskedPaths": [
            "/proc/acpi",
            "/proc/kcore",
            "/proc/keys",
            "/proc/latency_stats",
            "/proc/timer_list",
            "/proc/timer_stats",
            "/proc/sched_debug",
            "/proc/scsi",
            "/sys/firmware",
        ],
        "readonlyPaths": [
            "/proc/bus",
            "/proc/fs",
            "/proc/irq",
            "/proc/sys",
            "/proc/sysrq-trigger",
        ],
    }
    if cgroups_path:
        linux["cgroupsPath"] = cgroups_path
    config: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(args),
            "env": list(env),
            "cwd": "/",
            "capabilities": {k: list(CAPS) for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": readonly},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
            {
                "destination": "/tmp",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "nodev", "mode=1777"],
            },
        ],
        "linux": linux,
    }
    if extra:
        config.update(extra)
    return config


def build_bundle(
    dest: str | os.PathLike[str],
    args: Sequence[str] = ("/bin/true",),
    *,
    rootfs: str | os.PathLike[str] | None = None,
    **config_kw: Any,
) -> Path:
    """Write an OCI bundle at *dest*: ``config.json`` and ``rootfs``.

    With *rootfs* given (an existing tree, e.g. a session-wide one), the
    config's ``root.path`` is its absolute path (runc refuses a symlinked
    rootfs); otherwise a busybox tree is built at ``<bundle>/rootfs``.
    Keyword arguments go to :func:`bundle_config`.
    """
    bundle = Path(dest)
    bundle.mkdir(parents=True, exist_ok=True)
    config = bundle_config(args, **config_kw)
    if rootfs is None:
        build_rootfs(bundle / "rootfs")
    else:
        config["root"]["path"] = str(Path(rootfs).resolve())
    (bundle / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return bundle


# --- OCI image layout ------------------------------------------------------------


def _layer_tar(rootfs: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(rootfs.rglob("*")):
            rel = path.relative_to(rootfs).as_posix()
            info = tar.gettarinfo(str(path), arcname=rel)
            info.mtime = EPOCH
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if info.isfile():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buf.getvalue()


def _blob(tar: tarfile.TarFile, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo("blobs/sha256/" + digest.split(":", 1)[1])
    info.size, info.mtime, info.mode = len(data), EPOCH, 0o644
    tar.addfile(info, io.BytesIO(data))
    return digest, len(data)


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), EPOCH, 0o644
    tar.addfile(info, io.BytesIO(data))


def build_image_tar(
    rootfs: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    ref: str = "localhost/runtimefaults/busybox:latest",
    cmd: Sequence[str] = ("/bin/sh",),
    architecture: str = "amd64",
) -> Path:
    """Pack *rootfs* as an OCI image layout tar at *dest*; returns *dest*.

    Import with ``ctr -a SOCK image import --base-name localhost/runtimefaults/busybox
    TAR`` or ``ctr image import --index-name`` ...; the index names the image
    both by OCI ``ref.name`` (the tag) and containerd's ``io.containerd.image.name``
    (the full *ref*).  The layer is gzip-compressed with a fixed mtime, so the
    same rootfs always gives the same digests.
    """
    root = Path(rootfs)
    raw = _layer_tar(root)
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    layer = gzip.compress(raw, mtime=EPOCH)
    tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else "latest"
    out = Path(dest)
    with tarfile.open(out, "w") as tar:
        layer_digest, layer_size = _blob(tar, layer)
        config = {
            "architecture": architecture,
            "os": "linux",
            "config": {"Env": list(DEFAULT_ENV), "Cmd": list(cmd), "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created_by": "pytest-runtimefaults build_image_tar"}],
        }
        config_digest, config_size = _blob(tar, json.dumps(config, sort_keys=True).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config_size,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest,
                    "size": layer_size,
                }
            ],
        }
        manifest_digest, manifest_size = _blob(tar, json.dumps(manifest, sort_keys=True).encode())
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": manifest_digest,
                    "size": manifest_size,
                    "platform": {"architecture": architecture, "os": "linux"},
                    "annotations": {
                        "org.opencontainers.image.ref.name": tag,
                        "io.containerd.image.name": ref,
                    },
                }
            ],
        }
        _add_file(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        _add_file(tar, "index.json", json.dumps(index, sort_keys=True).encode())
    return out


def busybox_image_tar(
    busybox: str | os.PathLike[str] | None = None,
    *,
    ref: str = "localhost/runtimefaults/busybox:latest",
    cmd: Sequence[str] = ("/bin/sh",),
) -> bytes:
    """The bytes of an OCI image layout tar of a busybox rootfs (:func:`build_image_tar`).

    Built in a private temporary directory, removed before returning.
    """
    with tempfile.TemporaryDirectory(prefix="rf-image-") as tmp:
        rootfs = build_rootfs(Path(tmp) / "rootfs", busybox)
        return build_image_tar(rootfs, Path(tmp) / "image.tar", ref=ref, cmd=cmd).read_bytes()
