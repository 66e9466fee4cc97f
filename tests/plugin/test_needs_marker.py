"""The suite's ``needs`` marker (tests/conftest.py): skip naming the package, fail when strict.

The inner runs use the suite's own conftest files, copied into the sandbox, with
two needs added (one no host has, one every host has).
"""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).parents[1]
# So that the missing and the present case run on every host.
EXTRA = """
NEEDS["absent"] = Need(lambda: False, "apt-get install absent-package")
NEEDS["sh"] = _command("sh", "dash")
"""


@pytest.fixture
def sandbox(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest((TESTS / "conftest.py").read_text() + EXTRA)
    return pytester


def test_a_missing_need_skips_naming_the_package_and_fails_when_strict(
    sandbox: pytest.Pytester,
) -> None:
    sandbox.makepyfile(
        """
        import pytest

        @pytest.mark.needs("absent")
        def test_missing():
            pass

        @pytest.mark.needs("absent|sh")
        def test_either():
            pass

        @pytest.mark.needs("sh")
        def test_present():
            pass
        """
    )
    result = sandbox.runpytest_subprocess("-p", "runtimefaults", "-rs")
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines(["*needs absent (apt-get install absent-package)"])
    strict = sandbox.runpytest_subprocess("-p", "runtimefaults", "--runtimefaults-strict")
    strict.assert_outcomes(passed=2, errors=1)
    strict.stdout.fnmatch_lines(
        ["*runtimefaults strict mode: needs absent (apt-get install absent-package)"]
    )


def test_an_unknown_need_is_a_usage_error_naming_the_test(sandbox: pytest.Pytester) -> None:
    sandbox.makepyfile(
        """
        import pytest

        @pytest.mark.needs("rnuc")
        def test_typo():
            pass
        """
    )
    result = sandbox.runpytest_subprocess("-p", "runtimefaults")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_typo*needs('rnuc'): unknown need; known: *runc*"])


def test_every_test_under_system_needs_root(sandbox: pytest.Pytester) -> None:
    system = sandbox.mkdir("system")
    (system / "conftest.py").write_text((TESTS / "system" / "conftest.py").read_text())
    check = (
        "def test_{0}(request):\n"
        "    assert [m.args for m in request.node.iter_markers('needs')] == {1}\n"
    )
    (system / "test_in_system.py").write_text(check.format("in_system", [("root",)]))
    sandbox.makepyfile(test_outside=check.format("outside", []))
    result = sandbox.runpytest_subprocess("-p", "runtimefaults", "-rs")
    # As root both pass; otherwise the system test skips for root, naming what to do.
    if result.parseoutcomes().get("skipped"):
        result.stdout.fnmatch_lines(["*needs root (run the tests as root)"])
        result.assert_outcomes(passed=1, skipped=1)
    else:
        result.assert_outcomes(passed=2)
