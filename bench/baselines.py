"""The foreach baselines of the step benchmark: each optimizer of polyak_fused written with
torch._foreach_* ops the way a careful PyTorch user would write it, in two styles:

  item=True   ``foreach_item``: the loss and the global sums go to the host in one ``.tolist()``
              (one host sync per step), the step size is computed in Python floats and applied
              with ``_foreach_add_(params, dirs, alpha=-step)``.
  item=False  ``foreach``: every scalar stays a device tensor (no host sync); the step is applied
              as ``_foreach_mul`` then ``_foreach_sub_``, the pattern torch.optim uses for a
              tensor lr (a tensor cannot be an ``alpha``). This is also the function that
              ``torch.compile`` compiles for the ``compiled`` provider.

Both compute the same update as the package's eager reference (tests/test_bench.py checks them
against it in float64). Where they differ from it, on purpose:
  * the global norm is the norm of the per-tensor norms (``_foreach_norm`` then ``stack``, as
    ``torch.nn.utils.clip_grad_norm_`` does), equal to the reference's sum of squares up to
    rounding;
  * element math runs in the tensors' own dtype (as torch.optim's foreach path does), so bf16
    updates round differently from the reference's fp32 math; the reductions accumulate in fp32;
  * a non-finite loss or gradient: the item version skips the parameter update (a host branch,
    free once the values are on the host; NSGD-M's momentum is updated in place
    before the check); the device version zeroes the step size, which does not protect the
    parameters from 0 * inf. The reference and the fused path leave everything bitwise unchanged.
    The benchmark never feeds non-finite values, so the timed work is the same.
  * one param group, one float ``lr``, one dtype and one device per tensor list (the benchmark's
    layouts are single-dtype); torch.optim would group tensors by device and dtype first.

Usage: ``opt = make_baseline("inexact_polyak", params, grads, item=False, lr=1.0,
total_steps=1000)``, then ``opt.step(loss)`` with a 0-d device tensor (ignored by the methods
that take no loss). ``params`` are plain tensors (``p.detach()`` of the model's parameters, same
storage), ``grads`` the gradient tensors read at every step.
"""

from __future__ import annotations

import math

import torch

#: The same constants as the package's reference (polyak_fused), re-stated so that the baselines
#: stand alone; tests/test_bench.py checks them against the package.
TINY_GRAD_SQ = 1e-16
DOG_EPS = 1e-8
CLIP_EPS = 1e-6

METHODS = ("inexact_polyak", "polyak", "decsps", "adasps", "dog", "clipped_sgd", "nsgdm")


# ------------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------------
def scalar_dtype(tensors) -> torch.dtype:
    """float64 when the tensors are float64, else float32 (the package's rule)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def sum_of_squares(tensors, dtype: torch.dtype) -> torch.Tensor:
    """||t||^2 over the whole list: per-tensor norms accumulated in `dtype`, then their squares
    summed (clip_grad_norm_'s recipe)."""
    norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    return torch.stack(norms).square().sum()


def descend_device(params, dirs, scale: torch.Tensor) -> None:
    """x <- x - scale * d with `scale` a 0-d device tensor: no sync, one temporary list."""
    torch._foreach_sub_(params, torch._foreach_mul(dirs, scale.to(params[0].dtype)))


def descend_host(params, dirs, scale: float) -> None:
    """x <- x - scale * d with `scale` a Python float: one fused multiply-add per element."""
    torch._foreach_add_(params, dirs, alpha=-scale)


def to_host(*scalars: torch.Tensor) -> list[float]:
    """All 0-d tensors in one device-to-host copy: one host sync."""
    return torch.stack([s.to(torch.float64) for s in scalars]).tolist()


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


# ------------------------------------------------------------------------------------------------
# The seven methods, device-scalar version (item=False). `s` maps names to 0-d tensors, updated in
# place; `loss` is a 0-d tensor already in the scalar dtype (or None for the loss-free methods).
# ------------------------------------------------------------------------------------------------
def _count(s, finite):
    s["step"].add_(finite.to(s["step"].dtype))
    s["skipped"].add_((~finite).to(s["skipped"].dtype))


def _all_finite(value, loss):
    """isfinite(value), and isfinite(loss) when a loss is given (a 0-d bool tensor)."""
    ok = torch.isfinite(value)
    return ok if loss is None else ok & torch.isfinite(loss)


def _keep(finite, target, value):
    target.copy_(torch.where(finite, value, target))


def inexact_polyak_device(params, grads, bufs, s, loss, *, lr, total_steps, lower_bound):
    grad_sq = sum_of_squares(grads, s["step"].dtype)                      # ||g||^2
    finite = torch.isfinite(loss) & torch.isfinite(grad_sq)
    gap = (loss - lower_bound).clamp(min=0)                               # (f - l*)_+
    eta = torch.where(grad_sq > TINY_GRAD_SQ, gap / (math.sqrt(total_steps) * grad_sq), 0.0)
    descend_device(params, grads, torch.where(finite, lr * eta, 0.0))
    _keep(finite, s["step_size"], eta)
    _count(s, finite)


def polyak_device(params, grads, bufs, s, loss, *, lr, f_star, c, max_lr):
    grad_sq = sum_of_squares(grads, s["step"].dtype)
    finite = torch.isfinite(loss) & torch.isfinite(grad_sq)
    gap = (loss - f_star).clamp(min=0)
    eta = torch.where(grad_sq > TINY_GRAD_SQ, (gap / (c * grad_sq)).clamp(max=max_lr), 0.0)
    descend_device(params, grads, torch.where(finite, lr * eta, 0.0))
    _keep(finite, s["step_size"], eta)
    _count(s, finite)


def decsps_device(params, grads, bufs, s, loss, *, lr, c0, gamma_b, lower_bound):
    grad_sq = sum_of_squares(grads, s["step"].dtype)
    finite = torch.isfinite(loss) & torch.isfinite(grad_sq)
    c_k = c0 * torch.sqrt(s["step"] + 1)                                  # c0 sqrt(k+1)
    gap = (loss - lower_bound).clamp(min=0)
    ratio = torch.where(grad_sq > TINY_GRAD_SQ, gap / grad_sq, math.inf)
    bound = torch.minimum(ratio, s["bound"])                              # c_k gamma_k
    eta = torch.where(grad_sq > TINY_GRAD_SQ, bound / c_k, 0.0)
    descend_device(params, grads, torch.where(finite, lr * eta, 0.0))
    _keep(finite, s["bound"], bound)
    _keep(finite, s["step_size"], eta)
    _count(s, finite)


def adasps_device(params, grads, bufs, s, loss, *, lr, c_p, lower_bound):
    grad_sq = sum_of_squares(grads, s["step"].dtype)
    finite = torch.isfinite(loss) & torch.isfinite(grad_sq)
    gap = (loss - lower_bound).clamp(min=0)
    gap_sum = s["gap_sum"] + gap
    ratio = torch.where(gap > 0, gap / (c_p * grad_sq * torch.sqrt(gap_sum)), 0.0)
    ratio = torch.where(grad_sq > TINY_GRAD_SQ, ratio, math.inf)
    eta = torch.minimum(ratio, s["step_size"])                            # min(ratio, eta_{t-1})
    step = torch.where(grad_sq > TINY_GRAD_SQ, eta, 0.0)
    descend_device(params, grads, torch.where(finite, lr * step, 0.0))
    _keep(finite, s["gap_sum"], gap_sum)
    _keep(finite, s["step_size"], eta)
    _count(s, finite)


def dog_device(params, grads, bufs, s, loss, *, lr, reps_rel, weight_decay):
    dt = s["step"].dtype
    x0s = bufs["x0"]
    d = grads if weight_decay == 0 else torch._foreach_add(grads, params, alpha=weight_decay)
    grad_sq = sum_of_squares(d, dt)                                       # ||g + wd x||^2
    dist_sq = sum_of_squares(torch._foreach_sub(params, x0s), dt)         # ||x - x0||^2
    x0_sq = sum_of_squares(x0s, dt)                                       # ||x0||^2
    finite = _all_finite(grad_sq, loss)
    r_eps = reps_rel * (1 + torch.sqrt(x0_sq))
    rbar = torch.maximum(torch.maximum(s["rbar"], torch.sqrt(dist_sq)), r_eps)
    G = s["G"] + grad_sq + torch.where(s["step"] == 0, DOG_EPS, 0.0)
    eta = rbar / torch.sqrt(G)
    descend_device(params, d, torch.where(finite, lr * eta, 0.0))
    _keep(finite, s["rbar"], rbar)
    _keep(finite, s["G"], G)
    _keep(finite, s["step_size"], eta)
    _count(s, finite)


def clipped_sgd_device(params, grads, bufs, s, loss, *, lr, max_norm, momentum):
    grad_sq = sum_of_squares(grads, s["step"].dtype)
    finite = _all_finite(grad_sq, loss)
    norm = torch.sqrt(grad_sq)
    coef = (max_norm / (norm + CLIP_EPS)).clamp(max=1.0)                  # kappa
    if momentum > 0:                                                      # m <- mu m + kappa g
        ms = bufs["momentum_buffer"]
        torch._foreach_mul_(ms, momentum)
        torch._foreach_add_(ms, torch._foreach_mul(grads, coef.to(ms[0].dtype)))
        descend_device(params, ms, torch.where(finite, torch.ones_like(coef) * lr, 0.0))
    else:
        descend_device(params, grads, torch.where(finite, lr * coef, 0.0))
    _keep(finite, s["grad_norm"], norm)
    _keep(finite, s["clip_coef"], coef)
    _count(s, finite)


def nsgdm_device(params, grads, bufs, s, loss, *, lr, beta, schedule):
    ms = bufs["momentum_buffer"]
    t = s["step"] + 1
    if schedule == "agnostic":     # beta_t = 1 - t^-1/2, s_t = t^-3/4, both device tensors
        beta_t, s_t = 1 - t.rsqrt(), t.pow(-0.75)
        torch._foreach_mul_(ms, beta_t.to(ms[0].dtype))
        torch._foreach_add_(ms, torch._foreach_mul(grads, (1 - beta_t).to(ms[0].dtype)))
    else:                          # a constant beta is a Python float: one lerp
        s_t = torch.ones_like(t)
        torch._foreach_lerp_(ms, grads, 1 - beta)                        # m <- beta m + (1-beta) g
    m_sq = sum_of_squares(ms, s["step"].dtype)                            # ||m_t||^2
    finite = _all_finite(m_sq, loss)
    eta = torch.where(m_sq > TINY_GRAD_SQ, s_t / torch.sqrt(m_sq), 0.0)
    descend_device(params, ms, torch.where(finite, lr * eta, 0.0))
    _keep(finite, s["step_size"], eta)
    _count(s, finite)


# ------------------------------------------------------------------------------------------------
# The same methods with the step size computed on the host (item=True). `s` maps names to floats.
# ------------------------------------------------------------------------------------------------
def _count_host(s, finite):
    if finite:
        s["step"] += 1
    else:
        s["skipped"] += 1


def inexact_polyak_host(params, grads, bufs, s, loss, *, lr, total_steps, lower_bound):
    f, grad_sq = to_host(loss, sum_of_squares(grads, scalar_dtype(params)))
    finite = _finite(f, grad_sq)
    if finite:
        gap = max(f - lower_bound, 0.0)
        eta = gap / (math.sqrt(total_steps) * grad_sq) if grad_sq > TINY_GRAD_SQ else 0.0
        descend_host(params, grads, lr * eta)
        s["step_size"] = eta
    _count_host(s, finite)


def polyak_host(params, grads, bufs, s, loss, *, lr, f_star, c, max_lr):
    f, grad_sq = to_host(loss, sum_of_squares(grads, scalar_dtype(params)))
    finite = _finite(f, grad_sq)
    if finite:
        gap = max(f - f_star, 0.0)
        eta = min(gap / (c * grad_sq), max_lr) if grad_sq > TINY_GRAD_SQ else 0.0
        descend_host(params, grads, lr * eta)
        s["step_size"] = eta
    _count_host(s, finite)


def decsps_host(params, grads, bufs, s, loss, *, lr, c0, gamma_b, lower_bound):
    f, grad_sq = to_host(loss, sum_of_squares(grads, scalar_dtype(params)))
    finite = _finite(f, grad_sq)
    if finite:
        c_k = c0 * math.sqrt(s["step"] + 1)
        gap = max(f - lower_bound, 0.0)
        ratio = gap / grad_sq if grad_sq > TINY_GRAD_SQ else math.inf
        bound = min(ratio, s["bound"])
        eta = bound / c_k if grad_sq > TINY_GRAD_SQ else 0.0
        descend_host(params, grads, lr * eta)
        s["bound"], s["step_size"] = bound, eta
    _count_host(s, finite)


def adasps_host(params, grads, bufs, s, loss, *, lr, c_p, lower_bound):
    f, grad_sq = to_host(loss, sum_of_squares(grads, scalar_dtype(params)))
    finite = _finite(f, grad_sq)
    if finite:
        gap = max(f - lower_bound, 0.0)
        gap_sum = s["gap_sum"] + gap
        if grad_sq <= TINY_GRAD_SQ:
            ratio = math.inf
        else:
            ratio = gap / (c_p * grad_sq * math.sqrt(gap_sum)) if gap > 0 else 0.0
        eta = min(ratio, s["step_size"])
        descend_host(params, grads, lr * (eta if grad_sq > TINY_GRAD_SQ else 0.0))
        s["gap_sum"], s["step_size"] = gap_sum, eta
    _count_host(s, finite)


def dog_host(params, grads, bufs, s, loss, *, lr, reps_rel, weight_decay):
    dt = scalar_dtype(params)
    x0s = bufs["x0"]
    d = grads if weight_decay == 0 else torch._foreach_add(grads, params, alpha=weight_decay)
    sums = [sum_of_squares(d, dt), sum_of_squares(torch._foreach_sub(params, x0s), dt),
            sum_of_squares(x0s, dt)]
    if loss is not None:
        sums.append(loss)
    grad_sq, dist_sq, x0_sq, *f = to_host(*sums)
    finite = _finite(grad_sq, *f)
    if finite:
        r_eps = reps_rel * (1 + math.sqrt(x0_sq))
        rbar = max(s["rbar"], math.sqrt(dist_sq), r_eps)
        G = s["G"] + grad_sq + (DOG_EPS if s["step"] == 0 else 0.0)
        eta = rbar / math.sqrt(G)
        descend_host(params, d, lr * eta)
        s["rbar"], s["G"], s["step_size"] = rbar, G, eta
    _count_host(s, finite)


def clipped_sgd_host(params, grads, bufs, s, loss, *, lr, max_norm, momentum):
    sums = [sum_of_squares(grads, scalar_dtype(params))] + ([loss] if loss is not None else [])
    grad_sq, *f = to_host(*sums)
    finite = _finite(grad_sq, *f)
    if finite:
        norm = math.sqrt(grad_sq)
        coef = min(max_norm / (norm + CLIP_EPS), 1.0)
        if momentum > 0:
            ms = bufs["momentum_buffer"]
            torch._foreach_mul_(ms, momentum)
            torch._foreach_add_(ms, grads, alpha=coef)                   # m <- mu m + kappa g
            descend_host(params, ms, lr)
        else:
            descend_host(params, grads, lr * coef)
        s["grad_norm"], s["clip_coef"] = norm, coef
    _count_host(s, finite)


def nsgdm_host(params, grads, bufs, s, loss, *, lr, beta, schedule):
    ms = bufs["momentum_buffer"]
    t = s["step"] + 1                       # the step count lives on the host: no sync for it
    if schedule == "agnostic":
        beta_t, s_t = 1 - t ** -0.5, t ** -0.75
    else:
        beta_t, s_t = beta, 1.0
    torch._foreach_lerp_(ms, grads, 1 - beta_t)                          # m <- beta m + (1-beta) g
    sums = [sum_of_squares(ms, scalar_dtype(params))] + ([loss] if loss is not None else [])
    m_sq, *f = to_host(*sums)
    finite = _finite(m_sq, *f)
    if finite:
        eta = s_t / math.sqrt(m_sq) if m_sq > TINY_GRAD_SQ else 0.0
        descend_host(params, ms, lr * eta)
        s["step_size"] = eta
    _count_host(s, finite)


# ------------------------------------------------------------------------------------------------
# State and the object the benchmark drives
# ------------------------------------------------------------------------------------------------
#: Per method: the scalar state beyond step/skipped with its initial value (a function of the
#: hyperparameters), and the per-parameter buffer (name, initialiser) if any.
_SCALARS = {
    "inexact_polyak": lambda hp: {"step_size": 0.0},
    "polyak": lambda hp: {"step_size": 0.0},
    "decsps": lambda hp: {"step_size": 0.0, "bound": hp["c0"] * hp["gamma_b"]},
    "adasps": lambda hp: {"step_size": math.inf, "gap_sum": 0.0},
    "dog": lambda hp: {"step_size": 0.0, "rbar": 0.0, "G": 0.0},
    "clipped_sgd": lambda hp: {"grad_norm": 0.0, "clip_coef": 1.0},
    "nsgdm": lambda hp: {"step_size": 0.0},
}


#: The package's default hyperparameters (tests/test_bench.py checks them against its signatures).
DEFAULT_HPARAMS = {
    "inexact_polyak": dict(lower_bound=0.0),
    "polyak": dict(f_star=0.0, c=1.0, max_lr=math.inf),
    "decsps": dict(c0=1.0, gamma_b=10.0, lower_bound=0.0),
    "adasps": dict(c_p=1.0, lower_bound=0.0),
    "dog": dict(reps_rel=1e-6, weight_decay=0.0),
    "clipped_sgd": dict(max_norm=math.inf, momentum=0.0),
    "nsgdm": dict(beta=0.9, schedule="constant"),
}


def _buffer(method, hp):
    if method == "dog":
        return "x0", lambda p: p.detach().clone()
    if method == "nsgdm" or (method == "clipped_sgd" and hp.get("momentum", 0.0) > 0):
        return "momentum_buffer", torch.zeros_like
    return None


DEVICE_STEPS = {m: globals()[f"{m}_device"] for m in METHODS}
HOST_STEPS = {m: globals()[f"{m}_host"] for m in METHODS}

#: Which methods take the loss (the Polyak family); the others ignore it.
NEEDS_LOSS = {"inexact_polyak", "polyak", "decsps", "adasps"}


class ForeachBaseline:
    """One method's foreach step over fixed parameter and gradient lists.

    `step(loss)` takes one step. `scalars` holds the global state (0-d device tensors for
    item=False, Python floats for item=True); `buffers` the per-parameter state lists.
    `compile=True` wraps the device step function in torch.compile (item=False only)."""

    def __init__(self, method: str, params, grads, *, item: bool, compile: bool = False,
                 lr: float = 1.0, **hparams):
        if method not in METHODS:
            raise ValueError(f"unknown method: {method!r}")
        if compile and item:
            raise ValueError("compile=True takes the device version (item=False)")
        if not isinstance(lr, float):
            lr = float(lr)
        self.method, self.item = method, item
        self.params, self.grads = list(params), list(grads)
        if hparams.pop("track_best", False):
            raise ValueError("the foreach baselines do not keep the best iterate")
        hp = {**DEFAULT_HPARAMS[method], **hparams}
        self.hparams = dict(hp, lr=lr)
        dt = scalar_dtype(self.params)
        device = self.params[0].device
        init = {"step": 0.0, "skipped": 0.0, **_SCALARS[method](hp)}
        if item:
            self.scalars = dict(init)
        else:
            # separate 0-d tensors, not views of one buffer: torch.compile then sees no aliased
            # inputs to mutate
            self.scalars = {k: torch.tensor(v, dtype=dt).to(device) for k, v in init.items()}
        self.buffers = {}
        buf = _buffer(method, hp)
        if buf is not None:
            name, make = buf
            self.buffers[name] = [make(p) for p in self.params]
        self._dtype = dt
        self._kwargs = dict(hp, lr=lr)
        fn = (HOST_STEPS if item else DEVICE_STEPS)[method]
        self._fn = torch.compile(fn) if compile else fn

    @torch.no_grad()
    def step(self, loss=None) -> None:
        if self.method in NEEDS_LOSS:
            if loss is None:
                raise ValueError(f"{self.method} needs the loss")
            loss = loss.to(self._dtype)
        else:
            loss = None
        self._fn(self.params, self.grads, self.buffers, self.scalars, loss, **self._kwargs)


def make_baseline(method: str, params, grads, *, item: bool, compile: bool = False, **hparams):
    """A ForeachBaseline; see the module docstring."""
    return ForeachBaseline(method, params, grads, item=item, compile=compile, **hparams)
