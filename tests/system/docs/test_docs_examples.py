"""Every example under docs/examples runs, with the plugin, and passes."""

from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parents[3] / "docs" / "examples").glob("test_*.py"))


def test_examples_exist() -> None:
    assert EXAMPLES, "docs/examples has no test_*.py: the docs would have no tested example"


#: What an example needs of the host beyond the plugin's own skips (tests/conftest.py's
#: ``needs``): the outer test skips naming it, so that an inner skip stays a failure.
EXAMPLE_NEEDS = {
    "test_cni_cri_pods": "container-cgroups",
    "test_sockets_containerd": "container-cgroups",
    "test_subscribers_containerd": "container-cgroups",
    "test_cni_podman": "podman-cni",
}


@pytest.mark.parametrize(
    "example",
    [
        pytest.param(
            p,
            id=p.stem,
            marks=[pytest.mark.needs(EXAMPLE_NEEDS[p.stem])] if p.stem in EXAMPLE_NEEDS else [],
        )
        for p in EXAMPLES
    ],
)
def test_doc_example_passes(pytester: pytest.Pytester, example: Path) -> None:
    pytester.makepyfile(**{example.stem: example.read_text()})
    result = pytester.runpytest_subprocess("-p", "runtimefaults", "-v", "-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    assert result.ret == 0, result.stdout.str()
    assert outcomes.get("passed", 0) >= 1
    assert outcomes.get("skipped", 0) == 0, result.stdout.str()
