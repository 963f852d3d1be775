"""SGD with clip-by-global-norm applied inside the step: class, functional form, eager reference."""

from __future__ import annotations

import math

import torch

from . import _eager as E
from . import _foreach as F
from ._dispatch import run_fused
from ._optimizer import COMMON_SCALARS, PolyakFamilyOptimizer, check_number, check_paths

__all__ = ["ClippedSGD", "clipped_sgd"]

SCALARS = ("grad_norm", "clip_coef")

#: Added to the norm before dividing, exactly as torch.nn.utils.clip_grad_norm_ does.
CLIP_EPS = 1e-6


class ClippedSGD(PolyakFamilyOptimizer):
    r"""Clipped (stochastic) gradient descent, eq. (4) of Takezawa et al., with heavy-ball momentum.

    .. math::
        \kappa_t = \min\Big\{1,\ \frac{c}{\|g_t\| + 10^{-6}}\Big\},\qquad
        m_t = \mu\, m_{t-1} + \kappa_t g_t,\qquad x_{t+1} = x_t - \mathrm{lr}\cdot m_t

    (m_{-1} = 0; with mu = 0 this is x <- x - lr kappa g.) Symbols: c = ``max_norm``;
    mu = ``momentum``; ||g|| = one L2 norm over every parameter of every group. This is exactly
    ``clip_grad_norm_(params, max_norm)`` followed by ``torch.optim.SGD(lr, momentum)``, except
    that the ``.grad`` tensors are left untouched.

    Args:
        params: parameters or param groups (groups may set their own ``lr``).
        lr (float or tensor): the learning rate (required).
        max_norm (float): clipping threshold c > 0 (default inf: no clipping).
        momentum (float): mu in [0, 1) (default 0.0).
        fused (bool or None): as in :class:`InexactPolyak`.
        foreach (bool or None): as in :class:`InexactPolyak`.
        process_group: the torch.distributed group to reduce the loss and the norm over
            (default: the whole world under DDP, the mesh under FSDP2); see the README.
        average_loss (bool): average the loss over the ranks (default True); False when
            the loss you pass is already equal on every rank.

    ``scalars["grad_norm"]`` and ``scalars["clip_coef"]`` hold the last step's pre-clip norm and
    kappa. A non-finite gradient (or loss, when one is given) skips the step: parameters and
    state stay bitwise unchanged and ``scalars["skipped"]`` += 1. The loss is optional.
    """

    METHOD = "clipped_sgd"
    SCALARS = SCALARS
    GLOBAL_HPARAMS = ("max_norm", "momentum")
    NEEDS_LOSS = False
    LR_ROLE = "learning_rate"  # schedules are the user's to choose

    def __init__(self, params, lr, max_norm: float = math.inf, momentum: float = 0.0, *,
                 fused: bool | None = None, foreach: bool | None = None,
                 process_group=None, average_loss: bool = True):
        if not torch.is_tensor(lr):
            check_number("lr", lr, low=0.0)
        check_number("max_norm", max_norm, low=0.0, low_open=True, allow_inf=True)
        check_number("momentum", momentum, low=0.0)
        if momentum >= 1.0:
            raise ValueError(f"Invalid momentum: {momentum} (must be < 1)")
        defaults = dict(lr=lr, max_norm=float(max_norm), momentum=float(momentum))
        super().__init__(params, defaults, fused=fused, foreach=foreach,
                         process_group=process_group,
                         average_loss=average_loss)

    @property
    def BUFFERS(self):  # noqa: N802 - the per-parameter state names, as in the base class
        return ("momentum_buffer",) if self._hparams()["momentum"] > 0 else ()

    def _initial_scalars(self):
        return {"grad_norm": 0.0, "clip_coef": 1.0}

    def _init_buffer(self, name, p):
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def _run(self, params, grads, buffers, lrs, loss, path, amp):
        clipped_sgd(params, grads, buffers.get("momentum_buffer"), self._packed_scalars, lrs=lrs,
                    loss=loss, **path, cache=self._fused_cache, **self._hparams(), **amp)


def clipped_sgd(params, grads, momentum_buffers, scalars, *, lrs, loss=None, max_norm=math.inf,
                momentum=0.0, grad_scale=None, found_inf=None, fused=False, foreach=None,
                cache=None):
    """Functional form of :class:`ClippedSGD` (packed scalars: step, skipped, grad_norm,
    clip_coef). ``momentum_buffers`` is None when momentum is 0 (``state["momentum_buffer"]``
    otherwise); ``lrs`` (the learning rate) is required.

    Build the state once with ``ClippedSGD.functional_state(params, ...)`` (the same keyword arguments
    as the class), keep it, and pass its entries on every call; ``lrs`` is one multiplier for
    every tensor or a list of one per tensor. The hyperparameters default as in the class.
    """
    hp = dict(max_norm=max_norm, momentum=momentum)
    check_paths(fused, foreach)
    if fused:
        bufs = {"momentum_buffer": momentum_buffers} if momentum > 0 else {}
        run_fused("clipped_sgd", params, grads, bufs, lrs, loss, scalars, hp, cache,
                  grad_scale=grad_scale, found_inf=found_inf)
    else:
        step = _reference_clipped_sgd if foreach is False else _foreach_clipped_sgd
        step(params, grads, momentum_buffers, scalars, lrs=lrs, loss=loss, **hp,
             grad_scale=grad_scale, found_inf=found_inf)


def _clip(grad_sq, max_norm):
    """(||g_t||, kappa_t)."""
    norm = torch.sqrt(grad_sq)                                        # ||g_t||
    return norm, (max_norm / (norm + CLIP_EPS)).clamp(max=1.0)       # kappa_t


def _reference_clipped_sgd(params, grads, momentum_buffers, scalars, *, lrs, loss, max_norm,
                           momentum, grad_scale, found_inf):
    s = dict(zip(COMMON_SCALARS + SCALARS, scalars.unbind()))
    grads = E.unscale(grads, grad_scale)                               # GradScaler: g / S
    loss, grad_sq = E.across_ranks(loss, E.sum_of_squares(grads, scalars.dtype))
    finite = E.is_finite(grad_sq, loss, found_inf=found_inf)
    norm, coef = _clip(grad_sq, max_norm)
    if momentum > 0:
        directions = []
        for m, g in zip(momentum_buffers, grads):
            m_new = momentum * E.up(m) + coef.to(E.math_dtype(g)) * E.up(g)  # m = mu m + kappa g
            E.write_if(finite, m, m_new)
            directions.append(m)
        E.descend(params, directions, lrs, torch.ones_like(coef), finite)  # x <- x - lr m
    else:
        E.descend(params, grads, lrs, coef, finite)                  # x <- x - lr kappa g
    E.write_if(finite, s["grad_norm"], norm)
    E.write_if(finite, s["clip_coef"], coef)
    E.count_step(s, finite)


def _foreach_clipped_sgd(params, grads, momentum_buffers, scalars, *, lrs, loss, max_norm,
                         momentum, grad_scale, found_inf):
    s = F.scalar_slots(scalars, COMMON_SCALARS + SCALARS)
    loss, grad_sq = F.across_ranks(scalars, loss, F.unscaled_sum_of_squares(grads, grad_scale,
                                                                   scalars.dtype))
    finite = F.is_finite(grad_sq, loss, found_inf=found_inf)
    norm, coef = _clip(grad_sq, max_norm)
    like, inv_scale = params[0], F.inverse_scale(grad_scale, params[0])
    if momentum == 0:
        F.descend(params, grads, lrs, coef, finite, inv_scale)
    elif F.taken(finite, like):
        kappa = F.number(coef, like) * inv_scale                      # kappa_t / S
        minus_lrs = F.per_lr(lrs, len(params), lambda lr: F.number(-lr, like))
        loops = F.cpu_loops(list(params), list(momentum_buffers), list(grads))
        if loops is not None:                # m <- mu m + kappa g, x <- x - lr m in one pass
            loops.momentum_update(list(params), list(momentum_buffers), list(grads), momentum,
                                  kappa, 1.0, False, minus_lrs, [1.0] * len(minus_lrs))
        else:
            for minus_lr, (xs, ms, gs) in F.blocks_with_coefs(minus_lrs, params,
                                                              momentum_buffers, grads):
                with F.updating(ms, finite) as m, F.updating(xs, finite) as x:
                    torch._foreach_mul_(m, momentum)
                    F.add_(m, F.up_all(gs), kappa)                    # m = mu m + kappa g
                    F.add_(x, m, minus_lr)                            # x <- x - lr m
    E.write_if(finite, s["grad_norm"], norm)
    E.write_if(finite, s["clip_coef"], coef)
    E.count_step(s, finite)
