"""Parameters whose .grad is None (torch's default zero_grad(set_to_none=True), an unused branch, a
layer unfrozen later): as in torch.optim, such a parameter is not stepped and its buffers stay as
they are; the quantities a method defines over the whole iterate still cover it (DoG's
||x_t - x_0|| and ||x_0||, the best iterate of InexactPolyak). docs/usage.md, "Parameters without a
gradient".

Each test runs every optimizer twice on the same problem, once with None for the idle parameter and
once with a zero gradient for it: where a zero gradient moves nothing (no momentum, no weight
decay) the two runs agree; where it would (momentum, weight decay), None leaves the parameter and
its buffers bitwise unchanged.
"""

from __future__ import annotations

import pytest
import torch
from eager_helpers import assert_bitwise_equal

import polyak_fused as pf

#: The paths a step can take: (optimizer keywords, parameter dtype, tolerance of "equal").
#: The fused kernels run in float32 (under the Triton interpreter on a CPU).
IMPLEMENTATIONS = {"reference": (dict(fused=False, foreach=False), torch.float64, 1e-12),
                   "foreach": (dict(foreach=True), torch.float64, 1e-12),
                   "fused": (dict(fused=True), torch.float32, 1e-6)}

#: (name, factory, a zero gradient leaves the parameter where it is)
OPTIMIZERS = [
    ("inexact_polyak", lambda p, **kw: pf.InexactPolyak(p, total_steps=20, **kw), True),
    ("inexact_polyak_best", lambda p, **kw: pf.InexactPolyak(p, total_steps=20, track_best=True,
                                                             **kw), True),
    ("polyak", lambda p, **kw: pf.Polyak(p, c=2.0, **kw), True),
    ("decsps", lambda p, **kw: pf.DecSPS(p, **kw), True),
    ("adasps", lambda p, **kw: pf.AdaSPS(p, **kw), True),
    ("dog", lambda p, **kw: pf.DoG(p, reps_rel=1e-2, **kw), True),
    ("dog_wd", lambda p, **kw: pf.DoG(p, reps_rel=1e-2, weight_decay=0.1, **kw), False),
    ("clipped_sgd", lambda p, **kw: pf.ClippedSGD(p, lr=0.1, max_norm=1.0, **kw), True),
    ("clipped_sgd_momentum", lambda p, **kw: pf.ClippedSGD(p, lr=0.1, max_norm=1.0, momentum=0.9,
                                                           **kw), False),
    ("nsgdm", lambda p, **kw: pf.NSGDM(p, lr=0.05, **kw), False),
    ("momo", lambda p, **kw: pf.MoMo(p, lr=0.5, **kw), False),
    ("momo_fstar_wd", lambda p, **kw: pf.MoMo(p, lr=0.5, weight_decay=0.1, use_fstar=True,
                                              bias_correction=True, **kw), False),
    ("momo_adam", lambda p, **kw: pf.MoMoAdam(p, lr=0.05, **kw), False),
    ("momo_adam_wd", lambda p, **kw: pf.MoMoAdam(p, lr=0.05, weight_decay=0.1, divide=False,
                                                 **kw), False),
]
IDS = [name for name, _, _ in OPTIMIZERS]
STEPS = 6
IDLE_STEPS = (2, 3, 4)  # parameter 1 has no gradient at these steps


def _problem(seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (5,), (2, 3)]
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    targets = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    return [torch.nn.Parameter(x.to(dtype)) for x in start], targets


def _loss(params, targets, t):
    """A loss with a positive minimum that changes from step to step (a 'batch')."""
    w = 1.0 + 0.1 * t
    return 0.3 + sum(w * (p.double() - y).square().sum() for p, y in zip(params, targets)) / 10


def _run(factory, idle_as, impl, seed=0):
    """STEPS steps; at IDLE_STEPS parameter 1's gradient is None or zeros (`idle_as`)."""
    kwargs, dtype, _ = IMPLEMENTATIONS[impl]
    params, targets = _problem(seed, dtype)
    opt = factory(params, **kwargs)
    history = []
    for t in range(STEPS):
        opt.zero_grad()
        loss = _loss(params, targets, t)
        loss.backward()
        if t in IDLE_STEPS:
            params[1].grad = None if idle_as == "none" else torch.zeros_like(params[1])
        before = [p.detach().clone() for p in params]
        state_before = {k: v.clone() for k, v in opt.state[params[1]].items()
                        if torch.is_tensor(v)}
        opt.step(loss=loss.detach().to(dtype))
        history.append((before, state_before))
    return opt, params, history


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("name,factory,zero_stays", OPTIMIZERS, ids=IDS)
def test_a_parameter_without_gradient_is_not_stepped_and_its_buffers_stay(name, factory,
                                                                         zero_stays, impl):
    opt, params, history = _run(factory, "none", impl)
    for t in IDLE_STEPS:
        before, state_before = history[t]
        after = history[t + 1][0] if t + 1 < STEPS else [p.detach() for p in params]
        assert_bitwise_equal(after[1], before[1], f"{name}: idle parameter at step {t}")
        assert not torch.equal(after[0], before[0]), f"{name}: the others still move at step {t}"
        state_after = history[t + 1][1] if t + 1 < STEPS else opt.state[params[1]]
        for k, v in state_before.items():
            if k != "best":  # the best iterate is a snapshot of every parameter (next test)
                assert_bitwise_equal(state_after[k], v, f"{name}: idle buffer {k!r} at step {t}")
    assert opt.scalars["step"].item() == STEPS


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("name,factory,zero_stays", [o for o in OPTIMIZERS if o[2]],
                         ids=[o[0] for o in OPTIMIZERS if o[2]])
def test_none_gives_the_step_of_a_zero_gradient(name, factory, zero_stays, impl):
    """Where a zero gradient moves nothing, the global quantities (norms, distances, the best
    iterate) see None exactly as they see zeros."""
    with_none, p_none, _ = _run(factory, "none", impl)
    with_zeros, p_zeros, _ = _run(factory, "zeros", impl)
    tol = IMPLEMENTATIONS[impl][2]
    for i, (a, b) in enumerate(zip(p_none, p_zeros)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol / 100, msg=f"{name} param {i}")
        for k, v in with_zeros.state[b].items():
            if torch.is_tensor(v):
                torch.testing.assert_close(with_none.state[a][k], v, rtol=tol, atol=tol / 100,
                                           msg=f"{name} state[{i}][{k!r}]")


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_the_best_iterate_is_one_iterate_of_every_parameter(impl):
    """Losses 3, 2, 5, `a.grad` None after the first step: the best loss is 2.0, seen at x_1, and
    load_best() gives x_1 for both parameters (it gave x_0 for `a`, x_1 for `b` before)."""
    kwargs, dtype, _ = IMPLEMENTATIONS[impl]
    a = torch.nn.Parameter(torch.ones(2, dtype=dtype))
    b = torch.nn.Parameter(torch.ones(2, dtype=dtype))
    opt = pf.InexactPolyak([a, b], total_steps=4, track_best=True, **kwargs)
    iterates = []
    for t, f in enumerate([3.0, 2.0, 5.0]):
        iterates.append(torch.cat([a.detach(), b.detach()]).clone())
        opt.zero_grad()
        (f * (a.sum() + b.sum()) / 4).backward()
        if t >= 1:
            a.grad = None
        opt.step(loss=f)
    assert opt.best_loss.item() == 2.0
    opt.load_best()
    assert torch.equal(torch.cat([a.detach(), b.detach()]), iterates[1])
    assert not torch.equal(iterates[1][:2], iterates[0][:2])   # `a` did move in the first step


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_dog_distances_cover_a_parameter_without_gradient(impl):
    """DoG's r_bar = max(r_eps, ||x_t - x_0||), r_eps = reps_rel (1 + ||x_0||), over every
    parameter: a parameter that moved and then has no gradient still counts, as
    optax.contrib.dog counts it (which sees a zero gradient)."""
    kwargs, dtype, tol = IMPLEMENTATIONS[impl]
    x = [torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=dtype)),
         torch.nn.Parameter(torch.tensor([0.0, 12.0], dtype=dtype))]
    opt = pf.DoG(x, reps_rel=0.5, **kwargs)
    x0 = [p.detach().clone() for p in x]
    rbar = 0.0
    for t in range(3):
        opt.zero_grad()
        loss = sum(p.square().sum() for p in x) / 2
        loss.backward()
        if t >= 1:
            x[0].grad = None
        distance = torch.cat([p.detach().double() - q.double() for p, q in zip(x, x0)]).norm()
        opt.step(loss=loss.detach())
        r_eps = 0.5 * (1 + torch.cat(x0).double().norm().item())  # 0.5 * (1 + 13)
        rbar = max(rbar, r_eps, distance.item())
        assert opt.scalars["rbar"].item() == pytest.approx(rbar, rel=tol)
    assert rbar > r_eps  # the distance, which includes the idle parameter's, took over


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("method", ["inexact_polyak_best", "dog"])
def test_each_tensor_takes_its_own_groups_lr_after_a_parameter_without_gradient(method, impl):
    """Group 0 holds `idle` (no gradient) and `a`, group 1 (lr 0.5) holds `b`. These methods
    step every parameter of the iterate, so the lrs must be paired with the tensors that have
    a gradient: the step is written out here by hand (once the reference paired `b` with
    group 0's lr)."""
    kwargs, dtype, tol = IMPLEMENTATIONS[impl]
    idle, a, b = (torch.nn.Parameter(torch.tensor(v, dtype=dtype))
                  for v in ([1.0, -2.0], [3.0, 4.0], [-1.0, 2.0]))
    groups = [{"params": [idle, a]}, {"params": [b], "lr": 0.5}]
    if method == "dog":
        opt = pf.DoG(groups, reps_rel=0.1, **kwargs)
    else:
        opt = pf.InexactPolyak(groups, total_steps=4, track_best=True, **kwargs)
    start = [p.detach().double().clone() for p in (idle, a, b)]
    loss = (a.square().sum() + b.square().sum()) / 2 + 1.0
    loss.backward()                                        # idle.grad stays None
    opt.step(loss=loss.detach())
    g_a, g_b = start[1], start[2]                          # the gradient of x^2 / 2 is x
    grad_sq = g_a.square().sum() + g_b.square().sum()
    if method == "dog":                                    # eta = rbar / sqrt(||g||^2 + eps)
        eta = 0.1 * (1 + torch.cat(start).norm()) / torch.sqrt(grad_sq + 1e-8)
    else:                                                  # eta = f / (sqrt(T) ||g||^2)
        eta = loss.detach().double() / (2.0 * grad_sq)
    expected = [start[0], start[1] - eta * g_a, start[2] - 0.5 * eta * g_b]
    for p, e, what in zip((idle, a, b), expected, ("idle", "a (lr 1)", "b (lr 0.5)")):
        assert torch.allclose(p.detach().double(), e, rtol=tol, atol=0), what


@pytest.mark.parametrize("name,factory,zero_stays", OPTIMIZERS, ids=IDS)
def test_the_fused_path_steps_as_the_reference_with_a_parameter_without_gradient(
        name, factory, zero_stays):
    """The same run, None at IDLE_STEPS, on the kernels (float32) and the reference (float64):
    the parameters and every buffer agree to float32's rounding (1e-5 relative to each tensor's
    largest element)."""
    fused, p_fused, _ = _run(factory, "none", "fused")
    ref, p_ref, _ = _run(factory, "none", "reference")
    for i, (a, b) in enumerate(zip(p_fused, p_ref)):
        scale = b.detach().abs().max().item()
        torch.testing.assert_close(a.detach().double(), b.detach(), rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m: f"{name} param {i}: {m}")
        for k, v in ref.state[b].items():
            if torch.is_tensor(v) and v.is_floating_point():
                got, size = fused.state[a][k].double(), max(v.abs().max().item(), 1e-3)
                torch.testing.assert_close(got, v, rtol=1e-5, atol=1e-5 * size,
                                           msg=lambda m: f"{name} state[{i}][{k!r}]: {m}")
