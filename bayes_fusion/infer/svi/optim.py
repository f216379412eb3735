"""Pyro's ClippedAdam as one update over all parameters; the compiled steps share its moment
arithmetic through :func:`clipped_adam_update`.

:class:`pyro.optim.ClippedAdam` keeps one torch optimizer per parameter and steps them one by
one: for a guide with 14 parameter tensors that is 14 Python-level optimizer steps, each a dozen
small kernel launches, every SVI step. :class:`FusedClippedAdam` applies the same update
(element-wise gradient clamp, Adam moments, bias correction, per-step learning-rate decay
``lr <- lr * lrd``) to all parameters at once and in place: the moments of each dtype/device
group live in two flat buffers, so a step is about ten kernels over all the numbers.
Its state keeps Pyro's per-parameter format, so :meth:`get_state` / :meth:`set_state` and
checkpoints are interchangeable with ``pyro.optim.ClippedAdam``'s.
"""

from __future__ import annotations

import pyro
import torch
from pyro.optim import PyroOptim
from pyro.optim.clipped_adam import ClippedAdam
from torch import Tensor

__all__ = ["FusedClippedAdam", "adam_step_size", "clipped_adam_update"]

_DEFAULTS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "clip_norm": 10.0, "lrd": 1.0}


def adam_step_size(lr, step, betas: tuple[float, float]):
    """Adam's bias-corrected step size ``lr sqrt(1 - beta2^t) / (1 - beta1^t)`` at step ``t``
    (1-based); numbers or tensors."""
    beta1, beta2 = betas
    return lr * (1 - beta2**step) ** 0.5 / (1 - beta1**step)


def _update_moments_(
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    betas: tuple[float, float],
    clip_norm: float,
) -> None:
    """The moment half of a clipped Adam update, in place: ``grads`` clamped element-wise to
    ``[-clip_norm, clip_norm]``, then ``exp_avgs`` and ``exp_avg_sqs`` updated (Pyro's order of
    operations). The step is ``(-step_size * exp_avg) / (sqrt(exp_avg_sq) + eps)``."""
    beta1, beta2 = betas
    torch._foreach_clamp_min_(grads, -clip_norm)
    torch._foreach_clamp_max_(grads, clip_norm)
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)


def clipped_adam_update(
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    step_sizes,
    *,
    betas: tuple[float, float],
    eps: float,
    clip_norm: float,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """One clipped Adam update of several tensors at once (multi-tensor ``_foreach`` kernels),
    without side effects: the update of the compiled steps
    (:mod:`bayes_fusion.infer.svi.fused`), the arithmetic of :class:`pyro.optim.ClippedAdam`
    (gradients clamped element-wise to ``[-clip_norm, clip_norm]``, no weight decay) and of
    :class:`FusedClippedAdam`, which does the same in place.

    :param grads: gradients, one per parameter tensor.
    :param exp_avgs: first moments, as ``grads``. :param exp_avg_sqs: second moments.
    :param step_sizes: :func:`adam_step_size` per tensor (a list of numbers), or one scalar
        tensor for all.
    :returns: ``(deltas, exp_avgs, exp_avg_sqs)``: what to add to each parameter, and the new
        moments.
    """
    grads, exp_avgs, exp_avg_sqs = (
        [t.clone() for t in ts] for ts in (grads, exp_avgs, exp_avg_sqs)
    )
    _update_moments_(grads, exp_avgs, exp_avg_sqs, betas=betas, clip_norm=clip_norm)
    denoms = torch._foreach_add(torch._foreach_sqrt(exp_avg_sqs), eps)
    # (-step * m) / denom: the order of Pyro's ``addcdiv_``, so the numbers agree bit for bit
    if isinstance(step_sizes, Tensor):
        scaled = torch._foreach_mul(exp_avgs, -step_sizes)
    else:
        scaled = torch._foreach_mul(exp_avgs, [-size for size in step_sizes])
    return torch._foreach_div(scaled, denoms), exp_avgs, exp_avg_sqs


class _ParamState:
    __slots__ = ("step", "exp_avg", "exp_avg_sq", "lr")

    def __init__(self, like: Tensor, lr: float) -> None:
        self.step = 0
        self.exp_avg = torch.zeros_like(like)
        self.exp_avg_sq = torch.zeros_like(like)
        self.lr = lr


class _FlatMoments:
    """The Adam moments of parameters of one dtype and device in two flat buffers, each
    parameter's state holding views of them: a step is a few kernels over all the parameters'
    numbers, into buffers allocated once, instead of a few kernels per parameter tensor
    (torch's ``_foreach`` kernels loop over the tensors on the CPU) and new tensors per step.

    :param params: the parameters.
    :param states: their :class:`_ParamState`, in the same order; their moments become views.
    """

    def __init__(self, params: list[Tensor], states: list[_ParamState]) -> None:
        self.params, self.states = params, states
        self.sizes = [p.numel() for p in params]
        self.exp_avg = torch.cat([s.exp_avg.reshape(-1) for s in states])
        self.exp_avg_sq = torch.cat([s.exp_avg_sq.reshape(-1) for s in states])
        for s, m, v in zip(
            states, self._views_of(self.exp_avg), self._views_of(self.exp_avg_sq), strict=True
        ):
            s.exp_avg, s.exp_avg_sq = m, v
        self._moments = [(s.exp_avg, s.exp_avg_sq) for s in states]
        self._grad = torch.empty_like(self.exp_avg)
        self._denom = torch.empty_like(self.exp_avg)
        self._delta = torch.empty_like(self.exp_avg)
        self._deltas = self._views_of(self._delta)
        self._numels = torch.tensor(self.sizes, device=self.exp_avg.device)

    def _views_of(self, flat: Tensor) -> list[Tensor]:
        return [v.view_as(p) for v, p in zip(flat.split(self.sizes), self.params, strict=True)]

    def intact(self) -> bool:
        """Whether every state's moments are still views of the buffers (not replaced)."""
        return all(
            s.exp_avg is m and s.exp_avg_sq is v
            for s, (m, v) in zip(self.states, self._moments, strict=True)
        )

    def step(self, *, betas, eps, clip_norm) -> None:
        """One clipped Adam step of every parameter, each at its state's step size, in place."""
        grad, denom, delta = self._grad, self._denom, self._delta
        torch.cat([p.grad.reshape(-1) for p in self.params], out=grad)
        _update_moments_(
            [grad], [self.exp_avg], [self.exp_avg_sq], betas=betas, clip_norm=clip_norm
        )
        torch.sqrt(self.exp_avg_sq, out=denom).add_(eps)
        # (-step * m) / denom: the order of Pyro's ``addcdiv_``, so the numbers agree bit for bit
        sizes = [-adam_step_size(s.lr, s.step, betas) for s in self.states]
        if all(size == sizes[0] for size in sizes):
            torch.mul(self.exp_avg, sizes[0], out=delta)
        else:
            per_element = torch.tensor(sizes, dtype=delta.dtype).to(delta.device)
            torch.mul(self.exp_avg, per_element.repeat_interleave(self._numels), out=delta)
        delta.div_(denom)
        torch._foreach_add_(self.params, self._deltas)


class FusedClippedAdam(PyroOptim):
    """``pyro.optim.ClippedAdam`` with one update over all parameters per step.

    Same arguments and the same arithmetic as :class:`pyro.optim.ClippedAdam` (without weight
    decay and centred variance). A drop-in for ``SVI`` and for :func:`bayes_fusion.fit`'s
    ``optimizer`` argument; :func:`bayes_fusion.fit` uses it by default.

    :param optim_args: ``lr`` (default 1e-3), ``betas`` ((0.9, 0.999)), ``eps`` (1e-8),
        ``clip_norm`` (10: gradients are clamped element-wise to ``[-clip_norm, clip_norm]``),
        ``lrd`` (1: the learning rate is multiplied by ``lrd`` at every step).
    :raises ValueError: for any other key.
    """

    def __init__(self, optim_args: dict) -> None:
        if not isinstance(optim_args, dict):
            raise TypeError(f"optim_args: expected a dict, got {type(optim_args).__name__}")
        unknown = sorted(set(optim_args) - set(_DEFAULTS))
        if unknown:
            raise ValueError(
                f"optim_args: unknown keys {unknown}; expected some of {sorted(_DEFAULTS)}"
            )
        super().__init__(ClippedAdam, optim_args)
        self.args = {**_DEFAULTS, **optim_args}
        self._states: dict[Tensor, _ParamState] = {}
        # saved states (parameter name -> ClippedAdam state_dict) for parameters not seen yet
        self._pending: dict[str, dict] = {}
        # the last step's parameters, their moments in flat buffers (one per dtype and device)
        self._grouped_params: list[Tensor] = []
        self._groups: list[_FlatMoments] = []

    # --- the update ---------------------------------------------------------------------
    def __call__(self, params, *args, **kwargs) -> None:
        """One step for every parameter in ``params`` that has a gradient."""
        params = [p for p in params if p.grad is not None]
        if not params:
            return
        states = [self.state_of(p) for p in params]
        for s in states:
            s.lr *= self.args["lrd"]
            s.step += 1
        with torch.no_grad():
            for group in self._flat_groups(params, states):
                group.step(
                    betas=self.args["betas"], eps=self.args["eps"], clip_norm=self.args["clip_norm"]
                )

    def _flat_groups(self, params: list[Tensor], states: list[_ParamState]) -> list[_FlatMoments]:
        """The flat buffers of ``params``, one per dtype and device: the last step's when these
        are its parameters (the usual case: every step of a fit updates the same ones)."""
        last = self._grouped_params
        if (
            len(last) == len(params)
            and all(p is q for p, q in zip(params, last, strict=True))
            and all(group.intact() for group in self._groups)
        ):
            return self._groups
        kinds: dict[tuple, tuple[list, list]] = {}
        for p, s in zip(params, states, strict=True):
            same_kind = kinds.setdefault((p.dtype, p.device), ([], []))
            same_kind[0].append(p)
            same_kind[1].append(s)
        self._groups = [_FlatMoments(ps, ss) for ps, ss in kinds.values()]
        self._grouped_params = params
        return self._groups

    def state_of(self, p: Tensor) -> _ParamState:
        """The update state of parameter ``p`` (created, or loaded from :meth:`set_state`, on
        first use): ``step``, ``lr``, ``exp_avg``, ``exp_avg_sq``."""
        state = self._states.get(p)
        if state is None:
            state = self._states[p] = _ParamState(p, self.args["lr"])
            waiting = self._pending.pop(pyro.get_param_store().param_name(p), None)
            if waiting is not None:
                self._load(state, waiting, p)
        return state

    # --- state in pyro.optim.ClippedAdam's format ----------------------------------------
    def set_state(self, state_dict: dict) -> None:
        """Load states saved by :meth:`get_state` (or ``pyro.optim.ClippedAdam``'s); each is
        applied when its parameter is first updated.

        :param state_dict: parameter name -> a ``ClippedAdam`` ``state_dict``.
        """
        self._pending.update(state_dict)

    def get_state(self) -> dict:
        """Parameter name -> a ``ClippedAdam`` ``state_dict`` for that parameter."""
        out = {}
        store = pyro.get_param_store()
        for p, s in self._states.items():
            group = {
                "lr": s.lr,
                "betas": tuple(self.args["betas"]),
                "eps": self.args["eps"],
                "weight_decay": 0,
                "clip_norm": self.args["clip_norm"],
                "lrd": self.args["lrd"],
                "centered_variance": False,
                "params": [0],
            }
            state = {
                "step": s.step,
                "exp_avg": s.exp_avg.clone(),
                "exp_avg_sq": s.exp_avg_sq.clone(),
            }
            out[store.param_name(p)] = {"state": {0: state}, "param_groups": [group]}
        return out

    @staticmethod
    def _load(state: _ParamState, saved: dict, p: Tensor) -> None:
        group = saved["param_groups"][0]
        state.lr = float(group["lr"])
        inner = saved["state"].get(0)
        if inner:  # an optimizer that never stepped has no per-parameter state
            state.step = int(inner["step"])
            state.exp_avg = inner["exp_avg"].to(p).clone()
            state.exp_avg_sq = inner["exp_avg_sq"].to(p).clone()
