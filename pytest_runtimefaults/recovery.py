"""Recovery: health probes, waiting for a runtime to heal, and failure-rate gates.

This is the library under the ``recovers`` and ``failure_budget`` markers, and
usable without pytest.  A *probe* asks "is the runtime healthy now?" and
raises (or returns ``False``) while it is not:

* :class:`CommandProbe`: a command that must exit 0 (``["ctr", "-a", SOCK, "version"]``);
* :class:`UnixSocketProbe`: a Unix socket that must accept a connection;
* :class:`CallableProbe`: any callable;
* a probe a fixture registered by name (``registry.add_probe("runtime", fn)``).

:func:`wait_until_healthy` polls probes until all of them pass or a bound is
reached and says how long it took; :class:`BudgetResult` judges N runs
against a maximum failure rate with a Wilson 95 % confidence interval.

Example::

    from pytest_runtimefaults.recovery import UnixSocketProbe, wait_until_healthy

    result = wait_until_healthy([UnixSocketProbe("/run/containerd/containerd.sock")], within=5)
    assert result.ok, result.describe()
    print(f"recovered in {result.seconds:.3f} s")
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pytest_runtimefaults.core.log import logger

__all__ = [
    "MAX_BUDGET_RUNS",
    "BudgetResult",
    "BudgetSpec",
    "CallableProbe",
    "CommandProbe",
    "Probe",
    "ProbeFailed",
    "RecoversSpec",
    "RecoveryResult",
    "RegisteredProbe",
    "RunContext",
    "UnixSocketProbe",
    "parse_budget",
    "parse_recovers",
    "resolve_probes",
    "wait_until_healthy",
    "wilson_interval",
]


class ProbeFailed(Exception):
    """A probe found the runtime unhealthy; the message says how."""


class Probe:
    """Something that raises :class:`ProbeFailed` (or any error) while unhealthy."""

    name: str = "probe"

    def check(self, timeout: float) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class CommandProbe(Probe):
    """Healthy when ``argv`` exits 0 within the time left."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        if isinstance(argv, str) or not argv or not all(isinstance(a, str) for a in argv):
            raise TypeError(f"a command probe is a non-empty list of strings, got {argv!r}")
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.name = "command " + " ".join(self.argv)

    def check(self, timeout: float) -> None:
        try:
            proc = subprocess.run(
                self.argv,
                capture_output=True,
                text=True,
                timeout=max(timeout, 0.05),
                env=self.env,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ProbeFailed(f"{self.argv[0]} did not finish within {timeout:.2f} s")
        except OSError as exc:
            raise ProbeFailed(f"cannot run {self.argv[0]}: {exc}")
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ProbeFailed(
                f"exit status {proc.returncode}" + (": " + " | ".join(tail) if tail else "")
            )


class UnixSocketProbe(Probe):
    """Healthy when the Unix stream socket at *path* accepts a connection."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.name = f"socket {self.path}"

    def check(self, timeout: float) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(timeout, 0.05))
            sock.connect(self.path)
        except OSError as exc:
            raise ProbeFailed(f"connect: {exc.strerror or exc}")
        finally:
            sock.close()


class CallableProbe(Probe):
    """Healthy when *fn()* returns anything but ``False`` without raising."""

    def __init__(self, fn: Callable[[], object], name: str | None = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", None) or repr(fn)

    def check(self, timeout: float) -> None:
        if self.fn() is False:
            raise ProbeFailed("returned False")


@dataclass(frozen=True)
class RegisteredProbe:
    """A marker's reference to a probe a fixture registers by *name* at run time."""

    name: str


ProbeSpec = Any  # str | os.PathLike | Sequence[str] | Callable | Probe | RegisteredProbe


def _spec_to_probe_or_ref(spec: ProbeSpec) -> Probe | RegisteredProbe:
    if isinstance(spec, (Probe, RegisteredProbe)):
        return spec
    if isinstance(spec, os.PathLike):
        return UnixSocketProbe(spec)
    if isinstance(spec, str):
        if spec.startswith("/"):
            return UnixSocketProbe(spec)
        if not spec:
            raise ValueError("probe='' is empty: name a registered probe, e.g. probe='runtime'")
        return RegisteredProbe(spec)
    if isinstance(spec, (list, tuple)):
        return CommandProbe(spec)
    if callable(spec):
        return CallableProbe(spec)
    raise ValueError(
        f"probe={spec!r} is not a probe: give a registered probe's name ('runtime'), "
        "a command (list of strings), a Unix socket path (absolute str or Path), or a callable"
    )


def resolve_probes(
    spec: ProbeSpec | None, registered: Mapping[str, Callable[[], object]]
) -> list[Probe]:
    """Turn a marker's ``probe=`` into probes, looking names up in *registered*.

    ``None`` means every registered probe.  Raises ``LookupError`` with what is
    available when a name (or any probe at all) is missing.
    """
    if spec is None:
        if not registered:
            raise LookupError(
                "no health probe: pass recovers(probe=...) (a command, a Unix socket path or "
                "a callable), or use a fixture that registers one (e.g. 'runtime')"
            )
        return [CallableProbe(fn, name) for name, fn in registered.items()]
    item = _spec_to_probe_or_ref(spec)
    if isinstance(item, RegisteredProbe):
        fn = registered.get(item.name)
        if fn is None:
            known = ", ".join(sorted(registered)) or "none"
            raise LookupError(
                f"no probe named {item.name!r} was registered by this test's fixtures "
                f"(registered: {known}); request the fixture that offers it"
            )
        return [CallableProbe(fn, item.name)]
    return [item]


@dataclass
class RecoveryResult:
    """How a wait for health ended."""

    ok: bool
    seconds: float  #: from the start of the wait to the first all-healthy round (or giving up)
    within: float
    attempts: int
    probes: list[str]
    last_error: str | None = None

    def describe(self) -> str:
        if self.ok:
            return f"recovered in {self.seconds:.3f} s ({self.attempts} probe round(s))"
        return (
            f"the runtime did not recover within {self.within:g} s "
            f"(waited {self.seconds:.2f} s, {self.attempts} probe round(s)); "
            f"last error: {self.last_error}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 6),
            "within": self.within,
            "attempts": self.attempts,
            "probes": self.probes,
            "last_error": self.last_error,
        }


def wait_until_healthy(
    probes: Sequence[Probe],
    within: float,
    *,
    interval: float = 0.02,
    max_interval: float = 0.1,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> RecoveryResult:
    """Run every probe until all pass in one round, or *within* seconds passed.

    The poll interval starts at *interval* and doubles up to *max_interval*,
    so a fast recovery is measured finely (to within about 0.1 s plus one
    probe's own time) and a slow one does not busy-loop.
    At least one round always runs, even with ``within=0``.
    """
    start = clock()
    deadline = start + within
    attempts = 0
    last_error: str | None = None
    delay = interval
    while True:
        attempts += 1
        failed = None
        for probe in probes:
            try:
                probe.check(max(deadline - clock(), 0.05))
            except Exception as exc:  # a probe's error is data, not a crash
                logger.debug("probe %s: not healthy yet", probe.name, exc_info=True)
                kind = "" if isinstance(exc, ProbeFailed) else f"{type(exc).__name__}: "
                failed = f"{probe.name}: {kind}{exc}"
                break
        now = clock()
        if failed is None:
            return RecoveryResult(True, now - start, within, attempts, [p.name for p in probes])
        last_error = failed
        if now >= deadline:
            return RecoveryResult(
                False, now - start, within, attempts, [p.name for p in probes], last_error
            )
        sleep(min(delay, max(deadline - now, 0.0)))
        delay = min(delay * 2, max_interval)


def wilson_interval(failures: int, runs: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % for the default *z*).

    Unlike the normal approximation it stays inside [0, 1] and is meaningful
    for 0 failures: 0 of 1000 gives (0, 0.0038), not (0, 0).
    """
    if runs <= 0:
        return (0.0, 1.0)
    p = failures / runs
    denom = 1 + z * z / runs
    centre = (p + z * z / (2 * runs)) / denom
    half = z * math.sqrt(p * (1 - p) / runs + z * z / (4 * runs * runs)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _elide(text: str, limit: int) -> str:
    """Keep the start and the end: a command's error is often at the end of its message."""
    if len(text) <= limit:
        return text
    head = limit // 3
    return f"{text[:head]} ... {text[-(limit - head - 5) :]}"


@dataclass
class BudgetResult:
    """N runs judged against a maximum failure rate."""

    runs: int
    max_rate: float
    failures: int = 0
    completed: int = 0
    first_failures: list[str] = field(default_factory=list)
    keep: int = 3

    def record(self, run: int, error: BaseException | None) -> None:
        self.completed += 1
        if error is None:
            return
        self.failures += 1
        if len(self.first_failures) < self.keep:
            text = " ".join(f"{type(error).__name__}: {error}".split())
            self.first_failures.append(f"run {run}: {_elide(text, 400)}")

    @property
    def rate(self) -> float:
        return self.failures / self.completed if self.completed else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.failures, self.completed)

    @property
    def passed(self) -> bool:
        return self.rate <= self.max_rate

    def describe(self) -> str:
        low, high = self.interval
        return (
            f"{self.failures} of {self.completed} runs failed "
            f"(rate {self.rate:.1%}, 95 % CI {low:.1%}-{high:.1%}; max_rate {self.max_rate:.1%})"
        )

    def failure_message(self) -> str:
        lines = [f"failure budget exceeded: {self.describe()}"]
        if self.first_failures:
            lines.append("first failures:")
            lines.extend(f"  {m}" for m in self.first_failures)
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        low, high = self.interval
        return {
            "runs": self.completed,
            "requested_runs": self.runs,
            "failures": self.failures,
            "rate": self.rate,
            "ci95": [round(low, 6), round(high, 6)],
            "max_rate": self.max_rate,
            "passed": self.passed,
            "first_failures": self.first_failures,
        }


class RunContext:
    """Per-run state of a test repeated by ``failure_budget``.

    Fixtures are set up once per item; what must be fresh for every run is
    created in the test body and handed to :meth:`defer`, which undoes it
    after that run (newest first), whether the run passed or not.  A failing
    cleanup fails its run.

    Example::

        @pytest.mark.failure_budget(runs=100, max_rate=0.01)
        def test_run_rm(runtime, oci_bundle, runtimefaults_run):
            cid = f"c{runtimefaults_run.index}"
            runtimefaults_run.defer(lambda: runtime.delete(cid, force=True))
            runtime.run(cid, oci_bundle).check()
    """

    def __init__(self, runs: int = 1) -> None:
        self.runs = runs
        self.index = 1
        self._deferred: list[Callable[[], object]] = []

    def defer(self, fn: Callable[[], object]) -> None:
        """Call *fn* after the current run (or at teardown outside a budget)."""
        self._deferred.append(fn)

    def finish(self) -> None:
        """Run the deferred calls, newest first; re-raise the first error after all ran."""
        first: BaseException | None = None
        while self._deferred:
            fn = self._deferred.pop()
            try:
                fn()
            except Exception as exc:
                logger.debug("a deferred undo failed", exc_info=True)
                first = first or exc
        if first is not None:
            raise first


# --- marker arguments ---------------------------------------------------------


@dataclass(frozen=True)
class RecoversSpec:
    """Validated arguments of ``@pytest.mark.recovers``."""

    within: float
    probe: ProbeSpec | None = None
    leaks: bool | tuple[str, ...] = True


#: The most runs one ``failure_budget`` may ask for.  An item holds its fixtures
#: for all of them and the report keeps every figure: 100 000 fast runs take
#: minutes, a typo such as ``runs=10**12`` would run for days.
MAX_BUDGET_RUNS = 100_000


@dataclass(frozen=True)
class BudgetSpec:
    """Validated arguments of ``@pytest.mark.failure_budget``."""

    runs: int
    max_rate: float


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def parse_recovers(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> RecoversSpec:
    """Validate ``recovers(within=SECONDS, probe=None, leaks=True)``; ValueError says why."""
    allowed = {"within", "probe", "leaks"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; allowed: within, probe, leaks")
    if len(args) > 1:
        raise ValueError("takes one positional argument (within); give probe= and leaks= by name")
    if args and "within" in kwargs:
        raise ValueError("within given twice")
    if not args and "within" not in kwargs:
        raise ValueError("within=SECONDS is required, e.g. recovers(within=5)")
    within = _number("within", args[0] if args else kwargs["within"])
    if not 0 <= within <= 3600 or math.isinf(within):
        raise ValueError(f"within must be between 0 and 3600 seconds, got {within!r}")
    probe = kwargs.get("probe")
    if probe is not None:
        _spec_to_probe_or_ref(probe)  # raises ValueError/TypeError on a bad spec
    leaks = kwargs.get("leaks", True)
    if isinstance(leaks, str):
        leaks = (leaks,)
    if isinstance(leaks, (list, tuple)):
        if not all(isinstance(n, str) and n for n in leaks):
            raise ValueError(
                f"leaks must be True, False or a list of leak-check names, got {leaks!r}"
            )
        leaks = tuple(leaks)
    elif not isinstance(leaks, bool):
        raise ValueError(f"leaks must be True, False or a list of leak-check names, got {leaks!r}")
    return RecoversSpec(within=within, probe=probe, leaks=leaks)


def parse_budget(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> BudgetSpec:
    """Validate ``failure_budget(runs=N, max_rate=R)``; ValueError says why."""
    if args:
        raise ValueError(
            "give runs= and max_rate= by name, e.g. failure_budget(runs=100, max_rate=0.01)"
        )
    unknown = sorted(set(kwargs) - {"runs", "max_rate"})
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; allowed: runs, max_rate")
    if "runs" not in kwargs or "max_rate" not in kwargs:
        raise ValueError(
            "runs=N and max_rate=R are both required, e.g. failure_budget(runs=100, max_rate=0.01)"
        )
    runs = kwargs["runs"]
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs must be an integer >= 1, got {runs!r}")
    if runs > MAX_BUDGET_RUNS:
        raise ValueError(
            f"runs must be at most {MAX_BUDGET_RUNS:,}, got {runs:,} "
            "(split the budget over several tests or runs of pytest)"
        )
    max_rate = _number("max_rate", kwargs["max_rate"])
    if not 0 <= max_rate < 1:
        raise ValueError(
            f"max_rate must be a fraction in [0, 1), got {max_rate!r} (0.05 means 5 %)"
        )
    return BudgetSpec(runs=runs, max_rate=max_rate)
