"""polyak_fused._host_pass: the compiled host pass (host_pass.cpp) gives what its Python specification
(reference.py) gives, on every case either can meet: random tensors, then each change a training
loop, a framework or a user can make. And the build: cached, and a failed one falls back to
Python with a warning that says why (or raises, under POLYAK_HOST_PASS=cpp)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from polyak_fused import _host_pass as csrc_host
from polyak_fused import _cpp_build as build
from polyak_fused._host_pass import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def compiled():
    return csrc_host.compiled()


# ---------------------------------------------------------------------------------------------
# check_tensors
# ---------------------------------------------------------------------------------------------
def _tensors(gen, n, n_buffers):
    shapes = [(int(torch.randint(1, 6, (), generator=gen)), int(torch.randint(1, 6, (),
                                                                           generator=gen)))
              for _ in range(n)]
    dtypes = [(torch.float32, torch.bfloat16)[int(torch.randint(0, 2, (), generator=gen))]
              for _ in range(n)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(d)) for s, d in
              zip(shapes, dtypes)]
    grads = [torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes)]
    bufs = tuple([torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes)]
                 for _ in range(n_buffers))
    return params, grads, bufs


def _grad_column(grads, staged=()):
    """The gradient column: each address (0 for None), or for a staged row 1 or 0."""
    return [int(g is not None) if i in staged else (0 if g is None else g.data_ptr())
            for i, g in enumerate(grads)]


def _table(params, grads, bufs, staged=()):
    """The launcher's record of the tensors (polyak_fused._kernels.polyak_step._Plan.watched)."""
    table = np.zeros((len(params), csrc_host.ROW), dtype=np.int64)
    column = _grad_column(grads, staged)
    for i, x in enumerate(params):
        b = [bs[i].data_ptr() for bs in bufs] + [0] * (2 - len(bufs))
        table[i] = (x.data_ptr(), column[i], *b, x.numel(), i in staged)
    return table


def _square_t(t):
    return t.t() if t.dim() == 2 and t.shape[0] == t.shape[1] else t[..., :0]


#: Each change: (name, function(params, grads, bufs, i) -> (params, grads, bufs)), applied to
#: tensor i. The expected status comes from the reference; the compiled module must agree.
CHANGES = {
    "nothing": lambda x, g, b, i: (x, g, b),
    "new_grad": lambda x, g, b, i: (x, g[:i] + [g[i].clone()] + g[i + 1:], b),
    "same_grad_object_new_memory": lambda x, g, b, i: (x, _set_data(g, i, g[i].clone()), b),
    "grad_none": lambda x, g, b, i: (x, g[:i] + [None] + g[i + 1:], b),
    "grad_sparse": lambda x, g, b, i: (x, g[:i] + [g[i].to_sparse()] + g[i + 1:], b),
    "grad_other_dtype": lambda x, g, b, i: (x, g[:i] + [g[i].double()] + g[i + 1:], b),
    "grad_not_contiguous": lambda x, g, b, i: (
        x, g[:i] + [torch.ones((*g[i].shape, 2), dtype=g[i].dtype)[..., 0]] + g[i + 1:], b),
    "grad_smaller": lambda x, g, b, i: (x, g[:i] + [g[i].reshape(-1)[:-1]] + g[i + 1:], b),
    "param_data_replaced": lambda x, g, b, i: (_set_data(x, i, x[i].data.clone()), g, b),
    "param_resized_in_place": lambda x, g, b, i: (_set_data(x, i, x[i].data.reshape(-1)[:1]),
                                                  g, b),
    "param_transposed": lambda x, g, b, i: (_set_data(x, i, _square_t(x[i].data)), g, b),
    "param_not_a_tensor": lambda x, g, b, i: (x[:i] + [3.0] + x[i + 1:], g, b),
    "param_meta": lambda x, g, b, i: (x[:i] + [x[i].to("meta")] + x[i + 1:], g, b),
    "grad_none_comes_back": lambda x, g, b, i: (x, g[:i] + [None] + g[i + 1:], b),  # (below)
    "buffer_replaced": lambda x, g, b, i: (x, g, _edit_last(b, i, lambda t: t.clone())),
    "buffer_other_dtype": lambda x, g, b, i: (x, g, _edit_last(b, i, lambda t: t.double())),
    "buffer_list_shorter": lambda x, g, b, i: (x, g, b[:-1] + (b[-1][:-1],) if b else b),
    "one_grad_fewer": lambda x, g, b, i: (x, g[:-1], b),
}


def _edit_last(bufs, i, edit):
    """The buffer lists with tensor i of the last one edited."""
    if not bufs:
        return bufs
    last = list(bufs[-1])
    last[i] = edit(last[i])
    return bufs[:-1] + (last,)


def _set_data(tensors, i, data):
    tensors[i].data = data
    return tensors


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("n_buffers", [0, 1, 2])
@pytest.mark.parametrize("staged_row", [False, True])
def test_check_tensors_compiled_equals_reference(compiled, change, n_buffers, staged_row):
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        n = 5
        i = seed % n
        staged = {i} if staged_row else set()
        outcomes = []
        for module in (reference, compiled):
            gen.manual_seed(seed)
            params, grads, bufs = _tensors(gen, n, n_buffers)
            keep = list(grads)  # keep the old grads alive: a new one gets a new address
            if change == "grad_none_comes_back":  # recorded without a gradient, which returns
                grads[i], keep_i = None, grads[i]
            table = _table(params, grads, bufs, staged)
            before = table.copy()
            if change == "grad_none_comes_back":
                grads[i] = keep_i
            else:
                params, grads, bufs = CHANGES[change](list(params), list(grads), bufs, i)
            status = module.check_tensors(tuple(params), grads, bufs, table)
            changed = table != before
            outcomes.append((status, changed.nonzero()))
            if status == 1:
                assert changed.any() and not changed[:, [0, 2, 3, 4, 5]].any()
                assert (table[:, 1] == _grad_column(grads, staged)).all()
            elif status == 0:
                assert not changed.any()
            del keep
        (ref_status, ref_changed), (status, changed) = outcomes
        assert status == ref_status, (change, seed)
        assert np.array_equal(changed[0], ref_changed[0]) and np.array_equal(changed[1],
                                                                              ref_changed[1])


def test_check_tensors_expected_statuses(compiled):
    """A few statuses stated outright (not only compiled == reference)."""
    gen = torch.Generator().manual_seed(1)
    for module in (reference, compiled):
        params, grads, bufs = _tensors(gen, 4, 2)
        table = _table(params, grads, bufs)
        assert module.check_tensors(params, grads, bufs, table) == 0
        grads[2] = grads[2].clone()
        assert module.check_tensors(params, grads, bufs, table) == 1
        assert module.check_tensors(params, grads, bufs, table) == 0  # the table took it
        grads[1] = None                                # a parameter not stepped this time
        assert module.check_tensors(params, grads, bufs, table) == 1 and table[1, 1] == 0
        assert module.check_tensors(params, grads, bufs, table) == 0
        backup = params[0].data
        params[0].data = backup.clone()  # moved while the old storage is kept alive
        assert module.check_tensors(params, grads, bufs, table) == 2
        assert module.check_tensors(params, grads, bufs, table[:3]) == 2  # wrong table size
        with pytest.raises(TypeError):
            module.check_tensors(params, grads, bufs, bytes(table.nbytes))  # read-only


# ---------------------------------------------------------------------------------------------
# grads_of_groups
# ---------------------------------------------------------------------------------------------
class _GradProperty(torch.nn.Parameter):
    """A Parameter subclass with its own .grad (the compiled module must ask Python for it)."""

    @property
    def grad(self):
        return self.__dict__.get("fake_grad")

    @grad.setter
    def grad(self, value):
        self.__dict__["fake_grad"] = value


def _groups(gen):
    groups = []
    for sizes in ((3, None, 4), (None,), (2, 5)):
        params = []
        for s in sizes:
            p = torch.nn.Parameter(torch.randn(s if s else 2, generator=gen))
            if s:
                p.grad = torch.randn(s, generator=gen)
            params.append(p)
        groups.append(params)
    return groups


def _expected(groups, whole=False):
    """What a step expects: the params with a .grad, or with `whole` every param."""
    params = tuple(p for ps in groups for p in ps if whole or p.grad is not None)
    counts = tuple(sum(whole or p.grad is not None for p in ps) for ps in groups)
    return params, counts


GROUP_CHANGES = {
    "nothing": lambda gs: None,
    "grad_removed": lambda gs: setattr(gs[0][0], "grad", None),
    "grad_appears": lambda gs: setattr(gs[0][1], "grad", torch.zeros(2)),
    "grad_replaced": lambda gs: setattr(gs[2][1], "grad", torch.ones(5)),
    "params_reordered": lambda gs: gs[0].reverse(),
    "param_moved_to_next_group": lambda gs: gs[1].insert(0, gs[0].pop()),
    "group_added": lambda gs: gs.append([torch.nn.Parameter(torch.zeros(1))]),
    "group_added_with_grad": lambda gs: gs.append([_with_grad(torch.nn.Parameter(torch.ones(1)))]),
    "group_as_tuple": lambda gs: gs.__setitem__(2, tuple(gs[2])),
    "param_replaced": lambda gs: gs[2].__setitem__(0, _with_grad(torch.nn.Parameter(
        torch.zeros(2)))),
    "subclass_with_own_grad": lambda gs: gs[2].append(_with_grad(_GradProperty(torch.zeros(3)))),
    "not_a_tensor": lambda gs: gs[1].append("x"),
}


def _with_grad(p):
    p.grad = torch.full_like(p, 7.0)
    return p


#: The changes after which the last step's params are still the ones to hand over: with only the
#: params that have a .grad, and with every param (`whole`: a .grad that comes or goes is None).
STILL_THE_SAME = {False: ("nothing", "grad_replaced", "group_as_tuple"),
                  True: ("nothing", "grad_replaced", "group_as_tuple", "grad_removed",
                         "grad_appears")}


@pytest.mark.parametrize("whole", [False, True], ids=["with_grads", "whole"])
@pytest.mark.parametrize("change", list(GROUP_CHANGES))
def test_grads_of_groups_compiled_equals_reference(compiled, change, whole):
    for seed in range(3):
        results = []
        for module in (reference, compiled):
            groups = _groups(torch.Generator().manual_seed(seed))
            params, counts = _expected(groups, whole)
            got = module.grads_of_groups(groups, params, counts, whole)
            assert got is not None and all(g is p.grad for g, p in zip(got, params))
            assert (None in got) == whole
            GROUP_CHANGES[change](groups)
            got = module.grads_of_groups(groups, params, counts, whole)
            if got is not None:
                assert all(g is p.grad for g, p in zip(got, params)) and len(got) == len(params)
                results.append("same")
            else:
                results.append(None)
            if change == "subclass_with_own_grad":  # recognised by its own .grad
                params, counts = _expected(groups, whole)
                got = module.grads_of_groups(groups, params, counts, whole)
                assert got is not None and got[-1] is groups[2][-1].grad
        assert results[0] == results[1], (change, seed)
        assert (results[0] == "same") == (change in STILL_THE_SAME[whole]), change


@pytest.mark.parametrize("compiled_or_not", ["reference", "compiled"])
def test_grads_of_groups_whole_needs_one_gradient(compiled, compiled_or_not):
    """With every .grad None there is nothing to step: the caller's slow path says so."""
    module = compiled if compiled_or_not == "compiled" else reference
    groups = [[torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))]]
    params, counts = _expected(groups, whole=True)
    assert module.grads_of_groups(groups, params, counts, True) is None
    groups[0][1].grad = torch.ones(3)
    got = module.grads_of_groups(groups, params, counts, True)
    assert got[0] is None and got[1] is groups[0][1].grad


# ---------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------
def test_the_cached_module_is_loaded_without_compiling(compiled, monkeypatch):
    def no_compiler(*args):
        raise AssertionError("compiled again although the cache holds the module")

    monkeypatch.setattr(build, "_compile", no_compiler)
    module = csrc_host.compiled()
    assert hasattr(module, "check_tensors") and hasattr(module, "grads_of_groups")


def _run(env_extra: dict, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)


def test_a_failed_build_falls_back_to_python_and_says_why(tmp_path):
    code = ("import warnings; warnings.simplefilter('always'); "
            "from polyak_fused import _host_pass; m = _host_pass.implementation(); "
            "print(m.__name__)")
    done = _run({"CXX": "/bin/false", "POLYAK_FUSED_CACHE": str(tmp_path),
                 "POLYAK_HOST_PASS": "auto"}, code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "polyak_fused._host_pass.reference"
    assert "could not be built" in done.stderr and "compiling host_pass.cpp failed" in done.stderr
    done = _run({"CXX": "/bin/false", "POLYAK_FUSED_CACHE": str(tmp_path),
                 "POLYAK_HOST_PASS": "cpp"}, code)
    assert done.returncode != 0 and "BuildError" in done.stderr
    done = _run({"POLYAK_HOST_PASS": "python"}, code)
    assert done.stdout.strip() == "polyak_fused._host_pass.reference"
    assert "could not" not in done.stderr


def test_a_missing_compiler_is_named(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.raises(build.BuildError, match="no C.. compiler found"):
        csrc_host.compiled()


def test_invalid_choice_is_refused():
    with pytest.raises(ValueError, match="Invalid POLYAK_HOST_PASS: 'fast'"):
        csrc_host._choose("fast")


def test_the_fused_path_uses_the_compiled_module(compiled):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert csrc_host.implementation().__file__ == compiled.__file__


# ---------------------------------------------------------------------------------------------
# specialisation (the key of the launcher's direct launches)
# ---------------------------------------------------------------------------------------------
def _launch_args(gen):
    base = torch.zeros(64, dtype=torch.float32)
    values = [torch.zeros(3, dtype=dt) for dt in (torch.float32, torch.bfloat16, torch.float16,
                                                   torch.int64, torch.float64)]
    values += [base[1:], base[4:]]                      # 4 and 16 bytes past an aligned start
    values += [True, False, 0, 1, 16, 17, -16, -1, 2**31 - 1, 2**31, -2**31, -2**31 - 1,
               2**63 - 1, 2**63, 2**64 + 5, -2**63, -2**64, 1.5, None]
    order = torch.randperm(len(values), generator=gen).tolist()
    return tuple(values[i] for i in order)


def test_specialisation_compiled_equals_reference(compiled):
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        args = _launch_args(gen)
        flags = bytes(torch.randint(0, 4, (len(args),), generator=gen).tolist())
        assert compiled.specialisation(args, flags) == reference.specialisation(args, flags)


def test_specialisation_sees_what_triton_specialises(compiled):
    """The dtype of every tensor; its alignment unless told not to; an int's width always, its
    value class (1, a multiple of 16) unless do_not_specialize."""
    for module in (reference, compiled):
        spec = module.specialisation
        base = torch.zeros(64)
        fp32, bf16 = torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16)
        assert spec((fp32,), b"\0") != spec((bf16,), b"\0")
        assert spec((base,), b"\0") != spec((base[1:],), b"\0")       # alignment specialised
        assert spec((base,), b"\2") == spec((base[1:],), b"\2")       # ... unless not
        assert spec((fp32,), b"\2") != spec((bf16,), b"\2")           # the dtype always
        assert spec((7,), b"\0") != spec((16,), b"\0") != spec((1,), b"\0")
        assert spec((7,), b"\1") == spec((16,), b"\1") == spec((1,), b"\1")  # do_not_specialize
        assert spec((7,), b"\1") != spec((2**40,), b"\1")             # the width still counts
        with pytest.raises(ValueError, match="fewer flags"):
            spec((1, 2), b"\0")
