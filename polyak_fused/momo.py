"""MoMo, momentum models for adaptive learning rates (Schaipp, Ohana, Eickenberg, Defazio, Gower,
ICML 2024): class, functional form, eager reference. The step-size rule and the online lower
bound defined here are shared with MoMo-Adam (momo_adam.py)."""

from __future__ import annotations

import math

import torch

from . import _eager as E
from . import _foreach as F
from ._dispatch import run_fused
from ._optimizer import (COMMON_SCALARS, TINY_GRAD_SQ, PolyakFamilyOptimizer, check_number,
                         check_paths)

__all__ = ["MoMo", "momo"]

SCALARS = ("step_size", "loss_avg", "grad_dot_w", "lb")


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (expected a bool)")


def check_beta(name: str, value) -> None:
    check_number(name, value, low=0.0)
    if value >= 1.0:
        raise ValueError(f"Invalid {name}: {value} (must be < 1)")


class MoMo(PolyakFamilyOptimizer):
    r"""MoMo: a Polyak step on the heavy-ball direction, capped by ``lr``.

    .. math::
        d_k = \beta d_{k-1} + (1-\beta) g_k,\qquad
        \bar f_k = \beta \bar f_{k-1} + (1-\beta) f_k,\qquad
        \gamma_k = \beta \gamma_{k-1} + (1-\beta)\langle g_k, x_k\rangle,

        t_k = \frac{\max\big((1+\alpha\lambda)(\bar f_k - \rho_k\,\mathrm{lb})
              + \langle d_k, x_k\rangle - (1+\alpha\lambda)\gamma_k,\ 0\big)}{\|d_k\|^2},
        \qquad \tau_k = \min\Big(\frac{\alpha}{\rho_k},\ t_k\Big),

        x_{k+1} = \frac{x_k - \tau_k d_k}{1 + \alpha\lambda}

    for k = 1, 2, ... (Schaipp, Ohana, Eickenberg, Defazio, Gower, "MoMo: Momentum Models for
    Adaptive Learning Rates", ICML 2024; the official code is momo-opt, class ``Momo``).
    m_k(x) = f̄_k + <d_k, x> - gamma_k is the average of the past linearisations
    f_j + <g_j, x - x_j> of the loss, a model of it; t_k is the Polyak step that brings the model
    down from m_k(x_k) to rho_k lb, and alpha / rho_k caps it. With ``bias_correction=False``,
    rho_k = 1 and the averages start at the first step's values (d = g_1, f̄ = f_1,
    gamma = <g_1, x_1>); with ``bias_correction=True``, rho_k = 1 - beta^k and they start at 0.

    Symbols: f_k = the step's loss; g_k its gradient; x_k the parameters; alpha = the group's
    ``lr``, the cap of the step size (not a multiplier on it); lambda = ``weight_decay``
    (proximal: the division by 1 + alpha lambda); beta = ``beta``; lb = ``lb``. The inner
    products and ||d_k|| are global, over every parameter of every group. State:
    ``state[p]["grad_avg"]`` = d_k; ``scalars["loss_avg"]`` = f̄_k, ``scalars["grad_dot_w"]``
    = gamma_k, ``scalars["lb"]`` = the lower bound in use, ``scalars["step_size"]`` = tau_k of
    the first param group.

    ``use_fstar=True`` estimates the lower bound online (the paper's online estimate of f*): with
    h_k = f̄_k + <d_k, x_k> - gamma_k and w = 1 + alpha lambda, first a reset (when
    w f̄_k + <d_k, x_k> - w gamma_k < w rho_k lb_k, lb_k becomes that left side divided by
    2 w rho_k), then tau_k as above with lb_k, then lb_{k+1} = (h_k - tau_k ||d_k||^2 / 2) / rho_k;
    each new value is raised to at least the ``lb`` given (the safeguard).

    The arguments have momo-opt's names and defaults, so ``momo.Momo(params, ...)`` becomes
    ``pf.MoMo(params, ...)``; give the loss with ``opt.watch_loss(loss)`` before the backward,
    or ``step(loss=loss)`` as in momo-opt.

    Args:
        params: parameters or param groups. A group may set its own ``lr``; every other
            hyperparameter is global and must be equal in every group.
        lr (float or tensor): alpha, the cap of the step size (default 1.0). LR schedules
            change the cap, as in the paper's experiments.
        weight_decay (float): lambda >= 0 (default 0), applied proximally.
        beta (float): momentum in [0, 1) (default 0.9; momo-opt also takes 1, which freezes the
            averages).
        lb (float): a lower bound on the loss (default 0, right for cross-entropy and squared
            losses).
        bias_correction (bool): rho_k = 1 - beta^k and zero-started averages (default False).
        use_fstar (bool): estimate the lower bound online, starting from and never below ``lb``
            (default False).
        fused (bool or None): as in :class:`InexactPolyak`.
        foreach (bool or None): as in :class:`InexactPolyak`.
        process_group: the torch.distributed group to reduce the loss and the sums over
            (default: the whole world under DDP, the mesh under FSDP2); see the README.
        average_loss (bool): average the loss over the ranks (default True); False when
            the loss you pass is already equal on every rank.

    Guards: ||d_k||^2 <= 1e-16 makes t_k = +inf, so tau_k = alpha / rho_k (a step of length at
    most alpha 1e-8 / rho_k); a negative numerator gives t_k = 0; a non-finite loss, gradient or
    inner product (or GradScaler's inf flag) skips the step: parameters and state stay bitwise
    unchanged and ``scalars["skipped"]`` += 1. The loss is required.

    Deliberate differences from momo-opt 0.1.0 (each shown in tests/test_momo.py):
        * no host sync on an accelerator: every scalar is a device tensor, no ``.item()``, no
          branch on a device value (on the CPU the foreach path reads its step size on the
          host, which stalls no device);
        * every hyperparameter but ``lr`` is global (one value for all groups);
        * gamma_k is one global average of sum_p <g_p, x_p> (momo-opt keeps one per parameter and
          sums them: the same when every parameter has a gradient at every step);
        * with ``use_fstar``, lb is updated once per step, with the first group's lr (momo-opt
          updates it again in each group's turn, so that a later group sees the lb the earlier
          one left);
        * a parameter whose ``.grad`` is None is not stepped, keeps its buffer and is left out of
          the sums (momo-opt raises an AttributeError);
        * the guards above (momo-opt divides by ||d_k||^2 whatever its size, and steps on
          non-finite values).

    .. warning::
        lb must lower-bound every loss you pass, regularisation terms included: once the model
        m_k(x_k) lies below rho_k lb the Polyak part t_k is 0 and the iterates stop moving
        (but for the weight decay), and a loose lb far below the reachable loss leaves the step
        at its cap alpha near a minimum (then alpha acts as a learning rate, and a decaying
        schedule is what makes the iterates settle). The loss and the gradient must be
        those of the same function (``watch_loss`` keeps them consistent under accumulation and
        GradScaler).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = MoMo(model.parameters(), lr=1.0)
        >>> x = torch.randn(64, 4)
        >>> y = x @ torch.randn(4, 1)
        >>> for _ in range(50):
        ...     opt.zero_grad()
        ...     loss = opt.watch_loss(torch.nn.functional.mse_loss(model(x), y))
        ...     loss.backward()
        ...     _ = opt.step()
        >>> bool(loss < 0.01), int(opt.scalars["step"])
        (True, 50)
    """

    METHOD = "momo"
    SCALARS = SCALARS
    BUFFERS = ("grad_avg",)
    GLOBAL_HPARAMS = ("weight_decay", "beta", "lb", "bias_correction", "use_fstar")
    LR_ROLE = "cap"  # tau = min(lr / rho, t): a schedule on the cap is the method as published

    def __init__(self, params, lr=1.0, weight_decay: float = 0, beta: float = 0.9,
                 lb: float = 0, bias_correction: bool = False, use_fstar: bool = False, *,
                 fused: bool | None = None, foreach: bool | None = None, process_group=None,
                 average_loss: bool = True):
        check_number("weight_decay", weight_decay, low=0.0)
        check_beta("beta", beta)
        check_number("lb", lb)
        check_flag("bias_correction", bias_correction)
        check_flag("use_fstar", use_fstar)
        defaults = dict(lr=lr, weight_decay=float(weight_decay), beta=float(beta), lb=float(lb),
                        bias_correction=bias_correction, use_fstar=use_fstar)
        super().__init__(params, defaults, fused=fused, foreach=foreach,
                         process_group=process_group,
                         average_loss=average_loss)

    def _initial_scalars(self):
        return {"step_size": 0.0, "loss_avg": 0.0, "grad_dot_w": 0.0, "lb": self.defaults["lb"]}

    def _init_buffer(self, name, p):
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def _run(self, params, grads, buffers, lrs, loss, path, amp):
        momo(params, grads, buffers["grad_avg"], self._packed_scalars, lrs=lrs, loss=loss,
             **path, cache=self._fused_cache, **self._hparams(), **amp)


def momo(params, grads, grad_avgs, scalars, *, loss, lrs=1.0, weight_decay=0, beta=0.9, lb=0,
         bias_correction=False, use_fstar=False, grad_scale=None, found_inf=None, fused=False,
         foreach=None,
         cache=None):
    """Functional form of :class:`MoMo` (packed scalars: step, skipped, step_size, loss_avg,
    grad_dot_w, lb; ``grad_avgs``: d, ``state["grad_avg"]``); ``lrs`` is the cap alpha.

    Build the state once with ``MoMo.functional_state(params, ...)`` (the same keyword arguments
    as the class), keep it, and pass its entries on every call; ``lrs`` is one cap for every
    tensor or a list of one per tensor. The hyperparameters default as in the class.

    Example:
        >>> params = list(torch.nn.Linear(4, 1).parameters())
        >>> state = MoMo.functional_state(params)
        >>> loss = sum(p.square().sum() for p in params) + 1.0
        >>> loss.backward()
        >>> with torch.no_grad():
        ...     momo(params, [p.grad for p in params], state["grad_avg"], state["scalars"],
        ...          loss=loss.detach())
        >>> int(state["scalars"][0])   # the step count
        1
    """
    hp = dict(weight_decay=weight_decay, beta=beta, lb=lb, bias_correction=bias_correction,
              use_fstar=use_fstar)
    check_paths(fused, foreach)
    if fused:
        run_fused("momo", params, grads, {"grad_avg": grad_avgs}, lrs, loss, scalars, hp, cache,
                  grad_scale=grad_scale, found_inf=found_inf)
    else:
        step = _reference_momo if foreach is False else _foreach_momo
        step(params, grads, grad_avgs, scalars, lrs=lrs, loss=loss, **hp,
             grad_scale=grad_scale, found_inf=found_inf)


# ---- what MoMo and MoMo-Adam share: the step size and the online lower bound ------------------
def as_scalar(lr, like: torch.Tensor):
    """A group's lr as a number or a 0-d tensor of the scalars' dtype and device."""
    return lr.reshape(()).to(device=like.device, dtype=like.dtype) if torch.is_tensor(lr) else lr


def as_math(value, dtype: torch.dtype):
    """A number or 0-d tensor, in a tensor's math dtype (numbers stay numbers)."""
    return value.to(dtype) if torch.is_tensor(value) else value


def reset_lower_bound(lb_k, lb, f_avg, dx, gamma, rho, alpha, weight_decay):
    """use_fstar, before the step size: when the model's value w f̄ + <d, x> - w gamma lies below
    w rho lb_k (w = 1 + alpha lambda), lb_k restarts at half of it (over w rho), never below lb."""
    w = 1 + alpha * weight_decay
    h_w = w * f_avg + dx - w * gamma
    return torch.where(h_w < w * rho * lb_k, (h_w / (2 * w * rho)).clamp(min=lb), lb_k)


def step_size(lb_k, f_avg, dx, gamma, d_sq, rho, alpha, weight_decay):
    """tau = min(alpha / rho, t) with t the (clamped) Polyak step of the model; t = +inf when the
    direction is (numerically) zero, so that tau is then the cap."""
    w = 1 + alpha * weight_decay                                   # the proximal 1 + alpha lambda
    numerator = w * (f_avg - rho * lb_k) + dx - w * gamma
    t = torch.where(d_sq > TINY_GRAD_SQ, numerator.clamp(min=0) / d_sq, math.inf)
    return torch.minimum(alpha / rho, t)


def update_lower_bound(lb, f_avg, dx, gamma, d_sq, rho, tau):
    """use_fstar, after the step size: lb_{k+1} = (h - tau ||d||^2 / 2) / rho, never below lb."""
    h = f_avg + dx - gamma
    return ((h - 0.5 * tau * d_sq) / rho).clamp(min=lb)


def per_lr(lrs, like: torch.Tensor, step_size_of) -> list:
    """(alpha, step_size_of(alpha)) for each tensor's lr, alpha as a number or a 0-d tensor like
    ``like``; computed once per distinct lr (one per param group)."""
    def pair(lr):
        alpha = as_scalar(lr, like)
        return alpha, step_size_of(alpha)

    return F.per_lr(lrs, len(lrs), pair)


def model_step(s, lrs, scalars, f_avg, dx, gamma, d_sq, rho, *, lb, use_fstar, weight_decay):
    """The step of the model, shared by MoMo and MoMo-Adam on every path: (lb_k, (alpha, tau_k)
    for each tensor, tau_k of the first group)."""
    lb_k = s["lb"] if use_fstar else torch.full_like(s["lb"], lb)
    if use_fstar:                                  # (with the first group's lr: one lb update)
        lb_k = reset_lower_bound(lb_k, lb, f_avg, dx, gamma, rho, as_scalar(lrs[0], scalars),
                                 weight_decay)
    steps = per_lr(lrs, scalars, lambda alpha: step_size(            # (alpha, tau_k) per tensor
        lb_k, f_avg, dx, gamma, d_sq, rho, alpha, weight_decay))
    tau_first = steps[0][1]
    if use_fstar:
        lb_k = update_lower_bound(lb, f_avg, dx, gamma, d_sq, rho, tau_first)
    return lb_k, steps, tau_first


def commit_scalars(s, finite, f_avg, gamma, lb_k, tau_first) -> None:
    """The global state after a step of MoMo or MoMo-Adam (unchanged when skipped)."""
    E.write_if(finite, s["loss_avg"], f_avg)
    E.write_if(finite, s["grad_dot_w"], gamma)
    E.write_if(finite, s["lb"], lb_k)
    E.write_if(finite, s["step_size"], tau_first)
    E.count_step(s, finite)


def _reference_momo(params, grads, grad_avgs, scalars, *, lrs, loss, weight_decay, beta, lb,
                    bias_correction, use_fstar, grad_scale, found_inf):
    s = dict(zip(COMMON_SCALARS + SCALARS, scalars.unbind()))
    grads = E.unscale(grads, grad_scale)                               # GradScaler: g / S
    dt = scalars.dtype
    lrs = E.per_tensor(lrs, len(params))
    k = s["step"] + 1                                                  # the step being taken
    # Without bias correction the averages start at the first step's values: d_0 = g_1, ...
    seed = (s["step"] == 0) & (not bias_correction)
    d_new = [beta * torch.where(seed, E.up(g), E.up(d)) + (1 - beta) * E.up(g)
             for d, g in zip(grad_avgs, grads)]                       # d_k = beta d + (1-beta) g_k
    loss, gx, dx, d_sq = E.across_ranks(loss, E.inner(grads, params, dt),   # f_k, <g_k, x_k>,
                                        E.inner(d_new, params, dt),         # <d_k, x_k>,
                                        E.sum_of_squares(d_new, dt))        # ||d_k||^2
    finite = E.is_finite(loss, gx, dx, d_sq, found_inf=found_inf)
    f_avg = beta * torch.where(seed, loss, s["loss_avg"]) + (1 - beta) * loss     # f̄_k
    gamma = beta * torch.where(seed, gx, s["grad_dot_w"]) + (1 - beta) * gx       # gamma_k
    rho = E.one_minus_power(beta, k) if bias_correction else torch.ones_like(k)  # rho_k
    lb_k, steps, tau_first = model_step(s, lrs, scalars, f_avg, dx, gamma, d_sq, rho, lb=lb,
                                        use_fstar=use_fstar, weight_decay=weight_decay)
    for x, d, dn, (alpha, tau) in zip(params, grad_avgs, d_new, steps):
        md = E.math_dtype(x)
        w = as_math(1 + alpha * weight_decay, md)                       # 1 + alpha lambda
        E.write_if(finite, x, (E.up(x) - tau.to(md) * dn) / w)          # x <- (x - tau d) / w
        E.write_if(finite, d, dn)
    commit_scalars(s, finite, f_avg, gamma, lb_k, tau_first)


def _foreach_momo(params, grads, grad_avgs, scalars, *, lrs, loss, weight_decay, beta, lb,
                  bias_correction, use_fstar, grad_scale, found_inf):
    s = F.scalar_slots(scalars, COMMON_SCALARS + SCALARS)
    dt, like = scalars.dtype, params[0]
    lrs = E.per_tensor(lrs, len(params))
    k = s["step"] + 1
    seed = (s["step"] == 0) & (not bias_correction)
    seed_here = bool(seed) if F.on_host(like) else seed    # (on the host: read once)

    def average_of(ds, g):                                # d_k = beta d + (1-beta) g_k (one block)
        d = torch._foreach_mul(F.select(seed_here, g, F.up_all(ds)), beta)
        torch._foreach_add_(d, g, alpha=1 - beta)
        return d

    loops = F.cpu_loops(list(params), list(grad_avgs), list(grads))
    inv_scale = F.inverse_scale(grad_scale, like)
    if loops is not None:     # <g_k, x_k>, <d_k, x_k>, ||d_k||^2 in one pass over x, d and g
        sums = loops.momentum_sums(list(params), list(grad_avgs), list(grads), beta, 1 - beta,
                                   inv_scale, bool(seed_here))
        gx, dx, d_sq = sums
    else:
        gx, dx, dd = [], [], []        # <g_k, x_k>, <d_k, x_k>, ||d_k||^2, d_k not yet written
        for xs, gs, ds in F.blocks(list(params), grads, list(grad_avgs)):
            g = F.unscaled(gs, grad_scale)
            d = average_of(ds, g)
            gx += F.dots(g, xs)
            dx += F.dots(d, xs)
            dd += F.dots(d, d)
        gx, dx, d_sq = (F.block_sums(p, dt, like.device) for p in (gx, dx, dd))
    loss, gx, dx, d_sq = F.across_ranks(scalars, loss, gx, dx, d_sq)
    finite = F.is_finite(loss, gx, dx, d_sq, found_inf=found_inf)
    f_avg = beta * torch.where(seed, loss, s["loss_avg"]) + (1 - beta) * loss
    gamma = beta * torch.where(seed, gx, s["grad_dot_w"]) + (1 - beta) * gx
    rho = E.one_minus_power(beta, k) if bias_correction else torch.ones_like(k)
    lb_k, steps, tau_first = model_step(s, lrs, scalars, f_avg, dx, gamma, d_sq, rho, lb=lb,
                                        use_fstar=use_fstar, weight_decay=weight_decay)
    if F.taken(finite, like):
        made = {}                          # (-tau, 1 + alpha lambda), one pair per param group
        coefs = [made.setdefault(id(st), (F.number(-st[1], like),
                                          F.number(1 + st[0] * weight_decay, like)))
                 for st in steps]
        if loops is not None:          # d <- d_k, x <- (x - tau d_k) / w in one pass
            loops.momentum_update(list(params), list(grad_avgs), list(grads), beta, 1 - beta,
                                  inv_scale, bool(seed_here), [c[0] for c in coefs],
                                  [c[1] for c in coefs])
        else:
            for (minus_tau, w), (xs, gs, ds) in F.blocks_with_coefs(coefs, list(params), grads,
                                                                    list(grad_avgs)):
                g = F.unscaled(gs, grad_scale)
                with F.updating(ds, finite) as d, F.updating(xs, finite) as x:
                    if seed_here is not False:                          # (a host False: no seed)
                        torch._foreach_copy_(d, F.select(seed_here, g, d))
                    torch._foreach_mul_(d, beta)                        # d_k, as in the first pass
                    torch._foreach_add_(d, g, alpha=1 - beta)
                    F.add_(x, d, minus_tau)                             # x <- (x - tau d) / w
                    if weight_decay:
                        torch._foreach_div_(x, w)
    commit_scalars(s, finite, f_avg, gamma, lb_k, tau_first)
