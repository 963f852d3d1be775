"""Reproduce the convergence experiments of Takezawa et al. (NeurIPS 2024) with this package.

    python -m bench.experiments                  # both experiments, CPU size (about 2 min, 2 cores)
    python -m bench.experiments --smoke          # a seconds-long check of the whole pipeline
    python -m bench.experiments --paper --device cuda   # the paper-length char-GPT (5000 steps)
    python -m bench.experiments --only synthetic # Figure 1 only (float64, CPU, ~20 s)
    python -m bench.experiments --out bench/results/experiments   # rewrite the committed run

1. ``synthetic``: Figure 1, the (L0, L1)-smooth quartic for L1 in {1, 10, 100, 1000}: GD, clipped
   GD (Table 3 hyperparameters), Polyak (f* known), DecSPS, AdaSPS and Inexact Polyak (Algorithm 1,
   one fresh run per horizon T). See bench/synthetic.py.
2. ``gpt``: a character-level GPT trained with SGD, clipped SGD and AdamW (each tuned on a small
   grid by final validation loss), MoMo and MoMo-Adam (default lr) and the parameter-free Polyak
   (f* = 0), DecSPS, AdaSPS, DoG and Inexact Polyak (T = the number of steps). See
   bench/char_gpt.py.

Sizes (one flag): ``--smoke`` (seconds; what the tests run), the default (``--quick`` is its
alias: a 115k-parameter GPT, 300 steps, minutes on a 2-core CPU) and ``--paper`` (the paper's
5000-step Nano-GPT length; hours on a CPU, meant for a GPU).

Before running, it prints its plan: the runs, their steps and a time estimate made from a short
timed warm-up on this machine, now; tqdm bars then show the progress and ETA.

Threads (``--threads auto``, the default): the CPU cores this process may use (its affinity) that
the 1-minute load average does not show busy, rounded, at least 1:
``max(1, min(cores, round(cores - load)))``. On a 2-core machine: 2 threads when idle, 1 as soon
as about one core's worth of other work runs. torch's own default (one thread per core) falls far
behind one thread when other jobs hold the cores (measured: one method 8 s at load 0.8, 140 s at
load 4-8 with 2 threads).

Writes CSVs and PNGs to --out (default bench/runs/experiments, ignored by git) and prints the
tables. The committed reference run lives in bench/results/experiments and is written only when
asked with ``--out bench/results/experiments``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace

import torch

from . import char_gpt as G
from . import synthetic as S

DEFAULT_OUT = os.path.join("bench", "runs", "experiments")
#: The committed reference run (README numbers): written only with an explicit --out.
REFERENCE_OUT = os.path.join("bench", "results", "experiments")

SIZES = {
    # seconds: the whole pipeline on a tiny model and a short synthetic run (the tests' size)
    "smoke": {
        "gpt": dict(steps=20, batch_size=8, block_size=32, n_layer=1, n_head=2, n_embd=32,
                    eval_batches=2, test_batches=4),
        "evals": 2, "lrs": (0.3,), "clips": (1.0, math.inf), "adamw_lrs": (3e-3,),
        "corpus_chars": 200_000,
        "synthetic": S.SyntheticConfig(l1_values=(1.0, 1000.0), short_iters=50, long_iters=100,
                                       t_grid=(10, 100)),
    },
    # the default: minutes on a 2-core CPU
    "default": {
        "gpt": dict(steps=300, batch_size=16, block_size=64, n_layer=2, n_head=2, n_embd=64,
                    eval_batches=8, test_batches=32),
        "evals": 12, "lrs": (0.1, 0.3, 1.0), "clips": (0.5, 1.0, math.inf),
        "adamw_lrs": G.ADAMW_LRS, "corpus_chars": 4_000_000,
        "synthetic": S.SyntheticConfig(t_grid=(10, 30, 100, 300, 1000, 3000, 10_000)),
    },
    # the paper's Nano-GPT length (5000 steps, batch 64, block 256) with nanoGPT's
    # shakespeare-char model shape (6 layers, 6 heads, width 384), dropout 0
    "paper": {
        "gpt": dict(steps=5000, batch_size=64, block_size=256, n_layer=6, n_head=6, n_embd=384,
                    eval_batches=20, test_batches=100),
        "evals": 20, "lrs": (1.0, 0.3, 0.1, 0.03, 0.01), "clips": (1.0, 5.0, math.inf),
        "adamw_lrs": (3e-4, 1e-3, 3e-3), "corpus_chars": 4_000_000,
        "synthetic": S.SyntheticConfig(),
    },
}


def _grid(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", dest="size", action="store_const", const="smoke",
                      help="seconds: 1-layer width-32 GPT, 20 steps, one lr; a short synthetic "
                           "run (checks the pipeline, not the methods)")
    size.add_argument("--quick", dest="size", action="store_const", const="default",
                      help="the default size (kept as an alias): GPT with 2 layers, width 64, "
                           "block 64, batch 16, 300 steps; lr grid 0.1/0.3/1, clip grid "
                           "0.5/1/inf, AdamW lr grid 1e-3/3e-3/1e-2; coarser synthetic T grid")
    size.add_argument("--paper", dest="size", action="store_const", const="paper",
                      help="the paper's length: GPT with 6 layers, width 384, block 256, batch "
                           "64, 5000 steps, lr grid 1/0.3/0.1/0.03/0.01, clip grid 1/5/inf, "
                           "AdamW 3e-4/1e-3/3e-3 (hours on a CPU: use --device cuda)")
    p.set_defaults(size="default")
    p.add_argument("--only", choices=("synthetic", "gpt"), help="run one experiment only")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device of the GPT runs (default: cuda if available, else cpu); the "
                        "synthetic problem always runs in float64 on the CPU")
    p.add_argument("--steps", type=int, help="GPT training steps (default: the size's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the GPT init and batches")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"results folder (default {DEFAULT_OUT}, ignored by git; the committed "
                        f"run is {REFERENCE_OUT})")
    p.add_argument("--data", help="a text file for the GPT (default: the standard library's "
                                  "own .py files, first 4,000,000 characters)")
    p.add_argument("--lrs", type=_floats,
                   help="SGD / clipped SGD lr grid, comma-separated (default "
                        + _grid(SIZES["default"]["lrs"]) + ")")
    p.add_argument("--clips", type=_floats,
                   help="clipped SGD threshold grid, inf allowed (default "
                        + _grid(SIZES["default"]["clips"]) + ")")
    p.add_argument("--adamw-lrs", type=_floats,
                   help="AdamW lr grid (default " + _grid(SIZES["default"]["adamw_lrs"]) + ")")
    p.add_argument("--methods", type=_methods, default=G.METHODS,
                   help="GPT methods, comma-separated (default: all of " + ",".join(G.METHODS)
                        + ")")
    p.add_argument("--reference", action="store_true",
                   help="use the eager reference optimizers (foreach=False), on CUDA too")
    p.add_argument("--threads", type=_threads, default="auto",
                   help="torch CPU threads, or auto (default): the usable cores that the load "
                        "average does not show busy, at least 1")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    return args


def _threads(text: str):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text!r}") \
            from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"--threads must be >= 1, got {value}")
    return value


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def choose_threads(cores: int | None = None, load: float | None = None) -> tuple[int, str]:
    """The --threads auto policy: max(1, min(cores, round(cores - load))), with the 1-minute
    load average (0 where the OS has none). Returns (threads, why)."""
    cores = usable_cores() if cores is None else cores
    if load is None:
        load = load_average()
    if load is None:
        return cores, f"{cores} usable cores, no load average on this OS"
    threads = max(1, min(cores, math.floor(cores - load + 0.5)))
    return threads, (f"{cores} usable cores, load average {load:.2f}: "
                     f"max(1, round({cores} - {load:.2f}))")


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err
    if not values or any(math.isnan(v) or v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in G.METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from {G.METHODS}")
    return names


def gpt_config(args: argparse.Namespace) -> tuple[G.TrainConfig, tuple, tuple, tuple]:
    """The GPT configuration and the grids (lrs, clips, adamw_lrs) of the chosen size and flags."""
    size = SIZES[args.size]
    steps = args.steps or size["gpt"]["steps"]
    cfg = G.TrainConfig(**{**size["gpt"], "steps": steps},
                        eval_every=max(1, steps // size["evals"]), seed=args.seed,
                        device=args.device, foreach=False if args.reference else None)
    return (cfg, args.lrs or size["lrs"], args.clips or size["clips"],
            args.adamw_lrs or size["adamw_lrs"])


# ---- tables --------------------------------------------------------------------------------------
def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def synthetic_tables(result: S.SyntheticResult) -> str:
    cfg = result.config
    l1s = list(cfg.l1_values)
    summary = {(r["method"], r["L1"]): r for r in result.summary()}
    rows = []
    for method in list(S.TRAJECTORY_METHODS) + [S.INEXACT]:
        iters = max(cfg.t_grid) if method == S.INEXACT else cfg.iterations(method)
        rows.append([S.LABELS[method], str(iters)]
                    + [f"{summary[(method, l1)]['final_gap']:.1e}" for l1 in l1s])
    first = format_table(["method", "iters"] + [f"L1={l1:g}" for l1 in l1s], rows)
    sweep = {(r["L1"], r["T"]): r["best_gap"] for r in result.sweep}
    second = format_table(["T"] + [f"L1={l1:g}" for l1 in l1s],
                          [[str(T)] + [f"{sweep[(l1, T)]:.1e}" for l1 in l1s]
                           for T in cfg.t_grid])
    initial = "  ".join(f"L1={l1:g}: {summary[('gd', l1)]['initial_gap']:.3g}" for l1 in l1s)
    return ("Synthetic (L0,L1)-smooth problem: f(x) - f* after the run "
            "(last iterate; Inexact Polyak: best iterate of Algorithm 1)\n"
            f"f(x0) - f*: {initial}\n{first}\n\n"
            "Inexact Polyak (Algorithm 1), f(x_best) - f* for each horizon T "
            f"(a fresh run from x0 = {cfg.x0:g} per T)\n{second}")


def gpt_table(exp: G.GPTExperiment) -> str:
    rows = []
    for method, r in exp.selected().items():
        rows.append([G.LABELS[method], r.hparams(), f"{r.curve[-1]['train_loss']:.3f}",
                     f"{r.curve[-1]['val_loss']:.3f}", f"{r.test_loss:.3f}",
                     "diverged" if r.diverged else "ok", f"{r.seconds:.0f}"])
    cfg = exp.config
    grid = [r for r in exp.runs if r.method in G.TUNED]
    grid_rows = [[r.method, r.hparams(), f"{r.curve[-1]['val_loss']:.3f}",
                  f"{r.test_loss:.3f}", "diverged" if r.diverged else "ok"] for r in grid]
    text = (f"Char-level GPT: {cfg.n_layer} layers, {cfg.n_head} heads, width {cfg.n_embd}, "
            f"block {cfg.block_size}, batch {cfg.batch_size}, {cfg.steps} steps, "
            f"{exp.num_parameters:,} parameters, vocab {exp.vocab_size}, device {cfg.device}\n"
            f"corpus: {exp.corpus}\n"
            + format_table(["method", "selected", "train", "val", "test", "status", "s"], rows))
    if grid_rows:
        text += ("\n\nGrid (SGD = clip inf; clipped SGD's selection also considers the SGD runs)\n"
                 + format_table(["method", "hyperparameters", "val", "test", "status"],
                                grid_rows))
    return text


# ---- run info ------------------------------------------------------------------------------------
def _git_sha() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, as lscpu shows it), else the platform's."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_model()} ({usable_cores()} cores, {torch.get_num_threads()} torch threads)"


def _load_text() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except (AttributeError, OSError):
        return "n/a"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# ---- plan ----------------------------------------------------------------------------------------
def synthetic_steps(cfg: S.SyntheticConfig) -> int:
    return len(cfg.l1_values) * (sum(cfg.iterations(m) for m in S.TRAJECTORY_METHODS)
                                 + sum(cfg.t_grid))


def synthetic_estimate(cfg: S.SyntheticConfig, probe: int = 300) -> float:
    """Seconds for the synthetic experiment, from `probe` timed steps of DecSPS run now (after
    20 untimed ones: the first steps pay one-off costs)."""
    S.run_trajectory(replace(cfg, long_iters=20), "decsps", cfg.l1_values[0])
    start = time.perf_counter()
    S.run_trajectory(replace(cfg, long_iters=probe), "decsps", cfg.l1_values[0])
    return synthetic_steps(cfg) * (time.perf_counter() - start) / probe


def synthetic_plan(cfg: S.SyntheticConfig, seconds: float) -> str:
    methods = len(S.TRAJECTORY_METHODS) + 1
    return (f"synthetic: {methods} methods x {len(cfg.l1_values)} L1 values "
            f"(Inexact Polyak: {len(cfg.t_grid)} horizons T), {synthetic_steps(cfg):,} float64 "
            f"steps; about {_duration(seconds)}")


def gpt_plan(cfg: G.TrainConfig, methods, jobs, seconds: float, threads: int) -> str:
    where = (f"at {threads} thread" + ("" if threads == 1 else "s")
             if torch.device(cfg.device).type == "cpu" else f"on {cfg.device}")
    return (f"char-GPT: {len(methods)} methods, {len(jobs)} runs x {cfg.steps} steps; about "
            f"{_duration(seconds)} {where}")


def write_run_info(path: str, info: dict) -> None:
    """key,value rows; keys of an earlier run_info.csv that this run does not set are kept
    (so `--only gpt` does not erase the synthetic run's conditions)."""
    merged = {}
    if os.path.exists(path):
        with open(path, newline="") as fh:
            merged = {row["key"]: row["value"] for row in csv.DictReader(fh)}
    merged.update(info)
    info = merged
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "value"])
        for k, v in info.items():
            w.writerow([k, v])


def main(argv=None) -> int:
    args = parse_args(argv)
    size = SIZES[args.size]
    progress = not args.no_progress
    load_start = _load_text()
    if args.threads == "auto":
        threads, why = choose_threads()
    else:
        threads, why = args.threads, "--threads"
    torch.set_num_threads(threads)
    wall = time.perf_counter()
    common = {"command": "python -m bench.experiments " + " ".join(argv if argv is not None
                                                                   else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "git": _git_sha(),
              "python": platform.python_version(), "torch": torch.__version__,
              "size": args.size, "threads": f"{threads} ({why})",
              "load_at_start": load_start}
    run_synthetic = args.only in (None, "synthetic")
    run_gpt = args.only in (None, "gpt")

    # ---- the plan: what runs, and how long it should take (timed on this machine, now)
    plan, total = [], 0.0
    if run_synthetic:
        syn_cfg = size["synthetic"]
        seconds = synthetic_estimate(syn_cfg)
        total += seconds
        plan.append(synthetic_plan(syn_cfg, seconds))
    if run_gpt:
        cfg, lrs, clips, adamw_lrs = gpt_config(args)
        if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
            print("error: --device cuda but CUDA is not available", file=sys.stderr)
            return 2
        text, corpus = G.load_text(args.data, size["corpus_chars"])
        data = G.CharData(text)
        jobs = G.plan_jobs(args.methods, lrs, clips, adamw_lrs)
        seconds = G.estimate_seconds(cfg, len(jobs), G.time_steps(data, cfg))
        total += seconds
        plan.append(gpt_plan(cfg, args.methods, jobs, seconds, threads))
    print(f"plan ({args.size} size; torch threads: {threads}, {why}):", flush=True)
    for line in plan:
        print("  " + line)
    print(f"  in all about {_duration(total)}; results to {args.out}", flush=True)
    if args.size == "paper" and run_gpt and torch.device(cfg.device).type == "cpu":
        print("note: the paper-length char-GPT on a CPU takes many hours; use --device cuda",
              file=sys.stderr)

    os.makedirs(args.out, exist_ok=True)
    info, outputs = {}, []
    if run_synthetic:
        info.update({f"synthetic_{k}": v for k, v in common.items()})
        start = time.perf_counter()
        result = S.run(syn_cfg, progress=progress)
        info["synthetic_seconds"] = f"{time.perf_counter() - start:.1f}"
        info["synthetic_device"] = "cpu, float64, foreach path (the default on the CPU)"
        outputs += list(S.write_csvs(result, args.out).values())
        outputs.append(S.plot(result, os.path.join(args.out, "synthetic.png")))
        print(synthetic_tables(result), end="\n\n", flush=True)
    if run_gpt:
        info.update({f"gpt_{k}": v for k, v in common.items()})
        start = time.perf_counter()
        exp = G.run_experiment(data, corpus, cfg, lrs, clips, methods=args.methods,
                               progress=progress, adamw_lrs=adamw_lrs)
        info.update({"gpt_seconds": f"{time.perf_counter() - start:.1f}",
                     "gpt_device": _device_name(cfg.device), "gpt_corpus": corpus,
                     "gpt_vocab": data.vocab_size, "gpt_parameters": exp.num_parameters,
                     "gpt_config": (f"{cfg.n_layer} layers, {cfg.n_head} heads, width "
                                    f"{cfg.n_embd}, block {cfg.block_size}, batch "
                                    f"{cfg.batch_size}, {cfg.steps} steps, eval every "
                                    f"{cfg.eval_every} steps on {cfg.eval_batches} batches, "
                                    f"test on {cfg.test_batches} batches, seed {cfg.seed}"),
                     "gpt_lr_grid": " ".join(f"{v:g}" for v in lrs),
                     "gpt_clip_grid": " ".join(f"{v:g}" for v in clips),
                     "gpt_adamw_lr_grid": " ".join(f"{v:g}" for v in adamw_lrs),
                     "gpt_optimizers": ("eager reference (foreach=False)" if args.reference
                                        else "default path (Triton on CUDA, foreach on CPU)")})
        outputs += list(G.write_csvs(exp, args.out).values())
        outputs.append(G.plot_curves(exp, os.path.join(args.out, "gpt_curves.png")))
        outputs.append(G.plot_test(exp, os.path.join(args.out, "gpt_test.png")))
        print(gpt_table(exp), end="\n\n", flush=True)
    elapsed = time.perf_counter() - wall
    info.update({"wall_seconds": f"{elapsed:.1f}", "estimated_seconds": f"{total:.1f}",
                 "machine": f"{cpu_model()}, {usable_cores()} usable cores",
                 "load_at_start": load_start, "load_at_end": _load_text()})
    info_path = os.path.join(args.out, "run_info.csv")
    write_run_info(info_path, info)
    outputs.append(info_path)
    print("wrote " + ", ".join(sorted(outputs)))
    print(f"took {_duration(elapsed)} (planned about {_duration(total)}); load average "
          f"(1/5/15 min) {load_start} at start, {_load_text()} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
