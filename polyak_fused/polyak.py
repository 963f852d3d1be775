"""Classic Polyak step size and SPS / SPS_max: class, functional form, eager reference."""

from __future__ import annotations

import math

import torch

from . import _eager as E
from . import _foreach as F
from ._dispatch import run_fused
from ._optimizer import (COMMON_SCALARS, TINY_GRAD_SQ, PolyakFamilyOptimizer, check_number,
                         check_paths)

__all__ = ["Polyak", "polyak"]

SCALARS = ("step_size",)


class Polyak(PolyakFamilyOptimizer):
    r"""Polyak's step size (1987) and its stochastic forms SPS / SPS_max (Loizou et al., 2021).

    .. math::
        \eta_t = \mathrm{lr}\cdot\min\Big\{\frac{\max(f(x_t) - f^*,\,0)}{c\,\|\nabla f(x_t)\|^2},
        \ \eta_{\max}\Big\}, \qquad x_{t+1} = x_t - \eta_t \nabla f(x_t)

    Symbols: f(x_t) = the ``loss`` given to ``step``; f* = ``f_star``; c = ``c``;
    eta_max = ``max_lr``; ||g|| = one L2 norm over every parameter of every group.
    c = 1, max_lr = inf is Polyak's rule; c = 0.5 with a finite max_lr is SPS_max.

    Args:
        params: parameters or param groups (groups may set their own ``lr``).
        f_star (float): the optimal value f* (default 0.0: the paper's "Polyak (f* = 0)").
        c (float): SPS's c > 0 (default 1.0).
        max_lr (float): cap eta_max on the step size before ``lr`` (default inf: no cap).
        lr (float or tensor): multiplier on the computed step (default 1.0).
        fused (bool or None): as in :class:`InexactPolyak`.
        foreach (bool or None): as in :class:`InexactPolyak`.
        process_group: the torch.distributed group to reduce the loss and the norm over
            (default: the whole world under DDP, the mesh under FSDP2); see the README.
        average_loss (bool): average the loss over the ranks (default True); False when
            the loss you pass is already equal on every rank.

    Guards: ||g||^2 <= 1e-16 or f < f* gives a zero step; a non-finite loss or gradient
    skips the step (parameters and state bitwise unchanged, ``scalars["skipped"]`` += 1).

    .. warning::
        With f* below the reachable loss (f* = 0 on a network whose loss cannot reach 0) the step
        does not shrink near a minimum: the paper's Polyak (f* = 0) diverged on LSTM and
        Nano-GPT. Use :class:`InexactPolyak` when only a lower bound is known.

    Example:
        >>> opt = Polyak(torch.nn.Linear(4, 1).parameters(), f_star=0.0)
    """

    METHOD = "polyak"
    SCALARS = SCALARS
    GLOBAL_HPARAMS = ("f_star", "c", "max_lr")

    def __init__(self, params, f_star: float = 0.0, c: float = 1.0, max_lr: float = math.inf,
                 lr=1.0, *, fused: bool | None = None, foreach: bool | None = None,
                 process_group=None, average_loss: bool = True):
        check_number("f_star", f_star)
        check_number("c", c, low=0.0, low_open=True)
        check_number("max_lr", max_lr, low=0.0, low_open=True, allow_inf=True)
        defaults = dict(lr=lr, f_star=float(f_star), c=float(c), max_lr=float(max_lr))
        super().__init__(params, defaults, fused=fused, foreach=foreach,
                         process_group=process_group,
                         average_loss=average_loss)

    def _initial_scalars(self):
        return {"step_size": 0.0}

    def _run(self, params, grads, buffers, lrs, loss, path, amp):
        polyak(params, grads, self._packed_scalars, lrs=lrs, loss=loss, **path,
               cache=self._fused_cache, **self._hparams(), **amp)


def polyak(params, grads, scalars, *, loss, f_star=0.0, c=1.0, max_lr=math.inf, lrs=1.0,
           grad_scale=None, found_inf=None, fused=False, foreach=None, cache=None):
    """Functional form of :class:`Polyak` (packed scalars: step, skipped, step_size).

    Build the state once with ``Polyak.functional_state(params, ...)`` (the same keyword arguments
    as the class), keep it, and pass its entries on every call; ``lrs`` is one multiplier for
    every tensor or a list of one per tensor. The hyperparameters default as in the class.
    """
    hp = dict(f_star=f_star, c=c, max_lr=max_lr)
    check_paths(fused, foreach)
    if fused:
        run_fused("polyak", params, grads, {}, lrs, loss, scalars, hp, cache,
                  grad_scale=grad_scale, found_inf=found_inf)
    else:
        step = _reference_polyak if foreach is False else _foreach_polyak
        step(params, grads, scalars, lrs=lrs, loss=loss, **hp, grad_scale=grad_scale,
             found_inf=found_inf)


def _step_size(loss, grad_sq, f_star, c, max_lr):
    gap = (loss - f_star).clamp(min=0)                                  # (f(x_t) - f*)_+
    return torch.where(grad_sq > TINY_GRAD_SQ,
                       (gap / (c * grad_sq)).clamp(max=max_lr), 0.0)    # SPS_max


def _reference_polyak(params, grads, scalars, *, lrs, loss, f_star, c, max_lr, grad_scale,
                      found_inf):
    s = dict(zip(COMMON_SCALARS + SCALARS, scalars.unbind()))
    grads = E.unscale(grads, grad_scale)                               # GradScaler: g / S
    loss, grad_sq = E.across_ranks(loss, E.sum_of_squares(grads, scalars.dtype))  # f, ||g_t||^2
    finite = E.is_finite(loss, grad_sq, found_inf=found_inf)
    eta = _step_size(loss, grad_sq, f_star, c, max_lr)
    E.descend(params, grads, lrs, eta, finite)                          # x <- x - lr * eta * g
    E.write_if(finite, s["step_size"], eta)
    E.count_step(s, finite)


def _foreach_polyak(params, grads, scalars, *, lrs, loss, f_star, c, max_lr, grad_scale,
                    found_inf):
    s = F.scalar_slots(scalars, COMMON_SCALARS + SCALARS)
    loss, grad_sq = F.across_ranks(scalars, loss, F.unscaled_sum_of_squares(grads, grad_scale,
                                                                   scalars.dtype))
    finite = F.is_finite(loss, grad_sq, found_inf=found_inf)
    eta = _step_size(loss, grad_sq, f_star, c, max_lr)
    F.descend(params, grads, lrs, eta, finite, F.inverse_scale(grad_scale, params[0]))
    E.write_if(finite, s["step_size"], eta)
    E.count_step(s, finite)
