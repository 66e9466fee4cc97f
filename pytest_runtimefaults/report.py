"""What a run measured: per-test figures, the terminal summary and the JSON report.

Each test's figures (faults applied, recovery time, leaks, failure-budget
figures) travel inside its ``TestReport.user_properties``: as one JSON property
``runtimefaults`` that the controller reads back, and as flat
``runtimefaults.*`` properties that JUnit XML shows.  ``user_properties`` are
serialised by pytest-xdist from the workers to the controller and written by
``--junitxml``, so the figures survive ``pytest -n`` without a channel of
their own.

Example::

    figures = TestFigures(faults=[{"name": "delay", "applied": 3, "lifted": True}])
    item.user_properties.extend(figures.properties())
    ...
    collector = ReportCollector(seed=42)
    collector.add(report)          # in pytest_runtest_logreport, on the controller
    collector.write_json(path)
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PROPERTY", "ReportCollector", "TestFigures"]

#: Name of the user property that carries a test's figures as JSON.
PROPERTY = "runtimefaults"


@dataclass
class TestFigures:
    """The figures of one test item."""

    __test__ = False  # not a pytest test class, despite the name

    faults: list[dict[str, Any]] = field(default_factory=list)
    recovery: dict[str, Any] | None = None
    leaks: dict[str, list[str]] = field(default_factory=dict)
    budget: dict[str, Any] | None = None

    def empty(self) -> bool:
        return not (self.faults or self.recovery or self.leaks or self.budget)

    def as_dict(self) -> dict[str, Any]:
        return {
            "faults": self.faults,
            "recovery": self.recovery,
            "leaks": self.leaks,
            "budget": self.budget,
        }

    def properties(self) -> list[tuple[str, object]]:
        """User properties: the JSON one, then readable flat ones for JUnit XML."""
        props: list[tuple[str, object]] = [(PROPERTY, json.dumps(self.as_dict(), sort_keys=True))]
        if self.faults:
            props.append((f"{PROPERTY}.faults", ", ".join(f["name"] for f in self.faults)))
        if self.recovery is not None:
            props.append((f"{PROPERTY}.recovered", str(self.recovery["ok"]).lower()))
            props.append((f"{PROPERTY}.recovery_seconds", f"{self.recovery['seconds']:.6f}"))
        if self.leaks:
            props.append(
                (
                    f"{PROPERTY}.leaks",
                    "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(self.leaks.items())),
                )
            )
        if self.budget is not None:
            b = self.budget
            props.append((f"{PROPERTY}.budget_runs", str(b["runs"])))
            props.append((f"{PROPERTY}.budget_failures", str(b["failures"])))
            props.append((f"{PROPERTY}.budget_rate", f"{b['rate']:.6f}"))
            props.append((f"{PROPERTY}.budget_ci95", f"{b['ci95'][0]:.6f}-{b['ci95'][1]:.6f}"))
            props.append((f"{PROPERTY}.budget_passed", str(b["passed"]).lower()))
        return props

    @classmethod
    def from_properties(cls, props: list[tuple[str, object]]) -> TestFigures | None:
        for name, value in props:
            if name == PROPERTY and isinstance(value, str):
                data = json.loads(value)
                return cls(
                    faults=data.get("faults") or [],
                    recovery=data.get("recovery"),
                    leaks=data.get("leaks") or {},
                    budget=data.get("budget"),
                )
        return None


@dataclass
class _TestEntry:
    nodeid: str
    outcome: str = "passed"
    duration: float = 0.0
    figures: TestFigures | None = None
    #: the test's finding (``verdict.record``), as its JSON property carried it
    verdict: dict[str, Any] | None = None


def _verdict(props: Any) -> dict[str, Any] | None:
    # The property name is verdicts.PROPERTY; not imported, to keep this module light.
    for name, value in props:
        if name == "runtimefaults_verdict" and isinstance(value, str):
            data = json.loads(value)
            return data if isinstance(data, dict) else None
    return None


class ReportCollector:
    """Gathers every test's outcome and figures from its reports (controller side)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.tests: dict[str, _TestEntry] = {}
        self.started = time.time()
        #: more top-level keys of the JSON report (version, capabilities...)
        self.extra: dict[str, Any] = {}

    def add(self, report: Any) -> None:
        """Feed one ``TestReport`` (any phase), as ``pytest_runtest_logreport`` sees it."""
        entry = self.tests.setdefault(report.nodeid, _TestEntry(report.nodeid))
        entry.duration += float(getattr(report, "duration", 0.0) or 0.0)
        if report.when == "call" or (report.when == "setup" and not report.passed):
            entry.outcome = report.outcome
        elif report.when == "teardown" and report.failed and entry.outcome == "passed":
            entry.outcome = "error"
        if report.when == "setup" and report.failed:
            entry.outcome = "error"
        if report.when == "call" and hasattr(report, "wasxfail"):
            entry.outcome = "xfailed" if report.skipped else "xpassed"
        if entry.figures is None and report.when == "call":
            entry.figures = TestFigures.from_properties(list(report.user_properties))
        if entry.verdict is None:
            # Any phase: the teardown report carries the properties too, and a
            # verdict recorded before a failing teardown must not be lost.
            entry.verdict = _verdict(report.user_properties)

    # --- aggregates ---------------------------------------------------------

    def _with_figures(self) -> list[_TestEntry]:
        return [t for t in self.tests.values() if t.figures is not None]

    def summary(self) -> dict[str, Any]:
        faults: Counter[str] = Counter()
        recoveries: list[tuple[float, str, bool]] = []
        budgets: list[dict[str, Any]] = []
        leaks = 0
        for t in self._with_figures():
            assert t.figures is not None
            faults.update(f["name"] for f in t.figures.faults)
            if t.figures.recovery is not None:
                r = t.figures.recovery
                recoveries.append((float(r["seconds"]), t.nodeid, bool(r["ok"])))
            if t.figures.budget is not None:
                budgets.append({"nodeid": t.nodeid, **t.figures.budget})
            leaks += sum(len(v) for v in t.figures.leaks.values())
        verdicts = Counter(t.verdict["outcome"] for t in self.tests.values() if t.verdict)
        ok_times = [s for s, _, ok in recoveries if ok]
        worst = max(recoveries, default=None)
        return {
            "tests": len(self.tests),
            "faults_injected": sum(faults.values()),
            "faults_by_name": dict(sorted(faults.items())),
            "recoveries": len(recoveries),
            "recoveries_failed": sum(1 for *_, ok in recoveries if not ok),
            "recovery_median_seconds": statistics.median(ok_times) if ok_times else None,
            "recovery_worst_seconds": worst[0] if worst else None,
            "recovery_worst_test": worst[1] if worst else None,
            "leaks": leaks,
            "budgets": budgets,
            "verdicts": dict(sorted(verdicts.items())),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.extra,
            "seed": self.seed,
            "created": self.started,
            "summary": self.summary(),
            "tests": [
                {
                    "nodeid": t.nodeid,
                    "outcome": t.outcome,
                    "duration": round(t.duration, 6),
                    **(t.figures.as_dict() if t.figures else TestFigures().as_dict()),
                    "verdict": t.verdict,
                }
                for t in self.tests.values()
            ],
        }

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the report atomically (temp file + rename): a CI job never reads half."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.as_dict(), indent=2, sort_keys=True) + "\n")
        tmp.replace(target)
        return target

    def terminal_lines(self) -> list[str]:
        s = self.summary()
        if not (
            s["faults_injected"] or s["recoveries"] or s["budgets"] or s["leaks"] or s["verdicts"]
        ):
            return []
        lines = []
        if s["verdicts"]:
            counts = ", ".join(f"{n} {o}" for o, n in s["verdicts"].items())
            lines.append(f"verdicts: {sum(s['verdicts'].values())} ({counts})")
        by_name = ", ".join(f"{n} x{c}" for n, c in s["faults_by_name"].items())
        if s["faults_injected"]:
            lines.append(f"faults injected: {s['faults_injected']} ({by_name})")
        if s["recoveries"]:
            median = s["recovery_median_seconds"]
            text = f"recoveries: {s['recoveries'] - s['recoveries_failed']} of {s['recoveries']} ok"
            if median is not None:
                text += f"; median {median:.3f} s"
            lines.append(text)
            lines.append(f"  worst {s['recovery_worst_seconds']:.3f} s: {s['recovery_worst_test']}")
        if s["leaks"]:
            lines.append(f"leaks found: {s['leaks']}")
        for b in s["budgets"]:
            low, high = b["ci95"]
            verdict = "ok" if b["passed"] else "EXCEEDED"
            lines.append(
                f"failure budget {verdict}: {b['nodeid']}: {b['failures']}/{b['runs']} failed "
                f"({b['rate']:.1%}, 95 % CI {low:.1%}-{high:.1%}; max {b['max_rate']:.1%})"
            )
        return lines
