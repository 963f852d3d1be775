"""torch.amp.GradScaler: `scaler.step(opt)` hands the optimizer its scale and inf flag
(`_step_supports_amp_scaling`); the step divides the scale out of the gradients (in the kernels,
as g is loaded) and out of the watched loss, and skips the step on an inf.

On the CPU (`GradScaler("cpu")`) with a float32 model and a power-of-two scale, scaling and
unscaling are exact: S * g and S * loss carry the same bits as g and loss, and dividing by S gives
them back. So a scaled run must equal the unscaled run bitwise, on both paths.
"""

from __future__ import annotations

import pytest
import torch

import polyak_fused as pf
from helpers import needs_cuda
from test_watch_loss import (FACTORIES, NoHostSync, make_batches, make_model,
                             micro_batches, mse)

STEPS = 4
INIT_SCALE = 2.0 ** 14


def _path(fused: bool) -> dict:
    """The fused path, or the eager reference (tests/test_foreach.py covers the foreach path)."""
    return dict(fused=True) if fused else dict(foreach=False)


def scaled_run(name, fused, micro=1, grow_every=2):
    """A float32 model trained through GradScaler with watch_loss and a bare scaler.step(opt).
    growth_interval=2 makes the scale double during the run (2^14 -> 2^15 -> 2^16), so more than
    one scale is divided out."""
    model = make_model(torch.float32)
    opt = FACTORIES[name](model.parameters(), **_path(fused))
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=grow_every)
    scales = []
    for x, y in make_batches(torch.float32, STEPS):
        opt.zero_grad()
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            loss = opt.watch_loss(mse(model, xs, ys))
            scaler.scale(loss / micro).backward()
        scales.append(scaler.get_scale())
        scaler.step(opt)
        scaler.update()
    return model, opt, scales


def unscaled_run(name, fused, micro=1):
    """The same run without GradScaler: watch_loss, (loss / micro).backward(), bare step()."""
    model = make_model(torch.float32)
    opt = FACTORIES[name](model.parameters(), **_path(fused))
    for x, y in make_batches(torch.float32, STEPS):
        opt.zero_grad()
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            loss = opt.watch_loss(mse(model, xs, ys))
            (loss / micro).backward()
        opt.step()
    return model, opt


def assert_bitwise_equal_runs(model, opt, ref_model, ref_opt, what):
    for i, (a, e) in enumerate(zip(model.parameters(), ref_model.parameters())):
        assert torch.equal(a, e), f"{what}: param {i} differs by {(a - e).abs().max().item():.3g}"
    for key, value in ref_opt.scalars.items():
        assert torch.equal(opt.scalars[key], value), \
            f"{what}: scalar {key}: {opt.scalars[key].item()} vs {value.item()}"


@pytest.mark.parametrize("micro", [1, 4])
@pytest.mark.parametrize("name, fused", [
    pytest.param(name, fused, id=f"{name}-{'fused' if fused else 'reference'}")
    for name in FACTORIES for fused in (False, True)])
def test_grad_scaler_run_equals_the_unscaled_run_bitwise(name, micro, fused):
    model, opt, scales = scaled_run(name, fused, micro)
    assert scales == [INIT_SCALE, INIT_SCALE, 2 * INIT_SCALE, 2 * INIT_SCALE], scales
    ref_model, ref_opt = unscaled_run(name, fused, micro)
    assert_bitwise_equal_runs(model, opt, ref_model, ref_opt, f"{name}, {micro} micro-batches")
    assert opt.scalars["step"].item() == STEPS and opt.scalars["skipped"].item() == 0


@pytest.mark.parametrize("name, fused", [
    pytest.param(name, fused, id=f"{name}-{'fused' if fused else 'reference'}")
    for name in ["InexactPolyak", "DoG", "NSGDM", "MoMo", "MoMoAdam"] for fused in (False, True)])
def test_an_overflowing_step_is_skipped_and_the_scale_backs_off(name, fused):
    model = make_model(torch.float32)
    opt = FACTORIES[name](model.parameters(), **_path(fused))
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    (x, y), (x2, y2) = make_batches(torch.float32, 2)
    scaler.scale(opt.watch_loss(mse(model, x, y))).backward()
    scaler.step(opt)
    scaler.update()
    before = [p.detach().clone() for p in model.parameters()]
    state_before = {k: v.clone() for k, v in opt.scalars.items()}
    buffers_before = [{k: v.clone() for k, v in opt.state[p].items() if k not in opt.scalars}
                      for p in model.parameters()]   # (the scalars are in the first one's state)

    opt.zero_grad()
    scaler.scale(opt.watch_loss(mse(model, x2, y2))).backward()
    next(model.parameters()).grad[0, 0] = float("inf")    # an fp16-style overflow
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == INIT_SCALE / 2, "the scale backs off after an inf"
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b), "a skipped step moved a parameter"
    for p, bufs in zip(model.parameters(), buffers_before):
        for k, v in bufs.items():
            assert torch.equal(opt.state[p][k], v), f"a skipped step changed state {k}"
    assert opt.scalars["skipped"].item() == state_before["skipped"].item() + 1
    assert opt.scalars["step"].item() == state_before["step"].item()
    for k in state_before:
        if k != "skipped":
            assert torch.equal(opt.scalars[k], state_before[k]), f"scalar {k} changed"

    # and the next step, with finite gradients, is taken (the watched sum was cleared)
    opt.zero_grad()
    scaler.scale(opt.watch_loss(mse(model, x2, y2))).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.scalars["step"].item() == state_before["step"].item() + 1


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_found_inf_alone_skips_the_step(fused):
    """found_inf set by the scaler skips the step even when the gradients the optimizer reads are
    finite (GradScaler's flag is authoritative, e.g. an inf found on another device)."""
    model = make_model(torch.float32)
    opt = FACTORIES["InexactPolyak"](model.parameters(), **_path(fused))
    x, y = make_batches(torch.float32, 1)[0]
    loss = mse(model, x, y)
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.grad_scale, opt.found_inf = torch.ones(()), torch.ones(())
    try:
        opt.step(loss=loss)
    finally:
        del opt.grad_scale, opt.found_inf
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.scalars["skipped"].item() == 1


def test_unscale_before_step_with_a_watched_loss_raises_and_says_what_to_do():
    model = make_model(torch.float32)
    opt = FACTORIES["InexactPolyak"](model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    x, y = make_batches(torch.float32, 1)[0]
    scaler.scale(opt.watch_loss(mse(model, x, y))).backward()
    scaler.unscale_(opt)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"unscale_\(optimizer\) ran before scaler.step"
                                           r"(.|\n)*scaler.step\(optimizer, loss=loss\)"):
        scaler.step(opt)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_unscale_then_step_with_the_loss_given_equals_the_unscaled_run(fused):
    """What the error above recommends: pass the (unscaled) loss through scaler.step."""
    model = make_model(torch.float32)
    opt = FACTORIES["InexactPolyak"](model.parameters(), **_path(fused))
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    for x, y in make_batches(torch.float32, STEPS):
        opt.zero_grad()
        loss = mse(model, x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        scaler.step(opt, loss=loss)
        scaler.update()
    ref_model, ref_opt = unscaled_run("InexactPolyak", fused)
    assert_bitwise_equal_runs(model, opt, ref_model, ref_opt, "unscale_ + loss=")


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_grad_scaler_step_makes_no_host_sync(fused):
    """Inside optimizer.step(), which scaler.step() calls."""
    model = make_model(torch.float32)
    opt = FACTORIES["InexactPolyak"](model.parameters(), **_path(fused))
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    guard = NoHostSync(opt)
    try:
        for x, y in make_batches(torch.float32, STEPS):
            opt.zero_grad()
            for xs, ys in micro_batches(x, y):
                scaler.scale(opt.watch_loss(mse(model, xs, ys)) / 4).backward()
            scaler.step(opt)
            scaler.update()
    finally:
        guard.allow()
    assert guard.steps == STEPS + 1
    assert opt.scalars["step"].item() == STEPS


@needs_cuda
def test_cuda_watched_loss_and_grad_scaler_step_makes_no_host_sync():
    """On a GPU (fused=None takes the kernels): accumulation through watch_loss, fp16 autocast
    and GradScaler; every step() runs under torch.cuda.set_sync_debug_mode("error")."""
    model = make_model(torch.float32).cuda()
    opt = FACTORIES["InexactPolyak"](model.parameters())
    opt.register_step_pre_hook(lambda *a: torch.cuda.set_sync_debug_mode("error"))
    opt.register_step_post_hook(lambda *a: torch.cuda.set_sync_debug_mode(0))
    scaler = torch.amp.GradScaler("cuda")
    try:
        for x, y in make_batches(torch.float32, STEPS):
            opt.zero_grad()
            for xs, ys in micro_batches(x.cuda(), y.cuda()):
                with torch.autocast("cuda", dtype=torch.float16):
                    loss = opt.watch_loss(mse(model, xs, ys).float())
                scaler.scale(loss / 4).backward()
            scaler.step(opt)
            scaler.update()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert opt.scalars["step"].item() + opt.scalars["skipped"].item() == STEPS
