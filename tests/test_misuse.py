"""Misuse that would silently change the method, caught without a host sync in step(): steps past
total_steps (a warning, once), a decaying LR scheduler on an optimizer whose lr is a multiplier (a
warning, once; warmups and learning-rate optimizers are left alone), fused=True without Triton
(refused at construction); and opt.diagnose(), which says why a run is stuck at zero steps."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from test_watch_loss import NoHostSync

import polyak_fused as pf

ROOT = Path(__file__).resolve().parent.parent


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(4, generator=gen, dtype=torch.float64))
    target = torch.randn(4, generator=gen, dtype=torch.float64)
    return w, lambda: 0.5 + (w - target).square().sum()


def _steps(opt, loss_fn, n, scheduler=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(n):
            opt.zero_grad()
            loss = opt.watch_loss(loss_fn())
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
    return caught


def _ours(caught, text):
    return [w for w in caught if text in str(w.message)]


# ---- total_steps -------------------------------------------------------------------------------
def test_steps_past_total_steps_warn_once():
    w, loss_fn = _problem()
    opt = pf.InexactPolyak([w], total_steps=10, fused=False, foreach=False)
    assert not _ours(_steps(opt, loss_fn, 10), "total_steps=10")
    caught = _steps(opt, loss_fn, 20)
    past = _ours(caught, "total_steps=10")
    assert len(past) == 1 and "step() called 11 times" in str(past[0].message)


def test_the_count_survives_a_checkpoint():
    w, loss_fn = _problem()
    opt = pf.InexactPolyak([w], total_steps=5, fused=False, foreach=False)
    _steps(opt, loss_fn, 5)
    w2, loss_fn2 = _problem()
    resumed = pf.InexactPolyak([w2], total_steps=5, fused=False, foreach=False)
    resumed.load_state_dict(opt.state_dict())
    past = _ours(_steps(resumed, loss_fn2, 1), "total_steps=5")
    assert len(past) == 1 and "step() called 6 times" in str(past[0].message)


# ---- LR schedulers -----------------------------------------------------------------------------
SCHEDULES = {
    "step_decay": (lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5), True),
    "cosine": (lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10), True),
    "warmup": (lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1,
                                                             total_iters=5), False),
    "constant": (lambda opt: torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0), False),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_a_decaying_scheduler_on_a_multiplier_lr_warns_once(schedule):
    make, decays = SCHEDULES[schedule]
    w, loss_fn = _problem()
    opt = pf.InexactPolyak([w], total_steps=100, fused=False, foreach=False)
    caught = _ours(_steps(opt, loss_fn, 10, make(opt)), "scheduler lowered lr")
    assert len(caught) == (1 if decays else 0), [str(c.message) for c in caught]
    if decays:
        assert "multiplier on the step size" in str(caught[0].message)


def test_a_scheduler_on_a_learning_rate_optimizer_is_the_users_choice():
    w, loss_fn = _problem()
    opt = pf.ClippedSGD([w], lr=0.1, fused=False, foreach=False)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    assert not _ours(_steps(opt, loss_fn, 8, scheduler), "scheduler lowered lr")


def test_the_checks_make_no_host_sync():
    w, loss_fn = _problem()
    opt = pf.InexactPolyak([w], total_steps=3, fused=False, foreach=False)
    guard = NoHostSync(opt)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    caught = _steps(opt, loss_fn, 6, scheduler)
    assert guard.steps == 6
    assert _ours(caught, "total_steps=3") and _ours(caught, "scheduler lowered lr")


# ---- fused=True without Triton -----------------------------------------------------------------
@pytest.mark.parametrize("interpret", ["0", "1"])
def test_fused_true_without_triton_is_refused_at_construction(interpret):
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None          # as if triton were not installed
        import torch
        import polyak_fused as pf
        try:
            pf.InexactPolyak([torch.nn.Parameter(torch.ones(3))], total_steps=10, fused=True)
        except RuntimeError as err:
            print("REFUSED", err)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT),
                                           "TRITON_INTERPRET": interpret})
    assert out.returncode == 0, out.stderr
    assert "REFUSED Invalid fused: True, but Triton cannot be imported" in out.stdout


# ---- diagnose() --------------------------------------------------------------------------------
def test_diagnose_names_a_loss_below_the_lower_bound():
    w, loss_fn = _problem()
    opt = pf.InexactPolyak([w], total_steps=10, lower_bound=1e6, fused=False, foreach=False)
    _steps(opt, loss_fn, 3)
    report = opt.diagnose()
    assert report["step"] == 3 and report["step_size"] == 0.0
    assert report["lower_bound"] == ("lower_bound", 1e6)
    assert "at or below lower_bound = 1e+06" in report["verdict"]
    assert report["last_loss"] == pytest.approx(float(loss_fn().detach()))


def test_diagnose_names_a_zero_gradient():
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = pf.Polyak([w], fused=False, foreach=False)
    opt.zero_grad()
    loss = opt.watch_loss(0.0 * w.sum() + 2.0)
    loss.backward()
    opt.step()
    assert "||g||^2 <= 1e-16" in opt.diagnose()["verdict"]


def test_diagnose_of_a_moving_run():
    w, loss_fn = _problem()
    opt = pf.InexactPolyak([w], total_steps=10, fused=False, foreach=False)
    assert opt.diagnose()["verdict"] == "no step taken yet"
    _steps(opt, loss_fn, 2)
    report = opt.diagnose()
    assert report["verdict"] == "the last step moved the parameters" and report["step_size"] > 0
    assert report["grad_norm"] > 0
