"""The compiled CPU loops (polyak_fused/_cpu_loops/cpu_loops.cpp), one pass at a time.

Each pass is checked against its expression (the comment above it in cpu_loops.cpp) evaluated
in float64 on the same random inputs, in every dtype, on tensors of more than one chunk (2^16
elements) and a transposed one; plus what the file promises besides the values: the sums do not
depend on the thread count, written tensors (and only they) get a new version, the lists the
loops cannot take are refused with the reason, and the build falls back. The methods that call
these passes are tested end to end in test_foreach.py (its "host" form).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from polyak_fused import _cpp_build, _cpu_loops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
          torch.float16: "float16"}
#: (rtol, atol) of one rounding to the dtype after float32 (float64) math, a few units.
TOL = {torch.float32: (2e-6, 1e-7), torch.float64: (1e-14, 1e-15),
       torch.bfloat16: (1.6e-2, 1e-3), torch.float16: (2e-3, 1e-4)}
#: Tolerance of a sum of ~10^5 terms computed in float32 (float64), relative to the sum of
#: the terms' magnitudes (an inner product of random vectors cancels).
SUM_RTOL = {torch.float32: 2e-6, torch.float64: 1e-14, torch.bfloat16: 2e-6,
            torch.float16: 2e-6}


class Wrapper(torch.Tensor):
    """A tensor subclass without storage of its own (as DTensor or a fake tensor)."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype,
                                                   device=inner.device)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(func)


@pytest.fixture(scope="module")
def loops():
    module = _cpu_loops.module()
    assert module is not None, "the compiled CPU loops did not build"
    return module


def tensors(dtype, gen, positive=False):
    """One list of a step: more than one chunk, a transposed matrix, one element, an empty one."""
    out = []
    for shape in [(70001,), (37, 11), (1,), (0,), (300,)]:
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        t = t.abs() + 0.1 if positive else t
        out.append(t.to(dtype))
    out[1] = out[1].t().contiguous().t()          # a transposed view: dense, not contiguous
    assert not out[1].is_contiguous()
    return out


def up(ts):
    return [None if t is None else t.double().clone() for t in ts]


def total(parts):
    """(the sum of the terms in float64, the sum of their magnitudes)"""
    parts = list(parts)
    return sum(float(p.sum()) for p in parts), sum(float(p.abs().sum()) for p in parts)


def assert_sums(got, expected, dtype):
    assert len(got) == len(expected)
    for g, (e, magnitude) in zip(got, expected):
        assert abs(g - e) <= SUM_RTOL[dtype] * magnitude, (got, expected)


def assert_tensors(got, expected, dtype, what):
    rtol, atol = TOL[dtype]
    for i, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g.double(), e.to(g.dtype).double(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what}[{i}]: {m}")


def coefs(gen, n):
    return [float(c) for c in torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES.values()))
def test_sum_sq(loops, dtype):
    gen = torch.Generator().manual_seed(1)
    ts = tensors(dtype, gen)
    assert_sums([loops.sum_sq(ts)], [total(t * t for t in up(ts))], dtype)


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES.values()))
def test_dog_sums(loops, dtype, weight_decay):
    gen = torch.Generator().manual_seed(2)
    xs, x0s, gs = (tensors(dtype, gen) for _ in range(3))
    gs[2] = None                                   # a parameter without gradient
    got = loops.dog_sums(xs, x0s, gs, 0.25, weight_decay)
    x, x0, g = up(xs), up(x0s), up(gs)
    expected = [total((a - b) ** 2 for a, b in zip(x, x0)), total(b * b for b in x0),
                total((0.25 * c + weight_decay * a) ** 2 for a, c in zip(x, g) if c is not None)]
    assert_sums(got, expected, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES.values()))
def test_axpy(loops, dtype):
    gen = torch.Generator().manual_seed(3)
    xs, ds = tensors(dtype, gen), tensors(dtype, gen)
    a, pre = coefs(gen, len(xs)), [1 + c / 10 for c in coefs(gen, len(xs))]
    expected = [p * x + c * d for x, d, c, p in zip(up(xs), up(ds), a, pre)]
    loops.axpy(xs, ds, a, pre)
    assert_tensors(xs, expected, dtype, "x")


@pytest.mark.parametrize("seed", [False, True])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES.values()))
def test_momentum_sums_and_update(loops, dtype, seed):
    gen = torch.Generator().manual_seed(4)
    xs, ms, gs = (tensors(dtype, gen) for _ in range(3))
    b, w, g_scale = 0.8, 0.3, 0.5
    x, m, g = up(xs), up(ms), up(gs)
    g1 = [g_scale * t for t in g]
    m1 = [b * (c if seed else a) + w * c for a, c in zip(m, g1)]
    expected = [total(c * t for c, t in zip(g1, x)), total(a * t for a, t in zip(m1, x)),
                total(a * a for a in m1)]
    assert_sums(loops.momentum_sums(xs, ms, gs, b, w, g_scale, seed), expected, dtype)
    without_x = loops.momentum_sums(None, ms, gs, b, w, g_scale, seed)
    assert without_x[:2] == (0.0, 0.0)      # (x not read)
    assert_sums(without_x[2:], expected[2:], dtype)
    a, div = coefs(gen, len(xs)), [1 + abs(c) for c in coefs(gen, len(xs))]
    div[0] = 1.0                                   # (the loop without the division)
    loops.momentum_update(xs, ms, gs, b, w, g_scale, seed, a, div)
    assert_tensors(ms, m1, dtype, "m")
    assert_tensors(xs, [(t + c * n) / q for t, n, c, q in zip(x, m1, a, div)], dtype, "x")


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES.values()))
def test_adam_sums_and_update(loops, dtype):
    gen = torch.Generator().manual_seed(5)
    xs, ds, gs = (tensors(dtype, gen) for _ in range(3))
    vs = tensors(dtype, gen, positive=True)
    b1, b2, g_scale, bias2, eps = 0.9, 0.99, 0.5, 0.3, 1e-3
    x, d, v, g = up(xs), up(ds), up(vs), up(gs)
    g1 = [g_scale * t for t in g]
    d1 = [a + (1 - b1) * (c - a) for a, c in zip(d, g1)]
    v1 = [b2 * a + (1 - b2) * c * c for a, c in zip(v, g1)]
    D = [(a / bias2).sqrt() + eps for a in v1]
    expected = [total(c * t for c, t in zip(g1, x)), total(a * t for a, t in zip(d1, x)),
                total(a * a / q for a, q in zip(d1, D))]
    assert_sums(loops.adam_sums(xs, ds, vs, gs, b1, b2, g_scale, bias2, eps), expected, dtype)
    a, pre = coefs(gen, len(xs)), [1 - abs(c) / 10 for c in coefs(gen, len(xs))]
    div = [1 + abs(c) for c in coefs(gen, len(xs))]
    loops.adam_update(xs, ds, vs, gs, b1, b2, g_scale, bias2, eps, a, pre, div)
    assert_tensors(ds, d1, dtype, "d")
    assert_tensors(vs, v1, dtype, "v")
    assert_tensors(xs, [(p * t + c * n / q) / r for t, n, q, c, p, r
                        in zip(x, d1, D, a, pre, div)], dtype, "x")


def test_the_sums_do_not_depend_on_the_thread_count(loops):
    gen = torch.Generator().manual_seed(6)
    xs, ms, gs = (tensors(torch.float32, gen) + [torch.randn(300000, generator=gen)]
                  for _ in range(3))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append((loops.sum_sq(gs), loops.momentum_sums(xs, ms, gs, 0.9, 0.1, 1.0,
                                                                    False)))
    finally:
        torch.set_num_threads(threads)
    assert results[0] == results[1] == results[2]


def test_written_tensors_get_a_new_version(loops):
    gen = torch.Generator().manual_seed(7)
    xs, ds, vs, gs = (tensors(torch.float32, gen, positive=True) for _ in range(4))
    before = [[t._version for t in ts] for ts in (xs, ds, vs, gs)]
    loops.adam_sums(xs, ds, vs, gs, 0.9, 0.99, 1.0, 1.0, 1e-8)
    assert [[t._version for t in ts] for ts in (xs, ds, vs, gs)] == before
    loops.adam_update(xs, ds, vs, gs, 0.9, 0.99, 1.0, 1.0, 1e-8, *[[1.0] * len(xs)] * 3)
    after = [[t._version for t in ts] for ts in (xs, ds, vs, gs)]
    assert all(a > b for ts_a, ts_b in zip(after[:3], before[:3]) for a, b in zip(ts_a, ts_b))
    assert after[3] == before[3]


def test_the_loops_refuse_what_they_cannot_take(loops):
    """The lists the loops do not take are named with the reason; for_tensors says None."""
    x = torch.randn(6, 4)
    assert loops.refusal([x], [torch.randn(6, 4)]) is None
    assert loops.refusal([x], [None]) is None
    assert loops.refusal([x.t()], [torch.randn(6, 4).t()]) is None       # same strides: dense
    for other, why in [(torch.randn(4, 6), "shape"), (torch.randn(6, 4).double(), "dtype"),
                       (torch.randn(4, 6).t(), "strides")]:
        assert "differs in dtype, shape or strides" in loops.refusal([x], [other]), why
    gapped = torch.randn(6, 8)[:, ::2]
    assert "not a dense CPU tensor" in loops.refusal([gapped])
    assert "has dtype Int" in loops.refusal([torch.ones(3, dtype=torch.int32)])
    assert "has 2 tensors" in loops.refusal([x], [x, x])
    assert "holds None" in loops.refusal([None])
    assert "not a dense CPU tensor" in loops.refusal([torch.empty(6, 4, device="meta")])
    assert "subclass with __torch_dispatch__" in loops.refusal([Wrapper(x)])
    assert _cpu_loops.for_tensors([gapped]) is None
    assert _cpu_loops.for_tensors([x]) is loops
    with pytest.raises(ValueError, match="not a dense CPU tensor"):
        loops.sum_sq([gapped])
    with pytest.raises(ValueError, match="a has 1 values for 2 tensors"):
        loops.axpy([x, x], [x, x], [1.0], [1.0, 1.0])


# ---- the build ---------------------------------------------------------------------------------
def _run(env_extra: dict, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)


def test_a_failed_build_falls_back_to_the_torch_ops_and_says_why(tmp_path):
    code = ("import warnings; warnings.simplefilter('always'); "
            "from polyak_fused import _cpu_loops; print(_cpu_loops.module())")
    done = _run({"CXX": "/bin/false", "POLYAK_FUSED_CACHE": str(tmp_path),
                 "POLYAK_CPU_LOOPS": "auto"}, code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"
    assert "could not be built" in done.stderr and "compiling cpu_loops.cpp failed" in done.stderr
    done = _run({"CXX": "/bin/false", "POLYAK_FUSED_CACHE": str(tmp_path),
                 "POLYAK_CPU_LOOPS": "cpp"}, code)
    assert done.returncode != 0 and "BuildError" in done.stderr
    done = _run({"POLYAK_CPU_LOOPS": "torch"}, code)
    assert done.stdout.strip() == "None" and "could not" not in done.stderr


def test_invalid_choice_is_refused():
    with pytest.raises(ValueError, match="Invalid POLYAK_CPU_LOOPS: 'fast'"):
        _cpu_loops._choose("fast")


def test_a_compiler_that_refuses_native_gets_the_portable_flags(monkeypatch):
    tried = []

    def build(source, name, flags):
        tried.append(flags)
        if "-march=native" in flags:
            raise _cpp_build.BuildError("unknown flag -march=native")
        return "portable module"

    monkeypatch.setattr(_cpp_build, "build_and_load", build)
    assert _cpu_loops.compiled() == "portable module"
    assert tried == [_cpu_loops.FLAGS, _cpu_loops.PORTABLE_FLAGS]
    assert "-march=native" not in _cpu_loops.PORTABLE_FLAGS


def test_a_native_build_is_cached_per_cpu(monkeypatch):
    source = _cpu_loops.SOURCE
    keys = {}
    for cpu in ("x86_64 avx2 fma", "x86_64 avx512f"):
        monkeypatch.setattr(_cpp_build, "cpu_features", lambda cpu=cpu: cpu)
        keys[cpu] = (_cpp_build._key("g++", source, _cpu_loops.FLAGS),
                     _cpp_build._key("g++", source, _cpu_loops.PORTABLE_FLAGS))
    (native_a, portable_a), (native_b, portable_b) = keys.values()
    assert native_a != native_b and portable_a == portable_b
