"""Small eager helpers the reference implementations share. Each reads like the math it names.

Precision: per-element math runs in float32 for float32/bfloat16/float16 tensors and in float64
for float64 tensors (`math_dtype`); scalars (loss, norms, step sizes) in the optimizer's scalar
dtype (float64 if any parameter is float64, else float32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .distributed import current_reduction


def math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def up(t: torch.Tensor) -> torch.Tensor:
    """The tensor in its math dtype (a copy only when the dtype changes)."""
    return t.to(math_dtype(t))


def sum_of_squares(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """sum_i ||t_i||^2 over all tensors: the square of one global L2 norm."""
    parts = [up(t).square().sum().to(dtype) for t in tensors]
    return torch.stack(parts).sum()


def inner(a: list[torch.Tensor], b: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """sum_i <a_i, b_i> over all tensors: one global inner product."""
    parts = [(up(x) * up(y)).sum().to(dtype) for x, y in zip(a, b)]
    return torch.stack(parts).sum()


def one_minus_power(beta: float, k: torch.Tensor) -> torch.Tensor:
    """1 - beta^k for a 0-d step count k (a bias correction), as -expm1(k log beta). In float32,
    1 - 0.999^k written out is off by 1.3e-5 relative (beta itself rounds to float32); this form
    by at most 7e-8 (measured for beta = 0.9, 0.999 and k = 1, 10, 1000)."""
    if beta == 0.0:
        return torch.ones_like(k)                         # 1 - 0^k = 1 for k >= 1
    return -torch.expm1(k * math.log(beta))


def is_finite(*scalars: torch.Tensor | None, found_inf=None) -> torch.Tensor:
    """True (a 0-d bool tensor, no host sync) when every scalar is finite (None: not checked,
    for the optional loss) and GradScaler found no inf or NaN in the scaled gradients
    (``found_inf``; None without GradScaler): whether the step is taken."""
    ok = torch.stack([s for s in scalars if s is not None]).isfinite().all()
    return ok if found_inf is None else ok & (found_inf.reshape(()) == 0)


def write_if(finite, target: torch.Tensor, value: torch.Tensor) -> None:
    """target <- value when `finite`, else leave target bitwise unchanged (a skipped step).
    `finite` is a 0-d bool tensor, or a host value the CPU's foreach path has read already (a
    bool or a HostScalar, whose target is then a HostScalar slot too)."""
    if not isinstance(finite, torch.Tensor):
        if finite:
            target.copy_(value)
        return
    target.copy_(torch.where(finite, value.to(target.dtype), target))


def per_tensor(lrs, n: int) -> list:
    """The lr multiplier of each of n tensors: `lrs` is a sequence of them (a list, or the
    optimizers' lrs by param group), or one for all (a float or a one-element tensor)."""
    return list(lrs) if isinstance(lrs, Sequence) else [lrs] * n


def descend(params, directions, lrs, eta: torch.Tensor, finite: torch.Tensor) -> None:
    """x <- x - lr_group * eta * d for every tensor, unless the step is skipped."""
    for x, d, lr in zip(params, directions, per_tensor(lrs, len(params))):
        write_if(finite, x, up(x) - (lr * eta).to(math_dtype(x)) * up(d))


def count_step(scalars: dict, finite) -> None:
    """step += 1 for a taken step, skipped += 1 for a skipped one (`finite` as in write_if)."""
    if not isinstance(finite, torch.Tensor):
        scalars["step" if finite else "skipped"].add_(1)
        return
    scalars["step"].add_(finite.to(scalars["step"].dtype))
    scalars["skipped"].add_((~finite).to(scalars["skipped"].dtype))


def across_ranks(loss, *sums):
    """Under torch.distributed (see polyak_fused.distributed): the loss averaged over the ranks
    and each local sum added over the shards, in one all-reduce. In one process: unchanged."""
    reduction = current_reduction()
    if reduction is None:
        return (loss, *sums)
    return reduction(loss, *sums)


def unscale(grads, grad_scale):
    """The gradients divided by GradScaler's scale S, in their math dtype (unchanged without one).
    GradScaler backpropagates S * loss, so .grad holds S * g."""
    if grad_scale is None:
        return grads
    return [up(g) / grad_scale.reshape(()).to(math_dtype(g)) for g in grads]

