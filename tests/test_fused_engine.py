"""Properties of the fused path beyond parity: skipped steps, determinism, table caching, dispatch,
and the GPU-only guarantees (no host sync, CUDA-graph capture, 64-bit offsets, kernel cache)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import assert_bitwise_equal, assert_close, needs_cuda
from test_parity import OPTIMIZERS

import polyak_fused as pf



def _model_params(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(33, 7), (5,), (129,), (4, 4)]
    dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.bfloat16]
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dt).to(device))
            for s, dt in zip(shapes, dtypes)]


def _set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype).to(p.device)


def _snapshot(opt, params):
    """Parameters, per-parameter buffers, global scalars (which live in params[0]'s state)."""
    scalars = opt.scalars
    return ([p.detach().clone() for p in params],
            {i: {k: v.clone() for k, v in opt.state[p].items() if k not in scalars}
             for i, p in enumerate(params)},
            {k: v.clone() for k, v in scalars.items()})


@pytest.mark.parametrize("bad", ["nan_grad", "inf_grad", "nan_loss", "inf_loss"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_non_finite_step_leaves_everything_bitwise_unchanged(name, bad, device):
    params = _model_params(device)
    opt = OPTIMIZERS[name](params, fused=True)
    for seed in range(2):  # two good steps first, so that state exists and is non-trivial
        _set_grads(params, seed)
        opt.step(loss=torch.tensor(1.5, device=device))
    before = _snapshot(opt, params)
    _set_grads(params, 7)
    loss = torch.tensor(1.5, device=device)
    if bad.endswith("grad"):  # one element of one tensor, in the second dtype group
        params[2].grad[17] = math.nan if bad == "nan_grad" else math.inf
    else:
        loss = torch.tensor(math.nan if bad == "nan_loss" else math.inf, device=device)
    opt.step(loss=loss)
    after = _snapshot(opt, params)
    for i, (a, b) in enumerate(zip(after[0], before[0])):
        assert_bitwise_equal(a, b, f"param {i}")
    for i in before[1]:
        for k in before[1][i]:
            assert_bitwise_equal(after[1][i][k], before[1][i][k], f"state {k} of param {i}")
    for k, v in before[2].items():
        if k == "skipped":
            assert after[2][k].item() == v.item() + 1
        else:
            assert_bitwise_equal(after[2][k], v, f"scalar {k}")


@pytest.mark.parametrize("name", ["inexact_polyak_best", "dog", "nsgdm_agnostic",
                                  "clipped_sgd_momentum", "adasps"])
def test_two_identical_fused_runs_are_bitwise_identical(name, device):
    runs = []
    for _ in range(2):
        params = _model_params(device, seed=3)
        opt = OPTIMIZERS[name](params, fused=True)
        for seed in range(3):
            _set_grads(params, 10 + seed)
            opt.step(loss=torch.tensor(0.7 + seed, device=device))
        runs.append(_snapshot(opt, params))
    for i, (a, b) in enumerate(zip(runs[0][0], runs[1][0])):
        assert_bitwise_equal(a, b, f"param {i}")
    for k in runs[0][2]:
        assert_bitwise_equal(runs[0][2][k], runs[1][2][k], f"scalar {k}")


def test_tables_are_built_once_and_rebuilt_only_when_a_pointer_changes(device):
    params = _model_params(device)
    opt = pf.InexactPolyak(params, total_steps=10, fused=True)
    _set_grads(params, 0)
    opt.step(loss=1.0)
    plan = opt._fused_cache["plan"]
    for p in params:  # same grad storage, new values: what zero_grad(set_to_none=False) gives
        p.grad.copy_(torch.randn_like(p.grad))
    opt.step(loss=1.0)
    assert opt._fused_cache["plan"] is plan
    opt.param_groups[0]["lr"] = 0.3  # an lr change is a value in device memory, not a new table
    opt.step(loss=1.0)
    assert opt._fused_cache["plan"] is plan
    assert plan.lrs[0].item() == pytest.approx(0.3)
    params[1].grad = params[1].grad.clone()  # a new grad tensor: only the grad column changes
    opt.step(loss=1.0)
    assert opt._fused_cache["plan"] is plan
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(9, device=device))]})
    opt.param_groups[-1]["params"][0].grad = torch.randn(9, device=device)
    opt.step(loss=1.0)  # a new parameter: new tables
    assert opt._fused_cache["plan"] is not plan


def test_new_gradient_tensors_every_step_are_read(device):
    """zero_grad(set_to_none=True) hands the kernels new gradient tensors each step; the table's
    gradient column must follow them (checked against the reference)."""
    params = _model_params(device)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = pf.AdaSPS(params, fused=True)
    ref = pf.AdaSPS(twin, fused=False, foreach=False)
    keep = []  # keep old grads alive so the new ones cannot reuse their addresses
    for seed in range(4):
        _set_grads(params, seed)
        _set_grads(twin, seed)
        keep.append([p.grad for p in params])
        fused.step(loss=2.0)
        ref.step(loss=2.0)
    for i, (a, b) in enumerate(zip(params, twin)):
        tol = 1e-5 if a.dtype == torch.float32 else 2e-2  # bf16: see test_parity.DTYPES
        assert_close(a, b, rtol=tol, atol=tol, what=f"param {i}")


def test_lr_change_takes_effect_in_the_fused_path(device):
    """The lr slot is refreshed every step: halving lr halves the update."""
    deltas = []
    for lr in (1.0, 0.5):
        params = _model_params(device)
        opt = pf.InexactPolyak(params, total_steps=10, fused=True)
        _set_grads(params, 0)
        opt.step(loss=1.0)
        before = [p.detach().float().clone() for p in params]
        opt.param_groups[0]["lr"] = lr
        _set_grads(params, 1)
        opt.step(loss=1.0)
        deltas.append(params[0].detach().float() - before[0])
    assert_close(deltas[1], 0.5 * deltas[0], rtol=1e-4, atol=1e-7, what="update at lr=0.5")


def test_fused_none_takes_the_reference_on_cpu_and_fused_false_always():
    params = _model_params(torch.device("cpu"))
    for fused in (None, False):
        opt = pf.Polyak(params, fused=fused)
        _set_grads(params, 0)
        opt.step(loss=1.0)
        assert "plan" not in opt._fused_cache


def test_fused_true_rejects_float64(device):
    with pytest.raises(RuntimeError, match="float64"):       # at construction
        pf.Polyak([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))], fused=True)
    p = torch.nn.Parameter(torch.randn(3, device=device))
    opt = pf.Polyak([p], fused=True)
    p.data = p.data.double()              # what model.double() does after the optimizer is built
    p.grad = torch.randn(3, dtype=torch.float64, device=device)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="float64"):
        opt.step(loss=1.0)
    assert_bitwise_equal(p, before, "param after a refused step")


# ---------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fused_none_takes_triton_on_cuda_without_host_sync(name):
    params = _model_params(torch.device("cuda"))
    opt = OPTIMIZERS[name](params)  # fused=None
    _set_grads(params, 0)
    opt.step(loss=torch.tensor(1.0, device="cuda"))  # first step allocates state
    assert "plan" in opt._fused_cache
    loss = torch.tensor(1.2, device="cuda")
    _set_grads(params, 1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.param_groups[0]["lr"] = 0.9
        opt.step(loss=loss)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@needs_cuda
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cuda_graph_replay_equals_eager_steps(name):
    dev = torch.device("cuda")
    params = _model_params(dev)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = OPTIMIZERS[name](params)
    opt_twin = OPTIMIZERS[name](twin)
    for group in opt.param_groups:  # a tensor lr is read on the device, so a graph sees changes
        group["lr"] = torch.tensor(float(group["lr"]), device=dev)
    loss = torch.tensor(1.0, device=dev)
    grads = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    _set_grads(twin, 0)
    for g, t in zip(grads, twin):
        g.copy_(t.grad)
    opt.step(loss=loss)            # warm-up: state allocated, kernels compiled
    opt_twin.step(loss=loss)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph):
            opt.step(loss=loss)
    torch.cuda.current_stream().wait_stream(stream)
    for seed in range(1, 4):
        _set_grads(twin, seed)
        for g, t in zip(grads, twin):
            g.copy_(t.grad)
        loss.fill_(1.0 + seed)
        graph.replay()
        opt_twin.step(loss=torch.tensor(1.0 + seed, device=dev))
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(params, twin)):
        assert_bitwise_equal(a, b, f"param {i} after graph replays")


@needs_cuda
def test_no_new_kernel_compiles_after_the_first_step():
    from polyak_fused._kernels import polyak_step as K

    def n_compiled():
        return sum(len(c) for k in (K._reduce_kernel, K._step_size_kernel, K._update_kernel)
                   for c in k.device_caches.values()) if hasattr(K._reduce_kernel, "device_caches") \
            else sum(len(k.cache.get(torch.cuda.current_device(), {}))
                     for k in (K._reduce_kernel, K._step_size_kernel, K._update_kernel))

    params = _model_params(torch.device("cuda"))
    opt = pf.InexactPolyak(params, total_steps=10)
    _set_grads(params, 0)
    opt.step(loss=torch.tensor(1.0, device="cuda"))
    first = n_compiled()
    _set_grads(params, 1)
    opt.step(loss=torch.tensor(1.0, device="cuda"))
    opt.param_groups[0]["lr"] = 0.123
    opt.step(loss=torch.tensor(1.0, device="cuda"))
    extra = [torch.nn.Parameter(torch.randn(1000, device="cuda"))]
    extra[0].grad = torch.randn(1000, device="cuda")
    opt.add_param_group({"params": extra, "lr": 0.5})
    opt.step(loss=torch.tensor(1.0, device="cuda"))
    assert n_compiled() == first


@needs_cuda
def test_a_tensor_of_more_than_2_31_elements():
    """64-bit offsets: the last elements of a 2^31 + 5 element bfloat16 tensor are updated."""
    n = 2**31 + 5
    try:
        p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16, device="cuda"))
        p.grad = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a 2^31-element tensor")
    opt = pf.ClippedSGD([p], lr=0.5)
    opt.step()
    tail = p.detach()[-8:].float()
    head = p.detach()[:8].float()
    assert torch.all(tail == 0.5) and torch.all(head == 0.5)
    assert opt.scalars["grad_norm"].item() == pytest.approx(math.sqrt(n), rel=1e-3)
    del p, opt
    torch.cuda.empty_cache()


def _reference_twin(params, factory):
    """float64 CPU copies of `params` with the same gradients, and their optimizer."""
    twin = [torch.nn.Parameter(p.detach().double().cpu()) for p in params]
    for t, p in zip(twin, params):
        t.grad = p.grad.detach().double().cpu()
    return twin, factory(twin, fused=False, foreach=False)


@needs_cuda
def test_a_step_runs_on_the_current_stream():
    """Gradients written on a side stream that is busy (a 50 ms sleep first): a step issued on
    that stream must wait for them; a step launched on the default stream would read the old
    ones."""
    params = _model_params(torch.device("cuda"))
    opt = pf.InexactPolyak(params, total_steps=10)
    _set_grads(params, 0)
    opt.step(loss=torch.tensor(1.0, device="cuda"))  # compiled, tables built
    _set_grads(params, 1)
    new = [p.grad.clone() for p in params]
    for p in params:
        p.grad.zero_()
    twin, ref = _reference_twin(params, lambda p, **kw: pf.InexactPolyak(p, total_steps=10, **kw))
    for t, g in zip(twin, new):
        t.grad = g.double().cpu()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)                 # ~50 ms of work queued before the copies
        for p, g in zip(params, new):
            p.grad.copy_(g)
        opt.step(loss=torch.tensor(2.0, device="cuda"))
    torch.cuda.synchronize()
    ref.step(loss=2.0)
    for i, (a, e) in enumerate(zip(params, twin)):
        assert_close(a, e, rtol=2e-2, atol=2e-2, what=f"param {i}")


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_parameters_on_a_second_gpu_step_there():
    """Parameters on cuda:1 while cuda:0 is current: the step matches the reference, and cuda:0
    is still current after it."""
    torch.cuda.set_device(0)
    params = _model_params(torch.device("cuda", 1))
    _set_grads(params, 0)
    factory = lambda p, **kw: pf.DoG(p, reps_rel=0.05, **kw)  # noqa: E731
    twin, ref = _reference_twin(params, factory)
    opt = factory(params)
    for step in range(3):
        opt.step()
        ref.step()
        _set_grads(params, step + 1)
        for t, p in zip(twin, params):
            t.grad = p.grad.detach().double().cpu()
    assert torch.cuda.current_device() == 0
    for i, (a, e) in enumerate(zip(params, twin)):
        assert_close(a, e, rtol=2e-2, atol=2e-2, what=f"param {i}")


@needs_cuda
def test_new_gradients_cost_one_host_to_device_copy_and_no_device_allocation():
    """bench/NOTES.md, "New gradients: per-step work": a step whose gradients are all at new
    addresses rewrites the gradient pointers with one copy from pinned memory for the whole
    step (three dtype groups here) and allocates nothing on the device."""
    dev = torch.device("cuda")
    params = [torch.nn.Parameter(torch.randn(n, device=dev).to(dt)) for n, dt in
              [(1000, torch.float32), (333, torch.bfloat16), (77, torch.float16)]]
    opt = pf.InexactPolyak(params, total_steps=100)
    loss = torch.tensor(1.0, device=dev)
    grad_sets = [[torch.randn_like(p) for p in params] for _ in range(2)]
    for i in range(3):  # warm-up: compiled, tables built, pinned blocks cached
        for p, g in zip(params, grad_sets[i % 2]):
            p.grad = g
        opt.step(loss=loss)
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(4):
            for p, g in zip(params, grad_sets[i % 2]):
                p.grad = g
            opt.step(loss=loss)
        torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
    copies = [e for e in prof.events() if "HtoD" in e.name]
    assert len(copies) == 4, [e.name for e in copies]


def test_deepcopy_of_a_fused_optimizer_keeps_working(device):
    params = _model_params(device)
    opt = pf.DoG(params, fused=True)
    _set_grads(params, 0)
    opt.step()
    clone = copy.deepcopy(opt)
    assert clone.scalars["step"].item() == 1
