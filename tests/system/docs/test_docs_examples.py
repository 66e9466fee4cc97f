"""Every example under docs/examples runs, with the plugin, and passes."""

from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parents[3] / "docs" / "examples").glob("test_*.py"))


def test_examples_exist() -> None:
    assert EXAMPLES, "docs/examples has no test_*.py: the docs would have no tested example"


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_doc_example_passes(pytester: pytest.Pytester, example: Path) -> None:
    pytester.makepyfile(**{example.stem: example.read_text()})
    result = pytester.runpytest_subprocess("-p", "runtimefaults", "-v", "-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    assert result.ret == 0, result.stdout.str()
    assert outcomes.get("passed", 0) >= 1
    assert outcomes.get("skipped", 0) == 0, result.stdout.str()
