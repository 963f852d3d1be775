"""The one door to the Triton path. Imported lazily so that the eager reference works where
Triton is not installed (macOS, Windows)."""

from __future__ import annotations

from . import _eager
from .distributed import current_reduction

_launcher = None  # polyak_fused._kernels.polyak_step.polyak_step_, imported on the first fused step
_guards: dict = {}


def _load_launcher():
    """Import the kernels (a missing Triton and a broken kernel module give different errors) and
    collect the guards' constants, defined once beside the eager references, for the kernels,
    which do not import this package (imported here, not at the top: those modules import this
    one)."""
    global _launcher
    try:
        import triton  # noqa: F401
    except ImportError as err:  # pragma: no cover - only where triton is missing
        raise RuntimeError("the fused path needs Triton (pip install triton); use fused=False") \
            from err
    from ._kernels.polyak_step import polyak_step_

    from ._optimizer import TINY_GRAD_SQ
    from .clipped_sgd import CLIP_EPS
    from .dog import DOG_EPS

    _guards.update(tiny_grad_sq=TINY_GRAD_SQ, dog_eps=DOG_EPS, clip_eps=CLIP_EPS)
    _launcher = polyak_step_
    return polyak_step_


def run_fused(method: str, params, grads, buffers: dict, lrs, loss, scalars, hparams: dict,
              cache: dict | None, *, grad_scale=None, found_inf=None) -> None:
    step = _launcher or _load_launcher()
    reduce = _eager.across_ranks if current_reduction() is not None else None
    if getattr(lrs, "slots", None) is None:  # (the optimizers hand over lrs by param group)
        lrs = _eager.per_tensor(lrs, len(params))
    step(method, params, grads, buffers, lrs, loss, scalars, hparams, cache, reduce,
         grad_scale=grad_scale, found_inf=found_inf, guards=_guards)
