"""Fused step of every optimizer in polyak_fused: three Triton kernels and their host launcher.

One step, for all tensors of one (device, dtype) group at a time, with no host sync:

  1. `_reduce_kernel`     one launch per dtype group. Each program takes one chunk of one tensor
                          and writes its partial sums (sum g^2, and what else the method needs) to
                          its own slot: fixed slots, no float atomics, so runs are bitwise equal.
  2. `_step_size_kernel`  one program for the whole step. Adds the partials in a fixed order,
                          checks that the loss and the sums are finite, computes the method's step
                          size from the loss, the sums and its scalar state, updates that state.
  3. `_update_kernel`     one launch per dtype group. Updates every element of every tensor with
                          the step size (or skips the whole step if it was not finite).

Why a separate one-program kernel for 2 instead of computing the step size in every program of 3
(two phases would save a launch): the method's scalar state (DecSPS's bound, AdaSPS's gap
sum, DoG's G, the step counter...) must be written exactly once per step and read by every
program; inside one launch that is a race, and across dtype groups it would be written once per
group. The extra launch moves a few hundred bytes; its cost on a GPU is still to be measured
(bench/NOTES.md).

Everything that changes between steps is read from device memory: the loss, the per-group lr,
the step count and the method's running scalars; the hyperparameters too (one small tensor).
Launch arguments are pointers and a few lengths, none of them specialised, so an lr change or a new
param group compiles nothing.

Tensor metadata lives in device tables, built once and cached by the caller (`cache`), rebuilt
only when a parameter or a state buffer moves:
  meta   int64 [n_tensors, 6]: x pointer, two state-buffer pointers (0 where none), numel, lr slot,
                               gradient slot
  gptrs  int64 [n_tensors]:    the gradient pointers, one array for the whole step (0: the tensor
                               has no gradient this step), rewritten with one host-to-device copy
                               when gradients come at new addresses
  chunks int64 [n_chunks, 2]:  tensor index, first element of the chunk
Chunks cut every tensor into pieces of at most `chunk` elements, so one huge tensor and a thousand
tiny ones give balanced programs; on a GPU the chunk size follows the layout (`cuda_launch_config`,
bench/NOTES.md). Offsets are 64-bit throughout. Each program reads its pointers from the table and
takes 16-byte vector loads when all of them are 16-byte aligned, scalar loads otherwise: alignment
is decided per chunk, so one misaligned tensor does not slow down its dtype group.

This module imports nothing of polyak_fused but the host pass (`_host_pass`): the guards'
constants (defined once, beside the eager references) arrive as arguments of `polyak_step_`
(`guards`), and reach the kernels as constexprs.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from operator import is_

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime import driver

from .. import _host_pass

try:
    from triton import knobs  # Triton >= 3.4
except ImportError:  # pragma: no cover - older Triton: launch hooks on CompiledKernel
    knobs = None

# ------------------------------------------------------------------------------------------------
# Layouts shared with polyak_fused (the order of each optimizer's SCALARS tuple).
# scalars: [step, skipped, <method scalars...>]; hparams: per method, below; coefs: [ok, eta, aux].
# ------------------------------------------------------------------------------------------------
METHODS = ("inexact_polyak", "polyak", "decsps", "adasps", "dog", "clipped_sgd", "nsgdm", "momo",
           "momo_adam")

#: Number of partial sums each method's reduce kernel writes per chunk.
N_SUMS = {"dog": 3, "momo": 3, "momo_adam": 3}
#: Values the step-size kernel hands to the update kernel (coefs): [ok, eta, aux, and for MoMo
#: the model's scalars: f̄_k, lb_k, <d_k, x_k>, gamma_k, ||d_k||^2 (D-weighted for MoMo-Adam),
#: rho_k, the seeding flag of the first step, 1 - beta2^k].
N_COEFS = 11


META_COLS = 6


def _hparam_values(method: str, hp: dict) -> list[float]:
    """The hyperparameter vector each method's kernels read from device memory."""
    if method == "inexact_polyak":
        return [math.sqrt(hp["total_steps"]), hp["lower_bound"]]
    if method == "polyak":
        return [hp["f_star"], hp["c"], hp["max_lr"]]
    if method == "decsps":
        return [hp["c0"], hp["lower_bound"]]
    if method == "adasps":
        return [hp["c_p"], hp["lower_bound"]]
    if method == "dog":
        return [hp["reps_rel"], hp["weight_decay"]]
    if method == "clipped_sgd":
        return [hp["max_norm"], hp["momentum"]]
    if method == "nsgdm":
        return [hp["beta"]]
    if method == "momo":
        # 1 - beta and log(beta) rounded once here from the float64 values, as the reference
        # rounds its Python-float scalars into float32 math
        beta = hp["beta"]
        return [beta, 1.0 - beta, hp["lb"], hp["weight_decay"], float(hp["bias_correction"]),
                float(hp["use_fstar"]), math.log(beta) if beta > 0 else 0.0]
    if method == "momo_adam":
        b1, b2 = hp["betas"]
        return [b1, 1.0 - b1, b2, 1.0 - b2, hp["eps"], hp["lb"], hp["weight_decay"],
                float(hp["divide"]), float(hp["use_fstar"]), math.log(b1) if b1 > 0 else 0.0,
                math.log(b2) if b2 > 0 else 0.0]
    raise ValueError(f"unknown method: {method!r}")


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _is_finite(v):
    return (v == v) & (tl.abs(v) < float("inf"))


@triton.jit
def _nsgdm_beta(step, beta, AGNOSTIC: tl.constexpr):
    """beta_t of NSGD-M at t = step + 1; the reduce and step-size kernels call this same code, so
    both see bitwise the same value."""
    if AGNOSTIC:
        return 1.0 - 1.0 / tl.sqrt(step + 1.0)
    else:
        return beta + 0.0 * step


@triton.jit
def _chunk(meta, gptrs, chunks, chunk_size):
    """This program's chunk: the addresses of x, g and the state buffers, [start, end), the lr
    slot, and whether the addresses are 16-byte aligned (then full blocks can move 16-byte
    vectors). Chunk starts are multiples of BLOCK elements, so a chunk is aligned when its tensor
    is: alignment is decided per tensor, at run time, one tensor not slowing down the others.
    g is 0 for a tensor without a gradient this step (one that takes part only in quantities
    over the whole iterate: WHOLE)."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    row = meta + META_COLS_C * t
    x_addr = tl.load(row + 0)
    b_addr = tl.load(row + 1)          # 0 for methods without a state buffer
    b1_addr = tl.load(row + 2)         # 0 for methods with fewer than two
    numel = tl.load(row + 3)
    lr_slot = tl.load(row + 4)
    g_addr = tl.load(gptrs + tl.load(row + 5))
    aligned = ((x_addr | g_addr | b_addr | b1_addr) & 15) == 0
    end = tl.minimum(start + chunk_size, numel)
    return pid, x_addr, g_addr, b_addr, b1_addr, start, end, lr_slot, aligned


@triton.jit
def _as_ptr(addr, like, ALIGNED: tl.constexpr):
    """An address from the table as a pointer to the group's dtype. Each call makes its own
    conversion, so that the alignment hint (which Triton attaches to the op that makes the value)
    reaches the aligned loop only."""
    ptr = addr.to(tl.pointer_type(like.dtype.element_ty))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


META_COLS_C = tl.constexpr(META_COLS)


@triton.jit
def _load(ptr, idx, mask, MASKED: tl.constexpr):
    """ptr[idx] in float32; only the last, partial block of a chunk needs the mask."""
    if MASKED:
        return tl.load(ptr + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        return tl.load(ptr + idx).to(tl.float32)


@triton.jit
def _store(ptr, idx, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + idx, value.to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr + idx, value.to(ptr.dtype.element_ty))


@triton.jit
def _block_indices(start, off, end, BLOCK: tl.constexpr):
    """Indices of one block; chunk starts and block offsets are multiples of BLOCK."""
    idx = start + off + tl.arange(0, BLOCK)
    idx = tl.max_contiguous(tl.multiple_of(idx, BLOCK), BLOCK)
    return idx, idx < end


@triton.jit
def _one_minus_power(step, log_beta):
    """1 - beta^k for the step being taken, k = step + 1 (a bias correction), in float64 from
    log(beta) (hparams): 1 - beta^k written out in float32 loses 1e-5 relative for beta = 0.999.
    beta = 0 (log_beta 0 by _hparam_values): 1. The reduce, step-size and update kernels call
    this same code, so all see bitwise the same value."""
    k = (step + 1.0).to(tl.float64)
    value = 1.0 - tl.exp(k * log_beta.to(tl.float64))
    return tl.where(log_beta == 0.0, 1.0, value.to(tl.float32))


@triton.jit
def _momo_direction(g, d, v, c0, c1, c2, c3, c4, c5, ADAM: tl.constexpr):
    """MoMo's d_k = beta d + (1 - beta) g (c0, c1; c2: the first step without bias correction,
    which starts d at g); MoMo-Adam's d_k and v_k = beta2 v + (1 - beta2) g^2 (c2, c3) and
    D_k = sqrt(v_k / (1 - beta2^k)) + eps (c4, c5). Returns d_k, v_k, D_k."""
    if ADAM:
        d_new = c0 * d + c1 * g
        v_new = c2 * v + c3 * g * g
        return d_new, v_new, tl.sqrt(v_new / c4) + c5
    else:
        d_new = c0 * tl.where(c2 != 0.0, g, d) + c1 * g
        return d_new, v, 1.0 + 0.0 * g


@triton.jit
def _reduce_block(x_ptr, g_ptr, b_ptr, b1_ptr, idx, mask, inv_scale, c0, c1, c2, c3, c4, c5,
                  METHOD: tl.constexpr, MASKED: tl.constexpr, HAS_GRAD: tl.constexpr):
    """This block's terms of the method's sums (s0, s1, s2). The c's are the method's
    coefficients of this step (_reduce_kernel). Without a gradient (HAS_GRAD False, DoG only)
    the tensor counts in the sums over the iterate, not in ||d||^2."""
    if METHOD == "dog":
        x = _load(x_ptr, idx, mask, MASKED)
        x0 = _load(b_ptr, idx, mask, MASKED)
        if HAS_GRAD:
            g = _load(g_ptr, idx, mask, MASKED) * inv_scale  # unscaled as loaded (GradScaler)
            d = g + c0 * x                                    # coupled weight decay
            d_sq = d * d
        else:
            d_sq = 0.0 * x
        return d_sq, (x - x0) * (x - x0), x0 * x0         # ||d||^2, ||x - x0||^2, ||x0||^2
    g = _load(g_ptr, idx, mask, MASKED) * inv_scale      # unscaled as it is loaded (GradScaler)
    if METHOD == "nsgdm":
        m = c0 * _load(b_ptr, idx, mask, MASKED) + (1.0 - c0) * g  # m_t, stored later
        return m * m, 0.0 * g, 0.0 * g
    elif METHOD == "momo" or METHOD == "momo_adam":   # d_k (and v_k) stored later, by the update
        x = _load(x_ptr, idx, mask, MASKED)
        d = _load(b_ptr, idx, mask, MASKED)
        if METHOD == "momo_adam":
            v = _load(b1_ptr, idx, mask, MASKED)
        else:
            v = 0.0 * g
        d_new, v_new, D = _momo_direction(g, d, v, c0, c1, c2, c3, c4, c5, METHOD == "momo_adam")
        if METHOD == "momo_adam":
            d_sq = d_new * (d_new / D)                   # sum d_k^2 / D_k
        else:
            d_sq = d_new * d_new                         # ||d_k||^2
        return d_sq, g * x, d_new * x                    # , <g_k, x_k>, <d_k, x_k>
    else:
        return g * g, 0.0 * g, 0.0 * g


@triton.jit
def _reduce_range(x_ptr, g_ptr, b_ptr, b1_ptr, start, end, inv_scale, c0, c1, c2, c3, c4, c5,
                  METHOD: tl.constexpr, BLOCK: tl.constexpr, HAS_GRAD: tl.constexpr):
    """The block-wise terms of the method's sums over [start, end) (summed by the caller)."""
    acc0 = tl.zeros([BLOCK], tl.float32)
    acc1 = tl.zeros([BLOCK], tl.float32)
    acc2 = tl.zeros([BLOCK], tl.float32)
    n_full = (end - start) // BLOCK * BLOCK
    for off in range(0, n_full, BLOCK):
        idx, mask = _block_indices(start, off, end, BLOCK)
        a0, a1, a2 = _reduce_block(x_ptr, g_ptr, b_ptr, b1_ptr, idx, mask, inv_scale, c0, c1,
                                    c2, c3, c4, c5, METHOD, False, HAS_GRAD)
        acc0 += a0
        acc1 += a1
        acc2 += a2
    if n_full < end - start:
        idx, mask = _block_indices(start, n_full, end, BLOCK)
        a0, a1, a2 = _reduce_block(x_ptr, g_ptr, b_ptr, b1_ptr, idx, mask, inv_scale, c0, c1,
                                    c2, c3, c4, c5, METHOD, True, HAS_GRAD)
        acc0 += a0
        acc1 += a1
        acc2 += a2
    return acc0, acc1, acc2


@triton.jit
def _momo_coefficients(scalars, hparams, METHOD: tl.constexpr):
    """The coefficients of _momo_direction for this step, from the hyperparameters and the step
    count (read before the step-size kernel counts the step). MoMo: beta, 1 - beta, whether this
    is the first step without bias correction; MoMo-Adam: beta1, 1 - beta1, beta2, 1 - beta2,
    1 - beta2^k, eps."""
    step = tl.load(scalars + 0)
    if METHOD == "momo_adam":
        return (tl.load(hparams + 0), tl.load(hparams + 1), tl.load(hparams + 2),
                tl.load(hparams + 3), _one_minus_power(step, tl.load(hparams + 10)),
                tl.load(hparams + 4))
    else:
        seed = tl.where((step == 0.0) & (tl.load(hparams + 4) == 0.0), 1.0, 0.0)
        return tl.load(hparams + 0), tl.load(hparams + 1), seed, 0.0, 1.0, 0.0


# Pointer arguments the caller owns (the first parameter of the group, the scalars, GradScaler's
# scale, the loss, the inf flag) are not specialised on alignment: none is read with vectors.
# The direct launch keys its table of compiled variants on what Triton does specialise
# (_variant_key), so this is about fewer variants, not about correctness.
@triton.jit(do_not_specialize=["chunk_size", "n_slots", "slot0"],
            do_not_specialize_on_alignment=["like", "scalars", "grad_scale"])
def _reduce_kernel(meta, gptrs, chunks, like, partials, scalars, hparams, grad_scale, chunk_size,
                   n_slots, slot0, METHOD: tl.constexpr, AGNOSTIC: tl.constexpr,
                   WHOLE: tl.constexpr, BLOCK: tl.constexpr):
    # Traffic: reads g (4N B for fp32); DoG also reads x and x0 (12N B); NSGD-M also reads m (8N B);
    # MoMo reads x and d (12N B), MoMo-Adam x, d and v (16N B). Writes one float per chunk and
    # per sum. grad_scale: GradScaler's scale (1.0 without one).
    # WHOLE: some tensors may come without a gradient (g = 0 in the table); they are not stepped
    # but count in the quantities over the whole iterate (DoG's distances).
    pid, x, g, b, b1, start, end, lr_slot, aligned = _chunk(meta, gptrs, chunks, chunk_size)
    inv_scale = 1.0 / tl.load(grad_scale)
    c0 = 0.0
    c1 = 0.0
    c2 = 0.0
    c3 = 0.0
    c4 = 1.0
    c5 = 0.0
    if METHOD == "dog":
        c0 = tl.load(hparams + 1)                                         # weight decay
    if METHOD == "nsgdm":
        c0 = _nsgdm_beta(tl.load(scalars + 0), tl.load(hparams + 0), AGNOSTIC)  # beta_t
    if METHOD == "momo" or METHOD == "momo_adam":
        c0, c1, c2, c3, c4, c5 = _momo_coefficients(scalars, hparams, METHOD)
    acc0 = tl.zeros([BLOCK], tl.float32)
    acc1 = tl.zeros([BLOCK], tl.float32)
    acc2 = tl.zeros([BLOCK], tl.float32)
    if g != 0:
        if aligned:  # the same loop twice: with 16-byte vector loads, and with scalar ones
            acc0, acc1, acc2 = _reduce_range(_as_ptr(x, like, True), _as_ptr(g, like, True),
                                             _as_ptr(b, like, True), _as_ptr(b1, like, True),
                                             start, end, inv_scale, c0, c1, c2, c3, c4, c5,
                                             METHOD, BLOCK, True)
        else:
            acc0, acc1, acc2 = _reduce_range(_as_ptr(x, like, False), _as_ptr(g, like, False),
                                             _as_ptr(b, like, False), _as_ptr(b1, like, False),
                                             start, end, inv_scale, c0, c1, c2, c3, c4, c5,
                                             METHOD, BLOCK, True)
    elif WHOLE and METHOD == "dog":  # no gradient: only the distances (scalar loads: rare)
        acc0, acc1, acc2 = _reduce_range(_as_ptr(x, like, False), _as_ptr(g, like, False),
                                         _as_ptr(b, like, False), _as_ptr(b1, like, False),
                                         start, end, inv_scale, c0, c1, c2, c3, c4, c5, METHOD,
                                         BLOCK, False)
    slot = slot0 + pid
    tl.store(partials + slot, tl.sum(acc0, axis=0))
    if METHOD == "dog" or METHOD == "momo" or METHOD == "momo_adam":
        tl.store(partials + n_slots + slot, tl.sum(acc1, axis=0))
        tl.store(partials + 2 * n_slots + slot, tl.sum(acc2, axis=0))


@triton.jit
def _ordered_sum(ptr, n, BLOCK: tl.constexpr):
    """sum of ptr[0:n], always in the same order."""
    total = 0.0
    offs = tl.arange(0, BLOCK)
    for i in range(0, n, BLOCK):
        total += tl.sum(tl.load(ptr + i + offs, mask=i + offs < n, other=0.0), axis=0)
    return total


@triton.jit
def _momo_step_size(lb_k, f_avg, dx, gamma, d_sq, rho, alpha, wd, TINY_GRAD_SQ: tl.constexpr):
    """MoMo's tau = min(alpha / rho, t), t = max(w (f̄ - rho lb) + <d, x> - w gamma, 0) / ||d||^2
    with w = 1 + alpha lambda (+inf for a numerically zero direction: tau is then the cap). The
    step-size kernel (for the first lr, the scalars) and the update kernel (for each lr) call this
    same code."""
    w = 1.0 + alpha * wd
    numerator = w * (f_avg - rho * lb_k) + dx - w * gamma
    t = tl.where(d_sq > TINY_GRAD_SQ, tl.maximum(numerator, 0.0) / d_sq, float("inf"))
    return tl.minimum(alpha / rho, t)


@triton.jit(do_not_specialize=["n_slots"],
            do_not_specialize_on_alignment=["partials", "loss_ptr", "found_inf", "scalars"])
def _step_size_kernel(partials, n_slots, loss_ptr, found_inf, scalars, hparams, lrs, coefs,
                      METHOD: tl.constexpr, HAS_LOSS: tl.constexpr, TRACK_BEST: tl.constexpr,
                      AGNOSTIC: tl.constexpr, BLOCK: tl.constexpr, TINY_GRAD_SQ: tl.constexpr,
                      DOG_EPS: tl.constexpr, CLIP_EPS: tl.constexpr):
    # Traffic: reads the partials (4 B per chunk and sum); a few scalars otherwise.
    # TINY_GRAD_SQ, DOG_EPS, CLIP_EPS: the guards' constants, passed by the caller (`guards`).
    s0 = _ordered_sum(partials, n_slots, BLOCK)                 # sum g^2 (DoG: sum d^2)
    step = tl.load(scalars + 0)
    ok = _is_finite(s0) & (tl.load(found_inf) == 0.0)         # GradScaler found an inf: skip
    loss = 0.0
    if HAS_LOSS:
        loss = tl.load(loss_ptr).to(tl.float32)
        ok = ok & _is_finite(loss)
    zero_grad = s0 <= TINY_GRAD_SQ
    safe_s0 = tl.where(zero_grad, 1.0, s0)
    aux = 0.0
    if METHOD == "inexact_polyak":
        # eta = (f - l*)_+ / (sqrt(T) ||g||^2); hparams = [sqrt(T), l*]
        gap = tl.maximum(loss - tl.load(hparams + 1), 0.0)
        eta = tl.where(zero_grad, 0.0, gap / (tl.load(hparams + 0) * safe_s0))
        if TRACK_BEST:  # Algorithm 1: f(x_t) <= f_best -> x_best <- x_t
            best = tl.load(scalars + 3)
            improved = ok & (loss <= best)
            tl.store(scalars + 3, tl.where(improved, loss, best))
            aux = tl.where(improved, 1.0, 0.0)
    elif METHOD == "polyak":
        # eta = min((f - f*)_+ / (c ||g||^2), eta_max); hparams = [f*, c, eta_max]
        gap = tl.maximum(loss - tl.load(hparams + 0), 0.0)
        ratio = tl.minimum(gap / (tl.load(hparams + 1) * safe_s0), tl.load(hparams + 2))
        eta = tl.where(zero_grad, 0.0, ratio)
    elif METHOD == "decsps":
        # bound_k = min(ratio_k, bound_{k-1}); gamma_k = bound_k / (c0 sqrt(k+1)); hparams = [c0, l*]
        gap = tl.maximum(loss - tl.load(hparams + 1), 0.0)
        ratio = tl.where(zero_grad, float("inf"), gap / safe_s0)
        bound = tl.minimum(ratio, tl.load(scalars + 3))
        eta = tl.where(zero_grad, 0.0, bound / (tl.load(hparams + 0) * tl.sqrt(step + 1.0)))
        tl.store(scalars + 3, tl.where(ok, bound, tl.load(scalars + 3)))
    elif METHOD == "adasps":
        # eta_t = min((f - l*) / (c_p ||g||^2 sqrt(sum gaps)), eta_{t-1}); hparams = [c_p, l*]
        gap = tl.maximum(loss - tl.load(hparams + 1), 0.0)
        gap_sum = tl.load(scalars + 3) + gap
        safe_sum = tl.where(gap > 0.0, gap_sum, 1.0)
        ratio = tl.where(gap > 0.0, gap / (tl.load(hparams + 0) * safe_s0 * tl.sqrt(safe_sum)), 0.0)
        ratio = tl.where(zero_grad, float("inf"), ratio)
        eta_t = tl.minimum(ratio, tl.load(scalars + 2))
        eta = tl.where(zero_grad, 0.0, eta_t)
        tl.store(scalars + 3, tl.where(ok, gap_sum, tl.load(scalars + 3)))
    elif METHOD == "dog":
        # rbar = max(rbar, ||x - x0||, reps_rel (1 + ||x0||)); G += ||d||^2 (+eps first);
        # eta = rbar / sqrt(G); hparams = [reps_rel, weight_decay]
        dist_sq = _ordered_sum(partials + n_slots, n_slots, BLOCK)
        x0_sq = _ordered_sum(partials + 2 * n_slots, n_slots, BLOCK)
        r_eps = tl.load(hparams + 0) * (1.0 + tl.sqrt(x0_sq))
        rbar = tl.maximum(tl.maximum(tl.load(scalars + 3), tl.sqrt(dist_sq)), r_eps)
        G = tl.load(scalars + 4) + s0 + tl.where(step == 0.0, DOG_EPS, 0.0)
        eta = rbar / tl.sqrt(G)
        tl.store(scalars + 3, tl.where(ok, rbar, tl.load(scalars + 3)))
        tl.store(scalars + 4, tl.where(ok, G, tl.load(scalars + 4)))
    elif METHOD == "clipped_sgd":
        # kappa = min(1, c / (||g|| + 1e-6)); hparams = [c, momentum]; scalars[2:4] = norm, kappa
        norm = tl.sqrt(s0)
        eta = tl.minimum(tl.load(hparams + 0) / (norm + CLIP_EPS), 1.0)
        tl.store(scalars + 2, tl.where(ok, norm, tl.load(scalars + 2)))
    elif METHOD == "momo" or METHOD == "momo_adam":
        # The model m_k(x) = f̄_k + <d_k, x> - gamma_k of the loss, brought down to rho_k lb by
        # tau = min(alpha / rho_k, t) (_momo_step_size). s0 = ||d_k||^2 (MoMo-Adam: sum d^2/D),
        # s1 = <g_k, x_k>, s2 = <d_k, x_k>. hparams: momo [beta, 1-beta, lb, wd, bias
        # correction, use_fstar, log beta]; momo_adam [beta1, 1-beta1, beta2, 1-beta2, eps, lb,
        # wd, divide, use_fstar, log beta1, log beta2]. scalars[2:6] = tau, f̄, gamma, lb.
        gx = _ordered_sum(partials + n_slots, n_slots, BLOCK)
        dx = _ordered_sum(partials + 2 * n_slots, n_slots, BLOCK)
        ok = ok & _is_finite(gx) & _is_finite(dx)
        beta = tl.load(hparams + 0)
        one_minus_beta = tl.load(hparams + 1)
        if METHOD == "momo_adam":
            lb0 = tl.load(hparams + 5)
            wd = tl.load(hparams + 6)
            fstar = tl.load(hparams + 8)
            rho = _one_minus_power(step, tl.load(hparams + 9))               # 1 - beta1^k
            bias2 = _one_minus_power(step, tl.load(hparams + 10))            # 1 - beta2^k
            seed = 0.0
            f_avg = one_minus_beta * loss + beta * tl.load(scalars + 3)       # f̄_k
            gamma = beta * tl.load(scalars + 4) + one_minus_beta * gx        # gamma_k
        else:
            lb0 = tl.load(hparams + 2)
            wd = tl.load(hparams + 3)
            fstar = tl.load(hparams + 5)
            bias2 = 1.0
            seed = tl.where((step == 0.0) & (tl.load(hparams + 4) == 0.0), 1.0, 0.0)
            rho = tl.where(tl.load(hparams + 4) != 0.0,
                           _one_minus_power(step, tl.load(hparams + 6)), 1.0)
            f_avg = beta * tl.where(seed != 0.0, loss, tl.load(scalars + 3)) + one_minus_beta * loss
            gamma = beta * tl.where(seed != 0.0, gx, tl.load(scalars + 4)) + one_minus_beta * gx
        alpha0 = tl.load(lrs + 0)                                   # the first param group's lr
        lb_k = tl.where(fstar != 0.0, tl.load(scalars + 5), lb0)
        if fstar != 0.0:  # reset: when the model lies below w rho lb, restart at half of it
            w = 1.0 + alpha0 * wd
            h_w = w * f_avg + dx - w * gamma
            lb_k = tl.where(h_w < w * rho * lb_k, tl.maximum(h_w / (2.0 * w * rho), lb0), lb_k)
        eta = _momo_step_size(lb_k, f_avg, dx, gamma, s0, rho, alpha0, wd, TINY_GRAD_SQ)
        lb_next = lb_k
        if fstar != 0.0:  # lb_{k+1} = (h - tau ||d||^2 / 2) / rho, never below lb
            lb_next = tl.maximum((f_avg + dx - gamma - 0.5 * eta * s0) / rho, lb0)
        tl.store(scalars + 3, tl.where(ok, f_avg, tl.load(scalars + 3)))
        tl.store(scalars + 4, tl.where(ok, gamma, tl.load(scalars + 4)))
        tl.store(scalars + 5, tl.where(ok, lb_next, tl.load(scalars + 5)))
        tl.store(coefs + 3, f_avg)
        tl.store(coefs + 4, lb_k)
        tl.store(coefs + 5, dx)
        tl.store(coefs + 6, gamma)
        tl.store(coefs + 7, s0)
        tl.store(coefs + 8, rho)
        tl.store(coefs + 9, seed)
        tl.store(coefs + 10, bias2)
    else:  # nsgdm: eta = s_t / ||m_t||, s_t = 1 or t^(-3/4); aux = beta_t; hparams = [beta]
        aux = _nsgdm_beta(step, tl.load(hparams + 0), AGNOSTIC)
        if AGNOSTIC:
            s_t = 1.0 / tl.sqrt(tl.sqrt((step + 1.0) * (step + 1.0) * (step + 1.0)))
        else:
            s_t = 1.0
        eta = tl.where(zero_grad, 0.0, s_t / tl.sqrt(safe_s0))
    if METHOD == "clipped_sgd":
        tl.store(scalars + 3, tl.where(ok, eta, tl.load(scalars + 3)))
    else:
        tl.store(scalars + 2, tl.where(ok, eta, tl.load(scalars + 2)))
    tl.store(scalars + 0, step + tl.where(ok, 1.0, 0.0))
    tl.store(scalars + 1, tl.load(scalars + 1) + tl.where(ok, 0.0, 1.0))
    tl.store(coefs + 0, tl.where(ok, 1.0, 0.0))
    tl.store(coefs + 1, eta)
    tl.store(coefs + 2, aux)


@triton.jit
def _update_block(x_ptr, g_ptr, b_ptr, b1_ptr, idx, mask, inv_scale, lr, eta, aux, hp1,
                  c0, c1, c2, c3, c4, c5, METHOD: tl.constexpr, TRACK_BEST: tl.constexpr,
                  MOMENTUM: tl.constexpr, MASKED: tl.constexpr, HAS_GRAD: tl.constexpr):
    """x <- x - lr * eta * direction for one block (and the state buffers where there are some).
    hp1 is DoG's weight decay or clipped SGD's momentum; aux is NSGD-M's beta_t or the
    best-iterate flag; MoMo: eta = tau for this lr, x <- (aux x - tau d) / hp1 (aux, hp1: the
    weight decay's factors) and c0..c5 the coefficients of _momo_direction. Without a gradient
    (HAS_GRAD False) x is not stepped; the best iterate still copies it."""
    x = _load(x_ptr, idx, mask, MASKED)
    if not HAS_GRAD:
        if TRACK_BEST:
            if aux != 0.0:  # this step's loss is the best so far: keep x_t
                _store(b_ptr, idx, x, mask, MASKED)
    else:
        g = _load(g_ptr, idx, mask, MASKED) * inv_scale  # unscaled as it is loaded (GradScaler)
        if METHOD == "dog":
            x_new = x - (lr * eta) * (g + hp1 * x)
        elif METHOD == "clipped_sgd":
            if MOMENTUM:
                m = hp1 * _load(b_ptr, idx, mask, MASKED) + eta * g  # m = mu m + kappa g
                _store(b_ptr, idx, m, mask, MASKED)
                x_new = x - lr * m
            else:
                x_new = x - (lr * eta) * g
        elif METHOD == "nsgdm":
            m = aux * _load(b_ptr, idx, mask, MASKED) + (1.0 - aux) * g
            _store(b_ptr, idx, m, mask, MASKED)
            x_new = x - (lr * eta) * m
        elif METHOD == "momo" or METHOD == "momo_adam":
            d = _load(b_ptr, idx, mask, MASKED)
            if METHOD == "momo_adam":
                v = _load(b1_ptr, idx, mask, MASKED)
            else:
                v = 0.0 * g
            d_new, v_new, D = _momo_direction(g, d, v, c0, c1, c2, c3, c4, c5,
                                              METHOD == "momo_adam")
            _store(b_ptr, idx, d_new, mask, MASKED)
            if METHOD == "momo_adam":
                _store(b1_ptr, idx, v_new, mask, MASKED)
                x_new = (aux * x - eta * (d_new / D)) / hp1     # x - tau d / D, weight decay
            else:
                x_new = (x - eta * d_new) / hp1                 # (x - tau d) / (1 + alpha lambda)
        else:
            if TRACK_BEST:
                if aux != 0.0:  # this step's loss is the best so far: keep x_t
                    _store(b_ptr, idx, x, mask, MASKED)
            x_new = x - (lr * eta) * g
        _store(x_ptr, idx, x_new, mask, MASKED)


@triton.jit
def _update_range(x_ptr, g_ptr, b_ptr, b1_ptr, start, end, inv_scale, lr, eta, aux, hp1,
                  c0, c1, c2, c3, c4, c5, METHOD: tl.constexpr, TRACK_BEST: tl.constexpr,
                  MOMENTUM: tl.constexpr, BLOCK: tl.constexpr, HAS_GRAD: tl.constexpr):
    n_full = (end - start) // BLOCK * BLOCK
    for off in range(0, n_full, BLOCK):
        idx, mask = _block_indices(start, off, end, BLOCK)
        _update_block(x_ptr, g_ptr, b_ptr, b1_ptr, idx, mask, inv_scale, lr, eta, aux, hp1,
                      c0, c1, c2, c3, c4, c5, METHOD, TRACK_BEST, MOMENTUM, False, HAS_GRAD)
    if n_full < end - start:
        idx, mask = _block_indices(start, n_full, end, BLOCK)
        _update_block(x_ptr, g_ptr, b_ptr, b1_ptr, idx, mask, inv_scale, lr, eta, aux, hp1,
                      c0, c1, c2, c3, c4, c5, METHOD, TRACK_BEST, MOMENTUM, True, HAS_GRAD)


@triton.jit(do_not_specialize=["chunk_size"],
            do_not_specialize_on_alignment=["like", "grad_scale"])
def _update_kernel(meta, gptrs, chunks, like, coefs, lrs, hparams, grad_scale, chunk_size,
                   METHOD: tl.constexpr, TRACK_BEST: tl.constexpr, MOMENTUM: tl.constexpr,
                   WHOLE: tl.constexpr, BLOCK: tl.constexpr, TINY_GRAD_SQ: tl.constexpr):
    # Traffic (fp32): reads x, g, writes x: 12N B. Momentum methods also read and write m:
    # +8N B (MoMo: d; MoMo-Adam: d and v, +16N B). Best tracking writes x_best (+4N B) on the
    # steps that improve on the best loss.
    # WHOLE: a tensor without a gradient (g = 0) is not stepped (its best copy is still made).
    pid, x, g, b, b1, start, end, lr_slot, aligned = _chunk(meta, gptrs, chunks, chunk_size)
    ok = tl.load(coefs + 0)
    if ok != 0.0:  # a skipped step leaves every tensor bitwise unchanged
        eta = tl.load(coefs + 1)
        aux = tl.load(coefs + 2)
        lr = tl.load(lrs + lr_slot)
        inv_scale = 1.0 / tl.load(grad_scale)
        hp1 = 0.0
        c0 = 0.0
        c1 = 0.0
        c2 = 0.0
        c3 = 0.0
        c4 = 1.0
        c5 = 0.0
        if METHOD == "dog" or METHOD == "clipped_sgd":
            hp1 = tl.load(hparams + 1)
        if METHOD == "momo" or METHOD == "momo_adam":
            # tau for this tensor's lr alpha (the cap), from the model's scalars; the weight
            # decay's factors: MoMo and divide=True x / (1 + alpha lambda), MoMo-Adam with
            # divide=False x (1 - alpha lambda)
            if METHOD == "momo_adam":
                wd = tl.load(hparams + 6)
                divide = tl.load(hparams + 7) != 0.0
                c0, c1, c2, c3 = (tl.load(hparams + 0), tl.load(hparams + 1),
                                  tl.load(hparams + 2), tl.load(hparams + 3))
                c4, c5 = tl.load(coefs + 10), tl.load(hparams + 4)
                aux = tl.where(divide, 1.0, 1.0 - lr * wd)
                hp1 = tl.where(divide, 1.0 + lr * wd, 1.0)
            else:  # MoMo's weight decay is proximal
                wd = tl.load(hparams + 3)
                c0, c1, c2 = tl.load(hparams + 0), tl.load(hparams + 1), tl.load(coefs + 9)
                aux = 1.0 + 0.0 * lr
                hp1 = 1.0 + lr * wd
            eta = _momo_step_size(tl.load(coefs + 4), tl.load(coefs + 3), tl.load(coefs + 5),
                                  tl.load(coefs + 6), tl.load(coefs + 7), tl.load(coefs + 8), lr,
                                  wd, TINY_GRAD_SQ)
        if g != 0:
            if aligned:  # the same loop twice: with 16-byte vectors, and with scalars
                _update_range(_as_ptr(x, like, True), _as_ptr(g, like, True),
                              _as_ptr(b, like, True), _as_ptr(b1, like, True), start, end,
                              inv_scale, lr, eta, aux, hp1, c0, c1, c2, c3, c4, c5, METHOD,
                              TRACK_BEST, MOMENTUM, BLOCK, True)
            else:
                _update_range(_as_ptr(x, like, False), _as_ptr(g, like, False),
                              _as_ptr(b, like, False), _as_ptr(b1, like, False), start, end,
                              inv_scale, lr, eta, aux, hp1, c0, c1, c2, c3, c4, c5, METHOD,
                              TRACK_BEST, MOMENTUM, BLOCK, True)
        elif WHOLE and TRACK_BEST:  # no gradient: not stepped, but part of the best iterate
            _update_range(_as_ptr(x, like, False), _as_ptr(g, like, False),
                          _as_ptr(b, like, False), _as_ptr(b1, like, False), start, end,
                          inv_scale, lr, eta, aux, hp1, c0, c1, c2, c3, c4, c5, METHOD,
                          TRACK_BEST, MOMENTUM, BLOCK, False)


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------
#: Under the Triton interpreter (CPU): small chunks keep the tests quick and make a tensor of more
#: than 4096 elements span several chunks.
CPU_CONFIG = dict(chunk=4096, block=1024, num_warps=4)
#: On a GPU a program streams its chunk GPU_BLOCK elements per loop trip with 8 warps (8 elements
#: per thread: two 16-byte vectors of fp32, one of bf16).
GPU_BLOCK, GPU_WARPS = 2048, 8
#: The chunk-size model (bench/NOTES.md, "Chunk size from the layout"): a launch runs in waves of
#: n_sms x PROGRAMS_PER_SM resident programs; in the last, partly filled wave a few programs
#: stream their chunks alone (the tail). With at least WAVES waves the tail is a small part of
#: the launch. A chunk is never below MIN_CHUNK (a program must stream enough to hide its start:
#: two dependent table loads) nor above MAX_CHUNK.
WAVES, PROGRAMS_PER_SM = 8, 4
MIN_CHUNK, MAX_CHUNK = 4 * GPU_BLOCK, 32 * GPU_BLOCK
#: Floating-point contraction (FMA) in the kernels, chosen explicitly: Triton <= 3.9 fuses by
#: default and 3.10 will not, which would change results bitwise. Fused: one rounding fewer in
#: x - lr*eta*g, and the results every released version of this package computed.
FP_FUSION = True
#: With flat gradients, a step checks SPOT_CHECKS_PER_STEP of its n tensors, in turn: a tensor
#: that moved while its old storage stayed alive is found within n / SPOT_CHECKS_PER_STEP steps
#: (one whose old storage was freed, at the next step: _Plan._watch). A constant, so that the
#: flat mode's step does not grow with n. The default path checks every tensor (_Plan).
SPOT_CHECKS_PER_STEP = 2


def cuda_launch_config(numels, n_sms: int) -> dict:
    """Chunk, block and warps for one dtype group of tensors of `numels` elements on a GPU with
    `n_sms` SMs: the largest power-of-two chunk in [MIN_CHUNK, MAX_CHUNK] that still cuts the
    group into WAVES x n_sms x PROGRAMS_PER_SM chunks."""
    target = sum(numels) // (WAVES * n_sms * PROGRAMS_PER_SM)
    chunk = MIN_CHUNK
    while chunk * 2 <= min(target, MAX_CHUNK):
        chunk *= 2
    return dict(chunk=chunk, block=GPU_BLOCK, num_warps=GPU_WARPS)


def _launch_config(device: torch.device, numels) -> dict:
    if device.type == "cuda":
        n_sms = torch.cuda.get_device_properties(device).multi_processor_count
        return cuda_launch_config(numels, n_sms)
    return dict(CPU_CONFIG)


def _to_device(host: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on the device (a new tensor; for tables built once per plan). On CUDA the
    copy goes through pinned memory and does not block the host (torch's pinned-memory
    allocator keeps the buffer alive until it is done)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _int64_table(rows: list, device) -> torch.Tensor:
    return _to_device(torch.tensor(rows, dtype=torch.int64), device)


_is_contiguous = torch.Tensor.is_contiguous


class _Group:
    """The device tables of one dtype group, and its tensors copied through staging buffers
    (`staged`: (parameter index, gradient slot, staged x, g, buffers); strided parameters)."""

    def __init__(self, dtype, rows, chunk_rows, cfg, slot0, like, staged, device):
        self.dtype, self.cfg, self.slot0, self.like, self.staged = dtype, cfg, slot0, like, staged
        self.meta = _int64_table(rows, device)
        self.chunks = _int64_table(chunk_rows, device)
        self.n_chunks = len(chunk_rows)


class _GradPointers:
    """The gradient pointers of every table row of a plan, in one device array (`device`), and
    what fills it: `host` (numpy, the values) from column 1 of the host record, gathered by
    `param_of_slot`; a staged row holds its staging buffer's address when it has a gradient.

    A step with gradients at new addresses writes them with one gather on the host and one
    host-to-device copy (through a pinned buffer from torch's caching host allocator, which
    holds it until the copy is done). On the CPU (the interpreter, the stub driver) the kernels
    read `host` itself."""

    def __init__(self, param_of_slot: list, staged_slots: dict, device):
        self.param_of_slot = np.asarray(param_of_slot, dtype=np.int64)
        self.staged_slots = staged_slots  # slot -> the staging buffer of its gradient
        self.host = np.zeros(max(len(param_of_slot), 1), dtype=np.int64)
        self.on_cuda = device.type == "cuda"
        self.device = torch.from_numpy(self.host) if not self.on_cuda else \
            torch.zeros(self.host.shape, dtype=torch.int64, device=device)

    def write(self, watched: np.ndarray) -> None:
        n = len(self.param_of_slot)
        pinned = torch.empty(self.host.shape, dtype=torch.int64, pin_memory=True) \
            if self.on_cuda else None
        host = pinned.numpy() if pinned is not None else self.host
        np.take(watched[:, 1], self.param_of_slot, out=host[:n])
        for slot, sg in self.staged_slots.items():  # 1 (a gradient) or 0 in the record
            host[slot] = sg.data_ptr() if host[slot] else 0
        if pinned is not None:
            self.device.copy_(pinned, non_blocking=True)


class _Plan:
    """Everything a step needs that does not change while the parameters and buffers stay where
    they are: the device tables, the scratch buffers, and what they were built from (`params`,
    `bufs` as tuples, `lr_slots`).

    `watched` is the host's record of every tensor, one row of _host_pass.ROW values per
    parameter: the addresses of the parameter, its gradient (0: none; for a staged tensor 1 or
    0) and its state buffers, the element count, and whether it is staged. How a step knows the
    tables still hold (`_current_plan`):
      * a new parameter or state-buffer object: the step's sequences differ from the ones kept
        here (nothing to compare when the caller hands over the very tuples the plan kept:
        `_same`);
      * anything else, every tensor at every step: `check_tensors` (_host_pass, C++: ~10 ns a
        tensor) compares each parameter, gradient and buffer with its row. New gradient
        addresses (or a gradient that appeared or went, for the methods that step over the
        whole iterate) only rewrite the gradient pointers; a parameter or buffer that moved or
        was resized (``p.data = other``, ``model.to()``, ``swap_tensors``, even while another
        tensor keeps the old storage alive) rebuilds the plan. Nothing is trusted, nothing is
        held but the parameters and buffers.
      * flat gradients (the caller hands over a token with its gradients, `cache["grads_token"]`:
        the same token means the same gradient tensors), whose point is a step that does not
        grow with n: the tensors are compared SPOT_CHECKS_PER_STEP at a time, in turn, and a
        weak reference to each parameter's and buffer's storage flags its release at once. A
        tensor moved while its old storage stays alive is found within n / SPOT_CHECKS_PER_STEP
        steps (docs/host_path.md, "Flat gradients")."""

    def __init__(self, method, hp, params, grads, bufs, lr_slots, n_lr_slots, device,
                 grads_token):
        self.method, self.hp, self.device = method, hp, device
        self.params = tuple(params)
        self.grads_token = grads_token  # the caller's token of the gradients the tables point at
        self.bufs = tuple(tuple(b) for b in bufs)
        self.lr_slots, self.n_lr_slots = lr_slots, n_lr_slots
        self.moved = [False]  # set when a watched parameter or buffer storage is freed
        self._watches: list = []
        self.watching = grads_token is not None  # storages are watched for flat gradients only
        self.n_sums = N_SUMS.get(method, 1)
        self.groups: list[_Group] = []
        self.watched = np.zeros((len(params), _host_pass.ROW), dtype=np.int64)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(params):
            if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise RuntimeError(
                    f"the fused path takes float32, bfloat16 and float16 tensors, not {p.dtype}")
            by_dtype.setdefault(p.dtype, []).append(i)
        slot0 = 0
        param_of_slot, staged_slots = [], {}
        for dtype, idxs in by_dtype.items():
            cfg = _launch_config(device, [params[i].numel() for i in idxs])
            assert cfg["chunk"] % cfg["block"] == 0, "chunks must start on block boundaries"
            rows, chunk_rows, staged, like = [], [], [], None
            for i in idxs:
                x, g = params[i], grads[i]
                bs = [b[i] for b in self.bufs]
                if g is not None and g.layout != torch.strided:
                    raise RuntimeError(f"the fused path does not support sparse gradients "
                                       f"(tensor {i}: {g.layout})")
                for what, t in [("gradient", g)] + [("state", b) for b in bs]:
                    if t is not None and t.dtype != x.dtype:  # one dtype per table row
                        raise RuntimeError(
                            f"Invalid {what} dtype: {t.dtype} for a {x.dtype} parameter (tensor "
                            f"{i}); the fused path needs them equal (was the parameter cast "
                            f"after the optimizer made its state?)")
                if grads_token is not None:
                    for t in [x] + bs:
                        self._watch(t)
                is_staged = not all(map(_is_contiguous, [t for t in [x, g] + bs
                                                         if t is not None]))
                b_addrs = [b.data_ptr() for b in bs] + [0] * (2 - len(bs))
                g_mark = (int(g is not None) if is_staged
                          else (0 if g is None else g.data_ptr()))
                self.watched[i] = (x.data_ptr(), g_mark, *b_addrs, x.numel(), is_staged)
                if x.numel() == 0:
                    continue
                g_slot = len(param_of_slot)
                param_of_slot.append(i)
                if is_staged:  # copied through contiguous buffers (rare: strided parameters)
                    sx, sg = (torch.empty(x.shape, dtype=x.dtype, device=device) for _ in "xg")
                    sbs = [torch.empty(x.shape, dtype=x.dtype, device=device) for _ in bs]
                    staged.append((i, sx, sg, sbs))
                    staged_slots[g_slot] = sg
                    x, bs = sx, sbs
                    b_addrs = [b.data_ptr() for b in bs] + [0] * (2 - len(bs))
                like = x if like is None else like
                t = len(rows)
                rows.append([x.data_ptr(), *b_addrs, x.numel(), lr_slots[i], g_slot])
                for start in range(0, x.numel(), cfg["chunk"]):
                    chunk_rows.append([t, start])
            if chunk_rows:
                self.groups.append(_Group(dtype, rows, chunk_rows, cfg, slot0, like, staged,
                                          device))
                slot0 += len(chunk_rows)
        self.gptrs = _GradPointers(param_of_slot, staged_slots, device)
        self.gptrs.write(self.watched)
        self.n_slots = max(slot0, 1)
        self.partials = torch.zeros(self.n_sums * self.n_slots, dtype=torch.float32, device=device)
        self.coefs = torch.zeros(N_COEFS, dtype=torch.float32, device=device)
        # What the kernels read when no GradScaler hands over a scale and an inf flag.
        self.no_scale = torch.ones(1, dtype=torch.float32, device=device)
        self.no_inf = torch.zeros(1, dtype=torch.float32, device=device)
        self.hparams = _to_device(torch.tensor(hp, dtype=torch.float32), device)
        self.lrs = torch.zeros(n_lr_slots, dtype=torch.float32, device=device)
        self.lr_values: list = [None] * n_lr_slots
        self.spot_next = 0

    def _watch(self, t: torch.Tensor) -> None:
        """Set self.moved when the storage `t` uses now is freed."""
        moved = self.moved

        def freed(_ref):
            moved[0] = True

        try:
            self._watches.append(weakref.ref(t.untyped_storage(), freed))
        except (TypeError, RuntimeError):  # nothing to watch: the spot check will see it
            pass

    def fits(self, method, hp, params, bufs, lr_slots, n_lr_slots) -> bool:
        """Whether the tables were built for these parameter and buffer objects (`follow` then
        checks where the tensors are)."""
        return (not self.moved[0] and self.method == method and self.hp == hp
                and self.n_lr_slots == n_lr_slots
                and (self.lr_slots is lr_slots or self.lr_slots == tuple(lr_slots))
                and _same(self.params, params) and len(self.bufs) == len(bufs)
                and all(map(_same, self.bufs, bufs)))

    def follow(self, grads, token) -> bool:
        """Check every tensor against `watched` and point the gradient pointers at `grads`;
        False if the plan must be rebuilt. With the token of the gradients the tables point at
        (flat gradients), only the next SPOT_CHECKS_PER_STEP tensors are checked."""
        if token is not None and not self.watching:  # flat gradients from now on: rebuild
            return False                             # once, with the storage watches
        check = _host_pass.implementation().check_tensors
        if token is not None and token is self.grads_token:
            start, n = self.spot_next, len(self.params)
            end = min(start + SPOT_CHECKS_PER_STEP, n)
            window = slice(start, end)
            if check(self.params[window], grads[window], tuple(b[window] for b in self.bufs),
                     self.watched[window]) == 0:
                self.spot_next = end if end < n else 0
                return True
        status = check(self.params, grads, self.bufs, self.watched)
        if status == 2:
            return False
        if status == 1:  # new gradient addresses: one gather and one copy for the whole step
            self.gptrs.write(self.watched)
        self.grads_token = token
        return True


def _same(kept: tuple | None, given) -> bool:
    """Whether `given` holds the objects of `kept` (a tuple the plan made with tuple(given)): free
    when `given` is that tuple itself, which is immutable; element by element otherwise."""
    if given is kept:
        return True
    if kept is None or given is None:
        return False
    return len(kept) == len(given) and all(map(is_, kept, given))


def _current_plan(cache, method, hp, params, grads, bufs, lr_slots, n_lr_slots, device) -> _Plan:
    """The cached plan if it still describes these tensors (its gradient pointers rewritten if
    only the gradients moved), else a new one."""
    plan = cache.get("plan")
    token = cache.get("grads_token")
    if (plan is None or not plan.fits(method, hp, params, bufs, lr_slots, n_lr_slots)
            or not plan.follow(grads, token)):
        plan = _Plan(method, hp, params, grads, bufs, tuple(lr_slots), n_lr_slots, device, token)
        cache["plan"] = plan
    return plan


def _lr_slots(lrs):
    """One device slot per distinct lr object (a param group's lr is one object): the slot of
    each tensor, and the index of the first tensor of each slot."""
    slot_of, first_of_slot, slots = {}, [], []
    for i, lr in enumerate(lrs):
        key = id(lr)
        if key not in slot_of:
            slot_of[key] = len(first_of_slot)
            first_of_slot.append(i)
        slots.append(slot_of[key])
    return tuple(slots), first_of_slot


def _refresh_lrs(plan: _Plan, values) -> None:
    """Write the current lr values into the device slots, without a host sync: a float lr is
    filled only when it changed; a tensor lr is copied device-to-device every step (so that a
    captured CUDA graph reads its current value)."""
    for i, v in enumerate(values):
        if torch.is_tensor(v):
            plan.lrs[i : i + 1].copy_(v.reshape(1), non_blocking=True)
            plan.lr_values[i] = None
        elif plan.lr_values[i] != v:
            plan.lrs[i].fill_(float(v))
            plan.lr_values[i] = v


# ------------------------------------------------------------------------------------------------
# Launches
# ------------------------------------------------------------------------------------------------
#: Compiled kernels by _variant_key, for direct launches.
_COMPILED: dict = {}
#: Per kernel: how Triton may specialise each of its runtime arguments (_specialisation_flags).
_SPECIALISES: dict = {}


def _cuda_index(device: torch.device) -> int:
    """The CUDA device index the parameters live on. (Tensors that are not on a CUDA device,
    as under the stub driver of bench.fakecuda, launch on the current device.)"""
    if device.type == "cuda" and device.index is not None:
        return device.index
    return driver.active.get_current_device()


def _launch_target(device: torch.device):
    """(device index, that device's current stream) for this step's launches, or None where
    kernels must be launched through kernel[grid] every time: under the interpreter, and while
    a launch hook (a profiler) is installed, so that it sees every launch."""
    if not isinstance(_update_kernel, triton.runtime.JITFunction):
        return None
    hooks = knobs.runtime if knobs is not None else triton.compiler.CompiledKernel
    if _hook_set(hooks.launch_enter_hook) or _hook_set(hooks.launch_exit_hook):
        return None
    index = _cuda_index(device)
    return index, driver.active.get_current_stream(index)


def _hook_set(hook) -> bool:
    """Triton >= 3.5 keeps launch hooks in a HookChain (empty when none is set); older versions
    keep one callable or None."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _specialisation_flags(kernel) -> bytes:
    """For each runtime argument of `kernel`, whether Triton is told not to specialise it (bit 0:
    do_not_specialize) or not on its alignment (bit 1), read from the kernel's own declarations,
    so that the key cannot drift from them."""
    flags = _SPECIALISES.get(id(kernel))
    if flags is None:
        flags = bytes(int(p.do_not_specialize) | 2 * int(p.do_not_specialize_on_alignment)
                      for p in kernel.params if not p.is_constexpr)
        _SPECIALISES[id(kernel)] = flags
    return flags


def _variant_key(kernel, args: tuple, consts: tuple, num_warps: int, index: int) -> tuple:
    """Everything that selects a compiled variant of `kernel` for these arguments: per argument
    what Triton specialises it on (triton.runtime.jit: a tensor by its dtype and, unless
    do_not_specialize_on_alignment, whether its address is a multiple of 16; an int by its width
    and, unless do_not_specialize, whether it is 1 or a multiple of 16: the host pass's
    `specialisation`, in C++, 0.3 us for a launch's arguments), the constexprs, the launch
    options and the device. Two launches with equal keys run the same compiled code in Triton
    too."""
    spec = _host_pass.implementation().specialisation(args, _specialisation_flags(kernel))
    return (id(kernel), spec, consts, num_warps, FP_FUSION, index)


class _OnDevice:
    """Make `index` the current CUDA device for the launches of a step (kernel[grid] compiles
    for and launches on the current device; a direct launch runs in the current context), and
    the one before current again after."""

    __slots__ = ("index", "before")

    def __init__(self, index: int):
        self.index, self.before = index, None

    def __enter__(self):
        current = driver.active.get_current_device()
        if current != self.index:
            self.before = current
            driver.active.set_current_device(self.index)

    def __exit__(self, *exc):
        if self.before is not None:
            driver.active.set_current_device(self.before)
        return False


def _launch(kernel, n_programs: int, args: tuple, consts: tuple, num_warps: int, where) -> None:
    """kernel[(n_programs,)](*args, <constexprs>), with `args` the runtime arguments and `consts`
    the constexpr values, in the kernel's parameter order (every kernel here lists its
    constexprs last), on the device and stream of `where` (from _launch_target; the caller has
    made that device current: _OnDevice).

    Once that has compiled the variant, later launches with the same _variant_key call the
    compiled kernel's launcher directly: JITFunction.run binds, specialises and looks the
    variant up on every launch (8-9 us on the CPU of bench/NOTES.md, against about 1.5 us for
    the launcher itself)."""
    if where is None:  # the interpreter, or a launch hook is installed
        names = kernel.arg_names[len(args):]
        kernel[(n_programs,)](*args, **dict(zip(names, consts)), num_warps=num_warps,
                              enable_fp_fusion=FP_FUSION)
        return
    key = _variant_key(kernel, args, consts, num_warps, where[0])
    compiled = _COMPILED.get(key)
    if compiled is None:
        names = kernel.arg_names[len(args):]
        compiled = kernel[(n_programs,)](*args, **dict(zip(names, consts)), num_warps=num_warps,
                                         enable_fp_fusion=FP_FUSION)
        if isinstance(compiled, triton.compiler.CompiledKernel):
            _COMPILED[key] = compiled
        return
    compiled.run(n_programs, 1, 1, where[1], compiled.function, compiled.packed_metadata, None,
                 None, None, *args, *consts)


def _launch_step(plan, method, gptrs, scalars, scale_arg, inf_arg, loss, reduce, track_best,
                 momentum, agnostic, whole, guards, where) -> None:
    """The three phases of a step: reduce (per dtype group), step size, update (per group)."""
    for grp in plan.groups:
        cfg = grp.cfg
        _launch(_reduce_kernel, grp.n_chunks,
                (grp.meta, gptrs, grp.chunks, grp.like, plan.partials, scalars, plan.hparams,
                 scale_arg, cfg["chunk"], plan.n_slots, grp.slot0),
                (method, agnostic, whole, cfg["block"]), cfg["num_warps"], where)

    partials, n_slots = plan.partials, plan.n_slots
    if reduce is not None:  # distributed: the totals of this rank, then one all-reduce
        totals = plan.partials.view(plan.n_sums, plan.n_slots).sum(dim=1)
        loss, *totals = reduce(loss, *totals.unbind())
        partials, n_slots = torch.stack(totals).to(torch.float32).contiguous(), 1
    has_loss = loss is not None
    loss_arg = (loss if loss.dtype == torch.float32 else loss.float()) if has_loss else scalars
    _launch(_step_size_kernel, 1,
            (partials, n_slots, loss_arg, inf_arg, scalars, plan.hparams, plan.lrs, plan.coefs),
            (method, has_loss, track_best, agnostic, 1024, guards["tiny_grad_sq"],
             guards["dog_eps"], guards["clip_eps"]), 4, where)

    for grp in plan.groups:
        cfg = grp.cfg
        _launch(_update_kernel, grp.n_chunks,
                (grp.meta, gptrs, grp.chunks, grp.like, plan.coefs, plan.lrs, plan.hparams,
                 scale_arg, cfg["chunk"]),
                (method, track_best, momentum, whole, cfg["block"], guards["tiny_grad_sq"]),
                cfg["num_warps"], where)


def polyak_step_(method: str, params, grads, buffers: dict, lrs, loss, scalars: torch.Tensor,
                 hparams: dict, cache: dict | None = None, reduce=None, grad_scale=None,
                 found_inf=None, *, guards: dict) -> None:
    """One fused step of `method` over flat sequences, in place.

    `buffers` maps the method's state buffer names (x_best, x0 or momentum; at most two, in
    the order the kernels read them) to their sequences; `grads` may hold None for tensors
    that take part in the method's quantities over the whole iterate without being stepped
    (DoG's distances, the best iterate of track_best); `lrs` gives each tensor's lr (a
    float or a one-element tensor), either as a sequence or as an object with `slots` (a
    tuple: the lr slot of each tensor) and `values()` (the current lr of each slot), which
    spares a per-tensor pass; `scalars` is the packed fp32 scalar state; `reduce(loss,
    *totals)`, if given, combines the loss and the sums across ranks; `grad_scale` (a
    one-element device tensor, GradScaler's scale): the kernels divide every gradient by it as
    they load it; `found_inf` (likewise): non-zero skips the step; `guards`: the guards'
    constants ``tiny_grad_sq``, ``dog_eps``, ``clip_eps``.

    The launches go to the parameters' device and its current stream (under
    ``torch.cuda.stream(s)``: s), whatever the current device is.

    `cache` keeps the plan (tables) between steps; the plan holds the parameters and buffers,
    never the gradients (they may be freed between steps). What a step checks (_Plan):
      * parameters and buffers: their objects, by identity (free when they come in the very
        tuples of the last step: tuples do not change in place);
      * every parameter, gradient and buffer: its address, size, dtype and layout, in one call
        of the host pass's check_tensors (C++), unless `cache["grads_token"]` is the object it was
        at the last step (flat gradients: the caller promises that the same token means the
        same gradient tensors); then a few tensors per step, in turn."""
    if method not in METHODS:
        raise ValueError(f"unknown method: {method!r}")
    if scalars.dtype != torch.float32:
        raise RuntimeError("the fused path keeps its scalar state in float32")
    bufs = tuple(buffers.values())
    if len(bufs) > _host_pass.MAX_BUFFERS:
        raise ValueError(f"the fused path takes at most {_host_pass.MAX_BUFFERS} state buffers "
                         f"per tensor, got {len(bufs)} ({', '.join(buffers)})")
    device = scalars.device
    cache = {} if cache is None else cache
    lr_slots = getattr(lrs, "slots", None)
    if lr_slots is not None:
        lr_values = lrs.values()
    else:
        lr_slots, first_of_slot = _lr_slots(lrs)
        lr_values = [lrs[i] for i in first_of_slot]
    hp = _hparam_values(method, hparams)
    plan = _current_plan(cache, method, hp, params, grads, bufs, lr_slots, len(lr_values), device)
    _refresh_lrs(plan, lr_values)

    for grp in plan.groups:
        for i, sx, sg, sbs in grp.staged:
            sx.copy_(params[i])
            if grads[i] is not None:
                sg.copy_(grads[i])
            for sb, b in zip(sbs, bufs):
                sb.copy_(b[i])

    track_best = bool(hparams.get("track_best", False))
    whole = method == "dog" or track_best  # the methods whose grads may hold None
    momentum = method in ("nsgdm", "momo", "momo_adam") or (
        method == "clipped_sgd" and hparams["momentum"] > 0)
    agnostic = hparams.get("schedule") == "agnostic"
    where = _launch_target(device)
    scale_arg = plan.no_scale if grad_scale is None else grad_scale.to(device, torch.float32)
    inf_arg = plan.no_inf if found_inf is None else found_inf.to(device, torch.float32)
    gptrs = plan.gptrs.device
    with _OnDevice(where[0]) if where is not None else contextlib.nullcontext():
        _launch_step(plan, method, gptrs, scalars, scale_arg, inf_arg, loss, reduce,
                     track_best, momentum, agnostic, whole, guards, where)

    for grp in plan.groups:
        for i, sx, sg, sbs in grp.staged:
            params[i].copy_(sx)
            for sb, b in zip(sbs, bufs):
                b[i].copy_(sb)
