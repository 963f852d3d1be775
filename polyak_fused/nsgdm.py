"""Normalized SGD with momentum (Cutkosky & Mehta 2020; parameter-agnostic schedule of Hübler et
al. 2024): class, functional form, eager reference."""

from __future__ import annotations

import torch

from . import _eager as E
from . import _foreach as F
from ._dispatch import run_fused
from ._optimizer import (COMMON_SCALARS, TINY_GRAD_SQ, PolyakFamilyOptimizer, check_number,
                         check_paths)

__all__ = ["NSGDM", "nsgdm"]

SCALARS = ("step_size",)
SCHEDULES = ("constant", "agnostic")


class NSGDM(PolyakFamilyOptimizer):
    r"""Normalized SGD with momentum: every step has length lr (times a schedule).

    .. math::
        m_t = \beta_t m_{t-1} + (1-\beta_t) g_t,\qquad
        x_{t+1} = x_t - \mathrm{lr}\cdot s_t\,\frac{m_t}{\|m_t\|}

    with t = 1, 2, ... and m_0 = 0. ``schedule="constant"``: beta_t = ``beta``, s_t = 1.
    ``schedule="agnostic"`` (Hübler, Yang, Li, He, AISTATS 2024): beta_t = 1 - t^{-1/2},
    s_t = t^{-3/4} (``beta`` is then unused). ||m|| is one norm over every parameter of every
    group. ``scalars["step_size"]`` holds s_t / ||m_t||.

    Args:
        params: parameters or param groups (groups may set their own ``lr``).
        lr (float or tensor): the step length (required).
        beta (float): momentum beta in [0, 1) for the constant schedule (default 0.9).
        schedule (str): "constant" or "agnostic" (default "constant").
        fused (bool or None): as in :class:`InexactPolyak`.
        foreach (bool or None): as in :class:`InexactPolyak`.
        process_group: the torch.distributed group to reduce the loss and the norm over
            (default: the whole world under DDP, the mesh under FSDP2); see the README.
        average_loss (bool): average the loss over the ranks (default True); False when
            the loss you pass is already equal on every rank.

    Guards: ||m_t||^2 <= 1e-16 gives a zero step; a non-finite gradient (or loss, when one is
    given) skips the step: parameters, momentum and counters stay bitwise unchanged and
    ``scalars["skipped"]`` += 1. The loss is optional.
    """

    METHOD = "nsgdm"
    SCALARS = SCALARS
    BUFFERS = ("momentum_buffer",)
    GLOBAL_HPARAMS = ("beta", "schedule")
    NEEDS_LOSS = False
    LR_ROLE = "learning_rate"  # schedules are the user's to choose

    def __init__(self, params, lr, beta: float = 0.9, schedule: str = "constant", *,
                 fused: bool | None = None, foreach: bool | None = None,
                 process_group=None, average_loss: bool = True):
        if not torch.is_tensor(lr):
            check_number("lr", lr, low=0.0)
        check_number("beta", beta, low=0.0)
        if beta >= 1.0:
            raise ValueError(f"Invalid beta: {beta} (must be < 1)")
        if schedule not in SCHEDULES:
            raise ValueError(f"Invalid schedule: {schedule!r} (expected one of {SCHEDULES})")
        defaults = dict(lr=lr, beta=float(beta), schedule=schedule)
        super().__init__(params, defaults, fused=fused, foreach=foreach,
                         process_group=process_group,
                         average_loss=average_loss)

    def _initial_scalars(self):
        return {"step_size": 0.0}

    def _init_buffer(self, name, p):
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def _run(self, params, grads, buffers, lrs, loss, path, amp):
        nsgdm(params, grads, buffers["momentum_buffer"], self._packed_scalars, lrs=lrs, loss=loss,
              **path, cache=self._fused_cache, **self._hparams(), **amp)


def nsgdm(params, grads, momentum_buffers, scalars, *, lrs, loss=None, beta=0.9,
          schedule="constant", grad_scale=None, found_inf=None, fused=False, foreach=None,
          cache=None):
    """Functional form of :class:`NSGDM` (packed scalars: step, skipped, step_size;
    ``momentum_buffers``: ``state["momentum_buffer"]``); ``lrs`` (the step length) is required.

    Build the state once with ``NSGDM.functional_state(params, ...)`` (the same keyword arguments
    as the class), keep it, and pass its entries on every call; ``lrs`` is one multiplier for
    every tensor or a list of one per tensor. The hyperparameters default as in the class.
    """
    hp = dict(beta=beta, schedule=schedule)
    check_paths(fused, foreach)
    if fused:
        run_fused("nsgdm", params, grads, {"momentum_buffer": momentum_buffers}, lrs, loss,
                  scalars, hp, cache,
                  grad_scale=grad_scale, found_inf=found_inf)
    else:
        step = _reference_nsgdm if foreach is False else _foreach_nsgdm
        step(params, grads, momentum_buffers, scalars, lrs=lrs, loss=loss, **hp,
             grad_scale=grad_scale, found_inf=found_inf)


def _schedule(t, beta, schedule):
    """(beta_t, s_t) for the step t being taken."""
    if schedule == "agnostic":
        return 1 - t.rsqrt(), t.pow(-0.75)                     # beta_t = 1 - t^-1/2, s_t = t^-3/4
    return torch.full_like(t, beta), torch.ones_like(t)


def _step_size(m_sq, s_t):
    return torch.where(m_sq > TINY_GRAD_SQ, s_t / torch.sqrt(m_sq), 0.0)  # s_t / ||m_t||


def _reference_nsgdm(params, grads, momentum_buffers, scalars, *, lrs, loss, beta, schedule,
                     grad_scale, found_inf):
    s = dict(zip(COMMON_SCALARS + SCALARS, scalars.unbind()))
    grads = E.unscale(grads, grad_scale)                               # GradScaler: g / S
    beta_t, s_t = _schedule(s["step"] + 1, beta, schedule)
    m_new = [beta_t.to(E.math_dtype(m)) * E.up(m) + (1 - beta_t).to(E.math_dtype(m)) * E.up(g)
             for m, g in zip(momentum_buffers, grads)]       # m_t = beta_t m + (1 - beta_t) g
    loss, m_sq = E.across_ranks(loss, E.sum_of_squares(m_new, scalars.dtype))  # ||m_t||^2
    finite = E.is_finite(m_sq, loss, found_inf=found_inf)
    eta = _step_size(m_sq, s_t)
    for m, mn in zip(momentum_buffers, m_new):
        E.write_if(finite, m, mn)
    E.descend(params, m_new, lrs, eta, finite)               # x <- x - lr s_t m_t / ||m_t||
    E.write_if(finite, s["step_size"], eta)
    E.count_step(s, finite)


def _foreach_nsgdm(params, grads, momentum_buffers, scalars, *, lrs, loss, beta, schedule,
                   grad_scale, found_inf):
    s = F.scalar_slots(scalars, COMMON_SCALARS + SCALARS)
    like = params[0]
    beta_t, s_t = _schedule(s["step"] + 1, beta, schedule)
    b = F.number(beta_t, like)
    g_weight = (1 - b) * F.inverse_scale(grad_scale, like)            # (1 - beta_t) / S

    def momentum_of(ms, gs):                               # m_t = beta_t m + (1 - beta_t) g
        m = torch._foreach_mul(F.up_all(ms), b)
        F.add_(m, F.up_all(gs), g_weight)
        return m

    loops = F.cpu_loops(list(params), list(momentum_buffers), list(grads))
    if loops is not None:                    # ||m_t||^2 in one pass over m and g
        m_sq = loops.momentum_sums(None, list(momentum_buffers), list(grads), b, g_weight, 1.0,
                                   False)[2]
    else:
        parts = []                           # ||m_t||^2, block by block, m_t not yet written
        for ms, gs in F.blocks(momentum_buffers, grads):
            m = momentum_of(ms, gs)
            parts += F.dots(m, m)
        m_sq = F.block_sums(parts, scalars.dtype, like.device)
    loss, m_sq = F.across_ranks(scalars, loss, m_sq)
    finite = F.is_finite(m_sq, loss, found_inf=found_inf)
    eta = _step_size(m_sq, s_t)
    if F.taken(finite, like):
        coefs = F.per_lr(lrs, len(params), lambda lr: F.number(-(lr * eta), like))
        if loops is not None:                # m <- m_t, x <- x - lr eta m_t in one pass
            loops.momentum_update(list(params), list(momentum_buffers), list(grads), b, g_weight,
                                  1.0, False, coefs, [1.0] * len(coefs))
        else:
            for coef, (xs, ms, gs) in F.blocks_with_coefs(coefs, params, momentum_buffers,
                                                          grads):
                with F.updating(ms, finite) as m, F.updating(xs, finite) as x:
                    torch._foreach_mul_(m, b)
                    F.add_(m, F.up_all(gs), g_weight)                 # m_t, as in the first pass
                    F.add_(x, m, coef)                                # x <- x - lr eta m_t
    E.write_if(finite, s["step_size"], eta)
    E.count_step(s, finite)
