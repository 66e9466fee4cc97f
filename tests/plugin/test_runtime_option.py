"""``--runtimefaults-runtime``: a user's typo is a usage error, a runtime the host lacks a skip.

No root and no runtime needed: the checks happen when pytest configures, before
any test (issue 11, part 2).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pytest_runtimefaults.runtime import KNOWN_RUNTIMES, RuntimeNotFound, resolve_runtime

pytestmark = pytest.mark.timeout(120)

USES_RUNTIME = "def test_x(runtime): pass"


def test_a_runtime_path_that_does_not_exist_is_a_usage_error(pytester: pytest.Pytester) -> None:
    # Before: exit 0, every test skipped, advice "apt-get install /nonexistent/runc".
    pytester.makepyfile(USES_RUNTIME)
    result = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "--runtimefaults-runtime=/nonexistent/runc"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "ERROR: --runtimefaults-runtime=/nonexistent/runc: OCI runtime "
            "'/nonexistent/runc' not found: no such file (check the path)"
        ]
    )
    assert "apt-get install" not in result.stderr.str() + result.stdout.str()


def test_a_misspelled_runtime_name_says_which_names_are_known(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(USES_RUNTIME)
    result = pytester.runpytest_subprocess("-p", "runtimefaults", "--runtimefaults-runtime=rnuc")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "ERROR: --runtimefaults-runtime=rnuc: unknown OCI runtime 'rnuc': not on PATH and "
            "not one of the known names runc, crun, youki; give one of those or the path of "
            "an OCI runtime CLI"
        ]
    )


def test_the_ini_key_is_checked_the_same_way(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(USES_RUNTIME)
    pytester.makeini("[pytest]\nruntimefaults_runtime = /nonexistent/crun\n")
    result = pytester.runpytest_subprocess("-p", "runtimefaults")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: ini runtimefaults_runtime=/nonexistent/crun: *not found*"])


def test_a_path_that_is_not_an_executable_file_is_a_usage_error(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(USES_RUNTIME)
    not_executable = pytester.path / "runc"
    not_executable.write_text("#!/bin/sh\n")
    for spec in (str(not_executable), str(pytester.path)):
        result = pytester.runpytest_subprocess(
            "-p", "runtimefaults", f"--runtimefaults-runtime={spec}"
        )
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines([f"*OCI runtime '{spec}' is not an executable file*"])


@pytest.mark.needs("root")  # else the skip names root, not the missing runtime
@pytest.mark.skipif(shutil.which("youki") is not None, reason="youki is installed here")
def test_a_known_runtime_that_is_not_installed_still_skips_with_how_to_get_it(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(USES_RUNTIME)
    result = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "--runtimefaults-runtime=youki", "-rs"
    )
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*OCI runtime 'youki' not found on PATH (youki is not packaged*"])
    strict = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "--runtimefaults-runtime=youki", "--runtimefaults-strict"
    )
    strict.assert_outcomes(errors=1)


def test_resolve_runtime_tells_the_three_cases_apart(tmp_path: Path) -> None:
    with pytest.raises(RuntimeNotFound) as missing_path:
        resolve_runtime(str(tmp_path / "runc"))
    assert missing_path.value.kind == "path"
    assert missing_path.value.usage_error
    with pytest.raises(RuntimeNotFound) as unknown:
        resolve_runtime("cruun")
    assert unknown.value.kind == "unknown"
    assert unknown.value.usage_error
    assert all(name in str(unknown.value) for name in KNOWN_RUNTIMES)
    with pytest.raises(FileNotFoundError):  # still the exception old callers catch
        resolve_runtime("")
    # Any other runtime on PATH is accepted by name, and any executable by path.
    tool = tmp_path / "my-oci-runtime"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert resolve_runtime(str(tool)) == str(tool)
    assert resolve_runtime("sh") == os.path.abspath(shutil.which("sh") or "")
    for name in KNOWN_RUNTIMES:
        if shutil.which(name) is None:
            with pytest.raises(RuntimeNotFound) as known:
                resolve_runtime(name)
            assert known.value.kind == "missing"
            assert not known.value.usage_error
            assert known.value.remedy
