"""Module paths that moved in 0.2 still import, as the module at the new path, with a
DeprecationWarning naming it; the documented public alias ``bayes_fusion.distributed`` warns not."""

import importlib
import sys
import warnings

import pytest

import bayes_fusion as bf
from bayes_fusion import _moved


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_a_moved_path_imports_the_new_module_with_a_warning(old):
    new = importlib.import_module(_moved.MOVED[old])
    sys.modules.pop(old, None)  # import it afresh, as a user's first import would
    with pytest.warns(DeprecationWarning, match=rf"{old} moved to {_moved.MOVED[old]}"):
        module = importlib.import_module(old)
    assert module is new


def test_old_attribute_and_from_imports_resolve():
    sys.modules.pop("bayes_fusion.direct_elbo", None)
    with pytest.warns(DeprecationWarning, match="bayes_fusion.infer.svi.elbo"):
        from bayes_fusion.direct_elbo import DirectELBO
    from bayes_fusion.infer.svi.elbo import DirectELBO as new

    assert DirectELBO is new
    vars(bf).pop("optim", None)  # an earlier import of the old path set the attribute
    with pytest.warns(DeprecationWarning, match="bayes_fusion.infer.svi.optim"):
        assert (
            bf.optim.FusedClippedAdam
            is importlib.import_module("bayes_fusion.infer.svi.optim").FusedClippedAdam
        )


def test_public_alias_imports_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import bayes_fusion.distributed as dist

    assert dist.ShardPlan is bf.distributed.ShardPlan
    assert bf.distributed.__name__ == "bayes_fusion.infer.svi.distributed"


def test_unknown_attribute_still_raises():
    with pytest.raises(AttributeError, match="no attribute 'marginal'"):
        bf.marginal  # noqa: B018 - removed in 0.2 (OutputMarginal covers it), not moved
