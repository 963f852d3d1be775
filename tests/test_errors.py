"""Bad inputs, as declarative lists: (optimizer, arguments, exception, message regex).

Every constructor argument is validated with "Invalid <name>: <value>". Step-time errors are
raised before anything changes: parameters and state are compared bitwise before and after.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import polyak_fused as pf
from polyak_fused import _optimizer
from eager_helpers import assert_same_snapshot, snapshot

NAN, INF = math.nan, math.inf

# Required arguments per class, so that each case names only the argument it breaks.
REQUIRED = {
    pf.InexactPolyak: dict(total_steps=10),
    pf.Polyak: {},
    pf.DecSPS: {},
    pf.AdaSPS: {},
    pf.DoG: {},
    pf.ClippedSGD: dict(lr=0.1),
    pf.NSGDM: dict(lr=0.1),
    pf.MoMo: {},
    pf.MoMoAdam: {},
}
ALL = list(REQUIRED)

def ctor_case(cls, name, value, pattern=None, error=ValueError, marks=()):
    pattern = pattern or rf"Invalid {name}: {re_value(value)}"
    return pytest.param(cls, {name: value}, error, pattern, marks=marks,
                        id=f"{cls.__name__}-{name}={value!r}")


def re_value(value):
    return re.escape(repr(value) if isinstance(value, str) else str(value))


CONSTRUCTOR_CASES = [
    # InexactPolyak
    ctor_case(pf.InexactPolyak, "total_steps", 0),
    ctor_case(pf.InexactPolyak, "total_steps", -3),
    ctor_case(pf.InexactPolyak, "total_steps", 1.5),
    ctor_case(pf.InexactPolyak, "total_steps", 10.0),
    ctor_case(pf.InexactPolyak, "total_steps", True),
    ctor_case(pf.InexactPolyak, "total_steps", "10", pattern=r"Invalid total_steps: '10'"),
    ctor_case(pf.InexactPolyak, "lower_bound", NAN),
    ctor_case(pf.InexactPolyak, "lower_bound", INF),
    ctor_case(pf.InexactPolyak, "lower_bound", -INF),
    ctor_case(pf.InexactPolyak, "lower_bound", None, pattern=r"Invalid lower_bound: None"),
    ctor_case(pf.InexactPolyak, "track_best", 1, pattern=r"Invalid track_best: 1"),
    ctor_case(pf.InexactPolyak, "track_best", "yes", pattern=r"Invalid track_best: 'yes'"),
    # Polyak
    ctor_case(pf.Polyak, "f_star", NAN),
    ctor_case(pf.Polyak, "f_star", INF),
    ctor_case(pf.Polyak, "c", 0.0),
    ctor_case(pf.Polyak, "c", -1.0),
    ctor_case(pf.Polyak, "c", NAN),
    ctor_case(pf.Polyak, "c", INF),
    ctor_case(pf.Polyak, "max_lr", 0.0),
    ctor_case(pf.Polyak, "max_lr", -0.5),
    ctor_case(pf.Polyak, "max_lr", NAN),
    # DecSPS
    ctor_case(pf.DecSPS, "c0", 0.0),
    ctor_case(pf.DecSPS, "c0", -1.0),
    ctor_case(pf.DecSPS, "c0", NAN),
    ctor_case(pf.DecSPS, "c0", INF),
    ctor_case(pf.DecSPS, "gamma_b", 0.0),
    ctor_case(pf.DecSPS, "gamma_b", -2.0),
    ctor_case(pf.DecSPS, "gamma_b", NAN),
    ctor_case(pf.DecSPS, "gamma_b", INF),
    ctor_case(pf.DecSPS, "lower_bound", NAN),
    # AdaSPS
    ctor_case(pf.AdaSPS, "c_p", 0.0),
    ctor_case(pf.AdaSPS, "c_p", -1.0),
    ctor_case(pf.AdaSPS, "c_p", NAN),
    ctor_case(pf.AdaSPS, "c_p", INF),
    ctor_case(pf.AdaSPS, "lower_bound", INF),
    # DoG
    ctor_case(pf.DoG, "reps_rel", 0.0),
    ctor_case(pf.DoG, "reps_rel", -1e-6),
    ctor_case(pf.DoG, "reps_rel", NAN),
    ctor_case(pf.DoG, "reps_rel", INF),
    ctor_case(pf.DoG, "weight_decay", -0.1),
    ctor_case(pf.DoG, "weight_decay", NAN),
    ctor_case(pf.DoG, "weight_decay", INF),
    # ClippedSGD
    ctor_case(pf.ClippedSGD, "lr", -1.0),
    ctor_case(pf.ClippedSGD, "lr", NAN),
    ctor_case(pf.ClippedSGD, "lr", INF),
    ctor_case(pf.ClippedSGD, "max_norm", 0.0),
    ctor_case(pf.ClippedSGD, "max_norm", -1.0),
    ctor_case(pf.ClippedSGD, "max_norm", NAN),
    ctor_case(pf.ClippedSGD, "momentum", 1.0),
    ctor_case(pf.ClippedSGD, "momentum", 1.5),
    ctor_case(pf.ClippedSGD, "momentum", -0.1),
    ctor_case(pf.ClippedSGD, "momentum", NAN),
    # NSGDM
    ctor_case(pf.NSGDM, "lr", -1.0),
    ctor_case(pf.NSGDM, "lr", NAN),
    ctor_case(pf.NSGDM, "beta", 1.0),
    ctor_case(pf.NSGDM, "beta", -0.1),
    ctor_case(pf.NSGDM, "beta", NAN),
    ctor_case(pf.NSGDM, "schedule", "foo"),
    # MoMo
    ctor_case(pf.MoMo, "weight_decay", -0.1),
    ctor_case(pf.MoMo, "weight_decay", NAN),
    ctor_case(pf.MoMo, "weight_decay", INF),
    ctor_case(pf.MoMo, "beta", 1.0),
    ctor_case(pf.MoMo, "beta", -0.1),
    ctor_case(pf.MoMo, "beta", NAN),
    ctor_case(pf.MoMo, "lb", NAN),
    ctor_case(pf.MoMo, "lb", -INF),
    ctor_case(pf.MoMo, "lb", "0", pattern=r"Invalid lb: '0'"),
    ctor_case(pf.MoMo, "bias_correction", 1, pattern=r"Invalid bias_correction: 1"),
    ctor_case(pf.MoMo, "use_fstar", "yes", pattern=r"Invalid use_fstar: 'yes'"),
    # MoMoAdam
    ctor_case(pf.MoMoAdam, "betas", (0.9, 1.0), pattern=r"Invalid betas: \(0\.9, 1\.0\)"),
    ctor_case(pf.MoMoAdam, "betas", (-0.1, 0.999), pattern=r"Invalid betas: \(-0\.1, 0\.999\)"),
    ctor_case(pf.MoMoAdam, "betas", (0.9, NAN), pattern=r"Invalid betas: \(0\.9, nan\)"),
    ctor_case(pf.MoMoAdam, "betas", (0.9,), pattern=r"Invalid betas: \(0\.9,\)"),
    ctor_case(pf.MoMoAdam, "betas", 0.9, pattern=r"Invalid betas: 0\.9"),
    ctor_case(pf.MoMoAdam, "eps", -1e-8),
    ctor_case(pf.MoMoAdam, "eps", NAN),
    ctor_case(pf.MoMoAdam, "eps", INF),
    ctor_case(pf.MoMoAdam, "weight_decay", -0.1),
    ctor_case(pf.MoMoAdam, "weight_decay", NAN),
    ctor_case(pf.MoMoAdam, "lb", INF),
    ctor_case(pf.MoMoAdam, "divide", None, pattern=r"Invalid divide: None"),
    ctor_case(pf.MoMoAdam, "use_fstar", 0, pattern=r"Invalid use_fstar: 0"),
    # every class: fused must be None/True/False, lr must be a non-negative finite number
    *[ctor_case(cls, "fused", "yes") for cls in ALL],
    *[ctor_case(cls, "fused", 0.5) for cls in ALL],
    *[ctor_case(cls, "lr", value) for value in (-1.0, NAN, INF)
      for cls in ALL if cls not in (pf.ClippedSGD, pf.NSGDM)],   # (those two are tested above)
]


def new_params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))]


@pytest.mark.parametrize("cls, kwargs, error, pattern", CONSTRUCTOR_CASES)
def test_constructor_rejects(cls, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        cls(new_params(), **{**REQUIRED[cls], **kwargs})


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_constructor_accepts_the_documented_edges(cls):
    """The edges that are allowed must stay allowed (a validator that rejects everything passes
    the table above)."""
    edges = {
        pf.InexactPolyak: [dict(total_steps=1), dict(total_steps=10, lower_bound=-5.0, lr=0.0)],
        pf.Polyak: [dict(max_lr=INF), dict(f_star=-1.0, c=1e-3)],
        pf.DecSPS: [dict(c0=1e-6, gamma_b=1e6, lower_bound=-1.0)],
        pf.AdaSPS: [dict(c_p=1e-6, lower_bound=-1.0)],
        pf.DoG: [dict(reps_rel=1e-12, weight_decay=0.0)],
        pf.ClippedSGD: [dict(lr=0.0, max_norm=INF, momentum=0.0), dict(lr=1.0, momentum=0.999)],
        pf.NSGDM: [dict(lr=0.0, beta=0.0), dict(lr=1.0, beta=0.999, schedule="agnostic")],
        pf.MoMo: [dict(lr=0.0, beta=0.0, weight_decay=0.0, lb=-5.0),
                  dict(beta=0.999, bias_correction=True, use_fstar=True)],
        pf.MoMoAdam: [dict(lr=0.0, betas=(0.0, 0.0), eps=0.0, lb=-5.0),
                      dict(betas=[0.5, 0.999], divide=False, use_fstar=True)],
    }[cls]
    for kwargs in edges:
        cls(new_params(), **{**REQUIRED[cls], **kwargs, "fused": False})


# ---- param groups --------------------------------------------------------------------------------
GROUP_CASES = [
    # a second group with another value of a hyperparameter that defines the global step
    (pf.InexactPolyak, dict(total_steps=10), {"total_steps": 20}, r"Invalid total_steps: 20"),
    (pf.InexactPolyak, dict(total_steps=10), {"lower_bound": 1.0}, r"Invalid lower_bound: 1.0"),
    (pf.InexactPolyak, dict(total_steps=10), {"track_best": True}, r"Invalid track_best: True"),
    (pf.Polyak, {}, {"f_star": 1.0}, r"Invalid f_star: 1.0"),
    (pf.Polyak, {}, {"c": 0.5}, r"Invalid c: 0.5"),
    (pf.DecSPS, {}, {"c0": 2.0}, r"Invalid c0: 2.0"),
    (pf.AdaSPS, {}, {"c_p": 2.0}, r"Invalid c_p: 2.0"),
    (pf.DoG, {}, {"weight_decay": 0.1}, r"Invalid weight_decay: 0.1"),
    (pf.ClippedSGD, dict(lr=0.1), {"max_norm": 1.0}, r"Invalid max_norm: 1.0"),
    (pf.ClippedSGD, dict(lr=0.1), {"momentum": 0.5}, r"Invalid momentum: 0.5"),
    (pf.NSGDM, dict(lr=0.1), {"schedule": "agnostic"}, r"Invalid schedule: 'agnostic'"),
    (pf.MoMo, {}, {"weight_decay": 0.1}, r"Invalid weight_decay: 0.1"),
    (pf.MoMo, {}, {"beta": 0.5}, r"Invalid beta: 0.5"),
    (pf.MoMo, {}, {"lb": 1.0}, r"Invalid lb: 1.0"),
    (pf.MoMo, {}, {"bias_correction": True}, r"Invalid bias_correction: True"),
    (pf.MoMo, {}, {"use_fstar": True}, r"Invalid use_fstar: True"),
    (pf.MoMoAdam, {}, {"betas": (0.8, 0.999)}, r"Invalid betas: \(0.8, 0.999\)"),
    (pf.MoMoAdam, {}, {"eps": 1e-6}, r"Invalid eps: 1e-06"),
    (pf.MoMoAdam, {}, {"weight_decay": 0.1}, r"Invalid weight_decay: 0.1"),
    (pf.MoMoAdam, {}, {"divide": False}, r"Invalid divide: False"),
    (pf.MoMoAdam, {}, {"lr": -1.0}, r"Invalid lr: -1.0"),
    # a group's own lr is validated
    (pf.InexactPolyak, dict(total_steps=10), {"lr": -1.0}, r"Invalid lr: -1.0"),
    (pf.Polyak, {}, {"lr": NAN}, r"Invalid lr: nan"),
    (pf.DoG, {}, {"lr": torch.ones(2)}, r"Invalid lr: a tensor lr must be one floating value"),
]


@pytest.mark.parametrize("cls, kwargs, group, pattern", GROUP_CASES,
                         ids=[f"{c.__name__}-{list(g)[0]}" for c, _, g, _ in GROUP_CASES])
@pytest.mark.parametrize("how", ["in_constructor", "add_param_group"])
def test_param_group_rejects(cls, kwargs, group, pattern, how):
    a, b = new_params()
    if how == "in_constructor":
        with pytest.raises(ValueError, match=pattern):
            cls([{"params": [a]}, {"params": [b], **group}], **kwargs, fused=False, foreach=False)
    else:
        opt = cls([a], **kwargs, fused=False, foreach=False)
        with pytest.raises(ValueError, match=pattern):
            opt.add_param_group({"params": [b], **group})


def test_first_param_group_with_other_total_steps_is_rejected():
    a, b = new_params()
    with pytest.raises(ValueError, match=r"Invalid total_steps: 5"):
        pf.InexactPolyak([{"params": [a], "total_steps": 5}, {"params": [b]}], total_steps=10,
                         fused=False, foreach=False)


def test_complex_parameters_are_rejected():
    z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    for cls in ALL:
        with pytest.raises(ValueError, match="complex"):
            cls([z], **REQUIRED[cls], fused=False, foreach=False)
        opt = cls(new_params(), **REQUIRED[cls], fused=False, foreach=False)
        with pytest.raises(ValueError, match="complex"):
            opt.add_param_group({"params": [z]})


# ---- step-time errors ----------------------------------------------------------------------------
def set_good_grads(params, scale=1.0):
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, 0.1 * (i + 1) * scale)


def sparse_grad(params):
    set_good_grads(params)
    params[1].grad = torch.eye(2).to_sparse()


STEP_CASES = [
    # (id, classes, prepare grads, step kwargs, error, regex)
    ("no_loss", [pf.InexactPolyak, pf.Polyak, pf.DecSPS, pf.AdaSPS, pf.MoMo, pf.MoMoAdam],
     set_good_grads, {}, ValueError, r"loss"),
    ("loss_shape_3", ALL, set_good_grads, dict(loss=torch.ones(3)), ValueError,
     r"Invalid loss: .*shape \(3,\)"),
    ("loss_shape_0", ALL, set_good_grads, dict(loss=torch.ones(0)), ValueError, r"Invalid loss"),
    ("loss_complex", ALL, set_good_grads, dict(loss=torch.ones((), dtype=torch.complex64)),
     ValueError, r"Invalid loss"),
    ("loss_string", ALL, set_good_grads, dict(loss="1.0"), TypeError, r"Invalid loss"),
    ("loss_bool", ALL, set_good_grads, dict(loss=True), TypeError, r"Invalid loss"),
    ("closure_and_loss", ALL, set_good_grads, dict(closure="CLOSURE", loss=1.0), ValueError,
     r"closure or loss=, not both"),
    ("sparse_grad", ALL, sparse_grad, dict(loss=1.0), RuntimeError, r"sparse"),
]
STEP_PARAMS = [pytest.param(cls, prep, kw, err, pat, id=f"{name}-{cls.__name__}")
               for name, classes, prep, kw, err, pat in STEP_CASES for cls in classes]


def optimizer_for(cls):
    extra = dict(track_best=True) if cls is pf.InexactPolyak else {}
    if cls is pf.ClippedSGD:
        extra = dict(momentum=0.9)
    if cls in (pf.MoMo, pf.MoMoAdam):
        extra = dict(weight_decay=0.01, use_fstar=True)
    return extra


@pytest.mark.parametrize("fresh", [False, True], ids=["after_2_steps", "first_step"])
@pytest.mark.parametrize("cls, prepare, step_kwargs, error, pattern", STEP_PARAMS)
def test_step_error_changes_nothing(cls, prepare, step_kwargs, error, pattern, fresh):
    params = new_params()
    opt = cls(params, **REQUIRED[cls], **optimizer_for(cls), fused=False, foreach=False)
    if not fresh:
        for scale in (1.0, -0.5):
            set_good_grads(params, scale)
            opt.step(loss=1.0)
    before = snapshot(opt)
    prepare(params)
    grads_before = [p.grad.clone() for p in params]
    calls = []
    kwargs = dict(step_kwargs)
    if kwargs.get("closure") == "CLOSURE":
        kwargs["closure"] = lambda: calls.append(1) or 1.0
    with pytest.raises(error, match=pattern):
        opt.step(**kwargs)
    assert not calls, "the closure must not run when step() refuses its arguments"
    after = snapshot(opt)
    if fresh and before["scalars"] is None and after["scalars"] is not None:
        # the lazily created scalar buffer may appear; it must hold its initial values
        ref = cls(new_params(), **REQUIRED[cls], **optimizer_for(cls), fused=False, foreach=False)
        after_scalars = after["scalars"]
        for k, v in ref.scalars.items():
            assert torch.equal(after_scalars[k], v), k
        after["scalars"] = None
    assert_same_snapshot(after, before, what="after a refused step: ")
    for p, g in zip(params, grads_before):   # .grad untouched too
        assert torch.equal(p.grad.to_dense(), g.to_dense())


@pytest.mark.parametrize("make", [
    lambda ps: pf.InexactPolyak(ps, total_steps=10, track_best=True, fused=True),
    lambda ps: pf.DoG(ps, fused=True),
    lambda ps: pf.ClippedSGD(ps, lr=0.1, momentum=0.9, fused=True),
    lambda ps: pf.NSGDM(ps, lr=0.1, fused=True),
], ids=["inexact_polyak_best", "dog", "clipped_sgd_momentum", "nsgdm"])
def test_fused_true_on_cpu_without_interpreter_raises(monkeypatch, make):
    """Configurations with per-parameter buffers: the error comes before any buffer is made.
    (Construction refuses it too, see test_optim_contract.py; here the interpreter is turned off
    after the optimizer was built, so that the step's own check is the one tested.)"""
    params = new_params()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    opt = make(params)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _optimizer.interpreter_enabled()
    before = snapshot(opt)
    set_good_grads(params)
    with pytest.raises(RuntimeError, match=r"fused=True needs CUDA tensors.*TRITON_INTERPRET=1"):
        opt.step(loss=1.0)
    after = snapshot(opt)
    assert_same_snapshot(after, before if after["scalars"] is None else
                         {**before, "scalars": after["scalars"]}, what="fused=True on cpu: ")
    assert after["scalars"] is None or after["scalars"]["step"].item() == 0


def test_fused_true_with_float64_raises(device):
    with pytest.raises(RuntimeError, match=r"float64"):      # at construction, as torch's fused
        pf.Polyak([torch.nn.Parameter(torch.ones(3, dtype=torch.float64))], fused=True)
    x = torch.nn.Parameter(torch.ones(3, device=device))
    opt = pf.Polyak([x], fused=True)
    x.data = x.data.double()              # what model.double() does after the optimizer is built
    x.grad = torch.ones_like(x)
    with pytest.raises(RuntimeError, match=r"float64"):
        opt.step(loss=1.0)
    assert torch.equal(x.detach(), torch.ones(3, dtype=torch.float64, device=device))


def test_load_best_rejects_bad_loss():
    params = new_params()
    opt = pf.InexactPolyak(params, total_steps=10, track_best=True, fused=False, foreach=False)
    set_good_grads(params)
    opt.step(loss=1.0)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"Invalid loss"):
        opt.load_best(loss=torch.ones(3))
    assert_same_snapshot(snapshot(opt), before, what="after a refused load_best: ")
