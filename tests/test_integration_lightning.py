"""Lightning with the package's optimizers through polyak_fused.integrations.lightning, on the
real package (no mocks), CPU: accumulation against the big batch, 16-mixed (with the GradScaler
that CUDA would use) and bf16-mixed against plain PyTorch loops, the refused clipping,
total_steps from the trainer's plan. (tests/test_readme.py runs the README's example.)"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

import polyak_fused as pf
from helpers import assert_close

import lightning.pytorch as L
from lightning.pytorch.plugins.precision import MixedPrecision

from polyak_fused.integrations.lightning import PolyakCallback

SAMPLES, DIM = 64, 6


@pytest.fixture(autouse=True)
def quiet_lightning():
    """Lightning logs its setup (GPU available, parameter counts) at INFO: keep the test output
    to failures."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(does not have many workers|LeafSpec)")
        yield
    logger.setLevel(level)


def make_data(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, DIM, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(DIM, 1, generator=g, dtype=torch.float64)) + 0.1 * torch.randn(
        SAMPLES, 1, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def make_net(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 1)).to(dtype)


class Regression(L.LightningModule):
    def __init__(self, make_optimizer=lambda params: pf.InexactPolyak(params, total_steps=None),
                 dtype=torch.float32):
        super().__init__()
        self.net = make_net(dtype)
        self.make_optimizer = make_optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


def fit(module, batch_size, *, epochs=2, callbacks=None, data=None, **trainer_kwargs):
    x, y = make_data() if data is None else data
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                         batch_size=batch_size)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[PolyakCallback()] if callbacks is None else callbacks,
                        **trainer_kwargs)
    trainer.fit(module, loader)
    return trainer, trainer.optimizers[0]


def plain_loop(net, opt, batch_size, accumulation, *, epochs=2, autocast_dtype=None,
               scaler=None, data=None):
    """What Lightning's automatic optimization should amount to, written out in PyTorch."""
    x, y = make_data() if data is None else data
    batches = list(zip(x.split(batch_size), y.split(batch_size)))
    for _ in range(epochs):
        for first in range(0, len(batches), accumulation):
            for xb, yb in batches[first:first + accumulation]:
                with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                                    enabled=autocast_dtype is not None, cache_enabled=False):
                    loss = torch.nn.functional.mse_loss(net(xb), yb)
                opt.watch_loss(loss)
                scaled = (loss / accumulation) if scaler is None else scaler.scale(
                    loss / accumulation)
                scaled.backward()
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
            opt.zero_grad()


def assert_same_params(actual, expected, *, rtol, atol, what):
    for (name, a), b in zip(actual.named_parameters(), expected.parameters()):
        assert_close(a, b, rtol=rtol, atol=atol, what=f"{what}: {name}")


def test_accumulation_equals_the_big_batch():
    """accumulate_grad_batches=4 on batches of 4 against batches of 16, 2 epochs (8 optimizer
    steps), float64 ("64-true"). The two runs add the same per-sample terms in a different order,
    so they differ by rounding only (measured: 2e-16 relative); 1e-12 leaves four orders of
    margin, while the step's loss that Lightning's closure returns (the last micro-batch's loss
    / 4), used without the callback, leaves the parameters 0.6 relative away."""
    big = Regression(dtype=torch.float64)
    _, opt_big = fit(big, 16, precision="64-true")
    accumulated = Regression(dtype=torch.float64)
    _, opt_acc = fit(accumulated, 4, precision="64-true", accumulate_grad_batches=4)
    for opt in (opt_big, opt_acc):
        assert opt.param_groups[0]["total_steps"] == 8   # optimizer steps, not 32 batches
        assert int(opt.scalars["step"]) == 8 and int(opt.scalars["skipped"]) == 0
    assert next(accumulated.parameters()).dtype == torch.float64
    assert_same_params(accumulated, big, rtol=1e-12, atol=1e-14, what="accumulate 4 vs batch 16")
    assert_close(opt_acc.scalars["step_size"], opt_big.scalars["step_size"], rtol=1e-12, atol=0,
                 what="step size")


@pytest.mark.parametrize("accumulation", [1, 2])
def test_16_mixed_with_grad_scaler_equals_the_unscaled_loop(accumulation):
    """The path 16-mixed takes on CUDA: Lightning runs the closure itself (its backward goes
    through scaler.scale), then calls scaler.step(opt) with no closure. The run must equal a
    plain fp16-autocast loop that never scales: the GradScaler's scale (a power of two, 2^10
    here so that no step overflows) must be divided out of the gradients and out of the watched
    loss. Scaling by a power of two is exact in fp16 and fp32 away from overflow and underflow,
    and both runs do the same operations in the same order, so they agree bitwise (measured;
    an optimizer that let GradScaler unscale the gradients but kept the scale in the loss ends
    127 to 462 times off)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    module = Regression()
    _, opt = fit(module, 8, accumulate_grad_batches=accumulation,
                 plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert int(opt.scalars["skipped"]) == 0 and scaler.get_scale() == 2.0 ** 10
    steps = 2 * SAMPLES // 8 // accumulation
    assert int(opt.scalars["step"]) == steps == opt.param_groups[0]["total_steps"]

    net = make_net()
    plain_loop(net, pf.InexactPolyak(net.parameters(), total_steps=steps), 8, accumulation,
               autocast_dtype=torch.float16)
    assert_same_params(module.net, net, rtol=0, atol=0, what="16-mixed + GradScaler")


def test_bf16_mixed_equals_the_plain_autocast_loop():
    """bf16-mixed is autocast alone (no scaler): the same operations as the plain loop, bitwise."""
    module = Regression()
    _, opt = fit(module, 8, precision="bf16-mixed", accumulate_grad_batches=2)
    net = make_net()
    plain_loop(net, pf.InexactPolyak(net.parameters(), total_steps=8), 8, 2,
               autocast_dtype=torch.bfloat16)
    assert int(opt.scalars["step"]) == 8 and int(opt.scalars["skipped"]) == 0
    assert_same_params(module.net, net, rtol=0, atol=0, what="bf16-mixed")


def test_gradient_clipping_is_refused_unless_allowed():
    module = Regression()
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match=r"gradient_clip_val=0\.5.*Trainer\(gradient_clip_val="
                                         r"None\).*allow_clipping=True"):
        fit(module, 16, gradient_clip_val=0.5)
    assert all(torch.equal(p, b) for p, b in zip(module.parameters(), before))

    module = Regression()   # opted in: the trainer clips, the run goes on
    _, opt = fit(module, 16, epochs=1, gradient_clip_val=0.5,
                 callbacks=[PolyakCallback(allow_clipping=True)])
    assert int(opt.scalars["step"]) == 4


def test_total_steps_given_by_the_user_is_kept_and_a_mismatch_warns():
    module = Regression(make_optimizer=lambda ps: pf.InexactPolyak(ps, total_steps=32))
    with pytest.warns(UserWarning, match=r"total_steps=32\) but the trainer plans 8 optimizer "
                                         r"steps .*counts optimizer steps, not batches"):
        _, opt = fit(module, 4, accumulate_grad_batches=4)
    assert opt.param_groups[0]["total_steps"] == 32


def test_other_optimizers_and_no_package_optimizer():
    module = Regression(make_optimizer=lambda ps: pf.DoG(ps))   # no total_steps to fill
    _, opt = fit(module, 16, epochs=1)
    assert "total_steps" not in opt.defaults and int(opt.scalars["step"]) == 4
    with pytest.raises(TypeError, match=r"PolyakCallback found no polyak_fused optimizer.*SGD"):
        fit(Regression(make_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1)), 16, epochs=1)


class ManualRegression(Regression):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        opt.step()


def test_manual_optimization_equals_automatic():
    automatic = Regression()
    fit(automatic, 16)
    manual = ManualRegression()
    _, opt = fit(manual, 16)
    assert int(opt.scalars["step"]) == 8
    assert_same_params(manual, automatic, rtol=0, atol=0, what="manual vs automatic")



class DiscardingRegression(Regression):
    """Manual optimization through Lightning's LightningOptimizer (self.optimizers()): a
    backward on another batch is discarded with opt.zero_grad() before the real one. With
    `watch` the module watches the loss itself through the wrapper (no callback)."""

    def __init__(self, watch: bool):
        super().__init__()
        self.automatic_optimization = False
        self.watch = watch

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        assert type(opt).__name__.startswith("Lightning"), type(opt)  # the wrapper
        x, y = batch
        opt.zero_grad()
        discarded = 10.0 * torch.nn.functional.mse_loss(self.net(x.flip(0) + 1.0), y)
        self.manual_backward(opt.watch_loss(discarded) if self.watch else discarded)
        opt.zero_grad()                                    # drops .grad and the watched loss
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(opt.watch_loss(loss) if self.watch else loss)
        opt.step()


@pytest.mark.parametrize("who_watches", ["callback", "module_through_the_wrapper"])
def test_manual_optimization_through_the_wrapper_shares_the_optimizers_state(who_watches):
    """zero_grad() and watch_loss() called on the LightningOptimizer act on the real optimizer's
    pending loss (they used to land on the wrapper: a discarded backward added its loss to the
    next step, and a loss watched through the wrapper was not seen by the step)."""
    automatic = Regression()
    fit(automatic, 16)
    manual = DiscardingRegression(watch=who_watches != "callback")
    callbacks = [PolyakCallback()] if who_watches == "callback" else []
    if who_watches != "callback":
        manual.make_optimizer = lambda ps: pf.InexactPolyak(ps, total_steps=8)
    _, opt = fit(manual, 16, callbacks=callbacks)
    assert int(opt.scalars["step"]) == 8
    assert_same_params(manual, automatic, rtol=0, atol=0, what=f"manual ({who_watches})")


class ScheduledRegression(Regression):
    """configure_optimizers returns the optimizer and a schedule that decays lr every step."""

    def configure_optimizers(self):
        opt = self.make_optimizer(self.parameters())
        sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.25,
                                                  total_iters=4)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.parametrize("cls", [pf.MoMo, pf.MoMoAdam], ids=lambda c: c.__name__)
def test_momo_takes_a_schedule_and_refuses_clipping(cls):
    """MoMo's lr caps its step size: a decaying schedule runs (its lr follows the schedule);
    gradient clipping is refused, as for the other Polyak steps."""
    def make(params):
        return cls(params, lr=0.5)

    module = ScheduledRegression(make_optimizer=make)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match=rf"gradient_clip_val=0\.5.*{cls.__name__} computes its "
                                         r"step from its averaged gradient d"):
        fit(module, 16, gradient_clip_val=0.5)
    assert all(torch.equal(p, b) for p, b in zip(module.parameters(), before))

    module = ScheduledRegression(make_optimizer=make)
    _, opt = fit(module, 16, epochs=1, callbacks=[PolyakCallback()])
    assert int(opt.scalars["step"]) == 4 and int(opt.scalars["skipped"]) == 0
    assert opt.param_groups[0]["lr"] == pytest.approx(0.125)   # 0.5 * 0.25 after 4 steps
    assert all(not torch.equal(p, b) for p, b in zip(module.parameters(), before))
