"""The one door to the Triton path. Imported lazily so that the eager reference works where
Triton is not installed (macOS, Windows)."""

from __future__ import annotations

from . import _eager
from .distributed import current_reduction


def run_fused(method: str, params, grads, buffers: dict, lrs, loss, scalars, hparams: dict,
              cache: dict | None, *, grad_scale=None, found_inf=None) -> None:
    try:
        import triton  # noqa: F401
    except ImportError as err:  # pragma: no cover - only where triton is missing
        raise RuntimeError(
            "the fused path needs Triton (pip install triton); use fused=False") from err
    from csrc_triton.polyak_step import polyak_step_
    reduce = _eager.across_ranks if current_reduction() is not None else None
    lrs = _eager.per_tensor(lrs, len(params))
    polyak_step_(method, params, grads, buffers, lrs, loss, scalars, hparams, cache, reduce,
                 grad_scale=grad_scale, found_inf=found_inf)
