"""Parallel ``podman network create`` / ``rm`` / ``run`` / ``ls``: the netavark races.

podman issues 7807 and 9041 (``network create``/``rm`` failing with
``error reading /etc/cni/net.d/X.conflist: ... no such file or directory``:
another process removed X between the listing and the read), 7808 (``run
--network N`` right after ``network create N``: ``CNI network "N" not
found``) and 9472 (``network create`` racing itself over the config file)
were races of podman's old libpod network code, which listed the config dir
and opened each file without a lock.  :class:`NetworkChurn` runs K workers,
each a thread running real podman commands through a
:class:`~pytest_runtimefaults.cni.NetavarkPodman` (private storage, private
config dir, its own network namespace), on three kinds of network names:

* **owned**: one per worker, created and removed only by it (so the worker
  knows whether it exists): any failure on it is a race;
* **stable**: created before the churn, never removed, run on by every
  worker: any failure on it is a race;
* **shared**: every worker creates, removes and runs on them, with
  ``podman network create`` choosing the subnet: ``network not found``,
  ``already exists`` and ``network is being used`` are correct refusals
  there, two networks with one subnet are an IPAM conflict.

The schedule is drawn from one seeded :class:`random.Random` before the
churn starts (``plan``), and a :class:`threading.Barrier` lines the workers
up before every round, so each round's K operations start together.  Every
operation's outcome is kept (:class:`ChurnOp`: kind, network, exit status,
the error line, start time and duration, and its category from
:func:`classify`); :meth:`NetworkChurn.check_state` says afterwards whether
podman's view, the files in the config dir, the containers, the links and
the firewall of the namespace agree.  *readers* are functions of the config
dir run in a loop while the churn goes on (a client of the directory that
is or is not susceptible to the race); :attr:`NetworkChurn.readers` tallies
them.

Example::

    with NetavarkDir() as nv, NetavarkPodman(nv) as podman:
        with NetworkChurn(podman, workers=3, rounds=4, seed=1) as churn:
            churn.wait()
        assert churn.races() == [], churn.report()
        assert churn.check_state() == []
"""

from __future__ import annotations

import ipaddress
import json
import random
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_runtimefaults import naming
from pytest_runtimefaults.cni.config import next_subnet
from pytest_runtimefaults.core.fault import ThreadedFault
from pytest_runtimefaults.core.log import logger, swallowed

if TYPE_CHECKING:
    from pytest_runtimefaults.cni.netavark import NetavarkPodman
    from pytest_runtimefaults.expectations import Outcome

__all__ = [
    "CHURN_CATEGORIES",
    "ChurnOp",
    "NetworkChurn",
    "ReaderTally",
    "classify",
    "error_line",
]

#: What an operation's outcome is: ``ok``; ``refused`` (a correct refusal on
#: a contended name); ``race`` (the documented races: ENOENT on a config
#: file, ``network not found`` for a network that exists, an IPAM or subnet
#: conflict); ``timeout``; ``other`` (any other failure).
CHURN_CATEGORIES = ("ok", "refused", "race", "timeout", "other")

#: Operation kinds and their default weights in the seeded schedule.
DEFAULT_MIX: dict[str, int] = {"own": 3, "run": 2, "shared": 3, "ls": 2}

# podman's error texts (4.3 and 5.x say the same; the CNI-era texts of the
# upstream issues are kept so a trace of an old podman classifies too).
_NOT_FOUND = re.compile(r"network not found|CNI network \S+ not found|unable to find network")
_EXISTS = re.compile(r"already exists|already used: network")
_IN_USE = re.compile(r"network is being used|has associated containers")
_IPAM = re.compile(
    r"IPAM|failed to allocate|address already in use|subnet \S+ is already used|"
    r"already (?:allocated|in use)",
    re.IGNORECASE,
)
_ENOENT = re.compile(r"no such file or directory", re.IGNORECASE)
#: how check_state's problems about things left behind begin
_LEAK_PROBLEMS = ("containers left", "veths left", "firewall rules")


def error_line(stderr: str) -> str:
    """The line that says why a podman command failed: its last ``Error:``
    line, else the last non-empty line (``level=error`` logs before it are
    not the reason)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith("Error:"):
            return line
    return lines[-1] if lines else ""


def classify(
    kind: str, returncode: int | None, error: str, *, contended: bool, conf_dir: Path | str
) -> tuple[str, str]:
    """``(category, reason)`` of one operation (see :data:`CHURN_CATEGORIES`).

    *kind* is ``create``, ``rm``, ``run`` or ``ls``; *contended* whether other
    workers may create or remove the same name at the same time (then
    ``network not found``, ``already exists`` and ``in use`` are correct
    refusals).  ENOENT on a file of *conf_dir* and IPAM conflicts are races
    whatever the name.

    Example::

        >>> classify("rm", 1, "Error: unable to find network with name or ID b: "
        ...          "network not found", contended=True, conf_dir="/x")
        ('refused', 'not-found')
        >>> classify("ls", 125, "Error: open /x/b.json: no such file or directory",
        ...          contended=False, conf_dir="/x")
        ('race', 'enoent')
    """
    if returncode is None:
        return "timeout", "timeout"
    if returncode == 0:
        return "ok", ""
    if _ENOENT.search(error) and (
        str(conf_dir) in error or ".json" in error or "conflist" in error
    ):
        return "race", "enoent"
    if _IPAM.search(error):
        return "race", "ipam"
    for pattern, reason, kinds in (
        (_NOT_FOUND, "not-found", ("rm", "run", "create")),
        (_EXISTS, "exists", ("create",)),
        (_IN_USE, "in-use", ("rm",)),
    ):
        if pattern.search(error):
            if contended and kind in kinds:
                return "refused", reason
            return "race", reason
    return "other", "other"


@dataclass(frozen=True)
class ChurnOp:
    """One podman command of the churn and its outcome."""

    round: int
    worker: int
    kind: str  # create, rm, run, ls
    network: str  # "" for ls
    started: float  # seconds since the churn started
    seconds: float
    returncode: int | None  # None: killed at the operation timeout
    error: str  # error_line(stderr), "" on success
    category: str
    reason: str
    #: the ``level=warning``/``level=error`` lines podman logged (a teardown
    #: error of a run that still exits 0 is logged only there)
    warnings: tuple[str, ...] = ()

    def line(self) -> str:
        """One line for a report."""
        rc = "timeout" if self.returncode is None else f"rc {self.returncode}"
        what = f"{self.kind} {self.network}".strip()
        tail = f": {self.error[:160]}" if self.error else ""
        if self.warnings:
            tail += f" (logged: {self.warnings[-1][:200]})"
        return (
            f"r{self.round} w{self.worker} +{self.started:.3f}s {what} {rc} "
            f"({self.seconds:.3f}s) [{self.category}{'/' + self.reason if self.reason else ''}]"
            f"{tail}"
        )


@dataclass
class ReaderTally:
    """What one reader of the config dir met while the churn ran."""

    calls: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    first: str = ""  # the first failure, as "Type: message"

    @property
    def failed(self) -> int:
        return sum(self.failures.values())


class NetworkChurn(ThreadedFault):
    """K workers racing ``podman network create/rm``, ``run --network`` and
    ``network ls`` on owned, stable and shared names (see the module doc).

    *rounds* bounds the count, *duration* (seconds) the time: the churn ends
    after the round during which either runs out, or after the first round
    at whose end ``until(churn)`` is true (e.g. a reader has failed often
    enough: the race has shown, no need to go on).  *seed* fixes the schedule
    (``plan[round][worker] = (kind, network)``); *mix* weighs the kinds
    (``own``: create or remove the worker's own network; ``run``: a
    container on the own network when it exists, else on a stable one;
    ``shared``: create, remove or run on a shared name; ``ls``).  *readers*
    (name -> function of the config dir) run in a loop on threads of their
    own while the workers run.  ``start()`` creates the stable networks and
    starts the churn; ``wait()`` waits for its end; ``stop()`` removes every
    network the churn may have made.
    """

    def __init__(
        self,
        podman: NetavarkPodman,
        *,
        workers: int = 4,
        rounds: int = 8,
        duration: float | None = None,
        seed: int = 0,
        shared: int = 2,
        stable: int = 1,
        mix: Mapping[str, int] | None = None,
        readers: Mapping[str, Callable[[Path], object]] | None = None,
        until: Callable[[NetworkChurn], bool] | None = None,
        op_timeout: float = 60.0,
    ) -> None:
        super().__init__()
        if workers < 1 or rounds < 1 or stable < 1 or shared < 0:
            raise ValueError(
                f"NetworkChurn needs workers >= 1, rounds >= 1, stable >= 1 and shared >= 0 "
                f"(got workers={workers}, rounds={rounds}, stable={stable}, shared={shared})"
            )
        weights = dict(DEFAULT_MIX if mix is None else mix)
        unknown = set(weights) - set(DEFAULT_MIX)
        if unknown or not any(weights.values()):
            raise ValueError(
                f"NetworkChurn mix {dict(weights)!r}: use the kinds {sorted(DEFAULT_MIX)} "
                "with non-negative weights, at least one above 0"
            )
        if shared == 0:
            weights["shared"] = 0
        self.podman = podman
        self.workers = workers
        self.rounds = rounds
        self.duration = duration
        self.seed = seed
        self.mix = weights
        self.op_timeout = op_timeout
        self.until = until
        self.join_timeout = op_timeout * 2 + 30  # a round may end with a slow op
        tag = naming.unique_name("rfch", maxlen=14)
        self.owned = [f"{tag}o{w}" for w in range(workers)]
        self.stable = [f"{tag}s{i}" for i in range(stable)]
        self.shared = [f"{tag}x{i}" for i in range(shared)]
        self.subnets = {name: next_subnet() for name in (*self.owned, *self.stable)}
        self.plan = self._draw_plan(random.Random(seed))
        self.ops: list[ChurnOp] = []
        self.readers = {name: ReaderTally() for name in readers or {}}
        self._reader_funcs = dict(readers or {})
        #: rounds started (each of them ran to its end)
        self.rounds_run = 0
        #: whether each owned network exists, as its worker knows from its outcomes
        self.own_exists = dict.fromkeys(self.owned, False)
        self.seconds = 0.0
        self._lock = threading.Lock()
        self._t0 = 0.0
        self._stop_after_round = False
        self._ended = threading.Event()
        self._worker_error: BaseException | None = None

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"network churn ({self.workers} workers, seed {self.seed})"

    @property
    def names(self) -> list[str]:
        """Every network name the churn may create."""
        return [*self.owned, *self.stable, *self.shared]

    # --- the schedule (pure) ---------------------------------------------------------

    def _draw_plan(self, rng: random.Random) -> list[list[tuple[str, str]]]:
        kinds = [k for k, w in self.mix.items() if w > 0]
        weights = [self.mix[k] for k in kinds]
        exists = dict.fromkeys(self.owned, False)
        plan: list[list[tuple[str, str]]] = []
        for _ in range(self.rounds):
            row: list[tuple[str, str]] = []
            for own in self.owned:
                kind = rng.choices(kinds, weights)[0]
                if kind == "own":
                    row.append(("rm" if exists[own] else "create", own))
                    exists[own] = not exists[own]
                elif kind == "run":
                    row.append(("run", own if exists[own] else rng.choice(self.stable)))
                elif kind == "shared":
                    row.append((rng.choice(("create", "rm", "run")), rng.choice(self.shared)))
                else:
                    row.append(("ls", ""))
            plan.append(row)
        return plan

    # --- running it ------------------------------------------------------------------

    def _create_argv(self, network: str) -> list[str]:
        argv = ["network", "create", "--disable-dns"]
        if network in self.subnets:
            argv += ["--subnet", self.subnets[network]]
        # Shared names: podman picks a free subnet itself, as users let it;
        # two parallel creates choosing one subnet is the IPAM race.
        return [*argv, network]

    def _argv(self, kind: str, network: str) -> list[str]:
        if kind == "create":
            return self.podman.argv(*self._create_argv(network))
        if kind == "rm":
            return self.podman.argv("network", "rm", network)
        if kind == "ls":
            return self.podman.argv("network", "ls", "--format", "{{.Name}}")
        return self.podman.argv(*self.podman.run_args(network, "true"))

    def _do(self, rnd: int, worker: int, kind: str, network: str) -> ChurnOp:
        argv = self._argv(kind, network)
        started = time.monotonic()
        returncode: int | None
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=self.op_timeout, check=False
            )
            returncode, stderr = done.returncode, done.stderr
        except subprocess.TimeoutExpired as exc:
            returncode = None
            raw = exc.stderr or b""
            stderr = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        seconds = time.monotonic() - started
        error = error_line(stderr) if returncode != 0 else ""
        warnings = tuple(
            ln.strip() for ln in stderr.splitlines() if re.search(r"level=(?:warning|error)", ln)
        )
        category, reason = classify(
            kind,
            returncode,
            error,
            contended=network in self.shared,
            conf_dir=self.podman.nv.conf_dir,
        )
        return ChurnOp(
            rnd, worker, kind, network, started - self._t0, seconds, returncode, error, category,
            reason, warnings,
        )  # fmt: skip

    def _end_of_round(self) -> None:
        # Run by one thread when all workers reached the barrier, before a
        # round: decide, for all of them at once, whether it starts.  Every
        # earlier round is complete here, so `until` sees whole rounds.
        late = self.duration is not None and time.monotonic() - self._t0 >= self.duration
        done = self.until is not None and self.until(self)
        if late or done or self.stopping.is_set():
            self._stop_after_round = True
        else:
            self.rounds_run += 1

    def _worker(self, worker: int, barrier: threading.Barrier) -> None:
        try:
            self._rounds(worker, barrier)
        except threading.BrokenBarrierError:
            pass  # another worker failed and broke the barrier: its error is reported
        except BaseException as exc:
            with self._lock:
                if self._worker_error is None:
                    self._worker_error = exc
            # The others must not wait for this worker forever; _run re-raises
            # the error in the coordinator, so that stop()/wait() report it.
            barrier.abort()

    def _rounds(self, worker: int, barrier: threading.Barrier) -> None:
        for rnd, row in enumerate(self.plan):
            # Line up: every worker's op of this round starts now.  Bounded, so
            # that a worker stuck past its op timeout breaks the round, not the test.
            barrier.wait(self.op_timeout + 30)
            if self._stop_after_round:
                return
            kind, network = row[worker]
            if kind == "run" and network in self.own_exists and not self.own_exists[network]:
                # The plan assumed an earlier create of the own network worked;
                # it did not (a race, already recorded): run on a stable one.
                network = self.stable[rnd % len(self.stable)]
            op = self._do(rnd, worker, kind, network)
            if network in self.own_exists and op.returncode == 0 and kind in ("create", "rm"):
                self.own_exists[network] = kind == "create"
            with self._lock:
                self.ops.append(op)
            self._fired()

    def _reader(self, name: str, func: Callable[[Path], object]) -> None:
        tally = self.readers[name]
        conf_dir = self.podman.nv.conf_dir
        while not self._ended.is_set():
            tally.calls += 1
            try:
                func(conf_dir)
            except Exception as exc:  # the reader's failure is the finding
                tally.failures[type(exc).__name__] += 1
                if not tally.first:
                    tally.first = f"{type(exc).__name__}: {exc}"

    def _start(self) -> None:
        for name in self.stable:
            done = self.podman.podman(*self._create_argv(name), timeout=self.op_timeout)
            if done.returncode != 0:
                raise RuntimeError(
                    f"NetworkChurn could not create its stable network {name}: rc "
                    f"{done.returncode}: {error_line(done.stderr)}"
                )
        super()._start()

    def _run(self) -> None:
        barrier = threading.Barrier(self.workers, action=self._end_of_round)
        self._t0 = time.monotonic()
        threads = [
            threading.Thread(target=self._worker, args=(w, barrier), name=f"rf-churn-w{w}")
            for w in range(self.workers)
        ]
        threads += [
            threading.Thread(target=self._reader, args=(n, f), name=f"rf-churn-r-{n}", daemon=True)
            for n, f in self._reader_funcs.items()
        ]
        try:
            for thread in threads:
                thread.start()
            for thread in threads[: self.workers]:
                thread.join()
        finally:
            self.seconds = time.monotonic() - self._t0
            self._ended.set()
            for thread in threads[self.workers :]:
                thread.join(10)
        self.ops.sort(key=lambda op: (op.round, op.worker))
        if self._worker_error is not None:
            raise RuntimeError(
                f"{self.name}: a worker failed after {len(self.ops)} operations"
            ) from self._worker_error

    def wait(self, timeout: float | None = None) -> NetworkChurn:
        """Wait until every round ran (or *duration* ran out); re-raise a worker's error."""
        self.join(self.join_timeout if timeout is None else timeout)
        return self

    def _stop(self) -> None:
        try:
            self.join()
        finally:
            for name in self.names:
                with swallowed(Exception, "podman network rm -f %s", name):
                    done = self.podman.podman("network", "rm", "--force", name, timeout=60)
                    if done.returncode != 0 and "network not found" not in done.stderr:
                        logger.debug("network rm -f %s: %s", name, error_line(done.stderr))

    # --- judging it --------------------------------------------------------------------

    def by_category(self) -> Counter[str]:
        """How many operations fell in each category."""
        return Counter(op.category for op in self.ops)

    def races(self) -> list[ChurnOp]:
        """The operations that met a race (see :func:`classify`)."""
        return [op for op in self.ops if op.category == "race"]

    def failures(self) -> list[ChurnOp]:
        """Every operation that was neither ok nor a correct refusal."""
        return [op for op in self.ops if op.category not in ("ok", "refused")]

    @property
    def ops_per_second(self) -> float:
        return len(self.ops) / self.seconds if self.seconds > 0 else 0.0

    def report(self, limit: int = 30) -> str:
        """A summary and the first *limit* failed operations, one a line."""
        head = (
            f"{self.name}: {len(self.ops)} ops in {self.rounds_run} rounds, "
            f"{self.seconds:.2f} s ({self.ops_per_second:.1f}/s): {dict(self.by_category())}"
        )
        readers = [
            f"reader {n}: {t.calls} calls, {t.failed} failed {dict(t.failures)} {t.first[:160]}"
            for n, t in self.readers.items()
        ]
        bad = [op.line() for op in self.ops if op.category != "ok"][:limit]
        return "\n".join([head, *readers, *bad])

    def outcome(self, problems: Iterable[str]) -> Outcome:
        """The churn's outcome as :mod:`~pytest_runtimefaults.expectations` words it,
        from its operations and the *problems* :meth:`check_state` found:
        ``blocks`` (an operation timed out), ``leaks`` (a container, veth or
        firewall rule left), ``misbehaves`` (a race, another failure, or ls and
        the files disagreeing), else ``survives``."""
        from pytest_runtimefaults.expectations import Outcome

        problems = list(problems)
        cats = self.by_category()
        if cats["timeout"]:
            return Outcome.BLOCKS
        if any(p.startswith(_LEAK_PROBLEMS) for p in problems):
            return Outcome.LEAKS
        if cats["race"] or cats["other"] or problems:
            return Outcome.MISBEHAVES
        return Outcome.SURVIVES

    def check_state(self) -> list[str]:
        """What disagrees once the churn ended (empty: consistent).

        ``podman network ls`` against the ``*.json`` files of the config dir;
        every file a whole network; no two networks with one subnet or one
        bridge; every stable network there, every owned one there exactly
        when its worker's outcomes say so; no container left (``ps -a``),
        no veth in the namespace, no firewall rule naming a churn network's
        subnet once no container runs.
        """
        from pytest_runtimefaults.cni.netavark import whole_networks

        problems: list[str] = []
        listed = self.podman.podman("network", "ls", "--format", "{{.Name}}")
        if listed.returncode != 0:
            return [f"podman network ls: rc {listed.returncode}: {error_line(listed.stderr)}"]
        # "podman" is podman's built-in default network: it has no file.
        in_ls = set(listed.stdout.split()) - {"podman"}
        files = self.podman.nv.files()
        on_disk = {p.stem for p in files}
        if in_ls != on_disk:
            problems.append(
                f"network ls and the files disagree: only listed {sorted(in_ls - on_disk)}, "
                f"only on disk {sorted(on_disk - in_ls)}"
            )
        for fname, why in whole_networks(files).items():
            if why is not None:
                problems.append(f"{fname} is not a whole network: {why}")
        problems += _conflicts(files)
        for name in self.stable:
            if name not in in_ls:
                problems.append(f"stable network {name} is gone")
        for name, exists in self.own_exists.items():
            if (name in in_ls) != exists:
                problems.append(
                    f"owned network {name}: {'listed' if name in in_ls else 'not listed'}, "
                    f"but its worker's outcomes say it {'exists' if exists else 'does not'}"
                )
        ps = self.podman.podman("ps", "--all", "--quiet")
        if ps.stdout.strip():
            problems.append(f"containers left: {ps.stdout.split()}")
        leaked = self.podman.leaked_links()
        if leaked:
            problems.append(f"veths left in the namespace: {sorted(leaked)}")
        firewall = self.podman.firewall()
        for subnet in sorted(_subnets(files) | set(self.subnets.values())):
            if subnet in firewall:
                problems.append(f"firewall rules name {subnet} with no container running")
        return problems


def _subnets(files: Iterable[Path]) -> set[str]:
    out: set[str] = set()
    for net in _load(files):
        out |= {str(s.get("subnet")) for s in net.get("subnets") or []}
    return out


def _load(files: Iterable[Path]) -> list[dict[str, Any]]:
    nets = []
    for path in files:
        with swallowed(Exception, "reading %s", path):
            obj, _ = json.JSONDecoder().raw_decode(path.read_text())
            if isinstance(obj, dict):
                nets.append(obj)
    return nets


def _conflicts(files: Iterable[Path]) -> list[str]:
    """Networks that share a subnet (overlapping) or a bridge interface."""
    seen_nets: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]] = []
    bridges: dict[str, str] = {}
    problems = []
    for net in _load(files):
        name = str(net.get("name"))
        iface = net.get("network_interface")
        if isinstance(iface, str):
            if iface in bridges:
                problems.append(f"networks {bridges[iface]} and {name} share bridge {iface}")
            bridges[iface] = name
        for entry in net.get("subnets") or []:
            with swallowed(ValueError, "subnet of %s", name):
                subnet = ipaddress.ip_network(str(entry.get("subnet")))
                for other, owner in seen_nets:
                    if subnet.version == other.version and subnet.overlaps(other):
                        problems.append(f"networks {owner} and {name} overlap: {other} {subnet}")
                seen_nets.append((subnet, name))
    return problems
