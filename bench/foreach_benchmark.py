"""The foreach path on the CPU against torch's own optimizers: one command, one process, the same
tensors.

    python -m bench.foreach_benchmark              # GPT-2 124M and one 2000 x 4096 tensor, fp32
    python -m bench.foreach_benchmark --quick      # tiny layouts, 3 steps: a smoke run (tests)

Every method of polyak_fused runs with ``foreach=True`` (the torch._foreach_* path; on the CPU it
reads its step size on the host and updates in place, docs/paths.md), beside torch's
``clip_grad_norm_(foreach=True)`` + ``SGD(foreach=True)`` (without and with momentum),
``SGD(foreach=True)`` alone and ``Adam(fused=True)`` (the peer of MoMo and MoMo-Adam), all on the
same parameter and gradient tensors (float32, random).

What is measured, per (layout, provider):
  * time per step: time.perf_counter around one step(); before each timed step the gradients are
    refreshed from a pool of two random sets and a 48 MB buffer is read (more than the 32 MB L3),
    both outside the timed region. The providers are interleaved: ``--rounds`` rounds, each
    timing every provider for reps / rounds steps (the order rotated every round). The ms
    columns: median and 20th / 80th percentiles of ``--reps`` steps (default 45, in 45 rounds of
    one step each).
  * ratios (x clip+SGD, x Adam, x peer, x floor): the median over rounds of the ratio of two
    providers' times in the same round (`paired_ratio`). On a shared 2-core VM the memory runs
    in fast and slow phases of seconds to tens of seconds, 1.5x apart, which every provider
    timed in them shares (bench/NOTES.md); a ratio of two all-step medians compared steps that
    fell in the phases in different proportions, and swung by up to 20% between runs.
  * bytes per parameter: counted, not assumed: one step runs under a TorchDispatchMode that adds
    up, for every aten op the step dispatches, the bytes of its tensor inputs (each tensor once
    per op; not the destination of copy_/fill_/zero_) and of the tensors it writes (mutated
    arguments and new outputs; views move nothing). Divided by the parameter count. This is each
    op's own traffic, as if nothing stayed in cache between ops (bench/NOTES.md, "Foreach path on
    the CPU", has the count per method and what it leaves out). ``budget_bytes_per_param`` is the
    fused kernels' traffic budget (bench/step_benchmark.py::bytes_per_param), the method's own.
  * floor: bytes x n_params / the bandwidth torch's SGD(foreach=True) reaches in the same run
    on the same layout (its 12 B/param over its median time); ratio_to_floor = the paired ratio
    to torch's SGD x its 12 B / the method's budget (the floor taken at SGD's bandwidth in each
    round).
  * targets (the issue's): InexactPolyak <= 0.8x clip+SGD on GPT-2 124M and <= 1.0x on
    2000 x 4096; every other method <= 1.0x clip+SGD on GPT-2 124M, scaled by budget / 24 B where
    the method's own traffic (its budget) is larger than clip+SGD's 24 B; ClippedSGD with
    momentum against clip+SGD with momentum; every method within 1.3x of its own floor.
  * peak extra memory: in a fresh subprocess per provider (``--quick``: one for all), tensors
    built in place, one warm-up step on a tiny model, then the resident high-water mark (VmHWM,
    reset through /proc/self/clear_refs) over 3 steps minus the resident size before them and
    minus the state the steps created (e.g. DoG's x0, Adam's moments): the temporaries.
    glibc is told to serve every block of 256 KiB or more from mmap, so that a freed temporary
    leaves the resident set and the next step's peak is seen.
  * a torch.profiler step per provider: the top ops by self CPU time, with the bytes the
    dispatch count gives them (GB/s per op), into <out>_profile.md.
Writes <out>.csv and <out>.md (default bench/results/foreach_cpu_<date>), the conditions on top.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import polyak_fused as pf
from polyak_fused import _cpu_loops
from bench import layouts as L
from bench import step_benchmark as SB

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

LAYOUTS = {
    "gpt2_124m": L.GPU_LAYOUTS["gpt2_124m"],
    "matrix_2000x4096": L.Layout("matrix_2000x4096", ((2000, 4096),), "one 2000 x 4096 tensor"),
}
QUICK_LAYOUTS = {
    "gpt2_tiny": L.Layout("gpt2_tiny",
                          tuple(tuple(s) for s in L.gpt2_shapes(d=32, vocab=512, n_ctx=64,
                                                                n_layer=2)),
                          "GPT-2 shapes, d=32, vocab 512, ctx 64, 2 blocks"),
    "matrix_200x256": L.Layout("matrix_200x256", ((200, 256),), "one 200 x 256 tensor"),
}
TARGET_LAYOUT = {"gpt2_124m", "gpt2_tiny"}      # where the time targets apply
SECOND_LAYOUT = {"matrix_2000x4096", "matrix_200x256"}


# ------------------------------------------------------------------------------------------------
# Providers
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Provider:
    name: str
    label: str
    kind: str            # "ours" (polyak_fused, foreach=True) or "torch"
    budget: int          # the method's own traffic, B/param fp32 (the fused kernels' budget)
    peer: str = "torch_clip_sgd"     # the peer of the time target
    spec: SB.OptSpec | None = None   # ours


_MOMENTUM = SB.OptSpec(pf.ClippedSGD, {"max_norm": 0.5, "momentum": 0.9}, 0.01,
                       "ClippedSGD (momentum 0.9)")
_MOMO = SB.OptSpec(pf.MoMo, {}, 1.0, "MoMo")
_MOMO_ADAM = SB.OptSpec(pf.MoMoAdam, {}, 1e-2, "MoMo-Adam")


def _ours(name: str, spec: SB.OptSpec, method: str, peer: str = "torch_clip_sgd") -> Provider:
    return Provider(name, spec.label, "ours",
                    SB.bytes_per_param(method, torch.float32, spec.hparams), peer, spec)


PROVIDERS = {p.name: p for p in [
    _ours("inexact_polyak", SB.OPTIMIZERS["inexact_polyak"], "inexact_polyak"),
    _ours("polyak", SB.OPTIMIZERS["polyak"], "polyak"),
    _ours("decsps", SB.OPTIMIZERS["decsps"], "decsps"),
    _ours("adasps", SB.OPTIMIZERS["adasps"], "adasps"),
    _ours("dog", SB.OPTIMIZERS["dog"], "dog"),
    _ours("clipped_sgd", SB.OPTIMIZERS["clipped_sgd"], "clipped_sgd"),
    _ours("clipped_sgd_momentum", _MOMENTUM, "clipped_sgd", peer="torch_clip_sgd_momentum"),
    _ours("nsgdm", SB.OPTIMIZERS["nsgdm"], "nsgdm"),
    _ours("momo", _MOMO, "momo"),
    _ours("momo_adam", _MOMO_ADAM, "momo_adam"),
    # torch's: the budget is the one-pass minimum of the same update (clip+SGD is ClippedSGD)
    Provider("torch_sgd", "torch SGD(foreach)", "torch", 12, ""),
    Provider("torch_clip_sgd", "torch clip_grad_norm_ + SGD(foreach)", "torch", 16, ""),
    Provider("torch_clip_sgd_momentum", "torch clip_grad_norm_ + SGD(foreach, momentum 0.9)",
             "torch", 24, ""),
    Provider("torch_adam_fused", "torch Adam(fused)", "torch", 28, ""),
]}

#: What each provider's step moves per parameter in float32, counted by hand from the code: each
#: op or compiled loop reads its inputs and writes its outputs (bench/NOTES.md, "Foreach path on
#: the CPU"). With the compiled CPU loops every method is at its budget; with torch ops
#: (POLYAK_CPU_LOOPS=torch) the methods with state move more (NOTES has the count of commit
#: a87fb68). tests/test_bench.py holds the counter to these numbers.
HAND_COUNT = {
    "inexact_polyak": 16, "polyak": 16, "decsps": 16, "adasps": 16, "clipped_sgd": 16,
    "clipped_sgd_momentum": 24, "dog": 24, "nsgdm": 28, "momo": 32, "momo_adam": 44,
    "torch_sgd": 12, "torch_clip_sgd": 24, "torch_clip_sgd_momentum": 44, "torch_adam_fused": 28,
}

#: The peers' bytes per parameter, for the time target's scaling.
CLIP_SGD_BYTES = 24


def make_step(name: str, params: list[torch.Tensor]):
    """(step(loss), the optimizer) for provider `name` over `params` (whose .grad are set)."""
    p = PROVIDERS[name]
    if p.kind == "ours":
        opt = p.spec.cls(params, lr=p.spec.lr, foreach=True, **p.spec.hparams)
        if opt.path != "foreach":
            raise RuntimeError(f"{name}: foreach=True took the {opt.path} path")
        if p.spec.cls.NEEDS_LOSS:
            return (lambda loss: opt.step(loss=loss)), opt
        return (lambda loss: opt.step()), opt
    if name == "torch_sgd":
        opt = torch.optim.SGD(params, lr=0.01, foreach=True)
        return (lambda loss: opt.step()), opt
    if name in ("torch_clip_sgd", "torch_clip_sgd_momentum"):
        opt = torch.optim.SGD(params, lr=0.01, foreach=True,
                              momentum=0.9 if name.endswith("momentum") else 0.0)

        def step(loss):
            torch.nn.utils.clip_grad_norm_(params, 0.5, foreach=True)
            opt.step()
        return step, opt
    if name == "torch_adam_fused":
        opt = torch.optim.Adam(params, lr=1e-3, fused=True)
        return (lambda loss: opt.step()), opt
    raise ValueError(f"unknown provider {name!r}")


def state_bytes(opt) -> int:
    """Bytes of the tensors an optimizer keeps in opt.state (each storage once)."""
    seen, total = set(), 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                key = v.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += v.untyped_storage().nbytes()
    return total


# ------------------------------------------------------------------------------------------------
# Traffic: a dispatch mode that counts the bytes each aten op reads and writes
# ------------------------------------------------------------------------------------------------
#: Ops that overwrite their destination without reading it.
_NO_READ_OF_DEST = {"copy_", "_foreach_copy_", "fill_", "zero_", "_foreach_zero_", "normal_",
                    "uniform_", "_foreach_fill_"}
#: Ops whose schema marks an argument as written that the kernel leaves alone here: the fused
#: Adam reads the gradients (it writes them only under maximize or a grad scale).
_READ_ONLY_ARGS = {"_fused_adam_": {"grads"}, "_fused_adamw_": {"grads"}}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


#: The compiled CPU loops (polyak_fused/_cpu_loops/cpu_loops.cpp) are not aten ops: each pass's
#: traffic is its arguments', (positions of the tensor lists it reads, those it writes), as the
#: file's comments give them. Every list is read once per element (a None list or entry: not).
LOOP_TRAFFIC = {"sum_sq": ((0,), ()), "dog_sums": ((0, 1, 2), ()), "axpy": ((0, 1), (0,)),
                "momentum_sums": ((0, 1, 2), ()), "momentum_update": ((0, 1, 2), (0, 1)),
                "adam_sums": ((0, 1, 2, 3), ()), "adam_update": ((0, 1, 2, 3), (0, 1, 2))}


def _list_bytes(ts) -> int:
    return 0 if ts is None else sum(_nbytes(t) for t in ts if t is not None)


class TrafficCounter(TorchDispatchMode):
    """Per aten op name (and compiled loop, "cpu_loops::<pass>"): [calls, bytes read, bytes
    written]."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        self._loops, self._real = _cpu_loops.module(), {}

    def __enter__(self):
        for name, (reads, writes) in LOOP_TRAFFIC.items() if self._loops else ():
            real = self._real[name] = getattr(self._loops, name)

            def counted(*args, _real=real, _name=name, _reads=reads, _writes=writes):
                rec = self.ops["cpu_loops::" + _name]
                rec[0] += 1
                rec[1] += sum(_list_bytes(args[i]) for i in _reads)
                rec[2] += sum(_list_bytes(args[i]) for i in _writes)
                return _real(*args)
            setattr(self._loops, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, real in self._real.items():
            setattr(self._loops, name, real)
        self._real = {}
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view:
            return out
        name = func.overloadpacket.__name__
        schema = func._schema.arguments
        read, written, inputs = 0, 0, set()
        values = [(a, args[i] if i < len(args) else kwargs.get(a.name))
                  for i, a in enumerate(schema)]
        skip_read = name in _NO_READ_OF_DEST
        read_only = _READ_ONLY_ARGS.get(name, set())
        for a, v in values:
            tensors = [t for t in tree_flatten(v)[0] if isinstance(t, torch.Tensor)]
            mutated = bool(a.alias_info and a.alias_info.is_write) and a.name not in read_only
            for t in tensors:
                key = (t.data_ptr(), t.numel())
                if mutated:
                    written += _nbytes(t)
                    inputs.add(key)
                    if skip_read:
                        continue
                if key in inputs and not mutated:
                    continue
                inputs.add(key)
                read += _nbytes(t)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and (t.data_ptr(), t.numel()) not in inputs:
                written += _nbytes(t)
        rec = self.ops["aten::" + name]
        rec[0] += 1
        rec[1] += read
        rec[2] += written
        return out

    def total(self) -> int:
        return sum(r[1] + r[2] for r in self.ops.values())


# ------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------
def read_status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM), or -1."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def reset_peak() -> bool:
    """Reset VmHWM to the current resident size (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mmap_large_blocks() -> bool:
    """glibc: blocks of 256 KiB or more from mmap, returned to the OS when freed (a fixed
    threshold: glibc's own grows with the blocks freed and would keep them resident)."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return (libc.mallopt(m_mmap_threshold, 256 << 10) == 1
                and libc.mallopt(m_trim_threshold, 256 << 10) == 1)
    except (OSError, AttributeError):
        return False


def conditions(threads: int) -> dict:
    return {"date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "cpu": SB.device_name(torch.device("cpu")), "cores": os.cpu_count(),
            "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "git_sha": SB.git_sha(),
            "cpu_loops": "compiled" if _cpu_loops.module() is not None else "torch ops"}


# ------------------------------------------------------------------------------------------------
# Peak extra memory, in a subprocess
# ------------------------------------------------------------------------------------------------
def _build(layout: L.Layout, seed: int) -> list[torch.nn.Parameter]:
    """Parameters and gradients filled in place (no temporaries), grads of norm ~1."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.empty(s)) for s in layout.shapes]
    scale = 1.0 / math.sqrt(layout.n_params)
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, 0.02, generator=g)
            p.grad = torch.empty_like(p).normal_(0.0, scale, generator=g)
    return params


def memory_worker(spec: dict) -> list[dict]:
    """Measure each (layout, provider) of spec["jobs"] in turn; one dict per job."""
    malloc = mmap_large_blocks()
    torch.set_num_threads(spec["threads"])
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])   # (imports what optimizers import)
    gc.freeze()          # collections below scan only new objects (0.2 s each otherwise)
    layouts = {**LAYOUTS, **QUICK_LAYOUTS}
    loss = torch.tensor(2.0)
    out = []
    for lname, name in spec["jobs"]:
        layout = layouts[lname]
        tiny = _build(QUICK_LAYOUTS["gpt2_tiny"], 1)     # load every code path first
        step, opt = make_step(name, tiny)
        for _ in range(2):
            step(loss)
        del step, opt, tiny
        params = _build(layout, spec["seed"])
        step, opt = make_step(name, params)
        gc.collect()
        rss0 = read_status("VmRSS")
        reset = reset_peak()
        hwm0 = read_status("VmHWM")
        for _ in range(spec["steps"]):
            step(loss)
        hwm = read_status("VmHWM")
        state = state_bytes(opt)
        base = rss0 if reset else max(rss0, hwm0)
        extra = hwm - base - state
        finite = all(bool(torch.isfinite(p).all()) for p in params)
        out.append({"layout": lname, "provider": name, "peak_extra_mb": extra / 2**20,
                    "state_mb": state / 2**20, "rss_before_mb": rss0 / 2**20,
                    "hwm_mb": hwm / 2**20,
                    "note": ("" if reset else "VmHWM not reset: peak since start")
                    + ("" if malloc else "; mallopt unavailable")
                    + ("" if finite else "; non-finite parameters")})
        del step, opt, params
        gc.collect()
    gc.unfreeze()
    return out


def measure_memory(jobs: list[tuple[str, str]], *, threads: int, fresh: bool, steps: int = 3,
                   seed: int = 0) -> dict[tuple[str, str], dict]:
    """Run memory_worker on (layout, provider) jobs: a fresh subprocess for each when `fresh`,
    else one for all. Returns {(layout, provider): result}."""
    groups = [[j] for j in jobs] if fresh else [jobs]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    results = {}
    for group in groups:
        spec = {"jobs": group, "threads": threads, "steps": steps, "seed": seed}
        proc = subprocess.run([sys.executable, "-m", "bench.foreach_benchmark", "--memory-worker",
                               json.dumps(spec)], cwd=ROOT, env=env, text=True,
                              capture_output=True, timeout=1200, check=False)
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                results[(r["layout"], r["provider"])] = r
        if proc.returncode != 0:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
            for job in group:
                results.setdefault(tuple(job), {"note": f"memory worker failed: {err}"})
    return results


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def profile_step(step, work: SB.Workload, i: int) -> dict:
    """One step under torch.profiler: its wall time, the aten ops' self time and every op's
    calls, self and total (with children) CPU time."""
    from torch.profiler import ProfilerActivity, profile

    loss = work.refresh(i)
    with SB._quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step(loss)
        wall = (time.perf_counter() - t0) * 1e3
    rows = [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
             "total_ms": e.cpu_time_total / 1e3} for e in prof.key_averages()]
    rows.sort(key=lambda r: -r["self_ms"])
    aten = [r for r in rows if r["op"].startswith("aten::")]
    return {"wall_ms": wall, "aten_self_ms": sum(r["self_ms"] for r in aten),
            "aten_calls": sum(r["calls"] for r in aten), "rows": rows}


def time_layout(layout: L.Layout, names: list[str], *, reps: int, rounds: int, warmup: int,
                seed: int, profile: bool, log) -> dict[str, dict]:
    """Time every provider on one Workload, interleaved; count its traffic; profile a step."""
    work = SB.Workload(layout, torch.float32, torch.device("cpu"), pool=2, seed=seed)
    steps, opts, i = {}, {}, 0
    for name in names:
        steps[name], opts[name] = make_step(name, work.params)
        for _ in range(warmup):                 # lazy state, first-call work
            steps[name](work.refresh(i))
            i += 1
    times = {n: [] for n in names}
    round_ms = {n: [] for n in names}      # per round: the median of that round's steps
    per_round = [reps // rounds + (r < reps % rounds) for r in range(rounds)] if reps else []
    for r, k in enumerate(per_round):
        shift = (r * len(names)) // max(rounds, 1)
        order = names[shift:] + names[:shift]
        for name in order:
            these = []
            for _ in range(k):
                loss = work.refresh(i)
                t0 = time.perf_counter()
                steps[name](loss)
                these.append((time.perf_counter() - t0) * 1e3)
                i += 1
            times[name] += these
            round_ms[name].append(pct(these, 0.5))
        log(f"#   round {r + 1}/{rounds} done (load avg {SB.load_average()})")
    out = {}
    for name in names:
        counter = TrafficCounter()
        loss = work.refresh(i)
        i += 1
        with counter:
            steps[name](loss)
        prof = profile_step(steps[name], work, i) if profile else None
        i += 1
        ts = times[name] or [math.nan]
        out[name] = {"median_ms": pct(ts, 0.5), "p20_ms": pct(ts, 0.2), "p80_ms": pct(ts, 0.8),
                     "reps": len(times[name]), "round_ms": round_ms[name],
                     "bytes_per_param": counter.total() / layout.n_params,
                     "ops": dict(counter.ops), "profile": prof}
    finite = work.all_finite()
    del steps, opts, work
    gc.collect()
    if not finite:
        for name in names:
            out[name]["note"] = "non-finite parameters after the run"
    return out


# ------------------------------------------------------------------------------------------------
# Rows, targets, tables
# ------------------------------------------------------------------------------------------------
COLUMNS = ("layout", "n_params", "n_tensors", "method", "label", "kind", "reps", "rounds",
           "median_ms", "p20_ms", "p80_ms", "bytes_per_param", "budget_bytes_per_param", "sgd_gbps",
           "floor_ms", "ratio_to_floor", "floor_target", "floor_met", "ratio_clip_sgd",
           "ratio_adam", "peer", "ratio_peer", "time_target", "time_met", "peak_extra_mb",
           "state_mb", "sgd_peak_extra_mb", "extra_vs_params", "memory_met", "date", "git_sha",
           "threads", "torch", "note")

FLOOR_TARGET = 1.3


def time_target(name: str, layout: str) -> float | None:
    """The issue's time target against the peer (None: none on this layout)."""
    p = PROVIDERS[name]
    if p.kind != "ours":
        return None
    if name == "inexact_polyak":
        return 0.8 if layout in TARGET_LAYOUT else (1.0 if layout in SECOND_LAYOUT else None)
    if layout not in TARGET_LAYOUT:
        return None
    if p.peer != "torch_clip_sgd":
        return 1.0
    return max(1.0, p.budget / CLIP_SGD_BYTES)


def paired_ratio(timed: dict, a: str, b: str) -> float:
    """a's time over b's, as the median over rounds of the ratio within each round.

    One round times every provider in turn within a second or two. A shared VM's memory runs in
    fast and slow phases of several seconds to tens of seconds (1.5x apart on GPT-2,
    bench/NOTES.md), so two medians over all steps compare steps that fell in different phases
    in different proportions; two times taken in one round share the phase."""
    ra, rb = timed[a]["round_ms"], timed[b]["round_ms"]
    if not ra or len(ra) != len(rb):
        return timed[a]["median_ms"] / timed[b]["median_ms"]
    return pct([x / y for x, y in zip(ra, rb)], 0.5)


def make_rows(layout: L.Layout, timed: dict, memory: dict, meta: dict) -> list[dict]:
    sgd = timed["torch_sgd"]
    sgd_bytes = sgd["bytes_per_param"]
    bw = sgd_bytes * layout.n_params / (sgd["median_ms"] / 1e3)          # bytes / s
    sgd_mem = memory.get("torch_sgd", {}).get("peak_extra_mb")
    param_mb = 4 * layout.n_params / 2**20
    rows = []
    for name, t in timed.items():
        p = PROVIDERS[name]
        med = t["median_ms"]
        floor = p.budget * layout.n_params / bw * 1e3     # the method's own floor: its minimum
        # x floor = t / (budget * n / bw) = (t / t_sgd) * sgd_bytes / budget, with t / t_sgd paired
        to_floor = paired_ratio(timed, name, "torch_sgd") * sgd_bytes / p.budget
        row = {"layout": layout.name, "n_params": layout.n_params, "n_tensors": layout.n_tensors,
               "method": name, "label": p.label, "kind": p.kind, "reps": t["reps"],
               "median_ms": f"{med:.4g}", "p20_ms": f"{t['p20_ms']:.4g}",
               "p80_ms": f"{t['p80_ms']:.4g}", "bytes_per_param": f"{t['bytes_per_param']:.2f}",
               "budget_bytes_per_param": p.budget, "sgd_gbps": f"{bw / 1e9:.2f}",
               "floor_ms": f"{floor:.4g}", "ratio_to_floor": f"{to_floor:.3f}",
               "ratio_clip_sgd": f"{paired_ratio(timed, name, 'torch_clip_sgd'):.3f}"
               if "torch_clip_sgd" in timed else "", "rounds": len(t["round_ms"]), **meta}
        notes = [t.get("note", "")]
        if p.kind == "ours":
            row["floor_target"] = FLOOR_TARGET
            row["floor_met"] = "yes" if to_floor <= FLOOR_TARGET else "no"
            if name in ("momo", "momo_adam") and "torch_adam_fused" in timed:
                row["ratio_adam"] = f"{paired_ratio(timed, name, 'torch_adam_fused'):.3f}"
            if p.peer in timed:
                ratio = paired_ratio(timed, name, p.peer)
                row.update(peer=p.peer, ratio_peer=f"{ratio:.3f}")
                target = time_target(name, layout.name)
                if target is not None:
                    row.update(time_target=f"{target:.3g}",
                               time_met="yes" if ratio <= target else "no")
        m = memory.get(name, {})
        if "peak_extra_mb" in m:
            row.update(peak_extra_mb=f"{m['peak_extra_mb']:.1f}", state_mb=f"{m['state_mb']:.1f}")
            if sgd_mem is not None:
                beyond = m["peak_extra_mb"] - sgd_mem
                row.update(sgd_peak_extra_mb=f"{sgd_mem:.1f}",
                           extra_vs_params=f"{beyond / param_mb:.3f}",
                           memory_met="yes" if beyond < param_mb else "no")
        notes.append(m.get("note", ""))
        row["note"] = "; ".join(n.strip("; ") for n in notes if n and n.strip("; "))
        rows.append(row)
    return rows


def markdown(rows: list[dict], cond: dict, profiles: dict | None = None) -> str:
    lines = [f"# Foreach path on the CPU: {cond['date']}", "",
             "Conditions:",
             f"- CPU: {cond['cpu']}; {cond['cores']} cores, {cond['threads']} torch threads",
             f"- load average (1/5/15 min): {cond['load_before']} before, "
             f"{cond['load_after']} after",
             f"- torch {cond['torch']}, Python {cond['python']}, commit {cond['git_sha']}; "
             f"the foreach path's CPU passes: {cond['cpu_loops']}",
             f"- command: `{cond['command']}`; {cond['reps']} timed steps per provider in "
             f"{cond['rounds']} interleaved rounds, float32; {cond['malloc']}", "",
             "Times: median ms per step (20th-80th percentile). x clip+SGD, x peer, x Adam: "
             "the median over rounds of the step's time over torch's clip_grad_norm_(foreach) + "
             "SGD(foreach), the peer, or Adam(fused) timed in the same round (the machine's slow "
             "and fast phases cancel). B/param: "
             "counted per op (the method's budget, its minimum traffic, in brackets). floor = the "
             "budget x params / the bandwidth torch's SGD(foreach) reached on the layout; "
             "x floor: the paired ratio to torch's SGD x its bytes / the budget. peak "
             "extra MB: the "
             "resident high-water mark over 3 steps beyond the tensors and the state (state MB), "
             "each provider in a fresh process (compare torch SGD's row).", ""]
    for lname in dict.fromkeys(r["layout"] for r in rows):
        lrows = [r for r in rows if r["layout"] == lname]
        r0 = lrows[0]
        lines += [f"## {lname}: {int(r0['n_params']):,} parameters, {r0['n_tensors']} tensors; "
                  f"torch SGD reached {r0['sgd_gbps']} GB/s", "",
                  "| method | ms (p20-p80) | x clip+SGD | x peer (target) | x Adam | B/param "
                  "(budget) | floor ms | x floor (<= 1.3) | peak extra MB | state MB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in lrows:
            peer = ""
            if r.get("ratio_peer"):
                tgt = f" (<= {r['time_target']}: {'met' if r['time_met'] == 'yes' else 'MISSED'})" \
                    if r.get("time_target") else ""
                who = "" if r["peer"] == "torch_clip_sgd" else " vs clip+SGD-m"
                peer = f"{float(r['ratio_peer']):.2f}{who}{tgt}"
            floor = f"{float(r['ratio_to_floor']):.2f}"
            if r.get("floor_met"):
                floor += "" if r["floor_met"] == "yes" else " MISSED"
            adam = f"{float(r['ratio_adam']):.2f}" if r.get("ratio_adam") else ""
            lines.append(
                f"| {r['label']} | {float(r['median_ms']):.4g} ({float(r['p20_ms']):.4g}-"
                f"{float(r['p80_ms']):.4g}) | {float(r['ratio_clip_sgd']):.2f} | {peer} | {adam} | "
                f"{float(r['bytes_per_param']):.1f} ({r['budget_bytes_per_param']}) | "
                f"{float(r['floor_ms']):.4g} | {floor} | {r.get('peak_extra_mb', '')} | "
                f"{r.get('state_mb', '')} |")
        lines.append("")
    if profiles:
        lines += ["Per-op profiles: the `_profile.md` file beside this one.", ""]
    return "\n".join(lines)


def profile_markdown(layout_name: str, timed: dict, n_params: int, top: int = 6) -> str:
    """Per provider: the profiled step's wall time and how much of it the aten ops take; the ops
    that move data (the dispatch count's bytes, over their total CPU time with children: a CPU
    foreach op runs one child op per tensor) and the top ops by self time."""
    lines = [f"## {layout_name}", ""]
    for name, t in timed.items():
        prof = t["profile"]
        med = "" if math.isnan(t["median_ms"]) else f"{t['median_ms']:.4g} ms median, "
        wall, aten = prof["wall_ms"], prof["aten_self_ms"]
        lines += [f"### {PROVIDERS[name].label}: {med}{t['bytes_per_param']:.1f} B/param counted",
                  "", f"Profiled step {wall:.1f} ms wall; {prof['aten_calls']} aten op calls, "
                  f"{aten:.1f} ms self in aten ops; {wall - aten:.1f} ms outside them (Python, "
                  "the profiler).", "",
                  "| op (moves data) | calls | ms with children | B/param | GB/s | share of wall |",
                  "|---|---|---|---|---|---|"]
        by_name = {r["op"]: r for r in prof["rows"]}
        moving = sorted(((op, rec) for op, rec in t["ops"].items()
                         if (rec[1] + rec[2]) / n_params >= 0.05), key=lambda x: -(x[1][1] + x[1][2]))
        for op, rec in moving:
            r = by_name.get(op)
            nbytes = rec[1] + rec[2]
            if r is None:
                lines.append(f"| {op} | {rec[0]} | (not profiled) | {nbytes / n_params:.2f} | | |")
                continue
            ms = r["total_ms"]
            gbs = f"{nbytes / (ms / 1e3) / 1e9:.1f}" if ms > 0 else ""
            lines.append(f"| {op} | {r['calls']} | {ms:.2f} | {nbytes / n_params:.2f} | {gbs} | "
                         f"{ms / wall * 100:.0f}% |")
        lines += ["", "| op (top by self time) | calls | self ms | ms with children |",
                  "|---|---|---|---|"]
        for r in prof["rows"][:top]:
            lines.append(f"| {r['op']} | {r['calls']} | {r['self_ms']:.2f} | {r['total_ms']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def write_profiles(out: Path, cond: dict, profiles: dict) -> Path:
    text = [f"# Per-op profiles: {cond['date']}", "",
            f"One step per provider under torch.profiler (CPU), after its warm-up and timed "
            f"steps ({cond['reps']} timed); "
            f"{cond['cpu']}, {cond['threads']} torch threads, load average "
            f"{cond['load_before']} before, {cond['load_after']} after; torch {cond['torch']}, "
            f"commit {cond['git_sha']}; command `{cond['command']}`. Bytes: the dispatch "
            "count of another step. The profiler adds a few microseconds per op, so the "
            "profiled step is slower than the timed ones.", ""]
    for lname, (timed, n) in profiles.items():
        text.append(profile_markdown(lname, timed, n))
    path = Path(str(out) + "_profile.md")
    path.write_text("\n".join(text))
    return path


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.foreach_benchmark", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny layouts, 3 steps, one memory subprocess (a smoke run)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per provider (45)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds (default: one per timed step)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--providers", default=",".join(PROVIDERS),
                    help="comma list of " + ", ".join(PROVIDERS))
    ap.add_argument("--layouts", default=None, help="comma list of " + ", ".join(
        list(LAYOUTS) + list(QUICK_LAYOUTS)))
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled steps")
    ap.add_argument("--profile-only", action="store_true",
                    help="no timed steps and no memory: the traffic count and one profiled step "
                    "per provider, into <out>_profile.md")
    ap.add_argument("--out", type=Path, default=None,
                    help="path without suffix (default bench/results/foreach_cpu_<date>)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> Path:
    a = parse_args(argv)
    if a.memory_worker:
        for r in memory_worker(json.loads(a.memory_worker)):
            print(json.dumps(r), flush=True)
        return Path()
    names = [n.strip() for n in a.providers.split(",") if n.strip()]
    for n in names:
        if n not in PROVIDERS:
            raise SystemExit(f"unknown provider {n!r}; known: {', '.join(PROVIDERS)}")
    for n in ("torch_sgd", "torch_clip_sgd"):          # the floor and the ratios need them
        if n not in names:
            names.append(n)
    known = {**LAYOUTS, **QUICK_LAYOUTS}
    lnames = (a.layouts.split(",") if a.layouts else list(QUICK_LAYOUTS if a.quick else LAYOUTS))
    for n in lnames:
        if n not in known:
            raise SystemExit(f"unknown layout {n!r}; known: {', '.join(known)}")
    reps = a.reps or (3 if a.quick else 45)
    rounds = min(reps, a.rounds or (1 if a.quick else reps))
    if a.profile_only:
        reps, a.no_memory, a.no_profile = 0, True, False
    out = a.out or RESULTS / f"foreach_cpu_{_dt.date.today().isoformat()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    try:
        cond = conditions(torch.get_num_threads())
        cond.update(load_before=SB.load_average(), reps=reps, rounds=rounds,
                    command="python -m bench.foreach_benchmark"
                    + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                       if (argv if argv is not None else sys.argv[1:]) else ""),
                    malloc=SB.steady_cpu_malloc() + " in the timing process")
        print(f"# {cond['cpu']} | torch {cond['torch']} | python {cond['python']} | "
              f"{cond['git_sha']} | threads {cond['threads']} | load avg {cond['load_before']}",
              flush=True)
        meta = {k: cond[k] for k in ("date", "git_sha", "threads", "torch")}
        rows, profiles, timings = [], {}, {}
        for lname in lnames:
            layout = known[lname]
            print(f"# {lname}: {layout.n_params:,} parameters, {layout.n_tensors} tensors; "
                  f"timing {len(names)} providers", flush=True)
            timings[lname] = time_layout(layout, names, reps=reps, rounds=rounds,
                                         warmup=1 if a.quick else 2, seed=a.seed,
                                         profile=not a.no_profile,
                                         log=lambda m: print(m, flush=True))
        if a.profile_only:
            cond["load_after"] = SB.load_average()
            path = write_profiles(out, cond, {ln: (timings[ln], known[ln].n_params)
                                              for ln in lnames})
            print(f"# wrote {path} in {time.perf_counter() - t_start:.0f} s (load avg at end "
                  f"{cond['load_after']})", flush=True)
            return path
        memory = {}
        if not a.no_memory:
            print("# peak memory: " + ("one subprocess for all" if a.quick else
                                       "a fresh subprocess per layout and provider"), flush=True)
            memory = measure_memory([(ln, n) for ln in lnames for n in names],
                                    threads=a.threads, fresh=not a.quick, seed=a.seed)
        for lname in lnames:
            layout, timed = known[lname], timings[lname]
            lmem = {n: r for (ln, n), r in memory.items() if ln == lname}
            lrows = make_rows(layout, timed, lmem, meta)
            for r in lrows:
                print(f"{r['method']:24s} {float(r['median_ms']):9.3f} ms  x clip+SGD "
                      f"{float(r['ratio_clip_sgd']):5.2f}  {float(r['bytes_per_param']):6.1f} "
                      f"B/param  x floor {float(r['ratio_to_floor']):5.2f}  "
                      f"mem {r.get('peak_extra_mb', '')} MB", flush=True)
            rows += lrows
            profiles[lname] = (timed, layout.n_params)
        cond["load_after"] = SB.load_average()
        csv_path = out.with_suffix(".csv")
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in COLUMNS})
        md = out.with_suffix(".md")
        md.write_text(markdown(rows, cond, profiles if not a.no_profile else None))
        if not a.no_profile:
            write_profiles(out, cond, profiles)
        print(f"# wrote {csv_path} and {md} in {time.perf_counter() - t_start:.0f} s "
              f"(load avg at end {cond['load_after']})", flush=True)
        return csv_path
    finally:
        torch.set_num_threads(threads_before)


if __name__ == "__main__":
    main(sys.argv[1:])
