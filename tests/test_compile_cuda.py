"""Compile every fused kernel variant for a Hopper GPU (sm_90) without a GPU.

The Triton interpreter (how the parity suite runs in CI) accepts code that the compiler rejects.
Triton compiles ahead of time for any target with the ptxas it ships, so this test builds each
kernel exactly as the launcher would call it (same argument types, same constexpr flags) down
to a cubin, and reads the PTX to check that full blocks move 16-byte vectors.

The tests' conftest turns on the interpreter, which replaces every @triton.jit function, so the
compiling runs once in a child process without it (this file run as a script) and the tests read
its JSON report.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

HOPPER = ("cuda", 90, 32)
CFG = dict(chunk=65536, block=2048, num_warps=8)  # csrc_triton.polyak_step._launch_config, CUDA
DTYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}

# (method, flags) as polyak_step_ derives them from each optimizer's hyperparameters
VARIANTS = [
    ("inexact_polyak", dict(TRACK_BEST=False, MOMENTUM=False, AGNOSTIC=False)),
    ("inexact_polyak", dict(TRACK_BEST=True, MOMENTUM=False, AGNOSTIC=False)),
    ("polyak", dict(TRACK_BEST=False, MOMENTUM=False, AGNOSTIC=False)),
    ("decsps", dict(TRACK_BEST=False, MOMENTUM=False, AGNOSTIC=False)),
    ("adasps", dict(TRACK_BEST=False, MOMENTUM=False, AGNOSTIC=False)),
    ("dog", dict(TRACK_BEST=False, MOMENTUM=False, AGNOSTIC=False)),
    ("clipped_sgd", dict(TRACK_BEST=False, MOMENTUM=False, AGNOSTIC=False)),
    ("clipped_sgd", dict(TRACK_BEST=False, MOMENTUM=True, AGNOSTIC=False)),
    ("nsgdm", dict(TRACK_BEST=False, MOMENTUM=True, AGNOSTIC=False)),
    ("nsgdm", dict(TRACK_BEST=False, MOMENTUM=True, AGNOSTIC=True)),
]
IDS = [f"{m}-{i}" for i, (m, _) in enumerate(VARIANTS)]


def _jobs():
    """Every (name, kernel, signature, constexprs, num_warps) the launcher can produce."""
    for vid, (method, flags) in zip(IDS, VARIANTS):
        for dtype, ptr in DTYPES.items():
            common = {"meta": "*i64", "chunks": "*i64", "like": ptr}
            for aligned in (True, False):
                key = f"{vid}/{dtype}/{'aligned' if aligned else 'unaligned'}"
                yield (f"reduce/{key}", "_reduce_kernel",
                       {**common, "partials": "*fp32", "scalars": "*fp32", "hparams": "*fp32",
                        "grad_scale": "*fp32", "chunk_size": "i32", "n_slots": "i32",
                        "slot0": "i32"},
                       {"METHOD": method, "AGNOSTIC": flags["AGNOSTIC"], "ALIGNED": aligned,
                        "BLOCK": CFG["block"]}, CFG["num_warps"])
                yield (f"update/{key}", "_update_kernel",
                       {**common, "coefs": "*fp32", "lrs": "*fp32", "hparams": "*fp32",
                        "grad_scale": "*fp32", "chunk_size": "i32"},
                       {"METHOD": method, "TRACK_BEST": flags["TRACK_BEST"],
                        "MOMENTUM": flags["MOMENTUM"], "ALIGNED": aligned, "BLOCK": CFG["block"]},
                       CFG["num_warps"])
        for has_loss in (True, False):
            yield (f"step_size/{vid}/{has_loss}", "_step_size_kernel",
                   {"partials": "*fp32", "n_slots": "i32", "loss_ptr": "*fp32", "found_inf": "*fp32",
                    "scalars": "*fp32", "hparams": "*fp32", "coefs": "*fp32"},
                   {"METHOD": method, "HAS_LOSS": has_loss, "TRACK_BEST": flags["TRACK_BEST"],
                    "AGNOSTIC": flags["AGNOSTIC"], "BLOCK": 1024}, 4)


def _compile_all() -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from csrc_triton import polyak_step as K

    report = {}
    for name, kernel, signature, constexprs, num_warps in _jobs():
        try:
            sig = {**signature, **{k: "constexpr" for k in constexprs}}
            src = ASTSource(getattr(K, kernel), sig, constexprs=constexprs)
            compiled = triton.compile(src, target=GPUTarget(*HOPPER), options={"num_warps": num_warps})
            loads = sorted(set(re.findall(r"ld\.global(?:\.[a-z0-9]+)*", compiled.asm["ptx"])))
            report[name] = {"loads": loads, "shared": compiled.metadata.shared, "error": None}
        except Exception as err:  # reported per kernel by the tests
            report[name] = {"error": f"{type(err).__name__}: {err}"}
    return report


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("aligned", ["aligned", "unaligned"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("vid", IDS)
def test_reduce_and_update_kernels_compile_for_sm90(report, vid, dtype, aligned):
    for kernel in ("reduce", "update"):
        entry = report[f"{kernel}/{vid}/{dtype}/{aligned}"]
        assert entry["error"] is None, entry["error"]
        if aligned == "aligned":  # 16-byte vectors: 4 x fp32 or 8 x bf16/fp16, both v4.b32
            assert any(".v4." in op for op in entry["loads"]), f"{kernel}: {entry['loads']}"
        assert entry["shared"] <= 64 * 1024


@pytest.mark.parametrize("has_loss", [True, False])
@pytest.mark.parametrize("vid", IDS)
def test_step_size_kernel_compiles_for_sm90(report, vid, has_loss):
    entry = report[f"step_size/{vid}/{has_loss}"]
    assert entry["error"] is None, entry["error"]


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    print(json.dumps(_compile_all()))
