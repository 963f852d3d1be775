"""The step's scalars as Python numbers, for the foreach path on the host (CPU).

A step's rule (the step size, its guards, the new global state) is a dozen operations on 0-d
values. As 0-d torch tensors each is a dispatched op, and right after a pass over the tensors,
whose data has pushed torch's code out of the caches, the rule of DoG costs about 260 us; in
Python numbers, 120 (bench/NOTES.md, "Fifth run"). So on the host the rule runs on `HostScalar`s,
Python numbers that take the operations the rules are written with (`torch.where`,
`torch.maximum`, `torch.sqrt`, `.clamp`, arithmetic and comparisons). The rule is the same
function on every path, written once beside the method's reference, in torch's words.

  * Semantics are IEEE's, as on tensors: x / 0 is +-inf (or NaN), sqrt of a negative number and
    NaN inputs give NaN, NaN propagates through maximum, minimum and clamp.
  * Precision: the inputs (the sums, the loss, the saved state) are rounded to the scalars'
    dtype as they are read, so a sum that overflows float32 is inf, and the step is skipped, as
    in the reference. The rule then runs in double; what it stores is rounded to the dtype.
  * The saved state: `slots` reads the packed scalars tensor once, and each slot's ``copy_`` /
    ``add_`` (what E.write_if and E.count_step call) writes its number back into the tensor's
    memory at once, through a ctypes view of it: no torch op.
"""

from __future__ import annotations

import ctypes
import math

import torch

#: The ctypes element type of each dtype the packed scalars may have.
_CTYPES = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}


def _rounded(value: float, dtype: torch.dtype) -> float:
    """value rounded to `dtype` (float32 or float64), overflow to +-inf."""
    return ctypes.c_float(value).value if dtype == torch.float32 else float(value)


def _number(x):
    """The Python number of a HostScalar, a 0-d CPU tensor or a number."""
    if isinstance(x, HostScalar):
        return x.value
    if isinstance(x, torch.Tensor):
        return x.item()
    return x


def _divide(a, b) -> float:
    try:
        return a / b
    except ZeroDivisionError:              # IEEE: +-inf, or NaN for 0 / 0 and NaN / 0
        if a != a or a == 0:
            return math.nan
        return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _sqrt(a) -> float:
    return math.sqrt(a) if a >= 0 else math.nan   # (NaN >= 0 is False: NaN)


def _pow(a, b) -> float:
    if b == 0.5:                           # as torch: x ** 0.5 is sqrt(x) (sqrt(-inf) is NaN)
        return _sqrt(a)
    try:
        return math.pow(a, b)
    except ValueError:                     # 0 ** negative: inf; negative ** fraction: NaN
        if a != 0:
            return math.nan
        odd = b == int(b) and int(b) % 2 == 1
        return math.copysign(math.inf, a) if odd else math.inf
    except OverflowError:
        return math.inf


def _expm1(a) -> float:
    try:
        return math.expm1(a)
    except OverflowError:
        return math.inf


def _extreme(a, b, a_wins) -> HostScalar:
    a, b = _number(a), _number(b)
    if a != a or b != b:
        return HostScalar(math.nan)        # torch.maximum / minimum propagate NaN
    return HostScalar(a if a_wins(a, b) else b)


class HostScalar:
    """A 0-d value of the step as a Python number (a float, or a bool for a condition). A slot of
    the saved state (from `slots`) also writes itself back: `copy_`, `add_`."""

    __slots__ = ("value", "_memory", "_index", "_dtype")
    device = torch.device("cpu")

    def __init__(self, value, memory=None, index: int = 0, dtype=None):
        self.value, self._memory, self._index, self._dtype = value, memory, index, dtype

    def __repr__(self):
        return f"HostScalar({self.value!r})"

    def __float__(self):
        return float(self.value)

    def __bool__(self):
        return bool(self.value)

    def item(self):
        return self.value

    # arithmetic and comparisons, as on 0-d tensors
    def __add__(self, other):
        return HostScalar(self.value + _number(other))

    __radd__ = __add__

    def __sub__(self, other):
        return HostScalar(self.value - _number(other))

    def __rsub__(self, other):
        return HostScalar(_number(other) - self.value)

    def __mul__(self, other):
        return HostScalar(self.value * _number(other))

    __rmul__ = __mul__

    def __truediv__(self, other):
        return HostScalar(_divide(self.value, _number(other)))

    def __rtruediv__(self, other):
        return HostScalar(_divide(_number(other), self.value))

    def __neg__(self):
        return HostScalar(-self.value)

    def __gt__(self, other):
        return HostScalar(self.value > _number(other))

    def __ge__(self, other):
        return HostScalar(self.value >= _number(other))

    def __lt__(self, other):
        return HostScalar(self.value < _number(other))

    def __le__(self, other):
        return HostScalar(self.value <= _number(other))

    def __eq__(self, other):
        return HostScalar(self.value == _number(other))

    def __and__(self, other):
        return HostScalar(bool(self.value) and bool(_number(other)))

    __rand__ = __and__

    def __invert__(self):
        return HostScalar(not self.value)

    __hash__ = None                        # (== is element-wise, as on tensors)

    def clamp(self, min=None, max=None):  # noqa: A002 - torch's keyword names
        v = self.value
        if v != v:
            return HostScalar(v)
        if min is not None and v < min:
            v = float(min)
        if max is not None and v > max:
            v = float(max)
        return HostScalar(v)

    def sqrt(self):
        return HostScalar(_sqrt(self.value))

    def rsqrt(self):
        return HostScalar(_divide(1.0, _sqrt(self.value)))

    def pow(self, exponent):
        return HostScalar(_pow(self.value, _number(exponent)))

    def square(self):
        return HostScalar(self.value * self.value)

    # the saved state
    def copy_(self, value):
        """self <- value, written into the packed scalars (a slot; rounded to their dtype)."""
        if self._memory is None:
            raise RuntimeError("HostScalar.copy_: this value is not a slot of the saved state")
        self.value = _rounded(_number(value), self._dtype)
        self._memory[self._index] = self.value
        return self

    def add_(self, value):
        return self.copy_(self.value + _number(value))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = _TORCH_FUNCTIONS.get(func)
        if impl is not None:
            return impl(*args, **kwargs)
        name = getattr(func, "__name__", "")
        method = getattr(cls, name, None)   # a tensor's operator with a HostScalar operand
        if method is None or not name.startswith("__"):
            raise TypeError(f"{name or func} has no host form for HostScalar "
                            f"(polyak_fused/_host_scalars.py)")
        return method(*(HostScalar(_number(a)) if isinstance(a, torch.Tensor) else a
                        for a in args), **kwargs)


_TORCH_FUNCTIONS = {
    torch.where: lambda cond, a, b: HostScalar(_number(a) if _number(cond) else _number(b)),
    torch.maximum: lambda a, b: _extreme(a, b, lambda x, y: x >= y),
    torch.minimum: lambda a, b: _extreme(a, b, lambda x, y: x <= y),
    torch.sqrt: lambda a: HostScalar(_sqrt(_number(a))),
    torch.expm1: lambda a: HostScalar(_expm1(_number(a))),
    torch.ones_like: lambda a: HostScalar(1.0),
    torch.full_like: lambda a, value: HostScalar(float(value)),
}


def can_hold(scalars: torch.Tensor) -> bool:
    """Whether `slots` can write into this packed scalars tensor (dense, CPU, float32/64)."""
    return (scalars.device.type == "cpu" and scalars.dtype in _CTYPES
            and scalars.is_contiguous() and not scalars.requires_grad)


def slots(scalars: torch.Tensor, names: tuple) -> dict:
    """The packed scalars as a dict name -> HostScalar, each writing back into `scalars`."""
    memory = (_CTYPES[scalars.dtype] * scalars.numel()).from_address(scalars.data_ptr())
    return {name: HostScalar(memory[i], memory, i, scalars.dtype)
            for i, name in enumerate(names)}


def read(value, dtype: torch.dtype) -> HostScalar:
    """A sum or the loss (a 0-d CPU tensor or a number) as a HostScalar rounded to `dtype`."""
    return HostScalar(_rounded(float(_number(value)), dtype))
