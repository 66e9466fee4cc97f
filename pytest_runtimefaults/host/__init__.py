"""Host plumbing shared by every family: process facts, cgroup trees, the rootfs builder.

* :mod:`~pytest_runtimefaults.host.proc`: facts about processes (start time,
  children, status, command line, session) through psutil;
* :mod:`~pytest_runtimefaults.host.mounts`: the mount table (``/proc/PID/mountinfo``);
* :mod:`~pytest_runtimefaults.host.cgroups`: cgroup mounts, and killing and
  removing a cgroup tree (deepest first);
* :mod:`~pytest_runtimefaults.host.rootfs`: the one busybox root filesystem and
  OCI image builder.

Nothing here imports pytest or any other module of the project except
:mod:`pytest_runtimefaults.core`: it is the bottom layer.  psutil is used
where it has the fact; what it lacks (mountinfo's superblock options, the
start time in clock ticks, cgroup membership) is read here, once.
"""
