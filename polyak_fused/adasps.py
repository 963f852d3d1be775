"""AdaSPS (Jiang & Stich, NeurIPS 2023): class, functional form, eager reference."""

from __future__ import annotations

import math

import torch

from . import _eager as E
from . import _foreach as F
from ._dispatch import run_fused
from ._optimizer import (COMMON_SCALARS, TINY_GRAD_SQ, PolyakFamilyOptimizer, check_number,
                         check_paths)

__all__ = ["AdaSPS", "adasps"]

SCALARS = ("step_size", "gap_sum")


class AdaSPS(PolyakFamilyOptimizer):
    r"""AdaSPS (Jiang & Stich, NeurIPS 2023): a Polyak step damped by the accumulated gaps.

    .. math::
        \eta_t = \min\Big\{\frac{f(x_t) - l^*}{c_p\,\|\nabla f(x_t)\|^2\,
        \sqrt{\sum_{s=0}^{t} (f(x_s) - l^*)}},\ \eta_{t-1}\Big\},\quad \eta_{-1} = +\infty,
        \qquad x_{t+1} = x_t - \mathrm{lr}\cdot\eta_t\nabla f(x_t)

    Symbols: c_p = ``c_p``; l* = ``lower_bound``; f(x_t) = the ``loss``; the gaps
    f - l* are clamped at 0. ``scalars["gap_sum"]`` is the running sum,
    ``scalars["step_size"]`` is eta_{t-1} (+inf before the first step).

    Args:
        params: parameters or param groups (groups may set their own ``lr``).
        c_p (float): c_p > 0 (default 1.0).
        lower_bound (float): l* (default 0.0).
        lr (float or tensor): multiplier on the computed step (default 1.0).
        fused (bool or None): as in :class:`InexactPolyak`.
        foreach (bool or None): as in :class:`InexactPolyak`.
        process_group: the torch.distributed group to reduce the loss and the norm over
            (default: the whole world under DDP, the mesh under FSDP2); see the README.
        average_loss (bool): average the loss over the ranks (default True); False when
            the loss you pass is already equal on every rank.

    Guards: a zero gap with a zero gap sum gives a zero ratio (0/0 := 0);
    ||g||^2 <= 1e-16 gives a zero step and counts the ratio as +inf, so eta keeps its value;
    a non-finite loss or gradient skips the step (parameters and state bitwise unchanged,
    ``scalars["skipped"]`` += 1).

    .. warning::
        eta never grows: a huge first gradient makes every step tiny (the first step is
        sqrt(f_0 - l*)/(c_p ||g_0||^2)); and one loss equal to l* sets eta to 0 for good.
    """

    METHOD = "adasps"
    SCALARS = SCALARS
    GLOBAL_HPARAMS = ("c_p", "lower_bound")

    def __init__(self, params, c_p: float = 1.0, lower_bound: float = 0.0, lr=1.0, *,
                 fused: bool | None = None, foreach: bool | None = None,
                 process_group=None, average_loss: bool = True):
        check_number("c_p", c_p, low=0.0, low_open=True)
        check_number("lower_bound", lower_bound)
        defaults = dict(lr=lr, c_p=float(c_p), lower_bound=float(lower_bound))
        super().__init__(params, defaults, fused=fused, foreach=foreach,
                         process_group=process_group,
                         average_loss=average_loss)

    def _initial_scalars(self):
        return {"step_size": math.inf, "gap_sum": 0.0}

    def _run(self, params, grads, buffers, lrs, loss, path, amp):
        adasps(params, grads, self._packed_scalars, lrs=lrs, loss=loss, **path,
               cache=self._fused_cache, **self._hparams(), **amp)


def adasps(params, grads, scalars, *, loss, c_p=1.0, lower_bound=0.0, lrs=1.0, grad_scale=None,
           found_inf=None, fused=False, foreach=None, cache=None):
    """Functional form of :class:`AdaSPS` (packed scalars: step, skipped, step_size, gap_sum).

    Build the state once with ``AdaSPS.functional_state(params, ...)`` (the same keyword arguments
    as the class), keep it, and pass its entries on every call; ``lrs`` is one multiplier for
    every tensor or a list of one per tensor. The hyperparameters default as in the class.
    """
    hp = dict(c_p=c_p, lower_bound=lower_bound)
    check_paths(fused, foreach)
    if fused:
        run_fused("adasps", params, grads, {}, lrs, loss, scalars, hp, cache,
                  grad_scale=grad_scale, found_inf=found_inf)
    else:
        step = _reference_adasps if foreach is False else _foreach_adasps
        step(params, grads, scalars, lrs=lrs, loss=loss, **hp, grad_scale=grad_scale,
             found_inf=found_inf)


def _step_size(s, loss, grad_sq, c_p, lower_bound):
    """(the step, eta_t, the new sum of gaps)."""
    gap = (loss - lower_bound).clamp(min=0)                              # f(x_t) - l*
    gap_sum = s["gap_sum"] + gap                                         # sum_{s<=t} (f - l*)
    ratio = torch.where(gap > 0, gap / (c_p * grad_sq * torch.sqrt(gap_sum)), 0.0)
    ratio = torch.where(grad_sq > TINY_GRAD_SQ, ratio, math.inf)
    eta = torch.minimum(ratio, s["step_size"])                           # min{ratio, eta_{t-1}}
    return torch.where(grad_sq > TINY_GRAD_SQ, eta, 0.0), eta, gap_sum


def _reference_adasps(params, grads, scalars, *, lrs, loss, c_p, lower_bound, grad_scale,
                      found_inf):
    s = dict(zip(COMMON_SCALARS + SCALARS, scalars.unbind()))
    grads = E.unscale(grads, grad_scale)                               # GradScaler: g / S
    loss, grad_sq = E.across_ranks(loss, E.sum_of_squares(grads, scalars.dtype))  # f, ||g_t||^2
    finite = E.is_finite(loss, grad_sq, found_inf=found_inf)
    step, eta, gap_sum = _step_size(s, loss, grad_sq, c_p, lower_bound)
    E.descend(params, grads, lrs, step, finite)                          # x <- x - lr eta g
    E.write_if(finite, s["gap_sum"], gap_sum)
    E.write_if(finite, s["step_size"], eta)
    E.count_step(s, finite)


def _foreach_adasps(params, grads, scalars, *, lrs, loss, c_p, lower_bound, grad_scale,
                    found_inf):
    s = F.scalar_slots(scalars, COMMON_SCALARS + SCALARS)
    loss, grad_sq = F.across_ranks(scalars, loss, F.unscaled_sum_of_squares(grads, grad_scale,
                                                                   scalars.dtype))
    finite = F.is_finite(loss, grad_sq, found_inf=found_inf)
    step, eta, gap_sum = _step_size(s, loss, grad_sq, c_p, lower_bound)
    F.descend(params, grads, lrs, step, finite, F.inverse_scale(grad_scale, params[0]))
    E.write_if(finite, s["gap_sum"], gap_sum)
    E.write_if(finite, s["step_size"], eta)
    E.count_step(s, finite)
