"""DecSPS, the decreasing stochastic Polyak step size: class, functional form, eager reference."""

from __future__ import annotations

import math

import torch

from . import _eager as E
from . import _foreach as F
from ._dispatch import run_fused
from ._optimizer import (COMMON_SCALARS, TINY_GRAD_SQ, PolyakFamilyOptimizer, check_number,
                         check_paths)

__all__ = ["DecSPS", "decsps"]

SCALARS = ("step_size", "bound")


class DecSPS(PolyakFamilyOptimizer):
    r"""DecSPS (Orvieto, Lacoste-Julien, Loizou, NeurIPS 2022): a non-increasing Polyak step.

    .. math::
        c_k = c_0\sqrt{k+1},\qquad
        \gamma_k = \frac{1}{c_k}\min\Big\{\frac{\max(f(x_k) - l^*,\,0)}{\|\nabla f(x_k)\|^2},
        \ c_{k-1}\gamma_{k-1}\Big\},\qquad x_{k+1} = x_k - \mathrm{lr}\cdot\gamma_k\nabla f(x_k)

    with c_{-1} gamma_{-1} := c_0 gamma_b. Symbols: k = ``scalars["step"]`` (steps taken);
    c_0 = ``c0``; gamma_b = ``gamma_b``; l* = ``lower_bound``; f(x_k) = the ``loss``.
    ``scalars["bound"]`` holds c_k gamma_k, the running minimum.

    Args:
        params: parameters or param groups (groups may set their own ``lr``).
        c0 (float): c_0 > 0 (default 1.0).
        gamma_b (float): gamma_b > 0, the bound on the first step (default 10.0).
        lower_bound (float): l* (default 0.0).
        lr (float or tensor): multiplier on the computed step (default 1.0).
        fused (bool or None): as in :class:`InexactPolyak`.
        foreach (bool or None): as in :class:`InexactPolyak`.
        process_group: the torch.distributed group to reduce the loss and the norm over
            (default: the whole world under DDP, the mesh under FSDP2); see the README.
        average_loss (bool): average the loss over the ranks (default True); False when
            the loss you pass is already equal on every rank.

    Guards: f < l* gives a zero Polyak ratio (and so, by the min, zero steps from then on);
    ||g||^2 <= 1e-16 gives a zero step and counts the ratio as +inf in the recursion, so the
    bound keeps its value; a non-finite loss or gradient skips the step (parameters and state
    bitwise unchanged, ``scalars["skipped"]`` += 1).

    .. warning::
        The step never grows again: a large first gradient (steep (L0, L1)-smooth regions) makes
        every later step small, which is why DecSPS degrades as L1 grows (Takezawa et al., Fig. 1).
    """

    METHOD = "decsps"
    SCALARS = SCALARS
    GLOBAL_HPARAMS = ("c0", "gamma_b", "lower_bound")

    def __init__(self, params, c0: float = 1.0, gamma_b: float = 10.0, lower_bound: float = 0.0,
                 lr=1.0, *, fused: bool | None = None, foreach: bool | None = None,
                 process_group=None, average_loss: bool = True):
        check_number("c0", c0, low=0.0, low_open=True)
        check_number("gamma_b", gamma_b, low=0.0, low_open=True)
        check_number("lower_bound", lower_bound)
        defaults = dict(lr=lr, c0=float(c0), gamma_b=float(gamma_b), lower_bound=float(lower_bound))
        super().__init__(params, defaults, fused=fused, foreach=foreach,
                         process_group=process_group,
                         average_loss=average_loss)

    def _initial_scalars(self):
        return {"step_size": 0.0, "bound": self.defaults["c0"] * self.defaults["gamma_b"]}

    def _run(self, params, grads, buffers, lrs, loss, path, amp):
        decsps(params, grads, self._packed_scalars, lrs=lrs, loss=loss, **path,
               cache=self._fused_cache, **self._hparams(), **amp)


def decsps(params, grads, scalars, *, loss, c0=1.0, gamma_b=10.0, lower_bound=0.0, lrs=1.0,
           grad_scale=None, found_inf=None, fused=False, foreach=None, cache=None):
    """Functional form of :class:`DecSPS` (packed scalars: step, skipped, step_size, bound).

    Build the state once with ``DecSPS.functional_state(params, ...)`` (the same keyword arguments
    as the class), keep it, and pass its entries on every call; ``lrs`` is one multiplier for
    every tensor or a list of one per tensor. The hyperparameters default as in the class.
    """
    hp = dict(c0=c0, gamma_b=gamma_b, lower_bound=lower_bound)
    check_paths(fused, foreach)
    if fused:
        run_fused("decsps", params, grads, {}, lrs, loss, scalars, hp, cache,
                  grad_scale=grad_scale, found_inf=found_inf)
    else:
        step = _reference_decsps if foreach is False else _foreach_decsps
        step(params, grads, scalars, lrs=lrs, loss=loss, **hp, grad_scale=grad_scale,
             found_inf=found_inf)


def _step_size(s, loss, grad_sq, c0, lower_bound):
    """(gamma_k, the new bound c_k gamma_k)."""
    c_k = c0 * torch.sqrt(s["step"] + 1)                                   # c_k = c0 sqrt(k+1)
    gap = (loss - lower_bound).clamp(min=0)                                # (f(x_k) - l*)_+
    ratio = torch.where(grad_sq > TINY_GRAD_SQ, gap / grad_sq, math.inf)   # Polyak ratio
    bound = torch.minimum(ratio, s["bound"])                               # c_k gamma_k
    return torch.where(grad_sq > TINY_GRAD_SQ, bound / c_k, 0.0), bound


def _reference_decsps(params, grads, scalars, *, lrs, loss, c0, gamma_b, lower_bound, grad_scale,
                      found_inf):
    s = dict(zip(COMMON_SCALARS + SCALARS, scalars.unbind()))
    grads = E.unscale(grads, grad_scale)                               # GradScaler: g / S
    loss, grad_sq = E.across_ranks(loss, E.sum_of_squares(grads, scalars.dtype))  # f, ||g_k||^2
    finite = E.is_finite(loss, grad_sq, found_inf=found_inf)
    eta, bound = _step_size(s, loss, grad_sq, c0, lower_bound)
    E.descend(params, grads, lrs, eta, finite)                             # x <- x - lr gamma g
    E.write_if(finite, s["bound"], bound)
    E.write_if(finite, s["step_size"], eta)
    E.count_step(s, finite)


def _foreach_decsps(params, grads, scalars, *, lrs, loss, c0, gamma_b, lower_bound, grad_scale,
                    found_inf):
    s = F.scalar_slots(scalars, COMMON_SCALARS + SCALARS)
    loss, grad_sq = F.across_ranks(scalars, loss, F.unscaled_sum_of_squares(grads, grad_scale,
                                                                   scalars.dtype))
    finite = F.is_finite(loss, grad_sq, found_inf=found_inf)
    eta, bound = _step_size(s, loss, grad_sq, c0, lower_bound)
    F.descend(params, grads, lrs, eta, finite, F.inverse_scale(grad_scale, params[0]))
    E.write_if(finite, s["bound"], bound)
    E.write_if(finite, s["step_size"], eta)
    E.count_step(s, finite)
