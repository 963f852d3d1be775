"""MoMo-Adam (Schaipp, Ohana, Eickenberg, Defazio, Gower, ICML 2024): MoMo's Polyak step on the
Adam direction. Class, functional form, eager reference."""

from __future__ import annotations

import torch

from . import _eager as E
from . import _foreach as F
from ._dispatch import run_fused
from ._optimizer import COMMON_SCALARS, PolyakFamilyOptimizer, check_number, check_paths
from .momo import as_math, check_flag, commit_scalars, model_step

__all__ = ["MoMoAdam", "momo_adam"]

SCALARS = ("step_size", "loss_avg", "grad_dot_w", "lb")


def _check_betas(betas) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
    for b in betas:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid betas: {tuple(betas)!r} (each must be a number in [0, 1))")
    return float(betas[0]), float(betas[1])


class MoMoAdam(PolyakFamilyOptimizer):
    r"""MoMo-Adam: MoMo's Polyak step size on the Adam direction, capped by ``lr``.

    .. math::
        d_k = \beta_1 d_{k-1} + (1-\beta_1) g_k,\qquad
        v_k = \beta_2 v_{k-1} + (1-\beta_2) g_k^2,\qquad
        D_k = \sqrt{v_k / (1-\beta_2^k)} + \epsilon,

        \bar f_k = \beta_1 \bar f_{k-1} + (1-\beta_1) f_k,\qquad
        \gamma_k = \beta_1 \gamma_{k-1} + (1-\beta_1)\langle g_k, x_k\rangle,\qquad
        \rho_k = 1 - \beta_1^k,

        t_k = \frac{\max\big((1+\alpha\lambda)(\bar f_k - \rho_k\,\mathrm{lb})
              + \langle d_k, x_k\rangle - (1+\alpha\lambda)\gamma_k,\ 0\big)}
              {\sum d_k^2 / D_k},
        \qquad \tau_k = \min\Big(\frac{\alpha}{\rho_k},\ t_k\Big),

        x_{k+1} = \frac{x_k - \tau_k\, d_k / D_k}{1 + \alpha\lambda}\quad(\text{divide=True}),
        \qquad x_{k+1} = (1 - \alpha\lambda)\,x_k - \tau_k\, d_k / D_k\quad(\text{divide=False})

    for k = 1, 2, ..., every average starting at 0 (Schaipp, Ohana, Eickenberg, Defazio, Gower,
    "MoMo: Momentum Models for Adaptive Learning Rates", ICML 2024; the official code is
    momo-opt, class ``MomoAdam``). This is MoMo in the metric of D_k: ||d||^2 becomes the
    D-weighted sum of d^2 / D and the step follows d / D, Adam's direction; alpha / rho_k caps
    tau_k as Adam's bias-corrected learning rate would. The numerator keeps the proximal factors
    1 + alpha lambda with ``divide=False`` too, as the official code does.

    Symbols: f_k = the step's loss; g_k its gradient (g^2 and d^2 / D elementwise); x_k the
    parameters; alpha = the group's ``lr``, the cap of the step size (not a multiplier on it);
    lambda = ``weight_decay``; (beta_1, beta_2) = ``betas``; epsilon = ``eps``; lb = ``lb``.
    The inner products and the weighted sum are global, over every parameter of every group.
    State: ``state[p]["grad_avg"]`` = d_k, ``state[p]["grad_avg_sq"]`` = v_k;
    ``scalars["loss_avg"]`` = f̄_k, ``scalars["grad_dot_w"]`` = gamma_k, ``scalars["lb"]`` = the
    lower bound in use, ``scalars["step_size"]`` = tau_k of the first param group.

    ``use_fstar=True`` estimates the lower bound online as :class:`MoMo` does, with
    rho_k = 1 - beta_1^k and ||d||^2 replaced by the weighted sum.

    The arguments have momo-opt's names and defaults, so ``momo.MomoAdam(params, ...)`` becomes
    ``pf.MoMoAdam(params, ...)``; give the loss with ``opt.watch_loss(loss)`` before the
    backward, or ``step(loss=loss)`` as in momo-opt.

    Args:
        params: parameters or param groups. A group may set its own ``lr``; every other
            hyperparameter is global and must be equal in every group.
        lr (float or tensor): alpha, the cap of the step size (default 1e-2). LR schedules
            change the cap, as in the paper's experiments.
        betas (tuple of two floats): (beta_1, beta_2), each in [0, 1) (default (0.9, 0.999)).
        eps (float): epsilon >= 0 added to D_k (default 1e-8).
        weight_decay (float): lambda >= 0 (default 0).
        lb (float): a lower bound on the loss (default 0).
        divide (bool): True (default) applies the weight decay proximally (the division by
            1 + alpha lambda); False as AdamW does (the multiplication by 1 - alpha lambda
            before the step).
        use_fstar (bool): estimate the lower bound online, starting from and never below ``lb``
            (default False).
        fused (bool or None): as in :class:`InexactPolyak`.
        foreach (bool or None): as in :class:`InexactPolyak`.
        process_group: the torch.distributed group to reduce the loss and the sums over
            (default: the whole world under DDP, the mesh under FSDP2); see the README.
        average_loss (bool): average the loss over the ranks (default True); False when
            the loss you pass is already equal on every rank.

    Guards: a weighted sum sum d^2 / D <= 1e-16 makes t_k = +inf, so tau_k = alpha / rho_k; a
    negative numerator gives t_k = 0; a non-finite loss, gradient or sum (or GradScaler's inf
    flag) skips the step: parameters and state stay bitwise unchanged and
    ``scalars["skipped"]`` += 1. The loss is required.

    Deliberate differences from momo-opt 0.1.0 (each shown in tests/test_momo.py):
        * no host sync on an accelerator: every scalar is a device tensor, no ``.item()``, no
          branch on a device value (on the CPU the foreach path reads its step size on the
          host, which stalls no device);
        * every hyperparameter but ``lr`` is global (one value for all groups);
        * gamma_k is one global average of sum_p <g_p, x_p>, and the bias correction of D_k uses
          the one global step count k (momo-opt keeps gamma and a step count per parameter and
          uses the per-parameter count for the weighted sum, the global one for the update: all
          the same when every parameter has a gradient at every step);
        * with ``use_fstar``, lb is updated once per step, with the first group's lr (momo-opt
          updates it again in each group's turn);
        * the guards above (momo-opt divides by the weighted sum whatever its size, and steps on
          non-finite values).
    A parameter whose ``.grad`` is None is not stepped, keeps its buffers and is left out of the
    sums, as in momo-opt (whose gamma then also leaves out that parameter's past).

    .. warning::
        lb must lower-bound every loss you pass, regularisation terms included: once the model
        f̄_k + <d_k, x_k> - gamma_k lies below rho_k lb the Polyak part t_k is 0 and the
        iterates stop moving (but for the weight decay), and a loose lb far below the reachable
        loss leaves the step at its cap alpha / rho_k (then alpha acts as Adam's learning
        rate). With ``eps=0`` a coordinate whose gradient has always been 0 gives 0 / 0 in
        d / D: every step is then skipped as non-finite.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = MoMoAdam(model.parameters(), lr=0.1)
        >>> x = torch.randn(64, 4)
        >>> y = x @ torch.randn(4, 1)
        >>> for _ in range(100):
        ...     opt.zero_grad()
        ...     loss = opt.watch_loss(torch.nn.functional.mse_loss(model(x), y))
        ...     loss.backward()
        ...     _ = opt.step()
        >>> bool(loss < 0.01), int(opt.scalars["step"])
        (True, 100)
    """

    METHOD = "momo_adam"
    SCALARS = SCALARS
    BUFFERS = ("grad_avg", "grad_avg_sq")
    GLOBAL_HPARAMS = ("betas", "eps", "weight_decay", "lb", "divide", "use_fstar")
    LR_ROLE = "cap"  # tau = min(lr / rho, t): a schedule on the cap is the method as published

    def __init__(self, params, lr=1e-2, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, lb: float = 0, divide: bool = True,
                 use_fstar: bool = False, *, fused: bool | None = None,
                 foreach: bool | None = None, process_group=None,
                 average_loss: bool = True):
        betas = _check_betas(betas)
        check_number("eps", eps, low=0.0)
        check_number("weight_decay", weight_decay, low=0.0)
        check_number("lb", lb)
        check_flag("divide", divide)
        check_flag("use_fstar", use_fstar)
        defaults = dict(lr=lr, betas=betas, eps=float(eps), weight_decay=float(weight_decay),
                        lb=float(lb), divide=divide, use_fstar=use_fstar)
        super().__init__(params, defaults, fused=fused, foreach=foreach,
                         process_group=process_group,
                         average_loss=average_loss)

    def _initial_scalars(self):
        return {"step_size": 0.0, "loss_avg": 0.0, "grad_dot_w": 0.0, "lb": self.defaults["lb"]}

    def _init_buffer(self, name, p):
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def _run(self, params, grads, buffers, lrs, loss, path, amp):
        momo_adam(params, grads, buffers["grad_avg"], buffers["grad_avg_sq"], self._packed_scalars,
                  lrs=lrs, loss=loss, **path, cache=self._fused_cache, **self._hparams(),
                  **amp)


def momo_adam(params, grads, grad_avgs, grad_avg_sqs, scalars, *, loss, lrs=1e-2,
              betas=(0.9, 0.999), eps=1e-8, weight_decay=0, lb=0, divide=True, use_fstar=False,
              grad_scale=None, found_inf=None, fused=False, foreach=None, cache=None):
    """Functional form of :class:`MoMoAdam` (packed scalars: step, skipped, step_size, loss_avg,
    grad_dot_w, lb; ``grad_avgs``: d, ``state["grad_avg"]``; ``grad_avg_sqs``: v,
    ``state["grad_avg_sq"]``); ``lrs`` is the cap alpha.

    Build the state once with ``MoMoAdam.functional_state(params, ...)`` (the same keyword
    arguments as the class), keep it, and pass its entries on every call; ``lrs`` is one cap for
    every tensor or a list of one per tensor. The hyperparameters default as in the class.

    Example:
        >>> params = list(torch.nn.Linear(4, 1).parameters())
        >>> state = MoMoAdam.functional_state(params)
        >>> loss = sum(p.square().sum() for p in params) + 1.0
        >>> loss.backward()
        >>> with torch.no_grad():
        ...     momo_adam(params, [p.grad for p in params], state["grad_avg"],
        ...               state["grad_avg_sq"], state["scalars"], loss=loss.detach())
        >>> int(state["scalars"][0])   # the step count
        1
    """
    hp = dict(betas=tuple(betas), eps=eps, weight_decay=weight_decay, lb=lb, divide=divide,
              use_fstar=use_fstar)
    check_paths(fused, foreach)
    if fused:
        run_fused("momo_adam", params, grads, {"grad_avg": grad_avgs, "grad_avg_sq": grad_avg_sqs},
                  lrs, loss, scalars, hp, cache, grad_scale=grad_scale, found_inf=found_inf)
    else:
        step = _reference_momo_adam if foreach is False else _foreach_momo_adam
        step(params, grads, grad_avgs, grad_avg_sqs, scalars, lrs=lrs, loss=loss, **hp,
             grad_scale=grad_scale, found_inf=found_inf)


def _reference_momo_adam(params, grads, grad_avgs, grad_avg_sqs, scalars, *, lrs, loss, betas,
                         eps, weight_decay, lb, divide, use_fstar, grad_scale, found_inf):
    s = dict(zip(COMMON_SCALARS + SCALARS, scalars.unbind()))
    grads = E.unscale(grads, grad_scale)                               # GradScaler: g / S
    dt = scalars.dtype
    lrs = E.per_tensor(lrs, len(params))
    beta1, beta2 = betas
    k = s["step"] + 1                                                  # the step being taken
    rho = E.one_minus_power(beta1, k)                                  # rho_k = 1 - beta1^k
    bias2 = E.one_minus_power(beta2, k)                                # 1 - beta2^k
    d_new, v_new, D = [], [], []
    for d, v, g in zip(grad_avgs, grad_avg_sqs, grads):
        g = E.up(g)
        d_new.append(beta1 * E.up(d) + (1 - beta1) * g)               # d_k = beta1 d + (1-beta1) g
        v_new.append(beta2 * E.up(v) + (1 - beta2) * g * g)       # v_k = beta2 v + (1-beta2) g^2
        D.append(torch.sqrt(v_new[-1] / bias2.to(g.dtype)) + eps)  # D_k = sqrt(v_k/bias2) + eps
    loss, gx, dx, d_sq = E.across_ranks(
        loss, E.inner(grads, params, dt),                              # f_k, <g_k, x_k>,
        E.inner(d_new, params, dt),                                    # <d_k, x_k>,
        E.inner(d_new, [dn / Dk for dn, Dk in zip(d_new, D)], dt))     # sum d_k^2 / D_k
    finite = E.is_finite(loss, gx, dx, d_sq, found_inf=found_inf)
    f_avg = (1 - beta1) * loss + beta1 * s["loss_avg"]                 # f̄_k
    gamma = beta1 * s["grad_dot_w"] + (1 - beta1) * gx                 # gamma_k
    lb_k, steps, tau_first = model_step(s, lrs, scalars, f_avg, dx, gamma, d_sq, rho, lb=lb,
                                        use_fstar=use_fstar, weight_decay=weight_decay)
    for x, d, v, dn, vn, Dk, (alpha, tau) in zip(params, grad_avgs, grad_avg_sqs, d_new, v_new, D,
                                                 steps):
        md = E.math_dtype(x)
        x_new = E.up(x)
        if not divide:
            x_new = x_new * as_math(1 - alpha * weight_decay, md)      # AdamW: x (1 - alpha lambda)
        x_new = x_new - tau.to(md) * (dn / Dk)                         # x - tau d / D
        if divide:
            x_new = x_new / as_math(1 + alpha * weight_decay, md)  # proximal: / (1 + alpha lambda)
        E.write_if(finite, x, x_new)
        E.write_if(finite, d, dn)
        E.write_if(finite, v, vn)
    commit_scalars(s, finite, f_avg, gamma, lb_k, tau_first)


def _foreach_momo_adam(params, grads, grad_avgs, grad_avg_sqs, scalars, *, lrs, loss, betas,
                       eps, weight_decay, lb, divide, use_fstar, grad_scale, found_inf):
    s = F.scalar_slots(scalars, COMMON_SCALARS + SCALARS)
    dt, like = scalars.dtype, params[0]
    lrs = E.per_tensor(lrs, len(params))
    beta1, beta2 = betas
    k = s["step"] + 1
    rho = E.one_minus_power(beta1, k)
    bias2 = F.number(E.one_minus_power(beta2, k), like)

    def into_second_moment(v, g):                         # v_k = beta2 v + (1-beta2) g^2
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, value=1 - beta2)

    def denominator_of(v):                                # D_k = sqrt(v_k / bias2) + eps
        D = torch._foreach_div(v, bias2)
        torch._foreach_sqrt_(D)
        torch._foreach_add_(D, eps)
        return D

    tensors = list(params), list(grad_avgs), list(grad_avg_sqs), list(grads)
    loops = F.cpu_loops(*tensors)
    moments = (beta1, beta2, F.inverse_scale(grad_scale, like), bias2, eps)
    if loops is not None:  # <g_k, x_k>, <d_k, x_k>, sum d_k^2 / D_k in one pass over x, d, v, g
        gx, dx, d_sq = loops.adam_sums(*tensors, *moments)
    else:
        gx, dx, dd = [], [], []    # <g_k, x_k>, <d_k, x_k>, sum d_k^2 / D_k; d, v not written
        for xs, gs, ds, vs in F.blocks(list(params), grads, list(grad_avgs),
                                       list(grad_avg_sqs)):
            g = F.unscaled(gs, grad_scale)
            d = torch._foreach_lerp(F.up_all(ds), g, 1 - beta1)     # d_k = beta1 d + (1-beta1) g
            v = torch._foreach_mul(F.up_all(vs), beta2)
            torch._foreach_addcmul_(v, g, g, value=1 - beta2)         # v_k
            D = denominator_of(v)
            gx += F.dots(g, xs)
            dx += F.dots(d, xs)
            dd += F.dots(d, torch._foreach_div(d, D))                # sum d_k^2 / D_k
        gx, dx, d_sq = (F.block_sums(p, dt, like.device) for p in (gx, dx, dd))
    loss, gx, dx, d_sq = F.across_ranks(scalars, loss, gx, dx, d_sq)
    finite = F.is_finite(loss, gx, dx, d_sq, found_inf=found_inf)
    f_avg = (1 - beta1) * loss + beta1 * s["loss_avg"]
    gamma = beta1 * s["grad_dot_w"] + (1 - beta1) * gx
    lb_k, steps, tau_first = model_step(s, lrs, scalars, f_avg, dx, gamma, d_sq, rho, lb=lb,
                                        use_fstar=use_fstar, weight_decay=weight_decay)
    if F.taken(finite, like):
        made = {}          # (-tau, the decay factor), one pair per param group
        coefs = [made.setdefault(id(st), (
            F.number(-st[1], like),
            F.number(1 + st[0] * weight_decay if divide else 1 - st[0] * weight_decay, like)))
            for st in steps]
        if loops is not None:    # d <- d_k, v <- v_k, x <- (pre x - tau d_k / D_k) / div
            ones = [1.0] * len(coefs)
            decays = [w for _, w in coefs] if weight_decay else ones
            loops.adam_update(*tensors, *moments, [minus_tau for minus_tau, _ in coefs],
                              ones if divide else decays, decays if divide else ones)
        else:
            for (minus_tau, w), (xs, gs, ds, vs) in F.blocks_with_coefs(
                    coefs, list(params), grads, list(grad_avgs), list(grad_avg_sqs)):
                g = F.unscaled(gs, grad_scale)
                with F.updating(ds, finite) as d, F.updating(vs, finite) as v, \
                        F.updating(xs, finite) as x:
                    torch._foreach_lerp_(d, g, 1 - beta1)             # d_k, v_k, D_k as in the
                    into_second_moment(v, g)                          # first pass
                    D = denominator_of(v)
                    if weight_decay and not divide:
                        torch._foreach_mul_(x, w)                    # AdamW: x (1 - alpha lambda)
                    F.addcdiv_(x, d, D, minus_tau)                    # x - tau d / D
                    if weight_decay and divide:
                        torch._foreach_div_(x, w)            # proximal: / (1 + alpha lambda)
    commit_scalars(s, finite, f_avg, gamma, lb_k, tau_first)
