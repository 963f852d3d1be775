"""The foreach path's host numbers (polyak_fused/_host_scalars.py): every operation the step rules
use gives what torch gives on 0-d float64 tensors, IEEE cases included; the saved state's slots
write through, rounded to the scalars' dtype; scalars they cannot hold fall back to tensors."""

import math
import operator
import random

import pytest
import torch

import polyak_fused as pf
from polyak_fused import _foreach as F
from polyak_fused import _host_scalars as H

SPECIAL = [0.0, -0.0, 1.0, -2.5, 1e-30, 3.0e38, 1e300, math.inf, -math.inf, math.nan]


def values():
    rng = random.Random(1234)
    return SPECIAL + [rng.uniform(-10, 10) for _ in range(6)] + [rng.lognormvariate(0, 20)
                                                                 for _ in range(4)]


def same(got, want: torch.Tensor, what: str, ulps: int = 0):
    """got (a HostScalar) equals the 0-d tensor want: bitwise for floats (NaN as NaN, the sign
    of zero and of inf), or as a bool. `ulps`: a finite result may be that many units in the
    last place off (libm's expm1 and pow against torch's own)."""
    assert isinstance(got, H.HostScalar), (what, got)
    if want.dtype == torch.bool:
        assert bool(got) == bool(want), what
        return
    w, g = float(want), float(got)
    if math.isnan(w):
        assert math.isnan(g), f"{what}: {g} (torch: nan)"
    elif ulps and math.isfinite(w):
        assert abs(g - w) <= ulps * math.ulp(w), f"{what}: {g} (torch: {w})"
    else:
        assert g == w and math.copysign(1, g) == math.copysign(1, w), f"{what}: {g} (torch: {w})"


def t(x):
    return torch.tensor(x, dtype=torch.float64)


BINARY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
          ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
          "==": operator.eq}


@pytest.mark.parametrize("op", list(BINARY))
def test_binary_operators_as_torch(op):
    f = BINARY[op]
    for a in values():
        for b in values():
            want = f(t(a), t(b))
            what = f"{a!r} {op} {b!r}"
            same(f(H.HostScalar(a), H.HostScalar(b)), want, what)
            same(f(H.HostScalar(a), b), want, what + " (number on the right)")
            same(f(a, H.HostScalar(b)), want, what + " (number on the left)")
            same(f(t(a), H.HostScalar(b)), want, what + " (tensor on the left)")


def test_functions_and_methods_as_torch():
    for a in values():
        x, h = t(a), H.HostScalar(a)
        same(-h, -x, f"-{a!r}")
        same(torch.sqrt(h), torch.sqrt(x), f"sqrt({a!r})")
        same(h.sqrt(), x.sqrt(), f"{a!r}.sqrt()")
        same(h.rsqrt(), x.rsqrt(), f"{a!r}.rsqrt()")
        same(h.square(), x.square(), f"{a!r}.square()")
        same(torch.expm1(h), torch.expm1(x), f"expm1({a!r})", ulps=1)
        for e in (-0.75, 0.5, 2.0, -1.0):
            same(h.pow(e), x.pow(e), f"{a!r}.pow({e})", ulps=1)
        for lo, hi in ((0, None), (None, 1.0), (-1.0, 2.0)):
            same(h.clamp(min=lo, max=hi), x.clamp(min=lo, max=hi), f"{a!r}.clamp({lo}, {hi})")
        same(torch.ones_like(h), torch.ones_like(x), "ones_like")
        same(torch.full_like(h, 0.25), torch.full_like(x, 0.25), "full_like")
        for b in values():
            y, g = t(b), H.HostScalar(b)
            same(torch.maximum(h, g), torch.maximum(x, y), f"maximum({a!r}, {b!r})")
            same(torch.minimum(h, g), torch.minimum(x, y), f"minimum({a!r}, {b!r})")
            same(torch.maximum(x, g), torch.maximum(x, y), f"maximum(tensor {a!r}, {b!r})")
            for c in (True, False):
                same(torch.where(H.HostScalar(c), h, b), torch.where(torch.tensor(c), x, y),
                     f"where({c}, {a!r}, {b!r})")
                same(torch.where(H.HostScalar(c), a, g), torch.where(torch.tensor(c), x, y),
                     f"where({c}, number {a!r}, {b!r})")


def test_conditions_combine_as_bools():
    for a in (True, False):
        for b in (True, False):
            same(H.HostScalar(a) & H.HostScalar(b), torch.tensor(a) & torch.tensor(b), "&")
            same(a & H.HostScalar(b), torch.tensor(a) & torch.tensor(b), "bool & host")
        same(~H.HostScalar(a), ~torch.tensor(a), "~")


def test_an_operation_without_a_host_form_is_refused_by_name():
    with pytest.raises(TypeError, match="exp"):
        torch.exp(H.HostScalar(1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_slots_read_once_and_write_through_rounded(dtype):
    scalars = torch.tensor([3.0, 1.0, 0.1, math.inf], dtype=dtype)
    s = H.slots(scalars, ("step", "skipped", "eta", "bound"))
    assert [s[k].value for k in ("step", "skipped", "eta", "bound")] == scalars.tolist()
    s["step"].add_(1)
    s["eta"].copy_(H.HostScalar(1 / 3))
    s["bound"].copy_(torch.tensor(2.5, dtype=torch.float64))
    want = torch.tensor([4.0, 1.0, 1 / 3, 2.5], dtype=dtype)   # 1/3 rounded to dtype
    assert torch.equal(scalars, want)
    assert s["eta"].value == want[2].item()   # the slot holds what was stored
    if dtype == torch.float32:
        s["bound"].copy_(H.HostScalar(1e39))  # past float32: inf, as torch's copy_
        assert scalars[3].item() == math.inf


def test_a_value_that_is_not_a_slot_cannot_be_written():
    with pytest.raises(RuntimeError, match="not a slot"):
        H.HostScalar(1.0).copy_(2.0)


def test_read_rounds_to_the_dtype_so_float32_overflow_is_inf():
    assert H.read(1e39, torch.float32).value == math.inf
    assert H.read(1e39, torch.float64).value == 1e39
    assert H.read(torch.tensor(0.1, dtype=torch.float64), torch.float32).value == \
        torch.tensor(0.1, dtype=torch.float32).item()


@pytest.mark.parametrize("make", [
    lambda: torch.zeros(8)[::2],                                   # not contiguous
    lambda: torch.zeros(4, dtype=torch.bfloat16),                  # no ctypes type
    lambda: torch.zeros(4, requires_grad=True),
])
def test_scalars_slots_cannot_hold_stay_tensors(make):
    scalars = make()
    assert not H.can_hold(scalars)
    s = F.scalar_slots(scalars, ("a", "b", "c", "d"))
    assert all(torch.is_tensor(v) for v in s.values())
    loss, total = F.across_ranks(scalars, torch.tensor(1.0), torch.tensor(2.0))
    assert torch.is_tensor(loss) and torch.is_tensor(total)


def test_packed_scalars_of_every_optimizer_are_held():
    for opt in (pf.InexactPolyak([torch.nn.Parameter(torch.ones(3))], total_steps=5),
                pf.MoMoAdam([torch.nn.Parameter(torch.ones(3, dtype=torch.float64))])):
        assert H.can_hold(opt._packed_scalars)


def test_a_step_with_scalars_held_as_tensors_matches_one_in_host_numbers():
    """The functional form with a strided scalars tensor (the rule in 0-d tensors) gives the
    same step as with the packed one (the rule in host numbers), to float32 rounding."""
    torch.manual_seed(7)
    x0 = [torch.randn(5, 3), torch.randn(7)]
    grads = [torch.randn_like(x) for x in x0]
    results = []
    for strided in (False, True):
        params = [x.clone() for x in x0]
        state = pf.DoG.functional_state(params)
        scalars = state["scalars"]
        if strided:
            wide = torch.zeros(2 * scalars.numel())
            wide[::2] = scalars
            scalars = wide[::2]
            assert not H.can_hold(scalars)
        for _ in range(3):
            pf.dog(params, grads, state["x0"], scalars, loss=torch.tensor(1.5))
        results.append((params, scalars.clone()))
    (p_host, s_host), (p_tensor, s_tensor) = results
    for a, b in zip(p_host, p_tensor):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s_host, s_tensor, rtol=1e-6, atol=0)
