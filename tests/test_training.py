"""Every optimizer trains a small MLP: full-batch regression on a fixed teacher network.

Task: 256 inputs x ~ N(0, I_8) (seeded), targets y = 3 * teacher(x) for a seeded 8-16-1 tanh
teacher (so the loss can reach 0 and f* = 0 / l* = 0 are exact), student 8-32-1 tanh, MSE loss,
300 full-batch steps. The parameter-free methods run with their defaults; ClippedSGD and NSGDM
with a learning rate picked once by hand.

Final/initial loss seen when the threshold was chosen (eager reference, CPU, 300 steps):
float32: InexactPolyak 0.005, Polyak 0.001, DecSPS 0.034, AdaSPS 0.015, DoG 0.031,
ClippedSGD 0.025, NSGDM 0.002, NSGDM agnostic 0.035; bfloat16 (math in fp32): 0.008, 0.002,
0.037, 0.024, (DoG: 1.0, see below), 0.033, 0.003, 0.098. MoMo and MoMo-Adam with momo-opt's
defaults (lr 1.0 and 1e-2): float32 0.004 and 0.001, bfloat16 0.005 and 0.002. The test asks
for < 0.2.
"""

from __future__ import annotations

import pytest
import torch

import polyak_fused as pf

STEPS = 300


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: a second intra-op thread buys nothing, and on a busy 2-core machine
    the threads' spin-waiting made a 300-step run take 10 s instead of 0.3 s (measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def regression_task(dtype):
    g = torch.Generator().manual_seed(1234)
    X = torch.randn(256, 8, generator=g)
    torch.manual_seed(99)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    with torch.no_grad():
        y = 3 * teacher(X)
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    return X.to(dtype), y.to(dtype), model.to(dtype)


CONFIGS = {
    "inexact_polyak": lambda p: pf.InexactPolyak(p, total_steps=STEPS, fused=False, foreach=False),
    "polyak": lambda p: pf.Polyak(p, fused=False, foreach=False),
    "decsps": lambda p: pf.DecSPS(p, fused=False, foreach=False),
    "adasps": lambda p: pf.AdaSPS(p, fused=False, foreach=False),
    "dog": lambda p: pf.DoG(p, fused=False, foreach=False),
    "clipped_sgd": lambda p: pf.ClippedSGD(p, lr=0.1, max_norm=1.0, fused=False, foreach=False),
    "nsgdm": lambda p: pf.NSGDM(p, lr=0.01, fused=False, foreach=False),
    "nsgdm_agnostic": lambda p: pf.NSGDM(p, lr=0.05, schedule="agnostic", fused=False, foreach=False),
    "momo": lambda p: pf.MoMo(p, fused=False, foreach=False),
    "momo_adam": lambda p: pf.MoMoAdam(p, fused=False, foreach=False),
}

# DoG is left out in bf16: its first steps have length ~reps_rel (1 + ||x0||) ~ 1e-5, below the
# resolution of bf16 weights of size ~0.1, so x - step rounds back to x and DoG never moves
# (measured: final/initial loss 1.000). That is DoG without fp32 master weights, not a bug.
BF16 = [name for name in CONFIGS if name != "dog"]


def train(name, dtype):
    X, y, model = regression_task(dtype)
    opt = CONFIGS[name](model.parameters())
    mse = torch.nn.functional.mse_loss
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = mse(model(X).float(), y.float())   # the loss in fp32 whatever the weights' dtype
        loss.backward()
        opt.step(loss=loss)
        losses.append(loss.detach())
    with torch.no_grad():
        final = mse(model(X).float(), y.float())
    assert all(p.dtype == dtype for p in model.parameters())
    assert opt.scalars["step"].item() == STEPS and opt.scalars["skipped"].item() == 0
    return losses[0].item(), final.item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_float32(name):
    initial, final = train(name, torch.float32)
    assert final < 0.2 * initial, f"{name}: loss {initial:.4g} -> {final:.4g}"


@pytest.mark.parametrize("name", BF16)
def test_training_bfloat16(name):
    initial, final = train(name, torch.bfloat16)
    assert final < 0.2 * initial, f"{name}: loss {initial:.4g} -> {final:.4g}"


def test_bfloat16_scalars_are_fp32():
    """Math in fp32 for bf16 tensors: the step size is held in float32, not bfloat16."""
    X, y, model = regression_task(torch.bfloat16)
    opt = pf.InexactPolyak(model.parameters(), total_steps=10, fused=False, foreach=False)
    loss = torch.nn.functional.mse_loss(model(X).float(), y.float())
    loss.backward()
    opt.step(loss=loss)
    assert opt.scalars["step_size"].dtype == torch.float32
    assert opt.scalars["step_size"].item() > 0
