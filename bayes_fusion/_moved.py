"""Module paths that moved in 0.2 (see ``CHANGELOG.md``), importable under their old names.

A deprecated path still imports (``import bayes_fusion.direct_elbo``, ``from
bayes_fusion.infer.chains import run_chain``, ``bf.optim``) and resolves to the module at its
new path, with a ``DeprecationWarning`` that names the new path; these aliases go in the next
release. :data:`PUBLIC_ALIASES` are paths the docs show that stay as they are, with no warning.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__all__ = ["MOVED", "PUBLIC_ALIASES", "install"]

#: old module path -> new module path (deprecated: warns on import)
MOVED = {
    "bayes_fusion.compiled": "bayes_fusion.infer.compiled",
    "bayes_fusion.direct_elbo": "bayes_fusion.infer.svi.elbo",
    "bayes_fusion.guides": "bayes_fusion.infer.svi.guides",
    "bayes_fusion.optim": "bayes_fusion.infer.svi.optim",
    "bayes_fusion.linear_gaussian": "bayes_fusion.infer.mcmc.linear_gaussian",
    "bayes_fusion.infer.svi_step": "bayes_fusion.infer.svi.step",
    "bayes_fusion.infer.fused": "bayes_fusion.infer.svi.fused",
    "bayes_fusion.infer.batches": "bayes_fusion.infer.svi.batches",
    "bayes_fusion.infer.nuts": "bayes_fusion.infer.mcmc.nuts",
    "bayes_fusion.infer.chains": "bayes_fusion.infer.mcmc.chains",
    "bayes_fusion.infer.diagnostics": "bayes_fusion.infer.mcmc.diagnostics",
    "bayes_fusion.infer.potential": "bayes_fusion.infer.mcmc.potential",
    "bayes_fusion.infer.output_marginal": "bayes_fusion.infer.mcmc.output_marginal",
    "bayes_fusion.infer.polya_gamma": "bayes_fusion.infer.mcmc.polya_gamma",
}

#: paths the docs show, kept without a warning: old path -> the module it names
PUBLIC_ALIASES = {
    "bayes_fusion.distributed": "bayes_fusion.infer.svi.distributed",
}


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old paths and loads them as the module at the new path."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED or fullname in PUBLIC_ALIASES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = resolve(spec.name)
        self._real_spec = module.__spec__  # the import system sets the alias's spec on it
        return module

    def exec_module(self, module) -> None:
        """Nothing to run (the module at the new path is loaded): give it its own spec back,
        so that its relative imports still resolve against its real package."""
        module.__spec__ = self._real_spec


def resolve(old: str):
    """The module at ``old``'s new path (imported if need be), warning if ``old`` is
    deprecated.

    :param old: a key of :data:`MOVED` or :data:`PUBLIC_ALIASES`.
    """
    if old in MOVED:
        warnings.warn(
            f"{old} moved to {MOVED[old]}; the old path goes in the next release",
            DeprecationWarning,
            stacklevel=3,
        )
        return importlib.import_module(MOVED[old])
    return importlib.import_module(PUBLIC_ALIASES[old])


def install() -> None:
    """Put the finder of the old paths on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
