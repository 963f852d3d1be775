"""The host pass in Python: the specification of host_pass.cpp, and what runs where the C++
module cannot be built (no C++ compiler). Same arguments, same results; tests/test_host_pass.py
holds the two to it."""

from __future__ import annotations

import torch

#: Values per tensor in the table of check_tensors (see there).
ROW = 6
#: State buffers per tensor the table has room for (MoMo-Adam has two).
MAX_BUFFERS = 2
_strided = torch.strided


def grads_of_groups(group_params, expected: tuple, counts: tuple, whole: bool = False):
    """The .grad of every parameter that has one, in param-group order, if those parameters are
    exactly `expected` (compared by identity) and group k holds counts[k] of them; else None.
    With `whole`, every parameter is listed (`expected` holds them all) and one without a
    gradient gives None, but at least one must have a gradient.

    This is what a step reads of every tensor when nothing changed: the caller keeps `expected`
    and `counts` from the last step and takes the slow path (which sees what changed) on None."""
    if len(group_params) != len(counts):
        return None
    out = []
    any_grad = False
    for params, count in zip(group_params, counts):
        start = len(out)
        for p in params:
            try:
                g = p.grad
            except AttributeError:  # not a tensor: the caller's slow path says what is wrong
                return None
            if g is None and not whole:
                continue
            if len(out) >= len(expected) or expected[len(out)] is not p:
                return None
            any_grad = any_grad or g is not None
            out.append(g)
        if len(out) - start != count:
            return None
    return out if len(out) == len(expected) and any_grad else None


def check_tensors(params, grads, buffers, table) -> int:
    """Whether the tensors are where `table` says, the fused launcher's check at every step.

    `buffers` is a tuple of at most MAX_BUFFERS sequences, each holding one state buffer per
    tensor. `table` is a writable int64 buffer of ROW values per tensor: the addresses of the
    parameter, its gradient (0: no gradient) and its state buffers (0 where there is none), the
    element count, and 1 for a tensor the launcher copies through staging buffers (then only
    counts, dtypes and layouts matter, and the gradient column holds 1 for a gradient, 0 for
    none). A gradient may be None (a parameter that takes part in the step without being
    stepped).

    Returns 0 when every tensor is as the table says; 1 when only the gradient column changed
    (new addresses, a gradient that appeared or went: the table then holds the new values); 2
    when anything else changed: a parameter or buffer moved or was resized (``p.data = other``,
    ``model.to()``, ``swap_tensors``, even while something keeps the old storage alive), a
    gradient is sparse, of another dtype or size, or not contiguous. Tensors are looked at,
    never trusted: nothing is cached across steps but the table."""
    n = len(params)
    rows = memoryview(table).cast("B").cast("q")
    if rows.readonly:
        raise TypeError("check_tensors: the table must be a writable buffer")
    if (len(grads) != n or len(buffers) > MAX_BUFFERS or any(len(b) != n for b in buffers)
            or len(rows) != n * ROW):
        return 2
    try:
        return _check_rows(params, grads, buffers, rows, n)
    except (RuntimeError, AttributeError):  # a tensor without storage, or not a tensor at all
        return 2


def _check_rows(params, grads, buffers, rows, n) -> int:
    values = rows.tolist()  # (reading the buffer once is cheaper than a slice per tensor)
    status = 0
    for i, x, g in zip(range(0, n * ROW, ROW), params, grads):
        x_address, g_address, b0_address, b1_address, numel, staged = values[i:i + ROW]
        dtype = x.dtype
        if x.numel() != numel:
            return 2
        if g is not None and (g.layout is not _strided or g.dtype is not dtype
                              or g.numel() != numel):
            return 2
        for k, bufs in enumerate(buffers):
            b = bufs[i // ROW]
            if (b.layout is not _strided or b.dtype is not dtype or b.numel() != numel
                    or (not staged and (b.data_ptr() != (b0_address, b1_address)[k]
                                        or not b.is_contiguous()))):
                return 2
        if staged:
            present = int(g is not None)
            if present != g_address:
                rows[i + 1] = present
                status = 1
            continue
        if x.data_ptr() != x_address or not x.is_contiguous() or (
                g is not None and not g.is_contiguous()):
            return 2
        address = 0 if g is None else g.data_ptr()
        if address != g_address:
            rows[i + 1] = address
            status = 1
    return status


def specialisation(values: tuple, flags: bytes) -> tuple:
    """What Triton specialises a compiled kernel variant on, for each launch argument: the key
    of the launcher's direct launches (polyak_fused._kernels.polyak_step._variant_key). `flags[i]`: bit 0
    set when argument i is do_not_specialize, bit 1 when do_not_specialize_on_alignment
    (triton.runtime.jit: a tensor is specialised on its dtype and, unless told not to, on a
    16-byte-aligned address; an int on its width and, unless do_not_specialize, on being 1 or a
    multiple of 16). One int per argument:
      tensor  4 * (scalar type + 1), + 1 if aligned to 16 and alignment is specialised, + 2 if
              alignment is not specialised (torch's ScalarType numbering);
      bool    1000 + value (0 when do_not_specialize);
      int     2000 + 8 * width (0: 32-bit, 1: signed 64-bit, 2: unsigned 64-bit), + 1 if it is
              1, + 2 if a multiple of 16, + 4 when do_not_specialize (then no value bits);
      other   3000 (by type only)."""
    if len(flags) < len(values):
        raise ValueError("specialisation: fewer flags than arguments")
    out = []
    for a, f in zip(values, flags):
        no_spec, no_align = f & 1, f & 2
        if isinstance(a, torch.Tensor):
            code = 4 * (_SCALAR_TYPE[a.dtype] + 1)
            if no_spec or no_align:
                code += 2
            elif a.data_ptr() % 16 == 0:
                code += 1
        elif isinstance(a, bool):
            code = 1000 + (0 if no_spec else int(a))
        elif isinstance(a, int):
            width = 2 if a >= 2**63 else (1 if a < -2**63 or not -2**31 <= a < 2**31 else 0)
            code = 2000 + 8 * width
            if no_spec:
                code += 4
            elif -2**63 <= a < 2**63:
                code += (a == 1) + 2 * (a % 16 == 0)
        else:
            code = 3000
        out.append(code)
    return tuple(out)


#: torch's ScalarType numbering (c10/core/ScalarType.h), for the dtypes a kernel argument has.
_SCALAR_TYPE = {torch.uint8: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.int64: 4,
                torch.float16: 5, torch.float32: 6, torch.float64: 7, torch.complex32: 8,
                torch.complex64: 9, torch.complex128: 10, torch.bool: 11, torch.bfloat16: 15}
