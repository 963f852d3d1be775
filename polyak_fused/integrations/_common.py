"""What the framework integrations share (no framework is imported here): finding the package's
optimizer inside a framework's wrappers, filling ``total_steps`` from the trainer's plan, and the
errors for the trainer settings that silently change the method."""

from __future__ import annotations

import math
import warnings

from .._optimizer import PolyakFamilyOptimizer, unwrap


def require_optimizer(optimizer, where: str, fix: str) -> PolyakFamilyOptimizer:
    found = unwrap(optimizer)
    if not isinstance(found, PolyakFamilyOptimizer):
        raise TypeError(
            f"{where} found no polyak_fused optimizer (the trainer's optimizer is "
            f"{type(found).__name__}); {fix}")
    return found


def check_clipping(optimizer: PolyakFamilyOptimizer, setting: str, fix: str, allowed: bool) -> None:
    """Refuse gradient clipping before the step unless the user opted in."""
    if allowed:
        return
    name = type(optimizer).__name__
    if optimizer.LR_ROLE == "learning_rate":  # ClippedSGD, NSGDM
        why = (f"{name} takes the gradient as it is (ClippedSGD clips with its own max_norm, NSGDM "
               f"normalises), and clipping it before the step changes the method")
    elif optimizer.LR_ROLE == "cap":  # MoMo, MoMoAdam
        why = (f"{name} computes its step from its averaged gradient d, and clipping shrinks d, "
               f"so the Polyak part of the step size grows (up to its cap)")
    else:
        why = (f"{name} computes its step from ||g||, and clipping shrinks ||g||, so the step "
               f"(f - l*)/||g||^2 grows (InexactPolyak clips by itself)")
    raise ValueError(
        f"Gradient clipping before the optimizer step ({setting}) changes the method: {why}. "
        f"Set {fix}, or pass allow_clipping=True to keep it.")


def check_lr_schedule(optimizer: PolyakFamilyOptimizer, setting: str, fix: str,
                      allowed: bool) -> None:
    """Refuse a schedule that decays lr when lr multiplies a step the method computes (not when
    it is a learning rate, nor when it caps the step: MoMo's LR_ROLE "cap", whose paper runs it
    with the usual schedules; clipping still shrinks its direction d, and is refused)."""
    if allowed:  # the user's explicit choice: the step's own warning is not given either
        optimizer._live.warned.add("lr_schedule")
        return
    if optimizer.LR_ROLE != "multiplier":
        return
    name = type(optimizer).__name__
    raise ValueError(
        f"The learning-rate schedule ({setting}) decays {name}'s lr, which is not a learning rate "
        f"but a multiplier on the step size the method computes (1.0 is the paper's method): the "
        f"steps shrink towards 0 on top of the method's own rule. Set {fix}, or pass "
        f"allow_lr_schedule=True to keep it.")


def fill_total_steps(optimizer: PolyakFamilyOptimizer, planned, plan: str, fix: str) -> None:
    """Give InexactPolyak the trainer's number of optimizer steps when total_steps was left None;
    warn when the user's own total_steps disagrees with the plan."""
    if "total_steps" not in optimizer.defaults:
        return
    current = optimizer.param_groups[0]["total_steps"]
    finite = planned is not None and not (isinstance(planned, float) and math.isinf(planned))
    if current is None:
        if not finite:
            raise ValueError(
                f"Invalid total_steps: None, and the trainer does not know how many optimizer "
                f"steps it will take ({plan} = {planned}); {fix}")
        optimizer.set_total_steps(int(planned))
    elif finite and current != int(planned):
        warnings.warn(
            f"{type(optimizer).__name__}(total_steps={current}) but the trainer plans "
            f"{int(planned)} optimizer steps ({plan}). total_steps is the horizon T of the step "
            f"size (f - l*)/(sqrt(T) ||g||^2) and counts optimizer steps, not batches; leave it "
            f"None to have it filled from the plan.", UserWarning, stacklevel=3)
