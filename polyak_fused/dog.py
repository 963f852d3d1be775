"""DoG, "Distance over Gradients" (Ivgi, Hinder, Carmon, ICML 2023): class, functional form,
eager reference."""

from __future__ import annotations

import torch

from . import _eager as E
from . import _foreach as F
from ._dispatch import run_fused
from ._optimizer import COMMON_SCALARS, PolyakFamilyOptimizer, check_number, check_paths

__all__ = ["DoG", "dog"]

SCALARS = ("step_size", "rbar", "G")

#: Added to G on the first step, as in the authors' code, so that eta is finite.
DOG_EPS = 1e-8


class DoG(PolyakFamilyOptimizer):
    r"""DoG: the step is the distance travelled over the root of the summed squared gradients.

    .. math::
        d_t = g_t + \lambda x_t,\qquad
        \bar r_t = \max\big(r_\epsilon,\ \max_{i\le t}\|x_i - x_0\|\big),\quad
        r_\epsilon = \mathrm{reps\_rel}\,(1 + \|x_0\|),\qquad
        G_t = \epsilon + \sum_{i\le t}\|d_i\|^2,

        \eta_t = \frac{\bar r_t}{\sqrt{G_t}},\qquad x_{t+1} = x_t - \mathrm{lr}\cdot\eta_t d_t

    Symbols: lambda = ``weight_decay`` (coupled, as in the authors' code); eps = 1e-8;
    all norms are global over every parameter of every group (the authors' code takes one norm
    per group). x_0 is kept per parameter as state ``"x0"`` (made at the first step for every
    parameter); ``scalars`` holds ``rbar`` and ``G``. A parameter whose ``.grad`` is None is not
    stepped (weight decay included) and adds nothing to ||d||^2, but ||x_t - x_0|| and ||x_0||
    still cover it: None and a zero gradient give the same step without weight decay.

    Args:
        params: parameters or param groups (groups may set their own ``lr``).
        reps_rel (float): r_eps relative to 1 + ||x_0|| (default 1e-6; the authors advise 1e-4
            with batch norm).
        lr (float or tensor): multiplier (default 1.0; the authors advise leaving it at 1).
        weight_decay (float): coupled L2 coefficient lambda >= 0 (default 0.0).
        fused (bool or None): as in :class:`InexactPolyak`.
        foreach (bool or None): as in :class:`InexactPolyak`.
        process_group: the torch.distributed group to reduce the loss and the norm over
            (default: the whole world under DDP, the mesh under FSDP2); see the README.
        average_loss (bool): average the loss over the ranks (default True); False when
            the loss you pass is already equal on every rank.

    Guards: G >= eps > 0, so eta is always finite; a zero gradient moves nothing. A
    non-finite gradient skips the step (parameters and state bitwise unchanged,
    ``scalars["skipped"]`` += 1). The loss is optional and unused except for that check.

    .. warning::
        The authors pair DoG with a polynomial-decay average of the iterates; the last iterate
        can be noisy (the Takezawa et al. paper found DoG "very unstable" on Nano-GPT).
    """

    METHOD = "dog"
    SCALARS = SCALARS
    BUFFERS = ("x0",)
    GLOBAL_HPARAMS = ("reps_rel", "weight_decay")
    NEEDS_LOSS = False
    WHOLE_ITERATE = True  # ||x_t - x_0|| and ||x_0|| cover the parameters without a gradient

    def __init__(self, params, reps_rel: float = 1e-6, lr=1.0, weight_decay: float = 0.0, *,
                 fused: bool | None = None, foreach: bool | None = None,
                 process_group=None, average_loss: bool = True):
        check_number("reps_rel", reps_rel, low=0.0, low_open=True)
        check_number("weight_decay", weight_decay, low=0.0)
        defaults = dict(lr=lr, reps_rel=float(reps_rel), weight_decay=float(weight_decay))
        super().__init__(params, defaults, fused=fused, foreach=foreach,
                         process_group=process_group,
                         average_loss=average_loss)

    def _initial_scalars(self):
        return {"step_size": 0.0, "rbar": 0.0, "G": 0.0}

    def _init_buffer(self, name, p):
        return p.detach().clone(memory_format=torch.preserve_format)  # x_0

    def _run(self, params, grads, buffers, lrs, loss, path, amp):
        dog(params, grads, buffers["x0"], self._packed_scalars, lrs=lrs, loss=loss, **path,
            cache=self._fused_cache, **self._hparams(), **amp)


def dog(params, grads, x0s, scalars, *, loss=None, reps_rel=1e-6, weight_decay=0.0, lrs=1.0,
        grad_scale=None, found_inf=None, fused=False, foreach=None, cache=None):
    """Functional form of :class:`DoG` (packed scalars: step, skipped, step_size, rbar, G;
    ``x0s``: the initial parameters, ``state["x0"]``). ``grads`` may hold None: that parameter is
    not stepped, but counts in ||x_t - x_0|| and ||x_0||.

    Build the state once with ``DoG.functional_state(params, ...)`` (the same keyword arguments
    as the class), keep it, and pass its entries on every call; ``lrs`` is one multiplier for
    every tensor or a list of one per tensor. The hyperparameters default as in the class.
    """
    hp = dict(reps_rel=reps_rel, weight_decay=weight_decay)
    check_paths(fused, foreach)
    if fused:
        run_fused("dog", params, grads, {"x0": x0s}, lrs, loss, scalars, hp, cache,
                  grad_scale=grad_scale, found_inf=found_inf)
    else:
        step = _reference_dog if foreach is False else _foreach_dog
        step(params, grads, x0s, scalars, lrs=lrs, loss=loss, **hp, grad_scale=grad_scale,
             found_inf=found_inf)


def _step_size(s, grad_sq, dist_sq, x0_sq, reps_rel):
    """(eta_t, rbar_t, G_t)."""
    r_eps = reps_rel * (1 + torch.sqrt(x0_sq))                              # reps_rel (1+||x_0||)
    rbar = torch.maximum(torch.maximum(s["rbar"], torch.sqrt(dist_sq)), r_eps)
    G = s["G"] + grad_sq + torch.where(s["step"] == 0, DOG_EPS, 0.0)
    return rbar / torch.sqrt(G), rbar, G                          # eta_t = rbar_t / sqrt(G_t)


def _reference_dog(params, grads, x0s, scalars, *, lrs, loss, reps_rel, weight_decay, grad_scale,
                   found_inf):
    s = dict(zip(COMMON_SCALARS + SCALARS, scalars.unbind()))
    dt = scalars.dtype
    distances = [E.up(x) - E.up(x0) for x, x0 in zip(params, x0s)]     # over every parameter
    stepped = [i for i, g in enumerate(grads) if g is not None]        # those with a gradient
    lrs = E.per_tensor(lrs, len(params))
    params, grads, lrs = ([ts[i] for i in stepped] for ts in (params, grads, lrs))
    grads = E.unscale(grads, grad_scale)                               # GradScaler: g / S
    d = [E.up(g) + weight_decay * E.up(x) for g, x in zip(grads, params)]  # d_t = g_t + lambda x_t
    loss, grad_sq, dist_sq, x0_sq = E.across_ranks(
        loss,
        E.sum_of_squares(d, dt),                                            # ||d_t||^2
        E.sum_of_squares(distances, dt),                                    # ||x_t - x_0||^2
        E.sum_of_squares(x0s, dt))                                          # ||x_0||^2
    finite = E.is_finite(grad_sq, loss, found_inf=found_inf)
    eta, rbar, G = _step_size(s, grad_sq, dist_sq, x0_sq, reps_rel)
    E.descend(params, d, lrs, eta, finite)                                  # x <- x - lr eta d
    E.write_if(finite, s["rbar"], rbar)
    E.write_if(finite, s["G"], G)
    E.write_if(finite, s["step_size"], eta)
    E.count_step(s, finite)


def _foreach_dog(params, grads, x0s, scalars, *, lrs, loss, reps_rel, weight_decay, grad_scale,
                 found_inf):
    s = F.scalar_slots(scalars, COMMON_SCALARS + SCALARS)
    dt, like = scalars.dtype, params[0]

    def direction_sq(xs, gs):         # partial sums of ||d_t||^2 (||g||^2 without weight decay:
        if weight_decay == 0:         # divided by S^2 below)
            return F.dots(gs, gs)
        d = torch._foreach_add(F.unscaled(gs, grad_scale), F.up_all(xs), alpha=weight_decay)
                                                                      # d_t = g_t + lambda x_t
        return F.dots(d, d)

    # One pass over x, x_0 and g: ||x_t - x_0||^2, ||x_0||^2, ||d_t||^2.
    loops = F.cpu_loops(list(params), list(x0s), list(grads))
    if loops is not None:
        g_scale = 1.0 if weight_decay == 0 else F.inverse_scale(grad_scale, like)
        dist_sq, x0_sq, grad_sq = loops.dog_sums(list(params), list(x0s), list(grads), g_scale,
                                                 weight_decay)
    else:                        # block by block (each block's x_0 read once; g in the same
        every = all(g is not None for g in grads)    # pass when every parameter has one)
        dist, x0_parts, d_parts = [], [], []
        for block in F.blocks(list(params), list(x0s), *([grads] if every else [])):
            x0 = F.up_all(block[1])
            gap = torch._foreach_sub(F.up_all(block[0]), x0)
            dist += F.dots(gap, gap)
            x0_parts += F.dots(x0, x0)
            if every:
                d_parts += direction_sq(block[0], block[2])
        if not every:
            with_grad = [(x, g) for x, g in zip(params, grads) if g is not None]
            for xs, gs in F.blocks([x for x, _ in with_grad], [g for _, g in with_grad]):
                d_parts += direction_sq(xs, gs)
        dist_sq, x0_sq, grad_sq = (F.block_sums(p, dt, like.device)
                                   for p in (dist, x0_parts, d_parts))
    stepped = [i for i, g in enumerate(grads) if g is not None]
    lrs = E.per_tensor(lrs, len(params))
    params, grads, lrs = ([ts[i] for i in stepped] for ts in (params, grads, lrs))
    if weight_decay == 0 and grad_scale is not None:
        grad_sq = grad_sq / grad_scale.reshape(()).to(device=like.device, dtype=dt).square()
    loss, grad_sq, dist_sq, x0_sq = F.across_ranks(scalars, loss, grad_sq, dist_sq, x0_sq)
    finite = F.is_finite(grad_sq, loss, found_inf=found_inf)
    inv_scale = F.inverse_scale(grad_scale, like)
    eta, rbar, G = _step_size(s, grad_sq, dist_sq, x0_sq, reps_rel)
    if params and F.taken(finite, like):
        coefs = F.per_lr(lrs, len(params), lambda lr: F.number(-(lr * eta), like))
        loops = F.cpu_loops(params, grads)
        if loops is not None:                    # x <- (1 - lr eta lambda) x - lr eta g / S
            loops.axpy(params, grads, [c * inv_scale for c in coefs],
                       [1 + c * weight_decay for c in coefs])
        else:
            for coef, (xs, gs) in F.blocks_with_coefs(coefs, params, grads):
                with F.updating(xs, finite) as x:    # x <- x - lr eta (g + lambda x)
                    if weight_decay:
                        torch._foreach_mul_(x, 1 + coef * weight_decay)
                    F.add_(x, F.up_all(gs), coef * inv_scale)
    E.write_if(finite, s["rbar"], rbar)
    E.write_if(finite, s["G"], G)
    E.write_if(finite, s["step_size"], eta)
    E.count_step(s, finite)
