"""Hugging Face ``Trainer`` integration.

    opt = pf.InexactPolyak(model.parameters(), total_steps=None)   # filled from the plan
    args = TrainingArguments(..., max_grad_norm=0, lr_scheduler_type="constant")
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))
    attach(trainer)
    trainer.train()

(``optimizer_cls_and_kwargs=(pf.InexactPolyak, {"total_steps": None})`` works too: the trainer
then builds the optimizer, and ``attach`` finds it when training begins.)

**Which loss is watched.** Trainer calls a bare ``optimizer.step()``, and its callbacks never see
the loss tensor, so ``attach`` wraps ``trainer.compute_loss`` on this one trainer instance: every
loss that ``compute_loss`` returns with an autograd graph while the model is in training mode is
given to ``opt.watch_loss``. That is the loss the model returns (``outputs.loss``), or whatever a
``compute_loss`` override, a ``compute_loss_func`` or the label smoother returns, exactly the
tensor that ``training_step`` then backpropagates. Whatever Trainer does to it afterwards reaches
the watched sum through the gradient of the backward: the division by the number of accumulation
steps (when the loss is a per-batch mean), nothing when the model normalised it by the
accumulated batch's ``num_items_in_batch``, GradScaler's scale under ``fp16``. So the step's loss
is the function whose gradient is in ``.grad`` in every case. Evaluation computes its loss under
``torch.no_grad()`` in eval mode, and is never watched.

**What is refused** (a ``ValueError`` when training begins, naming the fix), because it silently
changes the method: ``max_grad_norm > 0`` (Trainer's default is 1.0: the gradient is clipped
before the step; ``allow_clipping=True`` keeps it), and, for the parameter-free optimizers, a
schedule built by Trainer that decays ``lr`` (the default ``lr_scheduler_type="linear"`` takes the
step multiplier from 1 to 0; ``"constant"`` and ``"constant_with_warmup"`` pass;
``allow_lr_schedule=True`` keeps any). ClippedSGD and NSGDM (whose ``lr`` is a learning rate)
and MoMo and MoMoAdam (whose ``lr`` caps the step size, tau = min(lr / rho, t), and which their
paper runs with the usual schedules) take any schedule; clipping is refused for them too. A
scheduler you give yourself (``optimizers=(opt, sched)``) is your explicit choice and is not
checked.

**total_steps.** An ``InexactPolyak`` built with ``total_steps=None`` gets ``state.max_steps``, the
number of optimizer steps Trainer plans (batches / ``gradient_accumulation_steps``, times epochs,
or ``max_steps``). A ``total_steps`` you gave that differs from the plan gives a warning.
"""

from __future__ import annotations

import warnings

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import SchedulerType

from ._common import check_clipping, check_lr_schedule, fill_total_steps, require_optimizer

__all__ = ["attach", "PolyakCallback"]

#: Trainer's schedules that never decay the multiplier (a warmup only rises to 1).
NON_DECAYING_SCHEDULES = ("constant", "constant_with_warmup")


def attach(trainer: Trainer, *, allow_clipping: bool = False,
           allow_lr_schedule: bool = False) -> PolyakCallback:
    """Make ``trainer`` train correctly with the package's optimizer; returns the callback it adds.

    Call it once, after building the Trainer and before ``trainer.train()``."""
    if not isinstance(trainer, Trainer):
        raise TypeError(f"attach() takes a transformers.Trainer, got {type(trainer).__name__}")
    if getattr(trainer.compute_loss, "_polyak_watches", False):
        raise ValueError("attach() was already called on this trainer: each loss would be "
                         "watched twice")
    callback = PolyakCallback(allow_clipping=allow_clipping, allow_lr_schedule=allow_lr_schedule,
                              scheduler_given=trainer.lr_scheduler is not None)
    trainer.compute_loss = _watching(trainer.compute_loss, callback)
    callback.watching = True
    trainer.add_callback(callback)
    return callback


def _watching(compute_loss, callback: PolyakCallback):
    """``compute_loss`` that also watches, in training, the loss it returns."""
    def compute_loss_and_watch(model, inputs, *args, **kwargs):
        result = compute_loss(model, inputs, *args, **kwargs)
        loss = result[0] if isinstance(result, tuple) else result  # (loss, outputs) on request
        optimizer = callback.optimizer
        in_training = model.training and torch.is_tensor(loss) and loss.requires_grad
        if optimizer is not None and in_training:
            optimizer.watch_loss(loss)
        return result

    compute_loss_and_watch._polyak_watches = True
    return compute_loss_and_watch


class PolyakCallback(TrainerCallback):
    """The callback ``attach`` adds: checks the trainer's settings and fills ``total_steps`` when
    training begins; tells the ``compute_loss`` wrapper which optimizer watches the loss.
    Use :func:`attach` rather than adding it yourself: a callback alone never sees the loss."""

    def __init__(self, *, allow_clipping: bool = False, allow_lr_schedule: bool = False,
                 scheduler_given: bool = False):
        self.allow_clipping = allow_clipping
        self.allow_lr_schedule = allow_lr_schedule
        self.scheduler_given = scheduler_given
        self.watching = False  # set by attach(), once trainer.compute_loss watches the loss
        self.optimizer = None  # the package's optimizer, during training

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if not self.watching:
            raise TypeError("PolyakCallback was added without attach(): it never sees the loss. "
                            "Call polyak_fused.integrations.hf.attach(trainer) instead")
        opt = require_optimizer(
            optimizer, "polyak_fused.integrations.hf.attach()",
            "pass Trainer(optimizers=(opt, None)) or "
            "optimizer_cls_and_kwargs=(pf.InexactPolyak, {'total_steps': None})")
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            check_clipping(opt, f"TrainingArguments(max_grad_norm={args.max_grad_norm})",
                           "TrainingArguments(max_grad_norm=0)", self.allow_clipping)
        schedule = SchedulerType(args.lr_scheduler_type).value
        if not self.scheduler_given and schedule not in NON_DECAYING_SCHEDULES:
            check_lr_schedule(opt, f'TrainingArguments(lr_scheduler_type="{schedule}")',
                              'TrainingArguments(lr_scheduler_type="constant")',
                              self.allow_lr_schedule)
        _warn_ignored_weight_decay(opt)
        fill_total_steps(opt, state.max_steps, "state.max_steps",
                         "set TrainingArguments(max_steps=...) or give total_steps yourself")
        self.optimizer = opt

    def on_train_end(self, args, state, control, **kwargs):
        self.optimizer = None


def _warn_ignored_weight_decay(opt) -> None:
    """Trainer's ``optimizer_cls_and_kwargs`` path puts ``weight_decay`` (``args.weight_decay``)
    in the param groups; only DoG, MoMo and MoMoAdam read one."""
    if "weight_decay" in opt.defaults:
        return
    decays = sorted({g.get("weight_decay", 0.0) for g in opt.param_groups} - {0.0, None})
    if decays:
        warnings.warn(
            f"{type(opt).__name__} has no weight decay: the param groups' weight_decay "
            f"{decays} (TrainingArguments.weight_decay) is ignored", UserWarning, stacklevel=3)
