"""Verdicts: what a scenario found, as data a CI gate can use.

A scenario does not pass or fail on the runtime's behalf: it *records a
verdict* (a :class:`Finding`): what the component did under the fault
(:class:`~pytest_runtimefaults.expectations.Outcome`), the evidence (error
text, time, leftovers), and what the expectations table says that component
and version is known to do.  The test itself passes once a verdict is
recorded, whatever the verdict; it fails only when it could not reach one (an
infrastructure error).  ``runtimefaults scenarios`` then reads the verdicts
from the JSON report and decides (:func:`gate`) with the table and the
user's :class:`Baseline` of known defects.

Example (the ``verdict`` fixture hands a :class:`VerdictRecorder`)::

    @pytest.mark.family("serials", incident=2)
    def test_stall(verdict, runtime, ...):
        ...
        verdict.record(
            Outcome.BLOCKS,
            component="runc",
            fault="systemd:serial-overflow-stall",
            evidence="create still running at the 10 s bound",
            seconds=10.0,
        )

A finding travels as one JSON user property, :data:`PROPERTY`, so the
plugin's JSON report and pytest's JUnit XML both carry it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_runtimefaults import expectations
from pytest_runtimefaults.expectations import ACCEPTABLE, FAULTS, Outcome, Version

__all__ = [
    "DISPLAY",
    "FAMILIES",
    "PROPERTY",
    "Baseline",
    "BaselineError",
    "Finding",
    "GateResult",
    "VerdictRecorder",
    "component_version",
    "family_of",
    "findings_from_report",
    "gate",
]

#: Name of the user property that carries a test's finding as JSON.
PROPERTY = "runtimefaults_verdict"

#: The word a table shows for each outcome.
DISPLAY: dict[Outcome, str] = {
    Outcome.SURVIVES: "survived",
    Outcome.FAILS_CLEANLY: "failed cleanly",
    Outcome.BLOCKS: "blocked",
    Outcome.LEAKS: "leaked",
    Outcome.MISBEHAVES: "misbehaved",
    Outcome.CRASHES: "crashed",
}

#: The scenario families, by the incident of docs/incidents.md they reproduce.
FAMILIES: dict[str, int] = {
    "dbus": 1,
    "serials": 2,
    "sockets": 3,
    "cni": 4,
    "subscribers": 5,
}

_INCIDENT_MODULE = re.compile(r"test_incident(\d+)_")


def family_of(
    nodeid: str, marker: tuple[str | None, int | None] = (None, None)
) -> tuple[str | None, int | None]:
    """``(family, incident)`` of a test: its ``family`` marker, else its module's name.

    A module named ``test_incidentN_*.py`` is incident N, whose family is
    the one :data:`FAMILIES` gives N.

    Example::

        >>> family_of("pytest_runtimefaults/scenarios/test_incident2_systemd_stall.py::test_x")
        ('serials', 2)
    """
    name, incident = marker
    if incident is None:
        m = _INCIDENT_MODULE.search(nodeid.split("::", 1)[0])
        if m is not None:
            incident = int(m.group(1))
    if name is None and incident is not None:
        name = next((f for f, n in FAMILIES.items() if n == incident), None)
    if incident is None and name is not None:
        incident = FAMILIES.get(name)
    return name, incident


def component_version(component: str, executable: str | None = None) -> str | None:
    """``component``'s installed version as a string, or None when it cannot be known.

    A component :mod:`~pytest_runtimefaults.expectations` has no parser for
    (a wrapper, a runtime by an unknown name) is None too: its verdicts are
    then judged on their own merits.
    """
    try:
        version = expectations.installed_version(component, executable)
    except (KeyError, ValueError):
        return None
    return str(version) if version is not None else None


def _outcome(value: Outcome | str) -> Outcome:
    try:
        return Outcome(value)
    except ValueError:
        known = ", ".join(o.value for o in Outcome)
        raise ValueError(f"unknown outcome {value!r}: one of {known}") from None


@dataclass(frozen=True)
class Finding:
    """One scenario's verdict, with everything a report or a gate needs."""

    scenario: str  #: the test's node id
    outcome: Outcome
    component: str
    fault: str
    evidence: str
    version: str | None = None
    family: str | None = None
    incident: int | None = None
    seconds: float | None = None
    leftovers: tuple[str, ...] = ()
    #: the expectations row's outcome for this component and version, or None (no row)
    expected: Outcome | None = None
    #: every outcome the row accepts (its ``outcome`` and ``also``); empty without a row
    known: tuple[Outcome, ...] = ()
    #: :func:`expectations.judge`'s ``ok``: as known, or acceptable without a row
    ok: bool = True
    message: str = ""

    @property
    def defect(self) -> bool:
        """True when the outcome is not acceptable (not survives / fails_cleanly)."""
        return self.outcome not in ACCEPTABLE

    @property
    def key(self) -> tuple[str, str, str]:
        """What a baseline entry is keyed by: scenario, component, fault."""
        return (self.scenario, self.component, self.fault)

    @property
    def shown(self) -> str:
        """The outcome's table word: ``blocked``."""
        return DISPLAY[self.outcome]

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON types (the property's and the JSON report's form)."""
        return {
            "scenario": self.scenario,
            "family": self.family,
            "incident": self.incident,
            "outcome": self.outcome.value,
            "component": self.component,
            "version": self.version,
            "fault": self.fault,
            "evidence": self.evidence,
            "seconds": self.seconds,
            "leftovers": list(self.leftovers),
            "expected": self.expected.value if self.expected is not None else None,
            "known": [o.value for o in self.known],
            "ok": self.ok,
            "message": self.message,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        """The inverse of :meth:`as_dict`; a missing key or a bad outcome raises ValueError."""
        try:
            expected = data.get("expected")
            return cls(
                scenario=str(data["scenario"]),
                outcome=_outcome(data["outcome"]),
                component=str(data["component"]),
                fault=str(data["fault"]),
                evidence=str(data.get("evidence") or ""),
                version=data.get("version"),
                family=data.get("family"),
                incident=data.get("incident"),
                seconds=data.get("seconds"),
                leftovers=tuple(data.get("leftovers") or ()),
                expected=_outcome(expected) if expected else None,
                known=tuple(_outcome(o) for o in data.get("known") or ()),
                ok=bool(data.get("ok", True)),
                message=str(data.get("message") or ""),
            )
        except KeyError as exc:
            raise ValueError(f"a verdict without {exc.args[0]!r}: {dict(data)!r}") from None

    @classmethod
    def from_properties(cls, props: Iterable[tuple[str, object]]) -> Finding | None:
        """The finding among a report's ``user_properties``, or None."""
        for name, value in props:
            if name == PROPERTY and isinstance(value, str):
                return cls.from_dict(json.loads(value))
        return None


class VerdictRecorder:
    """What the ``verdict`` fixture gives a test: :meth:`record` its one verdict.

    Usable without pytest: ``VerdictRecorder("my-check").record(...)`` returns
    the :class:`Finding`; the fixture also stores it on the test item.
    """

    def __init__(
        self,
        scenario: str,
        *,
        family: str | None = None,
        incident: int | None = None,
        properties: list[tuple[str, object]] | None = None,
    ) -> None:
        self.scenario = scenario
        self.family = family
        self.incident = incident
        self._properties = properties
        #: the recorded finding, None until :meth:`record`
        self.finding: Finding | None = None

    def record(
        self,
        outcome: Outcome | str,
        *,
        component: str,
        fault: str,
        evidence: str,
        version: Version | str | None = None,
        seconds: float | None = None,
        leftovers: Iterable[str] = (),
    ) -> Finding:
        """Record the test's verdict: judged against the expectations table, then stored.

        ``version`` defaults to the installed version of ``component``
        (``component --version``; None when that cannot be read).  A fault id
        not in :data:`~pytest_runtimefaults.expectations.FAULTS`, an unknown
        outcome, or a second verdict for the same test raises ValueError.
        """
        if self.finding is not None:
            raise ValueError(
                f"{self.scenario}: a verdict was already recorded ({self.finding.shown} under "
                f"{self.finding.fault}): one test, one verdict"
            )
        observed = _outcome(outcome)
        if fault not in FAULTS:
            raise ValueError(
                f"{self.scenario}: unknown fault id {fault!r}: add it to "
                "pytest_runtimefaults.expectations.FAULTS (known: "
                f"{', '.join(sorted(FAULTS))})"
            )
        if version is None:
            version = component_version(component)
        parsed = version if isinstance(version, Version) or version is None else None
        if isinstance(version, str):
            try:
                parsed = Version.parse(version)
            except ValueError:
                parsed = None  # a version we cannot compare: judged on its own merits
        judged = expectations.judge(component, parsed, fault, observed, evidence)
        row = judged.row
        self.finding = Finding(
            scenario=self.scenario,
            outcome=observed,
            component=component,
            fault=fault,
            evidence=evidence,
            version=str(version) if version is not None else None,
            family=self.family,
            incident=self.incident,
            seconds=round(seconds, 3) if seconds is not None else None,
            leftovers=tuple(sorted(leftovers)),
            expected=row.outcome if row is not None else None,
            known=tuple(sorted(row.outcomes, key=lambda o: o.value)) if row is not None else (),
            ok=judged.ok,
            message=judged.message,
        )
        if self._properties is not None:
            self._properties.extend(properties(self.finding))
        return self.finding


def properties(finding: Finding) -> list[tuple[str, object]]:
    """User properties of a finding: the JSON one, then readable flat ones for JUnit XML."""
    return [
        (PROPERTY, json.dumps(finding.as_dict(), sort_keys=True)),
        (f"{PROPERTY}.outcome", finding.shown),
        (f"{PROPERTY}.fault", finding.fault),
        (f"{PROPERTY}.component", f"{finding.component} {finding.version or '(version unknown)'}"),
    ]


def findings_from_report(report: Mapping[str, Any]) -> list[Finding]:
    """Every finding in a plugin JSON report (``--runtimefaults-report``), in test order."""
    found = []
    for test in report.get("tests") or ():
        data = test.get("verdict")
        if data:
            found.append(Finding.from_dict(data))
    return found


# --- the baseline: the user's own known defects ---------------------------------------


class BaselineError(ValueError):
    """A baseline file that cannot be read: the message names the file and the line."""


_BASELINE_HEADER = (
    "# runtimefaults baseline: the defects this runtime is known to have.\n"
    "# Written by `runtimefaults scenarios --write-baseline FILE`; read with --baseline FILE.\n"
    "# One line per defect: remove a line once the defect is fixed.\n"
    "# key: scenario | component | fault; outcome and version are the ones seen.\n"
)


@dataclass(frozen=True)
class BaselineEntry:
    """One known defect: a scenario, a component and a fault, with what was seen."""

    scenario: str
    component: str
    fault: str
    outcome: Outcome
    version: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.scenario, self.component, self.fault)


@dataclass
class Baseline:
    """The user's known defects, keyed by (scenario, component, fault).

    The file is JSON Lines under a comment header: one defect per line,
    sorted, so that a diff shows each defect added or fixed and deleting a
    line is always valid::

        # runtimefaults baseline: ...
        {"component": "runc", "fault": "systemd:serial-overflow-stall", "outcome": "blocks", ...}
    """

    entries: dict[tuple[str, str, str], BaselineEntry] = field(default_factory=dict)

    @classmethod
    def from_findings(cls, findings: Iterable[Finding]) -> Baseline:
        """Every defect among *findings* (acceptable outcomes are not kept)."""
        entries = {
            f.key: BaselineEntry(f.scenario, f.component, f.fault, f.outcome, f.version)
            for f in findings
            if f.defect
        }
        return cls(entries)

    @classmethod
    def load(cls, path: str | Path) -> Baseline:
        """Read a baseline file; :class:`BaselineError` names the file and line if it is bad."""
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise BaselineError(f"--baseline {p}: cannot read it: {exc.strerror}") from None
        entries: dict[tuple[str, str, str], BaselineEntry] = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                data = json.loads(line)
                entry = BaselineEntry(
                    str(data["scenario"]),
                    str(data["component"]),
                    str(data["fault"]),
                    _outcome(data["outcome"]),
                    data.get("version"),
                )
            except (ValueError, KeyError, TypeError) as exc:
                what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
                raise BaselineError(
                    f"{p}:{number}: not a baseline entry ({what}); each line is a JSON object "
                    "with scenario, component, fault and outcome, as --write-baseline writes"
                ) from None
            entries[entry.key] = entry
        return cls(entries)

    def dumps(self) -> str:
        """The file's text: the header, then one sorted JSON line per defect."""
        lines = [_BASELINE_HEADER.rstrip("\n")]
        for key in sorted(self.entries):
            e = self.entries[key]
            lines.append(
                json.dumps(
                    {
                        "scenario": e.scenario,
                        "component": e.component,
                        "fault": e.fault,
                        "outcome": e.outcome.value,
                        "version": e.version,
                    },
                    sort_keys=True,
                )
            )
        return "\n".join(lines) + "\n"

    def write(self, path: str | Path) -> Path:
        """Write the file atomically (temp file + rename)."""
        target = Path(path)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(self.dumps())
        tmp.replace(target)
        return target


# --- the gate -------------------------------------------------------------------------


@dataclass
class GateResult:
    """What :func:`gate` decided about a run's findings."""

    #: defects that neither the table nor the baseline knows: exit 1
    new: list[Finding] = field(default_factory=list)
    #: defects the expectations table knows for that component and version
    known_by_table: list[Finding] = field(default_factory=list)
    #: defects the baseline knows
    known_by_baseline: list[Finding] = field(default_factory=list)
    #: acceptable outcomes (survived, failed cleanly)
    fine: list[Finding] = field(default_factory=list)
    #: findings whose expectations row says otherwise though the run did fine:
    #: the component changed, update the row (not a failure of the runtime)
    changed: list[Finding] = field(default_factory=list)
    #: baseline entries this run did not see any more (fixed?)
    unseen: list[BaselineEntry] = field(default_factory=list)
    #: baseline entries that matched a finding of another outcome (counted as new)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.new

    def known(self, finding: Finding) -> str | None:
        """``"table"``, ``"baseline"`` or None: why a defect is known."""
        if finding in self.known_by_table:
            return "table"
        if finding in self.known_by_baseline:
            return "baseline"
        return None


def gate(
    findings: Sequence[Finding],
    baseline: Baseline | None = None,
    *,
    ran: Iterable[str] = (),
    use_table: bool = True,
) -> GateResult:
    """Sort a run's findings into new defects, known ones, fine ones and changed rows.

    * an acceptable outcome is fine; if its expectations row says the
      component does something else (a row says blocks, it survived), it is
      also *changed*: the row needs an update (loud, not a failure);
    * a defect is known when the row for that component and version lists
      its outcome, or when the baseline has its key with the same outcome;
      otherwise it is new;
    * a baseline entry whose scenario ran (*ran*: node ids; default: the
      findings' scenarios) but whose defect was not seen is *unseen*.

    With ``use_table=False`` the expectations table is ignored: only the
    baseline makes a defect known (and no row is ever *changed*).
    """
    base = baseline or Baseline()
    result = GateResult()
    seen_defects: set[tuple[str, str, str]] = set()
    for f in findings:
        entry = base.entries.get(f.key)
        if not f.defect:
            result.fine.append(f)
            if use_table and f.expected is not None and f.outcome not in f.known:
                result.changed.append(f)
            continue
        if use_table and f.expected is not None and f.outcome in f.known:
            result.known_by_table.append(f)
        elif entry is not None and entry.outcome is f.outcome:
            result.known_by_baseline.append(f)
        else:
            result.new.append(f)
            if entry is not None:
                result.notes.append(
                    f"{f.scenario}: the baseline knows it {DISPLAY[entry.outcome]}, this run it "
                    f"{f.shown}: a different defect, counted as new"
                )
        if entry is not None and entry.outcome is f.outcome:
            seen_defects.add(f.key)
    scenarios = set(ran) | {f.scenario for f in findings}
    for key, entry in sorted(base.entries.items()):
        if key not in seen_defects and entry.scenario in scenarios:
            result.unseen.append(entry)
    return result
