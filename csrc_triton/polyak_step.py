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
(DESIGN.md decision 4 names two phases): the method's scalar state (DecSPS's bound, AdaSPS's gap
sum, DoG's G, the step counter...) must be written exactly once per step and read by every
program; inside one launch that is a race, and across dtype groups it would be written once per
group. The extra launch moves a few hundred bytes; its cost on a GPU is still to be measured
(bench/NOTES.md).

Everything that changes between steps is read from device memory: the loss, the per-group lr,
the step count and the method's running scalars; the hyperparameters too (one small tensor).
Launch arguments are pointers and a few lengths, none of them specialised, so an lr change or a new
param group compiles nothing.

Tensor metadata lives in device tables, built once and cached by the caller (`cache`), rebuilt
only when a pointer changes:
  meta   int64 [n_tensors, 5]: x pointer, g pointer, state-buffer pointer, numel, lr slot
  chunks int64 [n_chunks, 2]:  tensor index, first element of the chunk
Chunks cut every tensor into pieces of at most `chunk` elements, so one huge tensor and a thousand
tiny ones give balanced programs. Offsets are 64-bit throughout.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# The guards' constants are defined once, beside the eager references.
from polyak_fused._optimizer import TINY_GRAD_SQ
from polyak_fused.clipped_sgd import CLIP_EPS
from polyak_fused.dog import DOG_EPS

# ------------------------------------------------------------------------------------------------
# Layouts shared with polyak_fused (the order of each optimizer's SCALARS tuple).
# scalars: [step, skipped, <method scalars...>]; hparams: per method, below; coefs: [ok, eta, aux].
# ------------------------------------------------------------------------------------------------
METHODS = ("inexact_polyak", "polyak", "decsps", "adasps", "dog", "clipped_sgd", "nsgdm")

#: Number of partial sums each method's reduce kernel writes per chunk.
N_SUMS = {"dog": 3}


META_COLS = 5


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
def _chunk(meta, chunks, like, chunk_size, ALIGNED: tl.constexpr):
    """This program's chunk: pointers of x, g and the state buffer, and [start, end).
    ALIGNED: the host checked that every pointer of the group is 16-byte aligned, so the loads
    and stores of full blocks can be 16-byte vectors."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    row = meta + META_COLS_C * t
    ptr_ty = tl.pointer_type(like.dtype.element_ty)
    x_ptr = tl.load(row + 0).to(ptr_ty)
    g_ptr = tl.load(row + 1).to(ptr_ty)
    b_ptr = tl.load(row + 2).to(ptr_ty)
    if ALIGNED:
        x_ptr = tl.multiple_of(x_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        b_ptr = tl.multiple_of(b_ptr, 16)
    numel = tl.load(row + 3)
    lr_slot = tl.load(row + 4)
    end = tl.minimum(start + chunk_size, numel)
    return pid, x_ptr, g_ptr, b_ptr, start, end, lr_slot


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
def _reduce_block(x_ptr, g_ptr, b_ptr, idx, mask, inv_scale, wd, beta_t, METHOD: tl.constexpr,
                  MASKED: tl.constexpr):
    """This block's terms of the method's sums (s0, s1, s2)."""
    g = _load(g_ptr, idx, mask, MASKED) * inv_scale      # unscaled as it is loaded (GradScaler)
    if METHOD == "dog":
        x = _load(x_ptr, idx, mask, MASKED)
        x0 = _load(b_ptr, idx, mask, MASKED)
        d = g + wd * x                                    # coupled weight decay
        return d * d, (x - x0) * (x - x0), x0 * x0        # ||d||^2, ||x - x0||^2, ||x0||^2
    elif METHOD == "nsgdm":
        m = beta_t * _load(b_ptr, idx, mask, MASKED) + (1.0 - beta_t) * g  # m_t, stored later
        return m * m, 0.0 * g, 0.0 * g
    else:
        return g * g, 0.0 * g, 0.0 * g


@triton.jit(do_not_specialize=["chunk_size", "n_slots", "slot0"])
def _reduce_kernel(meta, chunks, like, partials, scalars, hparams, grad_scale, chunk_size, n_slots,
                   slot0, METHOD: tl.constexpr, AGNOSTIC: tl.constexpr, ALIGNED: tl.constexpr,
                   BLOCK: tl.constexpr):
    # Traffic: reads g (4N B for fp32); DoG also reads x and x0 (12N B); NSGD-M also reads m (8N B).
    # Writes one float per chunk and per sum. grad_scale: GradScaler's scale (1.0 without one).
    pid, x_ptr, g_ptr, b_ptr, start, end, lr_slot = _chunk(meta, chunks, like, chunk_size, ALIGNED)
    inv_scale = 1.0 / tl.load(grad_scale)
    wd = 0.0
    beta_t = 0.0
    if METHOD == "dog":
        wd = tl.load(hparams + 1)
    if METHOD == "nsgdm":
        beta_t = _nsgdm_beta(tl.load(scalars + 0), tl.load(hparams + 0), AGNOSTIC)
    acc0 = tl.zeros([BLOCK], tl.float32)
    acc1 = tl.zeros([BLOCK], tl.float32)
    acc2 = tl.zeros([BLOCK], tl.float32)
    n_full = (end - start) // BLOCK * BLOCK
    for off in range(0, n_full, BLOCK):
        idx, mask = _block_indices(start, off, end, BLOCK)
        a0, a1, a2 = _reduce_block(x_ptr, g_ptr, b_ptr, idx, mask, inv_scale, wd, beta_t, METHOD,
                                    False)
        acc0 += a0
        acc1 += a1
        acc2 += a2
    if n_full < end - start:
        idx, mask = _block_indices(start, n_full, end, BLOCK)
        a0, a1, a2 = _reduce_block(x_ptr, g_ptr, b_ptr, idx, mask, inv_scale, wd, beta_t, METHOD,
                                    True)
        acc0 += a0
        acc1 += a1
        acc2 += a2
    slot = slot0 + pid
    tl.store(partials + slot, tl.sum(acc0, axis=0))
    if METHOD == "dog":
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


@triton.jit(do_not_specialize=["n_slots"])
def _step_size_kernel(partials, n_slots, loss_ptr, found_inf, scalars, hparams, coefs,
                      METHOD: tl.constexpr, HAS_LOSS: tl.constexpr, TRACK_BEST: tl.constexpr,
                      AGNOSTIC: tl.constexpr, BLOCK: tl.constexpr):
    # Traffic: reads the partials (4 B per chunk and sum); a few scalars otherwise.
    s0 = _ordered_sum(partials, n_slots, BLOCK)                 # sum g^2 (DoG: sum d^2)
    step = tl.load(scalars + 0)
    ok = _is_finite(s0) & (tl.load(found_inf) == 0.0)         # GradScaler found an inf: skip
    loss = 0.0
    if HAS_LOSS:
        loss = tl.load(loss_ptr).to(tl.float32)
        ok = ok & _is_finite(loss)
    zero_grad = s0 <= TINY_GRAD_SQ_C
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
        G = tl.load(scalars + 4) + s0 + tl.where(step == 0.0, DOG_EPS_C, 0.0)
        eta = rbar / tl.sqrt(G)
        tl.store(scalars + 3, tl.where(ok, rbar, tl.load(scalars + 3)))
        tl.store(scalars + 4, tl.where(ok, G, tl.load(scalars + 4)))
    elif METHOD == "clipped_sgd":
        # kappa = min(1, c / (||g|| + 1e-6)); hparams = [c, momentum]; scalars[2:4] = norm, kappa
        norm = tl.sqrt(s0)
        eta = tl.minimum(tl.load(hparams + 0) / (norm + CLIP_EPS_C), 1.0)
        tl.store(scalars + 2, tl.where(ok, norm, tl.load(scalars + 2)))
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


TINY_GRAD_SQ_C = tl.constexpr(TINY_GRAD_SQ)
DOG_EPS_C = tl.constexpr(DOG_EPS)
CLIP_EPS_C = tl.constexpr(CLIP_EPS)


@triton.jit
def _update_block(x_ptr, g_ptr, b_ptr, idx, mask, inv_scale, lr, eta, aux, hp1,
                  METHOD: tl.constexpr, TRACK_BEST: tl.constexpr, MOMENTUM: tl.constexpr,
                  MASKED: tl.constexpr):
    """x <- x - lr * eta * direction for one block (and the state buffer where there is one).
    hp1 is DoG's weight decay or clipped SGD's momentum; aux is NSGD-M's beta_t or the
    best-iterate flag."""
    x = _load(x_ptr, idx, mask, MASKED)
    g = _load(g_ptr, idx, mask, MASKED) * inv_scale      # unscaled as it is loaded (GradScaler)
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
    else:
        if TRACK_BEST:
            if aux != 0.0:  # this step's loss is the best so far: keep x_t
                _store(b_ptr, idx, x, mask, MASKED)
        x_new = x - (lr * eta) * g
    _store(x_ptr, idx, x_new, mask, MASKED)


@triton.jit(do_not_specialize=["chunk_size"])
def _update_kernel(meta, chunks, like, coefs, lrs, hparams, grad_scale, chunk_size,
                   METHOD: tl.constexpr, TRACK_BEST: tl.constexpr, MOMENTUM: tl.constexpr,
                   ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    # Traffic (fp32): reads x, g, writes x: 12N B. Momentum methods also read and write m:
    # +8N B. Best tracking writes x_best (+4N B) on the steps that improve on the best loss.
    pid, x_ptr, g_ptr, b_ptr, start, end, lr_slot = _chunk(meta, chunks, like, chunk_size, ALIGNED)
    ok = tl.load(coefs + 0)
    if ok != 0.0:  # a skipped step leaves every tensor bitwise unchanged
        eta = tl.load(coefs + 1)
        aux = tl.load(coefs + 2)
        lr = tl.load(lrs + lr_slot)
        inv_scale = 1.0 / tl.load(grad_scale)
        hp1 = 0.0
        if METHOD == "dog" or METHOD == "clipped_sgd":
            hp1 = tl.load(hparams + 1)
        n_full = (end - start) // BLOCK * BLOCK
        for off in range(0, n_full, BLOCK):
            idx, mask = _block_indices(start, off, end, BLOCK)
            _update_block(x_ptr, g_ptr, b_ptr, idx, mask, inv_scale, lr, eta, aux, hp1, METHOD,
                          TRACK_BEST, MOMENTUM, False)
        if n_full < end - start:
            idx, mask = _block_indices(start, n_full, end, BLOCK)
            _update_block(x_ptr, g_ptr, b_ptr, idx, mask, inv_scale, lr, eta, aux, hp1, METHOD,
                          TRACK_BEST, MOMENTUM, True)


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------
def _launch_config(device: torch.device) -> dict:
    """Chunk and block sizes. On CPU (the Triton interpreter) small chunks keep tests quick; the
    GPU values are first guesses awaiting the benchmark (bench/NOTES.md)."""
    if device.type == "cuda":
        return dict(chunk=65536, block=2048, num_warps=8)
    return dict(chunk=4096, block=1024, num_warps=4)


def _to_device(values, dtype, device) -> torch.Tensor:
    """A host list as a device tensor. On CUDA the copy goes through pinned memory and does not
    block the host (torch's pinned-memory allocator keeps the buffer alive until it is done)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class _Group:
    """The device tables of one dtype group. `direct` lists (row, param index) of the tensors
    whose gradient pointer sits in the table (the others go through staging buffers)."""

    def __init__(self, dtype, meta, chunks, n_chunks, slot0, like, staged, direct):
        self.dtype, self.meta, self.chunks = dtype, meta, chunks
        self.n_chunks, self.slot0, self.like, self.staged = n_chunks, slot0, like, staged
        self.direct = direct
        self.direct_rows = _to_device([r for r, _ in direct], torch.int64, meta.device)
        self.aligned = False  # set by the plan: every pointer 16-byte aligned


class _Plan:
    """Everything a step needs that does not change while the pointers stay the same."""

    def __init__(self, method, params, grads, buf, lr_slots, n_lr_slots, hparams, device):
        cfg = _launch_config(device)
        assert cfg["chunk"] % cfg["block"] == 0, "chunks must start on block boundaries"
        self.cfg = cfg
        self.device = device
        self.n_sums = N_SUMS.get(method, 1)
        self.groups = []
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(params):
            if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise RuntimeError(
                    f"the fused path takes float32, bfloat16 and float16 tensors, not {p.dtype}")
            by_dtype.setdefault(p.dtype, []).append(i)
        slot0 = 0
        for dtype, idxs in by_dtype.items():
            rows, chunk_rows, staged, direct, like = [], [], [], [], None
            for i in idxs:
                if params[i].numel() == 0:
                    continue
                x, g, b = params[i], grads[i], (buf[i] if buf is not None else None)
                stage = [not t.is_contiguous() for t in (x, g, b) if t is not None]
                if any(stage):  # copy through contiguous buffers (rare: strided parameters)
                    sx = torch.empty(x.shape, dtype=x.dtype, device=device)
                    sg = torch.empty(x.shape, dtype=x.dtype, device=device)
                    sb = torch.empty(x.shape, dtype=x.dtype, device=device) if b is not None else None
                    staged.append((i, sx, sg, sb))
                    x, g, b = sx, sg, sb
                else:
                    direct.append((len(rows), i))
                like = x if like is None else like
                t = len(rows)
                rows.append([x.data_ptr(), g.data_ptr(), b.data_ptr() if b is not None else 0,
                             x.numel(), lr_slots[i]])
                for start in range(0, x.numel(), cfg["chunk"]):
                    chunk_rows.append([t, start])
            if not chunk_rows:
                continue
            meta = _to_device(rows, torch.int64, device)
            chunks = _to_device(chunk_rows, torch.int64, device)
            grp = _Group(dtype, meta, chunks, len(chunk_rows), slot0, like, staged, direct)
            grp.aligned = all(ptr % 16 == 0 for row in rows for ptr in row[:3])
            self.groups.append(grp)
            slot0 += len(chunk_rows)
        self.n_slots = max(slot0, 1)
        self.partials = torch.zeros(self.n_sums * self.n_slots, dtype=torch.float32, device=device)
        self.coefs = torch.zeros(3, dtype=torch.float32, device=device)
        # What the kernels read when no GradScaler hands over a scale and an inf flag.
        self.no_scale = torch.ones(1, dtype=torch.float32, device=device)
        self.no_inf = torch.zeros(1, dtype=torch.float32, device=device)
        self.hparams = _to_device(hparams, torch.float32, device)
        self.lrs = torch.zeros(n_lr_slots, dtype=torch.float32, device=device)
        self.lr_values: list = [None] * n_lr_slots


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
    return slots, first_of_slot


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


def polyak_step_(method: str, params, grads, buffers: dict, lrs, loss, scalars: torch.Tensor,
                 hparams: dict, cache: dict | None = None, reduce=None, grad_scale=None,
                 found_inf=None) -> None:
    """One fused step of `method` over flat lists, in place. `buffers` maps the method's one state
    buffer name (x_best, x0 or momentum) to its list; `scalars` is the packed fp32 scalar state;
    `reduce(loss, *totals)`, if given, combines the loss and the sums across ranks.
    `grad_scale` (a one-element device tensor, GradScaler's scale): the kernels divide every
    gradient by it as they load it. `found_inf` (likewise): non-zero skips the step."""
    if method not in METHODS:
        raise ValueError(f"unknown method: {method!r}")
    if scalars.dtype != torch.float32:
        raise RuntimeError("the fused path keeps its scalar state in float32")
    buf = next(iter(buffers.values())) if buffers else None
    device = scalars.device
    cache = {} if cache is None else cache
    lr_ids = tuple(map(id, lrs))
    if cache.get("lr_ids") != lr_ids:
        cache["lr_ids"], cache["lr_slots"] = lr_ids, _lr_slots(lrs)
    lr_slots, first_of_slot = cache["lr_slots"]
    lr_values = [lrs[i] for i in first_of_slot]
    hp = _hparam_values(method, hparams)
    # The tables depend on the parameters and state buffers (stable for a whole run) and on the
    # gradient pointers, which change when zero_grad(set_to_none=True) frees the grads and the
    # allocator hands back other addresses: then only the gradient column is rewritten.
    data_ptr = torch.Tensor.data_ptr
    key = (method, tuple(hp), tuple(lr_slots), tuple(map(data_ptr, params)),
           tuple(map(torch.Tensor.numel, params)), tuple(map(data_ptr, buf)) if buf else None)
    grad_key = tuple(map(data_ptr, grads))
    plan = cache.get("plan")
    if plan is None or cache.get("key") != key:
        plan = _Plan(method, params, grads, buf, lr_slots, len(lr_values), hp, device)
        cache["plan"], cache["key"], cache["grad_key"] = plan, key, grad_key
    elif cache.get("grad_key") != grad_key:
        for grp in plan.groups:
            if grp.direct:
                new = [grads[i].data_ptr() for _, i in grp.direct]
                grp.meta[:, 1].index_copy_(0, grp.direct_rows, _to_device(new, torch.int64, device))
                grp.aligned = grp.aligned and all(ptr % 16 == 0 for ptr in new)
        cache["grad_key"] = grad_key
    _refresh_lrs(plan, lr_values)

    for grp in plan.groups:
        for i, sx, sg, sb in grp.staged:
            sx.copy_(params[i])
            sg.copy_(grads[i])
            if sb is not None:
                sb.copy_(buf[i])

    track_best = bool(hparams.get("track_best", False))
    momentum = method == "nsgdm" or (method == "clipped_sgd" and hparams["momentum"] > 0)
    agnostic = hparams.get("schedule") == "agnostic"
    cfg = plan.cfg
    scale_arg = plan.no_scale if grad_scale is None else grad_scale.to(device, torch.float32)
    inf_arg = plan.no_inf if found_inf is None else found_inf.to(device, torch.float32)
    for grp in plan.groups:
        _reduce_kernel[(grp.n_chunks,)](
            grp.meta, grp.chunks, grp.like, plan.partials, scalars, plan.hparams, scale_arg,
            cfg["chunk"],
            plan.n_slots, grp.slot0, METHOD=method, AGNOSTIC=agnostic, ALIGNED=grp.aligned,
            BLOCK=cfg["block"], num_warps=cfg["num_warps"])

    partials, n_slots = plan.partials, plan.n_slots
    if reduce is not None:  # distributed: the totals of this rank, then one all-reduce
        totals = plan.partials.view(plan.n_sums, plan.n_slots).sum(dim=1)
        loss, *totals = reduce(loss, *totals.unbind())
        partials, n_slots = torch.stack(totals).to(torch.float32).contiguous(), 1
    has_loss = loss is not None
    loss_arg = loss.to(torch.float32) if has_loss else scalars
    _step_size_kernel[(1,)](
        partials, n_slots, loss_arg, inf_arg, scalars, plan.hparams, plan.coefs, METHOD=method,
        HAS_LOSS=has_loss, TRACK_BEST=track_best, AGNOSTIC=agnostic, BLOCK=1024)

    for grp in plan.groups:
        _update_kernel[(grp.n_chunks,)](
            grp.meta, grp.chunks, grp.like, plan.coefs, plan.lrs, plan.hparams, scale_arg,
            cfg["chunk"],
            METHOD=method, TRACK_BEST=track_best, MOMENTUM=momentum, ALIGNED=grp.aligned,
            BLOCK=cfg["block"], num_warps=cfg["num_warps"])

    for grp in plan.groups:
        for i, sx, sg, sb in grp.staged:
            params[i].copy_(sx)
            if sb is not None:
                buf[i].copy_(sb)
