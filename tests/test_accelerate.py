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
from test_watch_loss import assert_same_params, big_batch_run, make_batches, make_model, mse

accelerate = pytest.importorskip("accelerate")
PATHS = {"reference": (False, torch.float64, 1e-12), "fused": (True, torch.float32, 1e-5)}


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
    fused, dtype, rtol = PATHS[path]
    expected, _ = big_batch_run("InexactPolyak", fused, dtype)

    accelerator = accelerate.Accelerator(gradient_accumulation_steps=4, cpu=True)
    model = make_model(dtype)
    opt = pf.InexactPolyak(model.parameters(), total_steps=10, fused=fused)
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
