"""Compile every fused kernel variant for a Hopper GPU (sm_90) without a GPU, and read the code;
compile them for Ampere (sm_80) and Blackwell (sm_100) too.

The Triton interpreter (how the parity suite runs in CI) accepts code that the compiler rejects.
Triton compiles ahead of time for any target with the ptxas it ships, so this test builds each
kernel exactly as the launcher would call it (same argument types, same constexpr flags, same
launch options) down to a cubin, then reads:
  * the PTX: each reduce and update kernel has two steady loops (the loop over full blocks, no
    mask), one for chunks whose tensors are all 16-byte aligned, with 16-byte vector loads, and
    one for the others, with loads of one element. Which one a program runs is decided at run
    time from the addresses in its row of the table, so one misaligned tensor takes the scalar
    loop while the rest of its dtype group keeps the vectors (before, one misaligned tensor made
    the whole group scalar). Both loops move the same bytes per trip.
  * the update kernel's PTX uses fused multiply-adds (polyak_fused._kernels.polyak_step.FP_FUSION);
  * the cubin's resource usage (cuobjdump, shipped with Triton): no register spills.

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
OTHER_TARGETS = {"sm80": ("cuda", 80, 32), "sm100": ("cuda", 100, 32)}  # compiled, not read
DTYPES = {"fp32": ("*fp32", "b32", 4), "bf16": ("*bf16", "b16", 2), "fp16": ("*fp16", "b16", 2)}

# (method, flags) as polyak_step_ derives them from each optimizer's hyperparameters
_OFF = dict(TRACK_BEST=False, MOMENTUM=False, AGNOSTIC=False, WHOLE=False)
VARIANTS = [
    ("inexact_polyak", _OFF),
    ("inexact_polyak", {**_OFF, "TRACK_BEST": True, "WHOLE": True}),
    ("polyak", _OFF),
    ("decsps", _OFF),
    ("adasps", _OFF),
    ("dog", {**_OFF, "WHOLE": True}),
    ("clipped_sgd", _OFF),
    ("clipped_sgd", {**_OFF, "MOMENTUM": True}),
    ("nsgdm", {**_OFF, "MOMENTUM": True}),
    ("nsgdm", {**_OFF, "MOMENTUM": True, "AGNOSTIC": True}),
    ("momo", {**_OFF, "MOMENTUM": True}),
    ("momo_adam", {**_OFF, "MOMENTUM": True}),
]
IDS = [f"{m}-{i}" for i, (m, _) in enumerate(VARIANTS)]
GUARDS = dict(TINY_GRAD_SQ=1e-16, DOG_EPS=1e-8, CLIP_EPS=1e-6)  # as polyak_fused passes them


def _jobs():
    """Every (name, kernel, signature, constexprs, num_warps) the launcher can produce."""
    from polyak_fused._kernels import polyak_step as K

    for vid, (method, flags) in zip(IDS, VARIANTS):
        for dtype, (ptr, _, _) in DTYPES.items():
            common = {"meta": "*i64", "gptrs": "*i64", "chunks": "*i64", "like": ptr}
            key = f"{vid}/{dtype}"
            yield (f"reduce/{key}", "_reduce_kernel",
                   {**common, "partials": "*fp32", "scalars": "*fp32", "hparams": "*fp32",
                    "grad_scale": "*fp32", "chunk_size": "i32", "n_slots": "i32", "slot0": "i32"},
                   {"METHOD": method, "AGNOSTIC": flags["AGNOSTIC"], "WHOLE": flags["WHOLE"],
                    "BLOCK": K.GPU_BLOCK},
                   K.GPU_WARPS)
            yield (f"update/{key}", "_update_kernel",
                   {**common, "coefs": "*fp32", "lrs": "*fp32", "hparams": "*fp32",
                    "grad_scale": "*fp32", "chunk_size": "i32"},
                   {"METHOD": method, "TRACK_BEST": flags["TRACK_BEST"],
                    "MOMENTUM": flags["MOMENTUM"], "WHOLE": flags["WHOLE"],
                    "BLOCK": K.GPU_BLOCK, "TINY_GRAD_SQ": GUARDS["TINY_GRAD_SQ"]}, K.GPU_WARPS)
        for has_loss in (True, False):
            yield (f"step_size/{vid}/{has_loss}", "_step_size_kernel",
                   {"partials": "*fp32", "n_slots": "i32", "loss_ptr": "*fp32",
                    "found_inf": "*fp32", "scalars": "*fp32", "hparams": "*fp32",
                    "lrs": "*fp32", "coefs": "*fp32"},
                   {"METHOD": method, "HAS_LOSS": has_loss, "TRACK_BEST": flags["TRACK_BEST"],
                    "AGNOSTIC": flags["AGNOSTIC"], "BLOCK": 1024, **GUARDS}, 4)


_LOAD = re.compile(r"\bld\.global((?:\.[\w:]+)*)")


def steady_loops(ptx: str) -> list[list[str]]:
    """The global loads of each innermost loop of `ptx`, as their type suffixes (".v4.b32",
    ".b16", ...). LLVM annotates every basic block of a loop: the header with "Inner Loop
    Header", the others with "in Loop: Header=<header>" (on the label's line or the next)."""
    lines = ptx.splitlines()
    loads: dict[str, list[str]] = {}
    loop = None
    for i, line in enumerate(lines):
        block = re.match(r"\$L__(BB\w+):|// %bb\.\d+:", line)
        if block:
            note = line + (lines[i + 1] if i + 1 < len(lines) else "")
            member = re.search(r"in Loop: Header=(\w+)", note)
            loop = block.group(1) if "Inner Loop Header" in note else \
                member.group(1) if member else None
            if loop is not None:
                loads.setdefault(loop, [])
        elif loop is not None:
            loads[loop] += [".".join(t for t in m.group(1).split(".") if t and "::" not in t)
                            for m in _LOAD.finditer(line)]
    return [loads[k] for k in sorted(loads)]


def _resource_usage(cubin: bytes) -> dict:
    """Registers and local memory (spills) from `cuobjdump --dump-resource-usage`."""
    import tempfile

    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|LOCAL|STACK):(\d+)", out))
    return {k.lower(): int(v) for k, v in usage.items()}


def _compile_all() -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from polyak_fused._kernels import polyak_step as K

    report = {}
    for name, kernel, signature, constexprs, num_warps in _jobs():
        try:
            sig = {**signature, **{k: "constexpr" for k in constexprs}}
            src = ASTSource(getattr(K, kernel), sig, constexprs=constexprs)
            compiled = triton.compile(src, target=GPUTarget(*HOPPER),
                                      options={"num_warps": num_warps,
                                               "enable_fp_fusion": K.FP_FUSION})
            ptx = compiled.asm["ptx"]
            report[name] = {"loops": steady_loops(ptx), "fma": "fma.rn.f32" in ptx,
                            "shared": compiled.metadata.shared,
                            **_resource_usage(compiled.asm["cubin"]), "error": None}
        except Exception as err:  # reported per kernel by the tests
            report[name] = {"error": f"{type(err).__name__}: {err}"}
        for arch, target in OTHER_TARGETS.items():
            try:
                compiled = triton.compile(src, target=GPUTarget(*target),
                                          options={"num_warps": num_warps,
                                                   "enable_fp_fusion": K.FP_FUSION})
                report[f"{arch}/{name}"] = {**_resource_usage(compiled.asm["cubin"]),
                                            "error": None}
            except Exception as err:
                report[f"{arch}/{name}"] = {"error": f"{type(err).__name__}: {err}"}
    return report


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=root,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("vid", IDS)
def test_reduce_and_update_kernels_compile_for_sm90(report, vid, dtype):
    for kernel in ("reduce", "update"):
        entry = report[f"{kernel}/{vid}/{dtype}"]
        assert entry["error"] is None, entry["error"]
        assert entry["shared"] <= 64 * 1024
        assert entry["local"] == 0, f"{kernel}: {entry['local']} bytes of register spills"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("vid", IDS)
def test_steady_loops_vector_width(report, vid, dtype):
    """An aligned chunk's loop loads 16-byte vectors (v4.b32: 4 x fp32 or 8 x bf16/fp16); the
    loop a misaligned tensor's chunks take loads single elements, the same bytes per trip.
    Over the whole iterate (WHOLE), DoG's reduce and the best iterate's update have a third
    loop, for a tensor without a gradient this step (DoG reads x and x0; the best iterate
    copies x), with single-element loads and fewer of them (it reads no gradient)."""
    _, scalar, size = DTYPES[dtype]
    method, flags = VARIANTS[IDS.index(vid)]
    for kernel in ("reduce", "update"):
        whole = flags["WHOLE"] and (method == "dog" if kernel == "reduce" else flags["TRACK_BEST"])
        loops = report[f"{kernel}/{vid}/{dtype}"]["loops"]
        assert len(loops) == (3 if whole else 2), f"{kernel}: {loops}"
        vector = [ld for ld in loops if all(op == "v4.b32" for op in ld)]
        single = sorted((ld for ld in loops if all(op == scalar for op in ld)), key=len)
        assert len(vector) == 1 and len(single) == len(loops) - 1, f"{kernel}: {loops}"
        assert vector[0] and 16 * len(vector[0]) == size * len(single[-1]), f"{kernel}: {loops}"
        if whole:
            assert 0 < len(single[0]) < len(single[-1]), f"{kernel}: {loops}"


def test_update_kernels_use_fused_multiply_add(report):
    """FP_FUSION is passed to the compiler: x - (lr * eta) * g is one fma (Triton 3.10 turns
    fusion off by default, which would change the results bitwise)."""
    from polyak_fused._kernels import polyak_step as K

    assert K.FP_FUSION is True
    for vid in IDS:
        for dtype in DTYPES:
            assert report[f"update/{vid}/{dtype}"]["fma"], f"update/{vid}/{dtype}"


@pytest.mark.parametrize("has_loss", [True, False])
@pytest.mark.parametrize("vid", IDS)
def test_step_size_kernel_compiles_for_sm90(report, vid, has_loss):
    entry = report[f"step_size/{vid}/{has_loss}"]
    assert entry["error"] is None, entry["error"]
    assert entry["local"] == 0


@pytest.mark.parametrize("arch", list(OTHER_TARGETS))
def test_every_kernel_compiles_for_ampere_and_blackwell(report, arch):
    """The same kernels as above, for sm_80 (A100) and sm_100 (B200): no error, no spills."""
    entries = {name: e for name, e in report.items() if name.startswith(f"{arch}/")}
    assert len(entries) == len([n for n in report if "/" in n and n.split("/")[0] not in
                                OTHER_TARGETS]), "a kernel was not compiled for " + arch
    failed = {name: e["error"] for name, e in entries.items() if e["error"] is not None}
    assert not failed, failed
    spills = {name: e["local"] for name, e in entries.items() if e.get("local")}
    assert not spills, spills


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    print(json.dumps(_compile_all()))
