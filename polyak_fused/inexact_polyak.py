"""Inexact Polyak Stepsize (Takezawa et al., NeurIPS 2024): the optimizer class, its functional
form and its eager reference."""

from __future__ import annotations

import math

import torch

from . import _eager as E
from . import _foreach as F
from ._dispatch import run_fused
from ._optimizer import (COMMON_SCALARS, TINY_GRAD_SQ, PolyakFamilyOptimizer, as_loss_tensor,
                         check_number, check_paths)

__all__ = ["InexactPolyak", "inexact_polyak"]

SCALARS = ("step_size", "best_loss")


def _check_total_steps(total_steps) -> None:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"Invalid total_steps: {total_steps!r} (must be an int >= 1)")


class InexactPolyak(PolyakFamilyOptimizer):
    r"""Clipped gradient descent with no step size and no clipping threshold to tune.

    .. math::
        \eta_t = \mathrm{lr}\cdot\frac{\max(f(x_t) - l^*,\,0)}{\sqrt{T}\,\|\nabla f(x_t)\|^2},
        \qquad x_{t+1} = x_t - \eta_t \nabla f(x_t)

    (eq. 14 / Algorithm 1 of Takezawa, Bao, Sato, Niwa, Yamada, "Polyak Meets Parameter-free
    Clipped Gradient Descent", NeurIPS 2024). The update length (f - l*)/(sqrt(T) ||g||) grows as
    the gradient shrinks, which is the clipping behaviour, and the 1/sqrt(T) factor keeps the
    error of an inexact lower bound l* <= f* from blowing up near the optimum.

    Symbols: f(x_t) = the ``loss`` given to ``step``; l* = ``lower_bound``; T = ``total_steps``;
    ||g|| = one L2 norm over every parameter of every group; lr = the group's ``lr``.

    Args:
        params: parameters or param groups. Groups may set their own ``lr``; every group shares
            the norm, the loss, ``total_steps`` and ``lower_bound``.
        total_steps (int or None): T, the number of ``step()`` calls the run will make: the
            horizon, not the current step, and changing it changes every step size. Under
            gradient accumulation that is the number of optimizer steps, not of batches.
            Required; ``total_steps=None`` leaves it to be set before the first step, by
            :meth:`set_total_steps` or by a training-framework integration
            (``polyak_fused.integrations``), which takes it from the trainer's plan; a step
            taken while it is None raises a ``ValueError``.
        lower_bound (float): l*, a lower bound on every loss you pass (default 0.0, right for
            cross-entropy and squared losses).
        lr (float or tensor): a multiplier on the computed step (default 1.0, the paper's
            method), so LR schedulers work. A one-element tensor is read on the device.
        track_best (bool): keep the best iterate of Algorithm 1 (one extra copy of the
            parameters): ``best_loss`` is the lowest loss seen and ``load_best()`` copies that
            iterate into the parameters. The paper uses it for convex problems, not for
            networks. The snapshot covers every parameter, also one whose ``.grad`` is None
            at that step (not stepped, but part of the iterate).
        fused (bool or None): True insists on the Triton kernels (CUDA tensors, or
            ``TRITON_INTERPRET=1``). With ``fused`` and ``foreach`` both None (the default),
            the kernels run where they take the tensors (CUDA, not float64) and the foreach
            path elsewhere.
        foreach (bool or None): True takes the multi-tensor path (``torch._foreach_*`` ops:
            the default on CPU, MPS, XPU and CUDA without Triton); False takes the eager
            reference, the readable specification, one equation a line. As in torch.optim,
            ``fused=False`` alone takes the foreach path; both True is an error.
            docs/paths.md compares the three paths.
        process_group: the torch.distributed group to reduce the loss and the norm over
            (default: the whole world under DDP, the mesh under FSDP2); see the README.
        average_loss (bool): average the loss over the ranks (default True); False when
            the loss you pass is already equal on every rank.

    Guards (the same in the fused path):
        * ||g||^2 <= 1e-16: the step is zero (no inf, no NaN).
        * f(x_t) < l*: the step is zero (the gap is clamped at 0).
        * a non-finite loss or gradient: the step is skipped; parameters and state stay
          bitwise unchanged and ``scalars["skipped"]`` counts it. No exception, no host sync.

    .. warning::
        l* must lower-bound the loss you pass, including any auxiliary or regularisation term,
        and the gradient must be the gradient of that same loss. With a loss that can go below
        l* the method does not descend; with a loose l* far below the reachable loss the steps
        stay long and the iterates bounce (their size is of order (f - l*)/sqrt(T)).

    Example (the loss is watched before the backward, then a bare ``step()``):
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = InexactPolyak(model.parameters(), total_steps=100)
        >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
        >>> for _ in range(100):
        ...     opt.zero_grad()
        ...     loss = opt.watch_loss(torch.nn.functional.mse_loss(model(x), y))
        ...     loss.backward()
        ...     _ = opt.step()
        >>> int(opt.scalars["step"])
        100

    Alternatively, pass the loss after the backward: ``opt.step(loss=loss)``.
    """

    METHOD = "inexact_polyak"
    SCALARS = SCALARS
    GLOBAL_HPARAMS = ("total_steps", "lower_bound", "track_best")

    def __init__(self, params, total_steps: int | None, lower_bound: float = 0.0, lr=1.0,
                 track_best: bool = False, *, fused: bool | None = None,
                 foreach: bool | None = None,
                 process_group=None, average_loss: bool = True):
        if total_steps is not None:
            _check_total_steps(total_steps)
        check_number("lower_bound", lower_bound)
        if not isinstance(track_best, bool):
            raise ValueError(f"Invalid track_best: {track_best!r} (expected a bool)")
        defaults = dict(lr=lr, total_steps=total_steps, lower_bound=float(lower_bound),
                        track_best=track_best)
        super().__init__(params, defaults, fused=fused, foreach=foreach,
                         process_group=process_group,
                         average_loss=average_loss)

    def set_total_steps(self, total_steps: int) -> None:
        """Set T in every param group (and for groups added later). For an optimizer built
        before the run's length is known; the integrations call it with the trainer's plan.
        T is saved in, and restored from, ``state_dict()`` like every hyperparameter."""
        _check_total_steps(total_steps)
        self.defaults["total_steps"] = total_steps
        for group in self.param_groups:
            group["total_steps"] = total_steps

    def step(self, closure=None, **kwargs):
        # Checked before anything runs (the closure included), so a refused step changes nothing.
        if self.param_groups[0]["total_steps"] is None:
            raise ValueError(
                "Invalid total_steps: None (InexactPolyak needs the horizon T before its first "
                "step). Pass total_steps=T, the number of optimizer steps of the run (not of "
                "batches under gradient accumulation), to the constructor, call "
                "opt.set_total_steps(T), or attach the training-framework integration "
                "(polyak_fused.integrations.hf.attach(trainer) or "
                "polyak_fused.integrations.lightning.PolyakCallback()), which fills it in")
        result = super().step(closure, **kwargs)
        total = self.param_groups[0]["total_steps"]
        if self._live.calls > total:  # counted on the host: no sync
            self._warn_once(
                "horizon",
                f"InexactPolyak: step() called {self._live.calls} times with total_steps={total}. "
                f"T is the horizon of the step size (f - l*)/(sqrt(T) ||g||^2): past it, the "
                f"steps are sized for a shorter run than this one. Set total_steps to the "
                f"number of step() calls of the whole run (optimizer steps, not batches, under "
                f"gradient accumulation), or opt.set_total_steps(T) before the first step.")
        return result

    @property
    def BUFFERS(self):  # noqa: N802 - the per-parameter state names, as in the base class
        return ("best",) if self._hparams()["track_best"] else ()

    @property
    def WHOLE_ITERATE(self):  # noqa: N802 - the best iterate is a snapshot of every parameter
        return self._hparams()["track_best"]

    def _initial_scalars(self):
        return {"step_size": 0.0, "best_loss": math.inf}

    def _init_buffer(self, name, p):
        return p.detach().clone(memory_format=torch.preserve_format)  # x_best <- x_0

    def _run(self, params, grads, buffers, lrs, loss, path, amp):
        inexact_polyak(params, grads, buffers.get("best"), self._packed_scalars, lrs=lrs,
                       loss=loss, **path, cache=self._fused_cache, **self._hparams(), **amp)

    @property
    def best_loss(self) -> torch.Tensor:
        """The lowest loss seen so far (a 0-d device tensor; +inf before the first step)."""
        return self.scalars["best_loss"]

    @torch.no_grad()
    def load_best(self, loss=None) -> None:
        """Copy the best iterate into the parameters (needs ``track_best=True``).

        Pass ``loss`` = f(x_T) of the current parameters to let the last iterate, whose loss no
        step() has seen, compete too (Algorithm 1 compares f(x_{t+1}) after every update)."""
        if not self._hparams()["track_best"]:
            raise RuntimeError("load_best() needs InexactPolyak(..., track_best=True)")
        params = [p for g in self.param_groups for p in g["params"] if "best" in self.state[p]]
        if not params:
            return
        s = self.scalars
        if loss is not None:
            f = as_loss_tensor(loss, s["best_loss"].device, s["best_loss"].dtype)
            improved = torch.isfinite(f) & (f <= s["best_loss"])
            for p in params:
                E.write_if(improved, self.state[p]["best"], p)
            E.write_if(improved, s["best_loss"], f)
        for p in params:
            p.copy_(self.state[p]["best"])


def inexact_polyak(params: list[torch.Tensor], grads: list[torch.Tensor],
                   best_params: list[torch.Tensor] | None, scalars: torch.Tensor, *,
                   loss: torch.Tensor, total_steps: int, lower_bound: float = 0.0, lrs=1.0,
                   track_best: bool = False, grad_scale=None, found_inf=None, fused: bool = False,
                   foreach: bool | None = None,
                   cache: dict | None = None) -> None:
    """Functional form of :class:`InexactPolyak`: one step over flat lists, in place.

    ``scalars`` is the packed global state (step, skipped, step_size, best_loss);
    ``best_params`` the best iterate (``track_best=True``) or None. With ``track_best``,
    ``grads`` may hold None: that parameter is not stepped but is part of the best iterate.
    Build the state once with ``InexactPolyak.functional_state(params, ...)`` (the same keyword arguments
    as the class), keep it, and pass its entries on every call; ``lrs`` is one multiplier for
    every tensor or a list of one per tensor. The hyperparameters default as in the class.

    Example:
        >>> params = list(torch.nn.Linear(4, 1).parameters())
        >>> state = InexactPolyak.functional_state(params, total_steps=10)
        >>> loss = sum(p.square().sum() for p in params) + 1.0
        >>> loss.backward()
        >>> with torch.no_grad():
        ...     inexact_polyak(params, [p.grad for p in params], None, state["scalars"],
        ...                    loss=loss.detach(), total_steps=10)
        >>> int(state["scalars"][0])   # the step count
        1
    """
    hp = dict(total_steps=total_steps, lower_bound=lower_bound, track_best=track_best)
    check_paths(fused, foreach)
    if fused:
        bufs = {"best": best_params} if track_best else {}
        run_fused("inexact_polyak", params, grads, bufs, lrs, loss, scalars, hp, cache,
                  grad_scale=grad_scale, found_inf=found_inf)
    else:
        step = _reference_inexact_polyak if foreach is False else _foreach_inexact_polyak
        step(params, grads, best_params, scalars, lrs=lrs, loss=loss, **hp,
             grad_scale=grad_scale, found_inf=found_inf)


def _step_size(loss, grad_sq, total_steps, lower_bound):
    gap = (loss - lower_bound).clamp(min=0)                           # (f(x_t) - l*)_+
    return torch.where(grad_sq > TINY_GRAD_SQ,
                       gap / (math.sqrt(total_steps) * grad_sq), 0.0)  # eq. 14


def _reference_inexact_polyak(params, grads, best_params, scalars, *, lrs, loss, total_steps,
                              lower_bound, track_best, grad_scale, found_inf):
    s = dict(zip(COMMON_SCALARS + SCALARS, scalars.unbind()))
    iterate = list(params)                                            # x_t, every parameter
    stepped = [i for i, g in enumerate(grads) if g is not None]       # those with a gradient
    lrs = E.per_tensor(lrs, len(params))
    params, grads, lrs = ([ts[i] for i in stepped] for ts in (params, grads, lrs))
    grads = E.unscale(grads, grad_scale)                               # GradScaler: g / S
    loss, grad_sq = E.across_ranks(loss, E.sum_of_squares(grads, scalars.dtype))  # f, ||g_t||^2
    finite = E.is_finite(loss, grad_sq, found_inf=found_inf)
    eta = _step_size(loss, grad_sq, total_steps, lower_bound)
    if track_best:  # Algorithm 1: if f(x_t) <= f_best: f_best, x_best <- f(x_t), x_t
        improved = finite & (loss <= s["best_loss"])
        for x, b in zip(iterate, best_params):
            E.write_if(improved, b, x)
        E.write_if(improved, s["best_loss"], loss)
    E.descend(params, grads, lrs, eta, finite)                        # x <- x - lr * eta * g
    E.write_if(finite, s["step_size"], eta)
    E.count_step(s, finite)


def _foreach_inexact_polyak(params, grads, best_params, scalars, *, lrs, loss, total_steps,
                            lower_bound, track_best, grad_scale, found_inf):
    s = F.scalar_slots(scalars, COMMON_SCALARS + SCALARS)
    iterate = list(params)
    stepped = [i for i, g in enumerate(grads) if g is not None]
    lrs = E.per_tensor(lrs, len(params))
    params, grads, lrs = ([ts[i] for i in stepped] for ts in (params, grads, lrs))
    loss, grad_sq = F.across_ranks(scalars, loss, F.unscaled_sum_of_squares(grads, grad_scale,
                                                                   scalars.dtype))
    finite = F.is_finite(loss, grad_sq, found_inf=found_inf)
    eta = _step_size(loss, grad_sq, total_steps, lower_bound)
    if track_best:
        improved = finite & (loss <= s["best_loss"])
        F.copy_if(improved, list(best_params), iterate)
        E.write_if(improved, s["best_loss"], loss)
    if params:
        F.descend(params, grads, lrs, eta, finite, F.inverse_scale(grad_scale, params[0]))
    E.write_if(finite, s["step_size"], eta)
    E.count_step(s, finite)
