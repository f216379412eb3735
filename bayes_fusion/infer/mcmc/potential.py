"""The potential energy of any Pyro model for the generic NUTS path, in coordinates that suit
rank layers.

Every latent site ``x`` is sampled through the bijection to its support (``x = T(u)``), except
the factor sites of the rank layers (columns with prior ``Normal(0, s_r)``, ``s_r = lambda_r +
eps``), which are sampled as ``z`` with ``U = z * s_r^(1 - c_r)``: ``c_r = 1`` keeps component
``r`` centred (``U = z``), ``c_r = 0`` non-centres it (``U = s_r z``, ``z ~ Normal(0, 1)``).
Components the data pin down mix better centred, weak ones (a funnel with their scale)
non-centred; :func:`~bayes_fusion.fit_nuts` centres the ones the MAP point finds active.
The potential is the model's own log density at the constrained values plus the log Jacobian
of the change of variables (``(1 - c_r) log s_r`` per factor entry, ``log |dT/du|`` per site),
so it is exact for any model; the library's models compute their log density without recording
a Pyro trace (``log_joint``), any other model runs under :class:`~bayes_fusion.direct_elbo
.LogJoint`.

For a ``Classifier`` the sites whose first axis indexes the classes (output factor, bias, main
effects) are sampled as class *contrasts*: softmax ignores a shift common to every class, and
along an orthonormal basis (:func:`contrast_basis`) the i.i.d. Normal prior splits into
independent contrasts and class mean, so the mean's posterior is its prior. The potential is
the density of the contrasts with the mean integrated out exactly; :meth:`ModelPotential
.complete` draws the means from their prior afterwards.
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import biject_to

from ...layers.base import rank_layers
from ..compiled import CompiledFunction
from ..log_joint import LogJoint, support_bijection

__all__ = [
    "FlatPotential",
    "ModelPotential",
    "Potential",
    "contrast_basis",
    "flatten_params",
    "scaled_sites",
]

DECENTERED = "_decentered"
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def scaled_sites(model) -> dict[str, tuple]:
    """Full factor-site name -> (layer, scale-site name) for every rank-bearing layer."""
    out = {}
    for layer in rank_layers(model).values():
        for short in layer.scaled_sites():
            out[layer.site_name(short)] = (layer, layer.site_name(layer.SCALE_SITE))
    return out


class Potential:
    """The potential protocol every MCMC path samples: the negative log joint density of a
    model in unconstrained coordinates, with the maps between those coordinates and the model's
    site values. Subclasses implement :meth:`potential`, :meth:`to_unconstrained` and
    :meth:`constrain`; :class:`FlatPotential` turns any of them into a function of one flat
    vector, batched over leading chain dims (:meth:`FlatPotential.value_and_grad`), which is
    what samplers see.

    Optional, a conditionally conjugate (Gibbs) block: ``gibbs_init(params)`` sets its state at
    a start point, ``gibbs_update(params) -> dict`` redraws it given the sampled coordinates
    (the potential then changes) and returns its draws, name -> tensor.

    :ivar init_values: a start point, site name -> constrained value.
    :ivar centered: scale-site name -> ``(R,)`` per-component centring (see the module doc).
    :ivar contrasts: sites sampled as class contrasts, name -> number of event dims.
    :ivar evaluations: calls of :meth:`__call__` so far.
    :ivar pyro_free: whether :meth:`potential` runs without Pyro's effect handlers, so that
        ``torch.compile`` follows its Python directly (else it is traced first:
        :class:`~bayes_fusion.infer.compiled.CompiledFunction`'s ``trace``).
    """

    init_values: dict[str, Tensor]
    centered: dict[str, Tensor]
    contrasts: dict[str, int]
    evaluations: int = 0
    pyro_free: bool = True

    def potential(self, params: dict[str, Tensor]) -> Tensor:
        """Potential energy at one point of the unconstrained coordinates (scalar)."""
        raise NotImplementedError

    def to_unconstrained(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Site values (one point) -> unconstrained coordinates."""
        raise NotImplementedError

    def constrain(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """Unconstrained coordinates (any leading draw dims) -> site values."""
        raise NotImplementedError

    def complete(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Add draws of the sites the potential integrates out to constrained draws (any
        leading draw dims); the default integrates nothing out."""
        return dict(values)

    def __call__(self, params: dict[str, Tensor]) -> Tensor:
        """:meth:`potential`, counted in :attr:`evaluations` (Pyro's ``potential_fn``)."""
        self.evaluations += 1
        return self.potential(params)

    def report(self) -> dict:
        """What the fit's ``info`` says of this potential's computation."""
        return {"potential_evaluations": self.evaluations}


def flatten_params(params: dict[str, Tensor]):
    """``params`` as one vector in sorted-name order (the order of Pyro's dense mass matrix and
    of :func:`laplace_inverse_mass_matrix`'s metric) and the function mapping such a vector
    back to the dict."""
    names = sorted(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def unflatten(flat: Tensor) -> dict[str, Tensor]:
        parts = torch.split(flat, sizes, dim=-1)
        lead = flat.shape[:-1]
        return {n: p.reshape(lead + sh) for n, p, sh in zip(names, parts, shapes, strict=True)}

    return torch.cat([params[n].reshape(-1) for n in names]), unflatten


class FlatPotential:
    """``potential`` (a function of a dict of unconstrained sites) as a function of one flat
    site, :attr:`SITE` ``(D,)``: the sites' entries concatenated in sorted-name order (the
    order of :func:`flatten_params` and of :func:`laplace_inverse_mass_matrix`'s metric). A
    Gibbs block of ``potential`` (``gibbs_init`` / ``gibbs_update``) gets the dict as well.
    Picklable when the potential is.

    :param potential: the potential, ``dict[str, Tensor] -> scalar tensor``.
    :param like: a point of its sites (their names and shapes; also :attr:`start`).
    """

    #: the name Pyro's NUTS knows the flat site by
    SITE = "z"

    def __init__(self, potential, like: dict[str, Tensor]) -> None:
        self.potential = potential
        start, self._unflatten = flatten_params({k: v.detach() for k, v in like.items()})
        #: ``like`` flattened ``(D,)``
        self.start = start.clone()
        self._names = tuple(sorted(like))
        #: ``True`` while batched evaluation works; else why it failed (a string)
        self.batched: bool | str = True

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """``(..., D)`` -> site -> ``(..., site shape)``."""
        return self._unflatten(flat)

    def metric(self, metric: dict | None) -> dict | None:
        """A dense inverse mass matrix over every site (keyed by their sorted names, as from
        :func:`laplace_inverse_mass_matrix`) rekeyed to the flat site; ``None`` stays."""
        if metric is None:
            return None
        if set(metric) != {self._names}:
            raise ValueError(
                "initial_inverse_mass_matrix: expected one dense block over the sites "
                f"{self._names}, got blocks {sorted(metric)}"
            )
        return {(self.SITE,): metric[self._names]}

    @property
    def dim(self) -> int:
        """``D``, the number of unconstrained coordinates."""
        return self.start.shape[-1]

    @property
    def evaluations(self) -> int:
        """The wrapped potential's count of evaluations (0 if it keeps none)."""
        return getattr(self.potential, "evaluations", 0)

    def __call__(self, params: dict[str, Tensor]) -> Tensor:
        """The potential at ``{SITE: z}``, ``z`` ``(D,)`` (scalar): Pyro's ``potential_fn``."""
        return self.potential(self._unflatten(params[self.SITE]))

    def value_and_grad(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """The potential and its gradient at ``z`` ``(..., D)``, every leading (chain) index
        evaluated in one batched call (``torch.func.vmap``) where the potential allows, else
        one after another (:attr:`batched` then says why not).

        :returns: ``(value (...), gradient (..., D))``.
        """
        lead, flat = z.shape[:-1], z.reshape(-1, z.shape[-1])
        with pyro.validation_enabled(False):  # argument checks read values: not batchable
            if self.batched is True:
                try:
                    value, grad = self.batched_value_and_grad(flat)
                    return value.reshape(lead), grad.reshape(z.shape)
                except Exception as exc:  # noqa: BLE001 - any vmap failure: loop instead
                    self.batched = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            value, grad = self.looped_value_and_grad(flat)
        return value.reshape(lead), grad.reshape(z.shape)

    def _grad_and_value(self, point: Tensor) -> tuple[Tensor, Tensor]:
        """Gradient and value at one point ``(D,)`` of the uncompiled, uncounted density."""
        density = getattr(self.potential, "potential", self.potential)
        return torch.func.grad_and_value(lambda z: density(self._unflatten(z)))(point)

    def batched_value_and_grad(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(value (C,), gradient (C, D))`` at ``z`` ``(C, D)`` in one ``torch.func.vmap``
        call (raises where the potential does not broadcast; free of Python state, so it
        compiles). Call with Pyro's validation off."""
        grad, value = torch.func.vmap(self._grad_and_value)(z)
        return value, grad

    def looped_value_and_grad(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`batched_value_and_grad` one point after another (any potential)."""
        pairs = [self._grad_and_value(point) for point in z]
        return torch.stack([v for _, v in pairs]), torch.stack([g for g, _ in pairs])

    def gibbs_init(self, params: dict[str, Tensor]) -> None:
        """The potential's ``gibbs_init`` at ``{SITE: z}``."""
        self.potential.gibbs_init(self._unflatten(params[self.SITE]))

    def gibbs_update(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """The potential's ``gibbs_update`` at ``{SITE: z}``: its draws, name -> tensor."""
        return self.potential.gibbs_update(self._unflatten(params[self.SITE]))


class ModelPotential(Potential):
    """Potential energy (negative log joint in unconstrained coordinates, see the module doc)
    of ``model(*args)``. Picklable when the model is (parallel chains in worker processes).

    :param model: a Pyro model; its rank layers' factor sites get the ``z`` coordinates.
    :param args: the model's arguments (data), e.g. ``(inputs, y)``.
    :param centered: scale-site name -> ``(R,)`` tensor in ``[0, 1]``: per component ``1``
        centred, ``0`` non-centred (a missing layer: all non-centred).
    :param compile: compute the potential (forward and backward) through ``torch.compile``
        (:class:`~bayes_fusion.compiled.CompiledFunction`), compiled on first use.
    """

    def __init__(
        self,
        model,
        args: tuple,
        centered: dict[str, Tensor] | None = None,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.compile = compile
        self._compiled = None
        #: calls of the potential (with its gradient: one per leapfrog step of NUTS)
        self.evaluations = 0
        self.args = args
        with torch.no_grad(), poutine.block():
            trace = poutine.trace(model).get_trace(*args)
        self.scaled = {k: (v[1], v[0].scale_floor.detach()) for k, v in scaled_sites(model).items()}
        self.sites = {}  # latent site -> support, in the model's sampling order
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site):
                self.sites[name] = site["fn"].support
        centered = dict(centered or {})
        self.centered = {}
        self.init_values = {}  # a start: the rank layers' own initial values, else the trace's
        for name in self.sites:
            self.init_values[name] = trace.nodes[name]["value"].detach()
        for layer in rank_layers(model).values():
            self.init_values.update(layer.init_values())
        for scale_site, _ in self.scaled.values():
            like = trace.nodes[scale_site]["value"]
            c = centered.get(scale_site, torch.zeros(like.shape[-1]))
            self.centered[scale_site] = torch.as_tensor(c, dtype=like.dtype, device=like.device)
        self.fast = bool(getattr(model, "has_log_joint", False)) and len(args) == 2
        self.pyro_free = self.fast
        self.contrasts = _class_sites(model) if self.fast else {}
        self.basis = None
        if self.contrasts:
            classes = model.layer.out_features
            like = trace.nodes[next(iter(self.contrasts))]["value"]
            self.basis = contrast_basis(classes, like.dtype, like.device)

    # --- coordinates ---------------------------------------------------------------------
    def _factor_scale(self, site: str, values: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``s^(1 - c)`` broadcastable over the site's rows, and ``(1 - c) log s`` ``(..., R)``."""
        scale_site, floor = self.scaled[site]
        s = values[scale_site] + floor
        power = 1 - self.centered[scale_site]
        return (s**power).unsqueeze(-2), power * s.log()

    def _rotate(self, site: str, value: Tensor, inverse: bool = False) -> Tensor:
        """Class contrasts ``(..., C-1, ...)`` -> the site's value with class mean 0 ``(..., C,
        ...)`` (``inverse``: back)."""
        axis = -self.contrasts[site]
        moved = value.movedim(axis, -1)
        out = moved @ (self.basis if inverse else self.basis.T)
        return out.movedim(-1, axis)

    def constrain(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """Unconstrained coordinates (any leading draw dims) -> site values (for sites with
        class contrasts: the class-mean-free part; :meth:`complete` adds the mean)."""
        return self._values_and_log_det(params)[0]

    def to_unconstrained(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Site values (one point) -> unconstrained coordinates."""
        out = {}
        for name, support in self.sites.items():
            value = values[name]
            if name in self.contrasts:
                value = self._rotate(name, value, inverse=True)
            if name in self.scaled:
                out[name + DECENTERED] = value / self._factor_scale(name, values)[0]
            else:
                out[name] = biject_to(support).inv(value)
        return {k: v.detach().clone() for k, v in out.items()}

    def _values_and_log_det(self, params: dict[str, Tensor]):
        values, log_det = {}, 0.0
        for name, support in self.sites.items():
            if name in self.scaled:
                continue
            u = params[name]
            transform = support_bijection(support)
            values[name] = u if transform is None else transform(u)
            if transform is not None:
                log_det = log_det + transform.log_abs_det_jacobian(u, values[name]).sum()
        for name in self.scaled:
            z = params[name + DECENTERED]
            factor, log_factor = self._factor_scale(name, values)
            values[name] = z * factor
            log_det = log_det + z.shape[-2] * log_factor.sum(-1)
        for name in self.contrasts:
            values[name] = self._rotate(name, values[name])
        return values, log_det

    def _class_mean_std(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Prior std of the class mean of every contrast site, ``(..., rest of its shape)``
        (none for a model without class contrasts: any model but a ``Classifier`` around one of
        the library's rank layers)."""
        if not self.contrasts:
            return {}
        layer = self.model.layer
        given = layer.short_values(values)
        out = {}
        for short, prior in layer.site_priors(given):
            name = layer.site_name(short)
            if name in self.contrasts:
                scale = prior.base_dist.scale
                out[name] = scale.select(-self.contrasts[name], 0)
        return out

    def complete(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Add the class means (drawn from their prior, which the data do not inform: softmax
        logits are unchanged by a shift common to every class) to constrained draws."""
        values = dict(values)
        for name, std in self._class_mean_std(values).items():
            axis = -self.contrasts[name]
            std = std.expand(values[name].select(axis, 0).shape)
            mean = std * torch.randn_like(std) / self.basis.shape[0] ** 0.5
            values[name] = values[name] + mean.unsqueeze(axis)
        return values

    # --- density -------------------------------------------------------------------------
    def log_joint(self, values: dict[str, Tensor]) -> Tensor:
        """``log p(data, values)`` of the model at one point of the site values."""
        if self.fast:
            return self.model.log_joint(values, *self.args)
        # LogJoint inside the block: it sees every site, nothing outside sees them
        with poutine.block(), LogJoint(values) as joint:
            self.model(*self.args)
        return joint.total

    def potential(self, params: dict[str, Tensor]) -> Tensor:
        """Potential energy at one point of the unconstrained coordinates (scalar)."""
        values, log_det = self._values_and_log_det(params)
        log_p = self.log_joint(values) + log_det
        if self.contrasts:
            # the density of the contrasts: the class mean (prior N(0, std), at 0 here) is
            # integrated out, which removes its log N(0; 0, std) = -log std - log(2 pi)/2
            for std in self._class_mean_std(values).values():
                log_p = log_p + std.log().sum() + _HALF_LOG_2PI * std.numel()
        return -log_p

    def __call__(self, params: dict[str, Tensor]) -> Tensor:
        """The potential (NUTS's ``potential_fn``): with ``compile``, through one
        ``torch.compile`` graph per pass (:class:`~bayes_fusion.compiled.CompiledFunction`,
        eager if compiling fails), else :meth:`potential`."""
        self.evaluations += 1
        if not self.compile:
            return self.potential(params)
        if self._compiled is None:
            self._compiled = CompiledFunction(self.potential, name="NUTS potential")
        with pyro.validation_enabled(False):  # argument checks do not trace into a graph
            return self._compiled(params)

    def report(self) -> dict:
        """What the fit's ``info`` says of this potential's computation: its number of
        evaluations, and whether it was compiled."""
        out = {"potential_evaluations": self.evaluations}
        if self._compiled is None:
            return out
        if self._compiled.failed is not None:
            return {**out, "compiled_potential": False, "compile_failure": self._compiled.failed}
        return {
            **out,
            "compiled_potential": True,
            "compile_seconds": self._compiled.compile_seconds,
        }

    def __getstate__(self):
        return {**self.__dict__, "_compiled": None}  # compiled code does not pickle


def contrast_basis(classes: int, dtype=None, device=None) -> Tensor:
    """Orthonormal basis ``(C, C-1)`` of the vectors whose entries sum to 0."""
    ones = torch.ones(classes, 1, dtype=torch.float64)
    q = torch.linalg.qr(torch.cat([ones, torch.eye(classes, dtype=torch.float64)], 1))[0]
    return q[:, 1:classes].to(dtype=dtype, device=device).contiguous()


def _class_sites(model) -> dict[str, int]:
    """Sites of a ``Classifier``'s rank layer whose first axis indexes the classes (number of
    event dims of each): softmax ignores shifts common to every class along that axis."""
    from ...layers.base import RankLayer
    from ...models import Classifier

    layer = getattr(model, "layer", None)
    if not isinstance(model, Classifier) or not isinstance(layer, RankLayer):
        return {}
    shapes = layer.site_shapes()
    return {layer.site_name(short): len(shapes[short]) for short in layer.output_sites()}
