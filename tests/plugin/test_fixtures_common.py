"""fixtures._common: the option lookup, the capability checks and the factory helper."""

from __future__ import annotations

import logging

import pytest

from pytest_runtimefaults.fixtures._common import Instances


class _Thing:
    def __init__(self, name: str, log: list[str], error: BaseException | None = None) -> None:
        self.name, self.log, self.error = name, log, error

    def stop(self) -> None:
        self.log.append(self.name)
        if self.error is not None:
            raise self.error


def test_instances_stop_every_one_newest_first_and_raise_the_first_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log: list[str] = []
    first, second = RuntimeError("c failed"), OSError("a failed")
    caplog.set_level(logging.DEBUG, logger="pytest_runtimefaults")
    made = Instances()
    for thing in (_Thing("a", log, second), _Thing("b", log), _Thing("c", log, first)):
        assert made.push(thing) is thing
    assert [t.name for t in made.made] == ["a", "b", "c"]
    with pytest.raises(RuntimeError, match="c failed") as raised:
        made.__exit__(None, None, None)
    assert log == ["c", "b", "a"]  # every one, even after the first failed
    assert raised.value is first
    assert any("a failed" in note for note in getattr(first, "__notes__", []))
    # Both failures are in the log, with their tracebacks.
    logged = [r for r in caplog.records if r.name == "pytest_runtimefaults" and r.exc_info]
    assert len(logged) == 2


def test_instances_let_the_block_error_win_and_stop_anyway() -> None:
    log: list[str] = []

    def body() -> None:
        with Instances() as made:
            made.push(_Thing("a", log, OSError("stop failed")))
            made.push(_Thing("b", log), stop=lambda: log.append("custom b"))
            raise KeyError("the test's own error")

    with pytest.raises(KeyError):
        body()
    assert log == ["custom b", "a"]


def test_instances_close_is_idempotent() -> None:
    log: list[str] = []
    made = Instances()
    made.push(_Thing("a", log))
    made.close()
    made.close()
    assert log == ["a"]


def test_option_prefers_the_command_line_then_the_ini(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nruntimefaults_swarm_size = 7\nruntimefaults_leak_checks = -fds\n")
    pytester.makeconftest(
        """
        from pytest_runtimefaults.fixtures._common import option, option_int, option_text

        def pytest_report_header(config):
            return [
                f"swarm={option_int(config, 'swarm_size')!r}",
                f"leaks={option_text(config, 'leak_checks')!r}",
                f"strict={option(config, 'strict')!r}",
            ]
        """
    )
    pytester.makepyfile("def test_x(): pass")
    ini = pytester.runpytest_subprocess("-p", "runtimefaults")
    ini.stdout.fnmatch_lines(["swarm=7", "leaks='-fds'", "strict=False"])
    cli = pytester.runpytest_subprocess(
        "-p",
        "runtimefaults",
        "--runtimefaults-swarm-size=3",
        "--runtimefaults-leak-checks=none",
        "--runtimefaults-strict",
    )
    cli.stdout.fnmatch_lines(["swarm=3", "leaks='none'", "strict=True"])


def test_a_bad_ini_number_names_the_key(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nruntimefaults_swarm_size = many\n")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "runtimefaults")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ini runtimefaults_swarm_size must be an integer, got 'many'*"])
