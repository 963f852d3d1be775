"""The launches a GPU step makes, checked without a GPU: the kernels are compiled for sm_90 by
Triton's ptxas and launched through Triton's real C launcher against the project's stub CUDA
driver (bench/fakecuda), which records every launch (function, grid, stream, the device current
at the launch, the bytes of each parameter).

Under the interpreter (the rest of the suite) every launch goes through kernel[grid]; on a GPU,
after a variant has compiled, the launcher calls the compiled kernel directly
(polyak_fused._kernels.polyak_step._launch). These tests take that path and check, for every method, on a
model with float32, bfloat16 and float16 parameters in one optimizer:
  * each launch runs a variant compiled for its own arguments: the pointer types of the compiled
    signature are the dtypes of the tensors passed, and the parameter bytes the launcher packed
    are those tensors' addresses and the integers given (a variant compiled for *fp32 run on
    bf16 tensors would read and write twice each tensor's bytes);
  * after the first step nothing compiles, every launch is direct, and there are
    2 x (dtype groups) + 1 launches per step;
  * with two stubbed devices, the launches of an optimizer whose tensors are on device 1 go to
    device 1 and its current stream while device 0 is current, and device 0 is current again
    after the step.
The tensors stay in host memory (the stub never reads them), so the numbers are not checked
here: the parity suite checks them under the interpreter.

Like tests/test_compile_cuda.py, the work runs in a child process without TRITON_INTERPRET (this
file run as a script) and the tests read its JSON report. Without a C compiler or ptxas, or with
a Triton whose launcher the stub does not know, the tests skip with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Every method and kernel variant of the package (as tests/test_parity.py builds them).
CONFIGS = {
    "inexact_polyak": ("InexactPolyak", dict(total_steps=100, lower_bound=0.25)),
    "inexact_polyak_best": ("InexactPolyak", dict(total_steps=100, track_best=True)),
    "polyak": ("Polyak", dict(f_star=0.1, c=0.5, max_lr=0.05)),
    "decsps": ("DecSPS", dict(c0=2.0, gamma_b=0.5)),
    "adasps": ("AdaSPS", dict(c_p=0.5, lower_bound=0.1)),
    "dog": ("DoG", dict(reps_rel=0.05, weight_decay=0.01)),
    "clipped_sgd": ("ClippedSGD", dict(lr=0.1, max_norm=2.0)),
    "clipped_sgd_momentum": ("ClippedSGD", dict(lr=0.1, max_norm=2.0, momentum=0.9)),
    "nsgdm": ("NSGDM", dict(lr=0.1, beta=0.8)),
    "nsgdm_agnostic": ("NSGDM", dict(lr=0.1, schedule="agnostic")),
    "momo": ("MoMo", dict(lr=0.5, weight_decay=0.01)),
    "momo_bc_fstar": ("MoMo", dict(lr=0.2, beta=0.8, bias_correction=True, use_fstar=True,
                                   lb=0.05)),
    "momo_adam": ("MoMoAdam", dict(weight_decay=0.01)),
    "momo_adam_adamw_fstar": ("MoMoAdam", dict(lr=0.05, betas=(0.8, 0.99), divide=False,
                                               weight_decay=0.02, use_fstar=True)),
}
#: One optimizer, three dtype groups (sizes: one and several chunks, odd lengths).
MODEL = [("float32", 20000), ("bfloat16", 4099), ("float16", 1000), ("float32", 33),
         ("bfloat16", 7), ("float16", 3)]
STEPS = 4  # 1: compiles (kernel[grid]); 2: the same gradients; 3: new ones; 4: one is None
N_GROUPS = 3


# ------------------------------------------------------------------------------------------------
# The child: install the stub, run, check every launch, print a report
# ------------------------------------------------------------------------------------------------
_TORCH_OF = {"*fp32": "torch.float32", "*bf16": "torch.bfloat16", "*fp16": "torch.float16",
             "*i64": "torch.int64"}


def _compiled_kernels(K) -> dict:
    """Every compiled variant the process holds, by its function handle."""
    out = {}
    for kernel in (K._reduce_kernel, K._step_size_kernel, K._update_kernel):
        for caches in kernel.device_caches.values():
            for compiled in caches[0].values():
                if compiled.function is not None:  # (set once it has been loaded)
                    out[compiled.function] = compiled
    for compiled in K._COMPILED.values():
        out[compiled.function] = compiled
    return out


def check_launch(launch, compiled) -> list[str]:
    """What is wrong with one launch (an empty list: nothing): each argument against the
    compiled variant's signature, and the packed bytes against the arguments."""
    import torch

    problems = []
    name = compiled.name
    signature = dict(compiled.src.signature)
    runtime = [(n, t) for n, t in signature.items() if t != "constexpr"]
    args = [a for a, t in zip(launch.args, signature.values()) if t != "constexpr"]
    if len(args) != len(runtime):
        return [f"{name}: {len(args)} runtime arguments for a signature of {len(runtime)}"]
    if launch.params is None or len(launch.params) != len(runtime) + 2:
        return [f"{name}: {None if launch.params is None else len(launch.params)} parameters "
                f"packed, expected {len(runtime)} + 2 scratch pointers"]
    for k, ((arg_name, ty), value) in enumerate(zip(runtime, args)):
        if ty.startswith("*"):
            if not isinstance(value, torch.Tensor):
                problems.append(f"{name}.{arg_name}: {type(value).__name__} for {ty}")
                continue
            if str(value.dtype) != _TORCH_OF.get(ty, ty):
                problems.append(f"{name}.{arg_name}: a {value.dtype} tensor launched with the "
                                f"variant compiled for {ty}")
            if launch.param_as_int(k) != value.data_ptr():
                problems.append(f"{name}.{arg_name}: packed address {launch.param_as_int(k):#x}, "
                                f"tensor at {value.data_ptr():#x}")
        elif ty in ("i32", "i64"):
            if launch.param_as_int(k) != value:
                problems.append(f"{name}.{arg_name}: packed {launch.param_as_int(k)}, given "
                                f"{value}")
    return problems


def _params(torch, gen):
    return [torch.nn.Parameter(torch.randn(n, generator=gen).to(getattr(torch, dtype)))
            for dtype, n in MODEL]


def _set_grads(torch, params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def run_mixed_dtypes(harness, K, pf, torch) -> tuple[dict, tuple]:
    """Every config on the mixed model; also returns one fp32 update launch (for the control)."""
    report, sample = {}, None
    for config, (cls, kwargs) in CONFIGS.items():
        gen = torch.Generator().manual_seed(0)
        params = _params(torch, gen)
        opt = getattr(pf, cls)(params, fused=True, **kwargs)
        _set_grads(torch, params, gen)
        per_step, problems, compiles_after_first = [], [], 0
        for step in range(STEPS):
            if step == 2:
                _set_grads(torch, params, gen)
            if step == 3 and opt.WHOLE_ITERATE:
                params[1].grad = None
            before_compiles = sum(len(c[0]) for k in (K._reduce_kernel, K._step_size_kernel,
                                                      K._update_kernel)
                                  for c in k.device_caches.values())
            harness.reset()
            opt.step(loss=torch.tensor(2.0))
            launches = harness.launches()
            per_step.append(len(launches))
            after = sum(len(c[0]) for k in (K._reduce_kernel, K._step_size_kernel,
                                            K._update_kernel) for c in k.device_caches.values())
            if step > 0:
                compiles_after_first += after - before_compiles
            kernels = _compiled_kernels(K)
            for launch in launches:
                compiled = kernels.get(launch.function)
                if compiled is None:
                    problems.append(f"step {step}: launch of an unknown function "
                                    f"{launch.function:#x}")
                    continue
                problems += [f"step {step}: {p}" for p in check_launch(launch, compiled)]
                if compiled.name == "_update_kernel" and launch.args[3].dtype == torch.float32:
                    sample = (compiled, launch.args)
        like_dtypes = sorted({str(launch.args[3].dtype) for launch in launches
                              if kernels[launch.function].name != "_step_size_kernel"})
        report[config] = {"launches_per_step": per_step, "problems": problems,
                          "compiles_after_first": compiles_after_first,
                          "group_dtypes": like_dtypes}
    return report, sample


def run_wrong_variant_is_caught(harness, K, torch, sample) -> list[str]:
    """The check itself: the fp32 variant of the update kernel launched on bf16 tensors (what
    the direct launch did before its key held the dtypes) must be reported. `sample`: a
    recorded fp32 update launch (compiled variant, arguments)."""
    compiled, args = sample
    args = list(args)
    args[3] = torch.zeros(8, dtype=torch.bfloat16)         # `like`: the group's dtype
    harness.reset()
    compiled.run(1, 1, 1, 0, compiled.function, compiled.packed_metadata, None, None, None,
                 *args)
    return check_launch(harness.launches()[0], compiled)


def run_two_devices(harness, K, pf, torch) -> dict:
    """Optimizer A's tensors on device 1, B's on device 0 (the library's own _cuda_index told so,
    since the stub's tensors are host memory), device 0 current throughout."""
    from bench import fakecuda
    from triton.runtime import driver

    real_index = K._cuda_index
    out = {}
    for name, index in (("device1", 1), ("device0", 0)):
        gen = torch.Generator().manual_seed(1)
        params = _params(torch, gen)
        opt = pf.InexactPolyak(params, total_steps=10, fused=True)
        records = []
        K._cuda_index = lambda device, index=index: index
        try:
            for step in range(3):
                _set_grads(torch, params, gen)
                driver.active.set_current_device(0)
                harness.reset()
                opt.step(loss=torch.tensor(1.5))
                records += [(launch.device, launch.stream, launch.function)
                            for launch in harness.launches()]
                assert driver.active.get_current_device() == 0
        finally:
            K._cuda_index = real_index
        out[name] = {"devices": sorted({d for d, _, _ in records}),
                     "streams": sorted({s for _, s, _ in records}),
                     "functions": sorted({f for _, _, f in records}),
                     "current_after": driver.active.get_current_device(),
                     "expected_stream": fakecuda.stream_of(index), "launches": len(records)}
    return out


def main() -> dict:
    sys.path.insert(0, ROOT)
    from bench import fakecuda

    try:
        harness = fakecuda.install()
    except fakecuda.Unsupported as e:
        return {"skip": str(e)}
    import torch

    import polyak_fused as pf
    from polyak_fused._kernels import polyak_step as K
    from polyak_fused import _optimizer

    torch.set_num_threads(1)
    _optimizer.interpreter_enabled = lambda: True            # the fused path for host tensors
    K._launch_config = lambda device, numels: K.cuda_launch_config(numels, 132)  # an H100's
    mixed, sample = run_mixed_dtypes(harness, K, pf, torch)
    report = {"mixed": mixed,
              "wrong_variant": run_wrong_variant_is_caught(harness, K, torch, sample)}
    report["devices"] = run_two_devices(harness, K, pf, torch)
    return report


# ------------------------------------------------------------------------------------------------
# The tests
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(f"no stub-driver launches here: {result['skip']}")
    return result


@pytest.mark.parametrize("config", list(CONFIGS))
def test_each_launch_runs_the_variant_compiled_for_its_arguments(report, config):
    entry = report["mixed"][config]
    assert entry["problems"] == [], "\n".join(entry["problems"][:20])
    assert entry["group_dtypes"] == ["torch.bfloat16", "torch.float16", "torch.float32"]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_after_the_first_step_nothing_compiles_and_each_step_launches_three_phases(report,
                                                                                    config):
    entry = report["mixed"][config]
    assert entry["compiles_after_first"] == 0
    assert entry["launches_per_step"] == [2 * N_GROUPS + 1] * STEPS


def test_the_check_catches_a_variant_compiled_for_other_pointers(report):
    problems = report["wrong_variant"]
    assert any("bfloat16 tensor launched with the variant compiled for *fp32" in p
               for p in problems), problems


def test_launches_go_to_the_parameters_device_and_its_current_stream(report):
    one, zero = report["devices"]["device1"], report["devices"]["device0"]
    assert one["devices"] == [1] and one["streams"] == [one["expected_stream"]]
    assert zero["devices"] == [0] and zero["streams"] == [zero["expected_stream"]]
    assert one["current_after"] == 0
    assert one["launches"] == zero["launches"] == 3 * (2 * N_GROUPS + 1)
    # each device runs the kernels loaded on it (compiled variants are per device)
    assert not set(one["functions"]) & set(zero["functions"])


if __name__ == "__main__":
    print(json.dumps(main()))
