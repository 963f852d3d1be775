"""Step-throughput benchmark: one whole optimizer ``step()`` per provider, side by side, in one run.

    python -m bench.step_benchmark                  # CPU: scaled-down layouts, about two minutes
    python -m bench.step_benchmark --device cuda    # GPU: GPT-2 124M, Llama ~1B, 2000 tiny, 4 huge

Providers (all in the same process, on the same parameter and gradient tensors):
  reference       the package's eager for-loop reference (the optimizer with foreach=False)
  foreach         the package's torch._foreach_* path (the optimizer with foreach=True): on the
                  CPU the step size is read on the host, elsewhere every scalar stays a device
                  tensor (no sync); docs/paths.md
  fused           the package's Triton path (fused=None on CUDA tensors); GPU only
  torch_sgd_clip  ClippedSGD only: clip_grad_norm_(foreach=True) + torch.optim.SGD (fused=True on
                  CUDA, foreach=True on CPU), the everyday baseline
Every provider of a method is the package's own implementation (one implementation per method;
tests/test_foreach.py checks the foreach path against the reference), or torch's.
bench/foreach_benchmark.py times the foreach path against torch's optimizers on the GPT-2 124M
layout on the CPU.

What is measured, per (optimizer, layout, dtype, provider):
  * time per step: CUDA events around one step() (the device idle when it starts, so host launch
    time counts), or time.perf_counter on CPU; before every timed step the gradients are
    refreshed from a pool of random sets, then a buffer larger than the last-level cache is
    touched (CUDA: 256 MB zeroed; CPU: 48 MB read), all outside the timed region. Median and
    20th/80th percentiles over the repetitions.
  * bytes: the algorithmic traffic of the method, taken from the fused kernels' traffic budget
    (polyak_fused/_kernels/polyak_step.py), the same count for every provider, so GB/s compare.
  * frac_of_floor = (bytes / copy bandwidth) / median time, where the copy bandwidth is measured
    in the same run (a large device-to-device copy, bytes read + written): 1.0 is the floor
    (bench/NOTES.md, "The floor").
  * launches: CUDA: device kernels (and memcpy/memset) per step, from torch.profiler. CPU: the
    number of top-level aten ops per step (a proxy for dispatch overhead).
  * syncs (CUDA only): host syncs per step, counted with torch.cuda.set_sync_debug_mode("warn").
  * compile_s: wall time of the first call of `fused` (Triton JIT, possibly from the on-disk
    cache, + table building + one step).
Results go to a long-format CSV (one row per measurement, written as soon as it is taken) and a
PNG plot (``--plot-only X.csv`` redraws it); ``python -m bench.readme_table <csv>`` makes the
tables of docs/benchmarks.md. bench/NOTES.md has the floor, the traffic budget and how to run it
on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import gc
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

import polyak_fused as pf
from bench import layouts as L
from bench import readme_table
from bench.readme_table import read_rows

PROVIDERS = ("reference", "foreach", "torch_sgd_clip", "fused")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RESULTS = Path(__file__).resolve().parent / "results"

COLUMNS = ("date", "device", "device_name", "torch", "triton", "git_sha", "threads",
           "optimizer", "layout", "dtype", "provider", "n_params", "n_tensors",
           "median_ms", "p20_ms", "p80_ms", "host_ms", "reps", "bytes", "gbps", "copy_gbps",
           "floor_ms", "frac_of_floor", "launches", "syncs", "compile_s", "note")


# ------------------------------------------------------------------------------------------------
# The optimizers under test and their traffic budget
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OptSpec:
    cls: type
    hparams: dict
    lr: float
    label: str


#: Hyperparameters: the package defaults, with an lr small enough that thousands of repeated
#: steps keep the parameters finite (the work per step does not depend on the values). The
#: gradients have norm ~1 (see `make_grad_pool`), so every step moves the parameters by about
#: 0.01-0.03 in norm.
OPTIMIZERS = {
    "inexact_polyak": OptSpec(pf.InexactPolyak, dict(total_steps=10_000, lower_bound=0.0), 1.0,
                              "InexactPolyak"),
    "polyak": OptSpec(pf.Polyak, dict(f_star=0.0, c=1.0), 0.01, "Polyak"),
    "decsps": OptSpec(pf.DecSPS, dict(c0=1.0, gamma_b=10.0, lower_bound=0.0), 0.01, "DecSPS"),
    "adasps": OptSpec(pf.AdaSPS, dict(c_p=1.0, lower_bound=0.0), 0.01, "AdaSPS"),
    "dog": OptSpec(pf.DoG, dict(reps_rel=1e-6, weight_decay=0.0), 1.0, "DoG"),
    "clipped_sgd": OptSpec(pf.ClippedSGD, dict(max_norm=0.5, momentum=0.0), 0.01, "ClippedSGD"),
    "nsgdm": OptSpec(pf.NSGDM, dict(beta=0.9, schedule="constant"), 0.01, "NSGDM"),
}


#: The methods whose step reads g twice (reduce, update), reads x and writes x: 4E.
FOUR_E_METHODS = ("inexact_polyak", "polyak", "decsps", "adasps", "clipped_sgd")


def bytes_per_param(method: str, dtype: torch.dtype, hparams: dict | None = None) -> int:
    """Algorithmic bytes per parameter of one step, from the traffic comments of the kernels in
    polyak_fused/_kernels/polyak_step.py (E = bytes per element of the parameter dtype):

      Polyak family, ClippedSGD without momentum: reduce reads g (E); update reads x, g and
          writes x (3E): 4E (16 B fp32, 8 B bf16).
      ClippedSGD with momentum: + read and write m (2E): 6E.
      DoG: reduce reads g, x, x0 (3E); update reads x, g, writes x (3E): 6E.
      NSGD-M: reduce reads g, m (2E); update reads x, g, m, writes m, x (5E): 7E.
      MoMo: reduce reads g, x, d (3E); update reads x, g, d, writes d, x (5E): 8E.
      MoMo-Adam: reduce reads g, x, d, v (4E); update reads x, g, d, v, writes d, v, x (7E): 11E.
    InexactPolyak's track_best adds a write of x_best (E) on the steps that improve; not counted
    (the benchmark runs with track_best=False). The partial sums (4 B per 65536-element chunk)
    and the scalars are left out."""
    hparams = hparams or {}
    e = torch.empty((), dtype=dtype).element_size()
    if method == "dog":
        return 6 * e
    if method == "nsgdm":
        return 7 * e
    if method == "momo":
        return 8 * e
    if method == "momo_adam":
        return 11 * e
    if method == "clipped_sgd" and hparams.get("momentum", 0.0) > 0:
        return 6 * e
    if method in FOUR_E_METHODS:
        return 4 * e
    raise ValueError(f"unknown method: {method!r}")


# ------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------
def git_sha() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, text=True,
                             capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "polyak_fused",
                                "bench/step_benchmark.py",
                                "bench/foreach_benchmark.py"],
                               cwd=root, text=True, capture_output=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return ""


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def load_average() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def steady_cpu_malloc() -> str:
    """Ask glibc to keep freed memory instead of returning it to the OS: blocks below 32 MB come
    from the heap (not mmap) and the heap is never trimmed. Without this, every full-size
    temporary of a foreach or reference step on large CPU tensors is page-faulted in again at each
    step, and the same configuration measured 5.0 or 24.7 ms depending on the allocator's history
    (bench/NOTES.md). The CUDA caching allocator already behaves this way. Returns a note."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = (libc.mallopt(m_mmap_threshold, 32 << 20) == 1
              and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1)
    except (OSError, AttributeError):
        ok = False
    return "glibc keeps freed memory (mallopt)" if ok else "mallopt unavailable: system malloc"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    device_ms: list[float]
    host_ms: list[float]

    def pct(self, q: float) -> float:
        xs = sorted(self.device_ms)
        if not xs:
            return math.nan
        k = (len(xs) - 1) * q
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def copy_bandwidth(device: torch.device, quick: bool) -> float:
    """Bytes read + written per second by one large tensor copy (GB/s), median of repeats."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        n = min(1 << 28, int(free * 0.2) // 8)          # up to 1 GiB per buffer
    else:
        n = 1 << 25                                      # 128 MiB per buffer
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    reps = 5 if quick else (20 if device.type == "cuda" else 9)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    times.sort()
    t = times[len(times) // 2]
    nbytes = 2 * n * src.element_size()
    del src, dst
    return nbytes / t / 1e9


class Workload:
    """Parameters, their .grad tensors (fixed storage: the fused path caches pointers, as it can
    in training), a pool of fresh random gradient sets copied in before every timed step, and a
    pool of loss values."""

    def __init__(self, layout: L.Layout, dtype: torch.dtype, device: torch.device, *,
                 pool: int, seed: int):
        g = torch.Generator(device=device).manual_seed(seed)
        self.device, self.dtype, self.layout = device, dtype, layout
        self.params = [torch.nn.Parameter(torch.empty(s, dtype=dtype, device=device))
                       for s in layout.shapes]
        # ||g|| ~ 1 whatever the size, so that the step lengths stay small and finite
        scale = 1.0 / math.sqrt(layout.n_params)
        self.pool = [[(torch.randn(s, generator=g, dtype=torch.float32, device=device) * scale)
                      .to(dtype) for s in layout.shapes] for _ in range(pool)]
        for p in self.params:
            p.grad = torch.empty_like(p)
        self.grads = [p.grad for p in self.params]
        self.data = [p.detach() for p in self.params]
        self.losses = list((torch.rand(8, generator=g, device=device) * 2 + 1).unbind())
        # touched before every timed step so that no input is still in cache: 256 MB on CUDA
        # (H100 L2: 50 MB), 48 MB on CPU (more than this machine's 32 MB L3)
        self.flush = torch.empty((1 << 26) if device.type == "cuda" else (3 << 22),
                                 dtype=torch.float32, device=device)
        self.reset_params(seed)

    @torch.no_grad()
    def reset_params(self, seed: int) -> None:
        g = torch.Generator(device=self.device).manual_seed(seed + 1)
        for p in self.params:
            p.copy_(torch.randn(p.shape, generator=g, device=self.device) * 0.02)

    def refresh(self, i: int) -> torch.Tensor:
        """Fresh gradients (and a cold L2 on CUDA) for step i; returns its loss."""
        torch._foreach_copy_(self.grads, self.pool[i % len(self.pool)])
        if self.device.type == "cuda":
            self.flush.zero_()      # as triton.testing.do_bench: the writes evict L2
        else:
            self.flush.sum()        # a read: large CPU memsets may bypass the cache
        return self.losses[i % len(self.losses)]

    def all_finite(self) -> bool:
        norms = torch._foreach_norm(self.data, 2, dtype=torch.float32)
        return bool(torch.isfinite(torch.stack(norms)).all())


def time_steps(step, work: Workload, *, start: int, target_s: float, min_reps: int,
               max_reps: int, warmup: int) -> tuple[Timing, int]:
    """Warm up, choose the repetition count from the warm-up time, then time each step alone."""
    device = work.device
    est = []
    i = start
    for _ in range(warmup):
        loss = work.refresh(i)
        sync(device)
        t0 = time.perf_counter()
        step(loss)
        sync(device)
        est.append(time.perf_counter() - t0)
        i += 1
    per = sorted(est)[len(est) // 2] if est else 0.01
    reps = int(max(min_reps, min(max_reps, target_s / max(per, 1e-6))))
    dev_ms, host_ms = [], []
    events = []
    for _ in range(reps):
        loss = work.refresh(i)
        sync(device)
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            a.record()
            step(loss)
            b.record()
            host_ms.append((time.perf_counter() - t0) * 1e3)
            events.append((a, b))
        else:
            t0 = time.perf_counter()
            step(loss)
            dev_ms.append((time.perf_counter() - t0) * 1e3)
        i += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        dev_ms = [a.elapsed_time(b) for a, b in events]
    return Timing(dev_ms, host_ms), i


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the C++ profiler's start/stop lines on file descriptor 2."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def count_launches(step, work: Workload, i: int) -> tuple[float | None, str]:
    """CUDA: device ops (kernels, memcpy, memset) in one step. CPU: top-level aten ops."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    loss = work.refresh(i)
    sync(work.device)
    # on CUDA only the device activity: a 2000-tensor eager step is tens of thousands of events,
    # and the CPU ones would multiply the profiler's Python post-processing
    acts = [ProfilerActivity.CUDA] if work.device.type == "cuda" else [ProfilerActivity.CPU]
    try:
        with _quiet_stderr(), profile(activities=acts) as prof:
            step(loss)
            sync(work.device)
        events = prof.events()
    except Exception as err:  # noqa: BLE001 - a profiler failure must not stop the run
        return None, f"profiler failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
    if work.device.type == "cuda":
        n = sum(1 for e in events if e.device_type == DeviceType.CUDA)
        return float(n), ("" if n else "profiler saw no device kernels")
    n = 0
    for e in events:
        if e.name.startswith("aten::"):
            parent = e.cpu_parent
            while parent is not None and not parent.name.startswith("aten::"):
                parent = parent.cpu_parent
            n += parent is None
    return float(n), ""


def count_syncs(step, work: Workload, i: int) -> float | None:
    """Host syncs in one CUDA step: warnings raised by the sync debug mode."""
    if work.device.type != "cuda":
        return None
    loss = work.refresh(i)
    torch.cuda.synchronize(work.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(loss)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(work.device)
    return float(sum("synchroniz" in str(w.message) for w in caught))


# ------------------------------------------------------------------------------------------------
# Providers
# ------------------------------------------------------------------------------------------------
def make_provider(name: str, method: str, spec: OptSpec, work: Workload):
    """A callable step(loss) for `name`, or raise."""
    hp = dict(spec.hparams)
    if name in ("reference", "foreach", "fused"):
        path = {"reference": {"foreach": False}, "foreach": {"foreach": True},
                "fused": {"fused": None}}[name]
        opt = spec.cls(work.params, lr=spec.lr, **path, **hp)
        if opt.path != name:
            raise RuntimeError(f"{path} took the {opt.path} path for these tensors, not {name}")
        if spec.cls.NEEDS_LOSS:
            return lambda loss: opt.step(loss=loss)
        return lambda loss: opt.step()
    if name == "torch_sgd_clip":
        if method != "clipped_sgd":
            raise ValueError("torch_sgd_clip is the ClippedSGD baseline only")
        kw = dict(fused=True) if work.device.type == "cuda" else dict(foreach=True)
        opt = torch.optim.SGD(work.params, lr=spec.lr, momentum=hp["momentum"], **kw)
        max_norm = hp["max_norm"]
        params = work.params

        def step(loss):
            torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
            opt.step()
        return step
    raise ValueError(f"unknown provider: {name!r}")


def providers_for(method: str, device: torch.device, wanted) -> list[str]:
    out = []
    for p in wanted:
        if p == "torch_sgd_clip" and method != "clipped_sgd":
            continue
        if p == "fused" and device.type != "cuda":
            continue
        out.append(p)
    return out


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    device: torch.device
    optimizers: list[str]
    layouts: list[str]
    dtypes: list[str]
    providers: list[str]
    target_s: float
    min_reps: int
    max_reps: int
    warmup: int
    quick: bool
    out: Path
    plot: bool
    budget_s: float | None
    seed: int
    profile: bool = True
    git_sha: str | None = None
    system_malloc: bool = False
    threads: int | None = None
    extra_note: str = ""
    meta: dict = field(default_factory=dict)


def run(s: Settings) -> Path:
    t_start = time.perf_counter()
    threads_before = torch.get_num_threads()
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    try:
        return _run(s, t_start)
    finally:
        torch.set_num_threads(threads_before)


def _run(s: Settings, t_start: float) -> Path:
    device = s.device
    s.out.parent.mkdir(parents=True, exist_ok=True)
    bw = copy_bandwidth(device, s.quick)
    meta = dict(date=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"), device=device.type,
                device_name=device_name(device), torch=torch.__version__,
                triton=triton_version(), git_sha=s.git_sha or git_sha(),
                threads=torch.get_num_threads())
    s.meta = meta
    print(f"# {meta['device_name']} | torch {meta['torch']} | triton {meta['triton']} | "
          f"{meta['git_sha']} | threads {meta['threads']} | load avg {load_average()}")
    print(f"# copy bandwidth (read + write): {bw:.1f} GB/s")
    if device.type != "cuda":
        print("# CPU run: scaled-down layouts; the fused provider runs on CUDA only (on CPU the "
              "Triton interpreter is far too slow to time). GPU numbers come from GPU CSVs in "
              "bench/results/ (step_cuda_*.csv); none has been taken yet.")
    base_note = f"load avg {load_average()} at start"
    if device.type == "cpu":
        base_note += "; " + (steady_cpu_malloc() if not s.system_malloc else "system malloc")
    if s.extra_note:
        base_note += f"; {s.extra_note}"
    skipped_budget = 0
    with open(s.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for lname in s.layouts:
            layout = L.get(lname)
            for dname in s.dtypes:
                dtype = DTYPES[dname]
                work = Workload(layout, dtype, device, pool=2, seed=s.seed)
                i = 0
                for method in s.optimizers:
                    spec = OPTIMIZERS[method]
                    nbytes = bytes_per_param(method, dtype, spec.hparams) * layout.n_params
                    floor_ms = nbytes / (bw * 1e9) * 1e3
                    for prov in providers_for(method, device, s.providers):
                        if s.budget_s is not None and time.perf_counter() - t_start > s.budget_s:
                            skipped_budget += 1
                            continue
                        row = dict(meta, optimizer=method, layout=lname, dtype=dname,
                                   provider=prov, n_params=layout.n_params,
                                   n_tensors=layout.n_tensors, bytes=nbytes,
                                   copy_gbps=f"{bw:.2f}", floor_ms=f"{floor_ms:.6g}")
                        notes = [base_note]
                        i = measure(row, notes, prov, method, spec, work, s, i, nbytes, floor_ms)
                        row["note"] = "; ".join(n for n in notes if n)
                        w.writerow(row)
                        f.flush()
                        med = row.get("median_ms")
                        frac = row.get("frac_of_floor")
                        print(f"{method:15s} {lname:11s} {dname:8s} {prov:15s} "
                              + (f"{float(med):10.3f} ms  {float(frac) * 100:5.1f}% of floor"
                                 f"  launches={row.get('launches', '')}"
                                 f" syncs={row.get('syncs', '')}"
                                 if med not in (None, "") else "not timed")
                              + (f"  JIT + first step {float(row['compile_s']):.1f}s"
                                 if row.get("compile_s") not in (None, "") else "")
                              + (f"  [{row['note']}]" if row["note"] != base_note else ""),
                              flush=True)
                del work
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if skipped_budget:
        print(f"# budget of {s.budget_s:.0f} s reached: {skipped_budget} measurements not taken")
    print(f"# wrote {s.out} in {time.perf_counter() - t_start:.0f} s (load avg at end "
          f"{load_average()})")
    if s.plot:
        png = s.out.with_suffix(".png")
        try:
            plot(s.out, png)
            print(f"# wrote {png}")
        except ImportError:
            print("# matplotlib is not installed: no plot (pip install -e '.[bench]')")
    return s.out


def measure(row, notes, prov, method, spec, work: Workload, s: Settings, i, nbytes, floor_ms):
    """Fill `row` with the timings of one provider; returns the next step index."""
    work.reset_params(s.seed + i)
    probe = work.data[0].reshape(-1)[:65536].clone()
    try:
        step = make_provider(prov, method, spec, work)
        loss = work.refresh(i)
        sync(work.device)
        t0 = time.perf_counter()
        step(loss)                          # first call: lazy state, JIT, tables
        sync(work.device)
        first = time.perf_counter() - t0
        i += 1
        if prov == "fused":
            row["compile_s"] = f"{first:.3f}"
        timing, i = time_steps(step, work, start=i, target_s=s.target_s, min_reps=s.min_reps,
                               max_reps=s.max_reps, warmup=s.warmup)
    except Exception as err:  # noqa: BLE001 - record the failure and go on
        msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
        notes.append(f"failed: {type(err).__name__}: {msg[:160]}")
        if work.device.type == "cuda":
            try:
                torch.cuda.synchronize()
            except RuntimeError as cuda_err:   # a sticky CUDA error: later rows will fail too
                notes.append(f"CUDA error after the failure: {str(cuda_err).splitlines()[0][:120]}")
        return i + 1
    med = timing.pct(0.5)
    row.update(median_ms=f"{med:.6g}", p20_ms=f"{timing.pct(0.2):.6g}",
               p80_ms=f"{timing.pct(0.8):.6g}", reps=len(timing.device_ms),
               gbps=f"{nbytes / (med / 1e3) / 1e9:.4g}",
               frac_of_floor=f"{floor_ms / med:.4g}")
    if timing.host_ms:
        row["host_ms"] = f"{sorted(timing.host_ms)[len(timing.host_ms) // 2]:.6g}"
    if s.profile:
        launches, lnote = count_launches(step, work, i)
        i += 1
        if launches is not None:
            row["launches"] = f"{launches:.0f}"
        if lnote:
            notes.append(lnote)
    if work.device.type == "cuda":
        try:
            syncs = count_syncs(step, work, i)
            row["syncs"] = f"{syncs:.0f}"
        except Exception as err:  # noqa: BLE001 - keep the timings taken
            notes.append(f"sync count failed: {type(err).__name__}: {str(err)[:80]}")
        i += 1
    elif s.profile:
        notes.append("CPU: launches = top-level aten ops per step; syncs n/a")
    if not work.all_finite():
        notes.append("non-finite parameters after timing")
    if torch.equal(probe, work.data[0].reshape(-1)[:65536]):
        # e.g. DoG's first steps (of length ~ reps_rel) are below bf16 resolution
        notes.append("first 65536 elements unchanged by all steps")
    del step
    gc.collect()
    return i


# ------------------------------------------------------------------------------------------------
# Plot
# ------------------------------------------------------------------------------------------------
#: (foreach_item and compiled: providers of older CSVs, bench/results/step_cpu_2026-11-23.csv)
COLORS = {"reference": "tab:gray", "foreach_item": "tab:orange", "foreach": "tab:blue",
          "compiled": "tab:purple", "torch_sgd_clip": "tab:green", "fused": "tab:red"}



def plot(csv_path, png_path) -> None:
    """Time per step against parameter count: one panel per optimizer, one line per provider
    (solid float32, dashed bfloat16), the floor in black; x ticks name the layouts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [r for r in read_rows([csv_path]) if r.get("median_ms")]
    if not rows:
        raise ValueError(f"{csv_path}: no timed rows to plot")
    methods = [m for m in OPTIMIZERS if any(r["optimizer"] == m for r in rows)]
    ncol = min(4, len(methods) + 1)
    nrow = math.ceil((len(methods) + 1) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.6 * nrow), squeeze=False)
    styles = {"float32": "-", "bfloat16": "--", "float16": ":"}
    layouts = {int(r["n_params"]): r["layout"] for r in rows}
    ticks = sorted(layouts)
    for ax, method in zip(axes.flat, methods):
        mrows = [r for r in rows if r["optimizer"] == method]
        for dname, ls in styles.items():
            drows = [r for r in mrows if r["dtype"] == dname]
            if not drows:
                continue
            floor = {int(r["n_params"]): float(r["floor_ms"]) for r in drows}
            xs = sorted(floor)
            ax.plot(xs, [floor[x] for x in xs], ls, color="black", lw=1.4)
            for prov in readme_table.PROVIDERS:
                pts = sorted((int(r["n_params"]), float(r["median_ms"]))
                             for r in drows if r["provider"] == prov)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker="o", ms=4,
                            color=COLORS[prov])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{layouts[t]}\n{t / 1e6:.3g}M" for t in ticks], fontsize=6.5)
        ax.minorticks_off()
        ax.set_title(OPTIMIZERS[method].label, fontsize=10)
        ax.set_ylabel("ms per step", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(True, alpha=0.3)
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    legend_ax = axes.flat[len(methods)]
    present = [p for p in readme_table.PROVIDERS if any(r["provider"] == p for r in rows)]
    dts = [d for d in styles if any(r["dtype"] == d for r in rows)]
    handles = [Line2D([], [], color=COLORS[p], marker="o", ms=4, label=p) for p in present]
    handles.append(Line2D([], [], color="black", lw=1.4, label="floor (bytes / copy bandwidth)"))
    handles += [Line2D([], [], color="gray", ls=styles[d], label=d) for d in dts]
    legend_ax.legend(handles=handles, loc="upper left", fontsize=7.5, frameon=False)
    r0 = rows[0]
    threads = r0.get("threads", "?")
    legend_ax.text(0.0, 0.0, f"{r0['device_name']}, {threads} thread"
                   f"{'' if threads == '1' else 's'}\n"
                   f"torch {r0['torch']}, triton {r0['triton'] or 'n/a'}\n"
                   f"copy {float(r0['copy_gbps']):.1f} GB/s (read + write)\n"
                   f"{r0['date']}, {r0['git_sha']}",
                   fontsize=7, va="bottom", transform=legend_ax.transAxes)
    fig.suptitle("One optimizer step: time per step vs parameter count", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def _csv_list(text: str, known, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    for t in items:
        if t not in known:
            raise SystemExit(f"unknown {what} {t!r}; known: {', '.join(known)}")
    return items


def parse_args(argv=None) -> Settings:
    ap = argparse.ArgumentParser(prog="python -m bench.step_benchmark", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="auto: cuda if available, else cpu")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                    help="comma list of " + ", ".join(OPTIMIZERS))
    ap.add_argument("--layouts", default=None,
                    help="comma list of " + ", ".join(L.ALL_LAYOUTS) + " (default: "
                    + ",".join(L.DEFAULT_GPU) + " on cuda, " + ",".join(L.DEFAULT_CPU) + " on cpu)")
    ap.add_argument("--dtypes", default="float32,bfloat16",
                    help="comma list of " + ", ".join(DTYPES))
    ap.add_argument("--providers", default=",".join(PROVIDERS),
                    help="comma list of " + ", ".join(PROVIDERS))
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    ap.add_argument("--target-s", type=float, default=None,
                    help="timed seconds per measurement (default 0.4 cuda, 0.05 cpu; at least 10 "
                    "repetitions on cuda, 3 on cpu; at most 200 on cuda, 10 on cpu)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new measurement after this many seconds (rows so far are kept)")
    ap.add_argument("--out", type=Path, default=None,
                    help="CSV path (default bench/results/step_<device>_<date>.csv; the PNG goes "
                    "beside it)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-profile", action="store_true",
                    help="skip the profiled step that counts launches")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default 1 on cpu: on a shared two-core machine a "
                    "second OpenMP thread stalls at every barrier when another process holds the "
                    "other core)")
    ap.add_argument("--system-malloc", action="store_true",
                    help="cpu: leave glibc's malloc as it is (default: keep freed memory, so that "
                    "large temporaries are not page-faulted in again at every step)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="", help="free text added to every row's note")
    ap.add_argument("--git-sha", default=None,
                    help="the commit to record when the checkout has no .git (e.g. a copied tree)")
    a = ap.parse_args(argv)

    if a.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    cuda = device.type == "cuda"
    layouts = _csv_list(a.layouts or ",".join(L.DEFAULT_GPU if cuda else L.DEFAULT_CPU),
                        L.ALL_LAYOUTS, "layout")
    date = _dt.date.today().isoformat()
    out = a.out or RESULTS / f"step_{device.type}_{date}.csv"
    target = a.target_s if a.target_s is not None else (0.4 if cuda else 0.05)
    if a.quick:
        target = min(target, 0.1 if cuda else 0.03)
    return Settings(
        device=device,
        optimizers=_csv_list(a.optimizers, OPTIMIZERS, "optimizer"),
        layouts=layouts,
        dtypes=_csv_list(a.dtypes, DTYPES, "dtype"),
        providers=_csv_list(a.providers, PROVIDERS, "provider"),
        target_s=target,
        min_reps=(10 if cuda else 3) if not a.quick else (5 if cuda else 2),
        max_reps=(200 if cuda else 10) if not a.quick else 10,
        warmup=(3 if cuda else 1) if not a.quick else 1,
        quick=a.quick, out=Path(out), plot=not a.no_plot, budget_s=a.budget_s, seed=a.seed,
        extra_note=a.note, profile=not a.no_profile,
        git_sha=a.git_sha, system_malloc=a.system_malloc,
        threads=a.threads if a.threads is not None else (None if cuda else 1))


def main(argv=None) -> Path:
    if argv and argv[0] == "--plot-only":      # python -m bench.step_benchmark --plot-only X.csv
        if len(argv) != 2:
            raise SystemExit("usage: python -m bench.step_benchmark --plot-only RESULTS.csv")
        csv_path = Path(argv[1])
        plot(csv_path, csv_path.with_suffix(".png"))
        print(f"# wrote {csv_path.with_suffix('.png')}")
        return csv_path
    s = parse_args(argv)
    return run(s)


if __name__ == "__main__":
    main(sys.argv[1:])
