"""A real systemd for every test, and pystemd-based inspection of what runtimes leave.

Incident 2 (FAULTS.md) is about systemd as the cgroup manager of runc and crun.
CI machines and laptops often do not run systemd as PID 1, and a test must never
touch the host's systemd anyway, so :class:`SystemdSandbox` boots the real
``/lib/systemd/systemd`` as PID 1 of its own PID, mount and cgroup namespaces:

* the launcher first moves into a fresh cgroup of its own on every hierarchy
  (journaled, removed on stop), so the cgroup namespace's root is a directory
  the sandbox owns and systemd's ``init.scope``/``system.slice`` land there;
* inside its mount namespace (private propagation) ``/run`` is a new tmpfs,
  ``/sys/fs/cgroup`` is unmounted and rebuilt from **fresh** mounts.  This
  matters: a systemd that shared the host's ``/sys/fs/cgroup`` tmpfs once
  remounted it read-only for the whole machine, because a remount changes the
  superblock, which every mount namespace shares.  The launcher refuses to
  exec systemd if ``/sys/fs/cgroup`` is still the host's filesystem;
* a unit directory of empty stub targets, a ``dbus.socket`` and a
  ``dbus.service`` (its own dbus-daemon, or dbus-broker: ``bus_daemon=``) is
  all systemd loads: it is on ``running`` in a fraction of a second.

The bus is reachable from the host as ``unix:path=/proc/PID/root/run/dbus/
system_bus_socket`` (:attr:`SystemdSandbox.bus_address`).  Programs that pass
PIDs to systemd (a runtime creating a scope) must run inside the sandbox's
namespaces: :meth:`SystemdSandbox.command` prefixes ``nsenter``.

Layouts (``layout=``, or ``--runtimefaults-cgroup-layout``): ``"hybrid"``
mounts every v1 controller, ``name=systemd`` and cgroup2 at ``unified``;
``"legacy"`` leaves cgroup2 out (crun refuses a hybrid layout whose cgroup2
still holds a controller); ``"unified"`` mounts a pure cgroup2 at
``/sys/fs/cgroup``, on a cgroup v2 host and on a v1 or hybrid one alike (it then
has the controllers the host leaves to cgroup2: none on this project's hybrid
machine, where every controller but hugetlb is bound to v1).  ``"auto"`` is the
host's own layout.  :func:`sandbox_controllers` says which controllers a layout
gets before booting; :attr:`SystemdSandbox.controllers` what it got.

The guard before systemd starts checks, inside the new namespaces, that the
cgroup namespace is not the host's, that every cgroup mount under
``/sys/fs/cgroup`` is rooted at ``/`` (a fresh mount in a new cgroup namespace
is; a copy or bind of the host's shows ``/..``), and, for v1 layouts, that
``/sys/fs/cgroup`` is a tmpfs other than the host's.  Device numbers alone
cannot tell: cgroup2 (and each v1 hierarchy) is one superblock, so a fresh
mount has the host's ``st_dev``.

systemd's console is a pty whose master the sandbox drains into
``console.log``: with a file on ``/dev/console`` systemd gets ENOTTY, closes
it and says nothing, so a sandbox that fails to boot could not say why.

Inspection (:class:`SystemdInspector`) lists units over any bus address with
pystemd and finds what a runtime left behind: transient scopes, slices such as
``libcontainer_*_systemd_test_default.slice``, failed units.

Example::

    with SystemdSandbox() as sd:
        print(SystemdInspector(sd.bus_address).leftovers())

Where the code lives, one concern per module (every name is re-exported here,
so ``from pytest_runtimefaults.systemd import ...`` keeps working):

* :mod:`.units`: the unit files, stub targets and bus configuration (text);
* :mod:`.launcher`: the launcher and inner shell scripts and the guard
  (:data:`GUARD_AWK`), pure functions of the facts the sandbox gathers;
* :mod:`.console`: the pty drain behind systemd's ``/dev/console``;
* :mod:`.cgroups`: cgroup mounts, the host's cgroup state, :func:`thaw`, and
  the journal's reaper of sandbox cgroups (named in ``journal.REAPERS``);
* :mod:`.sandbox`: :class:`SystemdSandbox`, the lifecycle that ties them;
* :mod:`.inspector`: :class:`SystemdInspector` and :class:`UnitInfo` (pystemd);
* :mod:`.host_systemd`: :class:`HostSystemd`, the host's own systemd by consent;
* :mod:`.cookie`: :class:`~.cookie.RealCookieOverflow`, systemd's real sd-bus
  cookie found by value in a sandbox's memory and set near 2^32;
* :mod:`.errors`: :class:`SandboxError`.

Process facts, cgroup trees and the mount table come from
:mod:`pytest_runtimefaults.host`.
"""

from __future__ import annotations

from pytest_runtimefaults import caps
from pytest_runtimefaults.systemd.cgroups import SANDBOX_CGROUPS as SANDBOX_CGROUPS
from pytest_runtimefaults.systemd.cgroups import CgroupMount, cgroup_mounts, host_cgroup_state, thaw
from pytest_runtimefaults.systemd.cgroups import _own_cgroups as _own_cgroups
from pytest_runtimefaults.systemd.cgroups import _reap_sandbox_cgroups as _reap_sandbox_cgroups
from pytest_runtimefaults.systemd.cgroups import _sandbox_cgroup_ok as _sandbox_cgroup_ok
from pytest_runtimefaults.systemd.console import _ANSI as _ANSI
from pytest_runtimefaults.systemd.console import _ConsoleDrain as _ConsoleDrain
from pytest_runtimefaults.systemd.cookie import (
    COOKIE_CYCLED,
    CookieNotFound,
    CookieWord,
    RealCookieOverflow,
    find_cookie,
    next_cookie,
)
from pytest_runtimefaults.systemd.errors import SandboxError
from pytest_runtimefaults.systemd.host_systemd import HostSystemd
from pytest_runtimefaults.systemd.inspector import SystemdInspector, UnitInfo
from pytest_runtimefaults.systemd.inspector import _s as _s
from pytest_runtimefaults.systemd.inspector import _typed as _typed
from pytest_runtimefaults.systemd.launcher import GUARD_AWK as GUARD_AWK
from pytest_runtimefaults.systemd.launcher import REFUSED as REFUSED
from pytest_runtimefaults.systemd.neighbours import (
    LeftoverScope,
    ReexecMidCall,
    daemon_reexec,
    scope_name,
)
from pytest_runtimefaults.systemd.sandbox import (
    SystemdSandbox,
    default_bus_daemon,
    set_default_bus_daemon,
)
from pytest_runtimefaults.systemd.sandbox import describe as describe
from pytest_runtimefaults.systemd.units import BUS_DAEMONS
from pytest_runtimefaults.systemd.units import DBUS_CONFIG as DBUS_CONFIG
from pytest_runtimefaults.systemd.units import INNER_BUS_PATH as INNER_BUS_PATH
from pytest_runtimefaults.systemd.units import STUB_TARGETS as STUB_TARGETS
from pytest_runtimefaults.systemd.units import SYSTEMD as SYSTEMD
from pytest_runtimefaults.systemd.units import TARGET as TARGET

# Beyond __all__, the names above spelled ``X as X`` are the ones the single
# systemd.py module had (constants, describe, and the private names tests
# import): importable from here as before.
__all__ = [
    "BUS_DAEMONS",
    "COOKIE_CYCLED",
    "CgroupMount",
    "CookieNotFound",
    "CookieWord",
    "HostSystemd",
    "LeftoverScope",
    "RealCookieOverflow",
    "ReexecMidCall",
    "SandboxError",
    "SystemdInspector",
    "SystemdSandbox",
    "UnitInfo",
    "cgroup_mounts",
    "daemon_reexec",
    "default_bus_daemon",
    "find_cookie",
    "host_cgroup_state",
    "next_cookie",
    "resolve_layout",
    "sandbox_controllers",
    "scope_name",
    "set_default_bus_daemon",
    "thaw",
]

# The layouts, and what each gets on this host, are host facts kept in caps (the
# capability ``sandbox-cgroup-controllers``); re-exported here.
LAYOUTS = caps.SANDBOX_LAYOUTS
resolve_layout = caps.resolve_layout
sandbox_controllers = caps.sandbox_controllers
