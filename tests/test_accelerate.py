"""accelerate (the real package): `gradient_accumulation_steps=4` through `watch_loss` takes the
steps of one process on batches 4x larger.

accelerate wraps the optimizer (`AcceleratedOptimizer`) and calls a bare `step()`;
`accelerator.backward(loss)` divides the loss by the accumulation count before its backward, so
the watched losses are each weighted 1/4 and their sum is the mean over the big batch. The
model is float64 on the eager reference (the two runs differ only by the order of the sums:
bound 1e-12) and float32 on the fused path under the Triton interpreter (float32 rounding of
the accumulated gradient: bound 1e-5).
"""

from __future__ import annotations

import pytest
import torch

import polyak_fused as pf
from test_watch_loss import PATHS, assert_same_params, big_batch_run, make_batches, make_model, mse

accelerate = pytest.importorskip("accelerate")


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons (AcceleratorState, GradientState): reset them so
    that each test's Accelerator takes its own gradient_accumulation_steps."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.parametrize("path", list(PATHS))
def test_accelerate_gradient_accumulation_equals_the_big_batch(path, fresh_accelerate_state):
    path_args, dtype, rtol = PATHS[path]        # the reference, foreach and fused paths
    expected, _ = big_batch_run("InexactPolyak", path_args, dtype)

    accelerator = accelerate.Accelerator(gradient_accumulation_steps=4, cpu=True)
    model = make_model(dtype)
    opt = pf.InexactPolyak(model.parameters(), total_steps=10, **path_args)
    micro = [(xs, ys) for x, y in make_batches(dtype) for xs, ys in zip(x.chunk(4), y.chunk(4))]
    model, prepared_opt = accelerator.prepare(model, opt)
    assert prepared_opt is not opt, "accelerate wraps the optimizer"
    for xs, ys in micro:
        with accelerator.accumulate(model):
            loss = opt.watch_loss(mse(model, xs, ys))   # on the optimizer you created
            accelerator.backward(loss)
            prepared_opt.step()
            prepared_opt.zero_grad()
    assert opt.scalars["step"].item() == len(micro) // 4
    assert_same_params(accelerator.unwrap_model(model), expected, rtol, f"accelerate, {path}")


def test_a_loader_whose_length_does_not_divide_steps_on_the_last_window_too(
        fresh_accelerate_state):
    """10 batches, gradient_accumulation_steps=4: accelerate steps after batches 4, 8 and on the
    last, partial window (10): ceil(10 / 4) = 3 optimizer steps, the total_steps to give (the
    README's example). The loss is watched through the wrapper prepare returns, with
    pf.watch_loss (AcceleratedOptimizer has no watch_loss of its own)."""
    import math

    accelerator = accelerate.Accelerator(gradient_accumulation_steps=4, cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x = torch.randn(40, 3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, True)),
                                         batch_size=4)
    assert len(loader) == 10
    total = math.ceil(len(loader) / 4)
    opt = pf.InexactPolyak(model.parameters(), total_steps=total)
    model, prepared_opt, loader = accelerator.prepare(model, opt, loader)
    with pytest.raises(AttributeError):
        prepared_opt.watch_loss  # noqa: B018 - accelerate's class, not ours
    for xs, ys in loader:
        with accelerator.accumulate(model):
            loss = pf.watch_loss(prepared_opt, torch.nn.functional.mse_loss(model(xs), ys))
            accelerator.backward(loss)
            prepared_opt.step()
            prepared_opt.zero_grad()
    assert opt.scalars["step"].item() == total == 3
    assert opt._live.watched_loss is None       # the last window's loss was used, not left over


def test_watch_loss_through_a_wrapper_is_the_optimizers(fresh_accelerate_state):
    accelerator = accelerate.Accelerator(cpu=True)
    model = torch.nn.Linear(2, 1)
    opt = pf.DoG(model.parameters())
    _, prepared_opt = accelerator.prepare(model, opt)
    loss = pf.watch_loss(prepared_opt, model(torch.ones(1, 2)).square().sum())
    loss.backward()
    assert opt._live.watched_loss is not None
    with pytest.raises(TypeError, match="SGD is not, and does not wrap, an optimizer of"):
        pf.watch_loss(torch.optim.SGD(model.parameters(), lr=0.1), loss)
