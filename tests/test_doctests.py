"""The ``Example::`` blocks in the package's docstrings run and give what they show."""

import doctest
import importlib
import warnings
from pathlib import Path

import pyro
import pytest

#: these tests touch ArviZ, plotting, the examples or the docs: CI runs them on both ArviZ lines
pytestmark = pytest.mark.arviz

PACKAGE = Path(__file__).resolve().parents[1] / "bayes_fusion"
WITH_EXAMPLES = sorted(
    ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    for p in PACKAGE.rglob("*.py")
    if ">>> " in p.read_text()
)


def test_some_modules_have_examples():
    assert {"bayes_fusion.infer.dispatch", "bayes_fusion.infer.svi.loop"} <= set(WITH_EXAMPLES)


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples(name):
    pyro.set_rng_seed(0)
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    with warnings.catch_warnings():
        # an example shows a call and its output; a library's advisory warnings (e.g. ArviZ's
        # Pareto-k note on a tiny example) are printed for its user, not part of the output
        warnings.simplefilter("ignore")
        result = doctest.testmod(module, optionflags=flags, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
