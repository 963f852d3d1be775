"""Host cost of one fused ``step()``, without a GPU: the kernels are compiled for a real Hopper
target and launched through Triton's real launch path, only the CUDA driver is a stub.

    python -m bench.host_cost                        # 148, 2000 and 10000 tensors, ~2 minutes
    python -m bench.host_cost --tensors 2000 --steps 300 --out /tmp/x.csv
    python -m bench.host_cost --table bench/results/host_cost_cpu_<date>.csv \
        [--before <csv of an earlier commit>]       # the table of docs/host_path.md
    python -m bench.host_cost --device cuda          # on a GPU machine: the real driver

On a machine that trains on a GPU, the fused step of a model with thousands of small tensors is
bound by the host: the Python work of step() takes longer than the three kernels. This benchmark
measures that Python work on any Linux machine, with the project's stub CUDA driver
(``bench.fakecuda``: a stub ``libcuda.so.1`` whose ``cuLaunchKernelEx`` only records, and a
Triton driver that reports sm_90 devices). The kernels compile for sm_90 with the ptxas Triton
ships (seconds, on the first step), and every launch goes through ``JITFunction.run`` or the
compiled kernel's runner and Triton's compiled C launcher, exactly as on a GPU host. Not
measured: the real driver's ``cuLaunchKernelEx`` (a few microseconds per launch on a real
machine) and any GPU time.

The tensors stay in host memory; their addresses reach the stub and are never read. The library
is told to take the fused path for them (``interpreter_enabled`` patched to True) and to use the
CUDA launch configuration of an H100 (132 SMs), both only inside this process.

Scenarios, for ``InexactPolyak(fused=True)`` with fp32 tensors, timed around ``step(loss=...)``
only (time.perf_counter_ns, median and 20th/80th percentiles over ``--steps`` steps after
``--warmup`` steps):
  same_grads   the same gradient tensors every step (``zero_grad(set_to_none=False)``)
  new_grads    new gradient tensors at other addresses every step (what
               ``zero_grad(set_to_none=True)`` + backward gives): two sets alternate
  flat_grads   the opt-in mode ``opt.flatten_grads()`` (gradients are views of one buffer per dtype
               group), skipped where the optimizer has no such method
Layouts: 148 tensors are GPT-2's shapes scaled down (d=128, vocabulary 4096, context 256:
bench.layouts "gpt2_small"); the others are N tensors of ``--numel`` elements (64 by default:
on a GPU host the tensors' data is in device memory and their host-side metadata lies close
together; large host tensors would spread it out and add cache misses a GPU host does not have).

Every measurement runs in a fresh process: a process that has already built and dropped other
optimizers leaves its heap fragmented, and the per-tensor host work then reads metadata spread
over more cache lines (measured: 10000 tensors, same gradients, 1.0 ms alone and 4 ms after the
new-gradient runs in the same process). ``--repeats`` runs the whole list again, interleaved,
since this shared VM's speed drifts over seconds (the same measurement gave 0.053 and 0.114 ms
a minute apart at load average 0.6). A C compiler must be on the PATH (Triton needs one too)
and Triton must ship ptxas; the command stops with a message saying which is missing.

The step's per-tensor work runs in the compiled C++ module of polyak_fused._host_pass (built on the first run and
cached); ``POLYAK_HOST_PASS=python python -m bench.host_cost ...`` measures its Python version,
what runs where no C++ compiler is found. The CSV's note says which one ran.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SCENARIOS = ("same_grads", "new_grads", "flat_grads")
COLUMNS = ("date", "git_sha", "host", "load_start", "load_end", "python", "torch", "triton",
           "harness", "tensors", "layout", "scenario", "repeat", "steps", "median_ms", "p20_ms",
           "p80_ms", "launches_per_step", "launch_path", "note")
#: The targets of the host path (ms per step), for the table's last column.
TARGETS = {("same_grads", 148): 0.05, ("same_grads", 2000): 0.16, ("new_grads", 2000): 0.24,
           ("same_grads", 10000): 0.8, ("flat_grads", 2000): 0.05, ("flat_grads", 10000): 0.05}
#: SM count of the device the launch configuration is chosen for (an H100 SXM).
H100_SMS = 132


def child_env() -> dict:
    """The environment of a measuring process: no interpreter (real JITFunctions)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def measure_in_fresh_process(env: dict, args, n: int, scenario: str) -> dict:
    env = {**env, "PYTHONPATH": f"{ROOT}:{env['PYTHONPATH']}" if env.get("PYTHONPATH")
           else str(ROOT)}
    cmd = [sys.executable, "-m", "bench.host_cost", "--one", f"{n}:{scenario}",
           "--numel", str(args.numel), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--device", args.device]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the measurement {n}:{scenario} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# Inside the child process (stub driver installed)
# ------------------------------------------------------------------------------------------------
def install_fake_driver():
    """Install the stub sm_90 driver and return a function giving its launch count."""
    from bench import fakecuda

    try:
        harness = fakecuda.install(record=False)
    except fakecuda.Unsupported as e:
        raise SystemExit(f"bench.host_cost needs the stub CUDA driver of bench.fakecuda, which "
                         f"cannot run here: {e}") from e
    return harness.n_launches


def fused_on_host_memory() -> None:
    """Take the fused path for CPU tensors, with the launch configuration of an H100."""
    import polyak_fused._optimizer as opt_mod
    from polyak_fused._kernels import polyak_step as K

    opt_mod.interpreter_enabled = lambda: True
    if hasattr(K, "cuda_launch_config"):
        K._launch_config = lambda device, numels: K.cuda_launch_config(numels, H100_SMS)
    else:  # the launcher before the layout-based chunking (for "before" measurements)
        K._launch_config = lambda device: dict(chunk=65536, block=2048, num_warps=8)


def shapes_for(n_tensors: int, numel: int) -> tuple[str, list[tuple[int, ...]]]:
    from bench import layouts

    gpt2 = layouts.CPU_LAYOUTS["gpt2_small"]
    if n_tensors == gpt2.n_tensors:
        return gpt2.name, list(gpt2.shapes)
    return f"{n_tensors}x{numel}", [(numel,)] * n_tensors


def time_scenario(scenario: str, shapes, steps: int, warmup: int, launches,
                  device: str = "cpu") -> dict:
    """Median host time of opt.step(loss=...) in one scenario. On a real GPU (device "cuda")
    the device is synchronised before each timed step, so the host never waits for a full
    launch queue: what is timed is the host's work."""
    import torch

    import polyak_fused as pf

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    grad_sets = [[torch.randn(s, generator=gen).to(device) for s in shapes] for _ in range(2)]
    opt = pf.InexactPolyak(params, total_steps=10**9, fused=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if scenario == "flat_grads":
        if not hasattr(opt, "flatten_grads"):
            return {"note": "no flatten_grads() in this version"}
        for p, g in zip(params, grad_sets[0]):
            p.grad = g
        opt.flatten_grads()
    else:
        for p, g in zip(params, grad_sets[0]):
            p.grad = g
    loss = torch.tensor(2.0, device=device)
    times = []
    n0 = None
    for i in range(warmup + steps):
        if scenario == "new_grads":
            for p, g in zip(params, grad_sets[i % 2]):
                p.grad = g
        if i == warmup:
            n0 = launches()
        sync()
        t0 = time.perf_counter_ns()
        opt.step(loss=loss)
        t1 = time.perf_counter_ns()
        if i >= warmup:
            times.append((t1 - t0) / 1e6)
    q = statistics.quantiles(times, n=5)
    from polyak_fused._kernels import polyak_step as K

    n_launches = launches()
    return {"steps": steps, "median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[-1],
            "launches_per_step": "" if n_launches is None else (n_launches - n0) / steps,
            "launch_path": "compiled kernel" if getattr(K, "_COMPILED", None) else "kernel[grid]",
            "note": host_pass_in_use()}


def host_pass_in_use() -> str:
    """Which host pass the steps used (polyak_fused._host_pass: the compiled C++ module, or its Python
    version: POLYAK_HOST_PASS=python measures that one)."""
    try:
        from polyak_fused import _host_pass as csrc_host
    except ImportError:  # a commit before the host pass (a "before" measurement)
        return ""
    return "host pass: " + ("Python" if csrc_host.implementation() is csrc_host.reference
                            else "C++")


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def measure_one(args) -> dict:
    """One (tensors, scenario) measurement, in this process (a fresh one): the stub driver, or
    with --device cuda the real GPU."""
    if args.device == "cuda":
        launches = lambda: None  # noqa: E731
    else:
        launches = install_fake_driver()
    import torch

    torch.set_num_threads(1)
    if args.device == "cpu":
        fused_on_host_memory()
    n, scenario = args.one.split(":")
    layout, shapes = shapes_for(int(n), args.numel)
    steps = args.steps or max(200, min(2000, 2_000_000 // int(n)))
    load_start = load_average()
    row = time_scenario(scenario, shapes, steps, args.warmup, launches, args.device)
    return {**row, "tensors": int(n), "layout": layout, "scenario": scenario,
            "load_start": load_start, "load_end": load_average()}


def run_all(args) -> int:
    """Every (repeat, tensors, scenario), each in a fresh process, into one CSV."""
    import torch
    import triton

    from bench.step_benchmark import device_name, git_sha

    if args.device == "cuda":
        env, harness = dict(os.environ), "real GPU: host time per step, device synced before"
        env.pop("TRITON_INTERPRET", None)
        host = f"{device_name(torch.device('cpu'))}, {device_name(torch.device('cuda'))}"
    else:
        env = child_env()
        harness = "fakecuda: sm_90 compile, real C launcher, stub driver; one process each"
        host = device_name(torch.device("cpu"))
    common = {"git_sha": git_sha(), "host": host, "python": platform.python_version(),
              "torch": torch.__version__, "triton": triton.__version__, "harness": harness}
    out = Path(args.out) if args.out else \
        RESULTS / f"host_cost_{args.device}_{_dt.date.today().isoformat()}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = [(repeat, n, scenario) for repeat in range(args.repeats) for n in args.tensors
            for scenario in args.scenarios]
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for repeat, n, scenario in runs:
            date = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
            row = {**common, **measure_in_fresh_process(env, args, n, scenario), "date": date,
                   "repeat": repeat}
            writer.writerow(row)
            f.flush()
            if row.get("median_ms"):
                print(f"{n:>6} tensors  {scenario:<11} median {row['median_ms']:.4f} ms  "
                      f"(p20 {row['p20_ms']:.4f}, p80 {row['p80_ms']:.4f}; {row['steps']} "
                      f"steps; {row['launches_per_step']} launches/step; load "
                      f"{row['load_start']} -> {row['load_end']})", flush=True)
            else:
                print(f"{n:>6} tensors  {scenario:<11} skipped: {row['note']}", flush=True)
    print(f"wrote {out}")
    return 0


def _read(paths) -> tuple[list, dict]:
    rows = []
    for p in paths:
        with open(p, newline="") as f:
            rows += [r for r in csv.DictReader(f) if r.get("median_ms")]
    if not rows:
        raise SystemExit(f"no measurements in {', '.join(map(str, paths))}")
    by_key: dict = {}
    for r in rows:
        by_key.setdefault((int(r["tensors"]), r["scenario"]), []).append(float(r["median_ms"]))
    return rows, by_key


def _cell(ms) -> str:
    if not ms:
        return ""
    spread = f" ({min(ms):.3f}-{max(ms):.3f})" if len(ms) > 1 else ""
    return f"{statistics.median(ms):.3f}{spread}"


def table(paths, before=None) -> str:
    """The table of docs/host_path.md: per (tensors, scenario), the median over repeats of the
    median step time, with the range over repeats, the same from the `before` CSVs if given, and
    the target; then the conditions."""
    rows, by_key = _read(paths)
    old = _read(before)[1] if before else None
    lines = ["| tensors | scenario | ms per step: median of runs (range) |"
             + (" before |" if old else "") + " target ms |",
             "|---|---|---|" + ("---|" if old else "") + "---|"]
    for (n, scenario), ms in sorted(by_key.items(), key=lambda kv: (kv[0][0],
                                                                     SCENARIOS.index(kv[0][1]))):
        target = TARGETS.get((scenario, n))
        lines.append(f"| {n} | {scenario} | {_cell(ms)} |"
                     + (f" {_cell(old.get((n, scenario)))} |" if old else "")
                     + f" {'' if target is None else target} |")
    first, last = rows[0], rows[-1]
    loads = sorted({r["load_start"] for r in rows} | {r["load_end"] for r in rows})
    lines += ["", f"Conditions: {first['host']}, 1 thread; Python {first['python']}, torch "
              f"{first['torch']}, triton {first['triton']}; {first['harness']}; commit "
              f"{first['git_sha']}; {first['date']} to {last['date']}; {len(rows)} measurements, "
              f"{max(int(r['repeat']) for r in rows) + 1} run(s); load average (1/5/15 min) "
              f"from {loads[0]} to {loads[-1]}; launches per step: "
              f"{', '.join(sorted({r['launches_per_step'] for r in rows}))} "
              f"({', '.join(sorted({r['launch_path'] for r in rows}))})"
              + "".join(f"; {note}" for note in sorted({r["note"] for r in rows if r["note"]}))
              + "."]
    if before:
        b_rows = _read(before)[0]
        lines.append(f"Before: commit {b_rows[0]['git_sha']}, {b_rows[0]['date']} to "
                     f"{b_rows[-1]['date']}, same command and machine.")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", default="148,2000,10000",
                    help="comma-separated tensor counts (148 = GPT-2 shapes; default %(default)s)")
    ap.add_argument("--numel", type=int, default=64,
                    help="elements per tensor for the counts other than 148 (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="measure everything this many times, one after the other (default 1)")
    ap.add_argument("--table", nargs="+", metavar="CSV", default=None,
                    help="print the docs/host_path.md table of these CSVs and exit")
    ap.add_argument("--before", nargs="+", metavar="CSV", default=None,
                    help="with --table: a column of earlier measurements to compare")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"comma-separated, of {', '.join(SCENARIOS)}")
    ap.add_argument("--steps", type=int, default=0,
                    help="timed steps per measurement (default: 2000 / 1000 / 200 for "
                         "148 / 2000 / 10000 tensors)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    ap.add_argument("--out", default="", help="CSV path (default "
                    "bench/results/host_cost_<device>_<date>.csv)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu (default): the stub driver; cuda: a real GPU, no stub")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # N:scenario, in a child
    args = ap.parse_args(argv)
    args.tensors = [int(x) for x in args.tensors.split(",") if x]
    args.scenarios = [x for x in args.scenarios.split(",") if x]
    for s in args.scenarios:
        if s not in SCENARIOS:
            ap.error(f"Invalid scenario: {s!r} (known: {', '.join(SCENARIOS)})")
    if any(n < 1 for n in args.tensors):
        ap.error(f"Invalid tensors: {args.tensors} (counts must be >= 1)")
    if args.repeats < 1 or args.numel < 1:
        ap.error(f"Invalid repeats/numel: {args.repeats}/{args.numel} (must be >= 1)")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.table:
        print(table(args.table, args.before))
        return 0
    if args.one:
        print(json.dumps(measure_one(args)))
        return 0
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
