"""The multi-tensor (foreach) path's building blocks: sums over many tensors and in-place updates
with torch._foreach_* ops. Each method's ``_foreach_<method>`` (beside its reference) is built
from these and shares the reference's step-size rule. docs/paths.md explains the design.

Two forms, picked by the parameters' device:
  * on the host (CPU), the step's scalars (the step size, whether the step is taken) are read as
    Python numbers: a CPU "sync" stalls no device. The step's rule runs on them as HostScalars
    (`scalar_slots`, `across_ranks`; polyak_fused/_host_scalars.py). A skipped step writes
    nothing; a taken one updates the tensors in place.
  * elsewhere (MPS, XPU, CUDA without Triton) nothing is read on the host: the scalars stay 0-d
    device tensors, and each update is computed on a copy of a block of tensors and committed
    with torch.where(taken, new, old), so a skipped step leaves every tensor bitwise unchanged.
On the host the passes run as compiled loops where they can (`cpu_loops`,
polyak_fused/_cpu_loops: each of a step's passes one loop over all tensors, no temporaries); the
torch ops below are their specification and what runs everywhere else. The torch ops work block
by block (at most BLOCK elements of each list at a time), so that no temporary is larger than a
block: the extra memory does not grow with the model.

Precision is the reference's (polyak_fused._eager): per-element math in float32 for
float32/bfloat16/float16 tensors, in float64 for float64 ones; each low-precision tensor is
rounded once per step, as in the reference.
"""

from __future__ import annotations

import contextlib
import math

import torch

from . import _cpu_loops
from . import _eager as E
from . import _host_scalars as H

#: Device types whose step reads its scalars on the host (no accelerator to stall).
HOST_DEVICES = ("cpu",)

#: Elements per block: the largest temporary of a step (4 MiB in float32), and the length of
#: each float32 dot product (longer ones lose accuracy: see `sum_of_squares`).
BLOCK = 1 << 20

_EXACT = (torch.float32, torch.float64)  # dtypes updated in place (their math dtype)


def on_host(t: torch.Tensor) -> bool:
    """Whether the step on this tensor's device reads its scalars on the host."""
    return t.device.type in HOST_DEVICES


def cpu_loops(*lists):
    """The compiled CPU loops (polyak_fused/_cpu_loops) when the step runs on the host and they
    take these lists (the arguments of one call; None entries allowed after the first list),
    else None: the torch ops run instead."""
    if not lists[0] or not on_host(lists[0][0]):
        return None
    return _cpu_loops.for_tensors(*lists)


def blocks(*lists, size: int | None = None):
    """Aligned blocks of the tensors of `lists` (equal shapes at each index): yields one list of
    tensors per input list, holding at most `size` elements. Tensors larger than a block are cut
    into flat views (when every one of them is contiguous); smaller ones are grouped."""
    size = size or BLOCK
    group, count = [[] for _ in lists], 0
    for ts in zip(*lists):
        n = ts[0].numel()
        if n > size and all(t.is_contiguous() for t in ts):
            if count:
                yield group
                group, count = [[] for _ in lists], 0
            flats = [t.view(-1) for t in ts]
            for j in range(0, n, size):
                yield [[f[j:j + size]] for f in flats]
            continue
        if count and count + n > size:
            yield group
            group, count = [[] for _ in lists], 0
        for out, t in zip(group, ts):
            out.append(t)
        count += n
    if count or group[0]:
        yield group


def _total(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The sum of 0-d partial sums, added in float64, as a 0-d tensor of `dtype`."""
    if not parts:
        return torch.zeros((), dtype=dtype)
    by_dtype: dict = {}
    for p in parts:
        by_dtype.setdefault(p.dtype, []).append(p)
    return sum(torch.stack(ps).to(torch.float64).sum() for ps in by_dtype.values()).to(dtype)


def dots(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    """The partial sums <a_i, b_i> of pairs of tensors, in their math dtype, one dot product per
    BLOCK elements (collect them, then `block_sums`)."""
    out = []
    for x, y in zip(a, b):
        x, y = E.up(x), E.up(y)
        if x.dtype != y.dtype:
            x, y = x.to(torch.float64), y.to(torch.float64)
        if x.numel() <= BLOCK:
            out.append(torch.dot(x.reshape(-1), y.reshape(-1)))
        else:
            out += map(torch.dot, x.reshape(-1).split(BLOCK), y.reshape(-1).split(BLOCK))
    return out


def sum_of_squares(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """sum_i ||t_i||^2 (a 0-d tensor of `dtype`): dot products over blocks of BLOCK elements,
    each in the tensor's math dtype (a low-precision tensor is read into a float32 copy),
    added in float64. Measured on 38.6M float32 elements against float64: 3e-6 relative, where
    one float32 norm (torch._foreach_norm, torch.linalg.vector_norm) is 5e-3 off and one dot
    product 7e-4. On the GPT-2 124M layout (2 threads) it takes 26 ms, torch._foreach_norm 41.
    The CPU loops sum chunks of 2^16 elements in 32 float32 lanes each, the chunks in float64."""
    loops = cpu_loops(tensors)
    if loops is not None:
        return torch.tensor(loops.sum_sq(tensors), dtype=dtype)
    return _total(dots(tensors, tensors), dtype).to(
        tensors[0].device if tensors else "cpu")


def block_sums(parts: list[torch.Tensor], dtype: torch.dtype, device) -> torch.Tensor:
    """The total of partial sums collected block by block (e.g. by `dots`)."""
    return _total(parts, dtype).to(device)


# ---- the step's scalars -------------------------------------------------------------------------
def in_host_numbers(scalars: torch.Tensor) -> bool:
    """Whether the step's rule runs in Python numbers (on the host, with packed scalars that
    `slots` can write into: those every optimizer and functional_state make)."""
    return on_host(scalars) and H.can_hold(scalars)


def scalar_slots(scalars: torch.Tensor, names: tuple) -> dict:
    """The saved scalars by name. On the host, HostScalars that write back into `scalars`, so
    the rule runs in Python numbers (polyak_fused/_host_scalars.py); elsewhere 0-d views."""
    if in_host_numbers(scalars):
        return H.slots(scalars, names)
    return dict(zip(names, scalars.unbind()))


def across_ranks(scalars: torch.Tensor, loss, *sums):
    """E.across_ranks of the loss (or None) and the sums (0-d tensors, or the CPU loops'
    numbers). On the host (see `scalar_slots`) each is then read as a HostScalar, rounded to
    the dtype of `scalars`."""
    dtype = scalars.dtype
    host = in_host_numbers(scalars)
    if not host or E.current_reduction() is not None:    # (the all-reduce takes tensors)
        loss, *sums = E.across_ranks(loss, *(s if torch.is_tensor(s) else
                                             torch.tensor(s, dtype=dtype) for s in sums))
    if not host:
        return (loss, *sums)
    return tuple(None if v is None else H.read(v, dtype) for v in (loss, *sums))


def is_finite(*scalars, found_inf=None):
    """Whether the step is taken (E.is_finite): on the host a bool, which E.write_if and
    E.count_step take as it is; elsewhere the 0-d bool tensor, read by nothing. On the host each
    scalar is read as a Python float and checked there: a CPU sync stalls no device, and right
    after a pass over the tensors the first 0-d torch op of each kind costs 13-41 us (its code
    is cold; bench/NOTES.md, "Fourth run")."""
    given = [s for s in scalars if s is not None]
    if not on_host(given[0]):
        return E.is_finite(*given, found_inf=found_inf)
    return all(map(math.isfinite, map(float, given))) and (found_inf is None
                                                         or float(found_inf) == 0)


def taken(finite, like: torch.Tensor) -> bool:
    """Whether to run the updates: on the host, whether the step is taken (`finite` is the bool
    `is_finite` read; a skipped step writes nothing); elsewhere always True, and `updating`
    commits only a taken step."""
    return finite if on_host(like) else True


def number(value, like: torch.Tensor):
    """A step's scalar as the updates take it: a Python number on the host, else a 0-d tensor in
    the math dtype of `like` on its device."""
    if on_host(like):
        return float(value)
    if torch.is_tensor(value):
        return value.reshape(()).to(device=like.device, dtype=E.math_dtype(like))
    return value


def per_lr(lrs, n: int, value_of) -> list:
    """value_of(lr) for each of n tensors (lrs: one per tensor, or one for all), computed once
    per distinct lr, so that the tensors of one param group share one object (see `runs`)."""
    done, out = {}, []
    for lr in E.per_tensor(lrs, n):
        key = ("tensor", id(lr)) if torch.is_tensor(lr) else ("number", float(lr))
        if key not in done:
            done[key] = value_of(lr)
        out.append(done[key])
    return out


def runs(coefs: list):
    """(start, end, coef) for each run of tensors that share one coefficient object."""
    start = 0
    for i in range(1, len(coefs) + 1):
        if i == len(coefs) or coefs[i] is not coefs[start]:
            yield start, i, coefs[start]
            start = i


def blocks_with_coefs(coefs: list, *lists, size: int | None = None):
    """`blocks` of the lists, each with one coefficient: every block lies in one run of `coefs`
    (one per tensor). Yields (coef, block lists)."""
    for start, end, coef in runs(coefs):
        for block in blocks(*(ts[start:end] for ts in lists), size=size):
            yield coef, block


def select(cond, a: list, b: list) -> list:
    """a where cond else b, tensor by tensor: a host bool picks a list; a device bool, per
    element."""
    if not torch.is_tensor(cond) or on_host(cond):
        return a if bool(cond) else b
    return [torch.where(cond, x, y) for x, y in zip(a, b)]


# ---- in-place updates ----------------------------------------------------------------------------
@contextlib.contextmanager
def updating(targets: list[torch.Tensor], finite: torch.Tensor):
    """Yields the tensors to update in place, in their math dtype; on exit they are written back
    into `targets` (on the host the step is taken, see `taken`; elsewhere only if `finite`).
    Float32/float64 tensors on the host are updated in place directly."""
    if targets and on_host(targets[0]):
        work = [t if t.dtype in _EXACT else E.up(t) for t in targets]
        yield work
        for t, w in zip(targets, work):
            if w is not t:
                t.copy_(w)
        return
    work = [E.up(t).clone() for t in targets]
    yield work
    for t, w in zip(targets, work):
        t.copy_(torch.where(finite, w.to(t.dtype), t))


def copy_if(cond: torch.Tensor, targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """targets <- sources where cond (a 0-d bool tensor), else unchanged."""
    if not targets:
        return
    if on_host(targets[0]):
        if bool(cond):
            torch._foreach_copy_(targets, sources)
        return
    for t, s in zip(targets, sources):
        E.write_if(cond, t, s)


def up_all(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [E.up(t) for t in tensors]


def add_(xs: list, ds: list, alpha) -> None:
    """x <- x + alpha * d (alpha a number or a 0-d tensor)."""
    if torch.is_tensor(alpha):
        torch._foreach_add_(xs, torch._foreach_mul(ds, alpha))
    else:
        torch._foreach_add_(xs, ds, alpha=alpha)


def addcdiv_(xs: list, a: list, b: list, value) -> None:
    """x <- x + value * a / b."""
    if torch.is_tensor(value):
        torch._foreach_add_(xs, torch._foreach_mul(torch._foreach_div(a, b), value))
    else:
        torch._foreach_addcdiv_(xs, a, b, value=value)


def unscaled(grads: list[torch.Tensor], grad_scale) -> list[torch.Tensor]:
    """The gradients of one block over GradScaler's scale S, in their math dtype (the tensors
    themselves for float32/float64 without GradScaler)."""
    grads = up_all(grads)
    if grad_scale is None:
        return grads
    return torch._foreach_div(grads, grad_scale.reshape(()).to(device=grads[0].device,
                                                              dtype=grads[0].dtype))


def inverse_scale(grad_scale, like: torch.Tensor):
    """1/S as the updates take it (1.0 without GradScaler)."""
    if grad_scale is None:
        return 1.0
    if on_host(like):
        return 1.0 / float(grad_scale)          # (GradScaler's S is never 0)
    return number(1.0 / grad_scale.reshape(()).double(), like)


def unscaled_sum_of_squares(grads, grad_scale, dtype) -> torch.Tensor:
    """||g / S||^2 = ||g||^2 / S^2: one pass over the raw gradients."""
    sq = sum_of_squares(grads, dtype)
    if grad_scale is None:
        return sq
    return sq / grad_scale.reshape(()).to(device=sq.device, dtype=dtype).square()


def descend(params, directions, lrs, eta, finite, scale=1.0) -> None:
    """x <- x - lr_group * eta * scale * d for every tensor, unless the step is skipped (`scale`:
    1/S when d is a raw scaled gradient)."""
    if not params or not taken(finite, params[0]):
        return
    like = params[0]
    if on_host(like):                   # in Python floats: no 0-d ops
        eta = float(eta)
        coefs = per_lr(lrs, len(params), lambda lr: -(float(lr) * eta) * scale)
    else:
        coefs = per_lr(lrs, len(params), lambda lr: number(-(lr * eta) * scale, like))
    loops = cpu_loops(params, directions)
    if loops is not None:
        loops.axpy(params, directions, coefs, [1.0] * len(params))
        return
    if on_host(like) and all(x.dtype in _EXACT and d.dtype == x.dtype
                             for x, d in zip(params, directions)):
        for start, end, coef in runs(coefs):     # in place, no temporary: no blocks needed
            torch._foreach_add_(params[start:end], directions[start:end], alpha=coef)
        return
    for coef, (xs, ds) in blocks_with_coefs(coefs, params, directions):
        with updating(xs, finite) as work:
            add_(work, up_all(ds), coef)
