"""MoMo and MoMo-Adam against the official implementation, momo-opt 0.1.0 (`momo.Momo`,
`momo.MomoAdam`), step by step in float64, then one test for each deliberate difference listed
in the class docstrings.

The problem: parameters of ragged shapes (one element, odd sizes, a 3-d tensor), a stochastic
quadratic f(x) = 1/2 sum_i w_i ||x_i - c_i||^2 + 0.05 with fresh random weights w_i every step and
its exact gradient, so that the loss and the gradient belong to the same function (the regime
MoMo's model is built for). STEPS = 12 so that the averages, the bias corrections and the online
lower bound run through many recursions after their first-step special cases. Both runs are fed
the same weights; each computes f and g at its own parameters.

momo-opt makes its <g, x> averages with the default dtype (`torch.zeros(1)`, `torch.tensor(0.)`),
float32, whatever the parameters' dtype; its runs here are made under torch's default dtype
float64, so that they are float64 end to end. Its step size tau (a local variable) is read by
wrapping the `min` its step calls (`tau = min(lr / rho, t1)`, one call per param group).

Tolerance: 1e-12 relative, elementwise, for everything compared (parameters, every buffer, tau,
the averaged loss f̄, gamma, lb), where an element's size is floored at 1e-3 of the largest
element of its tensor: an element that is a difference of terms of size 1 (x - tau d near 0, a
momentum average that changes sign) carries their rounding, 1e-16 absolute, whatever its own
size. Measured: at most 1.6e-13.
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import math
import warnings

import momo as momo_opt
import momo.momo as momo_opt_momo
import momo.momo_adam as momo_opt_adam
import pytest
import torch

import polyak_fused as pf
from eager_helpers import assert_bitwise_equal, assert_same_snapshot, snapshot
from polyak_fused import _optimizer
from test_watch_loss import NoHostSync

F64 = torch.float64
SHAPES = [(3, 5), (1,), (7,), (2, 3, 4), (13,)]
STEPS = 12
RTOL = 1e-12
FLOOR = 1e-3   # an element's size, for its relative error, is at least 1e-3 of the largest one's


# ---- the problem and the two runs ---------------------------------------------------------------
@contextlib.contextmanager
def default_dtype(dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


class Quadratic:
    """f(x) = 1/2 sum_i w_i ||x_i - c_i||^2 + 0.05, w_i ~ U(0.5, 2) drawn afresh every step."""

    def __init__(self, seed=0, shapes=SHAPES):
        gen = torch.Generator().manual_seed(seed)
        self.x0 = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
        self.targets = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
        self.weights = [[0.5 + 1.5 * torch.rand((), generator=gen, dtype=F64).item()
                         for _ in shapes] for _ in range(STEPS)]

    def params(self, dtype=F64):
        return [torch.nn.Parameter(x.clone().to(dtype)) for x in self.x0]

    def loss_and_grads(self, params, t):
        """Sets each .grad to the gradient of step t's loss at params; returns the loss."""
        w = self.weights[t]
        loss = torch.zeros((), dtype=F64)
        for p, c, wi in zip(params, self.targets, w):
            r = p.detach() - c
            loss = loss + 0.5 * wi * (r * r).sum()
            p.grad = (wi * r).to(p.dtype)
        return loss + 0.05


def grouped(params, lrs):
    """One group (lrs None) or two: the first two tensors and the rest, with these lrs."""
    if lrs is None:
        return params
    return [{"params": params[:2], "lr": lrs[0]}, {"params": params[2:], "lr": lrs[1]}]


class OfficialRun:
    """momo-opt's optimizer, float64 throughout, with its step sizes recorded."""

    def __init__(self, cls, params, kwargs, monkeypatch):
        self.taus = []        # per step: [(cap, t1), ...] one pair per param group
        module = momo_opt_momo if cls is momo_opt.Momo else momo_opt_adam

        def recording_min(cap, t1):
            self.taus[-1].append((cap, t1))
            return builtins.min(cap, t1)

        monkeypatch.setattr(module, "min", recording_min, raising=False)
        with default_dtype(F64):
            self.opt = cls(params, **kwargs)
        self.params = [q for g in self.opt.param_groups for q in g["params"]]

    def step(self, loss):
        self.taus.append([])
        with default_dtype(F64), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="More than one param group")
            self.opt.step(loss=loss)

    def tau(self):
        cap, t1 = self.taus[-1][0]
        return builtins.min(cap, t1)

    def gamma(self):
        return sum(self.opt.state[p]["grad_dot_w"].reshape(()) for p in self.params)

    def buffer(self, p, name):
        return self.opt.state[p][name]


def assert_rel(actual, expected, what, rtol=RTOL, floor=FLOOR):
    a = torch.as_tensor(actual, dtype=F64).reshape(-1)
    e = torch.as_tensor(expected, dtype=F64).reshape(-1)
    assert a.shape == e.shape, what
    err = (a - e).abs()
    size = e.abs().clamp(min=floor * e.abs().max().item())
    bad = ~(err <= rtol * size)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {a.numel()} differ; [{i}] "
                             f"{a[i].item()!r} vs {e[i].item()!r}, rel {err[i] / size[i]:.3g}")


# (id, our class, official class, the keyword arguments of both, lrs of two groups or None)
PARITY = [
    ("momo", pf.MoMo, momo_opt.Momo, dict(lr=0.1), None),
    ("momo_groups_weight_decay", pf.MoMo, momo_opt.Momo, dict(weight_decay=0.05), (1.0, 0.01)),
    ("momo_bias_correction_groups", pf.MoMo, momo_opt.Momo,
     dict(weight_decay=0.05, bias_correction=True), (1.0, 0.01)),
    ("momo_fstar", pf.MoMo, momo_opt.Momo, dict(lr=0.1, lb=0.02, use_fstar=True), None),
    ("momo_fstar_bias_correction_wd", pf.MoMo, momo_opt.Momo,
     dict(lr=0.1, lb=0.01, weight_decay=0.05, bias_correction=True, use_fstar=True), None),
    ("momo_adam_groups", pf.MoMoAdam, momo_opt.MomoAdam, dict(), (2.0, 0.01)),
    ("momo_adam_groups_weight_decay", pf.MoMoAdam, momo_opt.MomoAdam,
     dict(weight_decay=0.05, betas=(0.8, 0.99), eps=1e-6), (2.0, 0.01)),
    ("momo_adam_adamw_style", pf.MoMoAdam, momo_opt.MomoAdam,
     dict(weight_decay=0.05, divide=False), (2.0, 0.01)),
    ("momo_adam_fstar", pf.MoMoAdam, momo_opt.MomoAdam,
     dict(lr=0.5, lb=0.02, weight_decay=0.05, use_fstar=True), None),
]


@pytest.mark.parametrize("ours_cls, official_cls, kwargs, lrs",
                         [p[1:] for p in PARITY], ids=[p[0] for p in PARITY])
def test_step_by_step_equal_to_momo_opt(ours_cls, official_cls, kwargs, lrs, monkeypatch):
    problem = Quadratic()
    ours_params, official_params = problem.params(), problem.params()
    ours = ours_cls(grouped(ours_params, lrs), **kwargs, fused=False, foreach=False)
    official = OfficialRun(official_cls, grouped(official_params, lrs), kwargs, monkeypatch)
    buffers = ours.BUFFERS
    regimes, lbs = set(), []
    for t in range(STEPS):
        ours.step(loss=problem.loss_and_grads(ours_params, t))
        official.step(problem.loss_and_grads(official_params, t))
        at = f"step {t + 1}"
        for i, (p, q) in enumerate(zip(ours_params, official_params)):
            assert_rel(p.detach(), q.detach(), f"{at}: param[{i}]")
            for name in buffers:
                assert_rel(ours.state[p][name], official.buffer(q, name), f"{at}: {name}[{i}]")
        s = ours.scalars
        assert_rel(s["step_size"], official.tau(), f"{at}: tau")
        assert_rel(s["loss_avg"], official.opt.loss_avg, f"{at}: loss_avg")
        assert_rel(s["grad_dot_w"], official.gamma(), f"{at}: gamma")
        assert_rel(s["lb"], official.opt.lb, f"{at}: lb")
        regimes |= {"cap" if cap <= t1 else "polyak" for cap, t1 in official.taus[-1]}
        lbs.append(official.opt.lb)
    assert int(s["step"]) == STEPS and int(s["skipped"]) == 0
    # the comparison went through both branches of tau = min(cap, t1)
    assert regimes == {"cap", "polyak"}, regimes
    if kwargs.get("use_fstar"):
        assert len(set(lbs)) > STEPS // 2 and min(lbs) >= kwargs["lb"], lbs


@pytest.mark.parametrize("ours_cls, official_cls", [(pf.MoMo, momo_opt.Momo),
                                                    (pf.MoMoAdam, momo_opt.MomoAdam)])
def test_arguments_and_defaults_are_momo_opts(ours_cls, official_cls):
    """Switching from momo-opt is a change of the import: same names, same defaults, in the same
    order; ours adds only keyword-only arguments."""
    official = inspect.signature(official_cls).parameters
    ours = inspect.signature(ours_cls).parameters
    positional = [n for n, p in ours.items() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert positional == list(official)
    for name, p in official.items():
        if p.default is not inspect.Parameter.empty:
            assert ours[name].default == p.default, name
    assert {n for n in ours if n not in official} == {"fused", "foreach", "process_group", "average_loss"}


@pytest.mark.parametrize("cls, kwargs", [(pf.MoMo, {}), (pf.MoMoAdam, dict(lr=0.5))])
def test_float32_follows_the_float64_run(cls, kwargs):
    """The float32 reference (math in float32, scalars in float32) tracks the float64 one."""
    problem = Quadratic()
    runs = {}
    for dtype in (F64, torch.float32):
        params = problem.params(dtype)
        opt = cls(params, **kwargs, fused=False, foreach=False)
        for t in range(STEPS):
            opt.step(loss=problem.loss_and_grads(params, t))
        runs[dtype] = params
    for i, (a, e) in enumerate(zip(runs[torch.float32], runs[F64])):
        # relative to the tensor's largest element; measured: 2.5e-7
        assert_rel(a, e, f"param[{i}]", rtol=1e-5, floor=1.0)



@pytest.mark.parametrize("cls, kwargs", [(pf.MoMo, dict(weight_decay=0.05, use_fstar=True)),
                                         (pf.MoMoAdam, dict(weight_decay=0.05, divide=False))])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_a_tensor_lr_is_the_float_lr(cls, kwargs, dtype):
    """lr as a one-element tensor (read on the device, for CUDA graphs) takes the same steps as
    the same number, bitwise."""
    problem = Quadratic()
    runs = []
    for make in (float, lambda v: torch.tensor([v], dtype=dtype)):
        params = problem.params(dtype)
        opt = cls(grouped(params, (make(1.0), make(0.01))), **kwargs, fused=False, foreach=False)
        for t in range(4):
            opt.step(loss=problem.loss_and_grads(params, t))
        runs.append(snapshot(opt))
    assert_same_snapshot(runs[1], runs[0], what="tensor lr vs float lr: ")


# ---- the first step -----------------------------------------------------------------------------
@pytest.mark.parametrize("cls, kwargs", [(pf.MoMo, {}), (pf.MoMo, dict(bias_correction=True)),
                                         (pf.MoMoAdam, {})])
def test_a_skipped_first_step_leaves_the_next_one_first(cls, kwargs):
    """The first-step start of the averages (d = g_1, f̄ = f_1, gamma = <g_1, x_1> without bias
    correction) is chosen on the device from the step count: after a skipped (non-finite) first
    step, the next step is a first step, bitwise the one a fresh optimizer takes."""
    problem = Quadratic()
    params, fresh_params = problem.params(), problem.params()
    opt = cls(params, **kwargs, fused=False, foreach=False)
    fresh = cls(fresh_params, **kwargs, fused=False, foreach=False)
    problem.loss_and_grads(params, 0)
    opt.step(loss=math.nan)
    assert int(opt.scalars["skipped"]) == 1 and int(opt.scalars["step"]) == 0
    opt.step(loss=problem.loss_and_grads(params, 0))
    fresh.step(loss=problem.loss_and_grads(fresh_params, 0))
    assert_same_snapshot(snapshot(opt), snapshot(fresh), ignore_scalars=("skipped",),
                         what="after a skipped first step: ")


# ---- deliberate differences from momo-opt --------------------------------------------------------
@pytest.mark.parametrize("ours_cls, official_cls, kwargs", [
    (pf.MoMo, momo_opt.Momo, dict(weight_decay=0.05, bias_correction=True, use_fstar=True)),
    (pf.MoMoAdam, momo_opt.MomoAdam, dict(weight_decay=0.05, use_fstar=True)),
    (pf.MoMoAdam, momo_opt.MomoAdam, dict(weight_decay=0.05, divide=False)),
], ids=["momo", "momo_adam_fstar", "momo_adam_adamw"])
def test_no_host_sync_in_step(ours_cls, official_cls, kwargs):
    """.item(), .tolist(), .cpu() and the conversions to bool/float/int raise inside step()
    (torch.cuda.set_sync_debug_mode does the same on a GPU: test_fused_true_is_refused_... below).
    Ours steps; momo-opt, under the same guard, fails at its first .item()."""
    problem = Quadratic()
    params = problem.params()
    opt = ours_cls(grouped(params, (1.0, 0.01)) if not kwargs.get("use_fstar") else params,
                   **kwargs, fused=False, foreach=False)
    guard = NoHostSync(opt)
    try:
        for t in range(3):
            opt.step(loss=problem.loss_and_grads(params, t))
    finally:
        guard.allow()
    assert int(opt.scalars["step"]) == 3
    official_params = problem.params()
    with default_dtype(F64):
        official = official_cls(official_params, **kwargs)
    guard = NoHostSync(official)
    try:
        with pytest.raises(AssertionError, match="host sync inside step"):
            official.step(loss=problem.loss_and_grads(official_params, 0))
    finally:
        guard.allow()


@pytest.mark.parametrize("ours_cls, official_cls, name, values", [
    (pf.MoMo, momo_opt.Momo, "weight_decay", (0.0, 0.1)),
    (pf.MoMoAdam, momo_opt.MomoAdam, "weight_decay", (0.0, 0.1)),
    (pf.MoMoAdam, momo_opt.MomoAdam, "eps", (1e-8, 1e-6)),
    (pf.MoMoAdam, momo_opt.MomoAdam, "betas", ((0.9, 0.999), (0.8, 0.999))),
])
def test_hyperparameters_other_than_lr_are_global(ours_cls, official_cls, name, values):
    """momo-opt reads these per param group (weight_decay, eps, betas); here they define the one
    global step, and param groups that disagree are refused with the value named."""
    problem = Quadratic()
    official_params = problem.params()
    with default_dtype(F64):
        official = official_cls([{"params": official_params[:2], name: values[0]},
                                 {"params": official_params[2:], name: values[1]}])
    with default_dtype(F64), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="More than one param group")
        official.step(loss=problem.loss_and_grads(official_params, 0))   # momo-opt takes them
    params = problem.params()
    with pytest.raises(ValueError, match=rf"Invalid {name}: {re_escape(values[1])} in a param "
                                         rf"group"):
        ours_cls([{"params": params[:2], name: values[0]},
                  {"params": params[2:], name: values[1]}], fused=False, foreach=False)


def re_escape(value):
    import re
    return re.escape(repr(value) if isinstance(value, tuple) else str(value))


def test_momo_parameter_without_gradient():
    """torch.optim's rule: a parameter whose .grad is None is not stepped, keeps its buffer, and
    is left out of the sums; gamma is the one global average, so it decays the past of that
    parameter too. momo-opt's Momo raises (it reads p.grad.data)."""
    beta, lr = 0.9, 0.5
    problem = Quadratic()
    official_params = problem.params()
    with default_dtype(F64):
        official = momo_opt.Momo(official_params, lr=lr, beta=beta)
    problem.loss_and_grads(official_params, 0)
    official_params[3].grad = None
    with pytest.raises(AttributeError):
        official.step(loss=torch.tensor(1.0, dtype=F64))

    params = problem.params()
    opt = pf.MoMo(params, lr=lr, beta=beta, fused=False, foreach=False)
    for t in range(2):
        opt.step(loss=problem.loss_and_grads(params, t))
    before = snapshot(opt)
    f = problem.loss_and_grads(params, 2)
    params[3].grad = None
    with_grad = [i for i in range(len(params)) if i != 3]
    x = [params[i].detach().clone() for i in with_grad]
    g = [params[i].grad for i in with_grad]
    d = [beta * before["state"][i]["grad_avg"] + (1 - beta) * params[i].grad for i in with_grad]
    opt.step(loss=f)
    after = snapshot(opt)
    assert_bitwise_equal(after["params"][3], before["params"][3], "the parameter without .grad")
    assert_bitwise_equal(after["state"][3]["grad_avg"], before["state"][3]["grad_avg"], "its d")
    # the step of the others, by hand: the sums over the parameters that have a gradient
    s0 = before["scalars"]
    f_avg = beta * s0["loss_avg"] + (1 - beta) * f
    gamma = beta * s0["grad_dot_w"] + (1 - beta) * sum((gi * xi).sum() for gi, xi in zip(g, x))
    dx = sum((di * xi).sum() for di, xi in zip(d, x))
    d_sq = sum((di * di).sum() for di in d)
    tau = min(lr, max((f_avg + dx - gamma).item(), 0.0) / d_sq.item())
    assert_rel(opt.scalars["grad_dot_w"], gamma, "gamma")
    assert_rel(opt.scalars["step_size"], tau, "tau")
    for j, i in enumerate(with_grad):
        assert_rel(params[i].detach(), x[j] - tau * d[j], f"param[{i}]")


def test_momo_adam_parameter_without_gradient(monkeypatch):
    """momo-opt's MomoAdam skips a parameter whose .grad is None too, but its gamma is the sum of
    per-parameter averages over the parameters that have a gradient (the skipped one's past
    drops out of that step's sum), and its bias correction of D counts each parameter's own
    steps in the weighted sum and the global steps in the update. Here gamma is one global
    average and every D uses the global step count k."""
    beta1, beta2, eps, lr = 0.9, 0.999, 1e-8, 0.5
    problem = Quadratic()
    params, official_params = problem.params(), problem.params()
    opt = pf.MoMoAdam(params, lr=lr, fused=False, foreach=False)
    official = OfficialRun(momo_opt.MomoAdam, official_params, dict(lr=lr), monkeypatch)
    for t in range(2):
        opt.step(loss=problem.loss_and_grads(params, t))
        official.step(problem.loss_and_grads(official_params, t))
    before = snapshot(opt)
    x_before = [p.detach().clone() for p in params]

    # step 3 without a gradient for parameter 3: both leave it and its buffers alone
    f = problem.loss_and_grads(params, 2)
    params[3].grad = None
    gx = sum((p.grad * x).sum() for p, x in zip(params, x_before) if p.grad is not None)
    opt.step(loss=f)
    official_before = official_params[3].detach().clone()
    official_loss = problem.loss_and_grads(official_params, 2)
    official_params[3].grad = None
    official.step(official_loss)
    assert_rel(official_params[3].detach(), official_before,
               "momo-opt: the parameter without .grad")
    assert_bitwise_equal(params[3].detach(), x_before[3], "ours: the parameter without .grad")
    for name in ("grad_avg", "grad_avg_sq"):
        assert_bitwise_equal(opt.state[params[3]][name], before["state"][3][name], f"its {name}")
    gamma = beta1 * before["scalars"]["grad_dot_w"] + (1 - beta1) * gx
    assert_rel(opt.scalars["grad_dot_w"], gamma, "our gamma: the global average")
    official_gamma = sum(official.opt.state[q]["grad_dot_w"] for i, q in enumerate(official_params)
                         if i != 3)
    assert abs(official_gamma - gamma) > 1e-3 * abs(gamma), "momo-opt's gamma leaves out its past"
    assert official.opt.state[official_params[3]]["step"] == 2 and official.opt._number_steps == 3

    # step 4, every parameter has a gradient: ours divides each v by 1 - beta2^4
    x3 = params[3].detach().clone()
    d3 = beta1 * opt.state[params[3]]["grad_avg"].clone()
    v3 = beta2 * opt.state[params[3]]["grad_avg_sq"].clone()
    opt.step(loss=problem.loss_and_grads(params, 3))
    g3 = params[3].grad
    d3 = d3 + (1 - beta1) * g3
    v3 = v3 + (1 - beta2) * g3 * g3
    D3 = torch.sqrt(v3 / (1 - beta2 ** 4)) + eps
    tau = opt.scalars["step_size"].item()
    assert_rel(params[3].detach(), x3 - tau * d3 / D3, "param[3] at step 4")


@pytest.mark.parametrize("ours_cls, official_cls", [(pf.MoMo, momo_opt.Momo),
                                                    (pf.MoMoAdam, momo_opt.MomoAdam)])
def test_use_fstar_updates_lb_once_per_step_with_the_first_groups_lr(ours_cls, official_cls,
                                                                      monkeypatch):
    """With two param groups (lr 0.1 and 10), momo-opt runs its lower-bound update in each
    group's turn, so the second group's step size uses the lb the first one left, and the lb
    after the step is the second group's. Here lb is updated once, from the first group's lr:
    the lb after a step is the one-group run's (lr 0.1), and the first group's parameters equal
    momo-opt's; the second group's, which momo-opt stepped with another lb, do not."""
    kwargs = dict(lb=0.02, use_fstar=True)
    problem = Quadratic()
    runs = {}
    for name, lrs in (("two_groups", (0.1, 10.0)), ("one_group", None)):
        ours_params, official_params = problem.params(), problem.params()
        if lrs is None:
            ours = ours_cls(ours_params, lr=0.1, **kwargs, fused=False, foreach=False)
            official = OfficialRun(official_cls, official_params, dict(lr=0.1, **kwargs),
                                   monkeypatch)
        else:
            ours = ours_cls(grouped(ours_params, lrs), **kwargs, fused=False, foreach=False)
            official = OfficialRun(official_cls, grouped(official_params, lrs), kwargs,
                                   monkeypatch)
        ours.step(loss=problem.loss_and_grads(ours_params, 0))
        official.step(problem.loss_and_grads(official_params, 0))
        runs[name] = (ours, ours_params, official, official_params)
    ours, ours_params, official, official_params = runs["two_groups"]
    (cap1, t1), (cap2, t2) = official.taus[-1]
    assert cap1 <= t1 and t2 < cap2, "the second group's step size must depend on lb"
    one_ours, _, one_official, _ = runs["one_group"]
    assert_bitwise_equal(ours.scalars["lb"], one_ours.scalars["lb"], "ours: lb, two groups")
    assert_rel(one_ours.scalars["lb"], one_official.opt.lb, "one group: lb")
    assert abs(official.opt.lb - one_official.opt.lb) > 1e-6 * abs(one_official.opt.lb), \
        "momo-opt's second group changed lb again"
    for i in (0, 1):
        assert_rel(ours_params[i].detach(), official_params[i].detach(), f"group 1, param[{i}]")
    assert any((ours_params[i] - official_params[i]).abs().max() > 1e-9 for i in (2, 3, 4)), \
        "momo-opt's second group stepped with another lb"


@pytest.mark.parametrize("ours_cls, official_cls", [(pf.MoMo, momo_opt.Momo),
                                                    (pf.MoMoAdam, momo_opt.MomoAdam)])
@pytest.mark.parametrize("loss", [1.0, 0.0], ids=["positive_numerator", "zero_numerator"])
def test_a_zero_direction_gives_the_cap(ours_cls, official_cls, loss, monkeypatch):
    """An exactly zero first gradient: ||d||^2 (or sum d^2 / D) = 0. momo-opt divides by it
    (t1 = inf, or 0/0 = NaN with a zero numerator; Python's min then happens to return the cap);
    here t1 = +inf by the guard, tau = the cap, and no scalar is NaN. The parameters stay put."""
    lr = 0.5
    problem = Quadratic()
    ours_params, official_params = problem.params(), problem.params()
    ours = ours_cls(ours_params, lr=lr, fused=False, foreach=False)
    official = OfficialRun(official_cls, official_params, dict(lr=lr), monkeypatch)
    for p, q in zip(ours_params, official_params):
        p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
    ours.step(loss=loss)
    official.step(torch.tensor(loss, dtype=F64))
    (cap, t1), = official.taus[-1]
    assert math.isinf(t1) if loss > 0 else math.isnan(t1), t1
    assert cap == lr / (1 - 0.9 if ours_cls is pf.MoMoAdam else 1.0)
    assert ours.scalars["step_size"].item() == pytest.approx(cap, rel=1e-15)
    assert not any(torch.isnan(v) for v in ours.scalars.values())
    assert int(ours.scalars["step"]) == 1 and int(ours.scalars["skipped"]) == 0
    for p, x in zip(ours_params, problem.x0):
        assert_bitwise_equal(p.detach(), x, "a zero direction moves nothing")


def test_a_tiny_direction_gives_the_cap(monkeypatch):
    """||d||^2 = 1e-18, below TINY_GRAD_SQ (1e-16): momo-opt takes t1 = (f - lb) / ||d||^2 as it
    is (here 1e-20 / 1e-18 = 0.01, below the cap); here t1 = +inf, so tau = the cap."""
    assert _optimizer.TINY_GRAD_SQ == 1e-16
    lr = 1.0
    x = [torch.nn.Parameter(torch.tensor([0.25, -0.5], dtype=F64))]
    y = [torch.nn.Parameter(torch.tensor([0.25, -0.5], dtype=F64))]
    ours = pf.MoMo(x, lr=lr, fused=False, foreach=False)
    official = OfficialRun(momo_opt.Momo, y, dict(lr=lr), monkeypatch)
    g = torch.tensor([6e-10, 8e-10], dtype=F64)                       # ||g||^2 = 1e-18
    x[0].grad, y[0].grad = g.clone(), g.clone()
    ours.step(loss=1e-20)
    official.step(torch.tensor(1e-20, dtype=F64))
    assert official.tau() == pytest.approx(0.01, rel=1e-6)
    assert ours.scalars["step_size"].item() == lr
    assert_rel(x[0].detach(), torch.tensor([0.25, -0.5], dtype=F64) - lr * g, "x - cap d")


@pytest.mark.parametrize("ours_cls, official_cls", [(pf.MoMo, momo_opt.Momo),
                                                    (pf.MoMoAdam, momo_opt.MomoAdam)])
def test_a_non_finite_gradient_skips_the_step(ours_cls, official_cls, monkeypatch):
    """momo-opt steps with a NaN in a gradient: the NaN enters its d (for good) and the
    parameter, and its step size, NaN, is replaced by the cap (Python's min); here the step is
    skipped, with the parameters and the state bitwise unchanged."""
    problem = Quadratic()
    ours_params, official_params = problem.params(), problem.params()
    ours = ours_cls(ours_params, lr=0.5, fused=False, foreach=False)
    official = OfficialRun(official_cls, official_params, dict(lr=0.5), monkeypatch)
    for t in range(2):
        ours.step(loss=problem.loss_and_grads(ours_params, t))
        official.step(problem.loss_and_grads(official_params, t))
    before = snapshot(ours)
    loss = problem.loss_and_grads(ours_params, 2)
    problem.loss_and_grads(official_params, 2)
    ours_params[1].grad[0] = official_params[1].grad[0] = math.nan
    ours.step(loss=loss)
    official.step(loss)
    assert torch.isnan(official_params[1][0]) and torch.isnan(official.buffer(
        official_params[1], "grad_avg")[0])
    assert_same_snapshot(snapshot(ours), before, ignore_scalars=("skipped",), what="skipped: ")
    assert int(ours.scalars["skipped"]) == 1


# ---- the fused path -----------------------------------------------------------------------------
@pytest.mark.parametrize("ours_cls, official_cls, kwargs, lrs",
                         [p[1:] for p in PARITY], ids=[p[0] for p in PARITY])
def test_fused_float32_follows_momo_opt(ours_cls, official_cls, kwargs, lrs, monkeypatch):
    """The fused kernels (float32, under the interpreter on CPU) against momo-opt in float64,
    step by step: parameters, buffers and the step size. Tolerance 1e-4 relative to each tensor's
    largest element: float32's rounding carried through 12 recursions, and a one-element
    momentum average that passes near zero (measured: 5.8e-5 there, 1.5e-5 on the step size,
    7e-7 on the parameters)."""
    problem = Quadratic()
    ours_params, official_params = problem.params(torch.float32), problem.params()
    ours = ours_cls(grouped(ours_params, lrs), **kwargs, fused=True)
    official = OfficialRun(official_cls, grouped(official_params, lrs), kwargs, monkeypatch)
    for t in range(STEPS):
        ours.step(loss=problem.loss_and_grads(ours_params, t).float())
        official.step(problem.loss_and_grads(official_params, t))
        at = f"step {t + 1}"
        for i, (p, q) in enumerate(zip(ours_params, official_params)):
            assert_rel(p.detach(), q.detach(), f"{at}: param[{i}]", rtol=1e-4, floor=1.0)
            for name in ours.BUFFERS:
                assert_rel(ours.state[p][name], official.buffer(q, name), f"{at}: {name}[{i}]",
                           rtol=1e-4, floor=1.0)
        assert_rel(ours.scalars["step_size"], official.tau(), f"{at}: tau", rtol=1e-4)
    assert ours._fused_cache["param_set"][2] == "fused", "fused=True did not take the fused path"
    assert int(ours.scalars["step"]) == STEPS and int(ours.scalars["skipped"]) == 0


@pytest.mark.parametrize("cls", [pf.MoMo, pf.MoMoAdam])
def test_fused_none_on_cuda_parameters_takes_the_kernels(cls):
    cuda_like = [type("P", (), dict(is_cuda=True, dtype=torch.float32, is_meta=False))()]
    assert _optimizer.use_fused_path(None, cuda_like) is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cls", [pf.MoMo, pf.MoMoAdam])
def test_cuda_fused_none_takes_the_kernels_with_no_host_sync(cls):
    """On a GPU, fused=None takes the fused kernels for MoMo; every step() runs under
    torch.cuda.set_sync_debug_mode("error"), and the run follows the CPU reference."""
    problem = Quadratic()
    cpu = problem.params(torch.float32)
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    opt_cpu = cls(cpu, weight_decay=0.05, use_fstar=True, fused=False, foreach=False)
    opt = cls(gpu, weight_decay=0.05, use_fstar=True)
    opt.register_step_pre_hook(lambda *a: torch.cuda.set_sync_debug_mode("error"))
    opt.register_step_post_hook(lambda *a: torch.cuda.set_sync_debug_mode(0))
    try:
        for t in range(STEPS):
            loss = problem.loss_and_grads(cpu, t)
            for p, q in zip(gpu, cpu):
                p.grad = q.grad.cuda()
            opt.step(loss=loss.float().cuda())
            opt_cpu.step(loss=loss)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert opt._fused_cache["param_set"][2] == "fused", "fused=None did not take the fused path"
    for i, (p, q) in enumerate(zip(gpu, cpu)):
        assert_rel(p.detach().cpu(), q.detach(), f"param[{i}]", rtol=1e-5, floor=1.0)
