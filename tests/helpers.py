"""Assertion and setup helpers shared by the fused-path tests."""

from __future__ import annotations

import pytest
import torch


def needs_cuda(test):
    """A GPU-only test: marked `gpu_only` (python -m bench.gpu_check runs them with
    `pytest -m gpu_only`) and skipped where no CUDA device is available."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    return pytest.mark.gpu_only(skip(test))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float,
                 what: str = "") -> None:
    """Like torch.testing.assert_close, but compares in float64 and reports the mismatch count,
    the first mismatching indices with both values, and the largest relative error."""
    a = actual.detach().double().cpu().reshape(-1)
    e = expected.detach().double().cpu().reshape(-1)
    assert a.shape == e.shape, f"{what}: shapes differ {tuple(actual.shape)} vs {tuple(expected.shape)}"
    bad = ~((a - e).abs() <= atol + rtol * e.abs())
    bad &= ~((a == e) | (a.isnan() & e.isnan()))   # equal infinities, NaN where NaN is expected
    if bad.any():
        idx = bad.nonzero().flatten()[:5].tolist()
        rel = ((a - e).abs() / e.abs().clamp_min(1e-30))[bad].max().item()
        firsts = ", ".join(f"[{i}] {a[i].item():.9g} vs {e[i].item():.9g}" for i in idx)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements differ (rtol={rtol}, atol={atol}); "
            f"first: {firsts}; largest relative error {rel:.3g}")


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    a, e = actual.detach().cpu(), expected.detach().cpu()
    same = (a.view(-1).view(torch.uint8) == e.view(-1).view(torch.uint8)) if a.numel() else None
    if same is not None and not bool(same.all()):
        raise AssertionError(f"{what}: not bitwise equal ({int((~same).sum())} bytes differ)")
