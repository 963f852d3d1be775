"""Each step rule of the eager reference against values worked out by hand.

The expected values are computed here with plain Python floats from the formulas in the class
docstrings (and the papers they cite), never by calling the package's reference. Parameters
and gradients are tiny float64 tensors whose gradients are set by hand, so every number can be
followed on paper. Tolerances are a few ulps of float64 (the reference sums squares per tensor and
then over tensors, which rounds differently from Python's left-to-right sum).
"""

from __future__ import annotations

import math

import pytest
import torch

import polyak_fused as pf
from eager_helpers import (LR_IS_A_CAP_IDS, OPTIMIZER_FACTORIES, OPTIMIZER_IDS,
                           WEIGHT_DECAY_IDS, assert_bitwise_equal, assert_same_snapshot, snapshot)

F64 = torch.float64
TOL = dict(rtol=1e-13, atol=1e-15)

# Two parameters (a vector and a 2x2 matrix), flattened for the hand computations.
X0 = [[1.0, -2.0], [0.5, 3.0, -1.5, 0.25]]
SHAPES = [(2,), (2, 2)]


def make_params(values=X0, shapes=SHAPES):
    return [torch.nn.Parameter(torch.tensor(v, dtype=F64).reshape(s))
            for v, s in zip(values, shapes)]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g, dtype=F64).reshape(p.shape)


def sq(vectors):
    """||v||^2 over a list of flat vectors, in plain Python."""
    return sum(v * v for vec in vectors for v in vec)


def axpy(xs, a, ds):
    """xs - a * ds, elementwise over a list of flat vectors (a may be a list, one per vector)."""
    if not isinstance(a, list):
        a = [a] * len(xs)
    return [[x - ai * d for x, d in zip(xv, dv)] for xv, ai, dv in zip(xs, a, ds)]


def check_params(params, expected, tol=TOL):
    for i, (p, e) in enumerate(zip(params, expected)):
        torch.testing.assert_close(p.detach().reshape(-1), torch.tensor(e, dtype=F64), **tol,
                                   msg=lambda m, i=i: f"param[{i}]: {m}")


def check_scalar(opt, name, expected, tol=TOL):
    got = opt.scalars[name]
    assert got.dtype == F64 and got.dim() == 0, (name, got)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), **tol,
                               msg=lambda m: f"scalars[{name!r}]: {m}")


G1 = [[0.3, -0.4], [1.2, 0.0, -0.5, 2.0]]
G2 = [[-1.0, 0.5], [0.25, -0.75, 1.5, 0.0]]
G3 = [[0.2, 0.1], [-0.3, 0.4, 0.0, -0.6]]


# ---- Inexact Polyak ------------------------------------------------------------------------------
def test_inexact_polyak_one_step():
    params = make_params()
    opt = pf.InexactPolyak(params, total_steps=9, lower_bound=0.25, fused=False, foreach=False)
    set_grads(params, G1)
    f = 2.75
    eta = (f - 0.25) / (math.sqrt(9) * sq(G1))   # (f - l*) / (sqrt(T) ||g||^2)
    assert opt.step(loss=f) == f
    check_params(params, axpy(X0, eta, G1))
    check_scalar(opt, "step_size", eta)
    assert opt.scalars["step"].item() == 1 and opt.scalars["skipped"].item() == 0
    # The gradients are read, not modified.
    for p, g in zip(params, G1):
        assert torch.equal(p.grad.reshape(-1), torch.tensor(g, dtype=F64))


def test_inexact_polyak_three_steps_and_lr_multiplier():
    """T is the horizon, not the step index: the factor 1/sqrt(T) is the same on every step."""
    params = make_params()
    opt = pf.InexactPolyak(params, total_steps=16, lower_bound=-0.5, lr=0.5, fused=False, foreach=False)
    x = X0
    for g, f in ((G1, 3.0), (G2, 1.5), (G3, 0.125)):
        set_grads(params, g)
        opt.step(loss=f)
        eta = (f + 0.5) / (4.0 * sq(g))
        x = axpy(x, 0.5 * eta, g)
        check_params(params, x)
        check_scalar(opt, "step_size", eta)   # the step size before the lr multiplier
    assert opt.scalars["step"].item() == 3


def test_inexact_polyak_param_groups_share_one_global_norm():
    params = make_params()
    opt = pf.InexactPolyak([{"params": [params[0]], "lr": 1.0},
                            {"params": [params[1]], "lr": 0.25}], total_steps=4, fused=False, foreach=False)
    set_grads(params, G1)
    opt.step(loss=2.0)
    eta = 2.0 / (2.0 * sq(G1))   # ||g||^2 over BOTH groups
    check_params(params, axpy(X0, [eta, 0.25 * eta], G1))
    # Per-group norms would give group 0 the step 2 / (2 ||g_0||^2) instead: make sure that differs.
    assert abs(2.0 / (2.0 * sq(G1[:1])) - eta) > 0.1


# ---- Polyak / SPS_max ----------------------------------------------------------------------------
@pytest.mark.parametrize("max_lr", [math.inf, 0.05])
def test_polyak_sps_max(max_lr):
    params = make_params()
    opt = pf.Polyak(params, f_star=1.0, c=0.5, max_lr=max_lr, lr=2.0, fused=False, foreach=False)
    x = X0
    for g, f in ((G1, 4.0), (G2, 1.25)):
        set_grads(params, g)
        opt.step(loss=f)
        eta = min((f - 1.0) / (0.5 * sq(g)), max_lr)   # min{(f - f*) / (c ||g||^2), eta_max}
        x = axpy(x, 2.0 * eta, g)
        check_params(params, x)
        check_scalar(opt, "step_size", eta)
    if max_lr == 0.05:   # the cap was active on both steps (otherwise this case tests nothing)
        assert (4.0 - 1.0) / (0.5 * sq(G1)) > 0.05 and (1.25 - 1.0) / (0.5 * sq(G2)) > 0.05


def test_polyak_defaults_are_classic_polyak():
    params = make_params()
    opt = pf.Polyak(params, fused=False, foreach=False)   # f* = 0, c = 1, no cap
    set_grads(params, G2)
    opt.step(loss=0.7)
    check_params(params, axpy(X0, 0.7 / sq(G2), G2))


# ---- DecSPS --------------------------------------------------------------------------------------
def test_decsps_recursion_three_steps():
    c0, gamma_b, lb = 2.0, 0.3, 0.5
    params = make_params()
    opt = pf.DecSPS(params, c0=c0, gamma_b=gamma_b, lower_bound=lb, fused=False, foreach=False)
    check_scalar(opt, "bound", c0 * gamma_b)   # c_{-1} gamma_{-1} = c0 gamma_b
    # ratios (f - l*)/||g||^2 chosen so the min takes c0*gamma_b, then the old bound, then the ratio
    ga = [[1.2, 0.0], [1.6, 0.0, 0.0, 0.0]]      # ||g||^2 = 4,   f = 3.5 -> ratio 0.75 > 0.6
    gb = [[0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]      # ||g||^2 = 0.5, f = 1.5 -> ratio 2.0 > 0.6
    gc = [[1.0, -1.0], [0.0, 0.0, 0.0, 0.0]]     # ||g||^2 = 2,   f = 0.9 -> ratio 0.2 < 0.6
    x, bound, gammas = X0, c0 * gamma_b, []
    for k, (g, f) in enumerate(((ga, 3.5), (gb, 1.5), (gc, 0.9))):
        set_grads(params, g)
        opt.step(loss=f)
        c_k = c0 * math.sqrt(k + 1)
        bound = min((f - lb) / sq(g), bound)      # c_k gamma_k = min{ratio, c_{k-1} gamma_{k-1}}
        gamma = bound / c_k
        x = axpy(x, gamma, g)
        check_params(params, x)
        check_scalar(opt, "bound", bound)
        check_scalar(opt, "step_size", gamma)
        gammas.append(gamma)
    # the min took c0 gamma_b, then kept the old bound, then took the new ratio
    assert gammas == pytest.approx([0.3, 0.6 / (2 * math.sqrt(2)), 0.2 / (2 * math.sqrt(3))],
                                   rel=1e-14)


# ---- AdaSPS --------------------------------------------------------------------------------------
def test_adasps_running_gap_sum_and_non_increasing_eta():
    c_p, lb = 0.5, 0.5
    params = make_params()
    opt = pf.AdaSPS(params, c_p=c_p, lower_bound=lb, fused=False, foreach=False)
    assert opt.scalars["step_size"].item() == math.inf     # eta_{-1} = +inf
    ga = [[1.2, 0.0], [1.6, 0.0, 0.0, 0.0]]      # ||g||^2 = 4
    gb = [[0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]      # ||g||^2 = 0.5
    gc = [[1.0, -1.0], [0.0, 0.0, 0.0, 0.0]]     # ||g||^2 = 2
    x, gap_sum, eta = X0, 0.0, math.inf
    etas = []
    for g, f in ((ga, 2.5), (gb, 4.5), (gc, 1.0)):
        set_grads(params, g)
        opt.step(loss=f)
        gap = f - lb
        gap_sum += gap
        ratio = gap / (c_p * sq(g) * math.sqrt(gap_sum))
        eta = min(ratio, eta)
        etas.append(eta)
        x = axpy(x, eta, g)
        check_params(params, x)
        check_scalar(opt, "gap_sum", gap_sum)
        check_scalar(opt, "step_size", eta)
    # step 0 took the ratio 1/sqrt(2); step 1's ratio (6.5) was larger, so eta stayed; step 2 fell
    assert etas[0] == etas[1] == pytest.approx(1 / math.sqrt(2), rel=1e-14)
    assert etas[2] == pytest.approx(0.5 / math.sqrt(6.5), rel=1e-14)


# ---- DoG -----------------------------------------------------------------------------------------
def test_dog_three_steps_with_coupled_weight_decay():
    reps_rel, wd, lr = 1e-2, 0.1, 3.0
    x0 = [[3.0, 0.0], [0.0, 4.0, 0.0, 0.0]]      # ||x0|| = 5
    params = make_params(x0)
    opt = pf.DoG(params, reps_rel=reps_rel, lr=lr, weight_decay=wd, fused=False, foreach=False)
    x, G = x0, 0.0
    rbar = reps_rel * (1 + 5.0)                  # r_eps = reps_rel (1 + ||x0||) = 0.06
    for t, g in enumerate((G1, G2, G3)):
        set_grads(params, g)
        opt.step()                               # the loss is optional for DoG
        d = [[gi + wd * xi for gi, xi in zip(gv, xv)] for gv, xv in zip(g, x)]   # coupled WD
        dist = math.sqrt(sq([[a - b for a, b in zip(xv, x0v)] for xv, x0v in zip(x, x0)]))
        rbar = max(rbar, dist)                   # rbar_t = max(rbar_{t-1}, ||x_t - x_0||)
        G += sq(d) + (1e-8 if t == 0 else 0.0)   # G_0 = ||d_0||^2 + 1e-8
        eta = rbar / math.sqrt(G)
        x = axpy(x, lr * eta, d)
        check_params(params, x)
        check_scalar(opt, "rbar", rbar)
        check_scalar(opt, "G", G)
        check_scalar(opt, "step_size", eta)
        if t == 1:   # lr = 3 moved x_1 3 * r_eps away: the distance, not r_eps, is now the max
            assert rbar > 0.15
    assert torch.equal(opt.state[params[1]]["x0"].reshape(-1), torch.tensor(x0[1], dtype=F64))


def test_dog_first_step_without_weight_decay():
    params = make_params()
    opt = pf.DoG(params, fused=False, foreach=False)            # reps_rel = 1e-6
    set_grads(params, G2)
    opt.step(loss=1.0)
    r_eps = 1e-6 * (1 + math.sqrt(sq(X0)))
    eta = r_eps / math.sqrt(sq(G2) + 1e-8)
    check_params(params, axpy(X0, eta, G2))
    check_scalar(opt, "rbar", r_eps)


# ---- ClippedSGD ----------------------------------------------------------------------------------
def test_clipped_sgd_one_step_by_hand():
    params = make_params()
    opt = pf.ClippedSGD(params, lr=0.1, max_norm=1.0, fused=False, foreach=False)
    set_grads(params, G1)
    opt.step()
    norm = math.sqrt(sq(G1))
    coef = min(1.0, 1.0 / (norm + 1e-6))
    assert coef < 0.5                            # this step is clipped
    check_params(params, axpy(X0, 0.1 * coef, G1))
    check_scalar(opt, "grad_norm", norm)
    check_scalar(opt, "clip_coef", coef)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("max_norm", [math.inf, 1.5])
def test_clipped_sgd_equals_clip_grad_norm_plus_torch_sgd(momentum, max_norm):
    torch.manual_seed(0)
    shapes = [(3,), (2, 5), (7,)]
    ref = [torch.nn.Parameter(torch.randn(s, dtype=F64)) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.03}]   # noqa: E731
    torch_opt = torch.optim.SGD(groups(ref), lr=0.1, momentum=momentum)
    opt = pf.ClippedSGD(groups(ours), lr=0.1, max_norm=max_norm, momentum=momentum, fused=False, foreach=False)
    clipped = 0
    for step in range(6):
        scale = 0.2 if step % 2 else 1.0         # alternate clipped and unclipped steps
        grads = [torch.randn(s, dtype=F64) * scale for s in shapes]
        for p, q, g in zip(ref, ours, grads):
            p.grad, q.grad = g.clone(), g.clone()
        total = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        clipped += bool(total > max_norm)
        torch_opt.step()
        opt.step()
        for i, (p, q) in enumerate(zip(ref, ours)):
            # equal up to rounding: torch.optim.SGD and clip_grad_norm_ round in another order
            # (1 ulp differences seen even with max_norm=inf, momentum 0)
            torch.testing.assert_close(q, p, rtol=1e-14, atol=1e-15,
                                       msg=lambda m: f"step {step} p{i}: {m}")
            assert_bitwise_equal(q.grad, grads[i], f"step {step}: .grad[{i}] must stay untouched")
            if momentum:
                torch.testing.assert_close(opt.state[q]["momentum_buffer"],
                                           torch_opt.state[p]["momentum_buffer"],
                                           rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(opt.scalars["grad_norm"], total, rtol=1e-14, atol=0)
    assert clipped == (3 if max_norm == 1.5 else 0), clipped


# ---- NSGDM ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["constant", "agnostic"])
def test_nsgdm_three_steps(schedule):
    beta, lr = 0.8, 0.1
    params = make_params()
    opt = pf.NSGDM(params, lr=lr, beta=beta, schedule=schedule, fused=False, foreach=False)
    x = X0
    m = [[0.0] * len(v) for v in X0]
    for t, g in enumerate((G1, G2, G3), start=1):
        set_grads(params, g)
        opt.step()
        if schedule == "agnostic":
            beta_t, s_t = 1 - t ** -0.5, t ** -0.75   # beta_1 = 0: m_1 = g_1
        else:
            beta_t, s_t = beta, 1.0
        m = [[beta_t * mi + (1 - beta_t) * gi for mi, gi in zip(mv, gv)] for mv, gv in zip(m, g)]
        eta = s_t / math.sqrt(sq(m))
        x = axpy(x, lr * eta, m)
        check_params(params, x)
        check_scalar(opt, "step_size", eta)
        for p, mv in zip(params, m):
            torch.testing.assert_close(opt.state[p]["momentum_buffer"].reshape(-1),
                                       torch.tensor(mv, dtype=F64), **TOL)
        # a normalized step: the parameters moved exactly lr * s_t
        step_len = math.sqrt(sq([[lr * eta * mi for mi in mv] for mv in m]))
        assert step_len == pytest.approx(lr * s_t, rel=1e-12)



# ---- MoMo / MoMo-Adam ----------------------------------------------------------------------------
def dot(a, b):
    """<a, b> over a list of flat vectors, in plain Python."""
    return sum(ai * bi for av, bv in zip(a, b) for ai, bi in zip(av, bv))


@pytest.mark.parametrize("bias_correction, lr", [(False, 0.3), (True, 0.5)])
def test_momo_three_steps_with_weight_decay(bias_correction, lr):
    """(The lrs are chosen so that both branches of tau = min(lr / rho, t) are taken.)"""
    beta, wd, lb = 0.8, 0.1, 0.25
    capped = []
    params = make_params()
    opt = pf.MoMo(params, lr=lr, weight_decay=wd, beta=beta, lb=lb,
                  bias_correction=bias_correction, fused=False, foreach=False)
    x = X0
    for k, (g, f) in enumerate(((G1, 3.0), (G2, 1.5), (G3, 0.75)), start=1):
        set_grads(params, g)
        opt.step(loss=f)
        if k == 1:   # the averages start at 0, or (without bias correction) at the first values
            d, f_avg, gamma = ([[0.0] * len(v) for v in g], 0.0, 0.0) if bias_correction else \
                (g, f, dot(g, x))
        d = [[beta * di + (1 - beta) * gi for di, gi in zip(dv, gv)] for dv, gv in zip(d, g)]
        f_avg = beta * f_avg + (1 - beta) * f
        gamma = beta * gamma + (1 - beta) * dot(g, x)
        rho = 1 - beta ** k if bias_correction else 1.0
        w = 1 + lr * wd
        t = max(w * (f_avg - rho * lb) + dot(d, x) - w * gamma, 0.0) / sq(d)
        tau = min(lr / rho, t)
        capped.append(tau == lr / rho)
        x = [[xi / w for xi in xv] for xv in axpy(x, tau, d)]
        check_params(params, x)
        check_scalar(opt, "step_size", tau)
        check_scalar(opt, "loss_avg", f_avg)
        check_scalar(opt, "grad_dot_w", gamma)
        for p, dv in zip(params, d):
            torch.testing.assert_close(opt.state[p]["grad_avg"].reshape(-1),
                                       torch.tensor(dv, dtype=F64), **TOL)
    assert set(capped) == {True, False}, capped


@pytest.mark.parametrize("lr, capped", [(0.05, True), (2.0, False)])
@pytest.mark.parametrize("divide", [True, False])
def test_momo_adam_two_steps_with_weight_decay(divide, lr, capped):
    (b1, b2), eps, wd = (0.8, 0.9), 1e-3, 0.1
    params = make_params()
    opt = pf.MoMoAdam(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, divide=divide,
                      fused=False, foreach=False)
    x = X0
    d = [[0.0] * len(v) for v in X0]
    v = [[0.0] * len(v) for v in X0]
    f_avg = gamma = 0.0
    for k, (g, f) in enumerate(((G1, 3.0), (G2, 1.5)), start=1):
        set_grads(params, g)
        opt.step(loss=f)
        d = [[b1 * di + (1 - b1) * gi for di, gi in zip(dv, gv)] for dv, gv in zip(d, g)]
        v = [[b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(vv, gv)] for vv, gv in zip(v, g)]
        D = [[math.sqrt(vi / (1 - b2 ** k)) + eps for vi in vv] for vv in v]
        f_avg = b1 * f_avg + (1 - b1) * f
        gamma = b1 * gamma + (1 - b1) * dot(g, x)
        rho = 1 - b1 ** k
        w = 1 + lr * wd
        weighted = sum(di * di / Di for dv, Dv in zip(d, D) for di, Di in zip(dv, Dv))
        tau = min(lr / rho, max(w * f_avg + dot(d, x) - w * gamma, 0.0) / weighted)   # lb = 0
        step = [[di / Di for di, Di in zip(dv, Dv)] for dv, Dv in zip(d, D)]
        if divide:
            x = [[xi / w for xi in xv] for xv in axpy(x, tau, step)]
        else:
            x = axpy([[xi * (1 - lr * wd) for xi in xv] for xv in x], tau, step)
        check_params(params, x)
        check_scalar(opt, "step_size", tau)
        for p, dv, vv in zip(params, d, v):
            torch.testing.assert_close(opt.state[p]["grad_avg"].reshape(-1),
                                       torch.tensor(dv, dtype=F64), **TOL)
            torch.testing.assert_close(opt.state[p]["grad_avg_sq"].reshape(-1),
                                       torch.tensor(vv, dtype=F64), **TOL)
    assert (tau == pytest.approx(lr / rho, rel=1e-14)) == capped, (tau, lr / rho)

# ---- one global norm for every method ------------------------------------------------------------
# (MoMo's lr is not a multiplier but the cap of tau = min(lr / rho, t): a group with a quarter of
# the lr moves a quarter as far only when capped. tests/test_momo.py checks its param groups
# against momo-opt's per-group tau.)
LR_MULTIPLIES = [(i, f) for i, f in zip(OPTIMIZER_IDS, OPTIMIZER_FACTORIES)
                 if i not in LR_IS_A_CAP_IDS]


@pytest.mark.parametrize("factory", [f for _, f in LR_MULTIPLIES],
                         ids=[i for i, _ in LR_MULTIPLIES])
def test_param_groups_share_one_global_norm(factory):
    """One step with groups lr (1, 0.25) moves group 0 exactly as the one-group run and group 1
    exactly a quarter as far: the step size is one global quantity, lr only scales it."""
    def one_step(split):
        params = make_params()
        if split:   # group 1 added with a quarter of the optimizer's lr
            opt = factory(params[:1])
            opt.add_param_group({"params": params[1:], "lr": 0.25 * opt.defaults["lr"]})
        else:
            opt = factory(params)
        set_grads(params, G1)
        opt.step(loss=2.0)
        return [p.detach() - torch.tensor(x, dtype=F64).reshape(p.shape)
                for p, x in zip(params, X0)]

    single = one_step(split=False)
    split = one_step(split=True)
    assert single[0].abs().sum() > 0 and single[1].abs().sum() > 0
    # displacements are differences of numbers of size ~3: compare them to a few ulps of x
    torch.testing.assert_close(split[0], single[0], rtol=1e-13, atol=2e-15)
    torch.testing.assert_close(split[1], 0.25 * single[1], rtol=1e-13, atol=2e-15)


# ---- guards --------------------------------------------------------------------------------------
NO_WEIGHT_DECAY = [(i, f) for i, f in zip(OPTIMIZER_IDS, OPTIMIZER_FACTORIES)
                   if i not in WEIGHT_DECAY_IDS]


@pytest.mark.parametrize("factory", [f for _, f in NO_WEIGHT_DECAY],
                         ids=[i for i, _ in NO_WEIGHT_DECAY])
def test_exactly_zero_gradient_gives_zero_step(factory):
    """(With weight decay the parameters move anyway: DoG's direction g + lambda x is not zero,
    MoMo's proximal step divides x by 1 + lr lambda; those configurations are left out.)"""
    params = make_params()
    opt = factory(params)
    set_grads(params, [[0.0] * len(v) for v in X0])
    opt.step(loss=1.5)
    for p, x in zip(params, X0):
        assert torch.equal(p.detach().reshape(-1), torch.tensor(x, dtype=F64))
    for name, v in opt.scalars.items():
        assert not torch.isnan(v), f"scalars[{name!r}] is NaN after a zero gradient"
    assert opt.scalars["step"].item() == 1 and opt.scalars["skipped"].item() == 0
    if isinstance(opt, (pf.InexactPolyak, pf.Polyak, pf.DecSPS, pf.NSGDM)):
        assert opt.scalars["step_size"].item() == 0.0
    if isinstance(opt, pf.AdaSPS):   # the ratio counts as +inf: eta keeps eta_{-1} = +inf
        assert opt.scalars["step_size"].item() == math.inf
    if isinstance(opt, pf.DoG):      # eta = r_eps / sqrt(1e-8) is finite; it multiplies d = 0
        assert math.isfinite(opt.scalars["step_size"].item())
    if isinstance(opt, (pf.MoMo, pf.MoMoAdam)):   # t = +inf: tau is the cap lr / rho; d = 0
        rho = 1 - 0.9 if isinstance(opt, pf.MoMoAdam) else 1.0
        assert opt.scalars["step_size"].item() == pytest.approx(opt.defaults["lr"] / rho)
    # the next, ordinary step is a finite, real step
    set_grads(params, G1)
    opt.step(loss=1.5)
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p.detach().reshape(-1), torch.tensor(x, dtype=F64))
               for p, x in zip(params, X0))


@pytest.mark.parametrize("cls, kwargs", [
    (pf.InexactPolyak, dict(total_steps=10, lower_bound=0.5)),
    (pf.Polyak, dict(f_star=0.5)),
    (pf.DecSPS, dict(lower_bound=0.5)),
    (pf.AdaSPS, dict(lower_bound=0.5)),
], ids=["inexact_polyak", "polyak", "decsps", "adasps"])
def test_loss_below_lower_bound_gives_zero_step(cls, kwargs):
    params = make_params()
    opt = cls(params, fused=False, foreach=False, **kwargs)
    set_grads(params, G1)
    opt.step(loss=0.25)                         # f < l*: (f - l*)_+ = 0
    for p, x in zip(params, X0):
        assert torch.equal(p.detach().reshape(-1), torch.tensor(x, dtype=F64))
    assert opt.scalars["step_size"].item() == 0.0
    assert opt.scalars["step"].item() == 1


BAD_INPUTS = {
    "nan_loss": lambda params: (G2, math.nan),
    "inf_loss": lambda params: (G2, math.inf),
    "neg_inf_loss": lambda params: (G2, -math.inf),
    "nan_in_one_grad": lambda params: ([G2[0], [0.1, math.nan, 0.2, 0.3]], 1.0),
    "inf_in_one_grad": lambda params: ([[math.inf, 0.0], G2[1]], 1.0),
}


@pytest.mark.parametrize("bad", list(BAD_INPUTS))
@pytest.mark.parametrize("factory", OPTIMIZER_FACTORIES, ids=OPTIMIZER_IDS)
def test_non_finite_input_skips_step_bitwise(factory, bad):
    params = make_params()
    opt = factory(params)
    for g, f in ((G1, 2.0), (G3, 1.0)):          # two ordinary steps first: state exists
        set_grads(params, g)
        opt.step(loss=f)
    before = snapshot(opt)
    grads, loss = BAD_INPUTS[bad](params)
    set_grads(params, grads)
    assert opt.step(loss=loss) is not None       # no exception
    after = snapshot(opt)
    assert_same_snapshot(after, before, ignore_scalars=("skipped",), what=f"{bad}: ")
    assert after["scalars"]["skipped"].item() == before["scalars"]["skipped"].item() + 1
    assert after["scalars"]["step"].item() == 2
    # and the optimizer goes on normally
    set_grads(params, G2)
    opt.step(loss=1.5)
    assert opt.scalars["step"].item() == 3 and opt.scalars["skipped"].item() == 1
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("factory", OPTIMIZER_FACTORIES, ids=OPTIMIZER_IDS)
def test_non_finite_first_step_leaves_parameters_unchanged(factory):
    params = make_params()
    opt = factory(params)
    set_grads(params, [[math.nan, 0.0], G1[1]])
    opt.step(loss=1.0)
    for p, x in zip(params, X0):
        assert torch.equal(p.detach().reshape(-1), torch.tensor(x, dtype=F64))
    assert opt.scalars["step"].item() == 0 and opt.scalars["skipped"].item() == 1


# ---- ways of passing the loss --------------------------------------------------------------------
@pytest.mark.parametrize("cls, kwargs", [
    (pf.InexactPolyak, dict(total_steps=7)), (pf.Polyak, {}), (pf.DecSPS, {}), (pf.AdaSPS, {}),
], ids=["inexact_polyak", "polyak", "decsps", "adasps"])
def test_loss_as_float_0d_tensor_1_element_tensor_or_closure(cls, kwargs):
    f = 1.8125
    results = {}
    for how in ("float", "0d", "1elem", "closure"):
        params = make_params()
        opt = cls(params, fused=False, foreach=False, **kwargs)
        set_grads(params, G1)
        if how == "float":
            ret = opt.step(loss=f)
        elif how == "0d":
            ret = opt.step(loss=torch.tensor(f, dtype=F64))
        elif how == "1elem":
            ret = opt.step(loss=torch.tensor([f], dtype=F64))
        else:
            calls = []

            def closure():
                calls.append(torch.is_grad_enabled())
                for p in params:
                    p.grad = None
                loss = sum((p * torch.tensor(g, dtype=F64).reshape(p.shape)).sum()
                           for p, g in zip(params, G1))   # d loss / d p = G1
                loss = loss - loss.detach() + f           # value f, gradient G1
                loss.backward()
                return loss
            ret = opt.step(closure)
            assert calls == [True], "the closure runs once, with grad enabled"
        assert float(ret.detach() if torch.is_tensor(ret) else ret) == f
        results[how] = [p.detach().clone() for p in params]
    moved = any(not torch.equal(a.reshape(-1), torch.tensor(x, dtype=F64))
                for a, x in zip(results["float"], X0))
    assert moved
    for how in ("0d", "1elem", "closure"):
        for i, (a, b) in enumerate(zip(results[how], results["float"])):
            assert_bitwise_equal(a, b, f"{how} vs float: param[{i}]")


# ---- Inexact Polyak best iterate (Algorithm 1) ---------------------------------------------------
def test_track_best_semantics():
    params = make_params()
    opt = pf.InexactPolyak(params, total_steps=4, track_best=True, fused=False, foreach=False)
    assert opt.best_loss.item() == math.inf
    losses = [5.0, 3.0, 3.0, 4.0]                # a tie at t = 1, 2: '<=' keeps the newer x_2
    iterates = []
    for g, f in zip((G1, G2, G3, G1), losses):
        iterates.append([p.detach().clone() for p in params])   # x_t, whose loss is f
        set_grads(params, g)
        opt.step(loss=f)
    x_last = [p.detach().clone() for p in params]
    assert opt.best_loss.item() == 3.0
    for p, b in zip(params, iterates[2]):
        assert_bitwise_equal(opt.state[p]["best"], b, "x_best after the tie")

    opt.load_best()                              # no loss: the best of x_0..x_3
    for i, (p, b) in enumerate(zip(params, iterates[2])):
        assert_bitwise_equal(p.detach(), b, f"load_best() param[{i}]")
    assert opt.best_loss.item() == 3.0

    for p, x in zip(params, x_last):            # back to x_4, which no step has seen
        p.data.copy_(x)
    opt.load_best(loss=10.0)                     # worse than 3: x_2 again
    for p, b in zip(params, iterates[2]):
        assert_bitwise_equal(p.detach(), b, "load_best(loss=10)")
    assert opt.best_loss.item() == 3.0

    for p, x in zip(params, x_last):
        p.data.copy_(x)
    opt.load_best(loss=float("nan"))             # a non-finite loss never wins
    for p, b in zip(params, iterates[2]):
        assert_bitwise_equal(p.detach(), b, "load_best(loss=nan)")

    for p, x in zip(params, x_last):
        p.data.copy_(x)
    opt.load_best(loss=torch.tensor(3.0, dtype=F64))   # a tie: '<=' takes the last iterate
    for p, x in zip(params, x_last):
        assert_bitwise_equal(p.detach(), x, "load_best(loss=3) tie")
        assert_bitwise_equal(opt.state[p]["best"], x, "x_best after load_best(loss=3)")
    assert opt.best_loss.item() == 3.0

    opt.load_best(loss=1.0)                      # strictly better
    assert opt.best_loss.item() == 1.0


def test_track_best_starts_from_x0_and_skips_non_finite():
    params = make_params()
    opt = pf.InexactPolyak(params, total_steps=4, track_best=True, fused=False, foreach=False)
    set_grads(params, G1)
    opt.step(loss=2.0)                           # f(x_0) = 2 <= inf: x_best = x_0
    for p, x in zip(params, X0):
        assert torch.equal(opt.state[p]["best"].reshape(-1), torch.tensor(x, dtype=F64))
    set_grads(params, G2)
    opt.step(loss=-math.inf)                     # skipped: best untouched
    assert opt.best_loss.item() == 2.0
    assert opt.scalars["skipped"].item() == 1


def test_load_best_needs_track_best():
    params = make_params()
    opt = pf.InexactPolyak(params, total_steps=4, fused=False, foreach=False)
    with pytest.raises(RuntimeError, match="track_best"):
        opt.load_best()
