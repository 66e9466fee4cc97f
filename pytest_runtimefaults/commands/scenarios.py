"""``runtimefaults scenarios``: run the shipped fault scenarios (the main job) and gate on them.

It runs pytest over :mod:`pytest_runtimefaults.scenarios`, reads each
scenario's verdict from the JSON report, and decides with
:func:`pytest_runtimefaults.verdicts.gate`: a verdict that is not acceptable
(not survived / failed cleanly) is a *defect*; a defect is *known* when the
expectations table says that component and version does that under that
fault, or when the ``--baseline`` file lists it.  Exit status:

* 0: every defect is known (and every scenario reached a verdict);
* 1: a new defect, a scenario that could not reach a verdict, or no
  scenario at all (pytest's exit 5);
* 2: a bad argument (a baseline that cannot be read, an unknown family);
  pytest's own 2-4 (interrupted, internal error, usage error) are passed on.

A row of the table that the run contradicts with an acceptable outcome (the
row says blocks, the run survived) is printed as ``changed: update the
expectations row``: loud, but exit 0, since the runtime did nothing wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Run", "markdown_summary", "register", "scenario_argv", "table_lines"]

#: pytest's exit codes the command passes on as they are
_PASSED_ON = {2: "interrupted", 3: "internal error", 4: "usage error"}


def register(subparsers: Any) -> None:
    from pytest_runtimefaults.verdicts import FAMILIES

    parser = subparsers.add_parser(
        "scenarios",
        help="run the shipped fault scenarios against a real runtime and gate on their "
        "verdicts (the main job)",
        description="Run the incident scenarios shipped in pytest_runtimefaults.scenarios "
        "with pytest and this plugin: a sandboxed systemd with its own dbus-daemon, the "
        "D-Bus fault proxy, and the runtime under test (runc by default). Each scenario "
        "ends in a verdict (survived, failed cleanly, blocked, leaked, misbehaved, "
        "crashed); exit 0 when every defect found is known (the expectations table, "
        "--baseline), 1 when one is new. Arguments after -- go to pytest.",
        epilog="examples:\n"
        "  runtimefaults scenarios\n"
        "  runtimefaults scenarios --runtime /usr/bin/crun --only dbus,serials\n"
        "  runtimefaults scenarios --write-baseline known.jsonl\n"
        "  runtimefaults scenarios --baseline known.jsonl --junitxml junit.xml "
        "--summary summary.md\n"
        "  runtimefaults scenarios --list",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--runtime",
        default="runc",
        help="runtime under test: runc, crun, youki or a path (default runc)",
    )
    parser.add_argument(
        "--daemon",
        action="append",
        default=[],
        metavar="CMD",
        help="the daemon of the sockets scenarios: containerd, dbus-daemon, or a command "
        "line with {socket} where its socket path goes (repeatable; default containerd "
        "and dbus-daemon)",
    )
    parser.add_argument(
        "--only",
        default=None,
        metavar="FAMILIES",
        help=f"run only these families, comma-separated: {', '.join(FAMILIES)} "
        "(incidents 1-5; default all)",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="FILE",
        help="your known defects (written by --write-baseline): a defect listed there is not new",
    )
    parser.add_argument(
        "--write-baseline",
        default=None,
        metavar="FILE",
        help="write every defect this run found to FILE (one JSON line each)",
    )
    parser.add_argument(
        "--no-expectations",
        action="store_true",
        help="ignore the expectations table: only --baseline makes a defect known",
    )
    parser.add_argument(
        "--report",
        default="runtimefaults-scenarios.json",
        metavar="FILE",
        help="JSON report of the run, verdicts included (default %(default)s; '' for none)",
    )
    parser.add_argument(
        "--junitxml", default=None, metavar="FILE", help="also write pytest's JUnit XML to FILE"
    )
    parser.add_argument(
        "--summary",
        default=None,
        metavar="FILE",
        help="write the Markdown summary to FILE (it is appended to $GITHUB_STEP_SUMMARY "
        "whenever that is set)",
    )
    parser.add_argument(
        "--matrix",
        default=None,
        metavar="DISTROS",
        help="run the job in each Debian rootfs of scripts/distro (comma-separated: debian12, "
        "debian13, sid; needs a source checkout) and print one table with a column per "
        "(distro, runtime version); each column is gated on its own",
    )
    parser.add_argument("-k", dest="keyword", default=None, help="only scenarios matching")
    parser.add_argument(
        "--list",
        action="store_true",
        help="list every scenario with its incident, family and what it checks; run nothing",
    )
    parser.add_argument(
        "pytest_args", nargs=argparse.REMAINDER, help="extra pytest arguments, after --"
    )
    parser.set_defaults(func=_scenarios)


def _families(args: argparse.Namespace) -> list[str]:
    from pytest_runtimefaults.verdicts import FAMILIES

    if not args.only:
        return []
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise _ArgumentError(
            f"--only {args.only}: unknown famil{'ies' if len(unknown) > 1 else 'y'} "
            f"{', '.join(unknown) or '(none given)'}; choose among {', '.join(FAMILIES)}"
        )
    return names


class _ArgumentError(Exception):
    """A bad argument: printed as one line, exit 2."""


def _config(config_dir: str) -> str:
    # A config file of our own, so that the caller's pytest.ini/pyproject (its addopts,
    # its testpaths, its conftest) does not change what the scenarios do.
    config = os.path.join(config_dir, "pytest.ini")
    with open(config, "w") as f:
        f.write("[pytest]\n")
    return config


def _runtime_arg(spec: str) -> str:
    return os.path.abspath(spec) if os.sep in spec else spec


def scenario_argv(
    args: argparse.Namespace, config_dir: str, report: str | None = None
) -> list[str]:
    """The pytest command line of a scenarios run (*report*: the JSON report's path)."""
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-c",
        _config(config_dir),
        "--rootdir",
        config_dir,
        "-p",
        "runtimefaults",
        "-p",
        "no:cacheprovider",
        "-ra",
        "--pyargs",
        "pytest_runtimefaults.scenarios",
        # pytest runs in config_dir (see _scenarios): a runtime given by a relative path
        # must not change meaning.
        f"--runtimefaults-runtime={_runtime_arg(args.runtime)}",
    ]
    if report:
        argv.append(f"--runtimefaults-report={os.path.abspath(report)}")
    families = _families(args)
    if families:
        argv.append(f"--runtimefaults-families={','.join(families)}")
    if args.junitxml:
        argv.append(f"--junitxml={os.path.abspath(args.junitxml)}")
    if args.keyword:
        argv += ["-k", args.keyword]
    argv += [f"--runtimefaults-daemon={d}" for d in args.daemon]
    extra = [a for a in args.pytest_args if a != "--"]
    return argv + extra


# --- --list: collect, never run -------------------------------------------------------


@dataclass(frozen=True)
class Listed:
    """One collected scenario, for ``--list``."""

    nodeid: str
    family: str | None
    incident: int | None
    checks: str


class _Lister:
    """A pytest plugin object: remembers every collected item, then runs nothing."""

    def __init__(self) -> None:
        self.items: list[Listed] = []

    def pytest_collection_finish(self, session: Any) -> None:
        from pytest_runtimefaults.fixtures.verdicts import scenario_family

        for item in session.items:
            family, incident = scenario_family(item)
            doc = (getattr(getattr(item, "obj", None), "__doc__", None) or "").strip()
            checks = doc.splitlines()[0] if doc else "(no docstring: say what it checks)"
            self.items.append(Listed(item.nodeid, family, incident, checks))


def list_scenarios(args: argparse.Namespace, config_dir: str) -> tuple[int, list[Listed]]:
    """Collect the scenarios in this process (``--collect-only``: nothing boots)."""
    import pytest

    # No "python -m pytest", and no -ra: the terminal reporter that owns it is off.
    argv = [a for a in scenario_argv(args, config_dir)[3:] if a != "-ra"]
    lister = _Lister()
    # From config_dir, as the run: not from a checkout whose ./tests/conftest.py would load.
    here = os.getcwd()
    os.chdir(config_dir)
    try:
        rc = pytest.main(
            [*argv, "--collect-only", "--runtimefaults-no-reap", "-p", "no:terminal"],
            plugins=[lister],
        )
    finally:
        os.chdir(here)
    return int(rc), lister.items


def _print_list(items: list[Listed]) -> None:
    for it in items:
        where = f"incident {it.incident}" if it.incident is not None else "no incident"
        print(f"{it.nodeid}\n    {where}, family {it.family or '-'}: {it.checks}")
    print(f"{len(items)} scenario(s)")


# --- the run and its reports ---------------------------------------------------------


@dataclass
class Run:
    """What a scenarios run gave: the report's tests, findings and the gate's decision."""

    report: dict[str, Any]
    pytest_rc: int
    header: str
    baseline_used: bool = False
    use_table: bool = True

    def __post_init__(self) -> None:
        from pytest_runtimefaults.verdicts import findings_from_report

        self.findings = findings_from_report(self.report)
        by_id = {f.scenario: f for f in self.findings}
        #: tests that could not reach a verdict (failed, errored) or skipped: (nodeid, outcome)
        self.without = [
            (t["nodeid"], t["outcome"])
            for t in self.report.get("tests") or ()
            if t["nodeid"] not in by_id or t["outcome"] in ("failed", "error")
        ]
        # A scenario that passed without recording a verdict checked nothing the gate
        # can use: as much an error as one that failed.
        self.errors = [(n, o) for n, o in self.without if o != "skipped"]

    def decide(self, baseline: Any) -> Any:
        from pytest_runtimefaults.verdicts import gate

        ran = [t["nodeid"] for t in self.report.get("tests") or ()]
        self.gate = gate(self.findings, baseline, ran=ran, use_table=self.use_table)
        return self.gate

    @property
    def exit_code(self) -> int:
        if self.pytest_rc in _PASSED_ON:
            return self.pytest_rc
        if self.pytest_rc == 5 or not self.report.get("tests"):
            return 1
        if self.errors or self.gate.new or self.pytest_rc != 0:
            return 1
        return 0

    def status(self, finding: Any) -> str:
        """The gate's word for one finding: ok, known (table), known (baseline), NEW, changed."""
        if finding in self.gate.new:
            return "NEW"
        if finding in self.gate.changed:
            return "changed"
        why = self.gate.known(finding)
        return f"known ({why})" if why else "ok"


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _name(nodeid: str) -> str:
    return nodeid.split("::", 1)[-1]


def _rows(run: Run) -> list[tuple[str, str, str, str, str, str]]:
    rows = []
    for f in run.findings:
        secs = f"{f.seconds:.1f} s" if f.seconds is not None else ""
        rows.append((_name(f.scenario), f.family or "-", f.shown, run.status(f), secs, f.evidence))
    for nodeid, outcome in run.without:
        what = "skipped" if outcome == "skipped" else f"no verdict ({outcome})"
        note = "see the pytest output above" if outcome != "skipped" else ""
        rows.append((_name(nodeid), "-", what, "ERROR" if outcome != "skipped" else "", "", note))
    return rows


def _verdict_lines(run: Run) -> list[str]:
    """The lines after the table: new defects, changed rows, baseline entries not seen."""
    g = run.gate
    lines = []
    for f in g.new:
        known = f" (its row says {'/'.join(o.value for o in f.known)})" if f.known else ""
        lines.append(
            f"NEW defect: {f.scenario}: {f.component} {f.version or '(version unknown)'} "
            f"{f.shown} under {f.fault}{known}"
        )
    lines += [f"note: {n}" for n in g.notes]
    for f in g.changed:
        lines.append(
            f"changed: {f.component} {f.version} {f.shown} under {f.fault}, but its expectations "
            f"row says {'/'.join(o.value for o in f.known)}: update the expectations row "
            "(pytest_runtimefaults/expectations.py); not a failure of this runtime"
        )
    for e in g.unseen:
        lines.append(
            f"baseline: {e.scenario} | {e.component} | {e.fault} ({e.outcome.value}) was not "
            "seen any more: fixed? update your baseline"
        )
    for nodeid, outcome in run.errors:
        lines.append(f"ERROR: {nodeid}: {outcome} without recording a verdict")
    return lines


def _totals(run: Run) -> str:
    g = run.gate
    known = len(g.known_by_table) + len(g.known_by_baseline)
    parts = [
        f"{len(run.findings)} verdict(s)",
        f"{len(g.fine)} acceptable",
        f"{known} known defect(s)",
        f"{len(g.new)} new",
    ]
    if g.changed:
        parts.append(f"{len(g.changed)} changed row(s)")
    if g.unseen:
        parts.append(
            f"{len(g.unseen)} baseline entr{'y' if len(g.unseen) == 1 else 'ies'} not seen"
        )
    if run.errors:
        parts.append(f"{len(run.errors)} without a verdict")
    return ", ".join(parts)


def table_lines(run: Run, width: int = 60) -> list[str]:
    """The terminal table: a header naming the versions, a row per scenario, the gate's lines."""
    rows = [("scenario", "family", "verdict", "gate", "time", "evidence"), *_rows(run)]
    rows = [(_short(r[0], width), *r[1:5], _short(r[5], 90)) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    out = [run.header]
    for r in rows:
        out.append("  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5])
    out += _verdict_lines(run)
    out.append(f"exit {run.exit_code}: {_totals(run)}")
    return out


def _md(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def markdown_summary(run: Run) -> str:
    """The Markdown summary (``--summary``, ``$GITHUB_STEP_SUMMARY``)."""
    mark = "✅" if run.exit_code == 0 else "❌"
    lines = [
        f"## {mark} runtimefaults scenarios: {_md(run.header)}",
        "",
        f"**exit {run.exit_code}**: {_totals(run)}",
        "",
        "| scenario | family | verdict | gate | time | evidence |",
        "|---|---|---|---|---|---|",
    ]
    for r in _rows(run):
        lines.append(
            "| "
            + " | ".join(f"`{_md(r[0])}`" if i == 0 else _md(c) for i, c in enumerate(r))
            + " |"
        )
    extra = _verdict_lines(run)
    if extra:
        lines += ["", *(f"- {_md(line)}" for line in extra)]
    return "\n".join(lines) + "\n"


def _header(args: argparse.Namespace, report: dict[str, Any]) -> str:
    from pytest_runtimefaults.runtime import RuntimeNotFound, resolve_runtime
    from pytest_runtimefaults.scenarios import runtime_identity

    env = report.get("environment") or {}
    try:
        binary = resolve_runtime(args.runtime)
        name, version = runtime_identity(
            argparse.Namespace(name=os.path.basename(binary), binary=binary)
        )
        runtime = f"{name} {version or '(version unknown)'} ({binary})"
    except RuntimeNotFound:
        runtime = f"{args.runtime} (not found)"
    parts = [
        f"runtime {runtime}",
        f"systemd {env.get('systemd') or '?'}",
        f"dbus-daemon {env.get('dbus-daemon') or '?'}",
    ]
    if env.get("distro"):
        parts.append(str(env["distro"]))
    return " · ".join(parts)


def _load_baseline(args: argparse.Namespace) -> Any:
    from pytest_runtimefaults.verdicts import Baseline, BaselineError

    if not args.baseline:
        return None
    try:
        return Baseline.load(args.baseline)
    except BaselineError as exc:
        raise _ArgumentError(str(exc)) from None


def _check_writable(path: str | None, option: str) -> None:
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise _ArgumentError(f"{option} {path}: its directory does not exist")


def _scenarios(args: argparse.Namespace) -> int:
    try:
        _families(args)
        baseline = _load_baseline(args)
        for path, option in (
            (args.write_baseline, "--write-baseline"),
            (args.summary, "--summary"),
            (args.report, "--report"),
            (args.junitxml, "--junitxml"),
        ):
            _check_writable(path, option)
    except _ArgumentError as exc:
        print(f"runtimefaults scenarios: {exc}", file=sys.stderr)
        return 2
    if args.matrix:
        return _matrix(args)
    with tempfile.TemporaryDirectory(prefix="rf-scenarios-") as tmp:
        if args.list:
            rc, items = list_scenarios(args, tmp)
            if rc not in (0, 5):
                print(f"runtimefaults scenarios: collecting failed (pytest exit {rc})")
                return int(rc)
            _print_list(items)
            return 0 if items else 1
        report_path = args.report or os.path.join(tmp, "report.json")
        # A report left by an earlier run must never be read as this run's.
        Path(report_path).unlink(missing_ok=True)
        argv = scenario_argv(args, tmp, report_path)
        print("runtimefaults scenarios:", " ".join(argv[1:]), flush=True)
        # In the temp dir: started in a checkout, pytest would load the conftest.py of
        # ./tests (its initial conftests include the invocation dir's test* dirs).
        rc = subprocess.call(argv, cwd=tmp)
        try:
            report = json.loads(Path(report_path).read_text())
        except (OSError, ValueError) as exc:
            why = _PASSED_ON.get(rc, f"exit {rc}")
            print(
                f"runtimefaults scenarios: pytest ended ({why}) without a readable report "
                f"{report_path}: {exc}",
                file=sys.stderr,
            )
            return rc if rc in _PASSED_ON else 1
    return _finish(
        args, Run(report, rc, _header(args, report), use_table=not args.no_expectations), baseline
    )


def _finish(args: argparse.Namespace, run: Run, baseline: Any) -> int:
    from pytest_runtimefaults.verdicts import Baseline

    run.decide(baseline)
    if run.pytest_rc == 5:
        print(
            "runtimefaults scenarios: no scenario ran (exit 5): that is a failure", file=sys.stderr
        )
    print()
    for line in table_lines(run):
        print(line)
    summary = markdown_summary(run)
    if args.summary:
        Path(args.summary).write_text(summary)
        print(f"summary written to {args.summary}")
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        try:
            with open(step_summary, "a") as f:  # GitHub appends each step's part
                f.write(summary)
        except OSError as exc:
            print(
                f"runtimefaults scenarios: $GITHUB_STEP_SUMMARY {step_summary}: {exc}",
                file=sys.stderr,
            )
    if args.write_baseline:
        written = Baseline.from_findings(run.findings)
        written.write(args.write_baseline)
        print(f"baseline: wrote {len(written.entries)} defect(s) to {args.write_baseline}")
    return run.exit_code


# --- --matrix: the job in each distro rootfs, one table ------------------------------

#: scripts/distro's names, as the matrix's column labels say them
_DISTROS = {"debian12": "debian12", "bookworm": "debian12", "debian13": "debian13",
            "trixie": "debian13", "sid": "sid"}  # fmt: skip


def _distro_script() -> Path:
    script = Path(__file__).resolve().parents[2] / "scripts" / "distro"
    if not script.is_file():
        raise _ArgumentError(
            f"--matrix runs scripts/distro of a source checkout, and {script} is not there: "
            "run it from a clone of pytest-runtimefaults"
        )
    return script


def _inner_argv(args: argparse.Namespace, baseline_inside: str | None) -> list[str]:
    """The ``runtimefaults scenarios`` command line run inside each rootfs (in /src)."""
    argv = [".venv/bin/runtimefaults", "scenarios", "--runtime", args.runtime,
            "--report", "/results/scenarios.json", "--junitxml", "/results/junit.xml",
            "--summary", "/results/summary.md"]  # fmt: skip
    if args.only:
        argv += ["--only", args.only]
    if args.keyword:
        argv += ["-k", args.keyword]
    for daemon in args.daemon:
        argv += ["--daemon", daemon]
    if args.no_expectations:
        argv.append("--no-expectations")
    if baseline_inside:
        argv += ["--baseline", baseline_inside]
    extra = [a for a in args.pytest_args if a != "--"]
    return argv + (["--", *extra] if extra else [])


@dataclass
class Column:
    """One distro's run in the matrix."""

    distro: str
    rc: int
    run: Run | None  # None: no readable report
    label: str


def _column_label(distro: str, run: Run | None, versions: dict[str, Any], runtime: str) -> str:
    component, version = runtime, versions.get(runtime)
    if run is not None and run.findings:
        component = run.findings[0].component
        version = run.findings[0].version or version
    return f"{distro}: {component} {version or '?'}"


def matrix_lines(columns: list[Column]) -> list[str]:
    """The matrix as a Markdown table: a row per scenario, a column per (distro, runtime)."""
    names: dict[str, None] = {}
    cells: dict[tuple[str, int], str] = {}
    for i, col in enumerate(columns):
        if col.run is None:
            continue
        for f in col.run.findings:
            names.setdefault(_name(f.scenario))
            status = col.run.status(f)
            cells[(_name(f.scenario), i)] = f.shown + ("" if status == "ok" else f" ({status})")
        for nodeid, outcome in col.run.without:
            names.setdefault(_name(nodeid))
            cells.setdefault((_name(nodeid), i), outcome if outcome == "skipped" else
                             f"no verdict ({outcome})")  # fmt: skip
    lines = [
        "| scenario | " + " | ".join(_md(c.label) for c in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for name in names:
        row = [cells.get((name, i), "") for i in range(len(columns))]
        lines.append(f"| `{_md(name)}` | " + " | ".join(_md(c) for c in row) + " |")
    lines.append(
        "| **exit** | "
        + " | ".join(
            str(c.run.exit_code) if c.run is not None else f"no report (exit {c.rc})"
            for c in columns
        )
        + " |"
    )
    return lines


def _matrix(args: argparse.Namespace) -> int:
    from pytest_runtimefaults.verdicts import Baseline

    try:
        script = _distro_script()
        distros = [d.strip() for d in args.matrix.split(",") if d.strip()]
        bad = [d for d in distros if d not in _DISTROS]
        if bad or not distros:
            raise _ArgumentError(
                f"--matrix {args.matrix}: unknown distro {', '.join(bad) or '(none given)'}; "
                f"choose among {', '.join(sorted(set(_DISTROS.values())))}"
            )
        if args.list:
            raise _ArgumentError("--matrix runs the job; --list with it lists nothing more")
        baseline = _load_baseline(args)
    except _ArgumentError as exc:
        print(f"runtimefaults scenarios: {exc}", file=sys.stderr)
        return 2
    stem = Path(args.report or "runtimefaults-scenarios.json")
    root = stem.with_name(stem.stem + "-matrix")
    columns = []
    for name in distros:
        distro = _DISTROS[name]
        results = root / distro
        results.mkdir(parents=True, exist_ok=True)
        (results / "scenarios.json").unlink(missing_ok=True)
        inside = None
        if args.baseline:
            Path(results / "baseline.jsonl").write_text(Path(args.baseline).read_text())
            inside = "/results/baseline.jsonl"
        argv = [sys.executable, str(script), "--results", str(results), distro,
                *_inner_argv(args, inside)]  # fmt: skip
        print(f"runtimefaults scenarios --matrix: {' '.join(argv[1:])}", flush=True)
        rc = subprocess.call(argv)
        run = None
        versions: dict[str, Any] = {}
        try:
            report = json.loads((results / "scenarios.json").read_text())
            info = json.loads((results / "distro.json").read_text())
            versions = dict(info.get("versions") or {})
        except (OSError, ValueError) as exc:
            print(f"runtimefaults scenarios --matrix: {distro}: no report ({exc})", file=sys.stderr)
        else:
            run = Run(report, 0 if rc in (0, 1) else rc, distro, use_table=not args.no_expectations)
            run.decide(baseline)
        columns.append(Column(distro, rc, run, _column_label(distro, run, versions, args.runtime)))
    lines = matrix_lines(columns)
    print()
    for line in lines:
        print(line)
    codes = [c.run.exit_code if c.run is not None else 1 for c in columns]
    code = max(codes) if codes else 1
    summary = "## runtimefaults scenarios --matrix\n\n" + "\n".join(lines) + "\n"
    if args.summary:
        Path(args.summary).write_text(summary)
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(os.environ["GITHUB_STEP_SUMMARY"], "a") as f:
            f.write(summary)
    if args.write_baseline:
        found = [f for c in columns if c.run is not None for f in c.run.findings]
        Baseline.from_findings(found).write(args.write_baseline)
    per = ", ".join(f"{c.distro} {x}" for c, x in zip(columns, codes, strict=True))
    print(f"exit {code}: per distro {per}; reports in {root}/")
    return code
