"""The mount table of a process (``/proc/PID/mountinfo``), parsed once.

psutil's ``disk_partitions`` reads ``/proc/mounts``, which has no mount ids,
no superblock options and no propagation: the leak checks need the ro/rw
state of the superblock, so mountinfo is parsed here (proc(5)), in the one
place the journal, the leak checks, containerd and the cgroup helpers share.

Example::

    from pytest_runtimefaults.host.mounts import mount_table

    [m.target for m in mount_table() if m.fstype == "cgroup2"]
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MountEntry", "mount_table"]


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1 : i + 4]) == 3 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class MountEntry:
    """One line of ``/proc/PID/mountinfo``: where, what, and read-only or not."""

    mount_id: int
    target: str
    fstype: str
    source: str
    mount_options: tuple[str, ...]
    super_options: tuple[str, ...]

    @property
    def readonly(self) -> bool:
        """True if the mount *or* its superblock is read-only."""
        return "ro" in self.mount_options or "ro" in self.super_options


def mount_table(pid: int | str = "self") -> list[MountEntry]:
    """Parse ``/proc/PID/mountinfo`` (see proc(5))."""
    entries: list[MountEntry] = []
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) < 6 or len(rfields) < 3:
                continue
            entries.append(
                MountEntry(
                    mount_id=int(fields[0]),
                    target=_unescape_mountinfo(fields[4]),
                    fstype=rfields[0],
                    source=_unescape_mountinfo(rfields[1]),
                    mount_options=tuple(fields[5].split(",")),
                    super_options=tuple(rfields[2].split(",")),
                )
            )
    return entries
