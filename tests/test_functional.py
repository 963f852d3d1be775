"""The functional forms (`pf.inexact_polyak(...)`, ...) are usable as documented: the state comes
from `Class.functional_state(params, ...)`, the hyperparameters default as in the class, and
K steps through the functional form equal K steps of the class, bitwise (same code underneath),
on the eager reference and on the fused path (Triton interpreter). The docstring examples run.
"""

from __future__ import annotations

import doctest
import importlib
import inspect

import pytest
import torch

import polyak_fused as pf

K = 3
# class, functional form, the class's required arguments, the state lists the form takes
FORMS = {
    "InexactPolyak": (pf.InexactPolyak, pf.inexact_polyak, dict(total_steps=10), ["best"]),
    "InexactPolyak-best": (pf.InexactPolyak, pf.inexact_polyak,
                           dict(total_steps=10, track_best=True), ["best"]),
    "Polyak": (pf.Polyak, pf.polyak, dict(c=2.0), []),
    "DecSPS": (pf.DecSPS, pf.decsps, dict(), []),
    "AdaSPS": (pf.AdaSPS, pf.adasps, dict(), []),
    "DoG": (pf.DoG, pf.dog, dict(reps_rel=1e-2), ["x0"]),
    "ClippedSGD": (pf.ClippedSGD, pf.clipped_sgd, dict(lr=0.1, max_norm=0.5, momentum=0.9),
                   ["momentum_buffer"]),
    "NSGDM": (pf.NSGDM, pf.nsgdm, dict(lr=0.05, schedule="agnostic"), ["momentum_buffer"]),
    "MoMo": (pf.MoMo, pf.momo, dict(lr=0.5, weight_decay=0.01, bias_correction=True,
                                    use_fstar=True), ["grad_avg"]),
    "MoMoAdam": (pf.MoMoAdam, pf.momo_adam, dict(lr=0.05, weight_decay=0.01, divide=False,
                                                 use_fstar=True), ["grad_avg", "grad_avg_sq"]),
}
MODULES = ["inexact_polyak", "polyak", "decsps", "adasps", "dog", "clipped_sgd", "nsgdm", "momo",
           "momo_adam"]
# Every form on the reference and on the fused path.
PATHS = [pytest.param(name, fused, id=f"{name}-{'fused' if fused else 'reference'}")
         for name in FORMS for fused in (False, True)]


def problem(dtype, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                                torch.nn.Linear(7, 2)).to(dtype)
    gen = torch.Generator().manual_seed(7)
    data = [(torch.randn(16, 5, generator=gen).to(dtype), torch.randn(16, 2, generator=gen).to(dtype))
            for _ in range(K)]
    return model, data


def loss_of(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y) + 0.5


@pytest.mark.parametrize("name, fused", PATHS)
def test_functional_form_takes_the_class_steps(name, fused):
    cls, form, kwargs, buffer_names = FORMS[name]
    dtype = torch.float32 if fused else torch.float64
    model, data = problem(dtype)
    opt = cls(model.parameters(), fused=fused, **kwargs)
    for x, y in data:
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        opt.step(loss=loss)

    fmodel, _ = problem(dtype)
    params = list(fmodel.parameters())
    state = cls.functional_state(params, **kwargs)
    hparams = {k: v for k, v in kwargs.items() if k != "lr"}
    lr = kwargs.get("lr", 1.0)
    for x, y in data:
        for p in params:
            p.grad = None
        loss = loss_of(fmodel, x, y)
        loss.backward()
        buffers = [state.get(n) for n in buffer_names]
        with torch.no_grad():
            form(params, [p.grad for p in params], *buffers, state["scalars"], lrs=lr,
                 loss=loss.detach(), fused=fused, **hparams)
    for i, (a, e) in enumerate(zip(params, model.parameters())):
        assert torch.equal(a, e), f"param {i}"
    for key, value in opt.scalars.items():
        idx = list(opt.scalars).index(key)
        assert torch.equal(state["scalars"][idx], value), f"scalar {key}"
    for n in buffer_names:
        if n in state:
            for b, p in zip(state[n], model.parameters()):
                assert torch.equal(b, opt.state[p][n]), f"buffer {n}"


@pytest.mark.parametrize("name", list(FORMS))
def test_functional_defaults_are_the_class_defaults(name):
    cls, form, _, _ = FORMS[name]
    class_defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()
                      if p.default is not inspect.Parameter.empty}
    form_params = inspect.signature(form).parameters
    for key, default in class_defaults.items():
        if key in form_params and key != "fused":   # the class picks by device; the form: False
            assert form_params[key].default == default, f"{key}: {form_params[key].default}"
    if "lr" in class_defaults:
        assert form_params["lrs"].default == class_defaults["lr"]


def test_functional_state_builds_what_the_class_would():
    params = [torch.randn(3, 4), torch.randn(5)]
    state = pf.DoG.functional_state(params, reps_rel=1e-3)
    assert set(state) == {"scalars", "x0"}
    assert all(torch.equal(b, p) and b is not p for b, p in zip(state["x0"], params))
    assert state["scalars"].tolist() == [0.0, 0.0, 0.0, 0.0, 0.0]  # step, skipped, eta, rbar, G
    assert pf.DecSPS.functional_state(params, c0=2.0)["scalars"].tolist()[3] == 20.0  # c0 gamma_b
    with pytest.raises(ValueError, match="Invalid reps_rel"):
        pf.DoG.functional_state(params, reps_rel=-1.0)


@pytest.mark.parametrize("module", MODULES + ["_optimizer"])
def test_docstring_examples_run(module):
    mod = importlib.import_module(f"polyak_fused.{module}")
    result = doctest.testmod(mod, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
