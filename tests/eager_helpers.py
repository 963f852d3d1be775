"""Helpers for the eager-reference tests (test_formulas, test_synthetic, test_training,
test_state_dict, test_errors).

`assert_bitwise_equal` compares the raw bits (so NaN == NaN with the same payload and 0.0 != -0.0)
and, on failure, reports the mismatch count, the first indices with both values and the largest
relative error. `snapshot` / `assert_same_snapshot` capture and compare everything an optimizer
step may touch: the parameters, every per-parameter state tensor and the global scalars.
`OPTIMIZERS` lists every optimizer of the package in the configurations these tests exercise.
"""

from __future__ import annotations

import math

import torch

import polyak_fused as pf
from polyak_fused._optimizer import COMMON_SCALARS

_INT_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    return t.view(_INT_OF[t.element_size()])


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, name: str = "tensor"):
    assert torch.is_tensor(actual) and torch.is_tensor(expected), name
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, \
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.device == expected.device, f"{name}: device {actual.device} != {expected.device}"
    diff = _bits(actual) != _bits(expected)
    if not bool(diff.any()):
        return
    idx = diff.nonzero().reshape(-1)
    a = actual.detach().reshape(-1).double()
    e = expected.detach().reshape(-1).double()
    first = ", ".join(f"[{i}] {a[i].item()!r} vs {e[i].item()!r}" for i in idx[:5].tolist())
    rel = ((a - e).abs() / e.abs().clamp(min=1e-300))[idx]
    rel = rel[torch.isfinite(rel)]
    worst = rel.max().item() if rel.numel() else math.nan
    raise AssertionError(
        f"{name}: {idx.numel()} of {diff.numel()} elements differ bitwise; first: {first}; "
        f"max rel err {worst:.3e}")


def snapshot(opt: torch.optim.Optimizer) -> dict:
    """A deep copy of the parameters, per-parameter state and scalars, read without creating
    anything (opt.state is read directly, not through the opt.scalars property). The scalars are
    the entries named COMMON_SCALARS + SCALARS in the first parameter's state; "state" holds
    the per-parameter buffers only."""
    params = [p for g in opt.param_groups for p in g["params"]]
    names = COMMON_SCALARS + opt.SCALARS
    per_param = []
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        per_param.append({k: v.detach().clone() for k, v in st.items()
                          if torch.is_tensor(v) and not (i == 0 and k in names)})
    first = opt.state.get(params[0], {}) if params else {}
    scalars = {k: first[k].clone() for k in names if k in first}
    return {
        "params": [p.detach().clone() for p in params],
        "state": per_param,
        "scalars": scalars or None,
    }


def assert_same_snapshot(actual: dict, expected: dict, *, ignore_scalars=(), what=""):
    """Bitwise equality of two snapshots (scalars named in ignore_scalars are not compared)."""
    assert len(actual["params"]) == len(expected["params"])
    for i, (a, e) in enumerate(zip(actual["params"], expected["params"])):
        assert_bitwise_equal(a, e, f"{what}param[{i}]")
    for i, (a, e) in enumerate(zip(actual["state"], expected["state"])):
        assert a.keys() == e.keys(), f"{what}state[{i}] keys {sorted(a)} != {sorted(e)}"
        for k in a:
            assert_bitwise_equal(a[k], e[k], f"{what}state[{i}][{k!r}]")
    if expected["scalars"] is None or actual["scalars"] is None:
        assert actual["scalars"] is None and expected["scalars"] is None, f"{what}scalars presence"
        return
    assert actual["scalars"].keys() == expected["scalars"].keys()
    for k in expected["scalars"]:
        if k not in ignore_scalars:
            assert_bitwise_equal(actual["scalars"][k], expected["scalars"][k],
                                 f"{what}scalars[{k!r}]")


#: Every optimizer of the package in the configurations the tests exercise: (id, factory).
#: The factories take the parameters (or param groups) and build the eager reference.
OPTIMIZERS = [
    ("inexact_polyak", lambda p: pf.InexactPolyak(p, total_steps=50, fused=False, foreach=False)),
    ("inexact_polyak_best", lambda p: pf.InexactPolyak(p, total_steps=50, track_best=True,
                                                       lower_bound=0.01, fused=False, foreach=False)),
    ("polyak", lambda p: pf.Polyak(p, fused=False, foreach=False)),
    ("sps_max", lambda p: pf.Polyak(p, c=0.5, max_lr=0.3, fused=False, foreach=False)),
    ("decsps", lambda p: pf.DecSPS(p, fused=False, foreach=False)),
    ("adasps", lambda p: pf.AdaSPS(p, fused=False, foreach=False)),
    ("dog", lambda p: pf.DoG(p, fused=False, foreach=False)),
    ("dog_wd", lambda p: pf.DoG(p, reps_rel=1e-4, weight_decay=1e-2, fused=False, foreach=False)),
    ("clipped_sgd", lambda p: pf.ClippedSGD(p, lr=0.05, max_norm=0.5, fused=False, foreach=False)),
    ("clipped_sgd_momentum", lambda p: pf.ClippedSGD(p, lr=0.05, max_norm=0.5, momentum=0.9,
                                                     fused=False, foreach=False)),
    ("nsgdm", lambda p: pf.NSGDM(p, lr=0.01, fused=False, foreach=False)),
    ("nsgdm_agnostic", lambda p: pf.NSGDM(p, lr=0.05, schedule="agnostic", fused=False, foreach=False)),
    ("momo", lambda p: pf.MoMo(p, fused=False, foreach=False)),
    ("momo_bc_wd_fstar", lambda p: pf.MoMo(p, lr=0.5, weight_decay=1e-2, lb=0.01,
                                           bias_correction=True, use_fstar=True, fused=False, foreach=False)),
    ("momo_adam", lambda p: pf.MoMoAdam(p, fused=False, foreach=False)),
    ("momo_adam_adamw_fstar", lambda p: pf.MoMoAdam(p, lr=0.05, weight_decay=1e-2, divide=False,
                                                    use_fstar=True, fused=False, foreach=False)),
]
#: The configurations with weight decay: their step moves x even along a zero direction.
WEIGHT_DECAY_IDS = {"dog_wd", "momo_bc_wd_fstar", "momo_adam_adamw_fstar"}
#: The configurations whose lr caps the step size rather than multiplying it (MoMo's alpha).
LR_IS_A_CAP_IDS = {"momo", "momo_bc_wd_fstar", "momo_adam", "momo_adam_adamw_fstar"}
OPTIMIZER_IDS = [name for name, _ in OPTIMIZERS]
OPTIMIZER_FACTORIES = [factory for _, factory in OPTIMIZERS]
