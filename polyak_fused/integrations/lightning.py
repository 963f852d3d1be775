"""Lightning integration: a callback.

    opt = pf.InexactPolyak(self.parameters(), total_steps=None)   # in configure_optimizers
    trainer = L.Trainer(..., callbacks=[PolyakCallback()])       # total_steps: from the plan

**Which loss is watched.** ``on_before_backward`` receives the tensor that Lightning is about to
backpropagate, and the callback gives it to ``opt.watch_loss``. That tensor is the
``training_step`` loss already divided by ``accumulate_grad_batches`` (so the watched sum over the
micro-batches is their mean, the function whose gradient is accumulated in ``.grad``), and under
``16-mixed`` with a GradScaler it is the scaled loss, whose scale the optimizer removes when
``scaler.step(opt)`` hands it ``grad_scale``. Lightning's closure returns the loss divided by
``accumulate_grad_batches`` of the last micro-batch only; the watched sum, not that return value,
is the step's loss. Manual optimization works the same way (``self.manual_backward(loss)`` calls
the hook), with one optimizer.

**What is refused** (a ``ValueError`` at ``fit``, naming the fix): ``gradient_clip_val > 0``, which
clips the gradient before every step (``allow_clipping=True`` keeps it). Lightning builds no
schedule by default; a scheduler returned by ``configure_optimizers`` is the user's explicit
choice and is not checked.

**total_steps.** An ``InexactPolyak`` built with ``total_steps=None`` gets
``trainer.estimated_stepping_batches``, the number of optimizer steps Lightning plans (batches /
``accumulate_grad_batches``, times epochs, or ``max_steps``). It is filled when training starts,
after a checkpoint's optimizer state was restored; a ``total_steps`` that differs from the plan
gives a warning.
"""

from __future__ import annotations

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package, same API
    from pytorch_lightning import Callback

from ._common import check_clipping, fill_total_steps, require_optimizer

__all__ = ["PolyakCallback"]


class PolyakCallback(Callback):
    """Watch the loss of every training step before its backward, fill ``total_steps`` from the
    trainer's plan, and refuse ``gradient_clip_val`` unless ``allow_clipping=True``."""

    def __init__(self, *, allow_clipping: bool = False):
        self.allow_clipping = allow_clipping
        self.optimizer = None  # the package's optimizer, during training

    def on_fit_start(self, trainer, pl_module):
        opt = self._find(trainer)
        clip = trainer.gradient_clip_val
        if clip is not None and clip > 0:
            check_clipping(opt, f"Trainer(gradient_clip_val={clip})",
                           "Trainer(gradient_clip_val=None)", self.allow_clipping)

    def on_train_start(self, trainer, pl_module):
        # after the checkpoint's optimizer state (with its total_steps) was restored
        opt = self._find(trainer)
        fill_total_steps(opt, trainer.estimated_stepping_batches,
                         "trainer.estimated_stepping_batches",
                         "set Trainer(max_steps=...) or give total_steps yourself")
        self.optimizer = opt

    def on_before_backward(self, trainer, pl_module, loss):
        if self.optimizer is not None:
            self.optimizer.watch_loss(loss)

    def on_train_end(self, trainer, pl_module):
        self.optimizer = None

    @staticmethod
    def _find(trainer):
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(
                f"PolyakCallback works with one optimizer, the trainer has {len(optimizers)}; with "
                f"several (manual optimization), call opt.watch_loss(loss) yourself before "
                f"self.manual_backward(loss)")
        return require_optimizer(optimizers[0], "PolyakCallback",
                                 "return pf.InexactPolyak(...) (or another optimizer of "
                                 "polyak_fused) from configure_optimizers")
