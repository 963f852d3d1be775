"""Outside a framework: total_steps left to be set later, OneCycleLR, and what importing the
package pulls in (no framework, no Triton). (tests/test_readme.py runs the README's examples.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import polyak_fused as pf
from eager_helpers import OPTIMIZERS, assert_same_snapshot, snapshot

ROOT = Path(__file__).resolve().parents[1]


def quadratic_problem(seed=0):
    """Two float64 parameters and a least-squares loss (float64: runs compare bitwise)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randn(12, generator=g,
                                                                            dtype=torch.float64)
    w = torch.nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))
    c = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    return [w, c], lambda: ((a @ w + c - b) ** 2).mean()


def take_steps(opt, loss_fn, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss = opt.watch_loss(loss_fn())
        loss.backward()
        opt.step()


# ---- total_steps left None ----------------------------------------------------------------------
@pytest.mark.parametrize("how", ["bare", "loss", "closure"])
def test_total_steps_none_refuses_the_first_step_and_changes_nothing(how):
    params, loss_fn = quadratic_problem()
    opt = pf.InexactPolyak(params, total_steps=None, track_best=True)   # a buffer not to create
    assert opt.param_groups[0]["total_steps"] is None
    before = snapshot(opt)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    if how == "closure":
        kwargs = dict(closure=closure)
    else:
        loss = opt.watch_loss(loss_fn()) if how == "bare" else loss_fn()
        loss.backward()
        kwargs = dict(loss=loss.detach()) if how == "loss" else {}
    with pytest.raises(ValueError, match=r"Invalid total_steps: None .*total_steps=T.*not of "
                                         r"batches.*set_total_steps\(T\).*integration"):
        opt.step(**kwargs)
    assert not calls, "the closure must not run when the step is refused"
    assert_same_snapshot(snapshot(opt), before, what="after the refused step: ")


def test_total_steps_set_later_is_the_constructor_argument_and_is_checkpointed():
    params_a, loss_a = quadratic_problem()
    given = pf.InexactPolyak(params_a, total_steps=40)
    params_b, loss_b = quadratic_problem()
    later = pf.InexactPolyak(params_b, total_steps=None)
    later.set_total_steps(40)
    take_steps(given, loss_a, 3)
    take_steps(later, loss_b, 3)
    assert_same_snapshot(snapshot(later), snapshot(given), what="set_total_steps vs ctor: ")

    extra = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    later.add_param_group({"params": [extra]})      # a group added later takes the same T
    assert [g["total_steps"] for g in later.param_groups] == [40, 40]

    # the filled T travels in the checkpoint into an optimizer built with total_steps=None
    params_c, loss_c = quadratic_problem()
    resumed = pf.InexactPolyak(params_c, total_steps=None)
    given_sd = given.state_dict()
    assert given_sd["param_groups"][0]["total_steps"] == 40
    with torch.no_grad():
        for p, q in zip(params_c, params_a):
            p.copy_(q)
    resumed.load_state_dict(given_sd)
    assert resumed.param_groups[0]["total_steps"] == 40
    take_steps(given, loss_a, 2)
    take_steps(resumed, loss_c, 2)
    assert_same_snapshot(snapshot(resumed), snapshot(given), what="resumed vs uninterrupted: ")


@pytest.mark.parametrize("bad", [0, -5, 2.5, 10.0, True, None, "10"])
def test_set_total_steps_rejects_bad_values(bad):
    params, _ = quadratic_problem()
    opt = pf.InexactPolyak(params, total_steps=None)
    with pytest.raises(ValueError, match=rf"Invalid total_steps: {bad!r}"):
        opt.set_total_steps(bad)
    assert opt.param_groups[0]["total_steps"] is None


# ---- OneCycleLR ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name, make", OPTIMIZERS, ids=[name for name, _ in OPTIMIZERS])
def test_one_cycle_lr_runs_with_cycle_momentum_false(name, make):
    """OneCycleLR's default cycles momentum (or Adam's beta1), which only ClippedSGD (and
    MoMoAdam's betas) have: the others fail with torch's message, and cycle_momentum=False (what
    the README says) makes them run, with the schedule's lr in every group."""
    params, loss_fn = quadratic_problem()
    opt = make(params)
    if "momentum" not in opt.defaults and "betas" not in opt.defaults:
        with pytest.raises(ValueError, match=r"momentum or beta1 with `cycle_momentum`"):
            torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=6)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=6,
                                                    cycle_momentum=False)
    lrs = []
    for step in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        take_steps(opt, loss_fn, 1)
        if step < 5:   # OneCycleLR's total_steps counts the lr values, the first one included
            scheduler.step()
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)   # torch's own schedule
    expected = torch.optim.lr_scheduler.OneCycleLR(sgd, max_lr=1.0, total_steps=6,
                                                   cycle_momentum=False)
    expected_lrs = []
    for step in range(6):
        expected_lrs.append(sgd.param_groups[0]["lr"])
        sgd.step()
        if step < 5:
            expected.step()
    assert lrs == expected_lrs
    assert int(opt.scalars["step"]) == 6 and int(opt.scalars["skipped"]) == 0


# ---- what importing the package pulls in -------------------------------------------------------
def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def test_import_pulls_in_no_framework_and_no_triton():
    out = run_python("""
        import sys
        import polyak_fused, polyak_fused.integrations
        loaded = [m for m in ("transformers", "lightning", "pytorch_lightning", "accelerate",
                              "triton", "polyak_fused._kernels") if m in sys.modules]
        print("LOADED", loaded)
    """)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout


def test_without_triton_the_reference_runs_and_only_the_fused_path_fails():
    """A CPU-only install has no Triton (it is a test extra): the eager path must work, and
    asking for the kernels must say what is missing."""
    out = run_python("""
        import sys
        sys.modules["triton"] = None          # as if triton were not installed
        import torch
        import polyak_fused as pf
        for fused in (None, False):
            w = torch.nn.Parameter(torch.ones(3))
            opt = pf.InexactPolyak([w], total_steps=10, fused=fused)
            loss = opt.watch_loss((w ** 2).sum())
            loss.backward()
            opt.step()
            assert int(opt.scalars["step"]) == 1
        w = torch.nn.Parameter(torch.ones(3))
        try:
            pf.InexactPolyak([w], total_steps=10, fused=True)
        except RuntimeError as err:
            print("ERROR", err)
    """, TRITON_INTERPRET="1")
    assert out.returncode == 0, out.stderr
    assert "ERROR Invalid fused: True, but Triton cannot be imported (pip install triton" \
        in out.stdout
